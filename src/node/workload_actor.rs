//! The workload actor: one per workload, linked to the node's supervisor.
//!
//! The actor owns one device instance and is its only caller. It never awaits
//! device code itself: init, ping, each task and stop run in spawned tasks
//! under [`guarded`] (timeout + panic capture) and report back as messages, so
//! the mailbox stays responsive — a full queue answers `busy` at once, a
//! delete is seen while a task hangs. A panic in device code comes back as
//! `DevicePanicked`, and the actor then fails on purpose so the supervisor
//! restarts it with a fresh instance.
//!
//! **Invariant:** the actor exits (and so its key is released, or a fresh
//! instance is started) only after every device call of its instance has
//! ended — finished, timed out or cancelled — and, unless the instance is
//! abandoned, after the device's `stop` returned or timed out. A fenced
//! instance, or one whose node lost its lease, is abandoned: its calls are
//! cancelled and `stop` is not called (the device may belong to another
//! node by now).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ottomato_actors::{CommandClass, Task, TaskError, Workload};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::counters::Counters;
use super::guard::{guarded, Guarded, LEASE_LOST};
use super::slot::Slot;
use super::Shared;
use crate::config::backoff;
use crate::events::Event;
use crate::status::Status;
use crate::wire::ErrorCode;

/// What a task came to: the task back (so the caller needn't clone it), the
/// return value or an error code and message, how long the device took, and
/// whether device code ran to an end of its own (`false`: refused, or
/// cancelled before it finished).
pub(crate) struct TaskOutcome {
    pub(crate) task: Task,
    pub(crate) result: Result<Value, (ErrorCode, String)>,
    pub(crate) elapsed: Duration,
    pub(crate) ran: bool,
}

pub(crate) struct QueuedTask {
    pub(crate) task: Task,
    /// The class of the subject it came on: a `read` task may run only
    /// read-class commands.
    pub(crate) class: CommandClass,
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
            ran: false,
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
    /// A task ended and was answered; start the next.
    TaskDone,
    /// A queued task's deadline is due: answer the expired ones.
    ExpireQueued,
    /// Device code panicked in a spawned call: fail so the supervisor restarts us.
    DevicePanicked(String),
    /// Delete (or fence) requested: end the instance and exit. Sent again
    /// when a release in progress becomes a fence.
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
    /// Ending the instance; the actor exits once every call has ended.
    Stopping(Ending),
}

/// Why an instance ends.
#[derive(PartialEq, Clone)]
enum Ending {
    /// Deleted or released: tasks in flight finish, then `stop` runs.
    Release,
    /// Fenced: calls are cancelled, `stop` is not called.
    Fence,
    /// Device code panicked: calls are cancelled, `stop` runs, then the
    /// actor fails so the supervisor starts a fresh instance.
    Fail(String),
}

