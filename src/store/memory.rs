//! The in-memory [`StateStore`]: one process, no persistence.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::broadcast;

use super::{BucketSpec, KvBucket, KvChange, KvEntry, StateStore, StoreError};

/// Buckets held in memory. Clones share the same data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    buckets: Arc<Mutex<HashMap<String, Arc<MemoryBucket>>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn bucket(&self, spec: &BucketSpec) -> Result<Arc<dyn KvBucket>, StoreError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = buckets
            .entry(spec.name.clone())
            .or_insert_with(|| Arc::new(MemoryBucket::new()));
        Ok(b.clone())
    }
}

struct Inner {
    entries: BTreeMap<String, (Bytes, u64)>,
    last_revision: u64,
}

/// One in-memory bucket.
pub(crate) struct MemoryBucket {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<KvChange>,
}

impl MemoryBucket {
    fn new() -> Self {
        MemoryBucket {
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                last_revision: 0,
            }),
            changes: broadcast::channel(65_536).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The data stays consistent across a panic: every write is one insert.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, inner: &mut Inner, key: &str, value: Bytes) -> u64 {
        inner.last_revision += 1;
        let revision = inner.last_revision;
        inner
            .entries
            .insert(key.to_string(), (value.clone(), revision));
        let _ = self.changes.send(KvChange::Put(KvEntry {
            key: key.to_string(),
            value,
            revision,
        }));
        revision
    }
}

#[async_trait]
impl KvBucket for MemoryBucket {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        Ok(self.lock().entries.get(key).map(|(v, r)| KvEntry {
            key: key.to_string(),
            value: v.clone(),
            revision: *r,
        }))
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        Ok(self.write(&mut inner, key, value))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        if let Some((_, revision)) = inner.entries.get(key) {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
                revision: *revision,
            });
        }
        Ok(self.write(&mut inner, key, value))
    }

    async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let found = inner.entries.get(key).map(|(_, r)| *r);
        if found != Some(expected) {
            return Err(StoreError::RevisionMismatch {
                key: key.to_string(),
                expected,
                found,
            });
        }
        Ok(self.write(&mut inner, key, value))
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let found = inner.entries.get(key).map(|(_, r)| *r);
        if let Some(expected) = expected {
            if found != Some(expected) {
                return Err(StoreError::RevisionMismatch {
                    key: key.to_string(),
                    expected,
                    found,
                });
            }
        }
        if found.is_some() {
            inner.entries.remove(key);
            inner.last_revision += 1;
            let _ = self.changes.send(KvChange::Delete {
                key: key.to_string(),
                revision: inner.last_revision,
            });
        }
        Ok(())
    }

    async fn watch(&self) -> Result<BoxStream<'static, KvChange>, StoreError> {
        // Snapshot and subscribe under one lock so no change falls in between.
        let inner = self.lock();
        let rx = self.changes.subscribe();
        let mut initial: Vec<KvChange> = inner
            .entries
            .iter()
            .map(|(k, (v, r))| {
                KvChange::Put(KvEntry {
                    key: k.clone(),
                    value: v.clone(),
                    revision: *r,
                })
            })
            .collect();
        drop(inner);
        initial.push(KvChange::Synced);
        let live = stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(change) => return Some((change, rx)),
                    // A watcher this slow misses changes; it keeps going with
                    // the newest, as a NATS watcher behind a reconnect would.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(stream::iter(initial).chain(live).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_update_delete_with_revisions() {
        let store = MemoryStore::new();
        let b = store.bucket(&BucketSpec::new("s")).await.unwrap();
        let r1 = b.create("k", Bytes::from_static(b"1")).await.unwrap();
        assert!(matches!(
            b.create("k", Bytes::from_static(b"2")).await,
            Err(StoreError::AlreadyExists { revision, .. }) if revision == r1
        ));
        let r2 = b.update("k", Bytes::from_static(b"2"), r1).await.unwrap();
        assert!(matches!(
            b.update("k", Bytes::from_static(b"3"), r1).await,
            Err(StoreError::RevisionMismatch { found: Some(f), .. }) if f == r2
        ));
        let mut w = b.watch().await.unwrap();
        assert!(matches!(w.next().await, Some(KvChange::Put(e)) if e.revision == r2));
        assert_eq!(w.next().await, Some(KvChange::Synced));
        b.delete("k", Some(r2)).await.unwrap();
        assert!(matches!(w.next().await, Some(KvChange::Delete { key, .. }) if key == "k"));
        assert_eq!(b.get("k").await.unwrap(), None);
    }
}
