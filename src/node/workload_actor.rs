//! The workload actor: one per workload, linked to the node's supervisor.
//!
//! The actor owns one device instance and is its only caller. It never awaits
//! device code itself: init, ping, each task and stop run in spawned tasks
//! under [`guarded`] (timeout + panic capture) and report back as messages, so
//! the mailbox stays responsive — a full queue answers `busy` at once, a
//! delete is seen while a task hangs. A panic in device code comes back as
//! `DevicePanicked`, and the actor then fails on purpose so the supervisor
//! restarts it with a fresh instance.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ottomato_actors::{Task, TaskError, Workload};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::guard::{guarded, Guarded};
use super::slot::Slot;
use super::Shared;
use crate::config::backoff;
use crate::events::Event;
use crate::status::Status;
use crate::wire::ErrorCode;

/// What a task came to: the task back (so the caller needn't clone it), the
/// return value or an error code and message, and how long the device took.
const LEASE_LOST: &str =
    "node lease expired (paused or cut off from the cluster): not touching the device";

pub(crate) struct TaskOutcome {
    pub(crate) task: Task,
    pub(crate) result: Result<Value, (ErrorCode, String)>,
    pub(crate) elapsed: Duration,
}

pub(crate) struct QueuedTask {
    pub(crate) task: Task,
    pub(crate) deadline: Instant,
    pub(crate) reply: Reply,
}

/// Where a task's outcome goes.
pub(crate) enum Reply {
    /// A caller awaiting it (the node API); it keeps its own deadline timer.
    Caller(RpcReplyPort<TaskOutcome>),
    /// A continuation (transport requests: encode and publish the answer),
    /// run in the task's own tokio task — no task waits per request.
    Then(Then),
}

type Continuation = Box<dyn FnOnce(Option<TaskOutcome>) -> BoxFuture<'static, ()> + Send>;

/// A continuation that runs exactly once: with the outcome, or with `None`
/// if the task is dropped unanswered (its actor died with it queued).
pub(crate) struct Then(Option<Continuation>);

impl Then {
    pub(crate) fn new(
        f: impl FnOnce(Option<TaskOutcome>) -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Then {
        Then(Some(Box::new(f)))
    }

    /// Runs it here (in an async context that may wait for it).
    pub(crate) async fn run(mut self, outcome: TaskOutcome) {
        if let Some(f) = self.0.take() {
            f(Some(outcome)).await;
        }
    }

    /// Runs it in a task of its own (from the actor, which must not wait).
    pub(crate) fn spawn(mut self, outcome: TaskOutcome) {
        if let Some(f) = self.0.take() {
            tokio::spawn(f(Some(outcome)));
        }
    }
}

impl Drop for Then {
    fn drop(&mut self) {
        if let (Some(f), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(f(None));
        }
    }
}

impl Reply {
    /// Delivers an outcome (a continuation runs in a task of its own).
    pub(crate) fn send(self, outcome: TaskOutcome) {
        match self {
            Reply::Caller(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Then(t) => t.spawn(outcome),
        }
    }

    fn is_then(&self) -> bool {
        matches!(self, Reply::Then(_))
    }
}

impl QueuedTask {
    fn refuse(self, code: ErrorCode, message: impl Into<String>) {
        self.reply.send(TaskOutcome {
            task: self.task,
            result: Err((code, message.into())),
            elapsed: Duration::ZERO,
        });
    }
}

pub(crate) enum WorkloadMsg {
    /// Start an init attempt.
    Init,
    /// An init attempt ended.
    InitDone(Guarded<Result<(), String>>),
    /// Health check due (from the scheduler).
    Ping,
    /// The health check ended.
    PingDone(Guarded<Result<(), String>>),
    /// Run a task (from the node API or a transport).
    RunTask(QueuedTask),
    /// A task finished and was answered; start the next.
    TaskDone,
    /// A queued task's deadline is due: answer the expired ones.
    ExpireQueued,
    /// Device code panicked in a spawned call: fail so the supervisor restarts us.
    DevicePanicked(String),
    /// Delete requested: stop the device and exit.
    Stop,
    /// The device's stop ended.
    StopDone(Guarded<Result<(), String>>),
}

pub(crate) struct WorkloadActor;

pub(crate) struct WorkloadArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) slot: Arc<Slot>,
    pub(crate) device: Arc<dyn Workload>,
}

#[derive(PartialEq)]
enum Phase {
    Initializing,
    Ready,
    Stopping,
}

