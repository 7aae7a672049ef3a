//! `http`: REST controllers, web APIs of gateways and meters.
//!
//! Config:
//!
//! ```json
//! {"baseUrl": "https://10.0.0.7:8443/api", "credentials": "gw-api", "auth": "bearer",
//!  "caFile": "/etc/ottomato/site-ca.pem", "clientCertFile": "/etc/ottomato/node.pem",
//!  "clientKeyFile": "/etc/ottomato/node.key", "healthPath": "/health",
//!  "headers": {"accept": "application/json"}, "timeoutMs": 5000}
//! ```
//!
//! - `auth`: `none` (default), `basic` (credential fields `username`,
//!   `password`) or `bearer` (field `token`). Secrets come from the node's
//!   credentials file, never from the spec.
//! - TLS: the system roots plus `caFile`; a client certificate when
//!   `clientCertFile`/`clientKeyFile` (PEM files on the node) are given.
//! - `init` builds the client (one per workload, with its connection pool)
//!   and checks `healthPath`; `ping` is a GET of `healthPath` (default `/`)
//!   that must answer 2xx or 3xx.
//! - Tasks `get`, `post`, `put`, `patch`, `delete`, kwargs `{path, query?,
//!   json?, body?, headers?}` → `{"status", "headers", "body"}` (`body` is
//!   parsed JSON when the response says it is JSON, else text).
//!   401/403 → `auth_failed`; any other 4xx/5xx → `device_error` with code
//!   `http <status>` and the start of the body; a certificate the node does
//!   not trust → `auth_failed`.
//! - Command classes: `post`, `put`, `patch`, `delete` are `write`; `get` is
//!   `read` when it is a plain GET — no `json`, `body` or `headers`, no `..`
//!   in the path — of a path listed exactly in the config's `readOnlyPaths`
//!   (any path when the spec lists none); any other `get` is `write`, since
//!   many devices act on a GET (`/cgi-bin/reboot`).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::common::{config_error, default_timeout_ms, ms, parse_config, parse_kwargs, NetError};
use crate::credentials::{Credential, Credentials};
use crate::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// The `http` kind; resolves credentials from `credentials`.
#[derive(Debug, Clone, Default)]
pub struct HttpKind {
    credentials: Credentials,
}

