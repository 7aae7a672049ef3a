//! The operator's side: what the CLI (and any Rust program) uses to write
//! specs, read state, run tasks and fan-outs, and watch a cluster — over the
//! same subjects and buckets any NATS client can use (see `subjects.md`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use crate::nats::{NatsStore, NatsTransport};
use crate::results::{NatsResults, ResultQuery, ResultStore, StoredResult};
use crate::schedule::{Schedule, ScheduleSpec};
use crate::spec::{validate_id, WorkloadSpec};
use crate::store::{KvBucket, KvChange, StateStore};
use crate::subjects::Subjects;
use crate::transport::{Message, Transport, TransportError};
use crate::wire::{FanoutDone, FanoutRequest, NodeInfo, StateRecord, TaskRequest, TaskResult};
use crate::CommandClass;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The input is wrong (id, spec, selection); nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// No such workload.
    #[error("workload {0:?} not found")]
    NotFound(String),
    /// NATS failed.
    #[error("{0}")]
    Backend(String),
}

fn backend(e: impl std::fmt::Display) -> ClientError {
    ClientError::Backend(e.to_string())
}

/// One workload as the operator sees it: its spec and its state record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadView {
    /// Id.
    pub id: String,
    /// The desired state.
    pub spec: Option<WorkloadSpec>,
    /// Claim and status, if any node wrote one.
    pub state: Option<StateRecord>,
}

/// A connection to a cluster for operators.
pub struct Client {
    subjects: Subjects,
    transport: Arc<NatsTransport>,
    workloads: Arc<dyn KvBucket>,
    /// The membership bucket, once a node has created it (operator tools
    /// never do: its TTL is the nodes').
    nodes: tokio::sync::OnceCell<Arc<dyn KvBucket>>,
    store: NatsStore,
    state: Arc<dyn KvBucket>,
    /// The class of the subjects tasks are sent on (write by default).
    task_class: CommandClass,
    nc: async_nats::Client,
    /// The schedules bucket and the results stream: the nodes create them
    /// (opened on first use).
    schedules: tokio::sync::OnceCell<Arc<dyn KvBucket>>,
    results: tokio::sync::OnceCell<NatsResults>,
}

impl Client {
    /// Connects to `urls` (comma-separated) under `prefix`, creating the
    /// buckets if this is a fresh cluster.
    pub async fn connect(urls: &str, prefix: &str) -> Result<Client, ClientError> {
        Self::connect_with(urls, prefix, &crate::nats::Auth::default()).await
    }

    /// Connects with authentication / TLS.
    pub async fn connect_with(
        urls: &str,
        prefix: &str,
        auth: &crate::nats::Auth,
    ) -> Result<Client, ClientError> {
        Subjects::validate_prefix(prefix).map_err(ClientError::Invalid)?;
        let nc = crate::nats::connect_with(urls, "ottomato cli", auth)
            .await
            .map_err(ClientError::Backend)?;
        let subjects = Subjects::new(prefix);
        let store = NatsStore::for_operators(nc.clone());
        let workloads = store
            .bucket(&subjects.workloads_bucket_spec(1))
            .await
            .map_err(backend)?;
        // The membership bucket is the nodes' to create (its TTL is theirs):
        // opened when a node has (see `nodes`).
        let nodes = tokio::sync::OnceCell::new();
        if let Some(b) = store.open_existing(&subjects.nodes_bucket()).await {
            let _ = nodes.set(b);
        }
        let state = store
            .bucket(&subjects.state_bucket_spec())
            .await
            .map_err(backend)?;
        Ok(Client {
            subjects,
            nc: nc.clone(),
            schedules: tokio::sync::OnceCell::new(),
            results: tokio::sync::OnceCell::new(),
            transport: Arc::new(NatsTransport::new(nc)),
            workloads,
            nodes,
            store,
            state,
            task_class: CommandClass::Write,
        })
    }

    /// Sends tasks and fan-outs on `class` subjects from now on
    /// (`<prefix>.task.read.<id>`): what a read-only operator, whose NATS
    /// user may publish only read subjects, sets. A node answers a
    /// write-class command sent on a read subject `forbidden`.
    pub fn with_task_class(mut self, class: CommandClass) -> Self {
        self.task_class = class;
        self
    }

