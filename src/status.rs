//! What a node reports about each workload.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Where a workload is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Added; `init` has not succeeded yet (the reason says why when retrying).
    Initializing,
    /// Initialised and answering pings.
    Running,
    /// The last ping(s) failed, fewer than the ping-down threshold.
    Unreachable,
    /// Ping-down threshold reached; still checked, less often, and recovers by itself.
    Dead,
    /// Its actor failed; a fresh instance starts after a backoff.
    Restarting,
    /// Gave up: too many restarts, or a claim lost. The reason says which.
    Failed,
    /// Being deleted.
    Stopping,
    /// No live node may run it (cluster mode); the reason says why.
    Unplaceable,
    /// Handed over after being dead on its owner, for another node to try
    /// (cluster mode, `move_dead_after`); the reason says from where.
    Moving,
}

impl Status {
    /// Every status, in display order.
    pub const ALL: [Status; 9] = [
        Status::Initializing,
        Status::Running,
        Status::Unreachable,
        Status::Dead,
        Status::Restarting,
        Status::Failed,
        Status::Stopping,
        Status::Unplaceable,
        Status::Moving,
    ];

    /// The wire name (`"running"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Initializing => "initializing",
            Status::Running => "running",
            Status::Unreachable => "unreachable",
            Status::Dead => "dead",
            Status::Restarting => "restarting",
            Status::Failed => "failed",
            Status::Stopping => "stopping",
            Status::Unplaceable => "unplaceable",
            Status::Moving => "moving",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of one workload, as `Node::workloads()` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    /// The workload id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Current status.
    pub status: Status,
    /// When the status last changed.
    #[serde(with = "crate::wire::rfc3339")]
    pub since: SystemTime,
    /// When the workload was added.
    #[serde(with = "crate::wire::rfc3339")]
    pub created: SystemTime,
    /// When anything about it last changed (status, ping, restart).
    #[serde(with = "crate::wire::rfc3339")]
    pub updated: SystemTime,
    /// When the last ping finished.
    #[serde(
        with = "crate::wire::rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_ping: Option<SystemTime>,
    /// Why it is in this status (errors, restart causes), if anything to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many times its actor was restarted after a failure.
    pub restarts: u32,
}

/// One scheduled health-check job, as `Node::scheduled()` returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledJob {
    /// The workload it pings.
    pub workload: String,
    /// When the last ping finished.
    #[serde(with = "crate::wire::rfc3339_opt")]
    pub last_run: Option<SystemTime>,
    /// When the next ping is due.
    #[serde(with = "crate::wire::rfc3339_opt")]
    pub next_run: Option<SystemTime>,
}