impl HttpKind {
    /// A kind that resolves named credentials from `credentials`.
    pub fn new(credentials: Credentials) -> Self {
        HttpKind { credentials }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Auth {
    #[default]
    None,
    Basic,
    Bearer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpConfig {
    base_url: String,
    #[serde(default)]
    credentials: Option<String>,
    #[serde(default)]
    auth: Auth,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    client_cert_file: Option<String>,
    #[serde(default)]
    client_key_file: Option<String>,
    #[serde(default = "default_health")]
    health_path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    read_only_paths: Option<Vec<String>>,
}

fn default_health() -> String {
    "/".into()
}

fn check(cfg: &HttpConfig) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(&cfg.base_url)
        .map_err(|e| config_error("http", format!("baseUrl {:?}: {e}", cfg.base_url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(config_error(
            "http",
            format!("baseUrl {:?}: scheme must be http or https", cfg.base_url),
        ));
    }
    if cfg.auth != Auth::None && cfg.credentials.is_none() {
        return Err(config_error(
            "http",
            "auth needs \"credentials\" naming the node's credential",
        ));
    }
    if cfg.client_cert_file.is_some() != cfg.client_key_file.is_some() {
        return Err(config_error(
            "http",
            "clientCertFile and clientKeyFile go together",
        ));
    }
    Ok(())
}

impl Kind for HttpKind {
    fn name(&self) -> &str {
        "http"
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        check(&parse_config::<HttpConfig>("http", config)?)
    }

    fn create(&self, _id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        let cfg: HttpConfig = parse_config("http", config)?;
        check(&cfg)?;
        let credential = match &cfg.credentials {
            Some(name) => Some(self.credentials.resolve("http", name)?),
            None => None,
        };
        let need = |f: &str| -> Result<(), ConfigError> {
            match credential.as_ref().and_then(|c| c.get(f)) {
                Some(_) => Ok(()),
                None => Err(config_error(
                    "http",
                    format!(
                        "credentials {:?} have no field {f:?} (auth {:?})",
                        cfg.credentials.as_deref().unwrap_or(""),
                        cfg.auth
                    ),
                )),
            }
        };
        match cfg.auth {
            Auth::None => {}
            Auth::Basic => need("username")?,
            Auth::Bearer => need("token")?,
        }
        Ok(Arc::new(HttpWorkload {
            cfg,
            credential,
            client: OnceLock::new(),
        }))
    }
}

struct HttpWorkload {
    cfg: HttpConfig,
    credential: Option<Credential>,
    client: OnceLock<reqwest::Client>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestArgs {
    #[serde(default)]
    path: String,
    #[serde(default)]
    query: BTreeMap<String, Value>,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// The causes below an error, outermost first.
fn causes<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = String> + 'a {
    std::iter::successors(e.source(), |s| s.source()).map(|s| s.to_string())
}

/// An error with its sources (`a: b: c`): reqwest hides the cause below.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::once(e.to_string())
        .chain(causes(e))
        .collect::<Vec<_>>()
        .join(": ")
}

fn http_error(what: &str, e: &reqwest::Error) -> NetError {
    // The whole chain: rustls puts the certificate problem at the bottom.
    let chain = error_chain(e);
    let msg = format!("{what}: {chain}");
    // Look for a certificate problem in the causes only: the error's own
    // text carries the URL, and `/api/certificates` is no TLS failure.
    let causes = causes(e).collect::<String>().to_lowercase();
    if causes.contains("certificate") {
        NetError::Auth(msg)
    } else if e.is_timeout() {
        NetError::Timeout(msg)
    } else if e.is_connect() || e.is_request() {
        NetError::Unreachable(msg)
    } else {
        NetError::Other(msg)
    }
}

impl HttpWorkload {
    fn build_client(&self) -> Result<reqwest::Client, WorkloadError> {
        let mut b = reqwest::Client::builder()
            .timeout(ms(self.cfg.timeout_ms))
            .connect_timeout(ms(self.cfg.timeout_ms))
            .pool_max_idle_per_host(2);
        if let Some(path) = &self.cfg.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| WorkloadError::new(format!("caFile {path}: {e}")))?;
            let ca = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| WorkloadError::new(format!("caFile {path}: {e}")))?;
            b = b.add_root_certificate(ca);
        }
        if let (Some(cert), Some(key)) = (&self.cfg.client_cert_file, &self.cfg.client_key_file) {
            let mut pem = std::fs::read(cert)
                .map_err(|e| WorkloadError::new(format!("clientCertFile {cert}: {e}")))?;
            pem.extend(
                std::fs::read(key)
                    .map_err(|e| WorkloadError::new(format!("clientKeyFile {key}: {e}")))?,
            );
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                WorkloadError::new(format!("client certificate: {}", error_chain(&e)))
            })?;
            b = b.identity(id);
        }
        b.build()
            .map_err(|e| WorkloadError::new(format!("http client: {}", error_chain(&e))))
    }

    fn url(&self, path: &str) -> String {
        let base = self.cfg.base_url.trim_end_matches('/');
        if path.is_empty() {
            base.to_string()
        } else if path.starts_with('/') {
            format!("{base}{path}")
        } else {
            format!("{base}/{path}")
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        args: &RequestArgs,
    ) -> Result<(u16, Value, Value), NetError> {
        let client = self
            .client
            .get()
            .ok_or_else(|| NetError::Other("not initialised".into()))?;
        let url = self.url(&args.path);
        let what = format!("{method} {url}");
        let mut req = client.request(method, &url);
        for (k, v) in self.cfg.headers.iter().chain(&args.headers) {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| NetError::InvalidArgs(format!("header name {k:?} is not valid")))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| NetError::InvalidArgs(format!("header {k:?}: value is not valid")))?;
            req = req.header(name, value);
        }
        if !args.query.is_empty() {
            let q: Vec<(String, String)> = args
                .query
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect();
            req = req.query(&q);
        }
        if let Some(j) = &args.json {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(j.to_string());
        } else if let Some(b) = &args.body {
            req = req.body(b.clone());
        }
        let cred = self.credential.as_ref();
        req = match self.cfg.auth {
            Auth::None => req,
            Auth::Basic => req.basic_auth(
                cred.and_then(|c| c.get("username")).unwrap_or(""),
                cred.and_then(|c| c.get("password")),
            ),
            Auth::Bearer => req.bearer_auth(cred.and_then(|c| c.get("token")).unwrap_or("")),
        };
        let resp = req.send().await.map_err(|e| http_error(&what, &e))?;
        let status = resp.status().as_u16();
        let mut headers = Map::new();
        for (k, v) in resp.headers() {
            if let Ok(v) = v.to_str() {
                headers.insert(k.as_str().to_string(), json!(v));
            }
        }
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        let bytes = resp.bytes().await.map_err(|e| http_error(&what, &e))?;
        let body = if is_json {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
        } else {
            json!(String::from_utf8_lossy(&bytes))
        };
        if status == 401 || status == 403 {
            return Err(NetError::Auth(format!("{what}: HTTP {status}")));
        }
        if status >= 400 {
            let text = match &body {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let mut short: String = text.chars().take(512).collect();
            if short.len() < text.len() {
                short.push('…');
            }
            return Err(NetError::Device {
                code: format!("http {status}"),
                message: format!("{what}: {short}"),
            });
        }
        Ok((status, Value::Object(headers), body))
    }

    async fn health(&self) -> Result<(), NetError> {
        let args = RequestArgs {
            path: self.cfg.health_path.clone(),
            query: BTreeMap::new(),
            json: None,
            body: None,
            headers: BTreeMap::new(),
        };
        self.send(reqwest::Method::GET, &args).await.map(drop)
    }
}