pub(crate) struct WorkloadState {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    device: Arc<dyn Workload>,
    phase: Phase,
    init_attempts: u32,
    /// Cancels every device call of this instance.
    cancel: CancellationToken,
    /// Cancels the init attempt in flight (a release does not wait for it).
    init_cancel: Option<CancellationToken>,
    ping_in_flight: bool,
    ping_failures: u32,
    queue: VecDeque<QueuedTask>,
    /// The queue length last added to the node's queue-depth gauge.
    reported_queue: usize,
    running: u32,
    /// The device's `stop` is running.
    stop_in_flight: bool,
    /// Cancels the device's `stop` (a fence during a release).
    stop_cancel: CancellationToken,
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
        let (prev, new_reason) = self.slot.set_status(status, reason);
        if prev != status {
            tracing::info!(workload = &*self.slot.id, from = %prev, to = %status, "status");
            self.shared.status_changed(&self.slot);
        } else if new_reason {
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
            // workload now. No device work until the node sorts it out
            // (these answers are not published: see `Shared::submit_task`).
            self.drain_queue(ErrorCode::Unavailable, LEASE_LOST);
            return;
        }
        if self.slot.lock().deleting {
            return; // a delete or fence is on its way: start nothing new
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
            let shared = self.shared.clone();
            let cancel = self.cancel.clone();
            tokio::spawn(async move {
                let QueuedTask {
                    task,
                    deadline,
                    reply,
                    ..
                } = q;
                let started = Instant::now();
                let call = guarded(
                    deadline - started,
                    &shared.lease,
                    &cancel,
                    device.run_task(&task),
                )
                .await;
                let elapsed = started.elapsed();
                let ran = call.ran();
                let mut panicked = None;
                let result = match call {
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
                    Guarded::Cancelled(why) => Err((ErrorCode::Unavailable, why.to_string())),
                };
                let outcome = TaskOutcome {
                    task,
                    result,
                    elapsed,
                    ran,
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
        if !self.shared.lease_valid() || self.slot.lock().deleting {
            myself.send_after(Duration::from_millis(500), || WorkloadMsg::Init);
            return;
        }
        self.init_attempts += 1;
        let device = self.device.clone();
        let myself = myself.clone();
        let limit = self.shared.cfg.init_timeout;
        let shared = self.shared.clone();
        let cancel = self.cancel.child_token();
        self.init_cancel = Some(cancel.clone());
        tokio::spawn(async move {
            let init = async { device.init().await.map_err(|e| e.0) };
            let r = guarded(limit, &shared.lease, &cancel, init).await;
            let _ = myself.send_message(WorkloadMsg::InitDone(r));
        });
    }

    fn on_init_done(
        &mut self,
        myself: &ActorRef<WorkloadMsg>,
        r: Guarded<Result<(), String>>,
    ) -> Result<(), ActorProcessingErr> {
        self.init_cancel = None;
        if self.phase != Phase::Initializing {
            self.finish_if_idle(myself);
            return Ok(());
        }
        if !matches!(r, Guarded::Cancelled(_)) {
            Counters::inc(&self.shared.counters.inits);
            if !matches!(r, Guarded::Done(Ok(()))) {
                Counters::inc(&self.shared.counters.init_failures);
            }
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
            Guarded::Cancelled(why) => why.to_string(),
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
        if self.phase != Phase::Ready
            || self.ping_in_flight
            || !self.shared.lease_valid()
            || self.slot.lock().deleting
        {
            return;
        }
        self.ping_in_flight = true;
        let device = self.device.clone();
        let myself = myself.clone();
        let limit = self.shared.cfg.ping_timeout;
        let shared = self.shared.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let ping = async { device.ping().await.map_err(|e| e.0) };
            let r = guarded(limit, &shared.lease, &cancel, ping).await;
            let _ = myself.send_message(WorkloadMsg::PingDone(r));
        });
    }

    fn on_ping_done(
        &mut self,
        myself: &ActorRef<WorkloadMsg>,
        r: Guarded<Result<(), String>>,
    ) -> Result<(), ActorProcessingErr> {
        self.ping_in_flight = false;
        if self.phase != Phase::Ready {
            self.finish_if_idle(myself);
            return Ok(());
        }
        if let Guarded::Cancelled(_) = r {
            return Ok(()); // says nothing about the device
        }
        self.slot.lock().last_ping = Some(std::time::SystemTime::now());
        Counters::inc(&self.shared.counters.pings);
        if !matches!(r, Guarded::Done(Ok(()))) {
            Counters::inc(&self.shared.counters.ping_failures);
        }
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
            Guarded::Cancelled(why) => why.to_string(),
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

    /// The device's class for `task`; a panicking implementation counts as
    /// `write` (refused on a read subject), and the actor goes on.
    fn command_class(&self, task: &Task) -> CommandClass {
        let device = &self.device;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.command_class(task)))
            .unwrap_or(CommandClass::Write)
    }

    fn on_run_task(&mut self, myself: &ActorRef<WorkloadMsg>, q: QueuedTask) {
        if let Phase::Stopping(ending) = &self.phase {
            let why = match ending {
                Ending::Fail(_) => "workload is restarting after a failure",
                _ => "workload is being deleted",
            };
            return q.refuse(ErrorCode::Unavailable, why);
        }
        if q.class == CommandClass::Read && self.command_class(&q.task) != CommandClass::Read {
            let msg = format!(
                "{:?} may change the device (a write-class command of this kind): \
                 send it on the write subject, which needs write permission",
                q.task.command
            );
            return q.refuse(ErrorCode::Forbidden, msg);
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

    /// Starts ending the instance (or makes an ending release a fence).
    fn start_stop(&mut self, myself: &ActorRef<WorkloadMsg>, ending: Ending) {
        let ending = if self.slot.lock().fenced.is_some() {
            Ending::Fence
        } else {
            ending
        };
        match &self.phase {
            Phase::Stopping(current) if *current == ending || ending != Ending::Fence => return,
            _ => {}
        }
        let first = !matches!(self.phase, Phase::Stopping(_));
        self.phase = Phase::Stopping(ending.clone());
        self.slot.cancel_health_checks();
        match &ending {
            Ending::Release => {
                // Tasks in flight finish (their deadlines are bounded);
                // an init attempt does not need to.
                if let Some(c) = self.init_cancel.take() {
                    c.cancel();
                }
            }
            Ending::Fence => {
                self.cancel.cancel();
                self.stop_cancel.cancel();
            }
            Ending::Fail(_) => self.cancel.cancel(),
        }
        if first {
            let why = match &ending {
                Ending::Fail(m) => format!("workload is restarting after a failure: {m}"),
                _ => "workload is being deleted".to_string(),
            };
            self.drain_queue(ErrorCode::Unavailable, &why);
            if ending == Ending::Release {
                self.transition(Status::Stopping, None, None);
            }
        }
        self.finish_if_idle(myself);
    }

    /// Once no call of the instance is in flight: run the device's `stop`
    /// (unless the instance is abandoned), then exit.
    fn finish_if_idle(&mut self, myself: &ActorRef<WorkloadMsg>) {
        let Phase::Stopping(ending) = &self.phase else {
            return;
        };
        if self.running > 0
            || self.ping_in_flight
            || self.init_cancel.is_some()
            || self.stop_in_flight
        {
            return;
        }
        let abandon = *ending == Ending::Fence
            || self.slot.lock().fenced.is_some()
            || !self.shared.lease_valid();
        if abandon {
            tracing::info!(
                workload = &*self.slot.id,
                "instance abandoned without calling its stop"
            );
            let _ = myself.send_message(WorkloadMsg::StopDone(Guarded::Done(Ok(()))));
            self.stop_in_flight = true;
            return;
        }
        self.stop_in_flight = true;
        let device = self.device.clone();
        let myself = myself.clone();
        let limit = self.shared.cfg.stop_timeout;
        let shared = self.shared.clone();
        let cancel = self.stop_cancel.clone();
        tokio::spawn(async move {
            // Its own token: `stop` runs after the instance's calls were
            // cancelled; only a fence, the lease or its timeout cut it short.
            let stop = async { device.stop().await.map_err(|e| e.0) };
            let r = guarded(limit, &shared.lease, &cancel, stop).await;
            let _ = myself.send_message(WorkloadMsg::StopDone(r));
        });
    }

    fn on_stop_done(
        &mut self,
        myself: &ActorRef<WorkloadMsg>,
        r: Guarded<Result<(), String>>,
    ) -> Result<(), ActorProcessingErr> {
        let error = match r {
            Guarded::Done(Ok(())) => None,
            Guarded::Done(Err(e)) => Some(e),
            Guarded::TimedOut(d) => Some(format!("stop timed out after {d:?}")),
            Guarded::Panicked(m) => Some(format!("stop panicked: {m}")),
            Guarded::Cancelled(why) => Some(why.to_string()),
        };
        if let Some(error) = error {
            tracing::warn!(workload = &*self.slot.id, %error, "stop failed");
            self.shared.events.emit(Event::StopError {
                workload: self.slot.id.clone(),
                error,
            });
        }
        match &self.phase {
            Phase::Stopping(Ending::Fail(why)) => Err(why.clone().into()),
            _ => {
                myself.stop(Some("deleted".into()));
                Ok(())
            }
        }
    }

    /// Device code panicked: end the instance (cancel its calls, stop it),
    /// then fail so the supervisor starts a fresh one.
    fn fail(&mut self, myself: &ActorRef<WorkloadMsg>, why: String) {
        tracing::warn!(workload = &*self.slot.id, %why, "instance failed; ending it before a restart");
        self.start_stop(myself, Ending::Fail(why));
    }
}

impl WorkloadState {
    /// Brings the node's queue-depth gauge in line with this queue.
    fn sync_queue_depth(&mut self) {
        let now = self.queue.len();
        if now != self.reported_queue {
            self.shared
                .counters
                .queued_delta(now as i64 - self.reported_queue as i64);
            self.reported_queue = now;
        }
    }
}

impl Drop for WorkloadState {
    /// However the actor ends — even killed with its supervisor — no call
    /// of its instance goes on: each ends at its next poll.
    fn drop(&mut self) {
        self.cancel.cancel();
        self.stop_cancel.cancel();
        self.queue.clear();
        self.sync_queue_depth();
    }
}

fn task_error(e: TaskError) -> (ErrorCode, String) {
    let code = match &e {
        TaskError::UnknownCommand(_) => ErrorCode::UnknownCommand,
        TaskError::InvalidArgs(_) => ErrorCode::InvalidArgs,
        TaskError::Failed(_) => ErrorCode::TaskFailed,
        TaskError::Timeout(_) => ErrorCode::Timeout,
        TaskError::Unreachable(_) => ErrorCode::Unreachable,
        TaskError::AuthFailed(_) => ErrorCode::AuthFailed,
        TaskError::Device { .. } => ErrorCode::DeviceError,
        // A variant added later: still a failure of the task.
        _ => ErrorCode::TaskFailed,
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
            cancel: CancellationToken::new(),
            init_cancel: None,
            ping_in_flight: false,
            ping_failures: 0,
            queue: VecDeque::new(),
            reported_queue: 0,
            running: 0,
            stop_in_flight: false,
            stop_cancel: CancellationToken::new(),
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
                if state.phase == Phase::Initializing && state.init_cancel.is_none() {
                    state.start_init(&myself);
                }
            }
            WorkloadMsg::InitDone(r) => {
                if let Err(e) = state.on_init_done(&myself, r) {
                    state.fail(&myself, e.to_string());
                }
            }
            WorkloadMsg::Ping => state.start_ping(&myself),
            WorkloadMsg::PingDone(r) => {
                if let Err(e) = state.on_ping_done(&myself, r) {
                    state.fail(&myself, e.to_string());
                }
            }
            WorkloadMsg::RunTask(q) => state.on_run_task(&myself, q),
            WorkloadMsg::ExpireQueued => state.expire_queued(),
            WorkloadMsg::TaskDone => {
                state.running = state.running.saturating_sub(1);
                if state.phase == Phase::Ready {
                    state.start_tasks(&myself);
                } else {
                    state.finish_if_idle(&myself);
                }
            }
            WorkloadMsg::DevicePanicked(m) => {
                state.running = state.running.saturating_sub(1);
                if matches!(state.phase, Phase::Stopping(_)) {
                    state.finish_if_idle(&myself);
                } else {
                    state.fail(&myself, format!("task panicked: {m}"));
                }
            }
            WorkloadMsg::Stop => state.start_stop(&myself, Ending::Release),
            WorkloadMsg::StopDone(r) => {
                let r = state.on_stop_done(&myself, r);
                state.sync_queue_depth();
                return r;
            }
        }
        state.sync_queue_depth();
        Ok(())
    }
}
