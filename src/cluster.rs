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

use std::collections::{BTreeMap, VecDeque};

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
use tracing::Instrument;

use crate::events::Event;
use crate::spec::{validate_id, WorkloadSpec};
use crate::store::{KvBucket, KvChange, StateStore, StoreError};
use crate::subjects::Subjects;
use crate::transport::{Message, Transport};
use crate::wire::{NodeInfo, StateRecord};
use crate::{Node, NodeBuilder, NodeError, Status};

mod members;
pub(crate) mod placement;

use members::{Members, Observed, SentBeats};

/// Placement over every spec runs at most once per this many times its
/// last duration while only specs change (a claim wave): it is ~20 % of a
/// node's CPU there otherwise.
const ASSIGN_SPACING: u32 = 12;

/// The longest that specs streaming in wait for placement.
const ASSIGN_SPACING_MAX: Duration = Duration::from_secs(2);

/// The backlog of plain creates holds at most this many times
/// `claim_concurrency` specs.
const BACKLOG_FACTOR: usize = 8;

/// A backlog older than this is left to the next reconcile.
const BACKLOG_FRESH: Duration = Duration::from_secs(3);

/// A release not confirmed by the watch this long is looked at again.
const RELEASE_RECHECK: Duration = Duration::from_secs(30);

/// Longest a claim or release call to the store may take.
const STORE_CALL_LIMIT: Duration = Duration::from_secs(10);

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
    fatal: Fatal,
    /// Revision of our membership entry's last write (the heartbeat's).
    membership_revision: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Cluster {
    /// Like a crash: heartbeats and coordination stop, the lease ends (no
    /// device call goes on), nothing is released or written; the others
    /// take over once the TTL has passed.
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.coordinator.abort();
        if !self.node.is_empty() {
            self.node.revoke_lease();
            for id in self.node.workload_ids() {
                self.node
                    .fence_workload(&id, "cluster handle dropped".into());
            }
        }
    }
}

/// Ends a node that must not go on (another process took its id): fences
/// every workload, ends the lease, and tells whoever waits on [`Cluster::failed`].
#[derive(Clone)]
struct Fatal(Arc<watch::Sender<Option<String>>>);

impl Fatal {
    fn new() -> Fatal {
        Fatal(Arc::new(watch::channel(None).0))
    }

    fn raised(&self) -> bool {
        self.0.borrow().is_some()
    }

