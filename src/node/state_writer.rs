//! The state writer: mirrors each workload's status into the state store
//! (`<prefix>_state`, key = workload id), the record operators watch.
//!
//! The first write is a create-if-absent (the claim) unless the key was
//! claimed beforehand (cluster mode adopts that revision); every later write
//! is a compare-and-set on the revision this node last wrote. Losing one
//! means somebody else wrote the key: the node has lost the workload and
//! fences it (stops its actor) and never writes the key again.
//!
//! A write that fails with a backend error (a NATS blip) is retried with
//! backoff from the last revision this node knows — never turned into a
//! create. A revision mismatch is checked against the store first: if the
//! record there is byte for byte one this writer sent with an unknown
//! outcome (a write that landed although its answer was lost), its revision
//! is adopted and writing goes on; any other record fences. Removals
//! (delete, handover) retry the same way until they land or the key holds
//! another record — someone else's, or a newer claim of this process, which
//! a stale removal never touches.
//!
//! Writes are pipelined: up to [`MAX_IN_FLIGHT`] keys are written at once,
//! while operations on one key run strictly in order, one at a time. Writes
//! coalesce: a slot queued while dirty is written once, with its latest status.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::slot::Slot;
use super::Shared;
use crate::store::{KvBucket, StoreError};
use crate::wire::StateRecord;
use crate::NodeError;

/// Keys written at the same time.
const MAX_IN_FLIGHT: usize = 256;

pub(crate) enum WriteCmd {
    /// The key was claimed outside the writer at this revision: CAS from it.
    Adopt(Arc<str>, u64),
    Upsert(Arc<Slot>),
    Remove(Arc<str>),
    /// Replace the key (CAS) with this record and forget it: a handover.
    Handover(Arc<str>, Bytes),
    /// Answer once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

enum Op {
    Adopt(u64),
    Upsert(Arc<Slot>),
    Remove,
    Handover(Bytes),
}

type Said = (crate::Status, u32, Option<Box<str>>);

enum Done {
    /// An upsert ended; with the value it wrote.
    Wrote(Result<u64, StoreError>, Arc<Slot>, Bytes),
    /// A removal ended; with the revision and handover record it used.
    Removed(Result<(), StoreError>, u64, Option<Bytes>),
    /// What the store holds after a mismatch, and the operation to go on with.
    Reread(Result<Option<crate::store::KvEntry>, StoreError>, Op),
    /// Backoff over: run this operation (again).
    Retry(Op),
}

/// First and longest wait before retrying a write that failed on the backend.
const RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

struct Writer {
    shared: Weak<Shared>,
    bucket: Arc<dyn KvBucket>,
    node_id: Arc<str>,
    incarnation: Arc<str>,
    revisions: HashMap<Arc<str>, u64>,
    /// What the last write of each key said (status, restarts, reason): an
    /// update saying the same again is skipped.
    written: HashMap<Arc<str>, Said>,
    queues: HashMap<Arc<str>, VecDeque<Op>>,
    busy: HashSet<Arc<str>>,
    in_flight: FuturesUnordered<BoxFuture<'static, (Arc<str>, Done)>>,
    flushes: Vec<oneshot::Sender<()>>,
    /// Consecutive backend failures per key (for the backoff).
    failures: HashMap<Arc<str>, u32>,
    /// Values this process wrote to a key whose outcome is unknown (the
    /// answer lost; the write may have landed), since the key's last
    /// known state. A mismatch's re-read finding one of them is our own
    /// write; any other record — someone else's, or a newer claim of this
    /// process — is not, and a stale operation never adopts it.
    unknown: HashMap<Arc<str>, Vec<Bytes>>,
}

/// Distinct unknown-outcome values kept per key (the oldest are
/// forgotten: a status that flaps through a long outage).
const UNKNOWN_KEPT: usize = 16;

impl Writer {
    fn enqueue(&mut self, id: Arc<str>, op: Op) {
        self.queues.entry(id.clone()).or_default().push_back(op);
        if !self.busy.contains(&id) {
            self.pump(id);
        }
    }

