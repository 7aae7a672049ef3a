//! `sim`: a simulated device, for demos, tests and benchmarks.
//!
//! Config (all optional, unknown fields rejected):
//!
//! | field | meaning | default |
//! |---|---|---|
//! | `init_ms` | how long `init` takes | 0 |
//! | `ping_ms` | how long `ping` takes | 0 |
//! | `stop_ms` | how long `stop` takes | 0 |
//! | `init_fail_rate` | probability (0–1) that an `init` attempt fails | 0 |
//! | `ping_fail_rate` | probability (0–1) that a ping fails (flapping) | 0 |
//! | `trace` | append one line per init/ping/task/stop to this file: `<unix ns> <pid> <event> <id>` (tests use it to prove no device is driven by two processes at once) | none |
//!
//! Commands: `echo` (returns `{"args", "kwargs"}`), `hello` (returns a
//! greeting), `sleep` (kwarg `ms`), `fail` (returns an error, kwarg `message`),
//! `panic` (panics, to exercise supervision), `info` (the instance's settings
//! and counters), `set` (changes `ping_fail_rate` / `ping_ms` at run time, so
//! a test or demo can make a device go down and come back).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// The `sim` kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimKind;

/// The settings of one simulated device (its spec's `config`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Milliseconds `init` takes.
    pub init_ms: u64,
    /// Milliseconds `ping` takes.
    pub ping_ms: u32,
    /// Milliseconds `stop` takes.
    pub stop_ms: u64,
    /// Probability that an init attempt fails.
    pub init_fail_rate: f32,
    /// Probability that a ping fails.
    pub ping_fail_rate: f32,
    /// File to append a line to on every device call.
    pub trace: Option<std::path::PathBuf>,
}

impl Kind for SimKind {
    fn name(&self) -> &str {
        "sim"
    }

    fn create(&self, id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        let err = |message: String| ConfigError {
            kind: "sim".into(),
            message,
        };
        let cfg: SimConfig = if config.is_null() {
            SimConfig::default()
        } else {
            serde_json::from_value(config.clone()).map_err(|e| err(e.to_string()))?
        };
        for (name, rate) in [
            ("init_fail_rate", cfg.init_fail_rate),
            ("ping_fail_rate", cfg.ping_fail_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(err(format!("{name} must be between 0 and 1, got {rate}")));
            }
        }
        Ok(Arc::new(SimDevice::new(id, cfg)))
    }
}

/// One simulated device.
#[derive(Debug)]
pub struct SimDevice {
    id: Box<str>,
    init_ms: u64,
    stop_ms: u64,
    init_fail_rate: f32,
    /// Changed at run time by the `set` command, hence atomics.
    ping_ms: AtomicU32,
    ping_fail_rate_bits: AtomicU32,
    pings: AtomicU64,
    trace: Option<Box<std::path::Path>>,
}

impl SimDevice {
    /// A device with these settings.
    pub fn new(id: &str, cfg: SimConfig) -> Self {
        SimDevice {
            id: id.into(),
            init_ms: cfg.init_ms,
            stop_ms: cfg.stop_ms,
            init_fail_rate: cfg.init_fail_rate,
            ping_ms: AtomicU32::new(cfg.ping_ms),
            ping_fail_rate_bits: AtomicU32::new(cfg.ping_fail_rate.to_bits()),
            pings: AtomicU64::new(0),
            trace: cfg.trace.map(|p| p.into_boxed_path()),
        }
    }

    fn trace(&self, event: &str) {
        let Some(path) = &self.trace else { return };
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let line = format!("{ns} {} {event} {}\n", std::process::id(), self.id);
        // One write of a short line with O_APPEND: lines from many processes never mix.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = std::io::Write::write_all(&mut f, line.as_bytes());
        }
    }

    fn ping_fail_rate(&self) -> f32 {
        f32::from_bits(self.ping_fail_rate_bits.load(Ordering::Relaxed))
    }
}

