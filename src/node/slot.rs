//! A slot: everything the node knows about one workload, shared by the
//! registry, its actor, the supervisor, the health scheduler and the state writer.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use ractor::ActorRef;
use tokio::time::Instant;

use super::workload_actor::WorkloadMsg;
use crate::spec::WorkloadSpec;
use crate::status::{ScheduledJob, Status, WorkloadInfo};

/// One workload's shared record. The actor is the only writer of status
/// while it lives; the supervisor writes it between actors.
pub(crate) struct Slot {
    pub(crate) id: Arc<str>,
    pub(crate) spec: WorkloadSpec,
    pub(crate) created: SystemTime,
    inner: Mutex<SlotInner>,
    /// Health-check generation: an entry of the scheduler with an older
    /// generation is stale and dropped. Bumped to cancel.
    pub(crate) sched_gen: AtomicU32,
    /// Set while a write of this slot is queued at the state writer (coalescing).
    pub(crate) dirty: AtomicBool,
}

pub(crate) struct SlotInner {
    pub(crate) status: Status,
    pub(crate) since: SystemTime,
    pub(crate) updated: SystemTime,
    pub(crate) last_ping: Option<SystemTime>,
    pub(crate) next_ping: Option<Instant>,
    pub(crate) reason: Option<Box<str>>,
    pub(crate) restarts: u32,
    /// Restart accounting for the supervisor's policy.
    pub(crate) window_start: Option<Instant>,
    pub(crate) restarts_in_window: u32,
    /// The live actor, if any (none while restarting, failed, or gone).
    pub(crate) actor: Option<ActorRef<WorkloadMsg>>,
    /// Delete (or fence) requested: no restarts, no new tasks.
    pub(crate) deleting: bool,
    /// Why it is being removed, when fenced rather than deleted.
    pub(crate) fenced: Option<Box<str>>,
    /// Cluster-only extras, boxed: most workloads never need them.
    pub(crate) extra: Option<Box<SlotExtra>>,
}

/// Rarely used per-workload state, kept out of line to keep idle slots small.
#[derive(Default)]
pub(crate) struct SlotExtra {
    /// On removal, CAS the state key to this record instead of deleting it.
    pub(crate) handover: Option<bytes::Bytes>,
    /// Carried in every state record: nodes to keep it off, and moves so far.
    pub(crate) avoid: Vec<String>,
    pub(crate) moves: u32,
}

impl SlotInner {
    pub(crate) fn extra_mut(&mut self) -> &mut SlotExtra {
        self.extra.get_or_insert_with(Box::default)
    }
}

impl Slot {
    pub(crate) fn new(spec: WorkloadSpec) -> Self {
        let now = SystemTime::now();
        Slot {
            id: spec.id.as_str().into(),
            spec,
            created: now,
            inner: Mutex::new(SlotInner {
                status: Status::Initializing,
                since: now,
                updated: now,
                last_ping: None,
                next_ping: None,
                reason: None,
                restarts: 0,
                window_start: None,
                restarts_in_window: 0,
                actor: None,
                deleting: false,
                fenced: None,
                extra: None,
            }),
            sched_gen: AtomicU32::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SlotInner> {
        // Every critical section is a few field writes; a panic inside one
        // leaves consistent data, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the status (and reason); returns the previous status.
    /// Sets status and reason; the previous status, and whether the reason
    /// changed in substance (worth publishing even without a status change:
    /// why an `initializing` workload does not come up, and when that cause
    /// changes — but not once per retry).
    pub(crate) fn set_status(&self, status: Status, reason: Option<String>) -> (Status, bool) {
        let now = SystemTime::now();
        let mut g = self.lock();
        let prev = g.status;
        if prev != status {
            g.since = now;
        }
        // A new reason, or one that says something else (not only another
        // attempt number or retry delay): worth a state write.
        let digitless = |r: &str| {
            r.chars()
                .filter(|c| !c.is_ascii_digit())
                .collect::<String>()
        };
        let new_reason = match (g.reason.as_deref(), reason.as_deref()) {
            (None, Some(_)) => true,
            (Some(old), Some(new)) => digitless(old) != digitless(new),
            _ => false,
        };
        g.status = status;
        g.reason = reason.map(String::into_boxed_str);
        g.updated = now;
        (prev, new_reason)
    }

    pub(crate) fn status(&self) -> Status {
        self.lock().status
    }

    pub(crate) fn actor(&self) -> Option<ActorRef<WorkloadMsg>> {
        self.lock().actor.clone()
    }

    pub(crate) fn cancel_health_checks(&self) {
        self.sched_gen.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn info(&self) -> WorkloadInfo {
        let g = self.lock();
        WorkloadInfo {
            id: self.id.to_string(),
            kind: self.spec.kind.clone(),
            status: g.status,
            since: g.since,
            created: self.created,
            updated: g.updated,
            last_ping: g.last_ping,
            reason: g.reason.as_deref().map(str::to_string),
            restarts: g.restarts,
        }
    }

    pub(crate) fn scheduled(&self) -> ScheduledJob {
        let g = self.lock();
        let next_run = g.next_ping.map(|at| {
            let now = Instant::now();
            if at > now {
                SystemTime::now() + (at - now)
            } else {
                SystemTime::now() - (now - at)
            }
        });
        ScheduledJob {
            workload: self.id.to_string(),
            last_run: g.last_ping,
            next_run,
        }
    }
}
