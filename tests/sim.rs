//! Deterministic-simulation tests of the cluster protocol, the way
//! FoundationDB tests: many nodes in one process on the in-memory backend,
//! tokio's paused clock (virtual time), and a seeded random schedule of
//! joins, crashes, restarts under the same id, partitions and spec churn.
//! Each seed runs ~2 virtual minutes in milliseconds of real time; a failure
//! prints its seed (`OTTOMATO_SIM_SEED=<n>` replays one, `OTTOMATO_SIM_SEEDS`
//! sets how many run).
//!
//! A partition is a gate in front of one node's storage: its heartbeats,
//! claims, state writes and watch deliveries stall while its actors keep
//! running — harsher than a pause, since the node keeps doing device work
//! until its lease runs out.
//!
//! Checked for every seed:
//! - no device is driven by two nodes at once (devices log every call);
//! - after the faults stop, every spec runs on exactly one live node, and
//!   the state bucket names that node as owner and says `running`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use ottomato::store::{
    BucketSpec, KvBucket, KvChange, KvEntry, MemoryStore, StateStore, StoreError,
};
use ottomato::subjects::Subjects;
use ottomato::transport::MemoryTransport;
use ottomato::{
    Cluster, ClusterConfig, ConfigError, Kind, Node, NodeConfig, Task, TaskError, Workload,
    WorkloadError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

// ---- a gate in front of one node's storage ---------------------------------

#[derive(Clone)]
struct Gate(watch::Sender<bool>);

impl Gate {
    fn new() -> Gate {
        Gate(watch::channel(true).0)
    }
    fn set(&self, open: bool) {
        self.0.send_replace(open);
    }
    async fn pass(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

struct GatedStore {
    inner: MemoryStore,
    gate: Gate,
}

#[async_trait]
impl StateStore for GatedStore {
    async fn bucket(&self, spec: &BucketSpec) -> Result<Arc<dyn KvBucket>, StoreError> {
        self.gate.pass().await;
        Ok(Arc::new(GatedBucket {
            inner: self.inner.bucket(spec).await?,
            gate: self.gate.clone(),
        }))
    }
}

struct GatedBucket {
    inner: Arc<dyn KvBucket>,
    gate: Gate,
}

#[async_trait]
impl KvBucket for GatedBucket {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        self.gate.pass().await;
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        self.gate.pass().await;
        self.inner.put(key, value).await
    }
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        self.gate.pass().await;
        self.inner.create(key, value).await
    }
    async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, StoreError> {
        self.gate.pass().await;
        self.inner.update(key, value, expected).await
    }
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<(), StoreError> {
        self.gate.pass().await;
        self.inner.delete(key, expected).await
    }
    async fn watch(&self) -> Result<BoxStream<'static, KvChange>, StoreError> {
        self.gate.pass().await;
        let gate = self.gate.clone();
        let s = self.inner.watch().await?;
        Ok(s.then(move |c| {
            let gate = gate.clone();
            async move {
                gate.pass().await;
                c
            }
        })
        .boxed())
    }
}

// ---- a device that logs which node drives it ----------------------------------