    /// The class tasks are sent with.
    pub fn task_class(&self) -> CommandClass {
        self.task_class
    }

    async fn schedules_bucket(&self) -> Result<&Arc<dyn KvBucket>, ClientError> {
        self.schedules
            .get_or_try_init(|| async {
                let name = self.subjects.schedules_bucket();
                self.store.open_existing(&name).await.ok_or_else(|| {
                    ClientError::Backend(format!(
                        "no schedules bucket {name} yet: start a node once (nodes create it)"
                    ))
                })
            })
            .await
    }

    /// Writes (creates or replaces) schedule `id`; refused with the reason
    /// when invalid. Returns it parsed (to compute its ticks).
    pub async fn put_schedule(
        &self,
        id: &str,
        spec: &ScheduleSpec,
    ) -> Result<Schedule, ClientError> {
        let parsed = Schedule::parse(id, spec.clone()).map_err(ClientError::Invalid)?;
        let value = serde_json::to_vec(spec).map_err(backend)?;
        self.schedules_bucket()
            .await?
            .put(id, Bytes::from(value))
            .await
            .map_err(backend)?;
        Ok(parsed)
    }

    /// Deletes schedule `id` (`NotFound` when there is none).
    pub async fn delete_schedule(&self, id: &str) -> Result<(), ClientError> {
        let bucket = self.schedules_bucket().await?;
        if bucket.get(id).await.map_err(backend)?.is_none() {
            return Err(ClientError::NotFound(format!("schedule {id}")));
        }
        bucket.delete(id, None).await.map_err(backend)
    }

