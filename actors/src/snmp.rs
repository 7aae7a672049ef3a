//! `snmp`: SNMP v2c and v3 (USM) agents — routers, switches, UPSes, meters.
//!
//! Config (Telegraf's `inputs.snmp` shape, in JSON; numeric OIDs):
//!
//! ```json
//! {"host": "10.0.0.1", "port": 161, "version": "3", "credentials": "core-routers",
//!  "authProtocol": "sha256", "privProtocol": "aes256", "contextName": "",
//!  "timeoutMs": 2000, "retries": 1, "maxRepetitions": 25,
//!  "fields": [{"name": "uptime", "oid": "1.3.6.1.2.1.1.3.0", "conversion": "float(2)"}],
//!  "tables": [{"name": "if", "oid": "1.3.6.1.2.1.2.2.1",
//!              "columns": [{"name": "descr", "oid": "1.3.6.1.2.1.2.2.1.2"},
//!                          {"name": "mac", "oid": "1.3.6.1.2.1.2.2.1.6", "conversion": "hwaddr"}]}]}
//! ```
//!
//! Secrets are in the node's credential named by `credentials`: field
//! `community` for v2c; `username`, `auth_password`, `priv_password` for v3
//! (the security level follows from `authProtocol`/`privProtocol`).
//! Auth protocols `md5 sha1 sha224 sha256 sha384 sha512`; privacy `des
//! aes128 aes192 aes256` (AES-192/256 with Blumenthal key extension, as
//! net-snmp does).
//!
//! All workloads of a node share one UDP socket per address family (IPv6
//! literal hosts get the second one; responses are matched by
//! request id): 100 000 agents need one file descriptor, not 100 000.
//!
//! - `init` builds the client and reads `sysUpTime.0`; `ping` reads it again.
//! - Tasks: `get` `{oids: [..]}`, `getnext` `{oids}`, `walk` `{oid}` and
//!   `bulkwalk` `{oid, maxRepetitions?}` (to the end of the subtree or
//!   endOfMibView), `set` `{oid, type, value}` (types `integer`, `string`,
//!   `hex`, `oid`, `ipaddress`, `counter32`, `gauge32`, `timeticks`,
//!   `counter64`), `poll` (the configured fields and tables; table rows
//!   joined by index). Command classes: `set` is `write`, the rest `read`.
//! - Every value comes back as `{"oid", "type", "value"}`; strings that are
//!   not UTF-8 come back as hex. `poll` gives bare values, converted as a
//!   field or column says (`float(N)`, `float`, `int`, `hwaddr`, `ipaddr`).
//! - Errors: no answer → `timeout`; v3 authentication → `auth_failed`; an
//!   agent's error-status → `device_error` with its name (`noSuchName`,
//!   `notWritable`, …).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_snmp::client::{WalkMethod, WalkOptions};
use async_snmp::{
    Auth, AuthProtocol, Client, ErrorKind, Oid, PrivProtocol, Retry, UdpHandle, UdpTransport,
    UsmConfig, Value as SnmpValue, VarBind,
};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::OnceCell;

use crate::common::{config_error, ms, parse_config, parse_kwargs, within, NetError};
use crate::credentials::{Credential, Credentials};
use crate::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// `sysUpTime.0`: what `init` and `ping` read.
const SYS_UPTIME: &str = "1.3.6.1.2.1.1.3.0";

/// The `snmp` kind. Its workloads share one UDP socket per kind instance.
#[derive(Clone, Default)]
pub struct SnmpKind {
    credentials: Credentials,
    socket: Arc<OnceCell<UdpTransport>>,
    socket6: Arc<OnceCell<UdpTransport>>,
}

impl std::fmt::Debug for SnmpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnmpKind")
    }
}

