//! The state writer: mirrors each workload's status into the state store
//! (`<prefix>_state`, key = workload id), the record operators watch.
//!
//! The first write is a create-if-absent (the claim); every later write is a
//! compare-and-set on the revision this node last wrote. Losing one means
//! somebody else wrote the key: the node has lost the workload and fences it
//! (stops its actor) before anything else. Writes coalesce: a slot queued
//! twice is written once, with its latest status.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::slot::Slot;
use super::Shared;
use crate::store::{KvBucket, StoreError};
use crate::wire::StateRecord;
use crate::NodeError;

pub(crate) enum WriteCmd {
    /// The key was claimed outside the writer at this revision: CAS from it.
    Adopt(Arc<str>, u64),
    Upsert(Arc<Slot>),
    Remove(Arc<str>),
    /// Answer once everything queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub(crate) fn spawn(
    shared: std::sync::Weak<Shared>,
    bucket: Arc<dyn KvBucket>,
    node_id: Arc<str>,
) -> mpsc::UnboundedSender<WriteCmd> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut revisions: HashMap<Arc<str>, u64> = HashMap::new();
        while let Some(cmd) = rx.recv().await {
            match cmd {
                WriteCmd::Upsert(slot) => {
                    slot.dirty.store(false, Ordering::Release);
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    if !shared.holds(&slot) {
                        continue; // removed since it was queued
                    }
                    let value = {
                        let g = slot.lock();
                        if g.deleting && g.fenced.is_some() {
                            continue;
                        }
                        let rec = StateRecord {
                            owner: node_id.to_string(),
                            kind: slot.spec.kind.clone(),
                            status: g.status,
                            since: g.since,
                            reason: g.reason.as_deref().map(str::to_string),
                            restarts: g.restarts,
                        };
                        match serde_json::to_vec(&rec) {
                            Ok(v) => Bytes::from(v),
                            Err(_) => continue, // plain strings and numbers always serialise
                        }
                    };
                    let written = match revisions.get(&slot.id) {
                        None => bucket.create(&slot.id, value).await,
                        Some(rev) => bucket.update(&slot.id, value, *rev).await,
                    };
                    match written {
                        Ok(rev) => {
                            revisions.insert(slot.id.clone(), rev);
                        }
                        Err(e) => {
                            revisions.remove(&slot.id);
                            match e {
                                StoreError::AlreadyExists { .. }
                                | StoreError::RevisionMismatch { .. } => shared.fence(
                                    &slot,
                                    format!(
                                        "claim lost: state key was written by someone else ({e})"
                                    ),
                                ),
                                StoreError::Backend(m) => shared.report_error(NodeError::Backend(
                                    format!("writing state of {}: {m}", slot.id),
                                )),
                            }
                        }
                    }
                }
                WriteCmd::Adopt(id, rev) => {
                    revisions.insert(id, rev);
                }
                WriteCmd::Remove(id) => {
                    if let Some(rev) = revisions.remove(&id) {
                        if let Err(e) = bucket.delete(&id, Some(rev)).await {
                            if let Some(shared) = shared.upgrade() {
                                shared.report_error(NodeError::Backend(format!(
                                    "deleting state of {id}: {e}"
                                )));
                            }
                        }
                    }
                }
                WriteCmd::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    tx
}