    /// Runs queued operations of `id` until one needs I/O.
    fn pump(&mut self, id: Arc<str>) {
        while let Some(op) = self.queues.get_mut(&id).and_then(VecDeque::pop_front) {
            match op {
                Op::Adopt(rev) => {
                    self.revisions.insert(id.clone(), rev);
                    // The claim record the coordinator just wrote.
                    self.written
                        .insert(id.clone(), (crate::Status::Initializing, 0, None));
                }
                Op::Upsert(slot) => {
                    slot.dirty.store(false, Ordering::Release);
                    let Some((value, said)) = self.record(&slot) else {
                        continue;
                    };
                    if self.written.get(&id) == Some(&said) {
                        continue; // the stored record already says this
                    }
                    self.written.insert(id.clone(), said);
                    let bucket = self.bucket.clone();
                    let rev = self.revisions.get(&id).copied();
                    let key = id.clone();
                    self.in_flight.push(
                        async move {
                            let r = match rev {
                                None => bucket.create(&key, value.clone()).await,
                                Some(rev) => bucket.update(&key, value.clone(), rev).await,
                            };
                            (key, Done::Wrote(r, slot, value))
                        }
                        .boxed(),
                    );
                    self.busy.insert(id);
                    return;
                }
                Op::Remove | Op::Handover(_) => {
                    self.written.remove(&id);
                    let Some(rev) = self.revisions.remove(&id) else {
                        continue;
                    };
                    let bucket = self.bucket.clone();
                    let key = id.clone();
                    let record = match op {
                        Op::Handover(r) => Some(r),
                        _ => None,
                    };
                    self.in_flight.push(
                        async move {
                            let r = match record.clone() {
                                Some(value) => bucket.update(&key, value, rev).await.map(|_| ()),
                                None => bucket.delete(&key, Some(rev)).await,
                            };
                            (key, Done::Removed(r, rev, record))
                        }
                        .boxed(),
                    );
                    self.busy.insert(id);
                    return;
                }
            }
        }
        self.queues.remove(&id);
    }

    /// The JSON to write for `slot`, or `None` if it must not be written.
    fn record(&self, slot: &Arc<Slot>) -> Option<(Bytes, Said)> {
        let shared = self.shared.upgrade()?;
        if !shared.holds(slot) {
            return None; // removed since it was queued
        }
        let g = slot.lock();
        if g.fenced.is_some() {
            return None;
        }
        let rec = StateRecord {
            owner: self.node_id.to_string(),
            incarnation: self.incarnation.to_string(),
            kind: slot.spec.kind.clone(),
            status: g.status,
            since: g.since,
            reason: g.reason.as_deref().map(str::to_string),
            restarts: g.restarts,
            avoid: g
                .extra
                .as_ref()
                .map(|e| e.avoid.clone())
                .unwrap_or_default(),
            moves: g.extra.as_ref().map_or(0, |e| e.moves),
        };
        let said = (g.status, g.restarts, g.reason.clone());
        // Plain strings and numbers always serialise.
        serde_json::to_vec(&rec)
            .ok()
            .map(|v| (Bytes::from(v), said))
    }

    /// Runs `op` again after a backoff; the key stays busy meanwhile, so
    /// later operations on it wait their turn.
    fn retry_later(&mut self, id: Arc<str>, op: Op) {
        let n = self.failures.entry(id.clone()).or_insert(0);
        *n += 1;
        let wait = crate::config::backoff(RETRY_MIN, RETRY_MAX, *n);
        self.busy.insert(id.clone());
        self.in_flight.push(
            async move {
                tokio::time::sleep(wait).await;
                (id, Done::Retry(op))
            }
            .boxed(),
        );
    }

    /// Reads the key after a mismatch, then goes on with `op`.
    fn reread(&mut self, id: Arc<str>, op: Op) {
        let bucket = self.bucket.clone();
        self.busy.insert(id.clone());
        self.in_flight.push(
            async move {
                let r = bucket.get(&id).await;
                (id, Done::Reread(r, op))
            }
            .boxed(),
        );
    }

