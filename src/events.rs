//! Lifecycle events: a typed enum, delivered to subscribers and callbacks.
//!
//! Delivery never blocks the node: every subscriber has its own bounded
//! buffer (`NodeConfig::event_capacity`); a subscriber that falls behind
//! misses the oldest events and is told how many (`Lagged`), and callbacks run
//! on their own task, fed the same way.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// Something that happened to a workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Accepted by the node; init follows.
    Added {
        /// Workload id.
        workload: Arc<str>,
    },
    /// `init` succeeded; health checks start.
    Initialized {
        /// Workload id.
        workload: Arc<str>,
    },
    /// Answers pings again after being unreachable or dead.
    Reachable {
        /// Workload id.
        workload: Arc<str>,
    },
    /// A ping failed, below the ping-down threshold.
    Unreachable {
        /// Workload id.
        workload: Arc<str>,
        /// Consecutive failures so far.
        failures: u32,
        /// The ping error.
        error: String,
    },
    /// The ping-down threshold was reached.
    Dead {
        /// Workload id.
        workload: Arc<str>,
        /// Consecutive failures.
        failures: u32,
        /// The last ping error.
        error: String,
    },
    /// Removed from the node, after its `stop` ran (or timed out).
    Deleted {
        /// Workload id.
        workload: Arc<str>,
    },
    /// An init attempt failed or timed out; it is retried after `retry_in_ms`.
    InitError {
        /// Workload id.
        workload: Arc<str>,
        /// Which attempt failed (1 = first).
        attempt: u32,
        /// Why.
        error: String,
        /// Delay before the next attempt.
        retry_in_ms: u64,
    },
    /// `stop` failed or timed out; the workload is removed anyway.
    StopError {
        /// Workload id.
        workload: Arc<str>,
        /// Why.
        error: String,
    },
    /// The actor failed and a fresh instance was started.
    Restarted {
        /// Workload id.
        workload: Arc<str>,
        /// Restarts so far.
        restarts: u32,
        /// What made the previous instance fail.
        cause: String,
    },
    /// The supervisor gave up on the workload.
    Failed {
        /// Workload id.
        workload: Arc<str>,
        /// Why.
        reason: String,
    },
}

impl Event {
    /// The workload the event is about.
    pub fn workload(&self) -> &str {
        match self {
            Event::Added { workload }
            | Event::Initialized { workload }
            | Event::Reachable { workload }
            | Event::Unreachable { workload, .. }
            | Event::Dead { workload, .. }
            | Event::Deleted { workload }
            | Event::InitError { workload, .. }
            | Event::StopError { workload, .. }
            | Event::Restarted { workload, .. }
            | Event::Failed { workload, .. } => workload,
        }
    }

    /// The snake_case name (`"init_error"`), as on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Added { .. } => "added",
            Event::Initialized { .. } => "initialized",
            Event::Reachable { .. } => "reachable",
            Event::Unreachable { .. } => "unreachable",
            Event::Dead { .. } => "dead",
            Event::Deleted { .. } => "deleted",
            Event::InitError { .. } => "init_error",
            Event::StopError { .. } => "stop_error",
            Event::Restarted { .. } => "restarted",
            Event::Failed { .. } => "failed",
        }
    }
}

/// A subscription to a node's events.
pub type EventReceiver = broadcast::Receiver<Event>;

/// Called for every event, on the node's callback task.
pub type EventCallback = Arc<dyn Fn(&Event) + Send + Sync>;

/// Called for every error the node reports but does not return to a caller
/// (failed inits and stops, backend write failures, missed events).
pub type ErrorCallback = Arc<dyn Fn(&crate::NodeError) + Send + Sync>;

/// The fan-out point for events. Cheap to clone.
#[derive(Clone)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    pub(crate) fn new(capacity: usize) -> Self {
        EventBus {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        tracing::debug!(event = event.name(), workload = event.workload(), "event");
        // No receiver is fine: nobody listens.
        let _ = self.tx.send(event);
    }

    pub(crate) fn subscribe(&self) -> EventReceiver {
        self.tx.subscribe()
    }
}