    /// One schedule as stored (`None`: there is none).
    pub async fn schedule(&self, id: &str) -> Result<Option<ScheduleSpec>, ClientError> {
        let Some(e) = self
            .schedules_bucket()
            .await?
            .get(id)
            .await
            .map_err(backend)?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|err| ClientError::Invalid(format!("schedule {id} as stored: {err}")))
    }

    /// Pauses (`false`) or resumes (`true`) schedule `id`, by
    /// compare-and-set on the stored revision (retried if someone else
    /// wrote it meanwhile), so a concurrent edit is never lost.
    pub async fn set_schedule_enabled(&self, id: &str, enabled: bool) -> Result<(), ClientError> {
        let bucket = self.schedules_bucket().await?;
        for _ in 0..8 {
            let Some(e) = bucket.get(id).await.map_err(backend)? else {
                return Err(ClientError::NotFound(format!("schedule {id}")));
            };
            let mut spec: ScheduleSpec = serde_json::from_slice(&e.value)
                .map_err(|err| ClientError::Invalid(format!("schedule {id} as stored: {err}")))?;
            spec.enabled = enabled;
            let value = serde_json::to_vec(&spec).map_err(backend)?;
            match bucket.update(id, Bytes::from(value), e.revision).await {
                Ok(_) => return Ok(()),
                Err(crate::store::StoreError::RevisionMismatch { .. }) => continue,
                Err(other) => return Err(backend(other)),
            }
        }
        Err(ClientError::Backend(format!(
            "schedule {id} kept changing while it was being {}; try again",
            if enabled { "resumed" } else { "paused" }
        )))
    }

    /// Every stored schedule, by id: parsed, or why it is invalid.
    pub async fn schedules(&self) -> Result<Vec<(String, Result<Schedule, String>)>, ClientError> {
        crate::schedule::read_all(self.schedules_bucket().await?)
            .await
            .map_err(backend)
    }

    /// Stored results (`query` selects; oldest first).
    pub async fn results(&self, query: &ResultQuery) -> Result<Vec<StoredResult>, ClientError> {
        let store = self
            .results
            .get_or_try_init(|| NatsResults::open(self.nc.clone(), self.subjects.clone()))
            .await
            .map_err(backend)?;
        store.query(query).await.map_err(backend)
    }

    /// Writes (creates or replaces) a spec.
    pub async fn put_spec(&self, spec: &WorkloadSpec) -> Result<(), ClientError> {
        validate_spec(spec)?;
        let value = serde_json::to_vec(spec).map_err(backend)?;
        self.workloads
            .put(&spec.id, Bytes::from(value))
            .await
            .map(|_| ())
            .map_err(backend)
    }

    /// Deletes a spec: the workload stops wherever it runs.
    pub async fn delete_spec(&self, id: &str) -> Result<(), ClientError> {
        if self.workloads.get(id).await.map_err(backend)?.is_none() {
            return Err(ClientError::NotFound(id.to_string()));
        }
        self.workloads.delete(id, None).await.map_err(backend)
    }

    /// Every key and value of a bucket (the watch's replay).
    async fn snapshot(bucket: &Arc<dyn KvBucket>) -> Result<HashMap<String, Bytes>, ClientError> {
        let mut w = bucket.watch().await.map_err(backend)?;
        let mut out = HashMap::new();
        while let Some(c) = w.next().await {
            match c {
                KvChange::Put(e) => {
                    out.insert(e.key, e.value);
                }
                KvChange::Delete { key, .. } => {
                    out.remove(&key);
                }
                KvChange::Synced => break,
            }
        }
        Ok(out)
    }

    /// Every workload (spec and state), sorted by id.
    pub async fn workloads(&self) -> Result<Vec<WorkloadView>, ClientError> {
        let specs = Self::snapshot(&self.workloads).await?;
        let states = Self::snapshot(&self.state).await?;
        let ids: std::collections::BTreeSet<&String> = specs.keys().chain(states.keys()).collect();
        Ok(ids
            .into_iter()
            .map(|id| WorkloadView {
                id: id.clone(),
                spec: specs.get(id).and_then(|v| parse_stored_spec(id, v)),
                state: states.get(id).and_then(|v| serde_json::from_slice(v).ok()),
            })
            .collect())
    }

    /// One workload.
    pub async fn workload(&self, id: &str) -> Result<WorkloadView, ClientError> {
        let spec = self.workloads.get(id).await.map_err(backend)?;
        let state = self.state.get(id).await.map_err(backend)?;
        if spec.is_none() && state.is_none() {
            return Err(ClientError::NotFound(id.to_string()));
        }
        Ok(WorkloadView {
            id: id.to_string(),
            spec: spec.and_then(|e| parse_stored_spec(id, &e.value)),
            state: state.and_then(|e| serde_json::from_slice(&e.value).ok()),
        })
    }

    /// Live nodes, sorted by id.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        let bucket = match self.nodes.get() {
            Some(b) => b,
            None => match self
                .store
                .open_existing(&self.subjects.nodes_bucket())
                .await
            {
                Some(b) => self.nodes.get_or_init(|| async { b }).await,
                None => return Ok(Vec::new()), // no node has run yet
            },
        };
        let mut v: Vec<NodeInfo> = Self::snapshot(bucket)
            .await?
            .values()
            .filter_map(|b| serde_json::from_slice::<NodeInfo>(b).ok())
            .filter(|n| !n.left)
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// A node's own status (its `<prefix>.node.<id>.status` endpoint):
    /// workloads by status and the lease time left; `None` when it does not
    /// answer within `timeout`.
    pub async fn node_status(&self, node: &str, timeout: Duration) -> Option<serde_json::Value> {
        let m = self
            .transport
            .request(
                &self.subjects.node_status(node),
                Message::new(bytes::Bytes::new()),
                timeout,
            )
            .await
            .ok()?;
        serde_json::from_slice(&m.payload).ok()
    }

    /// Runs one task; `NotFound` when no node owns the workload.
    pub async fn run_task(
        &self,
        id: &str,
        req: &TaskRequest,
        timeout: Duration,
    ) -> Result<TaskResult, ClientError> {
        validate_id(id).map_err(ClientError::Invalid)?;
        let payload = serde_json::to_vec(req).map_err(backend)?;
        let reply = self
            .transport
            .request(
                &self.subjects.task(self.task_class, id),
                Message::new(payload),
                timeout + Duration::from_millis(500),
            )
            .await
            .map_err(|e| match e {
                TransportError::NoResponders(_) => {
                    ClientError::NotFound(format!("{id} (no node owns it)"))
                }
                TransportError::Timeout => ClientError::Backend(format!(
                    "{id}: no reply within {timeout:?} (if the NATS server refused the \
                     {} subject for this user, it says so above)",
                    self.task_class
                )),
                other => backend(other),
            })?;
        serde_json::from_slice(&reply.payload).map_err(backend)
    }

    /// Runs a task on a selection: results stream as they arrive; the stream
    /// ends when every live node said it is done (or at `timeout`).
    pub async fn fanout(
        &self,
        req: FanoutRequest,
        timeout: Duration,
    ) -> Result<BoxStream<'static, FanoutEvent>, ClientError> {
        let live: HashSet<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let payload = serde_json::to_vec(&req).map_err(backend)?;
        let replies = self
            .transport
            .request_many(
                &self.subjects.fanout(self.task_class),
                Message::new(payload),
            )
            .await
            .map_err(backend)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let state = (replies, live, HashMap::<String, u64>::new(), 0u64, false);
        Ok(futures::stream::unfold(
            state,
            move |(mut replies, mut waiting, mut promised, mut got, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let all_done = waiting.is_empty() && promised.values().sum::<u64>() <= got;
                    if all_done {
                        return Some((
                            FanoutEvent::Complete,
                            (replies, waiting, promised, got, true),
                        ));
                    }
                    match tokio::time::timeout_at(deadline, replies.next()).await {
                        Ok(Some(m)) => {
                            if let Ok(d) = serde_json::from_slice::<FanoutDone>(&m.payload) {
                                waiting.remove(&d.node);
                                promised.insert(d.node, d.results);
                                continue;
                            }
                            if let Ok(r) = serde_json::from_slice::<TaskResult>(&m.payload) {
                                got += 1;
                                return Some((
                                    FanoutEvent::Result(Box::new(r)),
                                    (replies, waiting, promised, got, false),
                                ));
                            }
                        }
                        Ok(None) | Err(_) => {
                            let silent: Vec<String> = waiting.iter().cloned().collect();
                            return Some((
                                FanoutEvent::TimedOut {
                                    silent_nodes: silent,
                                },
                                (replies, waiting, promised, got, true),
                            ));
                        }
                    }
                }
            },
        )
        .boxed())
    }

    /// Live changes of the state bucket (after its current content), as
    /// `(workload id, record or None when deleted)`.
    pub async fn watch_state(
        &self,
    ) -> Result<BoxStream<'static, (String, Option<StateRecord>)>, ClientError> {
        let w = self.state.watch().await.map_err(backend)?;
        Ok(w.filter_map(|c| async move {
            match c {
                KvChange::Put(e) => Some((e.key, serde_json::from_slice(&e.value).ok())),
                KvChange::Delete { key, .. } => Some((key, None)),
                KvChange::Synced => None,
            }
        })
        .boxed())
    }
}

