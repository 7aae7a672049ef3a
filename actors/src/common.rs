//! Pieces every protocol kind shares: config parsing with errors that name
//! the field, timeouts, and the mapping of I/O failures to error codes.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::credentials::refuse_inline_secrets;
use crate::{ConfigError, TaskError, WorkloadError};

/// Parses a kind's config: unknown fields, missing fields and wrong types
/// are refused with serde's message (which names the field), and so is a
/// secret written inline.
pub(crate) fn parse_config<T: DeserializeOwned>(
    kind: &str,
    config: &Value,
) -> Result<T, ConfigError> {
    refuse_inline_secrets(kind, config)?;
    let config = if config.is_null() {
        &Value::Object(Default::default())
    } else {
        config
    };
    T::deserialize(config).map_err(|e| ConfigError {
        kind: kind.to_string(),
        message: e.to_string(),
    })
}

/// A config error for `kind`.
pub(crate) fn config_error(kind: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        kind: kind.to_string(),
        message: message.to_string(),
    }
}

/// Parses a task's keyword arguments into `T` (`invalid_args` naming the field).
pub(crate) fn parse_kwargs<T: DeserializeOwned>(
    kwargs: &serde_json::Map<String, Value>,
) -> Result<T, TaskError> {
    T::deserialize(Value::Object(kwargs.clone())).map_err(|e| TaskError::InvalidArgs(e.to_string()))
}

/// Milliseconds as a `Duration` (for `timeoutMs` fields).
pub(crate) fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// The default network call timeout of every protocol kind.
pub(crate) const fn default_timeout_ms() -> u64 {
    5_000
}

/// How a failed network call is reported.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NetError {
    Timeout(String),
    Unreachable(String),
    Auth(String),
    Device {
        code: String,
        message: String,
    },
    /// The task's arguments are wrong (found while building the request).
    InvalidArgs(String),
    Other(String),
}

impl NetError {
    /// An I/O error: refused, reset, no route… are `unreachable`; a timeout is `timeout`.
    pub(crate) fn io(what: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            TimedOut | WouldBlock => NetError::Timeout(format!("{what}: {e}")),
            ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
            | UnexpectedEof | AddrNotAvailable | HostUnreachable | NetworkUnreachable
            | NetworkDown => NetError::Unreachable(format!("{what}: {e}")),
            _ => NetError::Other(format!("{what}: {e}")),
        }
    }
}

impl From<NetError> for TaskError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Timeout(m) => TaskError::Timeout(m),
            NetError::Unreachable(m) => TaskError::Unreachable(m),
            NetError::Auth(m) => TaskError::AuthFailed(m),
            NetError::Device { code, message } => TaskError::Device { code, message },
            NetError::InvalidArgs(m) => TaskError::InvalidArgs(m),
            NetError::Other(m) => TaskError::Failed(m),
        }
    }
}

impl From<NetError> for WorkloadError {
    fn from(e: NetError) -> Self {
        WorkloadError(match e {
            NetError::Timeout(m) => format!("timeout: {m}"),
            NetError::Unreachable(m) => format!("unreachable: {m}"),
            NetError::Auth(m) => format!("auth_failed: {m}"),
            NetError::Device { code, message } => format!("device_error: {code}: {message}"),
            NetError::InvalidArgs(m) | NetError::Other(m) => m,
        })
    }
}

/// Runs `fut` with a timeout: `timeout` naming `what` when it passes.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(NetError::Timeout(format!(
            "{what}: no answer within {}",
            fmt_duration(limit)
        ))),
    }
}

/// `1.5s`, `250ms`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
