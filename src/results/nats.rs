//! The result history on JetStream: the `<prefix>_results` stream.

use std::time::SystemTime;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{ResultLimits, ResultQuery, ResultStore, StoredResult};
use crate::store::StoreError;
use crate::subjects::Subjects;

/// How long a results query waits for the next message before it stops.
const QUERY_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Results in the `<prefix>_results` stream, one subject per (workload,
/// source): `<prefix>.results.<workload>.<source>`.
#[derive(Clone)]
pub struct NatsResults {
    js: jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
}

impl NatsResults {
    /// Opens the stream, creating it with `limits` and `replicas` if it
    /// does not exist (the first node does; later ones keep its settings,
    /// which an operator changes with `nats stream edit`).
    pub async fn open_or_create(
        client: async_nats::Client,
        subjects: Subjects,
        limits: ResultLimits,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        let js = jetstream::new(client);
        let name = subjects.results_stream();
        let stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(_) => js
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    description: Some(
                        "Ottomato result history: <prefix>.results.<workload>.<source>".into(),
                    ),
                    subjects: vec![subjects.results_wildcard()],
                    max_age: limits.max_age,
                    max_bytes: i64::try_from(limits.max_bytes).unwrap_or(i64::MAX),
                    max_messages_per_subject: i64::from(limits.per_subject.max(1)),
                    discard: stream::DiscardPolicy::Old,
                    storage: stream::StorageType::File,
                    num_replicas: replicas.max(1),
                    allow_direct: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| backend(format!("results stream {name}: {e}")))?,
        };
        Ok(NatsResults {
            js,
            stream,
            subjects,
        })
    }

    /// Opens the existing stream (operators: they do not create it).
    pub async fn open(client: async_nats::Client, subjects: Subjects) -> Result<Self, StoreError> {
        let js = jetstream::new(client);
        let name = subjects.results_stream();
        let stream = js.get_stream(&name).await.map_err(|e| {
            backend(format!(
                "results stream {name}: {e} (a node creates it when it starts)"
            ))
        })?;
        Ok(NatsResults {
            js,
            stream,
            subjects,
        })
    }

    fn decode(&self, subject: &str, seq: u64, payload: &[u8]) -> Option<StoredResult> {
        let (workload, source) = self.subjects.parse_result(subject)?;
        Some(StoredResult {
            seq,
            workload: workload.to_string(),
            source: source.to_string(),
            result: serde_json::from_slice(payload).ok()?,
        })
    }
}

#[async_trait]
impl ResultStore for NatsResults {
    async fn append(&self, workload: &str, source: &str, payload: Bytes) -> Result<(), StoreError> {
        self.js
            .publish(self.subjects.result(workload, source), payload)
            .await
            .map_err(backend)?
            .await
            .map(drop)
            .map_err(backend)
    }

    async fn last(&self, workload: &str, source: &str) -> Result<Option<StoredResult>, StoreError> {
        use jetstream::stream::DirectGetErrorKind;
        match self
            .stream
            .direct_get_last_for_subject(self.subjects.result(workload, source))
            .await
        {
            Ok(m) => Ok(self.decode(m.subject.as_str(), m.sequence, &m.payload)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    /// Reads with an ordered consumer filtered as narrowly as NATS allows
    /// (one workload, one schedule, a start time; the newest per subject
    /// for `last: 1`), to the end of the stream as it was (the consumer's
    /// pending count, never a timeout); the glob and `last` are applied here.
    async fn query(&self, query: &ResultQuery) -> Result<Vec<StoredResult>, StoreError> {
        let workload = match query.select.as_deref() {
            Some(g) if !g.contains(['*', '?']) => g,
            _ => "*",
        };
        let filter = match query.source.as_deref() {
            Some(s) => self.subjects.result(workload, s),
            None if workload == "*" => self.subjects.results_wildcard(),
            None => format!("{}.results.{workload}.>", self.subjects.prefix()),
        };
        let deliver_policy = match (query.since, query.last) {
            (Some(t), _) => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from(t),
            },
            (None, Some(1)) => consumer::DeliverPolicy::LastPerSubject,
            (None, _) => consumer::DeliverPolicy::All,
        };
        // Read up to the stream's end as it is now: results stored while
        // we read (or a tail removed by the limits) cannot keep us reading.
        let end = self
            .stream
            .get_info()
            .await
            .map_err(backend)?
            .state
            .last_sequence;
        let c = self
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                description: Some("ottomato results query".into()),
                filter_subject: filter,
                deliver_policy,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(backend)?;
        let mut left = c.cached_info().num_pending;
        let mut out = Vec::new();
        if left == 0 || end == 0 {
            return Ok(out);
        }
        let mut messages = c.messages().await.map_err(backend)?;
        loop {
            // A silent stream for this long: the rest is gone (limits).
            let Ok(next) = tokio::time::timeout(QUERY_IDLE, messages.next()).await else {
                break;
            };
            let Some(m) = next else { break };
            let m = m.map_err(backend)?;
            let Ok(info) = m.info() else { continue };
            let seq = info.stream_sequence;
            left = info.pending;
            if seq > end {
                break;
            }
            if let Some(r) = self.decode(m.subject.as_str(), seq, &m.payload) {
                if query.keeps(&r.workload, &r.source)
                    && query
                        .since
                        .is_none_or(|t| SystemTime::from(info.published) >= t)
                {
                    out.push(r);
                }
            }
            if left == 0 || seq >= end {
                break;
            }
        }
        Ok(query.finish(out))
    }
}
