//! Bring-your-own state storage: a narrow key-value trait shaped after what
//! NATS JetStream KV can do (create-if-absent, compare-and-set on revision,
//! watch), and [`MemoryStore`], the embedded default for one process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

mod memory;

pub use memory::MemoryStore;

/// One stored value and the revision that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// Revision of the write that produced it (bucket-wide, increasing).
    pub revision: u64,
}

/// A change seen by a watcher.
#[derive(Debug, Clone, PartialEq)]
pub enum KvChange {
    /// Every entry that existed when the watch started has been delivered;
    /// what follows are live changes. Sent exactly once.
    Synced,
    /// A key was created or updated.
    Put(KvEntry),
    /// A key was deleted (or expired) at this revision.
    Delete {
        /// The key.
        key: String,
        /// Revision of the delete.
        revision: u64,
    },
}

/// Why a KV operation failed. Match on these: the claim protocol depends on them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// `create` found the key present.
    #[error("key {key:?} already exists (revision {revision})")]
    AlreadyExists {
        /// The key.
        key: String,
        /// Revision of the value that is there.
        revision: u64,
    },
    /// `update`/`delete` expected another revision: someone else wrote.
    #[error("key {key:?}: expected revision {expected}, found {found:?}")]
    RevisionMismatch {
        /// The key.
        key: String,
        /// The revision the caller last saw.
        expected: u64,
        /// What is there now (`None`: the key is gone).
        found: Option<u64>,
    },
    /// The backend could not be reached or answered an error.
    #[error("storage backend: {0}")]
    Backend(String),
}

/// One bucket of keys.
#[async_trait]
pub trait KvBucket: Send + Sync + 'static {
    /// The current value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError>;
    /// Writes `key` unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, StoreError>;
    /// Writes `key` only if absent; returns the new revision.
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError>;
    /// Writes `key` only if its revision is `expected`; returns the new revision.
    async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, StoreError>;
    /// Deletes `key`; with `expected`, only if its revision is that.
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<(), StoreError>;
    /// Every current entry as `Put`, then `Synced`, then every change as it happens.
    async fn watch(&self) -> Result<BoxStream<'static, KvChange>, StoreError>;
    /// The settings the bucket really has (a bucket opened, not created,
    /// may differ from what was asked for), if the backend can tell.
    fn settings(&self) -> Option<BucketSpec> {
        None
    }
}

/// How a bucket is kept. Backends apply what they support and document the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketSpec {
    /// Bucket name (`otto_state`).
    pub name: String,
    /// Entries expire this long after their last write (`None`: never).
    pub max_age: Option<Duration>,
    /// Values kept per key.
    pub history: u8,
    /// Copies kept by a clustered backend (1 or 3 for NATS).
    pub replicas: usize,
    /// Keep the bucket in memory instead of on disk.
    pub in_memory: bool,
    /// What the bucket is for, shown by backend tooling.
    pub description: String,
}

impl BucketSpec {
    /// A bucket with one value per key, on disk, one replica, no expiry.
    pub fn new(name: impl Into<String>) -> Self {
        BucketSpec {
            name: name.into(),
            max_age: None,
            history: 1,
            replicas: 1,
            in_memory: false,
            description: String::new(),
        }
    }
}

/// A storage backend: opens buckets by name.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Opens the bucket, creating it with `spec` if needed (idempotent).
    async fn bucket(&self, spec: &BucketSpec) -> Result<Arc<dyn KvBucket>, StoreError>;

    /// How many times the backend connection was (re)established; a change
    /// tells watchers to resync in full. Constant for in-process backends.
    fn connects(&self) -> u64 {
        0
    }
}
