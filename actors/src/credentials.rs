//! Named credentials, resolved on each node: secrets never travel in specs.
//!
//! Specs live in a bucket every operator can read, so a spec only *names* a
//! credential (`"credentials": "core-routers"`). Each node loads the named
//! credentials from its own file (`ottomato node --credentials FILE`):
//!
//! ```toml
//! [core-routers]
//! username = "admin"
//! password_env = "CORE_ROUTERS_PASSWORD"   # read from the node's environment
//!
//! [meters]
//! token = "…"                               # or inline in this file (mode 0600)
//! ```
//!
//! A field `<name>_env = "VAR"` is the value of environment variable `VAR`
//! at load time; a missing variable is an error naming both. The built-in
//! kinds refuse a spec whose `config` holds a secret inline
//! ([`refuse_inline_secrets`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::ConfigError;

/// One named credential: its fields (`username`, `password`, `token`, …).
/// `Debug` shows field names only, never values.
#[derive(Clone, Default, PartialEq)]
pub struct Credential {
    fields: BTreeMap<String, String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.fields.keys()).finish()
    }
}

impl Credential {
    /// A credential from field/value pairs.
    pub fn new<K: Into<String>, V: Into<String>>(fields: impl IntoIterator<Item = (K, V)>) -> Self {
        Credential {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A field's value.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }
}

/// The credentials a node knows, by name. Cloning shares them: the kinds
/// built by [`crate::builtin`] hold one handle, and loading a file into any
/// clone makes it visible to all.
#[derive(Clone, Default)]
pub struct Credentials {
    by_name: Arc<RwLock<HashMap<String, Credential>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

impl Credentials {
    /// Adds (or replaces) one credential.
    pub fn insert(&self, name: impl Into<String>, credential: Credential) {
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), credential);
    }

    /// A credential by name.
    pub fn get(&self, name: &str) -> Option<Credential> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The names known, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Loads every credential of a TOML file (see the module docs); the
    /// error names the file, the credential and the field.
    pub fn load_file(&self, path: &std::path::Path) -> Result<usize, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
        self.load_toml(&text, |var| std::env::var(var).ok())
            .map_err(|e| format!("credentials file {}: {e}", path.display()))
    }

    /// Loads credentials from TOML text, reading `*_env` fields with `env`.
    pub fn load_toml(
        &self,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<usize, String> {
        // toml's Display quotes the offending line, which may hold a secret:
        // report only what is wrong and where.
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_string(),
            }
        })?;
        let mut loaded = Vec::new();
        for (name, value) in table {
            let toml::Value::Table(fields) = value else {
                return Err(format!(
                    "{name:?} must be a table of fields ([{name}] with username = …)"
                ));
            };
            let mut cred = BTreeMap::new();
            for (field, v) in fields {
                let toml::Value::String(v) = v else {
                    return Err(format!("[{name}] {field}: values are strings"));
                };
                match field.strip_suffix("_env") {
                    Some(real) => {
                        let got = env(&v).ok_or_else(|| {
                            format!("[{name}] {field}: environment variable {v} is not set")
                        })?;
                        cred.insert(real.to_string(), got);
                    }
                    None => {
                        cred.insert(field, v);
                    }
                }
            }
            loaded.push((name, Credential { fields: cred }));
        }
        let n = loaded.len();
        for (name, cred) in loaded {
            self.insert(name, cred);
        }
        Ok(n)
    }

    /// The credential a config names, for `kind`: a clear error when the
    /// node does not have it.
    pub fn resolve(&self, kind: &str, name: &str) -> Result<Credential, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError {
            kind: kind.to_string(),
            message: format!(
                "credentials {name:?} are not configured on this node (known: {}); \
                 add them to the file given to `ottomato node --credentials`",
                match self.names() {
                    v if v.is_empty() => "none".to_string(),
                    v => v.join(", "),
                }
            ),
        })
    }
}

/// Config keys that hold secrets: refused in a spec, which every operator
/// can read.
pub const SECRET_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "bearer",
    "community",
    "authPassword",
    "privPassword",
    "authKey",
    "privKey",
    "privateKey",
    "passphrase",
    "apiKey",
    "xApiKey",
    "authorization",
    "proxyAuthorization",
    "cookie",
];