/// What a fan-out stream yields.
#[derive(Debug, Clone)]
pub enum FanoutEvent {
    /// One workload's result.
    Result(Box<TaskResult>),
    /// Every live node said it is done and all its results arrived.
    Complete,
    /// The timeout passed first; these nodes never said they were done.
    TimedOut {
        /// Nodes that did not finish.
        silent_nodes: Vec<String>,
    },
}

fn parse_stored_spec(id: &str, v: &[u8]) -> Option<WorkloadSpec> {
    let mut val: serde_json::Value = serde_json::from_slice(v).ok()?;
    val.as_object_mut()?
        .insert("id".into(), serde_json::Value::String(id.into()));
    serde_json::from_value(val).ok()
}

/// Checks a spec the way nodes will, so bad input is refused before it is written.
pub fn validate_spec(spec: &WorkloadSpec) -> Result<(), ClientError> {
    validate_id(&spec.id).map_err(ClientError::Invalid)?;
    if spec.kind.trim().is_empty() {
        return Err(ClientError::Invalid(format!(
            "workload {:?}: kind is empty",
            spec.id
        )));
    }
    if !(spec.config.is_null() || spec.config.is_object()) {
        return Err(ClientError::Invalid(format!(
            "workload {:?}: config must be a JSON object",
            spec.id
        )));
    }
    // The built-in kinds check their config here, before it reaches the
    // bucket (a kind this process does not know is checked by its node).
    static BUILTIN: std::sync::OnceLock<crate::Kinds> = std::sync::OnceLock::new();
    BUILTIN
        .get_or_init(crate::Kinds::builtin)
        .validate(spec)
        .map_err(|e| ClientError::Invalid(format!("workload {:?}: {e}", spec.id)))
}