impl SnmpKind {
    /// A kind that resolves named credentials from `credentials`.
    pub fn new(credentials: Credentials) -> Self {
        SnmpKind {
            credentials,
            socket: Arc::default(),
            socket6: Arc::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
enum Version {
    #[serde(rename = "2c")]
    V2c,
    #[serde(rename = "3")]
    V3,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum AuthProto {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum PrivProto {
    Des,
    Aes128,
    Aes192,
    Aes256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SnmpConfig {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    version: Version,
    credentials: String,
    #[serde(default)]
    auth_protocol: Option<AuthProto>,
    #[serde(default)]
    priv_protocol: Option<PrivProto>,
    #[serde(default)]
    context_name: String,
    #[serde(default = "default_snmp_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default = "default_reps")]
    max_repetitions: u32,
    #[serde(default)]
    fields: Vec<NamedOid>,
    #[serde(default)]
    tables: Vec<Table>,
}

const fn default_port() -> u16 {
    161
}
const fn default_snmp_timeout() -> u64 {
    2_000
}
const fn default_retries() -> u32 {
    1
}
const fn default_reps() -> u32 {
    25
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedOid {
    name: String,
    oid: String,
    /// Telegraf's conversions: `float(N)` (divide by 10^N), `float`, `int`,
    /// `hwaddr` (octets as `aa:bb:…`), `ipaddr` (4 octets as a dotted quad).
    #[serde(default)]
    conversion: Option<String>,
}

/// A field's conversion, checked when the config is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conversion {
    Float(i32),
    Int,
    HwAddr,
    IpAddr,
}

fn conversion(s: &str) -> Result<Conversion, String> {
    match s {
        "float" => Ok(Conversion::Float(0)),
        "int" => Ok(Conversion::Int),
        "hwaddr" => Ok(Conversion::HwAddr),
        "ipaddr" => Ok(Conversion::IpAddr),
        other => other
            .strip_prefix("float(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|n| (0..=18).contains(n))
            .map(Conversion::Float)
            .ok_or_else(|| {
                format!("conversion {other:?}: one of float, float(N), int, hwaddr, ipaddr")
            }),
    }
}

/// A polled value, converted as configured (left as is when it does not apply).
fn converted(v: &SnmpValue, conv: Option<&str>) -> Value {
    let raw = value_json(v).1;
    let Some(c) = conv.and_then(|c| conversion(c).ok()) else {
        return raw;
    };
    let octets = match v {
        SnmpValue::OctetString(b) | SnmpValue::Opaque(b) => Some(&b[..]),
        _ => None,
    };
    let number = raw
        .as_f64()
        .or_else(|| raw.as_str().and_then(|s| s.trim().parse::<f64>().ok()));
    match c {
        Conversion::Float(n) => number.map_or(raw, |x| json!(x / 10f64.powi(n))),
        Conversion::Int => number.map_or(raw, |x| json!(x.trunc() as i64)),
        Conversion::HwAddr => octets.map_or(raw, |b| {
            json!(b
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"))
        }),
        Conversion::IpAddr => match (v, octets) {
            (_, Some(b)) if b.len() == 4 => json!(format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])),
            _ => raw,
        },
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    name: String,
    oid: String,
    #[serde(default)]
    columns: Vec<NamedOid>,
}

fn oid(s: &str) -> Result<Oid, String> {
    let t = s.trim_start_matches('.');
    if t.is_empty()
        || !t
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "OID {s:?} is not numeric (like 1.3.6.1.2.1.1.3.0; no MIB names)"
        ));
    }
    Oid::parse(t).map_err(|e| format!("OID {s:?}: {e}"))
}

fn check(cfg: &SnmpConfig) -> Result<(), ConfigError> {
    let bad = |m: String| config_error("snmp", m);
    if cfg.version == Version::V2c && (cfg.auth_protocol.is_some() || cfg.priv_protocol.is_some()) {
        return Err(bad("authProtocol/privProtocol are for version \"3\"".into()));
    }
    if cfg.priv_protocol.is_some() && cfg.auth_protocol.is_none() {
        return Err(bad(
            "privProtocol needs authProtocol (SNMPv3 has no privacy without authentication)".into(),
        ));
    }
    for f in &cfg.fields {
        oid(&f.oid).map_err(|e| bad(format!("field {:?}: {e}", f.name)))?;
        if let Some(c) = &f.conversion {
            conversion(c).map_err(|e| bad(format!("field {:?}: {e}", f.name)))?;
        }
    }
    for t in &cfg.tables {
        oid(&t.oid).map_err(|e| bad(format!("table {:?}: {e}", t.name)))?;
        for c in &t.columns {
            oid(&c.oid).map_err(|e| bad(format!("table {:?} column {:?}: {e}", t.name, c.name)))?;
            if let Some(conv) = &c.conversion {
                conversion(conv)
                    .map_err(|e| bad(format!("table {:?} column {:?}: {e}", t.name, c.name)))?;
            }
        }
    }
    Ok(())
}

fn need<'a>(cred: &'a Credential, name: &str, field: &str) -> Result<&'a str, ConfigError> {
    cred.get(field).ok_or_else(|| {
        config_error(
            "snmp",
            format!("credentials {name:?} have no field {field:?}"),
        )
    })
}

fn auth(cfg: &SnmpConfig, cred: &Credential) -> Result<Auth, ConfigError> {
    let name = &cfg.credentials;
    match cfg.version {
        Version::V2c => Ok(Auth::v2c(need(cred, name, "community")?.to_string())),
        Version::V3 => {
            let user = need(cred, name, "username")?.to_string();
            let usm = UsmConfig::new(bytes::Bytes::from(user));
            let a = cfg.auth_protocol.map(|p| match p {
                AuthProto::Md5 => AuthProtocol::Md5,
                AuthProto::Sha1 => AuthProtocol::Sha1,
                AuthProto::Sha224 => AuthProtocol::Sha224,
                AuthProto::Sha256 => AuthProtocol::Sha256,
                AuthProto::Sha384 => AuthProtocol::Sha384,
                AuthProto::Sha512 => AuthProtocol::Sha512,
            });
            let p = cfg.priv_protocol.map(|p| match p {
                PrivProto::Des => PrivProtocol::Des,
                PrivProto::Aes128 => PrivProtocol::Aes128,
                PrivProto::Aes192 => PrivProtocol::Aes192Blumenthal,
                PrivProto::Aes256 => PrivProtocol::Aes256Blumenthal,
            });
            let crypto = |e: async_snmp::CryptoError| config_error("snmp", format!("v3: {e}"));
            let usm = match (a, p) {
                (None, _) => usm,
                (Some(a), None) => usm
                    .auth(a, need(cred, name, "auth_password")?)
                    .map_err(crypto)?,
                (Some(a), Some(p)) => usm
                    .auth_priv(
                        a,
                        need(cred, name, "auth_password")?,
                        p,
                        need(cred, name, "priv_password")?,
                    )
                    .map_err(crypto)?,
            };
            let usm = if cfg.context_name.is_empty() {
                usm
            } else {
                usm.context_name(bytes::Bytes::from(cfg.context_name.clone()))
            };
            Ok(Auth::from(usm))
        }
    }
}

impl Kind for SnmpKind {
    fn name(&self) -> &str {
        "snmp"
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        check(&parse_config::<SnmpConfig>("snmp", config)?)
    }

    fn create(&self, _id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        let cfg: SnmpConfig = parse_config("snmp", config)?;
        check(&cfg)?;
        let cred = self.credentials.resolve("snmp", &cfg.credentials)?;
        let auth = auth(&cfg, &cred)?;
        // An IPv6 literal needs an IPv6 socket.
        let socket = if cfg.host.contains(':') {
            self.socket6.clone()
        } else {
            self.socket.clone()
        };
        Ok(Arc::new(SnmpWorkload {
            cfg,
            auth,
            socket,
            client: OnceCell::new(),
        }))
    }
}

struct SnmpWorkload {
    cfg: SnmpConfig,
    auth: Auth,
    socket: Arc<OnceCell<UdpTransport>>,
    client: OnceCell<Client<UdpHandle>>,
}

fn snmp_error(what: &str, e: Box<async_snmp::Error>) -> NetError {
    let msg = format!("{what}: {e}");
    match e.kind() {
        ErrorKind::Timeout | ErrorKind::ConstructionTimeout => NetError::Timeout(msg),
        ErrorKind::Network | ErrorKind::Closed => NetError::Unreachable(msg),
        ErrorKind::Auth | ErrorKind::Report => NetError::Auth(msg),
        ErrorKind::Snmp => match e.exchange_source() {
            async_snmp::Error::Snmp { status, .. } => NetError::Device {
                code: status.to_string(),
                message: msg,
            },
            _ => NetError::Other(msg),
        },
        _ => NetError::Other(msg),
    }
}

/// One value as JSON: `{"oid", "type", "value"}`.
fn varbind_json(vb: &VarBind) -> Value {
    let (ty, v) = value_json(&vb.value);
    json!({"oid": vb.oid.to_string(), "type": ty, "value": v})
}

fn value_json(v: &SnmpValue) -> (&'static str, Value) {
    let bytes = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s)
            if !s
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t') =>
        {
            json!(s)
        }
        _ => json!(b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")),
    };
    match v {
        SnmpValue::Integer(i) => ("integer", json!(i)),
        SnmpValue::OctetString(b) => ("string", bytes(b)),
        SnmpValue::Null => ("null", Value::Null),
        SnmpValue::ObjectIdentifier(o) => ("oid", json!(o.to_string())),
        SnmpValue::IpAddress(a) => (
            "ipaddress",
            json!(format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])),
        ),
        SnmpValue::Counter32(n) => ("counter32", json!(n)),
        SnmpValue::Gauge32(n) => ("gauge32", json!(n)),
        SnmpValue::UInteger32(n) => ("uinteger32", json!(n)),
        SnmpValue::TimeTicks(n) => ("timeticks", json!(n)),
        SnmpValue::Opaque(b) => ("opaque", bytes(b)),
        SnmpValue::Counter64(n) => ("counter64", json!(n)),
        SnmpValue::NoSuchObject => ("noSuchObject", Value::Null),
        SnmpValue::NoSuchInstance => ("noSuchInstance", Value::Null),
        SnmpValue::EndOfMibView => ("endOfMibView", Value::Null),
        _ => ("unknown", Value::Null),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OidsArgs {
    oids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WalkArgs {
    oid: String,
    #[serde(default)]
    max_repetitions: Option<u32>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetArgs {
    oid: String,
    #[serde(rename = "type")]
    ty: String,
    value: Value,
}

fn set_value(a: &SetArgs) -> Result<SnmpValue, TaskError> {
    let bad = || TaskError::InvalidArgs(format!("value {} is not a valid {}", a.value, a.ty));
    let uint = |max: u64| a.value.as_u64().filter(|n| *n <= max).ok_or_else(bad);
    Ok(match a.ty.as_str() {
        "integer" => SnmpValue::Integer(
            a.value
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(bad)?,
        ),
        "string" => SnmpValue::OctetString(bytes::Bytes::from(
            a.value.as_str().ok_or_else(bad)?.to_string(),
        )),
        "hex" => {
            let s: String = a.value.as_str().ok_or_else(bad)?.chars().filter(|c| c.is_ascii_hexdigit()).collect();
            if s.len() % 2 != 0 {
                return Err(bad());
            }
            let b: Result<Vec<u8>, _> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16)).collect();
            SnmpValue::OctetString(bytes::Bytes::from(b.map_err(|_| bad())?))
        }
        "oid" => SnmpValue::ObjectIdentifier(oid(a.value.as_str().ok_or_else(bad)?).map_err(TaskError::InvalidArgs)?),
        "ipaddress" => {
            let ip: std::net::Ipv4Addr = a.value.as_str().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            SnmpValue::IpAddress(ip.octets())
        }
        "counter32" => SnmpValue::Counter32(uint(u32::MAX as u64)? as u32),
        "gauge32" => SnmpValue::Gauge32(uint(u32::MAX as u64)? as u32),
        "timeticks" => SnmpValue::TimeTicks(uint(u32::MAX as u64)? as u32),
        "counter64" => SnmpValue::Counter64(uint(u64::MAX)?),
        other => {
            return Err(TaskError::InvalidArgs(format!(
                "type {other:?}: one of integer, string, hex, oid, ipaddress, counter32, gauge32, timeticks, counter64"
            )))
        }
    })
}

fn parse_oids(v: &[String]) -> Result<Vec<Oid>, TaskError> {
    if v.is_empty() {
        return Err(TaskError::InvalidArgs("oids is empty".into()));
    }
    v.iter()
        .map(|s| oid(s).map_err(TaskError::InvalidArgs))
        .collect()
}

impl SnmpWorkload {
    fn target(&self) -> String {
        format!("{}:{}", self.cfg.host, self.cfg.port)
    }

