//! Cluster mode: nodes that discover each other and claim workloads through
//! three KV buckets, with tasks as request/reply on per-workload subjects.
//!
//! ```text
//!  <prefix>_nodes      membership: heartbeat re-put, TTL expiry with markers
//!  <prefix>_workloads  desired state: specs written by operators
//!  <prefix>_state      claims + status: create-if-absent, then CAS by the owner
//!
//!  Coordinator (one task per node)
//!    watches all three buckets ──▶ view (live nodes, specs, claims)
//!    reconcile(view):
//!      unclaimed & placement says me        → create claim   → start actor
//!      claimed by a node that is gone & me  → CAS takeover   → start actor
//!      mine & placement says someone else   → release (stop actor, delete claim)
//!      mine & spec gone / changed           → stop, delete claim
//!    a claim of mine rewritten by another  → fence (stop the actor first)
//! ```
//!
//! **Architecture Invariant:** an actor is started only after this node's
//! create or CAS on the workload's state key succeeded, and a workload is
//! released by stopping its actor *before* deleting the key. So at any
//! instant at most one node both holds the key and runs the actor.
//!
//! **Architecture Invariant:** the coordinator talks to storage and transport
//! only through [`KvBucket`] and [`Transport`]: it runs the same on NATS and
//! on the in-memory backend.

use std::collections::BTreeMap;

// Fx hashing for the coordinator's maps of workload ids: several lookups per
// spec per reconcile, and ids come from operators, not from attackers.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::Event;
use crate::spec::{validate_id, WorkloadSpec};
use crate::store::{KvBucket, KvChange, StateStore, StoreError};
use crate::subjects::Subjects;
use crate::transport::{Message, Transport};
use crate::wire::{NodeInfo, StateRecord};
use crate::{Node, NodeBuilder, NodeError, Status};

pub(crate) mod placement;

/// A workload taken by the grace rule stays for this many grace periods
/// before placement may move it to its (apparently not claiming) owner again.
const GRACE_HOLD_FACTOR: u32 = 10;

/// How a node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How often the node re-puts its membership entry.
    pub heartbeat: Duration,
    /// How long a membership entry lives without a heartbeat.
    pub node_ttl: Duration,
    /// Availability zone of this node.
    pub zone: Option<String>,
    /// Labels of this node.
    pub labels: BTreeMap<String, String>,
    /// Most workloads this node takes (advertised; enforced by placement).
    pub capacity: Option<u32>,
    /// Relative share of workloads (1.0 by default).
    pub weight: f64,
    /// Copies of each bucket kept by a NATS cluster (1, or 3 with 3 servers).
    pub replicas: usize,
    /// Claims in flight at once.
    pub claim_concurrency: usize,
    /// Workloads being handed over to another node at once (rebalance).
    pub max_handoffs: usize,
    /// Shortest time between two full reconciliations.
    pub reconcile_min_interval: Duration,
    /// A workload left unclaimed (or with a gone owner) this long may be
    /// claimed by any eligible node, whatever placement says.
    pub unclaimed_grace: Duration,
    /// After joining, wait this long (seeing who else is joining) before the
    /// first claims, so nodes started together don't all grab everything.
    pub join_settle: Duration,
    /// Hand a workload that has been `dead` here this long to another node
    /// (preferably in another zone) to try; `None`: keep it (the default).
    pub move_dead_after: Option<Duration>,
    /// How many times one workload may be handed on for being dead.
    pub max_moves: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat: Duration::from_secs(1),
            node_ttl: Duration::from_secs(5),
            zone: None,
            labels: BTreeMap::new(),
            capacity: None,
            weight: 1.0,
            replicas: 1,
            claim_concurrency: 1024,
            max_handoffs: 64,
            reconcile_min_interval: Duration::from_millis(50),
            unclaimed_grace: Duration::from_secs(15),
            join_settle: Duration::from_millis(1500),
            move_dead_after: None,
            max_moves: 2,
        }
    }
}

impl ClusterConfig {
    /// How much earlier than the server's expiry of our entry we stop
    /// touching devices: the lease is `heartbeat sent + TTL - margin`.
    pub fn lease_margin(&self) -> Duration {
        self.heartbeat.max(self.node_ttl / 5)
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_margin() >= self.node_ttl {
            return Err("node TTL too short for a lease".into());
        }
        if self.heartbeat.is_zero() || self.node_ttl < self.heartbeat * 2 {
            return Err(format!(
                "node TTL ({:?}) must be at least twice the heartbeat ({:?})",
                self.node_ttl, self.heartbeat
            ));
        }
        if self.node_ttl < Duration::from_secs(1) {
            return Err("node TTL must be at least 1 s (the KV expiry resolution)".into());
        }
        if !(self.weight > 0.0 && self.weight.is_finite()) {
            return Err("weight must be a positive number".into());
        }
        if self.claim_concurrency == 0 || self.max_handoffs == 0 {
            return Err("claim_concurrency and max_handoffs must be at least 1".into());
        }
        Ok(())
    }
}

