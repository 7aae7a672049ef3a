//! `tcp`: is a port open? The simplest real kind, for anything with a TCP
//! listener (a PLC's Modbus port, a router's SSH port, a web UI).
//!
//! Config: `{"host": "10.0.0.7", "port": 502, "timeoutMs": 5000}`.
//! - `init` and `ping`: a TCP connect within `timeoutMs`, closed at once.
//! - task `probe`: the same connect, answered with
//!   `{"address": "10.0.0.7:502", "connectMs": 0.42}`. Class `read`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::{default_timeout_ms, ms, parse_config, within, NetError};
use crate::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// The `tcp` kind.
#[derive(Debug, Clone, Default)]
pub struct TcpKind;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpConfig {
    host: String,
    port: u16,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

impl Kind for TcpKind {
    fn name(&self) -> &str {
        "tcp"
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        parse_config::<TcpConfig>("tcp", config).map(drop)
    }

    fn create(&self, _id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        let cfg: TcpConfig = parse_config("tcp", config)?;
        Ok(Arc::new(TcpWorkload { cfg }))
    }
}

struct TcpWorkload {
    cfg: TcpConfig,
}

impl TcpWorkload {
    fn address(&self) -> String {
        if self.cfg.host.contains(':') && !self.cfg.host.starts_with('[') {
            format!("[{}]:{}", self.cfg.host, self.cfg.port)
        } else {
            format!("{}:{}", self.cfg.host, self.cfg.port)
        }
    }

    async fn connect(&self) -> Result<f64, NetError> {
        let addr = self.address();
        let started = Instant::now();
        within(ms(self.cfg.timeout_ms), &format!("connect {addr}"), async {
            tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|e| NetError::io(&format!("connect {addr}"), &e))
        })
        .await?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }
}

#[async_trait]
impl Workload for TcpWorkload {
    async fn init(&self) -> Result<(), WorkloadError> {
        self.connect().await.map(drop).map_err(Into::into)
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        self.connect().await.map(drop).map_err(Into::into)
    }

    fn command_class(&self, task: &Task) -> CommandClass {
        match task.command.as_str() {
            "probe" => CommandClass::Read,
            _ => CommandClass::Write,
        }
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        match task.command.as_str() {
            "probe" => {
                let took = self.connect().await?;
                Ok(json!({"address": self.address(), "connectMs": took}))
            }
            other => Err(TaskError::UnknownCommand(other.to_string())),
        }
    }

    async fn stop(&self) -> Result<(), WorkloadError> {
        Ok(())
    }

    fn info(&self) -> Value {
        json!({"address": self.address()})
    }
}