    fn done(&mut self, id: Arc<str>, done: Done) {
        self.busy.remove(&id);
        let shared = self.shared.upgrade();
        match done {
            Done::Wrote(Ok(rev), _, _) => {
                self.failures.remove(&id);
                self.unknown.remove(&id);
                self.revisions.insert(id.clone(), rev);
            }
            Done::Wrote(Err(e), slot, value) => {
                // Rewrite in full next time: what the store says is unknown.
                self.written.remove(&id);
                match e {
                    StoreError::Backend(m) => {
                        // Every retry CASes from the same revision, so at
                        // most one of these values landed, any of them.
                        let values = self.unknown.entry(id.clone()).or_default();
                        if !values.contains(&value) {
                            if values.len() == UNKNOWN_KEPT {
                                values.remove(0);
                            }
                            values.push(value);
                        }
                        if let Some(shared) = &shared {
                            shared.report_error(NodeError::Backend(format!(
                                "writing state of {id}: {m}; retrying"
                            )));
                        }
                        slot.dirty.store(true, Ordering::Release);
                        return self.retry_later(id, Op::Upsert(slot));
                    }
                    StoreError::AlreadyExists { .. } | StoreError::RevisionMismatch { .. } => {
                        return self.reread(id, Op::Upsert(slot));
                    }
                }
            }
            Done::Reread(Err(_), op) => return self.retry_later(id, op),
            Done::Reread(Ok(entry), op) => match (entry, op) {
                (Some(e), op)
                    if self
                        .unknown
                        .get(&id)
                        .is_some_and(|values| values.contains(&e.value)) =>
                {
                    // Our own write landed; its answer was lost. Go on from
                    // it (a removal too: it removes that record).
                    self.revisions.insert(id.clone(), e.revision);
                    if let Op::Upsert(slot) = &op {
                        slot.dirty.store(true, Ordering::Release);
                    }
                    self.queues.entry(id.clone()).or_default().push_front(op);
                }
                (found, Op::Upsert(slot)) => {
                    self.failures.remove(&id);
                    self.unknown.remove(&id);
                    self.revisions.remove(&id);
                    if let Some(shared) = &shared {
                        let who = found
                            .and_then(|e| serde_json::from_slice::<StateRecord>(&e.value).ok())
                            .map_or("deleted".to_string(), |r| {
                                format!(
                                    "owned by {} now",
                                    if r.owner.is_empty() {
                                        "nobody"
                                    } else {
                                        &r.owner
                                    }
                                )
                            });
                        shared.fence(
                            &slot,
                            format!("claim lost: state key was written by someone else ({who})"),
                        );
                    }
                }
                // A removal whose key someone else wrote (or deleted), that
                // its own handover record now holds, or that this process
                // claimed anew: not ours to remove. Done.
                _ => {
                    self.failures.remove(&id);
                    self.unknown.remove(&id);
                    self.revisions.remove(&id);
                }
            },
            Done::Retry(op) => {
                self.queues.entry(id.clone()).or_default().push_front(op);
            }
            Done::Removed(Ok(()), _, _) => {
                self.failures.remove(&id);
                self.unknown.remove(&id);
            }
            Done::Removed(Err(e), rev, record) => {
                let op = match record {
                    Some(r) => Op::Handover(r),
                    None => Op::Remove,
                };
                self.revisions.insert(id.clone(), rev);
                match e {
                    StoreError::Backend(m) => {
                        if let Some(shared) = &shared {
                            shared.report_error(NodeError::Backend(format!(
                                "releasing state of {id}: {m}; retrying"
                            )));
                        }
                        return self.retry_later(id, op);
                    }
                    _ => return self.reread(id, op),
                }
            }
        }
        self.pump(id);
    }

