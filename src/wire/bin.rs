//! The opt-in bincode fast path for Rust clients.
//!
//! Negotiated per request by the header `Otto-Encoding: bincode-v1`; the reply
//! then carries the same header and encoding. JSON stays the default and is
//! always accepted. Bincode is not self-describing, so the version lives in
//! the header value: a node that does not know an encoding answers in JSON
//! with `malformed_request`, never guesses. `serde_json::Value` needs
//! `deserialize_any`, which bincode lacks, so JSON values travel as
//! [`BinValue`], a plain enum mirror.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::{ErrorCode, TaskRequest, TaskResult};

/// The header value that selects this encoding.
pub const BINCODE_V1: &str = "bincode-v1";

/// Largest bincode message decoded (bounds allocations from length prefixes).
const LIMIT: usize = 8 * 1024 * 1024;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<LIMIT>,
> {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// A JSON value in a form bincode can carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BinValue {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A negative integer.
    I64(i64),
    /// A non-negative integer.
    U64(u64),
    /// Any other number.
    F64(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<BinValue>),
    /// An object, in key order.
    Object(Vec<(String, BinValue)>),
}

impl From<&Value> for BinValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => BinValue::Null,
            Value::Bool(b) => BinValue::Bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    BinValue::U64(u)
                } else if let Some(i) = n.as_i64() {
                    BinValue::I64(i)
                } else {
                    BinValue::F64(n.as_f64().unwrap_or(0.0))
                }
            }
            Value::String(s) => BinValue::String(s.clone()),
            Value::Array(a) => BinValue::Array(a.iter().map(BinValue::from).collect()),
            Value::Object(o) => {
                BinValue::Object(o.iter().map(|(k, v)| (k.clone(), v.into())).collect())
            }
        }
    }
}

impl From<BinValue> for Value {
    fn from(v: BinValue) -> Self {
        match v {
            BinValue::Null => Value::Null,
            BinValue::Bool(b) => Value::Bool(b),
            BinValue::I64(i) => Value::Number(i.into()),
            BinValue::U64(u) => Value::Number(u.into()),
            BinValue::F64(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            BinValue::String(s) => Value::String(s),
            BinValue::Array(a) => Value::Array(a.into_iter().map(Value::from).collect()),
            BinValue::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

fn object(m: &Map<String, Value>) -> Vec<(String, BinValue)> {
    m.iter().map(|(k, v)| (k.clone(), v.into())).collect()
}

fn map(o: Vec<(String, BinValue)>) -> Map<String, Value> {
    o.into_iter().map(|(k, v)| (k, v.into())).collect()
}

#[derive(Serialize, Deserialize)]
struct BinRequest {
    command: String,
    args: Vec<BinValue>,
    kwargs: Vec<(String, BinValue)>,
    timeout_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct BinResult {
    job_id: String,
    worker_id: String,
    workload: String,
    hostname: String,
    tags: Vec<(String, String)>,
    command: String,
    args: Vec<BinValue>,
    kwargs: Vec<(String, BinValue)>,
    success: bool,
    error: Option<String>,
    error_code: Option<ErrorCode>,
    ret: BinValue,
    timestamp_unix_ms: u64,
    execution_time: f64,
}

/// Encodes a task request.
pub fn encode_request(r: &TaskRequest) -> Vec<u8> {
    let b = BinRequest {
        command: r.command.clone(),
        args: r.args.iter().map(BinValue::from).collect(),
        kwargs: object(&r.kwargs),
        timeout_ms: r.timeout_ms,
    };
    // Plain data into a Vec: encoding can't fail.
    bincode::serde::encode_to_vec(&b, config()).unwrap_or_default()
}

/// Decodes a task request.
pub fn decode_request(bytes: &[u8]) -> Result<TaskRequest, String> {
    let (b, _): (BinRequest, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    Ok(TaskRequest {
        command: b.command,
        args: b.args.into_iter().map(Value::from).collect(),
        kwargs: map(b.kwargs),
        timeout_ms: b.timeout_ms,
        keep_result: false,
    })
}

/// Encodes a task result.
pub fn encode_result(r: &TaskResult) -> Vec<u8> {
    let b = BinResult {
        job_id: r.job_id.clone(),
        worker_id: r.worker_id.clone(),
        workload: r.workload.clone(),
        hostname: r.hostname.clone(),
        tags: r.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        command: r.command.clone(),
        args: r.args.iter().map(BinValue::from).collect(),
        kwargs: object(&r.kwargs),
        success: r.success,
        error: r.error.clone(),
        error_code: r.error_code,
        ret: (&r.ret).into(),
        timestamp_unix_ms: r
            .timestamp
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        execution_time: r.execution_time,
    };
    bincode::serde::encode_to_vec(&b, config()).unwrap_or_default()
}

/// Decodes a task result.
pub fn decode_result(bytes: &[u8]) -> Result<TaskResult, String> {
    let (b, _): (BinResult, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    Ok(TaskResult {
        job_id: b.job_id,
        worker_id: b.worker_id,
        workload: b.workload,
        hostname: b.hostname,
        tags: b.tags.into_iter().collect::<BTreeMap<_, _>>(),
        command: b.command,
        args: b.args.into_iter().map(Value::from).collect(),
        kwargs: map(b.kwargs),
        success: b.success,
        error: b.error,
        error_code: b.error_code,
        ret: b.ret.into(),
        timestamp: UNIX_EPOCH + Duration::from_millis(b.timestamp_unix_ms),
        execution_time: b.execution_time,
        schedule_id: None,
        tick: None,
        caught_up: false,
    })
}

/// A fixed instant with millisecond precision, for tests.
#[cfg(test)]
fn now_ms() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips() {
        let req = TaskRequest {
            command: "echo".into(),
            args: vec![
                json!(1),
                json!(-2),
                json!(2.5),
                json!("s"),
                json!([null, true]),
                json!({"a": {"b": 1}}),
            ],
            kwargs: json!({"k": [1, 2]}).as_object().unwrap().clone(),
            timeout_ms: Some(5),
            keep_result: false,
        };
        assert_eq!(decode_request(&encode_request(&req)).unwrap(), req);
        let res = TaskResult {
            job_id: "j".into(),
            worker_id: "w".into(),
            workload: "d".into(),
            hostname: "h".into(),
            tags: [("a".to_string(), "b".to_string())].into(),
            command: "echo".into(),
            args: req.args.clone(),
            kwargs: req.kwargs.clone(),
            success: false,
            error: Some("x".into()),
            error_code: Some(ErrorCode::Busy),
            ret: json!({"r": [1, "two"]}),
            timestamp: now_ms(),
            execution_time: 0.25,
            schedule_id: None,
            tick: None,
            caught_up: false,
        };
        assert_eq!(decode_result(&encode_result(&res)).unwrap(), res);
        assert!(decode_request(b"\xff\xff\xff").is_err());
    }
}
