//! The contract between the engine and a device integration.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A command to run against one workload: `{"command", "args", "kwargs"}` on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The command name; each kind documents the commands it understands.
    pub command: String,
    /// Positional arguments (any JSON).
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments (any JSON object).
    #[serde(default)]
    pub kwargs: Map<String, Value>,
}

impl Task {
    /// A task with a command and no arguments.
    pub fn new(command: impl Into<String>) -> Self {
        Task {
            command: command.into(),
            ..Default::default()
        }
    }

    /// Adds one keyword argument (builder style).
    pub fn kwarg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.kwargs.insert(key.into(), value.into());
        self
    }

    /// Adds one positional argument (builder style).
    pub fn arg(mut self, value: impl Into<Value>) -> Self {
        self.args.push(value.into());
        self
    }
}

/// Whether a command only reads the device or may change it. Task subjects
/// carry the class (`<prefix>.task.read.<id>`, `<prefix>.task.write.<id>`), so
/// NATS permissions can grant read-only task rights; a node refuses a
/// write-class command that arrives on a read subject (`forbidden`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandClass {
    /// Reads only: safe to grant to a read-only operator.
    Read,
    /// May change the device (a write subject also runs read commands).
    Write,
}

impl CommandClass {
    /// Both classes, read first.
    pub const ALL: [CommandClass; 2] = [CommandClass::Read, CommandClass::Write];

    /// The subject token: `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandClass::Read => "read",
            CommandClass::Write => "write",
        }
    }

    /// Whether a request sent with this class may run a command of class `command`.
    pub fn permits(self, command: CommandClass) -> bool {
        self == CommandClass::Write || command == CommandClass::Read
    }
}

impl std::fmt::Display for CommandClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CommandClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(CommandClass::Read),
            "write" => Ok(CommandClass::Write),
            other => Err(format!(
                "unknown command class {other:?}: expected \"read\" or \"write\""
            )),
        }
    }
}

/// Why a task did not produce a return value. The engine turns each variant
/// into a wire error code (`unknown_command`, `invalid_args`, `task_failed`,
/// `timeout`, `unreachable`, `auth_failed`, `device_error`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The kind does not know this command.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// The command exists but its arguments are wrong.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// The device was asked and the command failed.
    #[error("{0}")]
    Failed(String),
    /// A network call to the device got no answer within its timeout.
    #[error("{0}")]
    Timeout(String),
    /// The device cannot be reached (connection refused, reset, no route).
    #[error("{0}")]
    Unreachable(String),
    /// The device refused the credentials, or its identity (host key,
    /// certificate) is not the pinned one.
    #[error("{0}")]
    AuthFailed(String),
    /// The device answered with a protocol error: `code` is the protocol's
    /// own (a Modbus exception, an SNMP error-status, an HTTP status).
    #[error("{code}: {message}")]
    Device {
        /// The protocol's error code, as the protocol names it.
        code: String,
        /// What it means.
        message: String,
    },
}

impl TaskError {
    /// A device's protocol error.
    pub fn device(code: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        TaskError::Device {
            code: code.to_string(),
            message: message.to_string(),
        }
    }
}

/// A failure of `init`, `ping` or `stop`: a message for operators.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct WorkloadError(pub String);

impl WorkloadError {
    /// Builds an error from anything printable.
    pub fn new(msg: impl std::fmt::Display) -> Self {
        WorkloadError(msg.to_string())
    }
}

/// A spec's `config` was rejected by its kind.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config for kind {kind:?}: {message}")]
pub struct ConfigError {
    /// The kind that rejected it.
    pub kind: String,
    /// What is wrong, for the operator.
    pub message: String,
}

/// One device integration instance: the handle on one device.
///
/// The engine runs each instance inside its own supervised actor and calls
/// these methods from spawned tasks, with timeouts, so an implementation may
/// block on I/O freely. Methods take `&self` because a ping may run while a
/// task is in flight (and several tasks at once when a spec raises its
/// concurrency); use interior mutability for connection state.
///
/// A panic in any method is contained: the task (if any) answers `panicked`
/// and the instance is thrown away and rebuilt by the supervisor with backoff.
#[async_trait]
pub trait Workload: Send + Sync + 'static {
    /// Connects to the device. Called once per instance, off the caller's path,
    /// with the node's init timeout; a failure is retried with capped backoff.
    async fn init(&self) -> Result<(), WorkloadError>;
    /// Checks that the device answers. Called on a randomised interval.
    async fn ping(&self) -> Result<(), WorkloadError>;
    /// Runs one command and returns any JSON.
    async fn run_task(&self, task: &Task) -> Result<Value, TaskError>;
    /// Disconnects. Called on delete, with the node's stop timeout.
    async fn stop(&self) -> Result<(), WorkloadError>;
    /// Whether `task` only reads the device or may change it. The default,
    /// for kinds that do not say, is [`CommandClass::Write`]: a read-only
    /// operator runs nothing on them until the kind declares its reads.
    /// Must be cheap and must not do I/O (it runs on the node's request path).
    fn command_class(&self, task: &Task) -> CommandClass {
        let _ = task;
        CommandClass::Write
    }
    /// Free-form information shown by `info`-style tooling.
    fn info(&self) -> Value {
        Value::Null
    }
}

/// A device kind: builds [`Workload`] instances from a spec's JSON config.
pub trait Kind: Send + Sync + 'static {
    /// The kind's name, as written in specs (`"sim"`).
    fn name(&self) -> &str;
    /// Checks `config` without building anything (and without secrets): run
    /// when specs are imported, so a bad field is refused before it reaches
    /// the bucket. The default accepts anything.
    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        let _ = config;
        Ok(())
    }
    /// Validates `config` and builds an instance for workload `id`.
    /// Must not do I/O: connecting belongs in [`Workload::init`].
    fn create(&self, id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError>;
}