pub(crate) struct WorkloadState {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    device: Arc<dyn Workload>,
    phase: Phase,
    init_attempts: u32,
    init_task: Option<AbortHandle>,
    ping_in_flight: bool,
    ping_failures: u32,
    queue: VecDeque<QueuedTask>,
    running: u32,
}

impl WorkloadState {
    fn concurrency(&self) -> u32 {
        self.slot
            .spec
            .concurrency
            .unwrap_or(self.shared.cfg.task_concurrency)
            .max(1)
    }

    fn queue_capacity(&self) -> usize {
        self.slot
            .spec
            .queue
            .unwrap_or(self.shared.cfg.queue_capacity) as usize
    }

    /// Sets the status, emits `event` and tells the state writer.
    fn transition(&self, status: Status, reason: Option<String>, event: Option<Event>) {
        let prev = self.slot.set_status(status, reason);
        if prev != status {
            tracing::info!(workload = &*self.slot.id, from = %prev, to = %status, "status");
            self.shared.status_changed(&self.slot);
        }
        if let Some(e) = event {
            self.shared.events.emit(e);
        }
    }

    fn drain_queue(&mut self, code: ErrorCode, message: &str) {
        for q in self.queue.drain(..) {
            q.refuse(code, message);
        }
    }

    fn start_tasks(&mut self, myself: &ActorRef<WorkloadMsg>) {
        if !self.shared.lease_valid() {
            // Paused or cut off past the lease: another node may own this
            // workload now. No device work until the node sorts it out.
            self.drain_queue(ErrorCode::Unavailable, LEASE_LOST);
            return;
        }
        while self.running < self.concurrency() {
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            let now = Instant::now();
            if now >= q.deadline {
                q.refuse(ErrorCode::DeadlineExceeded, "deadline passed while queued");
                continue;
            }
            self.running += 1;
            let device = self.device.clone();
            let myself = myself.clone();
            tokio::spawn(async move {
                let QueuedTask {
                    task,
                    deadline,
                    reply,
                } = q;
                let started = Instant::now();
                let ran = guarded(deadline - started, device.run_task(&task)).await;
                let elapsed = started.elapsed();
                let mut panicked = None;
                let result = match ran {
                    Guarded::Done(Ok(v)) => Ok(v),
                    Guarded::Done(Err(e)) => Err(task_error(e)),
                    Guarded::TimedOut(d) => Err((
                        ErrorCode::DeadlineExceeded,
                        format!("task did not finish within its deadline ({d:?} left)"),
                    )),
                    Guarded::Panicked(m) => {
                        panicked = Some(m.clone());
                        Err((ErrorCode::Panicked, format!("device panicked: {m}")))
                    }
                };
                let outcome = TaskOutcome {
                    task,
                    result,
                    elapsed,
                };
                match reply {
                    Reply::Caller(tx) => {
                        let _ = tx.send(outcome);
                    }
                    Reply::Then(then) => then.run(outcome).await,
                }
                let _ = myself.send_message(match panicked {
                    Some(m) => WorkloadMsg::DevicePanicked(m),
                    None => WorkloadMsg::TaskDone,
                });
            });
        }
    }

    fn start_init(&mut self, myself: &ActorRef<WorkloadMsg>) {
        if !self.shared.lease_valid() {
            myself.send_after(Duration::from_millis(500), || WorkloadMsg::Init);
            return;
        }
        self.init_attempts += 1;
        let device = self.device.clone();
        let myself = myself.clone();
        let limit = self.shared.cfg.init_timeout;
        let handle = tokio::spawn(async move {
            let r = guarded(limit, async { device.init().await.map_err(|e| e.0) }).await;
            let _ = myself.send_message(WorkloadMsg::InitDone(r));
        });
        self.init_task = Some(handle.abort_handle());
    }

    fn on_init_done(
        &mut self,
        myself: &ActorRef<WorkloadMsg>,
        r: Guarded<Result<(), String>>,
    ) -> Result<(), ActorProcessingErr> {
        self.init_task = None;
        if self.phase != Phase::Initializing {
            return Ok(());
        }
        let error = match r {
            Guarded::Done(Ok(())) => {
                self.phase = Phase::Ready;
                self.transition(
                    Status::Running,
                    None,
                    Some(Event::Initialized {
                        workload: self.slot.id.clone(),
                    }),
                );
                self.shared.schedule_health_checks(&self.slot);
                self.start_tasks(myself);
                return Ok(());
            }
            Guarded::Done(Err(e)) => e,
            Guarded::TimedOut(d) => format!("init timed out after {d:?}"),
            Guarded::Panicked(m) => return Err(format!("init panicked: {m}").into()),
        };
        let cfg = &self.shared.cfg;
        let retry_in = backoff(cfg.init_retry_min, cfg.init_retry_max, self.init_attempts);
        tracing::warn!(workload = &*self.slot.id, attempt = self.init_attempts, %error, ?retry_in, "init failed");
        self.transition(
            Status::Initializing,
            Some(format!(
                "init attempt {} failed: {error}; retrying in {retry_in:?}",
                self.init_attempts
            )),
            Some(Event::InitError {
                workload: self.slot.id.clone(),
                attempt: self.init_attempts,
                error: error.clone(),
                retry_in_ms: retry_in.as_millis() as u64,
            }),
        );
        self.shared.report_error(crate::NodeError::Backend(format!(
            "workload {}: init attempt {} failed: {error}",
            self.slot.id, self.init_attempts
        )));
        myself.send_after(retry_in, || WorkloadMsg::Init);
        Ok(())
    }

