//! Fleets of traced sim devices on `ottomato node` processes, and the checks
//! the fault and ownership tests share.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ottomato::actors::sim::trace::{calls, overlaps, read_trace, TraceLine};
use serde_json::{json, Value};

use super::{eventually, NodeProc, Operator, TempDir};

/// The membership TTL the node processes of these tests run with.
pub const TTL: Duration = Duration::from_secs(5);

pub async fn add_traced(op: &Operator, ids: &[String], trace: &Path, extra: Value) {
    add_traced_with(op, ids, trace, json!({}), extra).await
}

/// [`add_traced`] with more sim `config` fields (e.g. `{"stop_ms": 2000}`).
pub async fn add_traced_with(
    op: &Operator,
    ids: &[String],
    trace: &Path,
    config: Value,
    extra: Value,
) {
    for id in ids {
        let mut spec = json!({"kind": "sim", "config": {"trace": trace}});
        if let Value::Object(m) = &config {
            for (k, v) in m {
                spec["config"][k] = v.clone();
            }
        }
        if let Value::Object(m) = &extra {
            for (k, v) in m {
                spec[k] = v.clone();
            }
        }
        op.add(id, spec).await;
    }
}

pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Waits until every id is `running` under an owner in `owners`.
pub async fn all_running_on(
    op: &Operator,
    ids: &[String],
    owners: &[&str],
    secs: u64,
) -> HashMap<String, String> {
    eventually(
        secs,
        "all workloads running on the expected nodes",
        || async {
            let snap = op.snapshot().await;
            let mut out = HashMap::new();
            for id in ids {
                match snap.get(id) {
                    Some((o, s)) if s == "running" && owners.contains(&o.as_str()) => {
                        out.insert(id.clone(), o.clone());
                    }
                    _ => return None,
                }
            }
            Some(out)
        },
    )
    .await
}

