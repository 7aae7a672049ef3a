//! `modbus`: Modbus/TCP devices (PLCs, RTUs, meters, drives).
//!
//! Config (Telegraf's `[[inputs.modbus.request]]` shape, in JSON):
//!
//! ```json
//! {"host": "10.0.0.7", "port": 502, "unit": 1, "timeoutMs": 3000,
//!  "ping": {"register": "holding", "address": 0},
//!  "fields": [{"name": "voltage", "register": "input", "address": 0,
//!              "type": "float32", "order": "ABCD", "scale": 0.1}]}
//! ```
//!
//! One TCP connection per workload, reused across tasks and re-opened after
//! a failure (with backoff: 100 ms doubling to 10 s). Every call has
//! `timeoutMs`. A Modbus exception reply is `device_error` with the
//! exception's code (`exception 2 (IllegalDataAddress)`); it still proves the
//! device answers, so a ping that gets one succeeds.
//!
//! Tasks (kwargs):
//! - `read_coils`, `read_discrete_inputs` `{address, count}` → `{"values": [true, …]}`
//! - `read_holding_registers`, `read_input_registers` `{address, count}` → `{"values": [u16, …]}`
//! - `write_single_coil` `{address, value: bool}`, `write_multiple_coils` `{address, values}`
//! - `write_single_register` `{address, value: u16}`, `write_multiple_registers` `{address, values}`
//! - `read` `{register, address, type, order?, scale?}` → `{"value": …}` (one decoded field)
//! - `write` `{address, type, order?, value}`: encodes a typed value into holding registers
//! - `poll` → `{"fields": {"voltage": 230.1, …}}`: every configured field
//! - Command classes: `read_*`, `read` and `poll` are `read`; `write_*` and `write` are `write`.
//!
//! Types: `int16 uint16 int32 uint32 int64 uint64 float32 float64`; orders
//! `ABCD` (big-endian, the default), `DCBA`, `BADC`, `CDAB`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::{Reader, Writer};
use tokio_modbus::{ExceptionCode, Slave};

use crate::common::{
    config_error, default_timeout_ms, ms, parse_config, parse_kwargs, within, NetError,
};
use crate::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// The `modbus` kind (Modbus/TCP).
#[derive(Debug, Clone, Default)]
pub struct ModbusKind;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ModbusConfig {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_unit")]
    unit: u8,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    ping: Option<PingRead>,
    #[serde(default)]
    fields: Vec<Field>,
}

const fn default_port() -> u16 {
    502
}
const fn default_unit() -> u8 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PingRead {
    #[serde(default)]
    register: Register,
    #[serde(default)]
    address: u16,
}

/// Which of the four Modbus tables.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Register {
    Coil,
    Discrete,
    #[default]
    Holding,
    Input,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum DataType {
    Int16,
    Uint16,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Float32,
    Float64,
}

impl DataType {
    fn words(self) -> u16 {
        match self {
            DataType::Int16 | DataType::Uint16 => 1,
            DataType::Int32 | DataType::Uint32 | DataType::Float32 => 2,
            DataType::Int64 | DataType::Uint64 | DataType::Float64 => 4,
        }
    }
}

/// Byte order of a multi-register value, named as Modbus documentation and
/// Telegraf write it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[allow(clippy::upper_case_acronyms)]
enum Order {
    #[default]
    ABCD,
    DCBA,
    BADC,
    CDAB,
}

/// One decoded value: where it is and how to read it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Field {
    name: String,
    #[serde(default)]
    register: Register,
    address: u16,
    #[serde(rename = "type")]
    data_type: DataType,
    #[serde(default)]
    order: Order,
    #[serde(default)]
    scale: Option<f64>,
}

/// A `read` task's field: like a configured one, without a name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReadArgs {
    #[serde(default)]
    register: Register,
    address: u16,
    #[serde(rename = "type")]
    data_type: DataType,
    #[serde(default)]
    order: Order,
    #[serde(default)]
    scale: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeArgs {
    address: u16,
    #[serde(default = "one")]
    count: u16,
}

const fn one() -> u16 {
    1
}

/// The Modbus limits per request (application protocol spec, 6.1–6.12).
const MAX_READ_BITS: usize = 2000;
const MAX_READ_WORDS: usize = 125;
const MAX_WRITE_BITS: usize = 1968;
const MAX_WRITE_WORDS: usize = 123;