fn chance(rate: f32) -> bool {
    rate > 0.0 && rand::thread_rng().gen::<f32>() < rate
}

async fn pause(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[async_trait]
impl Workload for SimDevice {
    async fn init(&self) -> Result<(), WorkloadError> {
        self.trace("init");
        pause(self.init_ms).await;
        if chance(self.init_fail_rate) {
            return Err(WorkloadError::new("simulated init failure"));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        self.trace("ping");
        pause(u64::from(self.ping_ms.load(Ordering::Relaxed))).await;
        self.pings.fetch_add(1, Ordering::Relaxed);
        if chance(self.ping_fail_rate()) {
            return Err(WorkloadError::new("simulated ping failure"));
        }
        Ok(())
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        self.trace("task");
        match task.command.as_str() {
            "echo" => Ok(json!({ "args": task.args, "kwargs": task.kwargs })),
            "hello" => Ok(Value::String(format!("hello from {}", self.id))),
            "sleep" => {
                let ms = task
                    .kwargs
                    .get("ms")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        TaskError::InvalidArgs("sleep needs kwarg ms (integer)".into())
                    })?;
                pause(ms).await;
                Ok(json!({ "slept_ms": ms }))
            }
            "fail" => Err(TaskError::Failed(
                task.kwargs
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("simulated failure")
                    .to_string(),
            )),
            "panic" => panic!("simulated panic in device {}", self.id),
            "info" => Ok(self.info()),
            "set" => {
                for (key, value) in &task.kwargs {
                    match (key.as_str(), value.as_f64()) {
                        ("ping_fail_rate", Some(r)) if (0.0..=1.0).contains(&r) => self
                            .ping_fail_rate_bits
                            .store((r as f32).to_bits(), Ordering::Relaxed),
                        ("ping_ms", Some(ms)) if ms >= 0.0 && ms <= f64::from(u32::MAX) => {
                            self.ping_ms.store(ms as u32, Ordering::Relaxed)
                        }
                        _ => {
                            return Err(TaskError::InvalidArgs(format!(
                                "set accepts ping_fail_rate (0-1) and ping_ms, got {key}={value}"
                            )))
                        }
                    }
                }
                Ok(self.info())
            }
            other => Err(TaskError::UnknownCommand(other.to_string())),
        }
    }

    async fn stop(&self) -> Result<(), WorkloadError> {
        self.trace("stop");
        pause(self.stop_ms).await;
        Ok(())
    }

    fn info(&self) -> Value {
        json!({
            "id": &*self.id,
            "kind": "sim",
            "init_ms": self.init_ms,
            "ping_ms": self.ping_ms.load(Ordering::Relaxed),
            "stop_ms": self.stop_ms,
            "init_fail_rate": self.init_fail_rate,
            "ping_fail_rate": self.ping_fail_rate(),
            "pings": self.pings.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_fields_and_bad_rates() {
        let e = SimKind.create("a", &json!({"init_msx": 1})).err().unwrap();
        assert!(e.message.contains("init_msx"), "{e}");
        let e = SimKind
            .create("a", &json!({"ping_fail_rate": 2.0}))
            .err()
            .unwrap();
        assert!(e.message.contains("between 0 and 1"), "{e}");
        assert!(SimKind.create("a", &Value::Null).is_ok());
    }

    #[tokio::test]
    async fn commands() {
        let d = SimKind.create("d1", &json!({})).unwrap();
        let r = d
            .run_task(&Task::new("echo").arg(1).kwarg("k", "v"))
            .await
            .unwrap();
        assert_eq!(r, json!({"args": [1], "kwargs": {"k": "v"}}));
        assert_eq!(
            d.run_task(&Task::new("hello")).await.unwrap(),
            json!("hello from d1")
        );
        assert!(matches!(
            d.run_task(&Task::new("nope")).await,
            Err(TaskError::UnknownCommand(_))
        ));
        assert!(matches!(
            d.run_task(&Task::new("sleep")).await,
            Err(TaskError::InvalidArgs(_))
        ));
        assert!(matches!(
            d.run_task(&Task::new("fail")).await,
            Err(TaskError::Failed(_))
        ));
        d.run_task(&Task::new("set").kwarg("ping_fail_rate", 1.0))
            .await
            .unwrap();
        assert!(d.ping().await.is_err());
        d.run_task(&Task::new("set").kwarg("ping_fail_rate", 0.0))
            .await
            .unwrap();
        assert!(d.ping().await.is_ok());
    }
}

/// Reading the `trace` files sim devices write, and checking that no device
/// was ever driven by two processes at once (tests and `ottomato bench` use it).
pub mod trace {
    use std::path::Path;

    /// One line of a sim device trace.
    #[derive(Debug, Clone)]
    pub struct TraceLine {
        /// Unix time in ns.
        pub ns: u128,
        /// The process that drove the device.
        pub pid: u32,
        /// `init`, `ping`, `task` or `stop`.
        pub event: String,
        /// The workload id.
        pub id: String,
    }

    /// Every line of a trace file, in time order (unreadable lines skipped).
    pub fn read_trace(path: &Path) -> Vec<TraceLine> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut v: Vec<TraceLine> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                Some(TraceLine {
                    ns: it.next()?.parse().ok()?,
                    pid: it.next()?.parse().ok()?,
                    event: it.next()?.to_string(),
                    id: it.next()?.to_string(),
                })
            })
            .collect();
        v.sort_by_key(|t| t.ns);
        v
    }

    /// Moments when two processes drove the same device: process A worked on a
    /// device, then B did, then A again without having stopped (or re-initialised)
    /// it in between. Empty when every device was driven by one process at a time.
    pub fn double_runs(trace: &[TraceLine]) -> Vec<String> {
        use std::collections::{HashMap, HashSet};
        let mut by_id: HashMap<&str, Vec<&TraceLine>> = HashMap::new();
        for t in trace {
            by_id.entry(&t.id).or_default().push(t);
        }
        let mut bad = vec![];
        for (id, events) in by_id {
            let mut current: Option<u32> = None;
            let mut interrupted: HashSet<u32> = HashSet::new();
            for e in events {
                match e.event.as_str() {
                    "stop" => {
                        interrupted.remove(&e.pid);
                        if current == Some(e.pid) {
                            current = None;
                        }
                    }
                    ev => {
                        if ev == "init" {
                            interrupted.remove(&e.pid);
                        }
                        if interrupted.contains(&e.pid) {
                            bad.push(format!(
                                "{id}: pid {} worked again at {} after another pid took over",
                                e.pid, e.ns
                            ));
                        }
                        if let Some(q) = current {
                            if q != e.pid {
                                interrupted.insert(q);
                            }
                        }
                        current = Some(e.pid);
                    }
                }
            }
        }
        bad
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn double_run_detector_flags_interleaving_only() {
            let line = |ns, pid, event: &str| TraceLine {
                ns,
                pid,
                event: event.into(),
                id: "w".into(),
            };
            // Clean handover: A stops, B starts, later A takes it back.
            let ok = [
                line(1, 1, "init"),
                line(2, 1, "ping"),
                line(3, 1, "stop"),
                line(4, 2, "init"),
                line(5, 2, "ping"),
                line(6, 2, "stop"),
                line(7, 1, "init"),
                line(8, 1, "ping"),
            ];
            assert!(double_runs(&ok).is_empty());
            // Killed A never comes back: fine.
            let killed = [
                line(1, 1, "init"),
                line(2, 1, "ping"),
                line(4, 2, "init"),
                line(5, 2, "ping"),
            ];
            assert!(double_runs(&killed).is_empty());
            // A frozen, B takes over, A resumes pinging: a double run.
            let stale = [
                line(1, 1, "init"),
                line(2, 1, "ping"),
                line(4, 2, "init"),
                line(5, 2, "ping"),
                line(6, 1, "ping"),
            ];
            assert_eq!(double_runs(&stale).len(), 1);
        }
    }
}