    /// Bounds a whole operation: every retry's timeout plus a margin.
    fn limit(&self) -> Duration {
        ms(self.cfg.timeout_ms) * (self.cfg.retries + 1) + Duration::from_secs(1)
    }

    async fn client(&self) -> Result<&Client<UdpHandle>, NetError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self
                    .socket
                    .get_or_try_init(|| async {
                        let any = if self.cfg.host.contains(':') {
                            "[::]:0"
                        } else {
                            "0.0.0.0:0"
                        };
                        UdpTransport::bind(any)
                            .await
                            .map_err(|e| NetError::Other(format!("snmp socket: {e}")))
                    })
                    .await?;
                let retry = Retry::fixed(self.cfg.retries, Duration::ZERO)
                    .map_err(|e| NetError::Other(format!("retries: {e}")))?;
                Client::builder((self.cfg.host.clone(), self.cfg.port), self.auth.clone())
                    .request_timeout(ms(self.cfg.timeout_ms))
                    .retry(retry)
                    .build_with(socket)
                    .await
                    .map_err(|e| snmp_error(&format!("snmp {}", self.target()), e))
            })
            .await
    }

    async fn get(&self, oids: &[Oid]) -> Result<Vec<VarBind>, NetError> {
        let what = format!("get on {}", self.target());
        within(self.limit(), &what, async {
            let c = self.client().await?;
            c.get_many(oids)
                .await
                .map(|r| r.varbinds)
                .map_err(|e| snmp_error(&what, e))
        })
        .await
    }

    async fn get_next(&self, oids: &[Oid]) -> Result<Vec<VarBind>, NetError> {
        let what = format!("getnext on {}", self.target());
        within(self.limit(), &what, async {
            let c = self.client().await?;
            c.get_next_many(oids)
                .await
                .map(|r| r.varbinds)
                .map_err(|e| snmp_error(&what, e))
        })
        .await
    }

    /// Every binding under `root` (stops at the subtree's end or endOfMibView).
    async fn walk(
        &self,
        root: Oid,
        bulk: bool,
        reps: Option<u32>,
        limit: Option<usize>,
    ) -> Result<Vec<VarBind>, NetError> {
        let what = format!("walk {root} on {}", self.target());
        let c = self.client().await?;
        let opts = WalkOptions {
            method: if bulk {
                WalkMethod::GetBulk
            } else {
                WalkMethod::GetNext
            },
            max_repetitions: reps.unwrap_or(self.cfg.max_repetitions).max(1),
            result_limit: limit,
            ..Default::default()
        };
        let mut stream = c.walk_with(root, opts).map_err(|e| snmp_error(&what, e))?;
        let mut out = Vec::new();
        loop {
            // Each step has the operation's bound; a whole walk may take longer.
            match within(self.limit(), &what, async { Ok(stream.next().await) }).await? {
                Some(Ok(vb)) => out.push(vb),
                Some(Err(e)) => return Err(snmp_error(&what, e)),
                None => return Ok(out),
            }
        }
    }

    async fn poll(&self) -> Result<Value, NetError> {
        let mut fields = Map::new();
        if !self.cfg.fields.is_empty() {
            let oids: Vec<Oid> = self
                .cfg
                .fields
                .iter()
                .map(|f| oid(&f.oid).expect("validated"))
                .collect();
            let vbs = self.get(&oids).await?;
            for (f, vb) in self.cfg.fields.iter().zip(&vbs) {
                fields.insert(
                    f.name.clone(),
                    converted(&vb.value, f.conversion.as_deref()),
                );
            }
        }
        let mut tables = Map::new();
        for t in &self.cfg.tables {
            // index → column → value, rows joined by the OID suffix.
            let mut rows: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
            for c in &t.columns {
                let col = oid(&c.oid).expect("validated");
                let prefix = format!("{}.", col);
                for vb in self.walk(col, true, None, None).await? {
                    let full = vb.oid.to_string();
                    let index = full.strip_prefix(&prefix).unwrap_or(&full).to_string();
                    rows.entry(index).or_default().insert(
                        c.name.clone(),
                        converted(&vb.value, c.conversion.as_deref()),
                    );
                }
            }
            let rows: Map<String, Value> = rows
                .into_iter()
                .map(|(k, v)| (k, Value::Object(v)))
                .collect();
            tables.insert(t.name.clone(), Value::Object(rows));
        }
        Ok(json!({"fields": fields, "tables": tables}))
    }

    /// A v3 request that got no answer: if the agent answers an
    /// unauthenticated request for the same user, it is there and ignores
    /// our credentials (a wrong password gets an unauthenticated report,
    /// which a client must not trust, so it looks like silence).
    async fn diagnose_v3(&self, e: NetError) -> NetError {
        let (Version::V3, NetError::Timeout(msg)) = (self.cfg.version, &e) else {
            return e;
        };
        let Some(user) = self.auth_username() else {
            return e;
        };
        let probe = async {
            let socket = self.socket.get()?;
            let c = Client::builder((self.cfg.host.clone(), self.cfg.port), Auth::usm(user))
                .request_timeout(ms(self.cfg.timeout_ms))
                .retry(Retry::none())
                .build_with(socket)
                .await
                .ok()?;
            match c.get(&oid(SYS_UPTIME).expect("constant")).await {
                Ok(_) => Some(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Report | ErrorKind::Auth | ErrorKind::Snmp
                    ) =>
                {
                    Some(())
                }
                Err(_) => None,
            }
        };
        match within(self.limit(), "probe", async { Ok(probe.await) }).await {
            Ok(Some(())) => NetError::Auth(format!(
                "{msg}; the agent answers unauthenticated requests for this user but not ours: \
                 wrong user, password or protocols in credentials {:?}?",
                self.cfg.credentials
            )),
            _ => e,
        }
    }

    fn auth_username(&self) -> Option<Vec<u8>> {
        match &self.auth {
            Auth::Usm(u) => Some(u.username().to_vec()),
            _ => None,
        }
    }

    async fn uptime(&self) -> Result<(), NetError> {
        let vbs = match self.get(&[oid(SYS_UPTIME).expect("constant")]).await {
            Ok(v) => v,
            Err(e) => return Err(self.diagnose_v3(e).await),
        };
        match vbs.first().map(|v| &v.value) {
            Some(SnmpValue::TimeTicks(_)) => Ok(()),
            other => Err(NetError::Device {
                code: "noSysUpTime".into(),
                message: format!("sysUpTime.0 answered {other:?}"),
            }),
        }
    }
}

