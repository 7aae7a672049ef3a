//! The node's supervisor actor: parent of every workload actor.
//!
//! ```text
//! Supervisor (one per node)
//!  ├── WorkloadActor "router-1"   (linked)
//!  ├── WorkloadActor "router-2"   (linked)
//!  └── …
//! ```
//!
//! Restart policy (written out in `handle_supervisor_evt`):
//! - a child that **fails** (panic in its handler, or device code that
//!   panicked in a spawned call, reported back as a failure) is restarted with
//!   a fresh device instance after `backoff_min * 2^(n-1)` capped at
//!   `backoff_max`, where n counts restarts within `window`;
//! - past `max_restarts` within `window` the workload is `failed`, with the
//!   last failure as the reason, and is not restarted again;
//! - a child that **terminates** normally has been deleted (or fenced): it is
//!   removed from the node;
//! - no failure of one child touches any other child.

use std::collections::HashMap;
use std::sync::Arc;

use ottomato_actors::Workload;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use super::slot::Slot;
use super::workload_actor::{WorkloadActor, WorkloadArgs, WorkloadMsg};
use super::Shared;
use crate::config::backoff;
use crate::events::Event;
use crate::status::Status;

pub(crate) enum SupervisorMsg {
    /// Start the actor of a newly added workload.
    Spawn(Arc<Slot>, Arc<dyn Workload>),
    /// Start a fresh instance after a failure (sent by ourselves after the backoff).
    Respawn(Arc<Slot>, String),
    /// Stop and remove a workload (its slot is already marked `deleting`).
    Delete(Arc<Slot>),
}

pub(crate) struct Supervisor;

pub(crate) struct SupervisorState {
    shared: Arc<Shared>,
    children: HashMap<ActorId, Arc<Slot>>,
}

impl SupervisorState {
    async fn spawn(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        slot: Arc<Slot>,
        device: Arc<dyn Workload>,
    ) {
        let args = WorkloadArgs {
            shared: self.shared.clone(),
            slot: slot.clone(),
            device,
        };
        match Actor::spawn_linked(None, WorkloadActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                self.children.insert(actor.get_id(), slot.clone());
                let deleting = {
                    let mut g = slot.lock();
                    g.actor = Some(actor.clone());
                    g.deleting
                };
                if deleting {
                    let _ = actor.send_message(WorkloadMsg::Stop);
                }
            }
            Err(e) => self.give_up(&slot, format!("could not start its actor: {e}")),
        }
    }

    fn give_up(&self, slot: &Arc<Slot>, reason: String) {
        tracing::error!(workload = &*slot.id, %reason, "workload failed");
        slot.set_status(Status::Failed, Some(reason.clone()));
        self.shared.status_changed(slot);
        self.shared.events.emit(Event::Failed {
            workload: slot.id.clone(),
            reason,
        });
    }

    /// A child is gone (failed or terminated): restart it, or finish its removal.
    fn child_gone(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: ActorId,
        failure: Option<String>,
    ) {
        let Some(slot) = self.children.remove(&id) else {
            return;
        };
        let deleting = {
            let mut g = slot.lock();
            g.actor = None;
            g.deleting
        };
        if deleting {
            self.shared.finish_removal(&slot);
            return;
        }
        let cause = failure.unwrap_or_else(|| "actor exited unexpectedly".to_string());
        let policy = &self.shared.cfg.restart;
        let now = Instant::now();
        let n = {
            let mut g = slot.lock();
            if g.window_start.is_none_or(|s| now - s > policy.window) {
                g.window_start = Some(now);
                g.restarts_in_window = 0;
            }
            g.restarts_in_window += 1;
            g.restarts_in_window
        };
        if n > policy.max_restarts {
            self.give_up(
                &slot,
                format!(
                    "gave up after {} restarts within {:?}; last failure: {cause}",
                    policy.max_restarts, policy.window
                ),
            );
            return;
        }
        let delay = backoff(policy.backoff_min, policy.backoff_max, n);
        tracing::warn!(workload = &*slot.id, %cause, ?delay, "workload actor failed; restarting");
        slot.set_status(
            Status::Restarting,
            Some(format!("failed: {cause}; restart {n} in {delay:?}")),
        );
        self.shared.status_changed(&slot);
        myself.send_after(delay, move || SupervisorMsg::Respawn(slot, cause));
    }
}

#[ractor::async_trait]
impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            shared,
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(slot, device) => state.spawn(&myself, slot, device).await,
            SupervisorMsg::Respawn(slot, cause) => {
                if slot.lock().deleting {
                    state.shared.finish_removal(&slot);
                    return Ok(());
                }
                match state.shared.kinds.create(&slot.spec) {
                    Ok(device) => {
                        let restarts = {
                            let mut g = slot.lock();
                            g.restarts += 1;
                            g.restarts
                        };
                        slot.set_status(
                            Status::Initializing,
                            Some(format!("restarted after: {cause}")),
                        );
                        state.shared.status_changed(&slot);
                        super::counters::Counters::inc(&state.shared.counters.restarts);
                        state.shared.events.emit(Event::Restarted {
                            workload: slot.id.clone(),
                            restarts,
                            cause,
                        });
                        state.spawn(&myself, slot, device).await;
                    }
                    Err(e) => state.give_up(&slot, format!("could not rebuild its device: {e}")),
                }
            }
            SupervisorMsg::Delete(slot) => {
                let subject = state.shared.subjects.task_served(&slot.id);
                if let Err(e) = state.shared.unserve_task(&subject).await {
                    state
                        .shared
                        .report_error(crate::NodeError::Backend(format!("unserve {subject}: {e}")));
                }
                match slot.actor() {
                    Some(actor) => {
                        if actor.send_message(WorkloadMsg::Stop).is_err() {
                            // Already dead: its supervision event finishes the removal.
                        }
                    }
                    None => state.shared.finish_removal(&slot),
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                state.child_gone(&myself, cell.get_id(), Some(err.to_string()))
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let failure = match reason.as_deref() {
                    Some("deleted") => None,
                    other => Some(format!(
                        "actor terminated ({})",
                        other.unwrap_or("no reason")
                    )),
                };
                state.child_gone(&myself, cell.get_id(), failure)
            }
            _ => {}
        }
        Ok(())
    }
}
