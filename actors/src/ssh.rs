//! `ssh`: network gear and servers managed over SSH.
//!
//! Config:
//!
//! ```json
//! {"host": "10.0.0.1", "port": 22, "credentials": "core-routers",
//!  "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA…",
//!  "timeoutMs": 10000, "prompt": "[>#$%]\\s*$"}
//! ```
//!
//! - The host key is **pinned**: `hostKey` (a known_hosts line's key type and
//!   base64, a leading host field is ignored) or `hostKeyFingerprint`
//!   (`SHA256:…`, as `ssh-keygen -lf` prints it). One of them is required;
//!   an unknown or changed key fails with `auth_failed` and is never
//!   accepted.
//! - The node's credential named by `credentials` holds `username` and one
//!   of `password`, `private_key_file` (a path on the node) or `private_key`
//!   (the key text), with `passphrase` when the key is encrypted.
//! - One session per workload, opened by `init`, reused by every task (one
//!   channel per task) and re-opened after a failure (backoff 100 ms
//!   doubling to 10 s). `ping` is an SSH keepalive on the open session.
//! - Tasks: `exec` `{command}` → `{"stdout", "stderr", "exitStatus"}`;
//!   `send` `{commands: [..]}` for interactive CLIs: a shell on a pty, each
//!   command sent after the prompt (`prompt`, a regex matched at the end of
//!   the output) → `{"outputs": [..]}`, escape codes stripped, the echoed
//!   command and the prompt removed.
//! - Command classes: `exec` and `send` may change anything, so they are
//!   `write` — except the exact command lines listed in the config's
//!   `readOnlyCommands` (`["show version", "show running-config"]`): an
//!   `exec` of one of them, or a `send` of only such lines, is `read` and may
//!   come on a read subject. Matching is exact (no patterns: `show x; reload`
//!   is not `show x`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use russh::{ChannelMsg, Disconnect};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::common::{config_error, ms, parse_config, parse_kwargs, within, NetError};
use crate::credentials::{Credential, Credentials};
use crate::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// The `ssh` kind; resolves credentials from `credentials`.
#[derive(Debug, Clone, Default)]
pub struct SshKind {
    credentials: Credentials,
}

impl SshKind {
    /// A kind that resolves named credentials from `credentials`.
    pub fn new(credentials: Credentials) -> Self {
        SshKind { credentials }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SshConfig {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    credentials: String,
    #[serde(default)]
    host_key: Option<String>,
    #[serde(default)]
    host_key_fingerprint: Option<String>,
    #[serde(default = "default_ssh_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_prompt")]
    prompt: String,
    #[serde(default)]
    read_only_commands: Vec<String>,
}

const fn default_port() -> u16 {
    22
}
const fn default_ssh_timeout() -> u64 {
    10_000
}
fn default_prompt() -> String {
    r"[>#$%]\s*$".into()
}

/// The pinned key's algorithms, offered first so that a host with several
/// host keys shows the pinned one (an RSA pin on a host that also has
/// Ed25519 would otherwise look changed). `None`: pinned by fingerprint.
fn pinned_algorithms(cfg: &SshConfig) -> Option<Vec<russh::keys::Algorithm>> {
    use russh::keys::Algorithm;
    let line = cfg.host_key.as_ref()?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let i = parts
        .iter()
        .position(|p| p.starts_with("ssh-") || p.starts_with("ecdsa-"))?;
    let key = russh::keys::parse_public_key_base64(parts.get(i + 1)?).ok()?;
    Some(match key.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
            Algorithm::Rsa { hash: None },
        ],
        other => vec![other],
    })
}