/// `invalid_args` unless `1 ≤ n ≤ max` and the range stays in the 65 536 addresses.
fn check_count(what: &str, address: u16, n: usize, max: usize) -> Result<(), TaskError> {
    if n == 0 || n > max {
        return Err(TaskError::InvalidArgs(format!(
            "{what}: {n} items; Modbus allows 1 to {max} per request"
        )));
    }
    if address as usize + n > 65_536 {
        return Err(TaskError::InvalidArgs(format!(
            "{what}: addresses {address}..{} run past 65535",
            address as usize + n - 1
        )));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteOne<T> {
    address: u16,
    value: T,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteMany<T> {
    address: u16,
    values: Vec<T>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WriteTyped {
    address: u16,
    #[serde(rename = "type")]
    data_type: DataType,
    #[serde(default)]
    order: Order,
    /// A JSON number: 64-bit integers are taken exactly, not through f64.
    value: serde_json::Number,
}

impl Kind for ModbusKind {
    fn name(&self) -> &str {
        "modbus"
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        let cfg: ModbusConfig = parse_config("modbus", config)?;
        let mut seen = std::collections::HashSet::new();
        for f in &cfg.fields {
            if matches!(f.register, Register::Coil | Register::Discrete) {
                return Err(config_error(
                    "modbus",
                    format!(
                        "field {:?}: typed fields read holding or input registers",
                        f.name
                    ),
                ));
            }
            if !seen.insert(&f.name) {
                return Err(config_error(
                    "modbus",
                    format!("field {:?} is defined twice", f.name),
                ));
            }
        }
        Ok(())
    }

    fn create(&self, _id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        self.validate(config)?;
        let cfg: ModbusConfig = parse_config("modbus", config)?;
        Ok(Arc::new(ModbusWorkload {
            cfg,
            conn: Mutex::new(Conn::default()),
        }))
    }
}

#[derive(Default)]
struct Conn {
    ctx: Option<Context>,
    /// A request was sent and its answer not yet read: set for the length of
    /// a call, so a call cancelled mid-way (its future dropped by the
    /// engine's deadline) leaves it set and the next call starts afresh
    /// instead of reading the late answer.
    in_flight: bool,
    /// After a failed connect: no new attempt before this, and the next wait.
    retry_at: Option<Instant>,
    backoff: Duration,
}

struct ModbusWorkload {
    cfg: ModbusConfig,
    conn: Mutex<Conn>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn exception(e: ExceptionCode) -> NetError {
    let code: u8 = e.into();
    NetError::Device {
        code: format!("exception {code}"),
        message: format!("{e:?}"),
    }
}

fn modbus_error(what: &str, e: tokio_modbus::Error) -> NetError {
    match e {
        // On an open connection any transport failure means the device
        // went away (tokio-modbus reports a closed stream in several ways).
        tokio_modbus::Error::Transport(io) => match NetError::io(what, &io) {
            NetError::Other(m) => NetError::Unreachable(m),
            e => e,
        },
        tokio_modbus::Error::Protocol(p) => NetError::Other(format!("{what}: protocol error: {p}")),
    }
}

impl ModbusWorkload {
    fn address(&self) -> String {
        if self.cfg.host.contains(':') && !self.cfg.host.starts_with('[') {
            format!("[{}]:{}", self.cfg.host, self.cfg.port)
        } else {
            format!("{}:{}", self.cfg.host, self.cfg.port)
        }
    }

    fn limit(&self) -> Duration {
        ms(self.cfg.timeout_ms)
    }

    async fn connect(&self, conn: &mut Conn) -> Result<(), NetError> {
        if conn.ctx.is_some() {
            return Ok(());
        }
        if let Some(at) = conn.retry_at {
            if Instant::now() < at {
                return Err(NetError::Unreachable(format!(
                    "{}: not connected (last attempt failed; next in {:?})",
                    self.address(),
                    at - Instant::now()
                )));
            }
        }
        let addr = self.address();
        let what = format!("connect {addr}");
        let result = within(self.limit(), &what, async {
            let sock: SocketAddr = tokio::net::lookup_host(&addr)
                .await
                .map_err(|e| NetError::io(&what, &e))?
                .next()
                .ok_or_else(|| NetError::Unreachable(format!("{what}: no address")))?;
            tokio_modbus::client::tcp::connect_slave(sock, Slave(self.cfg.unit))
                .await
                .map_err(|e| NetError::io(&what, &e))
        })
        .await;
        match result {
            Ok(ctx) => {
                conn.ctx = Some(ctx);
                conn.retry_at = None;
                conn.backoff = Duration::ZERO;
                Ok(())
            }
            Err(e) => {
                conn.backoff = (conn.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                conn.retry_at = Some(Instant::now() + conn.backoff);
                Err(e)
            }
        }
    }

    /// Runs one request on the shared connection (connecting first); a
    /// transport failure or timeout drops the connection for a fresh one.
    async fn call<T>(
        &self,
        what: &str,
        f: impl for<'c> FnOnce(
            &'c mut Context,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'c>,
        >,
    ) -> Result<T, NetError> {
        let mut conn = self.conn.lock().await;
        if std::mem::take(&mut conn.in_flight) {
            conn.ctx = None;
        }
        self.connect(&mut conn).await?;
        conn.in_flight = true;
        let ctx = conn.ctx.as_mut().expect("connected");
        let what = format!("{what} on {}", self.address());
        let r = within(self.limit(), &what, async {
            match f(ctx).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(exception(e)),
                Err(e) => Err(modbus_error(&what, e)),
            }
        })
        .await;
        conn.in_flight = false;
        if matches!(
            r,
            Err(NetError::Timeout(_) | NetError::Unreachable(_) | NetError::Other(_))
        ) {
            // The stream may hold a late answer: never reuse it.
            conn.ctx = None;
        }
        r
    }

    async fn read_words(
        &self,
        register: Register,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, NetError> {
        match register {
            Register::Holding => {
                self.call("read holding registers", |c| {
                    Box::pin(c.read_holding_registers(address, count))
                })
                .await
            }
            Register::Input => {
                self.call("read input registers", |c| {
                    Box::pin(c.read_input_registers(address, count))
                })
                .await
            }
            Register::Coil | Register::Discrete => Err(NetError::Other(
                "typed values are read from holding or input registers".into(),
            )),
        }
    }

    /// Writes holding registers from `address`; how many were written.
    async fn write_words(&self, address: u16, words: Vec<u16>) -> Result<usize, NetError> {
        let n = words.len();
        self.call("write multiple registers", move |c| {
            Box::pin(async move { c.write_multiple_registers(address, &words).await })
        })
        .await?;
        Ok(n)
    }

    async fn read_bits(
        &self,
        register: Register,
        address: u16,
        count: u16,
    ) -> Result<Vec<bool>, NetError> {
        match register {
            Register::Discrete => {
                self.call("read discrete inputs", |c| {
                    Box::pin(c.read_discrete_inputs(address, count))
                })
                .await
            }
            _ => {
                self.call("read coils", |c| Box::pin(c.read_coils(address, count)))
                    .await
            }
        }
    }

    async fn read_field(&self, r: &ReadArgs) -> Result<Value, NetError> {
        let words = self
            .read_words(r.register, r.address, r.data_type.words())
            .await?;
        if words.len() != r.data_type.words() as usize {
            return Err(NetError::Device {
                code: "short reply".into(),
                message: format!(
                    "asked {} registers at {} for a {:?}, got {}",
                    r.data_type.words(),
                    r.address,
                    r.data_type,
                    words.len()
                ),
            });
        }
        Ok(decode(&words, r.data_type, r.order, r.scale))
    }

    async fn ping_once(&self) -> Result<(), NetError> {
        let p = self.cfg.ping.clone().unwrap_or(PingRead {
            register: Register::Holding,
            address: 0,
        });
        let r = match p.register {
            Register::Coil | Register::Discrete => {
                self.read_bits(p.register, p.address, 1).await.map(drop)
            }
            _ => self.read_words(p.register, p.address, 1).await.map(drop),
        };
        match r {
            // An exception is an answer: the device is there.
            Ok(()) | Err(NetError::Device { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Registers (as read, in wire order) to a JSON number.
fn decode(words: &[u16], t: DataType, order: Order, scale: Option<f64>) -> Value {
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    reorder(&mut bytes, order);
    let raw: Value = match t {
        DataType::Int16 => json!(i16::from_be_bytes([bytes[0], bytes[1]])),
        DataType::Uint16 => json!(u16::from_be_bytes([bytes[0], bytes[1]])),
        DataType::Int32 => json!(i32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))),
        DataType::Uint32 => json!(u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))),
        DataType::Int64 => json!(i64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))),
        DataType::Uint64 => json!(u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))),
        DataType::Float32 => {
            json!(f32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as f64)
        }
        DataType::Float64 => json!(f64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))),
    };
    match (scale, raw.as_f64()) {
        (Some(s), Some(v)) => json!(v * s),
        _ => raw,
    }
}

/// A typed value to registers in wire order; `None` if it does not fit the type.
fn encode(number: &serde_json::Number, t: DataType, order: Order) -> Option<Vec<u16>> {
    let value = number.as_f64()?;
    let exact_i64 = number.as_i64();
    let exact_u64 = number.as_u64();
    let int =
        |lo: f64, hi: f64| (value.fract() == 0.0 && value >= lo && value <= hi).then_some(value);
    let mut bytes: Vec<u8> = match t {
        DataType::Int16 => (int(i16::MIN as f64, i16::MAX as f64)? as i16)
            .to_be_bytes()
            .to_vec(),
        DataType::Uint16 => (int(0.0, u16::MAX as f64)? as u16).to_be_bytes().to_vec(),
        DataType::Int32 => (int(i32::MIN as f64, i32::MAX as f64)? as i32)
            .to_be_bytes()
            .to_vec(),
        DataType::Uint32 => (int(0.0, u32::MAX as f64)? as u32).to_be_bytes().to_vec(),
        DataType::Int64 => exact_i64?.to_be_bytes().to_vec(),
        DataType::Uint64 => exact_u64?.to_be_bytes().to_vec(),
        DataType::Float32 => (value as f32).to_be_bytes().to_vec(),
        DataType::Float64 => value.to_be_bytes().to_vec(),
    };
    // Every order is its own inverse.
    reorder(&mut bytes, order);
    Some(
        bytes
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    )
}

/// Between wire order and big-endian (`ABCD`), either way.
fn reorder(bytes: &mut [u8], order: Order) {
    match order {
        Order::ABCD => {}
        Order::DCBA => bytes.reverse(),
        Order::BADC => bytes.chunks_mut(2).for_each(|w| w.swap(0, 1)),
        Order::CDAB => {
            let words: Vec<[u8; 2]> = bytes.chunks(2).rev().map(|c| [c[0], c[1]]).collect();
            for (i, w) in words.into_iter().enumerate() {
                bytes[2 * i] = w[0];
                bytes[2 * i + 1] = w[1];
            }
        }
    }
}

#[async_trait]
impl Workload for ModbusWorkload {
    async fn init(&self) -> Result<(), WorkloadError> {
        let mut conn = self.conn.lock().await;
        conn.retry_at = None;
        self.connect(&mut conn).await.map_err(Into::into)
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        self.ping_once().await.map_err(Into::into)
    }

    fn command_class(&self, task: &Task) -> CommandClass {
        match task.command.as_str() {
            "read_coils"
            | "read_discrete_inputs"
            | "read_holding_registers"
            | "read_input_registers"
            | "read"
            | "poll" => CommandClass::Read,
            _ => CommandClass::Write,
        }
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        let k = &task.kwargs;
        let v = match task.command.as_str() {
            "read_coils" | "read_discrete_inputs" => {
                let a: RangeArgs = parse_kwargs(k)?;
                let reg = if task.command == "read_coils" {
                    Register::Coil
                } else {
                    Register::Discrete
                };
                check_count(&task.command, a.address, a.count as usize, MAX_READ_BITS)?;
                json!({"values": self.read_bits(reg, a.address, a.count).await?})
            }
            "read_holding_registers" | "read_input_registers" => {
                let a: RangeArgs = parse_kwargs(k)?;
                let reg = if task.command == "read_holding_registers" {
                    Register::Holding
                } else {
                    Register::Input
                };
                check_count(&task.command, a.address, a.count as usize, MAX_READ_WORDS)?;
                json!({"values": self.read_words(reg, a.address, a.count).await?})
            }
            "write_single_coil" => {
                let a: WriteOne<bool> = parse_kwargs(k)?;
                self.call("write single coil", |c| {
                    Box::pin(c.write_single_coil(a.address, a.value))
                })
                .await?;
                json!({"written": 1})
            }
            "write_multiple_coils" => {
                let a: WriteMany<bool> = parse_kwargs(k)?;
                let n = a.values.len();
                check_count(&task.command, a.address, n, MAX_WRITE_BITS)?;
                self.call("write multiple coils", move |c| {
                    Box::pin(async move { c.write_multiple_coils(a.address, &a.values).await })
                })
                .await?;
                json!({"written": n})
            }
            "write_single_register" => {
                let a: WriteOne<u16> = parse_kwargs(k)?;
                self.call("write single register", |c| {
                    Box::pin(c.write_single_register(a.address, a.value))
                })
                .await?;
                json!({"written": 1})
            }
            "write_multiple_registers" => {
                let a: WriteMany<u16> = parse_kwargs(k)?;
                check_count(&task.command, a.address, a.values.len(), MAX_WRITE_WORDS)?;
                json!({"written": self.write_words(a.address, a.values).await?})
            }
            "read" => {
                let a: ReadArgs = parse_kwargs(k)?;
                if matches!(a.register, Register::Coil | Register::Discrete) {
                    return Err(TaskError::InvalidArgs(
                        "typed reads are from holding or input registers; use read_coils".into(),
                    ));
                }
                json!({"value": self.read_field(&a).await?})
            }
            "write" => {
                let a: WriteTyped = parse_kwargs(k)?;
                let words = encode(&a.value, a.data_type, a.order).ok_or_else(|| {
                    TaskError::InvalidArgs(format!(
                        "value {} does not fit {:?}",
                        a.value, a.data_type
                    ))
                })?;
                json!({"written": self.write_words(a.address, words).await?})
            }
            "poll" => {
                let mut out = Map::new();
                for f in &self.cfg.fields {
                    let r = ReadArgs {
                        register: f.register,
                        address: f.address,
                        data_type: f.data_type,
                        order: f.order,
                        scale: f.scale,
                    };
                    out.insert(f.name.clone(), self.read_field(&r).await?);
                }
                json!({"fields": out})
            }
            other => return Err(TaskError::UnknownCommand(other.to_string())),
        };
        Ok(v)
    }

    async fn stop(&self) -> Result<(), WorkloadError> {
        let mut conn = self.conn.lock().await;
        if let Some(mut ctx) = conn.ctx.take() {
            use tokio_modbus::client::Client;
            let _ = tokio::time::timeout(self.limit(), ctx.disconnect()).await;
        }
        Ok(())
    }

    fn info(&self) -> Value {
        json!({"address": self.address(), "unit": self.cfg.unit, "fields": self.cfg.fields.len()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(v: f64) -> serde_json::Number {
        if v.fract() == 0.0 {
            serde_json::Number::from(v as i64)
        } else {
            serde_json::Number::from_f64(v).unwrap()
        }
    }

    #[test]
    fn every_order_round_trips_and_matches_its_wire_layout() {
        // 0x3F800000 = 1.0f32: ABCD on the wire is [0x3F80, 0x0000].
        assert_eq!(
            encode(&num(1.0), DataType::Float32, Order::ABCD),
            Some(vec![0x3F80, 0])
        );
        assert_eq!(
            encode(&num(1.0), DataType::Float32, Order::CDAB),
            Some(vec![0, 0x3F80])
        );
        assert_eq!(
            encode(&num(1.0), DataType::Float32, Order::BADC),
            Some(vec![0x803F, 0])
        );
        assert_eq!(
            encode(&num(1.0), DataType::Float32, Order::DCBA),
            Some(vec![0, 0x803F])
        );
        for t in [
            DataType::Int16,
            DataType::Int32,
            DataType::Int64,
            DataType::Float64,
        ] {
            for o in [Order::ABCD, Order::DCBA, Order::BADC, Order::CDAB] {
                let w = encode(&num(-1234.0), t, o).unwrap();
                assert_eq!(w.len(), t.words() as usize);
                assert_eq!(
                    decode(&w, t, o, None).as_f64(),
                    Some(-1234.0),
                    "{t:?} {o:?}"
                );
            }
        }
        assert_eq!(encode(&num(70000.0), DataType::Uint16, Order::ABCD), None);
        assert_eq!(encode(&num(1.5), DataType::Int32, Order::ABCD), None);
        // 64-bit integers exactly, past f64's 53 bits.
        let big = serde_json::Number::from(9_007_199_254_740_993i64);
        let w = encode(&big, DataType::Int64, Order::ABCD).unwrap();
        assert_eq!(
            decode(&w, DataType::Int64, Order::ABCD, None),
            serde_json::json!(9_007_199_254_740_993i64)
        );
        assert_eq!(
            decode(&[1000], DataType::Uint16, Order::ABCD, Some(0.1)).as_f64(),
            Some(100.0)
        );
    }
}
