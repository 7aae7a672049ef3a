//! Wire types: the JSON every client sees. Only this module (and the
//! transports) know the field names; internal types convert by hand.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use ottomato_actors::Task;

pub mod bin;

/// What went wrong with a task, as a stable snake_case code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No workload with that id on this node.
    NotFound,
    /// The workload's queue is full; retry later.
    Busy,
    /// The task's deadline passed (queued or running).
    DeadlineExceeded,
    /// The kind does not know the command.
    UnknownCommand,
    /// The command's arguments are wrong.
    InvalidArgs,
    /// The device ran the command and it failed.
    TaskFailed,
    /// The device implementation panicked; the workload is being restarted.
    Panicked,
    /// The workload can't take tasks now (restarting, failed, being deleted).
    Unavailable,
    /// The request was not a valid task.
    MalformedRequest,
    /// The request is larger than the node accepts.
    PayloadTooLarge,
    /// A network call to the device got no answer within its timeout.
    Timeout,
    /// The device cannot be reached (refused, reset, no route).
    Unreachable,
    /// The device refused the credentials, or its host key or certificate
    /// is not the pinned one.
    AuthFailed,
    /// The device answered with a protocol error; the message starts with
    /// the protocol's own code (`exception 2: …`, `noSuchName: …`, `404: …`).
    DeviceError,
    /// A write-class command arrived on a read subject
    /// (`<prefix>.task.read.<id>`, `<prefix>.fanout.read`).
    Forbidden,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::NotFound,
        ErrorCode::Busy,
        ErrorCode::DeadlineExceeded,
        ErrorCode::UnknownCommand,
        ErrorCode::InvalidArgs,
        ErrorCode::TaskFailed,
        ErrorCode::Panicked,
        ErrorCode::Unavailable,
        ErrorCode::MalformedRequest,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Timeout,
        ErrorCode::Unreachable,
        ErrorCode::AuthFailed,
        ErrorCode::DeviceError,
        ErrorCode::Forbidden,
    ];

    /// Its position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The wire name (`"busy"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Busy => "busy",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::InvalidArgs => "invalid_args",
            ErrorCode::TaskFailed => "task_failed",
            ErrorCode::Panicked => "panicked",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::DeviceError => "device_error",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task request on the wire: the [`Task`] fields plus an optional deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The command.
    pub command: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Deadline in milliseconds (the node's default when absent).
    #[serde(default, rename = "timeoutMs", skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Keep the result in the result history (`<prefix>_results`) too.
    #[serde(
        default,
        rename = "keepResult",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub keep_result: bool,
}

impl TaskRequest {
    /// Splits into the task and its deadline.
    pub fn into_parts(self) -> (Task, Option<Duration>) {
        (
            Task {
                command: self.command,
                args: self.args,
                kwargs: self.kwargs,
            },
            self.timeout_ms.map(Duration::from_millis),
        )
    }
}

/// The result of one task: the original's JSON field names, plus `workload`
/// and `errorCode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    /// A fresh UUID per task.
    pub job_id: String,
    /// The node that answered.
    pub worker_id: String,
    /// The workload the task was for.
    pub workload: String,
    /// The answering node's host name.
    pub hostname: String,
    /// The workload's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The command.
    pub command: String,
    /// Its positional arguments.
    pub args: Vec<Value>,
    /// Its keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Whether the command ran and succeeded.
    pub success: bool,
    /// The error message, `null` on success.
    pub error: Option<String>,
    /// The error code, `null` on success.
    pub error_code: Option<ErrorCode>,
    /// What the command returned (`null` on failure).
    #[serde(rename = "return")]
    pub ret: Value,
    /// When the result was made (RFC 3339).
    #[serde(with = "rfc3339")]
    pub timestamp: SystemTime,
    /// How long the device took, in milliseconds.
    pub execution_time: f64,
    /// The schedule whose tick this run was (scheduled runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// The tick (its nominal time; scheduled runs only): with `scheduleId`
    /// the run's identity.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub tick: Option<SystemTime>,
    /// A tick missed while the workload moved, run once on its new owner
    /// (`missed: run-once`).
    #[serde(
        default,
        rename = "caughtUp",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub caught_up: bool,
}

/// RFC 3339 timestamps for `SystemTime` fields.
pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(D::Error::custom)
    }
}