type Log = Arc<Mutex<Vec<(Instant, String, &'static str, String)>>>;

struct ProbeKind {
    node: String,
    log: Log,
}

struct Probe {
    node: String,
    id: String,
    log: Log,
}

impl Probe {
    fn note(&self, what: &'static str) {
        self.log
            .lock()
            .unwrap()
            .push((Instant::now(), self.node.clone(), what, self.id.clone()));
    }
}

impl Kind for ProbeKind {
    fn name(&self) -> &str {
        "probe"
    }
    fn create(&self, id: &str, _config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        Ok(Arc::new(Probe {
            node: self.node.clone(),
            id: id.to_string(),
            log: self.log.clone(),
        }))
    }
}

#[async_trait]
impl Workload for Probe {
    async fn init(&self) -> Result<(), WorkloadError> {
        self.note("init");
        Ok(())
    }
    async fn ping(&self) -> Result<(), WorkloadError> {
        self.note("ping");
        Ok(())
    }
    async fn run_task(&self, _task: &Task) -> Result<Value, TaskError> {
        self.note("task");
        Ok(Value::Null)
    }
    async fn stop(&self) -> Result<(), WorkloadError> {
        self.note("stop");
        Ok(())
    }
}

/// Node A drove a device, then B did, then A again without stopping or
/// re-initialising it in between: two nodes drove it at once.
fn double_runs(log: &[(Instant, String, &'static str, String)]) -> Vec<String> {
    let mut by_id: HashMap<&str, Vec<&(Instant, String, &'static str, String)>> = HashMap::new();
    for e in log {
        by_id.entry(&e.3).or_default().push(e);
    }
    let mut bad = vec![];
    for (id, events) in by_id {
        let mut current: Option<&str> = None;
        let mut interrupted: HashSet<&str> = HashSet::new();
        for (t, node, what, _) in events {
            if *what == "stop" {
                interrupted.remove(node.as_str());
                if current == Some(node.as_str()) {
                    current = None;
                }
                continue;
            }
            if *what == "init" {
                interrupted.remove(node.as_str());
            }
            if interrupted.contains(node.as_str()) {
                bad.push(format!(
                    "{id}: {node} drove it again at {t:?} after another node took over"
                ));
            }
            if let Some(q) = current {
                if q != node {
                    interrupted.insert(q);
                }
            }
            current = Some(node);
        }
    }
    bad
}

// ---- the scenario --------------------------------------------------------------

struct SimNode {
    id: String,
    cluster: Option<Cluster>,
    gate: Gate,
    /// Virtual time at which a partition heals.
    heal_at: Option<Instant>,
}

async fn start(
    id: &str,
    store: &MemoryStore,
    transport: &MemoryTransport,
    log: &Log,
    gate: &Gate,
) -> Cluster {
    let cfg = NodeConfig {
        ping_splay_min: Duration::from_millis(700),
        ping_splay_max: Duration::from_millis(1300),
        ..Default::default()
    };
    let builder = Node::builder().config(cfg).node_id(id).kind(ProbeKind {
        node: id.to_string(),
        log: log.clone(),
    });
    Cluster::start(
        builder,
        Arc::new(GatedStore {
            inner: store.clone(),
            gate: gate.clone(),
        }),
        Arc::new(transport.clone()),
        ClusterConfig {
            unclaimed_grace: Duration::from_secs(12),
            ..Default::default()
        },
    )
    .await
    .expect("node starts")
}

/// Starts a node behind a fresh (open) gate.
async fn join(id: &str, store: &MemoryStore, transport: &MemoryTransport, log: &Log) -> SimNode {
    let gate = Gate::new();
    let c = start(id, store, transport, log, &gate).await;
    SimNode {
        id: id.to_string(),
        cluster: Some(c),
        gate,
        heal_at: None,
    }
}

async fn run_seed(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let store = MemoryStore::new();
    let transport = MemoryTransport::new();
    let log: Log = Arc::default();
    let subjects = Subjects::default();
    let specs = store
        .bucket(&subjects.workloads_bucket_spec(1))
        .await
        .unwrap();
    let state = store.bucket(&subjects.state_bucket_spec()).await.unwrap();
    let n_specs = rng.gen_range(10..40);
    let mut ids: Vec<String> = (0..n_specs).map(|i| format!("w{i}")).collect();
    for id in &ids {
        specs
            .put(id, Bytes::from(json!({"kind": "probe"}).to_string()))
            .await
            .unwrap();
    }
    let mut nodes: Vec<SimNode> = vec![];
    let mut next_id = 0;
    for _ in 0..rng.gen_range(2..4) {
        let id = format!("n{next_id}");
        next_id += 1;
        nodes.push(join(&id, &store, &transport, &log).await);
    }
    // Faults.
    for _ in 0..rng.gen_range(6..14) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..8000))).await;
        let now = Instant::now();
        for n in nodes.iter_mut() {
            if n.heal_at.is_some_and(|t| t <= now) {
                n.gate.set(true);
                n.heal_at = None;
            }
        }
        let alive: Vec<usize> = (0..nodes.len())
            .filter(|i| nodes[*i].cluster.is_some())
            .collect();
        match rng.gen_range(0..6) {
            0 if nodes.len() < 7 => {
                let id = format!("n{next_id}");
                next_id += 1;
                nodes.push(join(&id, &store, &transport, &log).await);
            }
            1 if alive.len() > 1 => {
                let i = alive[rng.gen_range(0..alive.len())];
                if let Some(c) = nodes[i].cluster.take() {
                    c.crash().await;
                }
            }
            2 => {
                // Restart a crashed node under its old id.
                if let Some(i) = (0..nodes.len()).find(|i| nodes[*i].cluster.is_none()) {
                    nodes[i].gate.set(true);
                    nodes[i].heal_at = None;
                    let c = start(
                        &nodes[i].id.clone(),
                        &store,
                        &transport,
                        &log,
                        &nodes[i].gate,
                    )
                    .await;
                    nodes[i].cluster = Some(c);
                }
            }
            3 if !alive.is_empty() => {
                let i = alive[rng.gen_range(0..alive.len())];
                nodes[i].gate.set(false);
                nodes[i].heal_at = Some(now + Duration::from_millis(rng.gen_range(1000..15000)));
            }
            4 => {
                let id = ids.swap_remove(rng.gen_range(0..ids.len()));
                specs.delete(&id, None).await.unwrap();
                if rng.gen_bool(0.5) {
                    specs
                        .put(&id, Bytes::from(json!({"kind": "probe"}).to_string()))
                        .await
                        .unwrap();
                    ids.push(id);
                }
            }
            _ => {
                // A clean, draining leave.
                if alive.len() > 1 {
                    let i = alive[rng.gen_range(0..alive.len())];
                    if nodes[i].heal_at.is_none() {
                        if let Some(c) = nodes[i].cluster.take() {
                            c.drain(Duration::from_secs(20)).await;
                        }
                    }
                }
            }
        }
    }
    // Heal everything, make sure someone is alive, and let it settle.
    for n in nodes.iter_mut() {
        n.gate.set(true);
        n.heal_at = None;
    }
    if nodes.iter().all(|n| n.cluster.is_none()) {
        nodes.push(join("late", &store, &transport, &log).await);
    }
    // Converged = every spec runs on exactly one live node, named as owner
    // in a `running` state record. Poll (virtual time) to a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match converged(&nodes, &ids, &*state).await {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let bad = double_runs(&log.lock().unwrap());
    if !bad.is_empty() {
        return Err(format!("double runs: {:?}", &bad[..bad.len().min(3)]));
    }
    for n in nodes {
        if let Some(c) = n.cluster {
            c.crash().await;
        }
    }
    Ok(())
}