/// The pinned host key's SHA-256 fingerprint (`SHA256:…`).
fn pinned_fingerprint(cfg: &SshConfig) -> Result<String, ConfigError> {
    match (&cfg.host_key, &cfg.host_key_fingerprint) {
        (Some(_), Some(_)) => Err(config_error(
            "ssh",
            "give hostKey or hostKeyFingerprint, not both",
        )),
        (None, None) => Err(config_error(
            "ssh",
            "the host key must be pinned: hostKey (\"ssh-ed25519 AAAA…\") or hostKeyFingerprint \
             (\"SHA256:…\", from ssh-keygen -lf); unknown keys are never accepted",
        )),
        (None, Some(fp)) => {
            if !fp.starts_with("SHA256:") || fp.len() < 20 {
                return Err(config_error(
                    "ssh",
                    format!("hostKeyFingerprint {fp:?}: expected SHA256:<base64>"),
                ));
            }
            Ok(fp.trim_end_matches('=').to_string())
        }
        (Some(line), None) => {
            // "[host] type base64 [comment]": find the base64 after the type.
            let parts: Vec<&str> = line.split_whitespace().collect();
            let b64 = parts
                .iter()
                .position(|p| p.starts_with("ssh-") || p.starts_with("ecdsa-"))
                .and_then(|i| parts.get(i + 1))
                .ok_or_else(|| {
                    config_error(
                        "ssh",
                        format!("hostKey {line:?}: expected \"ssh-ed25519 AAAA…\""),
                    )
                })?;
            let key = russh::keys::parse_public_key_base64(b64)
                .map_err(|e| config_error("ssh", format!("hostKey: {e}")))?;
            Ok(key
                .fingerprint(HashAlg::Sha256)
                .to_string()
                .trim_end_matches('=')
                .to_string())
        }
    }
}

enum Login {
    Password(String),
    Key(Arc<PrivateKey>),
}

fn login(cfg: &SshConfig, cred: &Credential) -> Result<(String, Login), ConfigError> {
    let name = &cfg.credentials;
    let user = cred
        .get("username")
        .ok_or_else(|| {
            config_error(
                "ssh",
                format!("credentials {name:?} have no field \"username\""),
            )
        })?
        .to_string();
    let passphrase = cred.get("passphrase");
    let key = |text: &str, from: &str| {
        russh::keys::decode_secret_key(text, passphrase)
            .map(|k| Login::Key(Arc::new(k)))
            .map_err(|e| config_error("ssh", format!("credentials {name:?} {from}: {e}")))
    };
    let how = if let Some(path) = cred.get("private_key_file") {
        // Read when the workload is built on the node (the file is the node's).
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_error(
                "ssh",
                format!("credentials {name:?} private_key_file {path}: {e}"),
            )
        })?;
        key(&text, "private_key_file")?
    } else if let Some(text) = cred.get("private_key") {
        key(text, "private_key")?
    } else if let Some(pw) = cred.get("password") {
        Login::Password(pw.to_string())
    } else {
        return Err(config_error(
            "ssh",
            format!("credentials {name:?} need password, private_key_file or private_key"),
        ));
    };
    Ok((user, how))
}

impl Kind for SshKind {
    fn name(&self) -> &str {
        "ssh"
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        let cfg: SshConfig = parse_config("ssh", config)?;
        pinned_fingerprint(&cfg)?;
        regex::Regex::new(&cfg.prompt).map_err(|e| config_error("ssh", format!("prompt: {e}")))?;
        Ok(())
    }

    fn create(&self, _id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        self.validate(config)?;
        let cfg: SshConfig = parse_config("ssh", config)?;
        let pinned = pinned_fingerprint(&cfg)?;
        let prompt = regex::Regex::new(&cfg.prompt).map_err(|e| config_error("ssh", e))?;
        let cred = self.credentials.resolve("ssh", &cfg.credentials)?;
        let (user, how) = login(&cfg, &cred)?;
        Ok(Arc::new(SshWorkload {
            cfg,
            pinned,
            prompt,
            user,
            how,
            conn: Mutex::new(Conn::default()),
        }))
    }
}

/// Checks the server's key against the pin; remembers what it saw.
struct Pin {
    pinned: String,
    seen: Arc<std::sync::Mutex<Option<String>>>,
}

impl client::Handler for Pin {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let seen = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key
                .fingerprint(HashAlg::Sha256)
                .to_string()
                .trim_end_matches('=')
                .to_string(),
            russh::keys::PublicKeyOrCertificate::Certificate(_) => "a host certificate".to_string(),
        };
        let ok = seen == self.pinned;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
        Ok(ok)
    }
}