/// Key names containing one of these are secrets too (`snmpAuthPassword`).
const SECRET_WORDS: &[&str] = &["password", "passwd", "secret", "passphrase"];

/// A URL with a password in it (`https://user:pw@host`).
fn url_with_password(s: &str) -> bool {
    let Some((_, rest)) = s.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// Refuses a config that holds a secret inline (any key of [`SECRET_KEYS`],
/// at any depth, compared case-insensitively without `_`/`-`).
pub fn refuse_inline_secrets(kind: &str, config: &Value) -> Result<(), ConfigError> {
    fn norm(k: &str) -> String {
        k.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    }
    fn walk(v: &Value, path: &str) -> Option<String> {
        match v {
            Value::Object(m) => m.iter().find_map(|(k, v)| {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let key = norm(k);
                if SECRET_KEYS.iter().any(|s| norm(s) == key)
                    || SECRET_WORDS.iter().any(|w| key.contains(w))
                    || v.as_str().is_some_and(url_with_password)
                {
                    Some(here)
                } else {
                    walk(v, &here)
                }
            }),
            Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
                let here = format!("{path}[{i}]");
                if v.as_str().is_some_and(url_with_password) {
                    Some(here)
                } else {
                    walk(v, &here)
                }
            }),
            _ => None,
        }
    }
    match walk(config, "") {
        Some(field) => Err(ConfigError {
            kind: kind.to_string(),
            message: format!(
                "field {field:?} holds a secret inline; specs are readable by every operator: \
                 put it in a credential on the nodes and name it with \"credentials\""
            ),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_fields_are_read_and_missing_ones_are_named() {
        let c = Credentials::default();
        let env = |v: &str| (v == "PW").then(|| "s3cret".to_string());
        c.load_toml("[r]\nusername = \"admin\"\npassword_env = \"PW\"\n", env)
            .unwrap();
        let r = c.get("r").unwrap();
        assert_eq!(r.get("password"), Some("s3cret"));
        assert_eq!(r.get("username"), Some("admin"));
        assert!(!format!("{r:?}").contains("s3cret"));
        let e = c.load_toml("[x]\ntoken_env = \"NOPE\"\n", env).unwrap_err();
        assert!(e.contains("[x] token_env") && e.contains("NOPE"), "{e}");
        let e = c.resolve("http", "missing").unwrap_err().to_string();
        assert!(e.contains("\"missing\"") && e.contains("known: r"), "{e}");
    }

    #[test]
    fn a_bad_file_is_reported_without_its_secrets() {
        let c = Credentials::default();
        let e = c
            .load_toml(
                "[r]\npassword = \"s3cret\"\npassword = \"s3cret\"\n",
                |_| None,
            )
            .unwrap_err();
        assert!(!e.contains("s3cret") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn inline_secrets_are_refused_with_the_field() {
        let ok = serde_json::json!({"host": "h", "credentials": "c"});
        assert!(refuse_inline_secrets("snmp", &ok).is_ok());
        let bad = serde_json::json!({"host": "h", "v3": {"auth_password": "x"}});
        let e = refuse_inline_secrets("snmp", &bad).unwrap_err().to_string();
        assert!(e.contains("v3.auth_password"), "{e}");
        for (bad, field) in [
            (
                serde_json::json!({"headers": {"Authorization": "Bearer x"}}),
                "headers.Authorization",
            ),
            (
                serde_json::json!({"headers": {"X-API-Key": "k"}}),
                "headers.X-API-Key",
            ),
            (
                serde_json::json!({"baseUrl": "https://ops:pw@10.0.0.1/api"}),
                "baseUrl",
            ),
            (
                serde_json::json!({"snmpAuthPassword": "x"}),
                "snmpAuthPassword",
            ),
        ] {
            let e = refuse_inline_secrets("http", &bad).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let fine = serde_json::json!({"baseUrl": "https://ops@10.0.0.1/a:b", "tokenUrl": "x"});
        assert!(refuse_inline_secrets("http", &fine).is_ok());
    }
}
