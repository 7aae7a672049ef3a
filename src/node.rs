//! The node: a handle on a set of supervised workloads.
//!
//! ```text
//!   Node (cheap handle, Arc<Shared>)
//!     │ add / delete / run_task / workloads / scheduled / subscribe / stop
//!     ▼
//!   Shared ── registry: id → Slot ──────────────┐
//!     │                                         │
//!     ├── Supervisor actor ── WorkloadActor × N (linked, one per workload)
//!     ├── health scheduler task ── Ping ──────▶ WorkloadActor
//!     ├── state writer task ── create / CAS ──▶ StateStore bucket <prefix>_state
//!     └── TaskServer ◀── requests on <prefix>.task.<class>.<id> ── Transport
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use ottomato_actors::{CommandClass, Kind};
use ractor::{Actor, ActorRef};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::time::Instant;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::events::{ErrorCallback, Event, EventBus, EventCallback, EventReceiver};
use crate::kinds::Kinds;
use crate::results::{MemoryResults, ResultPublisher, ResultQuery, ResultStore, StoredResult};
use crate::schedule::{Schedule, ScheduleSpec};
use crate::spec::{validate_id, WorkloadSpec};
use crate::status::{ScheduledJob, Status, WorkloadInfo};
use crate::store::{MemoryStore, StateStore};
use crate::subjects::Subjects;
use crate::transport::{MemoryTransport, RequestHandler, Transport};
use crate::wire::{ErrorCode, Task, TaskResult};

pub mod counters;
mod guard;
mod health;
pub mod scheduler;
mod serve;
mod slot;
mod state_writer;
mod supervisor;
mod workload_actor;

use slot::Slot;
use state_writer::WriteCmd;
use supervisor::{Supervisor, SupervisorMsg};
use workload_actor::{QueuedTask, Reply, TaskOutcome, Then, WorkloadMsg};

/// Extra time the caller waits past a task's deadline for the workload's own
/// `deadline_exceeded` answer before answering it itself.
const DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// State shared by the node handle, its actors and its tasks.
pub(crate) struct Shared {
    pub(crate) cfg: NodeConfig,
    pub(crate) node_id: Arc<str>,
    /// Random id of this process (new at every start), written in every
    /// state record it owns: a restarted node does not own its
    /// predecessor's claims.
    pub(crate) incarnation: Arc<str>,
    hostname: Arc<str>,
    pub(crate) kinds: Kinds,
    pub(crate) subjects: Subjects,
    registry: RwLock<HashMap<Arc<str>, Arc<Slot>>>,
    /// Signalled whenever a workload is removed (for `stop`).
    removed: Notify,
    pub(crate) events: EventBus,
    errors: broadcast::Sender<NodeError>,
    health: mpsc::UnboundedSender<Arc<Slot>>,
    writer: OnceLock<mpsc::UnboundedSender<WriteCmd>>,
    pub(crate) transport: Arc<dyn Transport>,
    server: OnceLock<Arc<dyn RequestHandler>>,
    fanout: OnceLock<Arc<dyn RequestHandler>>,
    supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    shutting_down: AtomicBool,
    /// Until when this node may do device work (unlimited in embedded mode).
    pub(crate) lease: guard::Lease,
    /// What the node counted (tasks, pings, inits, claims…), for metrics.
    pub(crate) counters: counters::Counters,
    /// Result history: the store, and the bounded buffer in front of it.
    pub(crate) result_store: Arc<dyn ResultStore>,
    pub(crate) results: Arc<ResultPublisher>,
    /// The schedules bucket.
    schedules: Arc<dyn crate::store::KvBucket>,
    scheduler: OnceLock<scheduler::SchedulerHandle>,
}

impl Shared {
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Slot>>> {
        // Inserts and removes are single operations: a panic can't leave it torn.
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<Slot>>> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        self.registry().get(id).cloned()
    }

    /// Whether this node may do device work now (an atomic read, no I/O).
    pub(crate) fn lease_valid(&self) -> bool {
        self.lease.valid()
    }