/// Parses an import file: JSON lines (one spec object per line) or CSV with a
/// header `id,kind[,config][,labels][,zone]` (labels as `k=v;k=v`). Returns
/// the specs, or every bad row with its line number.
pub fn parse_import(text: &str) -> (Vec<WorkloadSpec>, Vec<String>) {
    let mut specs = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let csv = !first.trim_start().starts_with('{');
    let mut header: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let parsed: Result<WorkloadSpec, String> = if csv {
            if header.is_empty() {
                header = line.split(',').map(|h| h.trim().to_lowercase()).collect();
                if !(header.contains(&"id".to_string()) && header.contains(&"kind".to_string())) {
                    errors.push(format!(
                        "line {n}: CSV header must name at least id and kind, got {line:?}"
                    ));
                    return (specs, errors);
                }
                continue;
            }
            parse_csv_row(&header, line)
        } else {
            serde_json::from_str::<WorkloadSpec>(line).map_err(|e| format!("not a spec: {e}"))
        };
        match parsed.and_then(|s| validate_spec(&s).map(|_| s).map_err(|e| e.to_string())) {
            Ok(s) if !seen.insert(s.id.clone()) => {
                errors.push(format!("line {n}: duplicate id {:?}", s.id))
            }
            Ok(s) => specs.push(s),
            Err(e) => errors.push(format!("line {n}: {e}")),
        }
    }
    (specs, errors)
}

fn parse_csv_row(header: &[String], line: &str) -> Result<WorkloadSpec, String> {
    // Config JSON may contain commas: split only as many fields as the header has,
    // and let a `config` column swallow the JSON object.
    let fields = split_csv(line);
    if fields.len() != header.len() {
        return Err(format!(
            "expected {} fields ({}), got {}",
            header.len(),
            header.join(","),
            fields.len()
        ));
    }
    let get = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .map(|i| fields[i].trim())
    };
    let mut spec = WorkloadSpec::new(get("id").unwrap_or(""), get("kind").unwrap_or(""));
    if let Some(c) = get("config").filter(|c| !c.is_empty()) {
        spec.config = serde_json::from_str(c).map_err(|e| format!("config is not JSON: {e}"))?;
    }
    if let Some(l) = get("labels").filter(|l| !l.is_empty()) {
        let mut labels = BTreeMap::new();
        for kv in l.split(';') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("label {kv:?} is not k=v"))?;
            labels.insert(k.trim().to_string(), v.trim().to_string());
        }
        spec.labels = labels;
    }
    if let Some(z) = get("zone").filter(|z| !z.is_empty()) {
        spec.placement.zone = Some(z.to_string());
    }
    Ok(spec)
}

/// Splits a CSV line on commas outside double quotes; `""` is a quote.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                if let Some(s) = out.last_mut() {
                    s.push('"');
                }
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            c => {
                if let Some(s) = out.last_mut() {
                    s.push(c)
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_reports_every_bad_row_with_its_line() {
        let jsonl = "{\"id\":\"a\",\"kind\":\"sim\"}\n\n{\"id\":\"b.c\",\"kind\":\"sim\"}\nnope\n{\"id\":\"a\",\"kind\":\"sim\"}\n";
        let (ok, bad) = parse_import(jsonl);
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(
            bad[0].starts_with("line 3:") && bad[0].contains("'.'"),
            "{bad:?}"
        );
        assert!(bad[1].starts_with("line 4:"));
        assert!(bad[2].starts_with("line 5: duplicate id"));
        let csv = "id,kind,config,labels,zone\nr1,sim,\"{\"\"ping_ms\"\":1}\",site=oslo;rack=2,b\nr2,sim,,,\nr3,,,,\n";
        let (ok, bad) = parse_import(csv);
        assert_eq!(ok.len(), 2, "{bad:?}");
        assert_eq!(ok[0].config["ping_ms"], 1);
        assert_eq!(ok[0].labels["rack"], "2");
        assert_eq!(ok[0].placement.zone.as_deref(), Some("b"));
        assert_eq!(
            bad,
            vec!["line 4: workload \"r3\": kind is empty".to_string()]
        );
    }
}