    fn start_ping(&mut self, myself: &ActorRef<WorkloadMsg>) {
        if self.phase != Phase::Ready || self.ping_in_flight || !self.shared.lease_valid() {
            return;
        }
        self.ping_in_flight = true;
        let device = self.device.clone();
        let myself = myself.clone();
        let limit = self.shared.cfg.ping_timeout;
        tokio::spawn(async move {
            let r = guarded(limit, async { device.ping().await.map_err(|e| e.0) }).await;
            let _ = myself.send_message(WorkloadMsg::PingDone(r));
        });
    }

    fn on_ping_done(&mut self, r: Guarded<Result<(), String>>) -> Result<(), ActorProcessingErr> {
        self.ping_in_flight = false;
        if self.phase != Phase::Ready {
            return Ok(());
        }
        self.slot.lock().last_ping = Some(std::time::SystemTime::now());
        let error = match r {
            Guarded::Done(Ok(())) => {
                self.ping_failures = 0;
                if matches!(self.slot.status(), Status::Unreachable | Status::Dead) {
                    self.transition(
                        Status::Running,
                        None,
                        Some(Event::Reachable {
                            workload: self.slot.id.clone(),
                        }),
                    );
                }
                return Ok(());
            }
            Guarded::Done(Err(e)) => e,
            Guarded::TimedOut(d) => format!("ping timed out after {d:?}"),
            Guarded::Panicked(m) => return Err(format!("ping panicked: {m}").into()),
        };
        self.ping_failures += 1;
        let failures = self.ping_failures;
        let cfg = &self.shared.cfg;
        if failures >= cfg.ping_down_threshold {
            if self.slot.status() != Status::Dead {
                self.transition(
                    Status::Dead,
                    Some(format!(
                        "{failures} consecutive ping failures; last: {error}"
                    )),
                    Some(Event::Dead {
                        workload: self.slot.id.clone(),
                        failures,
                        error,
                    }),
                );
                if cfg.remove_dead {
                    let _ = self.shared.request_delete(&self.slot);
                }
            }
        } else {
            self.transition(
                Status::Unreachable,
                Some(format!("ping failed: {error}")),
                Some(Event::Unreachable {
                    workload: self.slot.id.clone(),
                    failures,
                    error,
                }),
            );
        }
        Ok(())
    }

    fn on_run_task(&mut self, myself: &ActorRef<WorkloadMsg>, q: QueuedTask) {
        if self.phase == Phase::Stopping {
            return q.refuse(ErrorCode::Unavailable, "workload is being deleted");
        }
        if self.queue.len() >= self.queue_capacity() {
            return q.refuse(
                ErrorCode::Busy,
                format!(
                    "queue full ({} tasks waiting); retry later",
                    self.queue.len()
                ),
            );
        }
        let expiry = q.reply.is_then().then_some(q.deadline);
        self.queue.push_back(q);
        if self.phase == Phase::Ready {
            self.start_tasks(myself);
        }
        // A continuation has nobody timing it: if it still waits, answer it
        // at its deadline (a caller's own timer does that for `Caller`).
        if let Some(deadline) = expiry.filter(|_| !self.queue.is_empty()) {
            let wait = deadline.saturating_duration_since(Instant::now());
            myself.send_after(wait, || WorkloadMsg::ExpireQueued);
        }
    }

    /// Answers every queued task whose deadline has passed.
    fn expire_queued(&mut self) {
        let now = Instant::now();
        let (expired, waiting): (VecDeque<QueuedTask>, VecDeque<QueuedTask>) =
            self.queue.drain(..).partition(|q| q.deadline <= now);
        self.queue = waiting;
        for q in expired {
            q.refuse(ErrorCode::DeadlineExceeded, "deadline passed while queued");
        }
    }