    /// Whether `slot` is still the node's record for its id.
    pub(crate) fn holds(&self, slot: &Arc<Slot>) -> bool {
        self.registry()
            .get(&slot.id)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// Queues a state write for `slot` (coalesced).
    pub(crate) fn status_changed(&self, slot: &Arc<Slot>) {
        if !slot.dirty.swap(true, Ordering::AcqRel) {
            if let Some(w) = self.writer.get() {
                let _ = w.send(WriteCmd::Upsert(slot.clone()));
            }
        }
    }

    pub(crate) fn schedule_health_checks(&self, slot: &Arc<Slot>) {
        let _ = self.health.send(slot.clone());
    }

    pub(crate) fn report_error(&self, e: NodeError) {
        let _ = self.errors.send(e);
    }

    /// Starts removing a workload: stop its actor, then `finish_removal`.
    pub(crate) fn request_delete(&self, slot: &Arc<Slot>) -> Result<(), NodeError> {
        {
            let mut g = slot.lock();
            if g.deleting {
                return Err(NodeError::Stopping(slot.id.to_string()));
            }
            g.deleting = true;
        }
        slot.cancel_health_checks();
        slot.set_status(Status::Stopping, None);
        self.status_changed(slot);
        self.send_supervisor(SupervisorMsg::Delete(slot.clone()))
    }

    /// The node has lost the right to run `slot`: stop it now, and do not
    /// touch its state key again.
    pub(crate) fn fence(&self, slot: &Arc<Slot>, reason: String) {
        let (was_deleting, actor) = {
            let mut g = slot.lock();
            if g.fenced.is_some() {
                return;
            }
            g.fenced = Some(reason.clone().into_boxed_str());
            counters::Counters::inc(&self.counters.fences);
            let was = g.deleting;
            g.deleting = true;
            (was, g.actor.clone())
        };
        tracing::error!(workload = &*slot.id, %reason, "fencing workload");
        slot.cancel_health_checks();
        // Straight to the actor, so its calls are cancelled at once (also
        // when a release is already under way: it becomes a fence).
        if let Some(actor) = actor {
            let _ = actor.send_message(WorkloadMsg::Stop);
        }
        if was_deleting {
            return;
        }
        self.events.emit(Event::Failed {
            workload: slot.id.clone(),
            reason: reason.clone(),
        });
        self.report_error(NodeError::Backend(format!(
            "workload {}: {reason}",
            slot.id
        )));
        let _ = self.send_supervisor(SupervisorMsg::Delete(slot.clone()));
    }

    /// The last step of a delete: the actor is gone.
    pub(crate) fn finish_removal(&self, slot: &Arc<Slot>) {
        slot.cancel_health_checks();
        let (fenced, handover) = {
            let mut g = slot.lock();
            (
                g.fenced.is_some(),
                g.extra.as_mut().and_then(|e| e.handover.take()),
            )
        };
        {
            let mut reg = self.registry_mut();
            if reg.get(&slot.id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                reg.remove(&slot.id);
            }
        }
        if !fenced {
            if let Some(w) = self.writer.get() {
                let cmd = match handover {
                    Some(record) => WriteCmd::Handover(slot.id.clone(), record),
                    None => WriteCmd::Remove(slot.id.clone()),
                };
                let _ = w.send(cmd);
            }
        }
        tracing::info!(workload = &*slot.id, "deleted");
        self.events.emit(Event::Deleted {
            workload: slot.id.clone(),
        });
        self.removed.notify_waiters();
    }

    /// Ids of the workloads on this node that match a selection (and are not being deleted).
    pub(crate) fn matching(
        &self,
        glob: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Vec<String> {
        let reg = self.registry();
        let mut ids: Vec<String> = reg
            .values()
            .filter(|s| glob.is_none_or(|g| crate::wire::glob_match(g, &s.id)))
            .filter(|s| labels.iter().all(|(k, v)| s.spec.labels.get(k) == Some(v)))
            .filter(|s| !s.lock().deleting)
            .map(|s| s.id.to_string())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Stops answering task requests on `subject`.
    pub(crate) async fn unserve_task(
        &self,
        subject: &str,
    ) -> Result<(), crate::transport::TransportError> {
        match self.server.get() {
            Some(server) => self.transport.unserve(subject, server).await,
            None => Ok(()),
        }
    }

    fn send_supervisor(&self, msg: SupervisorMsg) -> Result<(), NodeError> {
        self.supervisor
            .get()
            .ok_or(NodeError::ShuttingDown)?
            .send_message(msg)
            .map_err(|_| NodeError::ShuttingDown)
    }

    /// Builds the result of a task for `id`.
    pub(crate) fn result(
        &self,
        id: &str,
        slot: Option<&Slot>,
        task: Task,
        result: Result<serde_json::Value, (ErrorCode, String)>,
        elapsed: Duration,
    ) -> TaskResult {
        let (success, ret, error, error_code) = match result {
            Ok(v) => (true, v, None, None),
            Err((code, msg)) => (false, serde_json::Value::Null, Some(msg), Some(code)),
        };
        self.counters.task_done(error_code, elapsed);
        TaskResult {
            // A v4 UUID from the thread-local CSPRNG: `Uuid::new_v4` makes
            // a getrandom syscall per call, measurable at 50k tasks/s.
            job_id: uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string(),
            worker_id: self.node_id.to_string(),
            workload: id.to_string(),
            hostname: self.hostname.to_string(),
            tags: slot.map(|s| s.spec.labels.clone()).unwrap_or_default(),
            command: task.command,
            args: task.args,
            kwargs: task.kwargs,
            success,
            error,
            error_code,
            ret,
            timestamp: SystemTime::now(),
            execution_time: elapsed.as_secs_f64() * 1000.0,
            schedule_id: None,
            tick: None,
            caught_up: false,
        }
    }

    /// Hands a task to its workload's actor, or says why not (with the task
    /// and its reply back).
    fn route(
        &self,
        id: &str,
        slot: Option<&Arc<Slot>>,
        task: Task,
        class: CommandClass,
        deadline: Instant,
        reply: Reply,
    ) -> Result<(), Box<Refused>> {
        let Some(slot) = slot else {
            let msg = format!("workload {id:?} not found on this node");
            return Err(Box::new(Refused(task, reply, ErrorCode::NotFound, msg)));
        };
        let (actor, refusal) = {
            let g = slot.lock();
            let refusal = match g.status {
                _ if g.deleting => Some("workload is being deleted".to_string()),
                Status::Failed | Status::Restarting => Some(format!(
                    "workload is {}: {}",
                    g.status,
                    g.reason.as_deref().unwrap_or("no reason given")
                )),
                _ => None,
            };
            (g.actor.clone(), refusal)
        };
        let actor = match (actor, refusal) {
            (Some(actor), None) => actor,
            (_, refusal) => {
                let msg = refusal.unwrap_or_else(|| "workload has no running actor".into());
                return Err(Box::new(Refused(task, reply, ErrorCode::Unavailable, msg)));
            }
        };
        let queued = QueuedTask {
            task,
            class,
            deadline,
            reply,
        };
        match actor.send_message(WorkloadMsg::RunTask(queued)) {
            Err(ractor::MessagingErr::SendErr(WorkloadMsg::RunTask(q))) => Err(Box::new(Refused(
                q.task,
                q.reply,
                ErrorCode::Unavailable,
                "workload actor just stopped; retry".to_string(),
            ))),
            _ => Ok(()),
        }
    }

    /// Whether this node is sure it still owns `slot`: its lease holds and
    /// the workload is not fenced.
    pub(crate) fn owns(&self, slot: Option<&Arc<Slot>>) -> bool {
        self.lease_valid() && slot.is_some_and(|s| s.lock().fenced.is_none())
    }

    pub(crate) async fn run_task(
        &self,
        id: &str,
        task: Task,
        class: CommandClass,
        timeout: Duration,
    ) -> TaskResult {
        let deadline = Instant::now() + timeout.min(self.cfg.max_task_deadline);
        let command = task.command.clone();
        let (tx, rx) = ractor::concurrency::oneshot();
        let slot = self.slot(id);
        let reply = Reply::Caller(tx.into());
        if let Err(refused) = self.route(id, slot.as_ref(), task, class, deadline, reply) {
            let Refused(task, _, code, msg) = *refused;
            return self.result(id, slot.as_deref(), task, Err((code, msg)), Duration::ZERO);
        }
        let lost = |code, msg: &str| {
            self.result(
                id,
                slot.as_deref(),
                Task::new(command.clone()),
                Err((code, msg.to_string())),
                Duration::ZERO,
            )
        };
        match tokio::time::timeout_at(deadline + DEADLINE_GRACE, rx).await {
            Ok(Ok(TaskOutcome {
                task,
                result,
                elapsed,
                ..
            })) => self.result(id, slot.as_deref(), task, result, elapsed),
            Ok(Err(_)) => lost(
                ErrorCode::Unavailable,
                "workload restarted before answering",
            ),
            Err(_) => lost(ErrorCode::DeadlineExceeded, "no answer within the deadline"),
        }
    }

    /// Runs a task and hands its result to `then`, in the task's own tokio
    /// task: what transports use, so no task waits per request.
    pub(crate) fn submit_task(
        self: &Arc<Self>,
        id: &str,
        task: Task,
        class: CommandClass,
        timeout: Duration,
        then: impl FnOnce(TaskResult) -> BoxFuture<'static, ()> + Send + 'static,
    ) {
        let shared = self.clone();
        let key = id.to_string();
        let command = task.command.clone();
        let slot = self.slot(id);
        let held = slot.clone();
        let cont = Then::new(move |outcome: Option<TaskOutcome>| {
            let slot = held;
            // A node that is not sure it owns the workload (lease run out,
            // fenced, or the workload gone from it) stays silent: the owner's
            // answer must be the only one. A device call that ran to its end
            // here did run here, so its result is the truth and is sent.
            if !outcome.as_ref().is_some_and(|o| o.ran) && !shared.owns(slot.as_ref()) {
                tracing::debug!(workload = %key, "not answering: not sure this node owns it");
                return Box::pin(async {}) as BoxFuture<'static, ()>;
            }
            let result = match outcome {
                Some(o) => shared.result(&key, slot.as_deref(), o.task, o.result, o.elapsed),
                None => shared.result(
                    &key,
                    slot.as_deref(),
                    Task::new(command),
                    Err((
                        ErrorCode::Unavailable,
                        "workload restarted before answering".into(),
                    )),
                    Duration::ZERO,
                ),
            };
            then(result)
        });
        let deadline = Instant::now() + timeout.min(self.cfg.max_task_deadline);
        if let Err(refused) =
            self.route(id, slot.as_ref(), task, class, deadline, Reply::Then(cont))
        {
            let Refused(task, reply, code, msg) = *refused;
            reply.send(TaskOutcome {
                task,
                result: Err((code, msg)),
                elapsed: Duration::ZERO,
                ran: false,
            });
        }
    }
}

/// A task [`Shared::route`] could not hand over, and why.
struct Refused(Task, Reply, ErrorCode, String);

/// A running node. Cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.shared.node_id)
            .field("workloads", &self.shared.registry().len())
            .finish()
    }
}

impl Node {
    /// Starts building a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.shared.node_id
    }

