//! Bring-your-own state storage: a narrow key-value trait shaped after what
//! NATS JetStream KV can do (create-if-absent, compare-and-set on revision,
//! watch), and [`MemoryStore`], the embedded default for one process.

use std::sync::Arc;

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
    /// Writes `key` only if absent; returns the new revision.
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError>;
    /// Writes `key` only if its revision is `expected`; returns the new revision.
    async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, StoreError>;
    /// Deletes `key`; with `expected`, only if its revision is that.
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<(), StoreError>;
    /// Every current entry as `Put`, then every change as it happens.
    async fn watch(&self) -> Result<BoxStream<'static, KvChange>, StoreError>;
}

/// A storage backend: opens buckets by name.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Opens (creating if needed) the bucket `name`.
    async fn bucket(&self, name: &str) -> Result<Arc<dyn KvBucket>, StoreError>;
}