async fn converged(nodes: &[SimNode], ids: &[String], state: &dyn KvBucket) -> Result<(), String> {
    let mut runner: BTreeMap<String, String> = BTreeMap::new();
    for c in nodes.iter().filter_map(|n| n.cluster.as_ref()) {
        for id in c.node().workload_ids() {
            if let Some(other) = runner.insert(id.clone(), c.node().id().to_string()) {
                return Err(format!("{id} runs on {other} and {}", c.node().id()));
            }
        }
    }
    let want: Vec<&String> = {
        let mut v: Vec<&String> = ids.iter().collect();
        v.sort();
        v
    };
    if runner.keys().collect::<Vec<_>>() != want {
        return Err(format!(
            "not converged: want {} workloads, running {}",
            want.len(),
            runner.len()
        ));
    }
    for (id, node) in &runner {
        let e = state
            .get(id)
            .await
            .unwrap()
            .ok_or(format!("{id} has no state"))?;
        let v: Value = serde_json::from_slice(&e.value).unwrap();
        if v["owner"] != node.as_str() || v["status"] != "running" {
            return Err(format!("{id} runs on {node} but state says {v}"));
        }
    }
    Ok(())
}

fn run_seeds(seeds: Vec<u64>) -> Vec<(u64, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let mut failures = vec![];
    for seed in seeds {
        if let Err(e) =
            rt.block_on(async { tokio::task::LocalSet::new().run_until(run_seed(seed)).await })
        {
            failures.push((seed, e));
        }
    }
    failures
}

#[test]
fn cluster_protocol_holds_under_random_faults() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .try_init();
    let seeds: Vec<u64> = match std::env::var("OTTOMATO_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("OTTOMATO_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("OTTOMATO_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000);
            (0..n).collect()
        }
    };
    let total = seeds.len();
    let started = std::time::Instant::now();
    // Two threads, each its own single-threaded runtime with a paused clock.
    let (a, b): (Vec<u64>, Vec<u64>) = seeds.iter().partition(|s| *s % 2 == 0);
    let ta = std::thread::spawn(move || run_seeds(a));
    let mut failures = run_seeds(b);
    failures.extend(ta.join().unwrap());
    eprintln!("{total} seeds in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {total} seeds failed; first: {:?} (replay with OTTOMATO_SIM_SEED=<seed>)",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
