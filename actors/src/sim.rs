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
//! | `trace` | append two lines per init/ping/task/stop to this file, one when the call starts and one when it ends (also when it is cancelled): `<unix ns> <pid> <event> <id> <instance> start\|end` (tests use it to prove no device is driven by two instances at once) | none |
//!
//! Commands: `echo` (returns `{"args", "kwargs"}`), `hello` (returns a
//! greeting), `sleep` (kwarg `ms`), `fail` (returns an error, kwarg `message`),
//! `panic` (panics, to exercise supervision), `info` (the instance's settings
//! and counters), `set` (changes `ping_fail_rate` / `ping_ms` at run time, so
//! a test or demo can make a device go down and come back). Command class:
//! `set` is `write`, the rest `read`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

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
    /// Random id of this instance (a restart builds a new one).
    instance: u64,
}

/// Writes the `end` line of a traced call when dropped: also when the call
/// is cancelled (its future dropped) before it finished.
struct Traced<'a> {
    device: &'a SimDevice,
    event: &'static str,
}

impl Drop for Traced<'_> {
    fn drop(&mut self) {
        self.device.trace_line(self.event, "end");
    }
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
            instance: rand::random(),
        }
    }

    /// Traces the start of a call now and its end when the guard drops.
    fn trace(&self, event: &'static str) -> Traced<'_> {
        self.trace_line(event, "start");
        Traced {
            device: self,
            event,
        }
    }

    fn trace_line(&self, event: &str, phase: &str) {
        let Some(path) = &self.trace else { return };
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let line = format!(
            "{ns} {} {event} {} {:016x} {phase}\n",
            std::process::id(),
            self.id,
            self.instance
        );
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
        let _call = self.trace("init");
        pause(self.init_ms).await;
        if chance(self.init_fail_rate) {
            return Err(WorkloadError::new("simulated init failure"));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), WorkloadError> {
        let _call = self.trace("ping");
        pause(u64::from(self.ping_ms.load(Ordering::Relaxed))).await;
        self.pings.fetch_add(1, Ordering::Relaxed);
        if chance(self.ping_fail_rate()) {
            return Err(WorkloadError::new("simulated ping failure"));
        }
        Ok(())
    }

    fn command_class(&self, task: &Task) -> CommandClass {
        // `set` changes the simulated device; everything else only reads it.
        match task.command.as_str() {
            "echo" | "hello" | "sleep" | "fail" | "panic" | "info" => CommandClass::Read,
            _ => CommandClass::Write,
        }
    }

    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        let _call = self.trace("task");
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
        let _call = self.trace("stop");
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
/// was ever driven by two instances at once (tests and `ottomato bench` use it).
pub mod trace {
    use std::collections::HashMap;
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
        /// The device instance (hex), unique per process and restart.
        pub instance: String,
        /// Whether the call started (`true`) or ended here.
        pub start: bool,
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
                    instance: it.next()?.to_string(),
                    start: it.next()? == "start",
                })
            })
            .collect();
        v.sort_by_key(|t| t.ns);
        v
    }

    /// One device call, from its start to its end (`None`: never ended).
    #[derive(Debug, Clone, PartialEq)]
    pub struct Call {
        /// The device (workload id).
        pub device: String,
        /// Who drove it: a process and device instance.
        pub instance: String,
        /// What the call was (`init`, `ping`, `task`, `stop`).
        pub what: String,
        /// Start, in any monotonic unit shared by all calls.
        pub start: u128,
        /// End, in the same unit.
        pub end: Option<u128>,
    }

    /// Pairs the start and end lines of a trace into calls. A call of a
    /// process in `died` (pid → time of death) that never ended ends then.
    pub fn calls(trace: &[TraceLine], died: &HashMap<u32, u128>) -> Vec<Call> {
        let mut open: HashMap<(String, String, String), Vec<usize>> = HashMap::new();
        let mut out: Vec<Call> = Vec::new();
        for t in trace {
            let instance = format!("{}/{}", t.pid, t.instance);
            let key = (t.id.clone(), instance.clone(), t.event.clone());
            if t.start {
                open.entry(key).or_default().push(out.len());
                out.push(Call {
                    device: t.id.clone(),
                    instance,
                    what: t.event.clone(),
                    start: t.ns,
                    end: None,
                });
            } else if let Some(i) = open.get_mut(&key).and_then(|v| {
                // Calls of one kind on one instance end in any order; pair
                // with the earliest open one (only the union matters).
                if v.is_empty() {
                    None
                } else {
                    Some(v.remove(0))
                }
            }) {
                out[i].end = Some(t.ns);
            }
        }
        for c in &mut out {
            if c.end.is_none() {
                let pid: Option<u32> = c.instance.split('/').next().and_then(|p| p.parse().ok());
                c.end = pid.and_then(|p| died.get(&p)).copied();
            }
        }
        out
    }

    /// Every pair of calls on one device by two different instances whose
    /// intervals overlap (a call that never ended lasts forever). Empty when
    /// every device was driven by at most one instance at any moment.
    pub fn overlaps(calls: &[Call]) -> Vec<String> {
        let mut by_device: HashMap<&str, Vec<&Call>> = HashMap::new();
        for c in calls {
            by_device.entry(&c.device).or_default().push(c);
        }
        let mut bad = Vec::new();
        for (device, mut cs) in by_device {
            cs.sort_by_key(|c| c.start);
            // Sweep: the call reaching furthest so far, per instance.
            let mut reach: Option<&Call> = None;
            for c in cs {
                if let Some(r) = reach {
                    let r_end = r.end.unwrap_or(u128::MAX);
                    if r.instance != c.instance && c.start < r_end {
                        bad.push(format!(
                            "{device}: {} of {} ({}..{}) overlaps {} of {} (from {})",
                            r.what,
                            r.instance,
                            r.start,
                            r.end.map_or("never ended".into(), |e| e.to_string()),
                            c.what,
                            c.instance,
                            c.start
                        ));
                    }
                }
                let c_end = c.end.unwrap_or(u128::MAX);
                if reach.is_none_or(|r| r.end.unwrap_or(u128::MAX) < c_end) {
                    reach = Some(c);
                }
            }
        }
        bad
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn call(instance: &str, start: u128, end: Option<u128>) -> Call {
            Call {
                device: "w".into(),
                instance: instance.into(),
                what: "task".into(),
                start,
                end,
            }
        }

        #[test]
        fn overlap_checker_flags_intervals_not_starts() {
            // Clean handover: A's calls all end before B's start.
            let ok = [
                call("A", 1, Some(5)),
                call("A", 2, Some(6)),
                call("B", 7, Some(9)),
            ];
            assert!(overlaps(&ok).is_empty());
            // A long task of A still running when B initialises: flagged,
            // although every *start* of A precedes every start of B.
            let slow = [
                call("A", 1, Some(20)),
                call("A", 2, Some(3)),
                call("B", 10, Some(11)),
            ];
            assert_eq!(overlaps(&slow).len(), 1, "{:?}", overlaps(&slow));
            // A call that never ended (frozen, never resumed) overlaps what follows.
            let frozen = [call("A", 1, None), call("B", 10, Some(11))];
            assert_eq!(overlaps(&frozen).len(), 1);
            // Concurrent calls of one instance are fine.
            let same = [call("A", 1, Some(10)), call("A", 2, Some(4))];
            assert!(overlaps(&same).is_empty());
        }

        #[test]
        fn trace_lines_pair_into_calls_and_death_ends_them() {
            let line = |ns, pid, inst: &str, start| TraceLine {
                ns,
                pid,
                event: "task".into(),
                id: "w".into(),
                instance: inst.into(),
                start,
            };
            let t = [
                line(1, 1, "a", true),
                line(5, 2, "b", true),
                line(6, 2, "b", false),
            ];
            // pid 1 killed at 3: its open call ended then; no overlap.
            let died = HashMap::from([(1, 3)]);
            assert!(overlaps(&calls(&t, &died)).is_empty());
            // Not known dead: its call never ended, and B's overlaps it.
            assert_eq!(overlaps(&calls(&t, &HashMap::new())).len(), 1);
        }
    }
}