    /// The device kinds this node runs, sorted.
    pub fn kind_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .kinds
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        v.sort_unstable();
        v
    }

    /// This process's incarnation: random, new at every start.
    pub fn incarnation(&self) -> &str {
        &self.shared.incarnation
    }

    /// The settings it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.cfg
    }

    /// The transport its workloads' task subjects are served on.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.shared.transport.clone()
    }

    /// The subject and bucket names it uses.
    pub fn subjects(&self) -> &Subjects {
        &self.shared.subjects
    }

    /// Adds a workload and starts it: returns once its actor is being started,
    /// without waiting for `init`. Refuses an invalid id, a duplicate id, an
    /// unknown kind or a config the kind rejects.
    pub async fn add_workload(&self, spec: WorkloadSpec) -> Result<(), NodeError> {
        self.add_workload_inner(spec, None).await
    }

    /// Adds a workload whose state key this node already claimed at
    /// `revision` (cluster mode): status writes continue by CAS from there.
    pub(crate) async fn add_claimed_workload(
        &self,
        spec: WorkloadSpec,
        revision: u64,
        avoid: Vec<String>,
        moves: u32,
    ) -> Result<(), NodeError> {
        self.add_workload_inner(spec, Some((revision, avoid, moves)))
            .await
    }

    /// Deletes a workload like `delete_workload`, but leaves `record` in its
    /// state key (by CAS) instead of deleting the key: a handover.
    pub(crate) fn hand_over_workload(
        &self,
        id: &str,
        record: bytes::Bytes,
    ) -> Result<(), NodeError> {
        let slot = self
            .shared
            .slot(id)
            .ok_or_else(|| NodeError::NotFound(id.to_string()))?;
        if slot.lock().deleting {
            return Err(NodeError::Stopping(id.to_string()));
        }
        slot.lock().extra_mut().handover = Some(record);
        self.shared.request_delete(&slot)
    }

    /// Lets the node do device work until `until` (cluster mode: the last
    /// acknowledged heartbeat plus the TTL, minus a margin).
    pub(crate) fn renew_lease(&self, until: Instant) {
        self.shared.lease.renew(until);
        counters::Counters::inc(&self.shared.counters.lease_renewals);
    }

    /// Ends the lease now: every device call in flight is cancelled at its
    /// next poll and no new one starts.
    pub(crate) fn revoke_lease(&self) {
        self.shared.lease.revoke();
    }

    /// Whether the node may do device work now.
    pub fn lease_valid(&self) -> bool {
        self.shared.lease_valid()
    }

    /// Ids of every workload on the node.
    pub fn workload_ids(&self) -> Vec<String> {
        self.shared
            .registry()
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    /// Whether workload `id` is on the node (in any status).
    pub fn has_workload(&self, id: &str) -> bool {
        self.shared.registry().contains_key(id)
    }

    /// Stops workload `id` at once because this node lost the right to run
    /// it; its state key is not touched again.
    pub(crate) fn fence_workload(&self, id: &str, reason: String) {
        if let Some(slot) = self.shared.slot(id) {
            self.shared.fence(&slot, reason);
        }
    }

    async fn add_workload_inner(
        &self,
        spec: WorkloadSpec,
        claimed: Option<(u64, Vec<String>, u32)>,
    ) -> Result<(), NodeError> {
        let sh = &self.shared;
        if sh.shutting_down.load(Ordering::Acquire) {
            return Err(NodeError::ShuttingDown);
        }
        validate_id(&spec.id).map_err(NodeError::InvalidId)?;
        let device = sh.kinds.create(&spec)?;
        let slot = Arc::new(Slot::new(spec));
        let claimed = claimed.map(|(rev, avoid, moves)| {
            if !avoid.is_empty() || moves > 0 {
                let mut g = slot.lock();
                let e = g.extra_mut();
                e.avoid = avoid;
                e.moves = moves;
            }
            rev
        });
        {
            let mut reg = sh.registry_mut();
            if let Some(existing) = reg.get(&slot.id) {
                return Err(if existing.lock().deleting {
                    NodeError::Stopping(slot.id.to_string())
                } else {
                    NodeError::AlreadyExists(slot.id.to_string())
                });
            }
            reg.insert(slot.id.clone(), slot.clone());
        }
        if let (Some(rev), Some(w)) = (claimed, sh.writer.get()) {
            let _ = w.send(WriteCmd::Adopt(slot.id.clone(), rev));
        }
        sh.status_changed(&slot);
        sh.events.emit(Event::Added {
            workload: slot.id.clone(),
        });
        if let Some(server) = sh.server.get() {
            let subject = sh.subjects.task_served(&slot.id);
            if let Err(e) = sh.transport.serve(&subject, server.clone()).await {
                sh.report_error(NodeError::Backend(format!("serve {subject}: {e}")));
            }
        }
        sh.send_supervisor(SupervisorMsg::Spawn(slot, device))
    }

    /// Deletes a workload: it stops taking tasks at once; its device's `stop`
    /// runs in the background (with the stop timeout) and `Deleted` follows.
    pub fn delete_workload(&self, id: &str) -> Result<(), NodeError> {
        let slot = self
            .shared
            .slot(id)
            .ok_or_else(|| NodeError::NotFound(id.to_string()))?;
        self.shared.request_delete(&slot)
    }

    /// A snapshot of every workload, sorted by id.
    pub fn workloads(&self) -> Vec<WorkloadInfo> {
        let slots: Vec<Arc<Slot>> = self.shared.registry().values().cloned().collect();
        let mut v: Vec<WorkloadInfo> = slots.iter().map(|s| s.info()).collect();
        v.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// One workload's snapshot.
    pub fn workload(&self, id: &str) -> Option<WorkloadInfo> {
        self.shared.slot(id).map(|s| s.info())
    }

    /// Waits until a workload reaches `status` (e.g. `Running` after
    /// [`Node::add_workload`], whose init runs off the caller's path).
    pub async fn wait_for_status(
        &self,
        id: &str,
        status: Status,
        timeout: Duration,
    ) -> Result<WorkloadInfo, NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self
                .workload(id)
                .ok_or_else(|| NodeError::NotFound(id.to_string()))?;
            if info.status == status {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeError::WaitTimedOut {
                    id: id.to_string(),
                    status: info.status,
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the node counted since it started (tasks, pings, inits, claims…).
    pub fn counters(&self) -> counters::Snapshot {
        let mut s = self.shared.counters.snapshot();
        let r = &self.shared.results;
        s.results_stored = r.stored.load(Ordering::Relaxed);
        s.results_dropped = r.dropped.load(Ordering::Relaxed);
        s.results_failed = r.failed.load(Ordering::Relaxed);
        s
    }

    /// Writes (creates or replaces) schedule `id`; every node holding a
    /// workload it selects runs it from its next tick. Refused with the
    /// reason when invalid.
    pub async fn put_schedule(&self, id: &str, spec: &ScheduleSpec) -> Result<(), NodeError> {
        Schedule::parse(id, spec.clone()).map_err(NodeError::InvalidSchedule)?;
        let json =
            serde_json::to_vec(spec).map_err(|e| NodeError::InvalidSchedule(e.to_string()))?;
        self.shared
            .schedules
            .put(id, json.into())
            .await
            .map(drop)
            .map_err(|e| NodeError::Backend(e.to_string()))
    }

    /// Deletes schedule `id` (runs in flight finish; no new ones start).
    pub async fn delete_schedule(&self, id: &str) -> Result<(), NodeError> {
        self.shared
            .schedules
            .delete(id, None)
            .await
            .map_err(|e| NodeError::Backend(e.to_string()))
    }

    /// Every stored schedule, by id (an invalid one with its error).
    pub async fn schedules(&self) -> Result<Vec<(String, Result<Schedule, String>)>, NodeError> {
        crate::schedule::read_all(&self.shared.schedules)
            .await
            .map_err(|e| NodeError::Backend(e.to_string()))
    }

    /// Stored results (`query` selects; oldest first).
    pub async fn results(&self, query: &ResultQuery) -> Result<Vec<StoredResult>, NodeError> {
        self.shared
            .result_store
            .query(query)
            .await
            .map_err(|e| NodeError::Backend(e.to_string()))
    }

    /// Waits until every result handed over so far is stored (or `timeout`).
    pub async fn flush_results(&self, timeout: Duration) -> bool {
        self.shared.results.flush(timeout).await
    }

    pub(crate) fn count_claim(&self) {
        counters::Counters::inc(&self.shared.counters.claims);
    }

    pub(crate) fn count_release(&self) {
        counters::Counters::inc(&self.shared.counters.releases);
    }

    /// Time left on the lease (cluster mode); `None` when unlimited (embedded).
    pub fn lease_remaining(&self) -> Option<std::time::Duration> {
        self.shared
            .lease
            .until()
            .map(|u| u.saturating_duration_since(Instant::now()))
    }

    /// Workloads by (status, kind): what the metrics export (bounded labels).
    pub fn count_by_status_and_kind(&self) -> HashMap<(Status, String), usize> {
        let mut out: HashMap<(Status, String), usize> = HashMap::new();
        for slot in self.shared.registry().values() {
            *out.entry((slot.status(), slot.spec.kind.clone()))
                .or_default() += 1;
        }
        out
    }

    /// How many workloads are in each status (cheaper than `workloads()`).
    pub fn count_by_status(&self) -> HashMap<Status, usize> {
        let slots: Vec<Arc<Slot>> = self.shared.registry().values().cloned().collect();
        let mut m = HashMap::new();
        for s in slots {
            *m.entry(s.status()).or_insert(0) += 1;
        }
        m
    }

    /// Number of workloads on the node.
    pub fn len(&self) -> usize {
        self.shared.registry().len()
    }

    /// Whether the node has no workloads.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The health-check jobs: one per initialised workload, with last and next run.
    pub fn scheduled(&self) -> Vec<ScheduledJob> {
        let slots: Vec<Arc<Slot>> = self.shared.registry().values().cloned().collect();
        let mut v: Vec<ScheduledJob> = slots
            .iter()
            .map(|s| s.scheduled())
            .filter(|j| j.next_run.is_some())
            .collect();
        v.sort_unstable_by(|a, b| a.workload.cmp(&b.workload));
        v
    }

    /// Runs a task with the node's default deadline (any command class:
    /// the embedding program has every right).
    pub async fn run_task(&self, id: &str, task: Task) -> TaskResult {
        self.shared
            .run_task(id, task, CommandClass::Write, self.shared.cfg.task_timeout)
            .await
    }

    /// Runs a task with its own deadline.
    pub async fn run_task_with_timeout(
        &self,
        id: &str,
        task: Task,
        timeout: Duration,
    ) -> TaskResult {
        self.shared
            .run_task(id, task, CommandClass::Write, timeout)
            .await
    }

    /// Runs a task as if it came on a `class` subject: with
    /// [`CommandClass::Read`], a write-class command is answered `forbidden`.
    pub async fn run_task_as(
        &self,
        id: &str,
        task: Task,
        class: CommandClass,
        timeout: Duration,
    ) -> TaskResult {
        self.shared.run_task(id, task, class, timeout).await
    }

    /// Subscribes to lifecycle events. A subscriber that falls more than
    /// `event_capacity` events behind misses the oldest (`RecvError::Lagged`);
    /// it never slows the node.
    pub fn subscribe(&self) -> EventReceiver {
        self.shared.events.subscribe()
    }

    /// Waits until every status change so far is written to the state store.
    pub async fn flush_state(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Some(w) = self.shared.writer.get() {
            if w.send(WriteCmd::Flush(tx)).is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Stops the node: deletes every workload (their stops run in parallel,
    /// each bounded by the stop timeout) and waits for them, then stops the
    /// supervisor. Further calls are refused with `ShuttingDown`.
    pub async fn stop(&self) {
        let sh = &self.shared;
        sh.shutting_down.store(true, Ordering::Release);
        let slots: Vec<Arc<Slot>> = sh.registry().values().cloned().collect();
        for slot in &slots {
            let _ = sh.request_delete(slot);
        }
        let deadline = Instant::now() + sh.cfg.stop_timeout + Duration::from_secs(2);
        loop {
            let removed = sh.removed.notified();
            if sh.registry().is_empty() || Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, removed).await;
        }
        if let Some(f) = sh.fanout.get() {
            let _ = sh.transport.unserve(&sh.subjects.fanout_served(), f).await;
        }
        // Bounded: with the store unreachable, writes never complete.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flush_state()).await;
        if let Some(sup) = sh.supervisor.get() {
            let _ = sup.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        }
    }
}

/// Builds a [`Node`] with the original's options.
#[derive(Default)]
pub struct NodeBuilder {
    cfg: NodeConfig,
    kinds: Kinds,
    on_event: Vec<EventCallback>,
    on_error: Vec<ErrorCallback>,
    store: Option<Arc<dyn StateStore>>,
    transport: Option<Arc<dyn Transport>>,
    subjects: Option<Subjects>,
    state_replicas: usize,
    results: Option<Arc<dyn ResultStore>>,
    clock: scheduler::ScheduleClock,
}

impl NodeBuilder {
    /// Copies of the state bucket a clustered backend keeps (1 by default).
    pub fn state_replicas(mut self, n: usize) -> Self {
        self.state_replicas = n;
        self
    }

    /// Replaces all settings at once.
    pub fn config(mut self, cfg: NodeConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// The node id (a random UUID when not set).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.cfg.node_id = id.into();
        self
    }

    /// Adds a device kind the node can run.
    pub fn kind(mut self, kind: impl Kind) -> Self {
        self.kinds.register(kind);
        self
    }

    /// Registers every kind of `kinds` (e.g. [`Kinds::builtin`] plus your own).
    pub fn kinds(mut self, kinds: Kinds) -> Self {
        self.kinds.extend(kinds);
        self
    }

    /// Bounds of the random interval between pings.
    pub fn ping_splay(mut self, min: Duration, max: Duration) -> Self {
        self.cfg.ping_splay_min = min;
        self.cfg.ping_splay_max = max;
        self
    }

    /// How long a ping may take.
    pub fn ping_timeout(mut self, d: Duration) -> Self {
        self.cfg.ping_timeout = d;
        self
    }

    /// Consecutive failed pings that make a workload dead.
    pub fn ping_down_threshold(mut self, n: u32) -> Self {
        self.cfg.ping_down_threshold = n;
        self
    }

    /// Delete dead workloads instead of checking them until they recover.
    pub fn remove_dead(mut self, yes: bool) -> Self {
        self.cfg.remove_dead = yes;
        self
    }

    /// How long `init` may take.
    pub fn init_timeout(mut self, d: Duration) -> Self {
        self.cfg.init_timeout = d;
        self
    }

    /// How long `stop` may take.
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.cfg.stop_timeout = d;
        self
    }

    /// Default task deadline.
    pub fn task_timeout(mut self, d: Duration) -> Self {
        self.cfg.task_timeout = d;
        self
    }

    /// Tasks that may wait per workload before `busy`.
    pub fn queue_capacity(mut self, n: u32) -> Self {
        self.cfg.queue_capacity = n;
        self
    }

    /// Called with every event, on the node's callback task.
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.on_event.push(Arc::new(f));
        self
    }

    /// Called with every error the node reports in the background.
    pub fn on_error(mut self, f: impl Fn(&NodeError) + Send + Sync + 'static) -> Self {
        self.on_error.push(Arc::new(f));
        self
    }

    /// Where status is written (in-memory by default).
    pub fn state_store(mut self, store: Arc<dyn StateStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Where task requests arrive (in-memory by default).
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Where results of scheduled runs (and of tasks that ask) are kept
    /// (in memory, with the default limits, by default).
    pub fn results(mut self, store: Arc<dyn ResultStore>) -> Self {
        self.results = Some(store);
        self
    }

    /// The clock schedules run on (the system clock by default; tests
    /// with a paused tokio clock use [`scheduler::ScheduleClock::Tokio`]).
    pub fn schedule_clock(mut self, clock: scheduler::ScheduleClock) -> Self {
        self.clock = clock;
        self
    }

    /// Subject and bucket prefix (`otto` by default).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subjects = Some(Subjects::new(prefix));
        self
    }

    /// Starts the node. Must run inside a tokio runtime.
    pub async fn start(self) -> Result<Node, NodeError> {
        let mut cfg = self.cfg;
        cfg.validate().map_err(NodeError::InvalidSettings)?;
        if cfg.node_id.is_empty() {
            cfg.node_id = uuid::Uuid::new_v4().to_string();
        }
        let subjects = self.subjects.unwrap_or_default();
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn StateStore>);
        // A NATS cluster still electing its JetStream leader refuses bucket
        // creation for a while: retry for up to 30 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        let open = |spec: crate::store::BucketSpec| {
            let store = store.clone();
            async move {
                loop {
                    match store.bucket(&spec).await {
                        Ok(b) => break Ok(b),
                        Err(e) if Instant::now() < deadline => {
                            tracing::warn!(bucket = %spec.name, error = %e, "bucket not ready; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => break Err(NodeError::Backend(format!("{}: {e}", spec.name))),
                    }
                }
            }
        };
        let bucket = open(subjects.state_bucket_spec_with(self.state_replicas.max(1))).await?;
        let schedules = open(subjects.schedules_bucket_spec(self.state_replicas.max(1))).await?;
        let result_store = self
            .results
            .unwrap_or_else(|| Arc::new(MemoryResults::default()) as Arc<dyn ResultStore>);
        let results = ResultPublisher::spawn(result_store.clone(), cfg.results_buffer);
        let transport = self
            .transport
            .unwrap_or_else(|| Arc::new(MemoryTransport::new()) as Arc<dyn Transport>);
        let events = EventBus::new(cfg.event_capacity);
        let (errors, _) = broadcast::channel(cfg.event_capacity.max(1));
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let shared = Arc::new(Shared {
            node_id: cfg.node_id.as_str().into(),
            incarnation: format!("{:016x}", rand::random::<u64>()).into(),
            health: health::spawn(&cfg),
            cfg,
            hostname: hostname.into(),
            kinds: self.kinds,
            subjects,
            registry: RwLock::new(HashMap::new()),
            removed: Notify::new(),
            events,
            errors,
            writer: OnceLock::new(),
            transport,
            server: OnceLock::new(),
            fanout: OnceLock::new(),
            supervisor: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            lease: guard::Lease::unlimited(),
            counters: Default::default(),
            result_store,
            results,
            schedules,
            scheduler: OnceLock::new(),
        });
        let _ = shared.writer.set(state_writer::spawn(
            Arc::downgrade(&shared),
            bucket,
            shared.node_id.clone(),
            shared.incarnation.clone(),
        ));
        let _ = shared.server.set(Arc::new(serve::TaskServer {
            shared: Arc::downgrade(&shared),
        }));
        let fanout: Arc<dyn RequestHandler> = Arc::new(serve::FanoutServer {
            shared: Arc::downgrade(&shared),
        });
        shared
            .transport
            .serve(&shared.subjects.fanout_served(), fanout.clone())
            .await
            .map_err(|e| NodeError::Backend(format!("serving fan-out: {e}")))?;
        let _ = shared.fanout.set(fanout);
        spawn_callbacks(&shared, self.on_event, self.on_error);
        let (sup, _) = Actor::spawn(None, Supervisor, shared.clone())
            .await
            .map_err(|e| NodeError::Backend(format!("starting supervisor: {e}")))?;
        let _ = shared.supervisor.set(sup);
        let handle = scheduler::spawn(
            &shared,
            scheduler::Clock::new(self.clock),
            shared.results.clone(),
            shared.result_store.clone(),
        );
        let _ = shared.scheduler.set(handle.clone());
        tokio::spawn(watch_schedules(Arc::downgrade(&shared), handle));
        tracing::info!(node = &*shared.node_id, "node started");
        Ok(Node { shared })
    }
}

/// Runs the callbacks on their own task, fed by their own subscriptions, so
/// a slow callback delays only itself.
fn spawn_callbacks(
    shared: &Arc<Shared>,
    on_event: Vec<EventCallback>,
    on_error: Vec<ErrorCallback>,
) {
    if !on_event.is_empty() {
        let mut rx = shared.events.subscribe();
        let errors = shared.errors.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => on_event.iter().for_each(|f| f(&e)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = errors.send(NodeError::Backend(format!(
                            "event callback fell behind; {n} events skipped"
                        )));
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    if !on_error.is_empty() {
        let mut rx = shared.errors.subscribe();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => on_error.iter().for_each(|f| f(&e)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

/// Feeds the scheduler from the schedules bucket: every change, for as
/// long as the node lives (re-watching after an error).
async fn watch_schedules(shared: std::sync::Weak<Shared>, handle: scheduler::SchedulerHandle) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(bucket) = shared.upgrade().map(|s| s.schedules.clone()) else {
            return;
        };
        match bucket.watch().await {
            Ok(mut w) => {
                backoff = Duration::from_millis(100);
                while let Some(c) = w.next().await {
                    let Some(sh) = shared.upgrade() else {
                        return;
                    };
                    match c {
                        crate::store::KvChange::Put(e) => {
                            match Schedule::from_json(&e.key, &e.value) {
                                Ok(s) => handle.send(scheduler::Msg::Put(Arc::new(s))),
                                Err(err) => {
                                    sh.report_error(NodeError::InvalidSchedule(format!(
                                        "schedule {}: {err}; not running it",
                                        e.key
                                    )));
                                    handle.send(scheduler::Msg::Remove(e.key.as_str().into()));
                                }
                            }
                        }
                        crate::store::KvChange::Delete { key, .. } => {
                            handle.send(scheduler::Msg::Remove(key.as_str().into()))
                        }
                        crate::store::KvChange::Synced => {}
                    }
                }
            }
            Err(e) => {
                if let Some(sh) = shared.upgrade() {
                    sh.report_error(NodeError::Backend(format!("watching schedules: {e}")));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
