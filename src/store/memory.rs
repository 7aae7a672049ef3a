//! The in-memory [`StateStore`]: one process, no persistence.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::broadcast;
use tokio::time::Instant;

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
            .or_insert_with(|| MemoryBucket::new(spec));
        Ok(b.clone())
    }
}

struct Inner {
    entries: BTreeMap<String, (Bytes, u64)>,
    /// When each key was last written (for `max_age`).
    written: HashMap<String, Instant>,
    last_revision: u64,
}

/// One in-memory bucket.
pub(crate) struct MemoryBucket {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<KvChange>,
    /// Whether entries expire (only then are write times kept).
    expires: bool,
    /// What it was created with (later opens do not change it).
    settings: BucketSpec,
}

/// How often expiry is checked, as a fraction of `max_age`.
const EXPIRY_CHECKS_PER_AGE: u32 = 20;

impl MemoryBucket {
    fn new(spec: &BucketSpec) -> Arc<Self> {
        let max_age = spec.max_age;
        let b = Arc::new(MemoryBucket {
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                written: HashMap::new(),
                last_revision: 0,
            }),
            changes: broadcast::channel(65_536).0,
            expires: max_age.is_some_and(|a| !a.is_zero()),
            settings: spec.clone(),
        });
        if let Some(age) = max_age.filter(|a| !a.is_zero()) {
            // Like JetStream's max age with limit markers: an entry not
            // rewritten for `age` disappears and watchers see a delete.
            let weak = Arc::downgrade(&b);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(age / EXPIRY_CHECKS_PER_AGE);
                loop {
                    tick.tick().await;
                    let Some(b) = weak.upgrade() else { return };
                    b.expire(age);
                }
            });
        }
        b
    }

    fn expire(&self, age: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        let old: Vec<String> = inner
            .written
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= age)
            .map(|(k, _)| k.clone())
            .collect();
        for key in old {
            inner.written.remove(&key);
            if inner.entries.remove(&key).is_some() {
                inner.last_revision += 1;
                let revision = inner.last_revision;
                let _ = self.changes.send(KvChange::Delete { key, revision });
            }
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
        if self.expires {
            inner.written.insert(key.to_string(), Instant::now());
        }
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
            inner.written.remove(key);
            inner.last_revision += 1;
            let _ = self.changes.send(KvChange::Delete {
                key: key.to_string(),
                revision: inner.last_revision,
            });
        }
        Ok(())
    }

    fn settings(&self) -> Option<BucketSpec> {
        Some(self.settings.clone())
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
        // A watcher so slow that it missed changes (`Lagged`) sees its stream
        // end, so it watches again and gets a full replay.
        let live = stream::unfold(rx, |mut rx| async move {
            rx.recv().await.ok().map(|change| (change, rx))
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

#[cfg(test)]
mod ttl_tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_max_age_and_watchers_see_it() {
        let store = MemoryStore::new();
        let spec = BucketSpec {
            max_age: Some(Duration::from_secs(5)),
            ..BucketSpec::new("n")
        };
        let b = store.bucket(&spec).await.unwrap();
        b.put("a", Bytes::from_static(b"1")).await.unwrap();
        b.put("b", Bytes::from_static(b"1")).await.unwrap();
        let mut w = b.watch().await.unwrap();
        for _ in 0..3 {
            w.next().await; // a, b, Synced
        }
        let t0 = Instant::now();
        let hb = b.clone();
        tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                hb.put("b", Bytes::from_static(b"2")).await.unwrap(); // b keeps its heartbeat
            }
        });
        // `a` went silent at t0: gone after 5 s (checked every 250 ms).
        loop {
            match w.next().await.unwrap() {
                KvChange::Delete { key, .. } => {
                    assert_eq!(key, "a");
                    break;
                }
                KvChange::Put(e) => assert_eq!(e.key, "b"),
                KvChange::Synced => unreachable!(),
            }
        }
        let after = t0.elapsed();
        assert!(
            after >= Duration::from_secs(5) && after <= Duration::from_millis(5_300),
            "{after:?}"
        );
        assert!(b.get("a").await.unwrap().is_none());
        assert!(b.get("b").await.unwrap().is_some());
    }
}