/// A node taking part in a cluster. Dropping it without [`Cluster::stop`]
/// is like a crash: its entries expire and others take over.
pub struct Cluster {
    node: Node,
    stop: watch::Sender<bool>,
    coordinator: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    nodes: Arc<dyn KvBucket>,
    info: Arc<std::sync::Mutex<NodeInfo>>,
    kick: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish()
    }
}

fn backend(e: StoreError) -> NodeError {
    NodeError::Backend(e.to_string())
}

impl Cluster {
    /// Starts a node on `store` and `transport`, registers it in the
    /// membership bucket and starts claiming workloads.
    pub async fn start(
        builder: NodeBuilder,
        store: Arc<dyn StateStore>,
        transport: Arc<dyn Transport>,
        cfg: ClusterConfig,
    ) -> Result<Cluster, NodeError> {
        cfg.validate().map_err(NodeError::InvalidSettings)?;
        let node = builder
            .state_store(store.clone())
            .transport(transport.clone())
            .state_replicas(cfg.replicas)
            .start()
            .await?;
        let subjects = node.subjects().clone();
        let workloads = open_bucket(&*store, &subjects.workloads_bucket_spec(cfg.replicas)).await?;
        let nodes = open_bucket(
            &*store,
            &subjects.nodes_bucket_spec(cfg.node_ttl, cfg.replicas),
        )
        .await?;
        let state = open_bucket(&*store, &subjects.state_bucket_spec_with(cfg.replicas)).await?;
        let me = node.id().to_string();
        let info = NodeInfo {
            id: me.clone(),
            zone: cfg.zone.clone(),
            labels: cfg.labels.clone(),
            capacity: cfg.capacity,
            weight: cfg.weight,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: SystemTime::now(),
            load: 0,
            draining: false,
        };
        // Register before claiming anything: others must see us alive first.
        let sent = Instant::now();
        nodes.put(&me, json_bytes(&info)).await.map_err(backend)?;
        node.renew_lease(sent + cfg.node_ttl - cfg.lease_margin());
        let shared_info = Arc::new(std::sync::Mutex::new(info.clone()));
        let kick = Arc::new(tokio::sync::Notify::new());
        let heartbeat = tokio::spawn(heartbeat_loop(
            node.clone(),
            nodes.clone(),
            shared_info.clone(),
            kick.clone(),
            cfg.clone(),
        ));
        let (stop, stop_rx) = watch::channel(false);
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let mut live = BTreeMap::new();
        live.insert(me.clone(), info);
        let coordinator = Coordinator {
            me,
            node: node.clone(),
            cfg,
            subjects,
            transport,
            workloads,
            nodes: nodes.clone(),
            state,
            live,
            specs: HashMap::default(),
            claims: HashMap::default(),
            assignment: placement::Assignment::default(),
            view_gen: 1,
            assignment_gen: 0,
            unclaimed_since: HashMap::default(),
            dead_since: HashMap::default(),
            grace_held: HashMap::default(),
            joined: Instant::now(),
            synced: [false; 3],
            replayed: [None, None, None],
            pending: HashSet::default(),
            releasing: HashSet::default(),
            running_rev: HashMap::default(),
            failed_rev: HashMap::default(),
            results_tx,
        };
        let coordinator = tokio::spawn(coordinator.run(stop_rx, results_rx));
        tracing::info!(node = node.id(), "joined cluster");
        Ok(Cluster {
            node,
            stop,
            coordinator,
            heartbeat,
            nodes,
            info: shared_info,
            kick,
        })
    }

    /// The node: its workloads, tasks and events.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Leaves cleanly: stops claiming, stops every workload and deletes its
    /// claims, then deletes the membership entry, so the others take over at once.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.coordinator.await;
        self.node.stop().await;
        self.heartbeat.abort();
        if let Err(e) = self.nodes.delete(self.node.id(), None).await {
            tracing::warn!(error = %e, "could not delete membership entry; it will expire");
        }
        tracing::info!(node = self.node.id(), "left cluster");
    }

    /// Drains, then leaves: marks the node draining so placement moves every
    /// workload elsewhere (at most `max_handoffs` at a time, each new owner
    /// claiming as soon as its key is released), waits until none is left or
    /// `timeout` passes, then stops cleanly.
    pub async fn drain(self, timeout: Duration) {
        if let Ok(mut i) = self.info.lock() {
            i.draining = true;
        }
        self.kick.notify_one();
        tracing::info!(
            node = self.node.id(),
            workloads = self.node.len(),
            "draining"
        );
        let deadline = Instant::now() + timeout;
        while !self.node.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop().await;
    }

    /// Simulates a crash (for tests and simulations): heartbeats and
    /// coordination stop, every actor stops, nothing is released or written —
    /// the others find out only when the membership entry expires.
    #[doc(hidden)]
    pub async fn crash(self) {
        self.heartbeat.abort();
        self.coordinator.abort();
        for id in self.node.workload_ids() {
            self.node.fence_workload(&id, "crashed".into());
        }
        // Fenced workloads write nothing; this only tears the node down.
        self.node.stop().await;
    }
}