#[derive(Default)]
struct Conn {
    handle: Option<Arc<Handle<Pin>>>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

struct SshWorkload {
    cfg: SshConfig,
    pinned: String,
    prompt: regex::Regex,
    user: String,
    how: Login,
    conn: Mutex<Conn>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn ssh_error(what: &str, e: russh::Error) -> NetError {
    match e {
        russh::Error::IO(io) => NetError::io(what, &io),
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::SendError => {
            NetError::Unreachable(format!("{what}: {e}"))
        }
        russh::Error::ConnectionTimeout | russh::Error::KeepaliveTimeout => {
            NetError::Timeout(format!("{what}: {e}"))
        }
        other => NetError::Other(format!("{what}: {other}")),
    }
}

/// Removes terminal escape sequences and carriage returns.
fn strip_escapes(s: &str) -> String {
    static ESC: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = ESC.get_or_init(|| {
        regex::Regex::new(
            r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]|\x1b[=>78]|\r",
        )
        .expect("valid regex")
    });
    re.replace_all(s, "").into_owned()
}

/// A channel that is closed however the task ends: russh does not close a
/// dropped channel, and a cancelled task must not leave a shell open on the
/// device (each takes one of its sessions).
struct Open(Option<russh::Channel<client::Msg>>);

impl Open {
    fn ch(&mut self) -> &mut russh::Channel<client::Msg> {
        self.0.as_mut().expect("open until dropped")
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(ch) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = ch.close().await;
                });
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    command: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendArgs {
    commands: Vec<String>,
}

impl SshWorkload {
    fn address(&self) -> String {
        format!("{}:{}", self.cfg.host, self.cfg.port)
    }

    fn limit(&self) -> Duration {
        ms(self.cfg.timeout_ms)
    }

    async fn connect(&self) -> Result<Arc<Handle<Pin>>, NetError> {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let handler = Pin {
            pinned: self.pinned.clone(),
            seen: seen.clone(),
        };
        let mut config = client::Config {
            inactivity_timeout: None,
            // A silently dead peer is noticed by russh itself too.
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            ..Default::default()
        };
        if let Some(algs) = pinned_algorithms(&self.cfg) {
            config.preferred.key = std::borrow::Cow::Owned(algs);
        }
        let config = Arc::new(config);
        let addr = self.address();
        let what = format!("ssh {addr}");
        let connected = within(self.limit(), &what, async {
            client::connect(config, (self.cfg.host.as_str(), self.cfg.port), handler)
                .await
                .map_err(|e| ssh_error(&what, e))
        })
        .await;
        let mut h = match connected {
            Ok(h) => h,
            Err(e) => {
                let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
                return Err(match seen {
                    Some(s) if s != self.pinned => NetError::Auth(format!(
                        "{what}: host key {s} is not the pinned {} (changed or unknown host key; \
                         never accepted)",
                        self.pinned
                    )),
                    _ => e,
                });
            }
        };
        let auth = within(self.limit(), &format!("{what} login"), async {
            let r = match &self.how {
                Login::Password(pw) => h.authenticate_password(self.user.clone(), pw.clone()).await,
                Login::Key(key) => {
                    let hash = h
                        .best_supported_rsa_hash()
                        .await
                        .map_err(|e| ssh_error(&what, e))?;
                    h.authenticate_publickey(
                        self.user.clone(),
                        PrivateKeyWithHashAlg::new(key.clone(), hash.flatten()),
                    )
                    .await
                }
            };
            r.map_err(|e| ssh_error(&what, e))
        })
        .await?;
        if !auth.success() {
            return Err(NetError::Auth(format!(
                "{what}: user {:?} refused ({})",
                self.user,
                match self.how {
                    Login::Password(_) => "password",
                    Login::Key(_) => "public key",
                }
            )));
        }
        Ok(Arc::new(h))
    }