    fn answer_flushes(&mut self) {
        if self.in_flight.is_empty() && self.queues.is_empty() {
            for f in self.flushes.drain(..) {
                let _ = f.send(());
            }
        }
    }
}

pub(crate) fn spawn(
    shared: Weak<Shared>,
    bucket: Arc<dyn KvBucket>,
    node_id: Arc<str>,
    incarnation: Arc<str>,
) -> mpsc::UnboundedSender<WriteCmd> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut w = Writer {
        shared,
        bucket,
        node_id,
        incarnation,
        revisions: HashMap::new(),
        written: HashMap::new(),
        queues: HashMap::new(),
        busy: HashSet::new(),
        in_flight: FuturesUnordered::new(),
        flushes: Vec::new(),
        failures: HashMap::new(),
        unknown: HashMap::new(),
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                cmd = rx.recv(), if w.in_flight.len() < MAX_IN_FLIGHT => match cmd {
                    Some(WriteCmd::Adopt(id, rev)) => w.enqueue(id, Op::Adopt(rev)),
                    Some(WriteCmd::Upsert(slot)) => w.enqueue(slot.id.clone(), Op::Upsert(slot)),
                    Some(WriteCmd::Remove(id)) => w.enqueue(id, Op::Remove),
                    Some(WriteCmd::Handover(id, rec)) => w.enqueue(id, Op::Handover(rec)),
                    Some(WriteCmd::Flush(done)) => w.flushes.push(done),
                    None => {
                        // Node gone: finish what is in flight, then stop.
                        while let Some((id, d)) = w.in_flight.next().await {
                            w.done(id, d);
                        }
                        return;
                    }
                },
                Some((id, d)) = w.in_flight.next(), if !w.in_flight.is_empty() => w.done(id, d),
            }
            w.answer_flushes();
            if let Some(sh) = w.shared.upgrade() {
                // Keys with writes queued or in flight (an in-flight key may
                // keep an empty queue entry: max, not sum).
                let backlog = w.queues.len().max(w.in_flight.len()) as i64;
                sh.counters
                    .writer_backlog
                    .store(backlog, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{KvChange, KvEntry, MemoryStore, StateStore};
    use crate::subjects::Subjects;
    use async_trait::async_trait;
    use futures::stream::BoxStream;

    /// A bucket whose first delete lands but loses its answer; meanwhile
    /// this process claims the key anew (as the coordinator does once it
    /// sees the delete).
    struct LosesDeleteAnswer {
        inner: Arc<dyn KvBucket>,
        reclaim: Bytes,
        lost: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl KvBucket for LosesDeleteAnswer {
        async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
            self.inner.put(key, value).await
        }
        async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
            self.inner.create(key, value).await
        }
        async fn update(&self, key: &str, value: Bytes, rev: u64) -> Result<u64, StoreError> {
            self.inner.update(key, value, rev).await
        }
        async fn delete(&self, key: &str, expected: Option<u64>) -> Result<(), StoreError> {
            self.inner.delete(key, expected).await?;
            if !self.lost.swap(true, Ordering::SeqCst) {
                self.inner.create(key, self.reclaim.clone()).await?;
                return Err(StoreError::Backend("answer lost".into()));
            }
            Ok(())
        }
        async fn watch(&self) -> Result<BoxStream<'static, KvChange>, StoreError> {
            self.inner.watch().await
        }
        fn settings(&self) -> Option<crate::store::BucketSpec> {
            self.inner.settings()
        }
    }

    fn record(status: crate::Status) -> Bytes {
        let rec = StateRecord {
            owner: "n".into(),
            incarnation: "i".into(),
            kind: "sim".into(),
            status,
            since: std::time::SystemTime::now(),
            reason: None,
            restarts: 0,
            avoid: vec![],
            moves: 0,
        };
        Bytes::from(serde_json::to_vec(&rec).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_release_never_removes_a_newer_claim_of_this_process() {
        let store = MemoryStore::new();
        let inner = store
            .bucket(&Subjects::default().state_bucket_spec())
            .await
            .unwrap();
        let first = inner
            .create("w", record(crate::Status::Running))
            .await
            .unwrap();
        let bucket = Arc::new(LosesDeleteAnswer {
            inner: inner.clone(),
            reclaim: record(crate::Status::Initializing),
            lost: Default::default(),
        });
        let tx = spawn(Weak::new(), bucket, "n".into(), "i".into());
        tx.send(WriteCmd::Adopt("w".into(), first)).unwrap();
        // The release: its delete lands, the answer is lost, and the
        // process claims the key again before the retry.
        tx.send(WriteCmd::Remove("w".into())).unwrap();
        let (done, flushed) = oneshot::channel();
        tx.send(WriteCmd::Flush(done)).unwrap();
        flushed.await.unwrap();
        let now = inner.get("w").await.unwrap().expect("the new claim stands");
        let rec: StateRecord = serde_json::from_slice(&now.value).unwrap();
        assert_eq!(rec.status, crate::Status::Initializing);
        assert!(now.revision > first);
    }
}
