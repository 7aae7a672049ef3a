//! Errors of the node API. Errors that cross a transport are [`crate::wire::ErrorCode`]s instead.

/// Why a node operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// A workload with this id is already on the node.
    #[error("workload {0:?} already exists")]
    AlreadyExists(String),
    /// No workload with this id is on the node.
    #[error("workload {0:?} not found")]
    NotFound(String),
    /// The id can't be a subject token / KV key.
    #[error("invalid workload id: {0}")]
    InvalidId(String),
    /// No kind of that name is registered on this node.
    #[error("unknown kind {kind:?} (this node runs: {known})")]
    UnknownKind {
        /// The kind asked for.
        kind: String,
        /// The kinds the node has.
        known: String,
    },
    /// The kind rejected the spec's config.
    #[error("{0}")]
    InvalidConfig(String),
    /// The workload is being deleted; try again once it is gone.
    #[error("workload {0:?} is being deleted")]
    Stopping(String),
    /// The node is stopping or stopped.
    #[error("node is shutting down")]
    ShuttingDown,
    /// Settings that contradict each other.
    #[error("invalid node settings: {0}")]
    InvalidSettings(String),
    /// A wait for a status ended first (the status the workload had then).
    #[error("workload {id:?} still {status} after {waited:?}")]
    WaitTimedOut {
        /// The workload.
        id: String,
        /// Its status when the wait gave up.
        status: crate::Status,
        /// How long the wait lasted.
        waited: std::time::Duration,
    },
    /// Another running process uses this node id.
    #[error("{0}")]
    IdInUse(String),
    /// The cluster's buckets were created with settings this node cannot honour.
    #[error("{0}")]
    IncompatibleCluster(String),
    /// A schedule was refused (the reason names the field).
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// A storage or transport backend failed.
    #[error("backend error: {0}")]
    Backend(String),
}
