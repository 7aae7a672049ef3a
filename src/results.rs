//! Result history: every scheduled run's result (and an ad-hoc task's when
//! its request says `"keepResult": true`) appended to a bounded store —
//! the `<prefix>_results` JetStream stream in cluster mode
//! ([`crate::nats::NatsResults`]), [`MemoryResults`] embedded.
//!
//! A result is stored under (workload, source): the source is the schedule
//! id, or [`crate::schedule::AD_HOC`] for ad-hoc tasks. On NATS that is the
//! subject `<prefix>.results.<workload>.<source>`, so the last result of
//! each is a last-per-subject query.
//!
//! Appending never blocks a device or a task reply: nodes hand results to
//! a [`ResultPublisher`], a bounded buffer drained in the background, which
//! drops (and counts) what does not fit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::store::StoreError;
use crate::wire::{glob_match, TaskResult};

mod nats;
pub use nats::NatsResults;

/// One stored result.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    /// Position in the store (stream sequence), increasing.
    pub seq: u64,
    /// The workload.
    pub workload: String,
    /// The schedule id, or `_task`.
    pub source: String,
    /// The result.
    pub result: TaskResult,
}

/// Which results to read.
#[derive(Debug, Clone, Default)]
pub struct ResultQuery {
    /// Glob on workload ids (all when absent).
    pub select: Option<String>,
    /// One schedule's results (or `_task` for ad-hoc ones).
    pub source: Option<String>,
    /// Only results stored at or after this time.
    pub since: Option<SystemTime>,
    /// At most this many per (workload, source), the newest (all when absent).
    pub last: Option<usize>,
}

impl ResultQuery {
    pub(crate) fn keeps(&self, workload: &str, source: &str) -> bool {
        self.select
            .as_deref()
            .is_none_or(|g| glob_match(g, workload))
            && self.source.as_deref().is_none_or(|s| s == source)
    }

    /// Keeps the newest `last` per (workload, source) and sorts oldest first.
    pub(crate) fn finish(&self, mut v: Vec<StoredResult>) -> Vec<StoredResult> {
        v.sort_by_key(|r| r.seq);
        if let Some(n) = self.last {
            let mut seen: HashMap<(String, String), usize> = HashMap::new();
            let mut keep = vec![false; v.len()];
            for (i, r) in v.iter().enumerate().rev() {
                let c = seen
                    .entry((r.workload.clone(), r.source.clone()))
                    .or_default();
                if *c < n {
                    *c += 1;
                    keep[i] = true;
                }
            }
            let mut k = keep.into_iter();
            v.retain(|_| k.next().unwrap_or(false));
        }
        v
    }
}

/// Where results are kept.
#[async_trait]
pub trait ResultStore: Send + Sync + 'static {
    /// Appends `payload` (a [`TaskResult`] as JSON) for `workload` from `source`.
    async fn append(&self, workload: &str, source: &str, payload: Bytes) -> Result<(), StoreError>;
    /// The newest result of `workload` from `source`.
    async fn last(&self, workload: &str, source: &str) -> Result<Option<StoredResult>, StoreError>;
    /// The results `query` selects, oldest first.
    async fn query(&self, query: &ResultQuery) -> Result<Vec<StoredResult>, StoreError>;
}

/// Limits of a result store: what the operator sets so it never grows
/// without bound (`--results-max-age`, `--results-max-bytes`,
/// `--results-history`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResultLimits {
    /// Results older than this are dropped.
    pub max_age: Duration,
    /// The store's size cap (oldest dropped first).
    pub max_bytes: u64,
    /// Results kept per (workload, source).
    pub per_subject: u32,
}

impl Default for ResultLimits {
    fn default() -> Self {
        ResultLimits {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
            per_subject: 100,
        }
    }
}

/// A kept result: its sequence, its JSON (decoded only when read: storing
/// stays cheap at 100 000 runs a second), when it was stored.
type Kept = (u64, Bytes, SystemTime);

#[derive(Default)]
struct MemoryInner {
    next_seq: u64,
    bytes: u64,
    by_subject: HashMap<(String, String), VecDeque<Kept>>,
    /// Every kept result's subject by sequence: the oldest first, to drop
    /// when over `max_bytes` or `max_age`.
    order: BTreeMap<u64, (String, String)>,
}

/// Results kept in memory, with the same limits as the stream: the
/// embedded default.
pub struct MemoryResults {
    limits: ResultLimits,
    inner: Mutex<MemoryInner>,
}