    /// The open session, connecting (with backoff after a failure) if needed.
    async fn session(&self) -> Result<Arc<Handle<Pin>>, NetError> {
        let mut conn = self.conn.lock().await;
        if let Some(h) = &conn.handle {
            if !h.is_closed() {
                return Ok(h.clone());
            }
            conn.handle = None;
        }
        if let Some(at) = conn.retry_at {
            if Instant::now() < at {
                return Err(NetError::Unreachable(format!(
                    "ssh {}: not connected (last attempt failed; next in {:?})",
                    self.address(),
                    at - Instant::now()
                )));
            }
        }
        match self.connect().await {
            Ok(h) => {
                conn.handle = Some(h.clone());
                conn.retry_at = None;
                conn.backoff = Duration::ZERO;
                Ok(h)
            }
            Err(e) => {
                conn.backoff = (conn.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                conn.retry_at = Some(Instant::now() + conn.backoff);
                Err(e)
            }
        }
    }

    /// A failure of the session itself: drop it so the next call reconnects.
    async fn forget(&self, h: &Arc<Handle<Pin>>) {
        let mut conn = self.conn.lock().await;
        if conn.handle.as_ref().is_some_and(|c| Arc::ptr_eq(c, h)) {
            conn.handle = None;
        }
    }

    async fn exec(&self, command: &str) -> Result<Value, NetError> {
        let h = self.session().await?;
        let what = format!("exec on {}", self.address());
        let r = within(self.limit(), &what, async {
            let mut open = Open(Some(
                h.channel_open_session()
                    .await
                    .map_err(|e| ssh_error(&what, e))?,
            ));
            let ch = open.ch();
            ch.exec(true, command)
                .await
                .map_err(|e| ssh_error(&what, e))?;
            let (mut out, mut err, mut status, mut signal) = (Vec::new(), Vec::new(), None, None);
            while let Some(msg) = ch.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(signal_name),
                    _ => {}
                }
            }
            if status.is_none() {
                // No exit status: the command did not end on its own.
                return Err(match signal {
                    Some(sig) => NetError::Device {
                        code: "signal".into(),
                        message: format!("{what}: the command was killed by {sig:?}"),
                    },
                    None => NetError::Unreachable(format!(
                        "{what}: the session ended before the command did ({} bytes of output)",
                        out.len()
                    )),
                });
            }
            Ok(json!({
                "stdout": String::from_utf8_lossy(&out),
                "stderr": String::from_utf8_lossy(&err),
                "exitStatus": status,
            }))
        })
        .await;
        if matches!(r, Err(NetError::Unreachable(_) | NetError::Timeout(_))) {
            self.forget(&h).await;
        }
        r
    }

    async fn send(&self, commands: &[String]) -> Result<Value, NetError> {
        let h = self.session().await?;
        let what = format!("send on {}", self.address());
        let r = within(self.limit() * (commands.len() as u32 + 1), &what, async {
            let mut open = Open(Some(
                h.channel_open_session()
                    .await
                    .map_err(|e| ssh_error(&what, e))?,
            ));
            let ch = open.ch();
            ch.request_pty(true, "vt100", 200, 50, 0, 0, &[])
                .await
                .map_err(|e| ssh_error(&what, e))?;
            ch.request_shell(true)
                .await
                .map_err(|e| ssh_error(&what, e))?;
            let mut buf = String::new();
            // The banner, up to the first prompt.
            self.read_to_prompt(ch, &mut buf, &what).await?;
            let mut outputs = Vec::new();
            for cmd in commands {
                buf.clear();
                ch.data_bytes(format!("{cmd}\n").into_bytes())
                    .await
                    .map_err(|e| ssh_error(&what, e))?;
                self.read_to_prompt(ch, &mut buf, &what).await?;
                let clean = strip_escapes(&buf);
                let mut lines: Vec<&str> = clean.lines().collect();
                if lines
                    .first()
                    .is_some_and(|l| l.trim_end().ends_with(cmd.trim()))
                {
                    lines.remove(0); // the echo of the command
                }
                lines.pop(); // the prompt
                outputs.push(lines.join("\n"));
            }
            let _ = ch.eof().await;
            Ok(json!({"outputs": outputs}))
        })
        .await;
        if matches!(r, Err(NetError::Unreachable(_))) || h.is_closed() {
            self.forget(&h).await;
        }
        r
    }