#[async_trait]
impl Workload for HttpWorkload {
    async fn init(&self) -> Result<(), WorkloadError> {
        if self.client.get().is_none() {
            let client = self.build_client()?;
            let _ = self.client.set(client);
        }
        self.health().await.map_err(Into::into)
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        self.health().await.map_err(Into::into)
    }

    fn command_class(&self, task: &Task) -> CommandClass {
        // Many devices act on a GET (`/cgi-bin/reboot`, `?action=…`): a
        // read is a plain GET — no body, no headers of the caller's, no
        // `..` — of a path the spec lists in `readOnlyPaths`, or of any
        // path when it lists none.
        let Ok(a) = parse_kwargs::<RequestArgs>(&task.kwargs) else {
            return CommandClass::Write;
        };
        let plain = task.command == "get"
            && a.json.is_none()
            && a.body.is_none()
            && a.headers.is_empty()
            && !a
                .path
                .split(['/', '\\'])
                .any(|seg| seg == ".." || seg.to_ascii_lowercase().contains("%2e"));
        let listed = match &self.cfg.read_only_paths {
            None => true,
            Some(paths) => paths.contains(&a.path),
        };
        if plain && listed {
            CommandClass::Read
        } else {
            CommandClass::Write
        }
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        let method = match task.command.as_str() {
            "get" => reqwest::Method::GET,
            "post" => reqwest::Method::POST,
            "put" => reqwest::Method::PUT,
            "patch" => reqwest::Method::PATCH,
            "delete" => reqwest::Method::DELETE,
            other => return Err(TaskError::UnknownCommand(other.to_string())),
        };
        let args: RequestArgs = parse_kwargs(&task.kwargs)?;
        if args.json.is_some() && args.body.is_some() {
            return Err(TaskError::InvalidArgs("give json or body, not both".into()));
        }
        let (status, headers, body) = self.send(method, &args).await?;
        Ok(json!({"status": status, "headers": headers, "body": body}))
    }

    async fn stop(&self) -> Result<(), WorkloadError> {
        Ok(())
    }

    fn info(&self) -> Value {
        json!({"baseUrl": self.cfg.base_url})
    }
}
