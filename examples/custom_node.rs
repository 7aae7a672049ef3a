//! A node binary with your own device kind: the whole `ottomato` command
//! line (`node` with every flag, TOML file, auth, drain; `workload`, `task`,
//! `status` …) plus a kind the built-in ones do not have.
//!
//! ```text
//! cargo run --example custom_node -- node -s nats://127.0.0.1:4222 --node-id edge-1
//! cargo run --example custom_node -- workload add lamp-1 --kind lamp
//! cargo run --example custom_node -- task run lamp-1 switch --kwarg on=true
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use ottomato::{ConfigError, Kind, Kinds, Task, TaskError, Workload, WorkloadError};
use serde_json::{json, Value};

/// A lamp that can be switched: the smallest useful device.
struct Lamp {
    on: AtomicBool,
}

#[async_trait]
impl Workload for Lamp {
    async fn init(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        match task.command.as_str() {
            "switch" => {
                let on = task
                    .kwargs
                    .get("on")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| TaskError::InvalidArgs("switch needs kwarg on (bool)".into()))?;
                self.on.store(on, Ordering::SeqCst);
                Ok(json!({"on": on}))
            }
            "state" => Ok(json!({"on": self.on.load(Ordering::SeqCst)})),
            other => Err(TaskError::UnknownCommand(other.into())),
        }
    }
    async fn stop(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
}

struct LampKind;

impl Kind for LampKind {
    fn name(&self) -> &str {
        "lamp"
    }
    fn create(&self, _id: &str, _config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        Ok(Arc::new(Lamp {
            on: AtomicBool::new(false),
        }))
    }
}

fn main() {
    let mut kinds = Kinds::builtin();
    kinds.register(LampKind);
    ottomato::cli::main_with(kinds)
}