    async fn read_to_prompt(
        &self,
        ch: &mut russh::Channel<client::Msg>,
        buf: &mut String,
        what: &str,
    ) -> Result<(), NetError> {
        loop {
            // The prompt is the last, unterminated line: output lines that
            // end in `%` or `>` are not prompts.
            let clean = strip_escapes(buf);
            let last = clean.rsplit('\n').next().unwrap_or("");
            if !last.is_empty() && self.prompt.is_match(last) {
                return Ok(());
            }
            match ch.wait().await {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    buf.push_str(&String::from_utf8_lossy(&data));
                }
                Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => {
                    return Err(NetError::Other(format!(
                        "{what}: the shell closed before the prompt ({:?}); output: {:?}",
                        self.cfg.prompt,
                        strip_escapes(buf)
                    )))
                }
                Some(_) => {}
            }
        }
    }
}

#[async_trait]
impl Workload for SshWorkload {
    async fn init(&self) -> Result<(), WorkloadError> {
        self.conn.lock().await.retry_at = None;
        self.session().await.map(drop).map_err(Into::into)
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        let h = self.session().await?;
        let what = format!("keepalive on {}", self.address());
        let r = within(self.limit(), &what, async {
            h.send_keepalive(true)
                .await
                .map_err(|e| ssh_error(&what, e))
        })
        .await;
        if r.is_err() || h.is_closed() {
            self.forget(&h).await;
            return Err(r
                .err()
                .unwrap_or_else(|| NetError::Unreachable(format!("{what}: session closed")))
                .into());
        }
        Ok(())
    }

    fn command_class(&self, task: &Task) -> CommandClass {
        // A shell command may change anything, so only the exact command
        // lines the spec lists in `readOnlyCommands` are reads.
        let listed = |c: &str| self.cfg.read_only_commands.iter().any(|r| r == c);
        let read = match task.command.as_str() {
            "exec" => task
                .kwargs
                .get("command")
                .and_then(Value::as_str)
                .is_some_and(listed),
            "send" => task
                .kwargs
                .get("commands")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    !cs.is_empty() && cs.iter().all(|c| c.as_str().is_some_and(listed))
                }),
            _ => false,
        };
        if read {
            CommandClass::Read
        } else {
            CommandClass::Write
        }
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        match task.command.as_str() {
            "exec" => {
                let a: ExecArgs = parse_kwargs(&task.kwargs)?;
                Ok(self.exec(&a.command).await?)
            }
            "send" => {
                let a: SendArgs = parse_kwargs(&task.kwargs)?;
                if a.commands.is_empty() {
                    return Err(TaskError::InvalidArgs("commands is empty".into()));
                }
                Ok(self.send(&a.commands).await?)
            }
            other => Err(TaskError::UnknownCommand(other.to_string())),
        }
    }

    async fn stop(&self) -> Result<(), WorkloadError> {
        let h = self.conn.lock().await.handle.take();
        if let Some(h) = h {
            let _ = tokio::time::timeout(
                self.limit(),
                h.disconnect(Disconnect::ByApplication, "workload stopped", "en"),
            )
            .await;
        }
        Ok(())
    }

    fn info(&self) -> Value {
        json!({"address": self.address(), "user": self.user, "hostKey": self.pinned})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(
            strip_escapes("\x1b[?2004hroot# \x1b[0m\r\nok"),
            "root# \nok"
        );
    }

    #[test]
    fn the_host_key_must_be_pinned() {
        let kind = SshKind::default();
        let e = kind
            .validate(&json!({"host": "h", "credentials": "c"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pinned"), "{e}");
        let e = kind
            .validate(&json!({"host": "h", "credentials": "c", "hostKeyFingerprint": "MD5:aa"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHA256"), "{e}");
    }
}