impl MemoryResults {
    /// An empty store with `limits`.
    pub fn new(limits: ResultLimits) -> Self {
        MemoryResults {
            limits,
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // Every update leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryResults {
    fn default() -> Self {
        MemoryResults::new(ResultLimits::default())
    }
}

#[async_trait]
impl ResultStore for MemoryResults {
    async fn append(&self, workload: &str, source: &str, payload: Bytes) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let mut g = self.lock();
        g.next_seq += 1;
        let seq = g.next_seq;
        let key = (workload.to_string(), source.to_string());
        g.bytes += payload.len() as u64;
        g.order.insert(seq, key.clone());
        let per = self.limits.per_subject.max(1) as usize;
        let q = g.by_subject.entry(key).or_default();
        q.push_back((seq, payload, now));
        let mut dropped = Vec::new();
        while q.len() > per {
            dropped.extend(q.pop_front());
        }
        for (seq, p, _) in dropped {
            g.bytes -= p.len() as u64;
            g.order.remove(&seq);
        }
        // Over the byte cap, or past the age: drop the oldest anywhere.
        while let Some((&oldest, key)) = g.order.iter().next() {
            let key = key.clone();
            let bytes = g.bytes;
            let Some(q) = g.by_subject.get_mut(&key) else {
                g.order.remove(&oldest);
                continue;
            };
            let age = q
                .front()
                .map(|(_, _, t)| now.duration_since(*t).unwrap_or_default())
                .unwrap_or_default();
            if bytes <= self.limits.max_bytes && age <= self.limits.max_age {
                break;
            }
            let popped = q.pop_front();
            if q.is_empty() {
                g.by_subject.remove(&key);
            }
            g.order.remove(&oldest);
            if let Some((_, p, _)) = popped {
                g.bytes -= p.len() as u64;
            }
        }
        Ok(())
    }

    async fn last(&self, workload: &str, source: &str) -> Result<Option<StoredResult>, StoreError> {
        let g = self.lock();
        Ok(g.by_subject
            .get(&(workload.to_string(), source.to_string()))
            .and_then(|q| q.back())
            .and_then(|(seq, p, _)| decode(*seq, workload, source, p)))
    }

    async fn query(&self, query: &ResultQuery) -> Result<Vec<StoredResult>, StoreError> {
        let g = self.lock();
        let v = g
            .by_subject
            .iter()
            .filter(|((w, s), _)| query.keeps(w, s))
            .flat_map(|((w, s), q)| q.iter().map(move |k| (w, s, k)))
            .filter(|(_, _, (_, _, t))| query.since.is_none_or(|since| *t >= since))
            .filter_map(|(w, s, (seq, p, _))| decode(*seq, w, s, p))
            .collect();
        Ok(query.finish(v))
    }
}

fn decode(seq: u64, workload: &str, source: &str, payload: &[u8]) -> Option<StoredResult> {
    Some(StoredResult {
        seq,
        workload: workload.to_string(),
        source: source.to_string(),
        result: serde_json::from_slice(payload).ok()?,
    })
}

/// Hands results to a [`ResultStore`] without ever waiting: a bounded
/// buffer drained by a background task (up to 256 appends in flight); a
/// result that does not fit is dropped and counted.
pub struct ResultPublisher {
    tx: mpsc::Sender<(String, String, Bytes)>,
    /// Results handed over.
    pub queued: AtomicU64,
    /// Results dropped because the buffer was full.
    pub dropped: AtomicU64,
    /// Results stored.
    pub stored: Arc<AtomicU64>,
    /// Appends that failed on the backend.
    pub failed: Arc<AtomicU64>,
}

impl ResultPublisher {
    /// Starts draining into `store`, buffering at most `capacity` results.
    pub fn spawn(store: Arc<dyn ResultStore>, capacity: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<(String, String, Bytes)>(capacity.max(1));
        let stored = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, f) = (stored.clone(), failed.clone());
        tokio::spawn(async move {
            tokio_stream_from(rx)
                .for_each_concurrent(256, |(w, src, payload)| {
                    let store = store.clone();
                    let (s, f) = (s.clone(), f.clone());
                    async move {
                        match store.append(&w, &src, payload).await {
                            Ok(()) => s.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                tracing::warn!(workload = %w, source = %src, error = %e, "could not store a result");
                                f.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
                .await;
        });
        Arc::new(ResultPublisher {
            tx,
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stored,
            failed,
        })
    }

    /// Queues `result` for storage under its workload and `source`; never waits.
    pub fn publish(&self, source: &str, result: &TaskResult) {
        let Ok(payload) = serde_json::to_vec(result) else {
            return;
        };
        let item = (
            result.workload.clone(),
            source.to_string(),
            Bytes::from(payload),
        );
        match self.tx.try_send(item) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits until every queued result was stored or failed (tests, shutdown).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = self.stored.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
            if done >= self.queued.load(Ordering::Relaxed) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> futures::stream::BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(w: &str, n: i64) -> Bytes {
        let mut r: TaskResult = serde_json::from_value(serde_json::json!({
            "jobId": "j", "workerId": "n", "workload": w, "hostname": "h", "command": "c",
            "args": [], "kwargs": {}, "success": true, "error": null, "errorCode": null,
            "return": n, "timestamp": "2026-11-30T12:00:00Z", "executionTime": 1.0
        }))
        .unwrap();
        r.schedule_id = Some("s".into());
        Bytes::from(serde_json::to_vec(&r).unwrap())
    }

    #[tokio::test]
    async fn memory_results_keep_the_newest_within_limits() {
        let store = MemoryResults::new(ResultLimits {
            per_subject: 3,
            ..Default::default()
        });
        for n in 0..5 {
            store.append("a", "s", result("a", n)).await.unwrap();
            store.append("b", "s", result("b", n)).await.unwrap();
        }
        store.append("a", "_task", result("a", 9)).await.unwrap();
        let last = store.last("a", "s").await.unwrap().unwrap();
        assert_eq!(last.result.ret, 4);
        let all = store.query(&ResultQuery::default()).await.unwrap();
        assert_eq!(all.len(), 7, "3 + 3 + 1 kept");
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        let q = ResultQuery {
            select: Some("a".into()),
            source: Some("s".into()),
            last: Some(1),
            ..Default::default()
        };
        let one = store.query(&q).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].result.ret, 4);
        // A byte cap drops the oldest anywhere.
        let small = MemoryResults::new(ResultLimits {
            max_bytes: 3 * result("a", 0).len() as u64,
            ..Default::default()
        });
        for n in 0..10 {
            small
                .append(&format!("w{n}"), "s", result("a", n))
                .await
                .unwrap();
        }
        let kept = small.query(&ResultQuery::default()).await.unwrap();
        assert_eq!(
            kept.iter().map(|r| r.workload.as_str()).collect::<Vec<_>>(),
            ["w7", "w8", "w9"]
        );
    }
}