/// Every workload answers a task successfully, from the node the state
/// bucket names as its owner at that moment. Retried as a whole to a
/// deadline: right after an outage a node may still be fencing and
/// re-claiming (it refuses device work meanwhile, which is the point).
pub async fn answered_by_owners(op: &Operator, owners: &HashMap<String, String>) {
    let ids: Vec<&String> = owners.keys().collect();
    eventually(30, "every workload answered by its owner", || async {
        let snap = op.snapshot().await;
        for id in &ids {
            let (owner, _) = snap.get(*id)?;
            let reply = op
                .client
                .request(
                    format!("otto.task.write.{id}"),
                    Bytes::from_static(br#"{"command":"hello"}"#),
                )
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&reply.payload).unwrap();
            if v["success"] != true || v["workerId"] != owner.as_str() {
                eprintln!("{id}: not yet answered by its owner {owner}: {v}");
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Waits (to a deadline) until every id runs and owners have not changed for `quiet`.
pub async fn settle(
    op: &Operator,
    ids: &[String],
    quiet: Duration,
    secs: u64,
) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = HashMap::new();
    let mut since = Instant::now();
    loop {
        let snap = op.snapshot().await;
        let now: HashMap<String, String> = ids
            .iter()
            .filter_map(|id| match snap.get(id) {
                Some((o, s)) if s == "running" => Some((id.clone(), o.clone())),
                _ => None,
            })
            .collect();
        if now.len() != ids.len() || now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "placement did not settle within {secs} s ({} of {} running)",
            last.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` sim workloads named `<prefix>NNNN` whose devices trace every call,
/// on node processes a, b and c (connected to `urls`, with `extra` options),
/// settled: the fleet each fault test starts from.
pub struct Fleet {
    pub logs: TempDir,
    pub trace: PathBuf,
    pub ids: Vec<String>,
    pub nodes: Vec<NodeProc>,
    pub owners: HashMap<String, String>,
    /// Processes the test killed, and when (unix ns): their calls in flight ended then.
    pub died: HashMap<u32, u128>,
}

impl Fleet {
    /// The workloads `node` owned when the fleet settled.
    pub fn owned_by(&self, node: &str) -> Vec<String> {
        self.owners
            .iter()
            .filter(|(_, o)| *o == node)
            .map(|(i, _)| i.clone())
            .collect()
    }

    /// kill -9 of node `i`, noting when its calls in flight ended.
    pub fn kill(&mut self, i: usize) {
        let pid = self.nodes[i].pid();
        self.nodes[i].kill();
        self.died.insert(pid, unix_ns());
    }
}

/// Now, in unix ns (the clock of the device traces).
pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub async fn traced_fleet(
    op: &Operator,
    urls: &str,
    prefix: &str,
    n: usize,
    extra: &[&str],
    secs: u64,
) -> Fleet {
    traced_fleet_with(op, urls, prefix, n, extra, secs, json!({})).await
}

/// [`traced_fleet`] whose sim devices have more `config` fields.
pub async fn traced_fleet_with(
    op: &Operator,
    urls: &str,
    prefix: &str,
    n: usize,
    extra: &[&str],
    secs: u64,
    config: Value,
) -> Fleet {
    traced_fleet_via(op, [urls; 3], prefix, n, extra, secs, config).await
}

/// [`traced_fleet`] whose nodes a, b and c each connect to their own URL
/// (e.g. one through a [`super::proxy::StallProxy`]).
pub async fn traced_fleet_via(
    op: &Operator,
    urls: [&str; 3],
    prefix: &str,
    n: usize,
    extra: &[&str],
    secs: u64,
    config: Value,
) -> Fleet {
    let logs = TempDir::new("logs");
    let trace = logs.0.join("trace.log");
    let ids = ids(prefix, n);
    add_traced_with(op, &ids, &trace, config, json!({})).await;
    let nodes: Vec<NodeProc> = ["a", "b", "c"]
        .iter()
        .zip(urls)
        .map(|(name, urls)| NodeProc::start(urls, name, &logs.0, extra))
        .collect();
    let owners = settle(op, &ids, Duration::from_secs(2), secs).await;
    Fleet {
        logs,
        trace,
        ids,
        nodes,
        owners,
        died: HashMap::new(),
    }
}

/// Asserts that no two instances' device calls overlapped on any device
/// (start to end of every call; `died`: processes killed, and when); the trace.
pub fn assert_single_drivers(trace: &Path, died: &HashMap<u32, u128>) -> Vec<TraceLine> {
    assert_single_drivers_frozen(trace, died, &HashMap::new())
}

/// How long after its SIGCONT a frozen process may take to finish the poll
/// it was in when it stopped.
const RESUME_GRACE_NS: u128 = 1_000_000_000;

/// [`assert_single_drivers`] for a fleet where processes were frozen
/// (SIGSTOP) and resumed (SIGCONT): `frozen` is pid → (stopped, resumed),
/// unix ns, `stopped` taken once the STOP signal was sent and `resumed`
/// before the CONT. A call of a frozen process that was in flight at the
/// freeze and ended right after the resume (within 1 s: a loaded machine
/// may take that long to run it again) is taken to have ended at the
/// freeze: the process stopped inside one poll of device code, and
/// finishing that poll is the documented limit of fencing without a
/// device-side token (ARCHITECTURE.md, "A freeze inside one poll"); the
/// lease guard stops the call at its next step. A call that went on longer,
/// and every call started after the resume, counts in full.
pub fn assert_single_drivers_frozen(
    trace: &Path,
    died: &HashMap<u32, u128>,
    frozen: &HashMap<u32, (u128, u128)>,
) -> Vec<TraceLine> {
    let lines = read_trace(trace);
    assert!(
        !lines.is_empty(),
        "no device calls traced in {}",
        trace.display()
    );
    let mut all = calls(&lines, died);
    for c in &mut all {
        let pid: Option<u32> = c.instance.split('/').next().and_then(|p| p.parse().ok());
        if let (Some((stopped, resumed)), Some(end)) = (pid.and_then(|p| frozen.get(&p)), c.end) {
            if c.start < *stopped && end >= *resumed && end <= resumed + RESUME_GRACE_NS {
                c.end = Some(*stopped);
            }
        }
    }
    let bad = overlaps(&all);
    assert!(
        bad.is_empty(),
        "devices driven by two instances at once: {:?}",
        &bad[..bad.len().min(5)]
    );
    lines
}