#[async_trait]
impl Workload for SnmpWorkload {
    async fn init(&self) -> Result<(), WorkloadError> {
        self.uptime().await.map_err(Into::into)
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        self.uptime().await.map_err(Into::into)
    }

    fn command_class(&self, task: &Task) -> CommandClass {
        match task.command.as_str() {
            "get" | "getnext" | "walk" | "bulkwalk" | "poll" => CommandClass::Read,
            _ => CommandClass::Write,
        }
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        let k = &task.kwargs;
        let vbs = match task.command.as_str() {
            "get" => {
                let a: OidsArgs = parse_kwargs(k)?;
                self.get(&parse_oids(&a.oids)?).await?
            }
            "getnext" => {
                let a: OidsArgs = parse_kwargs(k)?;
                self.get_next(&parse_oids(&a.oids)?).await?
            }
            "walk" | "bulkwalk" => {
                let a: WalkArgs = parse_kwargs(k)?;
                let root = oid(&a.oid).map_err(TaskError::InvalidArgs)?;
                self.walk(root, task.command == "bulkwalk", a.max_repetitions, a.limit)
                    .await?
            }
            "set" => {
                let a: SetArgs = parse_kwargs(k)?;
                let o = oid(&a.oid).map_err(TaskError::InvalidArgs)?;
                let v = set_value(&a)?;
                let what = format!("set on {}", self.target());
                within(self.limit(), &what, async {
                    let c = self.client().await?;
                    c.set(&o, v)
                        .await
                        .map(|r| r.varbinds)
                        .map_err(|e| snmp_error(&what, e))
                })
                .await?
            }
            "poll" => return Ok(self.poll().await?),
            other => return Err(TaskError::UnknownCommand(other.to_string())),
        };
        Ok(json!({"varbinds": vbs.iter().map(varbind_json).collect::<Vec<_>>()}))
    }

    async fn stop(&self) -> Result<(), WorkloadError> {
        Ok(())
    }

    fn info(&self) -> Value {
        json!({"target": self.target(), "version": format!("{:?}", self.cfg.version)})
    }
}