    fn start_stop(&mut self, myself: &ActorRef<WorkloadMsg>) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.phase = Phase::Stopping;
        self.slot.cancel_health_checks();
        if let Some(h) = self.init_task.take() {
            h.abort();
        }
        self.drain_queue(ErrorCode::Unavailable, "workload is being deleted");
        self.transition(Status::Stopping, None, None);
        let device = self.device.clone();
        let myself = myself.clone();
        let limit = self.shared.cfg.stop_timeout;
        tokio::spawn(async move {
            let r = guarded(limit, async { device.stop().await.map_err(|e| e.0) }).await;
            let _ = myself.send_message(WorkloadMsg::StopDone(r));
        });
    }

    fn on_stop_done(&mut self, myself: &ActorRef<WorkloadMsg>, r: Guarded<Result<(), String>>) {
        let error = match r {
            Guarded::Done(Ok(())) => None,
            Guarded::Done(Err(e)) => Some(e),
            Guarded::TimedOut(d) => Some(format!("stop timed out after {d:?}")),
            Guarded::Panicked(m) => Some(format!("stop panicked: {m}")),
        };
        if let Some(error) = error {
            tracing::warn!(workload = &*self.slot.id, %error, "stop failed");
            self.shared.events.emit(Event::StopError {
                workload: self.slot.id.clone(),
                error,
            });
        }
        myself.stop(Some("deleted".into()));
    }

    /// Before failing on purpose: answer everyone waiting and give the broken
    /// instance a bounded chance to disconnect, off our path.
    fn abandon_instance(&mut self, why: &str) {
        self.slot.cancel_health_checks();
        if let Some(h) = self.init_task.take() {
            h.abort();
        }
        self.drain_queue(
            ErrorCode::Unavailable,
            &format!("workload is restarting after a failure: {why}"),
        );
        let device = self.device.clone();
        let limit = self.shared.cfg.stop_timeout;
        tokio::spawn(async move {
            let _ = guarded(limit, device.stop()).await;
        });
    }
}

fn task_error(e: TaskError) -> (ErrorCode, String) {
    let code = match &e {
        TaskError::UnknownCommand(_) => ErrorCode::UnknownCommand,
        TaskError::InvalidArgs(_) => ErrorCode::InvalidArgs,
        TaskError::Failed(_) => ErrorCode::TaskFailed,
    };
    (code, e.to_string())
}

#[ractor::async_trait]
impl Actor for WorkloadActor {
    type Msg = WorkloadMsg;
    type State = WorkloadState;
    type Arguments = WorkloadArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<WorkloadMsg>,
        args: WorkloadArgs,
    ) -> Result<WorkloadState, ActorProcessingErr> {
        Ok(WorkloadState {
            shared: args.shared,
            slot: args.slot,
            device: args.device,
            phase: Phase::Initializing,
            init_attempts: 0,
            init_task: None,
            ping_in_flight: false,
            ping_failures: 0,
            queue: VecDeque::new(),
            running: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<WorkloadMsg>,
        state: &mut WorkloadState,
    ) -> Result<(), ActorProcessingErr> {
        state.start_init(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkloadMsg>,
        msg: WorkloadMsg,
        state: &mut WorkloadState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkloadMsg::Init => {
                if state.phase == Phase::Initializing && state.init_task.is_none() {
                    state.start_init(&myself);
                }
            }
            WorkloadMsg::InitDone(r) => {
                if let Err(e) = state.on_init_done(&myself, r) {
                    state.abandon_instance(&e.to_string());
                    return Err(e);
                }
            }
            WorkloadMsg::Ping => state.start_ping(&myself),
            WorkloadMsg::PingDone(r) => {
                if let Err(e) = state.on_ping_done(r) {
                    state.abandon_instance(&e.to_string());
                    return Err(e);
                }
            }
            WorkloadMsg::RunTask(q) => state.on_run_task(&myself, q),
            WorkloadMsg::ExpireQueued => state.expire_queued(),
            WorkloadMsg::TaskDone => {
                state.running = state.running.saturating_sub(1);
                if state.phase == Phase::Ready {
                    state.start_tasks(&myself);
                }
            }
            WorkloadMsg::DevicePanicked(m) => {
                if state.phase != Phase::Stopping {
                    let why = format!("task panicked: {m}");
                    state.abandon_instance(&why);
                    return Err(why.into());
                }
            }
            WorkloadMsg::Stop => state.start_stop(&myself),
            WorkloadMsg::StopDone(r) => state.on_stop_done(&myself, r),
        }
        Ok(())
    }
}