fn json_bytes<T: serde::Serialize>(v: &T) -> Bytes {
    // Our wire types are plain strings, numbers and maps: they always serialise.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// Opens a bucket, retrying while the backend is not ready (a NATS cluster
/// still electing its JetStream leader answers "no suitable peers" for a while).
async fn open_bucket(
    store: &dyn StateStore,
    spec: &crate::store::BucketSpec,
) -> Result<Arc<dyn KvBucket>, NodeError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.bucket(spec).await {
            Ok(b) => return Ok(b),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(bucket = %spec.name, error = %e, "bucket not ready; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

/// Re-puts the membership entry every heartbeat and keeps the lease: the
/// node may touch devices only until `heartbeat sent + TTL - margin` of the
/// last acknowledged put. When the lease has run out (the process was frozen,
/// or NATS unreachable), every workload is fenced before anything else.
async fn heartbeat_loop(
    node: Node,
    nodes: Arc<dyn KvBucket>,
    info: Arc<std::sync::Mutex<NodeInfo>>,
    kick: Arc<tokio::sync::Notify>,
    cfg: ClusterConfig,
) {
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = kick.notified() => {}
        }
        if !node.lease_valid() && !node.is_empty() {
            fence_all(&node);
        }
        let value = match info.lock() {
            Ok(mut i) => {
                i.load = node.len() as u64;
                json_bytes(&*i)
            }
            Err(_) => continue,
        };
        let sent = Instant::now();
        match tokio::time::timeout(cfg.node_ttl, nodes.put(node.id(), value)).await {
            Ok(Ok(_)) => {
                // Renew only from an unbroken lease: an ack that comes back
                // after the lease ran out may have landed after our old entry
                // expired and others took our workloads. Then every actor must
                // be gone before the node may touch a device again.
                if node.lease_valid() || node.is_empty() {
                    node.renew_lease(sent + cfg.node_ttl - cfg.lease_margin());
                } else {
                    fence_all(&node);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out"),
        }
    }
}

fn fence_all(node: &Node) {
    tracing::error!(
        workloads = node.len(),
        "lease expired (paused or cut off longer than the TTL allows): fencing every workload"
    );
    for id in node.workload_ids() {
        node.fence_workload(&id, "claim lost: node lease expired".into());
    }
}

/// A watch that re-subscribes when its stream ends (connection trouble, a
/// lagging watcher). `None` marks the start of each subscription: a full
/// replay follows, ending with `Synced`, and anything not replayed is gone.
fn resilient_watch(
    bucket: Arc<dyn KvBucket>,
    name: String,
) -> BoxStream<'static, Option<KvChange>> {
    futures::stream::unfold(
        (bucket, None::<BoxStream<'static, KvChange>>, name),
        |(bucket, mut current, name)| async move {
            loop {
                if let Some(s) = current.as_mut() {
                    if let Some(c) = s.next().await {
                        return Some((Some(c), (bucket, current, name)));
                    }
                    tracing::warn!(bucket = %name, "watch ended; re-watching");
                    current = None;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                match bucket.watch().await {
                    Ok(s) => {
                        current = Some(s);
                        return Some((None, (bucket, current, name)));
                    }
                    Err(e) => {
                        tracing::warn!(bucket = %name, error = %e, "cannot watch; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        },
    )
    .boxed()
}

enum Input {
    Spec(Option<KvChange>),
    Node(Option<KvChange>),
    State(Option<KvChange>),
}

struct SpecEntry {
    revision: u64,
    spec: Result<WorkloadSpec, String>,
}

struct Claim {
    owner: String,
    revision: u64,
    /// Nodes the device was dead from, and how often it was handed on.
    avoid: Vec<String>,
    moves: u32,
}

enum ClaimKind {
    /// Create the key (it is absent).
    Create,
    /// CAS from this revision (our own stale claim, or a gone owner's).
    Replace(u64),
    /// Create an ownerless `unplaceable` record with this reason.
    Unplaceable(String),
}

struct ClaimResult {
    id: String,
    spec_revision: u64,
    avoid: Vec<String>,
    moves: u32,
    /// `Err(reason)`: the spec is unusable and the claim records `failed`.
    failed: Option<String>,
    /// The record written was an ownerless `unplaceable` one.
    unplaceable: bool,
    result: Result<u64, StoreError>,
}

struct Coordinator {
    me: String,
    node: Node,
    cfg: ClusterConfig,
    subjects: Subjects,
    transport: Arc<dyn Transport>,
    workloads: Arc<dyn KvBucket>,
    nodes: Arc<dyn KvBucket>,
    state: Arc<dyn KvBucket>,
    /// Live nodes (membership entries present), us included.
    live: BTreeMap<String, NodeInfo>,
    specs: HashMap<String, SpecEntry>,
    claims: HashMap<String, Claim>,
    /// Where placement puts each workload, for view `assignment_gen`.
    assignment: placement::Assignment,
    /// Bumped whenever an input of placement changes.
    view_gen: u64,
    assignment_gen: u64,
    /// Since when each workload has had no claim by a live node.
    unclaimed_since: HashMap<String, Instant>,
    /// Since when each local workload has been dead.
    dead_since: HashMap<String, Instant>,
    /// Workloads we took by the grace rule, and when: placement may move
    /// them away again only after `GRACE_HOLD_FACTOR` grace periods.
    grace_held: HashMap<String, Instant>,
    joined: Instant,
    /// Specs, nodes, state: each watch has replayed its bucket.
    synced: [bool; 3],
    /// Keys seen since each watch (re)started, until its `Synced`.
    replayed: [Option<HashSet<String>>; 3],
    /// Claims in flight.
    pending: HashSet<String>,
    /// Workloads we are handing over; until their claim's delete is seen.
    releasing: HashSet<String>,
    /// The spec revision each local workload runs.
    running_rev: HashMap<String, u64>,
    /// Spec revisions this node could not run (unknown kind, bad config):
    /// not retried until the spec changes.
    failed_rev: HashMap<String, u64>,
    results_tx: mpsc::UnboundedSender<ClaimResult>,
}

impl Coordinator {
    async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut results: mpsc::UnboundedReceiver<ClaimResult>,
    ) {
        let mut inputs = futures::stream::select_all([
            resilient_watch(self.workloads.clone(), self.subjects.workloads_bucket())
                .map(Input::Spec)
                .boxed(),
            resilient_watch(self.nodes.clone(), self.subjects.nodes_bucket())
                .map(Input::Node)
                .boxed(),
            resilient_watch(self.state.clone(), self.subjects.state_bucket())
                .map(Input::State)
                .boxed(),
        ]);
        let mut events = self.node.subscribe();
        let mut safety = tokio::time::interval(Duration::from_secs(1));
        let mut dirty = false;
        let mut last = Instant::now() - self.cfg.reconcile_min_interval;
        loop {
            let due = last + self.cfg.reconcile_min_interval;
            tokio::select! {
                _ = stop.changed() => return,
                Some(input) = inputs.next() => {
                    self.apply(input);
                    // Take everything already buffered before reconciling.
                    for _ in 0..4096 {
                        match inputs.next().now_or_never() {
                            Some(Some(input)) => self.apply(input),
                            _ => break,
                        }
                    }
                    dirty = true;
                }
                Some(r) = results.recv() => {
                    self.on_claimed(r).await;
                    dirty = true;
                }
                ev = events.recv() => match ev {
                    Ok(e) => {
                        match &e {
                            Event::Dead { workload, .. } => {
                                self.dead_since.insert(workload.to_string(), Instant::now());
                            }
                            Event::Reachable { workload }
                            | Event::Deleted { workload }
                            | Event::Initialized { workload } => {
                                self.dead_since.remove(&**workload);
                            }
                            _ => {}
                        }
                        self.publish_event(&e).await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event publisher fell behind");
                    }
                    Err(_) => return,
                },
                _ = safety.tick() => dirty = true,
                _ = tokio::time::sleep_until(due), if dirty => {}
            }
            if dirty && self.synced.iter().all(|s| *s) && Instant::now() >= due {
                let started = Instant::now();
                self.reconcile();
                dirty = false;
                // A reconcile scans every spec: with many, space them so
                // they take at most a third of the time (claims go in batches).
                last = Instant::now() + (Instant::now() - started) * 2;
            }
        }
    }

    fn apply(&mut self, input: Input) {
        let (which, change) = match input {
            Input::Spec(c) => (0, c),
            Input::Node(c) => (1, c),
            Input::State(c) => (2, c),
        };
        tracing::trace!(bucket = which, change = ?change, "input");
        let Some(change) = change else {
            // A (re)started watch: replay follows.
            self.synced[which] = false;
            self.replayed[which] = Some(HashSet::default());
            return;
        };
        match &change {
            KvChange::Put(e) => {
                if let Some(seen) = &mut self.replayed[which] {
                    seen.insert(e.key.clone());
                }
            }
            KvChange::Delete { key, .. } => {
                if let Some(seen) = &mut self.replayed[which] {
                    seen.insert(key.clone());
                }
            }
            KvChange::Synced => {
                self.synced[which] = true;
                if let Some(seen) = self.replayed[which].take() {
                    self.forget_unseen(which, &seen);
                }
                return;
            }
        }
        let input = match which {
            0 => Input::Spec(Some(change)),
            1 => Input::Node(Some(change)),
            _ => Input::State(Some(change)),
        };
        self.apply_change(input);
    }

    /// After a replay: what was not replayed no longer exists.
    fn forget_unseen(&mut self, which: usize, seen: &HashSet<String>) {
        match which {
            0 => {
                let before = self.specs.len();
                self.specs.retain(|k, _| seen.contains(k));
                if self.specs.len() != before {
                    self.view_gen += 1;
                }
            }
            1 => {
                let me = self.me.clone();
                let before = self.live.len();
                self.live.retain(|k, _| *k == me || seen.contains(k));
                if self.live.len() != before {
                    self.view_gen += 1;
                }
            }
            _ => {
                let gone: Vec<String> = self
                    .claims
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    // Same as a delete we did not see.
                    let revision = self.claims.get(&key).map_or(0, |c| c.revision);
                    self.apply_change(Input::State(Some(KvChange::Delete { key, revision })));
                }
            }
        }
    }

    fn apply_change(&mut self, input: Input) {
        match input {
            Input::Spec(None) | Input::Node(None) | Input::State(None) => {}
            Input::Spec(Some(KvChange::Synced))
            | Input::Node(Some(KvChange::Synced))
            | Input::State(Some(KvChange::Synced)) => {}
            Input::Spec(Some(KvChange::Put(e))) => {
                let spec = parse_spec(&e.key, &e.value);
                if let Err(reason) = &spec {
                    tracing::warn!(workload = %e.key, %reason, "unusable spec");
                }
                self.specs.insert(
                    e.key,
                    SpecEntry {
                        revision: e.revision,
                        spec,
                    },
                );
                self.view_gen += 1;
            }
            Input::Spec(Some(KvChange::Delete { key, .. })) => {
                self.specs.remove(&key);
                self.view_gen += 1;
            }
            Input::Node(Some(KvChange::Put(e))) => {
                let info = serde_json::from_slice::<NodeInfo>(&e.value).unwrap_or_else(|_| {
                    // Unreadable (newer version?): still a live node, default share.
                    NodeInfo {
                        id: e.key.clone(),
                        zone: None,
                        labels: BTreeMap::new(),
                        capacity: None,
                        weight: 1.0,
                        version: "?".into(),
                        started: SystemTime::UNIX_EPOCH,
                        load: 0,
                        draining: false,
                    }
                });
                let changed = self
                    .live
                    .get(&e.key)
                    .is_none_or(|old| old.placement_key() != info.placement_key());
                if changed {
                    self.view_gen += 1;
                }
                self.live.insert(e.key, info);
            }
            Input::Node(Some(KvChange::Delete { key, .. })) => {
                if key == self.me {
                    // Our entry expired (we were too slow to heartbeat): the
                    // heartbeat task re-puts it; others may take over our
                    // workloads meanwhile and our CAS writes then fence us.
                    tracing::warn!("own membership entry expired");
                } else {
                    tracing::info!(node = %key, "node left");
                    self.live.remove(&key);
                    self.view_gen += 1;
                }
            }
            Input::State(Some(KvChange::Put(e))) => {
                if self
                    .claims
                    .get(&e.key)
                    .is_some_and(|c| c.revision > e.revision)
                {
                    return; // older than what we know
                }
                let (owner, avoid, moves) = serde_json::from_slice::<StateRecord>(&e.value)
                    .map(|r| (r.owner, r.avoid, r.moves))
                    .unwrap_or_else(|_| ("?".into(), Vec::new(), 0));
                if self
                    .claims
                    .get(&e.key)
                    .map_or(!avoid.is_empty(), |c| c.avoid != avoid)
                {
                    self.view_gen += 1; // placement avoids these nodes now
                }
                if owner != self.me {
                    self.releasing.remove(&e.key); // a handover we made has landed
                }
                if owner != self.me && self.node.has_workload(&e.key) {
                    self.node.fence_workload(
                        &e.key,
                        format!("claim lost: node {owner} now owns the workload"),
                    );
                    self.running_rev.remove(&e.key);
                }
                self.claims.insert(
                    e.key,
                    Claim {
                        owner,
                        revision: e.revision,
                        avoid,
                        moves,
                    },
                );
            }
            Input::State(Some(KvChange::Delete { key, revision })) => {
                if self.claims.get(&key).is_some_and(|c| c.revision > revision) {
                    return;
                }
                self.claims.remove(&key);
                self.releasing.remove(&key);
                if self.node.has_workload(&key)
                    && self
                        .node
                        .workload(&key)
                        .is_some_and(|w| w.status != Status::Stopping)
                {
                    self.node.fence_workload(
                        &key,
                        "claim lost: state key deleted by someone else".into(),
                    );
                    self.running_rev.remove(&key);
                }
            }
        }
    }

    fn reconcile(&mut self) {
        if !self.node.lease_valid() {
            return; // no claims and no moves until our lease is back
        }
        if self.assignment_gen != self.view_gen {
            let none = crate::spec::Placement::default();
            let claims = &self.claims;
            self.assignment = placement::assign(
                &self.live,
                self.specs.iter().map(|(id, e)| {
                    (
                        id.as_str(),
                        e.spec.as_ref().map_or(&none, |s| &s.placement),
                        claims.get(id).map_or(&[][..], |c| &c.avoid[..]),
                    )
                }),
            );
            self.assignment_gen = self.view_gen;
        }
        tracing::debug!(
            specs = self.specs.len(),
            live = self.live.len(),
            claims = self.claims.len(),
            pending = self.pending.len(),
            releasing = self.releasing.len(),
            "reconcile"
        );
        let local: HashSet<String> = self.node.workload_ids().into_iter().collect();
        let mut handoffs = self.releasing.len();
        // Local workloads dead here for long: let another node try.
        if let Some(after) = self.cfg.move_dead_after {
            let due: Vec<String> = self
                .dead_since
                .iter()
                .filter(|(id, t)| {
                    t.elapsed() >= after && local.contains(*id) && !self.releasing.contains(*id)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                if handoffs >= self.cfg.max_handoffs {
                    break;
                }
                if self.hand_on_dead(&id) {
                    handoffs += 1;
                }
            }
        }
        // Local workloads: spec gone or changed, or placed elsewhere now.
        for id in &local {
            if self.releasing.contains(id) {
                continue;
            }
            let why = match self.specs.get(id) {
                None => Some("spec deleted".to_string()),
                Some(s) if self.running_rev.get(id).is_some_and(|r| *r != s.revision) => {
                    Some("spec changed".to_string())
                }
                Some(_)
                    if self.grace_held.get(id).is_some_and(|t| {
                        t.elapsed() < self.cfg.unclaimed_grace * GRACE_HOLD_FACTOR
                    }) =>
                {
                    None
                }
                Some(_) => match self.assignment.get(id) {
                    Some(Ok(o)) if *o != self.me && handoffs < self.cfg.max_handoffs => {
                        handoffs += 1;
                        Some(format!("placement moved it to {o}"))
                    }
                    Some(Err(reason)) if handoffs < self.cfg.max_handoffs => {
                        handoffs += 1;
                        Some(format!("cannot run here: {reason}"))
                    }
                    _ => None,
                },
            };
            if let Some(why) = why {
                tracing::info!(node = %self.me, workload = %id, reason = %why, "releasing");
                match self.node.delete_workload(id) {
                    Ok(()) => {
                        self.releasing.insert(id.clone());
                        self.running_rev.remove(id);
                        self.publish_cluster_event(id, "released", &why);
                    }
                    Err(e) => {
                        tracing::warn!(node = %self.me, workload = %id, error = %e, status = ?self.node.workload(id).map(|w| (w.status, w.reason)), "release failed")
                    }
                }
            }
        }
        let settled = self.joined.elapsed() >= self.cfg.join_settle;
        let me_info = self.live.get(&self.me).cloned();
        let my_room = me_info
            .as_ref()
            .and_then(|i| i.capacity)
            .map_or(usize::MAX, |c| c as usize)
            .saturating_sub(local.len() + self.pending.len());
        let bookkeeper = self
            .live
            .iter()
            .find(|(_, n)| !n.draining)
            .is_some_and(|(id, _)| *id == self.me);
        let now = Instant::now();
        // Specs: claim what placement gives us.
        let mut to_claim = Vec::new();
        let mut to_release = Vec::new();
        let mut graced: Vec<String> = Vec::new();
        let room = self
            .cfg
            .claim_concurrency
            .saturating_sub(self.pending.len());
        for (id, entry) in &self.specs {
            if to_claim.len() >= room {
                break; // the rest after some claims complete
            }
            // Fast path, most specs most of the time: held by another live
            // node. Nothing to do but wait (for a handover, if placement
            // moved it to us) — the same outcome as the full checks below.
            if self
                .claims
                .get(id)
                .is_some_and(|c| c.owner != self.me && self.live.contains_key(&c.owner))
            {
                self.unclaimed_since.remove(id);
                continue;
            }
            if self.pending.contains(id) || local.contains(id) || self.releasing.contains(id) {
                // Held (or changing hands through us): not stranded.
                self.unclaimed_since.remove(id);
                continue;
            }
            let target = self.assignment.get(id);
            let mine = matches!(target, Some(Ok(o)) if *o == self.me);
            let claim = self.claims.get(id);
            let orphan = claim.is_none_or(|c| !self.live.contains_key(&c.owner));
            let orphan_for = if orphan {
                // (no key clone unless it is new: this runs for every spec)
                match self.unclaimed_since.get(id) {
                    Some(t) => now - *t,
                    None => {
                        self.unclaimed_since.insert(id.clone(), now);
                        Duration::ZERO
                    }
                }
            } else {
                self.unclaimed_since.remove(id);
                Duration::ZERO
            };
            // Any eligible node may take a workload nobody has held for long.
            let grace = settled
                && orphan_for >= self.cfg.unclaimed_grace
                && my_room > to_claim.len()
                && me_info.as_ref().is_some_and(|i| {
                    placement::eligible(
                        i,
                        entry
                            .spec
                            .as_ref()
                            .map_or(&Default::default(), |s| &s.placement),
                    )
                });
            let already_failed = self.failed_rev.get(id) == Some(&entry.revision);
            let kind = match claim {
                None if (mine && settled) || grace => {
                    if already_failed {
                        continue;
                    }
                    ClaimKind::Create
                }
                None => {
                    if let (Some(Err(reason)), true) = (target, bookkeeper && settled) {
                        to_claim.push((
                            id.clone(),
                            entry.revision,
                            ClaimKind::Unplaceable(reason.clone()),
                            entry.spec.clone(),
                        ));
                    }
                    continue;
                }
                Some(c) if c.owner == self.me => {
                    if already_failed {
                        continue; // our `failed` record stands until the spec changes
                    }
                    if mine {
                        ClaimKind::Replace(c.revision)
                    } else {
                        // Our stale claim (e.g. from before a restart): hand it over.
                        to_release.push((id.clone(), c.revision));
                        continue;
                    }
                }
                Some(c) if orphan && ((mine && settled) || grace) => {
                    if already_failed && c.owner.is_empty() {
                        continue;
                    }
                    ClaimKind::Replace(c.revision)
                }
                _ => continue,
            };
            if grace && !mine {
                graced.push(id.clone());
            }
            to_claim.push((id.clone(), entry.revision, kind, entry.spec.clone()));
        }
        for (id, rev) in to_release {
            self.spawn_release_key(id, rev);
        }
        for id in graced {
            tracing::info!(node = %self.me, workload = %id, "unclaimed past the grace period: taking it");
            self.grace_held.insert(id, now);
        }
        for (id, spec_rev, kind, spec) in to_claim {
            self.pending.insert(id.clone());
            let (avoid, moves) = self
                .claims
                .get(&id)
                .map(|c| (c.avoid.clone(), c.moves))
                .unwrap_or_default();
            self.spawn_claim(id, spec_rev, kind, spec, avoid, moves);
        }
        // Claims with no spec and no local workload: ours, or unplaceable
        // records (the bookkeeper's job), are garbage.
        let stale: Vec<(String, u64)> = self
            .claims
            .iter()
            .filter(|(id, c)| {
                (c.owner == self.me || (c.owner.is_empty() && bookkeeper))
                    && !self.specs.contains_key(*id)
                    && !local.contains(*id)
                    && !self.pending.contains(*id)
                    && !self.releasing.contains(*id)
            })
            .map(|(id, c)| (id.clone(), c.revision))
            .collect();
        for (id, rev) in stale {
            self.spawn_release_key(id, rev);
        }
        self.unclaimed_since
            .retain(|id, _| self.specs.contains_key(id));
        // Forget grace holds of workloads we no longer hold or claim.
        self.grace_held
            .retain(|id, _| local.contains(id) || self.pending.contains(id));
    }

    /// Hands a workload that is dead here to another node, recording this
    /// node on its avoid list. Returns whether it did.
    fn hand_on_dead(&mut self, id: &str) -> bool {
        let Some(claim) = self.claims.get(id).filter(|c| c.owner == self.me) else {
            return false;
        };
        if claim.moves >= self.cfg.max_moves {
            return false; // stays here, dead, still checked
        }
        let mut avoid = claim.avoid.clone();
        avoid.push(self.me.clone());
        let spec_placement = self
            .specs
            .get(id)
            .and_then(|e| e.spec.as_ref().ok())
            .map(|s| s.placement.clone())
            .unwrap_or_default();
        let elsewhere = self
            .live
            .values()
            .any(|n| !avoid.contains(&n.id) && placement::eligible(n, &spec_placement));
        if !elsewhere {
            return false;
        }
        let record = StateRecord {
            owner: String::new(),
            kind: self
                .specs
                .get(id)
                .and_then(|e| e.spec.as_ref().ok())
                .map(|s| s.kind.clone())
                .unwrap_or_default(),
            status: Status::Moving,
            since: SystemTime::now(),
            reason: Some(format!(
                "dead on node {}; handed on for another node to try",
                self.me
            )),
            restarts: 0,
            avoid,
            moves: claim.moves + 1,
        };
        tracing::info!(node = %self.me, workload = %id, "dead here: handing it on");
        match self.node.hand_over_workload(id, json_bytes(&record)) {
            Ok(()) => {
                self.releasing.insert(id.to_string());
                self.running_rev.remove(id);
                self.dead_since.remove(id);
                self.publish_cluster_event(id, "released", "dead here; another node will try");
                true
            }
            Err(_) => false,
        }
    }

    fn spawn_release_key(&mut self, id: String, revision: u64) {
        self.releasing.insert(id.clone());
        let state = self.state.clone();
        tokio::spawn(async move {
            if let Err(e) = state.delete(&id, Some(revision)).await {
                tracing::debug!(workload = %id, error = %e, "stale claim not deleted");
            }
        });
    }

    fn spawn_claim(
        &self,
        id: String,
        spec_revision: u64,
        kind: ClaimKind,
        spec: Result<WorkloadSpec, String>,
        avoid: Vec<String>,
        moves: u32,
    ) {
        let failed = spec.as_ref().err().cloned();
        let unplaceable = match &kind {
            ClaimKind::Unplaceable(reason) => Some(reason.clone()),
            _ => None,
        };
        let record = StateRecord {
            owner: if unplaceable.is_some() {
                String::new()
            } else {
                self.me.clone()
            },
            kind: spec.map(|s| s.kind).unwrap_or_default(),
            status: if unplaceable.is_some() {
                Status::Unplaceable
            } else if failed.is_some() {
                Status::Failed
            } else {
                Status::Initializing
            },
            since: SystemTime::now(),
            reason: unplaceable.clone().or_else(|| failed.clone()),
            restarts: 0,
            avoid: avoid.clone(),
            moves,
        };
        let value = json_bytes(&record);
        let state = self.state.clone();
        let tx = self.results_tx.clone();
        tokio::spawn(async move {
            let result = match kind {
                ClaimKind::Create | ClaimKind::Unplaceable(_) => state.create(&id, value).await,
                ClaimKind::Replace(rev) => state.update(&id, value, rev).await,
            };
            let _ = tx.send(ClaimResult {
                id,
                spec_revision,
                avoid,
                moves,
                failed,
                unplaceable: unplaceable.is_some(),
                result,
            });
        });
    }

    async fn on_claimed(&mut self, r: ClaimResult) {
        self.pending.remove(&r.id);
        let revision = match r.result {
            Ok(rev) => rev,
            Err(StoreError::Backend(e)) => {
                tracing::warn!(workload = %r.id, error = %e, "claim failed; will retry");
                return;
            }
            Err(_) => return, // somebody else was faster: the watch tells us who
        };
        if r.unplaceable {
            self.claims.insert(
                r.id,
                Claim {
                    owner: String::new(),
                    revision,
                    avoid: r.avoid,
                    moves: r.moves,
                },
            );
            return;
        }
        self.claims.insert(
            r.id.clone(),
            Claim {
                owner: self.me.clone(),
                revision,
                avoid: r.avoid.clone(),
                moves: r.moves,
            },
        );
        if !self.node.lease_valid() {
            // Won the key but may not touch devices now: give it back.
            self.spawn_release_key(r.id, revision);
            return;
        }
        if r.failed.is_some() {
            self.failed_rev.insert(r.id, r.spec_revision);
            return;
        }
        let spec = match self.specs.get(&r.id) {
            Some(SpecEntry {
                revision: rev,
                spec: Ok(spec),
            }) if *rev == r.spec_revision => spec.clone(),
            _ => {
                // The spec changed or went while we claimed: give the claim back.
                self.spawn_release_key(r.id, revision);
                return;
            }
        };
        match self
            .node
            .add_claimed_workload(spec, revision, r.avoid.clone(), r.moves)
            .await
        {
            Ok(()) => {
                self.running_rev.insert(r.id.clone(), r.spec_revision);
                self.publish_cluster_event(&r.id, "claimed", "placement");
            }
            Err(e) => {
                // This node can't run it (unknown kind, bad config): record why.
                tracing::warn!(workload = %r.id, error = %e, "cannot run claimed workload");
                self.failed_rev.insert(r.id.clone(), r.spec_revision);
                let record = StateRecord {
                    owner: self.me.clone(),
                    kind: String::new(),
                    status: Status::Failed,
                    since: SystemTime::now(),
                    reason: Some(e.to_string()),
                    restarts: 0,
                    avoid: r.avoid.clone(),
                    moves: r.moves,
                };
                if let Ok(rev) = self
                    .state
                    .update(&r.id, json_bytes(&record), revision)
                    .await
                {
                    if let Some(c) = self.claims.get_mut(&r.id) {
                        c.revision = c.revision.max(rev);
                    }
                }
            }
        }
    }

    async fn publish_event(&self, e: &Event) {
        let mut v = serde_json::to_value(e).unwrap_or_default();
        v["node"] = serde_json::Value::String(self.me.clone());
        let subject = self.subjects.event(e.workload(), e.name());
        if let Err(err) = self
            .transport
            .publish(&subject, Message::new(json_bytes(&v)))
            .await
        {
            tracing::debug!(%subject, error = %err, "event not published");
        }
    }

    fn publish_cluster_event(&self, id: &str, event: &'static str, reason: &str) {
        let v = serde_json::json!({
            "event": event, "workload": id, "node": self.me, "reason": reason,
        });
        let subject = self.subjects.event(id, event);
        let transport = self.transport.clone();
        tokio::spawn(async move {
            let _ = transport
                .publish(&subject, Message::new(json_bytes(&v)))
                .await;
        });
    }
}

/// Reads a spec from the workloads bucket: the key is the id; the value's
/// `id`, if given, must agree.
fn parse_spec(key: &str, value: &[u8]) -> Result<WorkloadSpec, String> {
    validate_id(key)?;
    let mut v: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("spec is not JSON: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "spec must be a JSON object".to_string())?;
    match obj.get("id").and_then(|i| i.as_str()) {
        Some(id) if id != key => {
            return Err(format!("spec id {id:?} differs from its key {key:?}"))
        }
        _ => {
            obj.insert("id".into(), serde_json::Value::String(key.to_string()));
        }
    }
    serde_json::from_value(v).map_err(|e| format!("invalid spec: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_spec;

    #[test]
    fn specs_from_storage() {
        let s = parse_spec("r1", br#"{"kind":"sim","labels":{"a":"b"}}"#).unwrap();
        assert_eq!((s.id.as_str(), s.kind.as_str()), ("r1", "sim"));
        assert!(parse_spec("r1", br#"{"id":"r2","kind":"sim"}"#)
            .unwrap_err()
            .contains("differs"));
        assert!(parse_spec("r1", b"nope").unwrap_err().contains("not JSON"));
        assert!(parse_spec("r1", br#"{"config":{}}"#)
            .unwrap_err()
            .contains("kind"));
        assert!(parse_spec("a.b", br#"{"kind":"sim"}"#).is_err());
    }
}