/// RFC 3339 timestamps for `Option<SystemTime>` fields (`null` when absent).
pub(crate) mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => humantime::parse_rfc3339_weak(&s)
                .map(Some)
                .map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_uses_the_original_field_names() {
        let r = TaskResult {
            job_id: "j".into(),
            worker_id: "w".into(),
            workload: "d1".into(),
            hostname: "h".into(),
            tags: BTreeMap::new(),
            command: "echo".into(),
            args: vec![],
            kwargs: Map::new(),
            success: false,
            error: Some("queue full".into()),
            error_code: Some(ErrorCode::Busy),
            ret: Value::Null,
            timestamp: SystemTime::UNIX_EPOCH,
            execution_time: 1.5,
            schedule_id: None,
            tick: None,
            caught_up: false,
        };
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "jobId",
            "workerId",
            "workload",
            "hostname",
            "command",
            "args",
            "kwargs",
            "success",
            "error",
            "errorCode",
            "return",
            "timestamp",
            "executionTime",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["errorCode"], "busy");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        let back: TaskResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn request_rejects_unknown_fields() {
        assert!(serde_json::from_str::<TaskRequest>(r#"{"command":"x","argz":[]}"#).is_err());
        let r: TaskRequest = serde_json::from_str(r#"{"command":"x","timeoutMs":5}"#).unwrap();
        assert_eq!(r.into_parts().1, Some(Duration::from_millis(5)));
    }
}

/// The value of a key in the state bucket (`<prefix>_state`): who owns the
/// workload and how it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateRecord {
    /// The node that holds the claim.
    pub owner: String,
    /// The process of that node that holds it (its membership record's
    /// `incarnation`): a restarted node — same id, new incarnation — does
    /// not own its predecessor's claims. Empty in records with no owner.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
    /// The workload's kind (empty when its spec could not be read).
    #[serde(default)]
    pub kind: String,
    /// `initializing`, `running`, `unreachable`, `dead`, `restarting`, `failed`, `stopping`.
    pub status: crate::Status,
    /// When the status last changed.
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
    /// Why, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Restarts after failures on the owner.
    #[serde(default)]
    pub restarts: u32,
    /// Nodes the device was dead from: placement keeps it off them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
    /// How often it was handed on for being dead.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moves: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The value of a key in the membership bucket (`<prefix>_nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node id (also the key).
    pub id: String,
    /// Availability zone, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Node labels, matched by workload placement selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Most workloads it takes (`null`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Relative share of workloads it should get (1.0 by default).
    #[serde(default = "one")]
    pub weight: f64,
    /// Ottomato version.
    pub version: String,
    /// When the node started.
    #[serde(with = "rfc3339")]
    pub started: SystemTime,
    /// Workloads it runs now.
    pub load: u64,
    /// Handing its workloads over before leaving: placement skips it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Random id of this process, new at every start: two processes started
    /// with one node id are told apart by it (the second refuses to start).
    #[serde(default)]
    pub incarnation: String,
    /// Heartbeat counter of this incarnation (1, 2, …).
    #[serde(default)]
    pub beat: u64,
    /// Heartbeat interval in ms, so a node starting under the same id knows
    /// how long to watch for a live predecessor.
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// Device kinds this node runs: placement gives it no other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    /// Left cleanly, every workload released: gone now, not after the TTL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            id: String::new(),
            zone: None,
            labels: BTreeMap::new(),
            capacity: None,
            weight: 1.0,
            version: String::new(),
            started: SystemTime::UNIX_EPOCH,
            load: 0,
            draining: false,
            incarnation: String::new(),
            beat: 0,
            heartbeat_ms: 0,
            kinds: Vec::new(),
            left: false,
        }
    }
}

impl NodeInfo {
    /// The fields placement depends on (not load or start time).
    pub fn placement_key(
        &self,
    ) -> (
        Option<&str>,
        &BTreeMap<String, String>,
        Option<u32>,
        u64,
        bool,
    ) {
        (
            self.zone.as_deref(),
            &self.labels,
            self.capacity,
            self.weight.to_bits(),
            self.draining,
        )
    }
}

fn one() -> f64 {
    1.0
}

/// A fan-out request on `<prefix>.fanout.<class>`: a task for every workload that
/// matches the selection (both filters when both are given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutRequest {
    /// Glob on workload ids (`*` any run, `?` one character); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
    /// Labels the workload must all have; none when absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The command.
    pub command: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Deadline of each task in milliseconds (node default when absent).
    #[serde(default, rename = "timeoutMs", skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Keep the result in the result history (`<prefix>_results`) too.
    #[serde(
        default,
        rename = "keepResult",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub keep_result: bool,
}

/// The last message each node sends to a fan-out's reply subject, after all
/// its results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FanoutDone {
    /// Always `true`: tells this message from a [`TaskResult`].
    pub done: bool,
    /// The node that is done.
    pub node: String,
    /// How many results it sent before this message.
    pub results: u64,
}

/// Whether `text` matches `glob` (`*` any run, `?` one character).
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod glob_tests {
    use super::ErrorCode;

    #[test]
    fn every_error_code_is_listed_once_in_order() {
        // `ALL` feeds the metrics' outcome counters by index.
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c}");
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        // A code added after Forbidden must be added to ALL too.
        assert_eq!(ErrorCode::Forbidden.index() + 1, ErrorCode::ALL.len());
    }

    use super::glob_match;

    #[test]
    fn globs() {
        for (g, t, want) in [
            ("*", "anything", true),
            ("sim-*", "sim-001", true),
            ("sim-*", "xsim-001", false),
            ("r?-*-a", "r1-oslo-a", true),
            ("r?-*-a", "r12-oslo-a", false),
            ("*a*b*", "xxaxxbxx", true),
            ("exact", "exact", true),
            ("exact", "exac", false),
        ] {
            assert_eq!(glob_match(g, t), want, "{g} vs {t}");
        }
    }
}