    fn raise(&self, node: &Node, reason: String) {
        if self.0.borrow().is_some() {
            return;
        }
        tracing::error!(%reason, "stopping: fencing every workload");
        node.revoke_lease();
        for id in node.workload_ids() {
            node.fence_workload(&id, reason.clone());
        }
        self.0.send_replace(Some(reason));
    }
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
        let opened = async {
            let workloads =
                open_bucket(&*store, &subjects.workloads_bucket_spec(cfg.replicas)).await?;
            let nodes = open_bucket(
                &*store,
                &subjects.nodes_bucket_spec(cfg.node_ttl, cfg.replicas),
            )
            .await?;
            let state =
                open_bucket(&*store, &subjects.state_bucket_spec_with(cfg.replicas)).await?;
            check_settings(&cfg, &nodes, &[&workloads, &state])?;
            Ok::<_, NodeError>((workloads, nodes, state))
        }
        .await;
        let (workloads, nodes, state) = match opened {
            Ok(b) => b,
            Err(e) => {
                node.stop().await;
                return Err(e);
            }
        };
        let me = node.id().to_string();
        let incarnation = node.incarnation().to_string();
        let mut info = NodeInfo {
            id: me.clone(),
            zone: cfg.zone.clone(),
            labels: cfg.labels.clone(),
            capacity: cfg.capacity,
            weight: cfg.weight,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: SystemTime::now(),
            load: 0,
            draining: false,
            incarnation: incarnation.clone(),
            beat: 1,
            heartbeat_ms: cfg.heartbeat.as_millis() as u64,
            kinds: node.kind_names(),
            left: false,
        };
        // Register before claiming anything: others must see us alive first.
        // Never next to another live process under our id.
        // A NATS cluster still electing the new bucket's leader answers
        // "no responders" for a while: retry backend errors for up to 30 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        let registered = loop {
            match register(&*nodes, &info, &cfg).await {
                Err(NodeError::Backend(e)) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "membership not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => break other,
            }
        };
        let (revision, sent, predecessor) = match registered {
            Ok(r) => r,
            Err(e) => {
                node.stop().await;
                return Err(e);
            }
        };
        let membership_revision = Arc::new(std::sync::atomic::AtomicU64::new(revision));
        let sent_beats = SentBeats::default();
        sent_beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(1, sent);
        node.renew_lease(sent + cfg.node_ttl - cfg.lease_margin());
        info.beat = 1;
        let shared_info = Arc::new(std::sync::Mutex::new(info.clone()));
        let kick = Arc::new(tokio::sync::Notify::new());
        let fatal = Fatal::new();
        // Each node's coordination logs name it (several nodes may share
        // one process: tests, simulations, embedding applications).
        let span = tracing::info_span!("cluster", node = %me);
        let heartbeat = tokio::spawn(
            heartbeat_loop(
                node.clone(),
                nodes.clone(),
                shared_info.clone(),
                kick.clone(),
                cfg.clone(),
                membership_revision.clone(),
                sent_beats.clone(),
                fatal.clone(),
            )
            .instrument(span.clone()),
        );
        let mut members = Members::new(&me, &incarnation, cfg.node_ttl, sent_beats, Instant::now())
            .with_heartbeat(cfg.heartbeat);
        if let Some((inc, at)) = predecessor {
            members.predecessor(&inc, at);
        }
        let (stop, stop_rx) = watch::channel(false);
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let mut live = BTreeMap::new();
        live.insert(me.clone(), info);
        let transport_for_events = transport.clone();
        let coordinator = Coordinator {
            me,
            incarnation,
            members,
            fatal: fatal.clone(),
            store: store.clone(),
            info: shared_info.clone(),
            holders: Holders::new(node.id(), node.incarnation()),
            kick: kick.clone(),
            node: node.clone(),
            cfg,
            subjects,
            workloads,
            nodes: nodes.clone(),
            state,
            live,
            specs: HashMap::default(),
            claims: HashMap::default(),
            open: HashSet::default(),
            open_stale: true,
            left_open: HashSet::default(),
            view_gen: 1,
            assignment_gen: 0,
            specs_gen: 0,
            assignment_specs_gen: 0,
            last_assign: None,
            unclaimed_since: HashMap::default(),
            dead_since: HashMap::default(),
            grace_held: HashMap::default(),
            joined: Instant::now(),
            synced: [false; 3],
            state_known: false,
            replayed: [None, None, None],
            pending: HashSet::default(),
            backlog: VecDeque::new(),
            backlog_at: Instant::now(),
            releasing: HashMap::default(),
            running_rev: HashMap::default(),
            failed_rev: HashMap::default(),
            results_tx,
            events_out: EventsOut::spawn(transport_for_events),
        };
        let coordinator = tokio::spawn(
            coordinator
                .run(stop_rx, results_rx)
                .instrument(span.clone()),
        );
        tracing::info!(node = node.id(), "joined cluster");
        Ok(Cluster {
            node,
            stop,
            coordinator,
            heartbeat,
            nodes,
            info: shared_info,
            kick,
            fatal,
            membership_revision,
        })
    }

    /// Waits until the node has to stop because it must not go on (another
    /// process wrote its node id's membership entry); the reason. Every
    /// workload is fenced by then and no device call runs.
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.0.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The node: its workloads, tasks and events.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Leaves cleanly: stops claiming, stops every workload and deletes its
    /// claims, then deletes the membership entry, so the others take over at once.
    pub async fn stop(self) {
        self.leave().await;
    }

    async fn leave(&self) {
        let _ = self.stop.send(true);
        // The coordinator ends at its next turn; it never waits on the store.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while !self.coordinator.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        self.coordinator.abort();
        self.node.stop().await;
        self.heartbeat.abort();
        if !self.node.is_empty() || self.fatal.0.borrow().is_some() {
            // Something is still being released (or we were pushed out):
            // say nothing; our lease runs out and the others take over.
            tracing::warn!(
                node = self.node.id(),
                left = self.node.len(),
                "leaving with workloads not released; they move once the TTL passes"
            );
            return;
        }
        // Everything released: tell the others we are gone (they need not
        // wait out the TTL), then remove the entry.
        let info: Option<Bytes> = self
            .info
            .lock()
            .map(|mut i| {
                i.left = true;
                i.load = 0;
                i.beat += 1;
                json_bytes(&*i)
            })
            .ok();
        // Compare-and-set on our last heartbeat's revision: never over a
        // successor's entry.
        let rev = self
            .membership_revision
            .load(std::sync::atomic::Ordering::Acquire);
        let left = match info {
            Some(value) => self.nodes.update(self.node.id(), value, rev).await,
            None => Err(StoreError::Backend("membership record unreadable".into())),
        };
        match left {
            Ok(rev) => {
                if let Err(e) = self.nodes.delete(self.node.id(), Some(rev)).await {
                    tracing::warn!(error = %e, "could not delete membership entry; it will expire");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not announce leaving; the entry will expire")
            }
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
        let this = &self;
        let drained = tokio::time::timeout_at(deadline, async move {
            while !this.node.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            this.leave().await;
        })
        .await;
        if drained.is_err() {
            self.abandon(timeout);
        }
    }

    /// Gives up leaving cleanly (the drain limit passed, or the store is
    /// unreachable): no more heartbeats, the lease ends now (calls in flight
    /// are cancelled), nothing more is written. Others take over what is
    /// left once the TTL has passed, by the normal path.
    fn abandon(&self, waited: Duration) {
        tracing::error!(
            node = self.node.id(),
            left = self.node.len(),
            ?waited,
            "drain limit passed: leaving without handing over the rest; \
             other nodes take it over once the TTL has passed"
        );
        self.heartbeat.abort();
        self.coordinator.abort();
        self.node.revoke_lease();
        for id in self.node.workload_ids() {
            self.node
                .fence_workload(&id, "node left without handing over (drain limit)".into());
        }
    }

    /// Simulates a crash (for tests and simulations): heartbeats and
    /// coordination stop, every actor stops, nothing is released or written —
    /// the others find out only when the membership entry expires.
    #[doc(hidden)]
    pub async fn crash(self) {
        self.node.revoke_lease();
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

/// Refuses to join a cluster whose buckets were created with settings this
/// node cannot honour: every node derives its lease from the membership
/// TTL, and a node must not silently run with fewer copies than asked for.
fn check_settings(
    cfg: &ClusterConfig,
    nodes: &Arc<dyn KvBucket>,
    others: &[&Arc<dyn KvBucket>],
) -> Result<(), NodeError> {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    if let Some(n) = nodes.settings() {
        if n.max_age != Some(cfg.node_ttl) {
            return Err(NodeError::IncompatibleCluster(format!(
                "the cluster's membership bucket {} expires entries after {}, but this node \
                 was started with a TTL of {}: every node's lease is derived from that TTL, \
                 so all must use the same; start this node with --ttl {}",
                n.name,
                n.max_age.map_or("never".into(), human),
                human(cfg.node_ttl),
                n.max_age.map_or("?".into(), human),
            )));
        }
        if n.in_memory {
            tracing::warn!(
                bucket = %n.name,
                "the membership bucket is kept in memory (created by an older Ottomato): \
                 it does not survive a nats-server restart; to move it to disk, stop every \
                 node, delete the bucket and start them again"
            );
        }
    }
    for b in std::iter::once(nodes).chain(others.iter().copied()) {
        if let Some(s) = b.settings() {
            // More copies than asked for is fine (nothing is ever lowered);
            // fewer — and they could not be raised — is not.
            if s.replicas < cfg.replicas.max(1) {
                return Err(NodeError::IncompatibleCluster(format!(
                    "bucket {} keeps {} replica(s) and they could not be raised to the {} this \
                     node was started with: start it with --replicas {}, or give the NATS \
                     cluster enough servers for {} (nats stream edit KV_{} --replicas N)",
                    s.name, s.replicas, cfg.replicas, s.replicas, cfg.replicas, s.name
                )));
            }
        }
    }
    Ok(())
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

/// Registers `info` under its node id, unless another live process holds
/// the id: an entry of another incarnation that is re-written within two of
/// its heartbeats (plus a second) means a live one, and we refuse. Returns
/// our entry's revision and the predecessor's incarnation (with when we saw
/// it), whose claims we may take over only the normal way.
async fn register(
    nodes: &dyn KvBucket,
    info: &NodeInfo,
    cfg: &ClusterConfig,
) -> Result<(u64, Instant, Option<(String, Instant)>), NodeError> {
    let in_use = |other: &NodeInfo| {
        NodeError::IdInUse(format!(
            "node id {:?} is in use by a running node (incarnation {}, version {}, started {}); \
             give this node another id (--node-id / OTTOMATO_NODE_ID)",
            info.id,
            other.incarnation,
            other.version,
            humantime::format_rfc3339_seconds(other.started)
        ))
    };
    let parse = |e: &crate::store::KvEntry| serde_json::from_slice::<NodeInfo>(&e.value).ok();
    let existing = nodes.get(&info.id).await.map_err(backend)?;
    let mut predecessor = None;
    if let Some(entry) = existing.as_ref().filter(|e| {
        // Our own write of an earlier attempt (its answer was lost).
        parse(e).is_none_or(|o| o.incarnation != info.incarnation)
    }) {
        let other = parse(entry).unwrap_or_default();
        predecessor = Some((other.incarnation.clone(), Instant::now()));
        if !other.left {
            let beat = Duration::from_millis(other.heartbeat_ms)
                .max(Duration::from_millis(100))
                .min(cfg.node_ttl);
            let heartbeat = if other.heartbeat_ms == 0 {
                cfg.heartbeat
            } else {
                beat
            };
            let window = heartbeat * 2 + Duration::from_secs(1);
            tracing::info!(
                node = %info.id,
                predecessor = %other.incarnation,
                ?window,
                "an entry for this node id exists; checking that its process is gone"
            );
            let deadline = Instant::now() + window;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match nodes.get(&info.id).await.map_err(backend)? {
                    Some(e) if e.revision != entry.revision => {
                        let now = parse(&e).unwrap_or_default();
                        if !now.left {
                            return Err(in_use(&now));
                        }
                        break;
                    }
                    Some(_) => {}
                    None => break, // expired or deleted: gone
                }
            }
        }
    }
    let value = json_bytes(info);
    // The lease counts from before the write that registers us.
    let sent = Instant::now();
    let written = match &existing {
        Some(e) => nodes.update(&info.id, value.clone(), e.revision).await,
        None => nodes.create(&info.id, value.clone()).await,
    };
    match written {
        Ok(rev) => Ok((rev, sent, predecessor)),
        // It expired while we watched: a fresh create.
        Err(StoreError::RevisionMismatch { .. }) | Err(StoreError::AlreadyExists { .. }) => {
            match nodes.get(&info.id).await.map_err(backend)? {
                None => {
                    let sent = Instant::now();
                    let rev = nodes.create(&info.id, value).await.map_err(|e| match e {
                        StoreError::AlreadyExists { .. } => in_use(&NodeInfo::default()),
                        e => backend(e),
                    })?;
                    Ok((rev, sent, predecessor))
                }
                Some(e) => Err(in_use(&parse(&e).unwrap_or_default())),
            }
        }
        Err(e) => Err(backend(e)),
    }
}

/// Re-writes the membership entry every heartbeat (compare-and-set on our
/// last revision, so another process writing our id is noticed, never
/// overwritten) and keeps the lease: the node may touch devices only until
/// `heartbeat sent + TTL - margin` of the last acknowledged write. When the
/// lease has run out (the process was frozen, or NATS unreachable), every
/// workload is fenced before anything else.
#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    node: Node,
    nodes: Arc<dyn KvBucket>,
    info: Arc<std::sync::Mutex<NodeInfo>>,
    kick: Arc<tokio::sync::Notify>,
    cfg: ClusterConfig,
    shared_revision: Arc<std::sync::atomic::AtomicU64>,
    sent_beats: SentBeats,
    fatal: Fatal,
) {
    let mut revision = shared_revision.load(std::sync::atomic::Ordering::Acquire);
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = kick.notified() => {}
        }
        if fatal.raised() {
            return; // pushed out: never write our id's entry again
        }
        if !node.lease_valid() && !node.is_empty() {
            fence_all(&node);
        }
        let sent = Instant::now();
        let value = match info.lock() {
            Ok(mut i) => {
                i.load = node.len() as u64;
                i.beat += 1;
                sent_beats
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(i.beat, sent);
                json_bytes(&*i)
            }
            Err(_) => continue,
        };
        let renew = |node: &Node| {
            // Renew only from an unbroken lease: an ack that comes back
            // after the lease ran out may have landed after our old entry
            // expired and others took our workloads. Then every actor must
            // be gone before the node may touch a device again.
            if node.lease_valid() || node.is_empty() {
                node.renew_lease(sent + cfg.node_ttl - cfg.lease_margin());
            } else {
                fence_all(node);
            }
        };
        match tokio::time::timeout(
            cfg.node_ttl,
            nodes.update(node.id(), value.clone(), revision),
        )
        .await
        {
            Ok(Ok(rev)) => {
                revision = rev;
                shared_revision.store(rev, std::sync::atomic::Ordering::Release);
                renew(&node);
            }
            Ok(Err(StoreError::RevisionMismatch { .. })) => {
                match nodes.get(node.id()).await {
                    Ok(None) => {
                        // Our entry expired (we were frozen or cut off).
                        match nodes.create(node.id(), value).await {
                            Ok(rev) => {
                                revision = rev;
                                shared_revision.store(rev, std::sync::atomic::Ordering::Release);
                                renew(&node);
                            }
                            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                        }
                    }
                    Ok(Some(e)) => {
                        let other =
                            serde_json::from_slice::<NodeInfo>(&e.value).unwrap_or_default();
                        if other.incarnation == node.incarnation() {
                            // Our own write landed; its answer was lost.
                            revision = e.revision;
                            shared_revision.store(revision, std::sync::atomic::Ordering::Release);
                        } else {
                            fatal.raise(&node, intruder(&other, node.id()));
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out"),
        }
    }
}

/// Why a node gives up when another process wrote its membership entry.
fn intruder(other: &NodeInfo, id: &str) -> String {
    format!(
        "another process (incarnation {}, started {}) wrote this node's membership entry: \
         two processes run with node id {id:?}",
        other.incarnation,
        humantime::format_rfc3339_seconds(other.started),
    )
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
/// lagging watcher). `None` marks the end of a subscription (at once, so
/// nothing is decided on a view known to have a hole while re-watching)
/// and the start of each new one: a full replay follows, ending with
/// `Synced`, and anything not replayed is gone.
fn resilient_watch(
    bucket: Arc<dyn KvBucket>,
    name: String,
) -> BoxStream<'static, Option<KvChange>> {
    futures::stream::unfold(
        (bucket, None::<BoxStream<'static, KvChange>>, name, false),
        |(bucket, mut current, name, mut ended)| async move {
            loop {
                if ended {
                    ended = false;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                if let Some(s) = current.as_mut() {
                    if let Some(c) = s.next().await {
                        return Some((Some(c), (bucket, current, name, false)));
                    }
                    tracing::warn!(bucket = %name, "watch ended; re-watching");
                    return Some((None, (bucket, None, name, true)));
                }
                match bucket.watch().await {
                    Ok(s) => {
                        current = Some(s);
                        return Some((None, (bucket, current, name, false)));
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
    /// Where placement puts it, as of view `assignment_gen` (`None` until
    /// the first placement after it arrived).
    target: Option<placement::Target>,
}

struct Claim {
    owner: String,
    /// The owner and its process (its membership `incarnation`) as a small number (see `Holders`): what the
    /// per-spec checks of a reconcile compare, instead of strings.
    holder: u32,
    revision: u64,
    /// Nodes the device was dead from, and how often it was handed on.
    avoid: Vec<String>,
    moves: u32,
}

#[derive(Debug)]
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
    incarnation: String,
    /// Liveness of every node, on our own clock.
    members: Members,
    fatal: Fatal,
    store: Arc<dyn StateStore>,
    info: Arc<std::sync::Mutex<NodeInfo>>,
    holders: Holders,
    /// Asks the heartbeat task for a beat now.
    kick: Arc<tokio::sync::Notify>,
    node: Node,
    cfg: ClusterConfig,
    subjects: Subjects,
    workloads: Arc<dyn KvBucket>,
    nodes: Arc<dyn KvBucket>,
    state: Arc<dyn KvBucket>,
    /// Live nodes (not known dead, see [`Members`]), us included; what
    /// placement works from.
    live: BTreeMap<String, NodeInfo>,
    specs: HashMap<String, SpecEntry>,
    claims: HashMap<String, Claim>,
    /// The specs a reconcile looks at: all but those held by another holder
    /// not known dead (those wait for a handover, whatever placement says).
    /// Kept by [`Coordinator::touch`] on every spec and claim change, and
    /// rebuilt when a holder's liveness changes, so a reconcile of a settled
    /// fleet walks what is ours or in flux, not every spec.
    open: HashSet<String>,
    /// `open` must be rebuilt before it is used (specs forgotten in bulk).
    open_stale: bool,
    /// Specs that left `open` since the last reconcile: their unclaimed
    /// time is forgotten there if they are still out then, as the full scan
    /// did (a claim that came and went between two passes keeps it).
    left_open: HashSet<String>,
    /// Bumped whenever an input of placement other than the set of specs
    /// changes (membership, avoid lists): placement is recomputed at the
    /// next reconcile.
    view_gen: u64,
    assignment_gen: u64,
    /// Bumped by every spec put or delete: placement is recomputed once it
    /// is due (see `ASSIGN_SPACING`); specs placed since carry no target.
    specs_gen: u64,
    assignment_specs_gen: u64,
    /// When the last placement ended, and how long it took.
    last_assign: Option<(Instant, Duration)>,
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
    /// The state watch has replayed the bucket once: from then on, every
    /// record new to us was written while we watched.
    state_known: bool,
    /// Keys seen since each watch (re)started, until its `Synced`.
    replayed: [Option<HashSet<String>>; 3],
    /// Claims in flight.
    pending: HashSet<String>,
    /// Specs the last reconcile found ours to create but had no room for
    /// (`claim_concurrency` claims in flight): each completed claim starts
    /// the next of them (see [`Coordinator::refill`]), so the claim rate of
    /// a wave does not wait on reconciles, whose cost grows with the fleet.
    backlog: VecDeque<String>,
    /// When the reconcile that made `backlog` ran.
    backlog_at: Instant,
    /// Workloads we are handing over; until their claim's delete is seen.
    releasing: HashMap<String, Instant>,
    /// The spec revision each local workload runs.
    running_rev: HashMap<String, u64>,
    /// Spec revisions this node could not run (unknown kind, bad config):
    /// not retried until the spec changes.
    failed_rev: HashMap<String, u64>,
    results_tx: mpsc::UnboundedSender<ClaimResult>,
    events_out: EventsOut,
}

/// The (owner, incarnation) pairs seen in claims, numbered, and per
/// reconcile which of them may still hold their claims.
#[derive(Default)]
struct Holders {
    /// owner → its incarnations seen, with their numbers (no allocation to look up).
    ids: HashMap<String, Vec<(String, u32)>>,
    pairs: Vec<(String, String)>,
    /// `live[h]`: holder `h` is not known dead (as of the last reconcile).
    live: Vec<bool>,
    /// Our own holder number, once known.
    me: Option<u32>,
}

impl Holders {
    fn new(me: &str, incarnation: &str) -> Holders {
        let mut h = Holders::default();
        h.me = Some(h.id(me, incarnation));
        h
    }

    fn id(&mut self, owner: &str, incarnation: &str) -> u32 {
        if let Some(h) = self
            .ids
            .get(owner)
            .and_then(|v| v.iter().find(|(i, _)| i == incarnation))
        {
            return h.1;
        }
        let h = self.pairs.len() as u32;
        self.pairs
            .push((owner.to_string(), incarnation.to_string()));
        self.ids
            .entry(owner.to_string())
            .or_default()
            .push((incarnation.to_string(), h));
        h
    }

    /// Re-judges every holder; whether any verdict changed (or holders
    /// were added since the last refresh).
    fn refresh(&mut self, members: &Members) -> bool {
        let live: Vec<bool> = self
            .pairs
            .iter()
            .map(|(o, i)| members.holds(o, i))
            .collect();
        let changed = live != self.live;
        self.live = live;
        changed
    }

    fn live(&self, h: u32) -> bool {
        self.live.get(h as usize).copied().unwrap_or(true)
    }
}

/// Events on their way to the transport, published by a task of their own:
/// the coordinator never waits on NATS for them. When the transport is
/// stuck and the queue full, events are dropped (and counted), never the
/// coordinator's turn.
struct EventsOut {
    tx: mpsc::Sender<(String, Bytes)>,
    dropped: u64,
}

impl EventsOut {
    const CAPACITY: usize = 16_384;

    fn spawn(transport: Arc<dyn Transport>) -> EventsOut {
        let (tx, mut rx) = mpsc::channel::<(String, Bytes)>(Self::CAPACITY);
        tokio::spawn(async move {
            while let Some((subject, payload)) = rx.recv().await {
                if let Err(e) = transport.publish(&subject, Message::new(payload)).await {
                    tracing::debug!(%subject, error = %e, "event not published");
                }
            }
        });
        EventsOut { tx, dropped: 0 }
    }

    fn send(&mut self, subject: String, payload: Bytes) {
        if self.tx.try_send((subject, payload)).is_err() {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped,
                    "event publishing is stuck; events dropped"
                );
            }
        }
    }
}

impl Coordinator {
    async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut results: mpsc::UnboundedReceiver<ClaimResult>,
    ) {
        let mut inputs = self.watches();
        let mut connects = self.store.connects();
        let mut events = self.node.subscribe();
        let mut safety = tokio::time::interval(Duration::from_secs(1));
        let mut dirty = false;
        let mut last = Instant::now() - self.cfg.reconcile_min_interval;
        let mut probed: Option<Instant> = None;
        loop {
            let due = last + self.cfg.reconcile_min_interval;
            // When a silent peer's TTL is up, a heartbeat sent right then
            // proves it gone as soon as it comes back (once per deadline).
            let probe = self
                .members
                .next_deadline()
                .filter(|d| probed.is_none_or(|p| *d > p));
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
                    self.refill();
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
                        self.publish_event(&e);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event publisher fell behind");
                    }
                    Err(_) => return,
                },
                _ = safety.tick() => {
                    dirty = true;
                    // After every reconnect, a full resync: the watches'
                    // own resumption may have missed what expired meanwhile.
                    let now_connects = self.store.connects();
                    if now_connects != connects {
                        tracing::info!("reconnected to the store: resyncing every watch");
                        connects = now_connects;
                        inputs = self.watches();
                        // Nothing decided on the old view until the replays end.
                        self.synced = [false; 3];
                        self.members.watch_restarted(Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(probe.unwrap_or_else(Instant::now)), if probe.is_some() => {
                    probed = probe;
                    self.kick.notify_one();
                    dirty = true;
                }
                // Only when a reconcile can run: while a watch replays, this
                // would fire at once, again and again (a busy loop).
                _ = tokio::time::sleep_until(due), if dirty && self.synced.iter().all(|s| *s) => {}
            }
            if self.fatal.raised() {
                return; // pushed out: nothing more to coordinate
            }
            if dirty && self.synced.iter().all(|s| *s) && Instant::now() >= due {
                let started = Instant::now();
                self.reconcile();
                dirty = false;
                // A reconcile walks every open spec (all of them during a
                // claim wave): with many, space them so they take at most a
                // third of the time (claims go in batches).
                last = Instant::now() + (Instant::now() - started) * 2;
            }
        }
    }

    /// Our own membership record as it is now (draining, zone, …).
    fn info_of_me(&self) -> NodeInfo {
        self.info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn watches(&self) -> futures::stream::SelectAll<BoxStream<'static, Input>> {
        futures::stream::select_all([
            resilient_watch(self.workloads.clone(), self.subjects.workloads_bucket())
                .map(Input::Spec)
                .boxed(),
            resilient_watch(self.nodes.clone(), self.subjects.nodes_bucket())
                .map(Input::Node)
                .boxed(),
            resilient_watch(self.state.clone(), self.subjects.state_bucket())
                .map(Input::State)
                .boxed(),
        ])
    }

    /// Whether a claim is this process's.
    fn mine(&self, c: &Claim) -> bool {
        Some(c.holder) == self.holders.me
    }

    /// Whether another holder, not known dead, holds `id`'s claim.
    fn held_elsewhere(&self, id: &str) -> bool {
        self.claims
            .get(id)
            .is_some_and(|c| !self.mine(c) && self.holders.live(c.holder))
    }

    /// Puts `id` in or out of `open` after its spec or claim changed.
    fn touch(&mut self, id: &str) {
        if self.specs.contains_key(id) && !self.held_elsewhere(id) {
            if !self.open.contains(id) {
                self.open.insert(id.to_string());
            }
        } else if self.open.remove(id) {
            self.left_open.insert(id.to_string());
        }
    }

    /// Recomputes `open` from every spec (holders' liveness changed).
    fn rebuild_open(&mut self) {
        let open: HashSet<String> = self
            .specs
            .keys()
            .filter(|id| !self.held_elsewhere(id))
            .cloned()
            .collect();
        self.unclaimed_since.retain(|id, _| open.contains(id));
        self.open = open;
        self.open_stale = false;
        self.left_open.clear();
    }

    fn apply(&mut self, input: Input) {
        let (which, change) = match input {
            Input::Spec(c) => (0, c),
            Input::Node(c) => (1, c),
            Input::State(c) => (2, c),
        };
        tracing::trace!(bucket = which, change = ?change, "input");
        let Some(change) = change else {
            // A watch ended, or (re)started: its view has a hole until the
            // replay that follows ends (no reconcile meanwhile).
            self.synced[which] = false;
            self.replayed[which] = Some(HashSet::default());
            if which == 1 {
                self.members.watch_restarted(Instant::now());
            }
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
                self.state_known |= which == 2;
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
                    self.open_stale = true;
                }
            }
            1 => {
                // Liveness is judged by heartbeats seen, not by entries
                // present: nothing to forget (see `Members`).
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
                    e.key.clone(),
                    SpecEntry {
                        revision: e.revision,
                        spec,
                        target: None,
                    },
                );
                self.touch(&e.key);
                self.specs_gen += 1;
            }
            Input::Spec(Some(KvChange::Delete { key, .. })) => {
                self.specs.remove(&key);
                self.touch(&key);
                self.specs_gen += 1;
            }
            Input::Node(Some(KvChange::Put(e))) => {
                let info = serde_json::from_slice::<NodeInfo>(&e.value).unwrap_or_else(|_| {
                    // Unreadable (newer version?): still a live node, default share.
                    NodeInfo {
                        id: e.key.clone(),
                        version: "?".into(),
                        ..Default::default()
                    }
                });
                if info.id != e.key {
                    return; // not a membership record
                }
                if let Observed::Intruder(other) = self.members.observe(info, Instant::now()) {
                    self.fatal.raise(&self.node, intruder(&other, &self.me));
                }
            }
            Input::Node(Some(KvChange::Delete { key, .. })) => {
                if key == self.me {
                    // Our entry expired (we were too slow to heartbeat): the
                    // heartbeat task re-creates it; others may take over our
                    // workloads meanwhile and our CAS writes then fence us.
                    tracing::warn!("own membership entry expired");
                } else {
                    // Expired or deleted: the node counts as gone only once
                    // it has been silent for a full TTL (or said it left).
                    tracing::debug!(node = %key, "membership entry removed");
                }
            }
            Input::State(Some(KvChange::Put(e))) => {
                let known = self.claims.get(&e.key).map(|c| c.revision);
                if known.is_some_and(|r| r > e.revision) {
                    return; // older than what we know
                }
                let (owner, incarnation, avoid, moves) =
                    serde_json::from_slice::<StateRecord>(&e.value)
                        .map(|r| (r.owner, r.incarnation, r.avoid, r.moves))
                        .unwrap_or_else(|_| ("?".into(), String::new(), Vec::new(), 0));
                let ours = owner == self.me && incarnation == self.incarnation;
                // A record written while we watch — new to us, after our
                // first full view of the bucket — is a sighting of its
                // writer. One we knew is not: a dead owner's last records,
                // replayed after every watch restart, must not keep it
                // alive; nor do the records found at start (what they say
                // of their writers' liveness, the membership watch tells).
                let live_write = self.state_known && known.is_none_or(|r| r < e.revision);
                self.members
                    .note_claimant(&owner, &incarnation, Instant::now(), live_write);
                if self
                    .claims
                    .get(&e.key)
                    .map_or(!avoid.is_empty(), |c| c.avoid != avoid)
                {
                    self.view_gen += 1; // placement avoids these nodes now
                }
                if !ours {
                    self.releasing.remove(&e.key); // a handover we made has landed
                }
                if !ours && self.node.has_workload(&e.key) {
                    self.node.fence_workload(
                        &e.key,
                        format!("claim lost: node {owner} now owns the workload"),
                    );
                    self.running_rev.remove(&e.key);
                }
                let holder = self.holders.id(&owner, &incarnation);
                self.claims.insert(
                    e.key.clone(),
                    Claim {
                        owner,
                        holder,
                        revision: e.revision,
                        avoid,
                        moves,
                    },
                );
                self.touch(&e.key);
            }
            Input::State(Some(KvChange::Delete { key, revision })) => {
                if self.claims.get(&key).is_some_and(|c| c.revision > revision) {
                    return;
                }
                if self
                    .claims
                    .remove(&key)
                    .is_some_and(|c| !c.avoid.is_empty())
                {
                    self.view_gen += 1; // placement no longer avoids its nodes
                }
                self.touch(&key);
                self.releasing.remove(&key);
                // Our own delete comes only after the workload left the
                // node (`finish_removal`): one still here lost its key to
                // someone else — also while it is being released.
                if self.node.has_workload(&key) {
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
            self.backlog.clear();
            return; // no claims and no moves until our lease is back
        }
        // Who is alive changes with time too, not only with watch events.
        let me_now = self.info_of_me();
        let live = self.members.live(&me_now);
        let changed = live.len() != self.live.len()
            || live
                .iter()
                .zip(self.live.iter())
                .any(|((a, x), (b, y))| a != b || x.placement_key() != y.placement_key());
        if changed {
            let gone: Vec<&String> = self
                .live
                .keys()
                .filter(|k| !live.contains_key(*k))
                .collect();
            if !gone.is_empty() {
                tracing::info!(nodes = ?gone, "nodes gone (silent for a full TTL, or left)");
            }
            self.view_gen += 1;
        }
        self.live = live;
        if self.holders.refresh(&self.members) || self.open_stale {
            self.rebuild_open();
        }
        // Held (or gone) as of now: not stranded.
        for id in std::mem::take(&mut self.left_open) {
            if !self.open.contains(&id) {
                self.unclaimed_since.remove(&id);
            }
        }
        // Placement walks every spec: while specs stream in, it runs at
        // most once per `ASSIGN_SPACING` times its own duration, and at
        // least every `ASSIGN_SPACING_MAX` (new specs wait for it); after a
        // change of membership or avoid lists, at once.
        let assign_due = self.assignment_gen != self.view_gen
            || (self.assignment_specs_gen != self.specs_gen
                && self.last_assign.is_none_or(|(end, took)| {
                    end.elapsed() >= (took * ASSIGN_SPACING).min(ASSIGN_SPACING_MAX)
                }));
        if assign_due {
            let started = Instant::now();
            let none = crate::spec::Placement::default();
            let claims = &self.claims;
            let targets = placement::assign_each(
                &self.live,
                self.specs.iter().map(|(id, e)| {
                    (
                        id.as_str(),
                        e.spec.as_ref().map_or("", |s| s.kind.as_str()),
                        e.spec.as_ref().map_or(&none, |s| &s.placement),
                        claims.get(id).map_or(&[][..], |c| &c.avoid[..]),
                    )
                }),
            );
            // (The same map, unchanged since: the same order.)
            for (e, t) in self.specs.values_mut().zip(targets) {
                e.target = Some(t);
            }
            self.assignment_gen = self.view_gen;
            self.assignment_specs_gen = self.specs_gen;
            self.last_assign = Some((Instant::now(), started.elapsed()));
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
        // A release whose key change we never saw (the write failed for
        // good, or the watch missed it) is looked at afresh after a while.
        let now = Instant::now();
        self.releasing.retain(|id, since| {
            if local.contains(id) {
                *since = now; // still ending here: counted from when it is gone
            }
            now - *since < RELEASE_RECHECK
        });
        let mut handoffs = self.releasing.len();
        // Local workloads dead here for long: let another node try.
        if let Some(after) = self.cfg.move_dead_after {
            let due: Vec<String> = self
                .dead_since
                .iter()
                .filter(|(id, t)| {
                    t.elapsed() >= after && local.contains(*id) && !self.releasing.contains_key(*id)
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
            if self.releasing.contains_key(id) {
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
                Some(s) => match &s.target {
                    Some(Ok(o)) if **o != *self.me && handoffs < self.cfg.max_handoffs => {
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
                        self.releasing.insert(id.clone(), Instant::now());
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
        // Not every spec: those held by another live holder (most, most of
        // the time) are not in `open`. Nothing to do for them but wait (for
        // a handover, if placement moved one to us).
        self.backlog.clear();
        self.backlog_at = Instant::now();
        let backlog_max = self.cfg.claim_concurrency.saturating_mul(BACKLOG_FACTOR);
        for id in &self.open {
            if to_claim.len() >= room {
                // The rest after some claims complete: the plain creates
                // of ours right away (`refill`), the others next time.
                if self.backlog.len() >= backlog_max {
                    break;
                }
                if settled && self.plain_create(id) {
                    self.backlog.push_back(id.clone());
                }
                continue;
            }
            let Some(entry) = self.specs.get(id) else {
                continue; // (never: `touch` keeps `open` within the specs)
            };
            if self.pending.contains(id) || local.contains(id) || self.releasing.contains_key(id) {
                // Held (or changing hands through us): not stranded.
                self.unclaimed_since.remove(id);
                continue;
            }
            let Some(target) = entry.target.as_ref() else {
                continue; // arrived since placement last ran: placed next time
            };
            let mine = matches!(target, Ok(o) if **o == *self.me);
            let claim = self.claims.get(id);
            // Nobody holds it: no claim, an ownerless record, or an owner
            // process known dead. (Not: an owner we cannot yet tell is dead.)
            let orphan = claim.is_none_or(|c| c.owner.is_empty() || !self.holders.live(c.holder));
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
                        entry.spec.as_ref().map_or("", |s| s.kind.as_str()),
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
                    if let (Err(reason), true) = (target, bookkeeper && settled) {
                        to_claim.push((
                            id.clone(),
                            entry.revision,
                            ClaimKind::Unplaceable(reason.clone()),
                            entry.spec.clone(),
                        ));
                    }
                    continue;
                }
                Some(c) if self.mine(c) => {
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
                (self.mine(c) || (c.owner.is_empty() && bookkeeper))
                    && !self.specs.contains_key(*id)
                    && !local.contains(*id)
                    && !self.pending.contains(*id)
                    && !self.releasing.contains_key(*id)
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

    /// Whether claiming `id` is a plain create by placement: a spec with
    /// no claim at all, placed on us, not ours already, in flight or
    /// failed at this revision. (What a reconcile decides the same way for
    /// such a spec once the node has settled; every other case waits for
    /// the next reconcile.)
    fn plain_create(&self, id: &str) -> bool {
        let Some(entry) = self.specs.get(id) else {
            return false;
        };
        matches!(&entry.target, Some(Ok(o)) if **o == *self.me)
            && !self.claims.contains_key(id)
            && !self.pending.contains(id)
            && !self.releasing.contains_key(id)
            && !self.node.has_workload(id)
            && self.failed_rev.get(id) != Some(&entry.revision)
    }

    /// Starts claims from the backlog while there is room: between
    /// reconciles, each completed claim makes room for the next.
    ///
    /// Only on a full view (every watch synced) and the placement the
    /// backlog was made with, while it is fresh (`BACKLOG_FRESH`: who is
    /// alive is worked out in reconciles), never while draining, and never
    /// into the last quarter of the claim room:
    /// that stays for the other claims of the next reconcile (takeovers of
    /// a gone node's workloads, grace claims, records of the bookkeeper).
    fn refill(&mut self) {
        let draining = self
            .info
            .lock()
            .map_or_else(|p| p.into_inner().draining, |i| i.draining);
        if self.fatal.raised()
            || !self.synced.iter().all(|s| *s)
            || !self.node.lease_valid()
            || self.assignment_gen != self.view_gen
            || self.backlog_at.elapsed() > BACKLOG_FRESH
            || draining
        {
            self.backlog.clear();
            return;
        }
        let reserve = self.cfg.claim_concurrency.div_ceil(4);
        while self.pending.len() + reserve < self.cfg.claim_concurrency {
            let Some(id) = self.backlog.pop_front() else {
                return;
            };
            if !self.plain_create(&id) {
                continue; // changed since the reconcile: it decides again
            }
            let Some(entry) = self.specs.get(&id) else {
                continue;
            };
            let (rev, spec) = (entry.revision, entry.spec.clone());
            tracing::debug!(workload = %id, "claiming from the backlog");
            self.pending.insert(id.clone());
            self.spawn_claim(id, rev, ClaimKind::Create, spec, Vec::new(), 0);
        }
    }

    /// Hands a workload that is dead here to another node, recording this
    /// node on its avoid list. Returns whether it did.
    fn hand_on_dead(&mut self, id: &str) -> bool {
        let Some(claim) = self.claims.get(id).filter(|c| self.mine(c)) else {
            return false;
        };
        if claim.moves >= self.cfg.max_moves {
            return false; // stays here, dead, still checked
        }
        let mut avoid = claim.avoid.clone();
        avoid.push(self.me.clone());
        let (kind, spec_placement) = self
            .specs
            .get(id)
            .and_then(|e| e.spec.as_ref().ok())
            .map(|s| (s.kind.clone(), s.placement.clone()))
            .unwrap_or_default();
        let elsewhere = self
            .live
            .values()
            .any(|n| !avoid.contains(&n.id) && placement::eligible(n, &kind, &spec_placement));
        if !elsewhere {
            return false;
        }
        let record = StateRecord {
            owner: String::new(),
            incarnation: String::new(),
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
                self.releasing.insert(id.to_string(), Instant::now());
                self.running_rev.remove(id);
                self.dead_since.remove(id);
                self.publish_cluster_event(id, "released", "dead here; another node will try");
                true
            }
            Err(_) => false,
        }
    }

    fn spawn_release_key(&mut self, id: String, revision: u64) {
        self.releasing.insert(id.clone(), Instant::now());
        let state = self.state.clone();
        tokio::spawn(async move {
            // Failures are looked at again by a later reconcile
            // (`RELEASE_RECHECK`), against what the store says then.
            match tokio::time::timeout(STORE_CALL_LIMIT, state.delete(&id, Some(revision))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(workload = %id, error = %e, "stale claim not deleted")
                }
                Err(_) => tracing::debug!(workload = %id, "stale claim delete timed out"),
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
        tracing::debug!(workload = %id, kind = ?kind, "claiming");
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
            incarnation: if unplaceable.is_some() {
                String::new()
            } else {
                self.incarnation.clone()
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
            let write = async {
                match kind {
                    ClaimKind::Create | ClaimKind::Unplaceable(_) => state.create(&id, value).await,
                    ClaimKind::Replace(rev) => state.update(&id, value, rev).await,
                }
            };
            // A claim that hangs is a failed one (if it lands later, the
            // watch shows our record and reconcile adopts or releases it).
            let result = tokio::time::timeout(STORE_CALL_LIMIT, write)
                .await
                .unwrap_or_else(|_| Err(StoreError::Backend("claim timed out".into())));
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
        if self
            .claims
            .get(&r.id)
            .is_some_and(|c| c.revision > revision)
        {
            // Someone wrote the key after our claim landed (the watch was
            // faster than our answer): it is not ours to start.
            return;
        }
        if r.unplaceable {
            self.claims.insert(
                r.id.clone(),
                Claim {
                    owner: String::new(),
                    holder: self.holders.id("", ""),
                    revision,
                    avoid: r.avoid,
                    moves: r.moves,
                },
            );
            self.touch(&r.id);
            return;
        }
        self.claims.insert(
            r.id.clone(),
            Claim {
                owner: self.me.clone(),
                holder: self.holders.me.unwrap_or_default(),
                revision,
                avoid: r.avoid.clone(),
                moves: r.moves,
            },
        );
        self.touch(&r.id);
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
                ..
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
                    incarnation: self.incarnation.clone(),
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

    fn publish_event(&mut self, e: &Event) {
        let mut v = serde_json::to_value(e).unwrap_or_default();
        v["node"] = serde_json::Value::String(self.me.clone());
        let subject = self.subjects.event(e.workload(), e.name());
        self.events_out.send(subject, json_bytes(&v));
    }

    fn publish_cluster_event(&mut self, id: &str, event: &'static str, reason: &str) {
        match event {
            "claimed" => self.node.count_claim(),
            "released" => self.node.count_release(),
            _ => {}
        }
        let v = serde_json::json!({
            "event": event, "workload": id, "node": self.me, "reason": reason,
        });
        let subject = self.subjects.event(id, event);
        self.events_out.send(subject, json_bytes(&v));
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
