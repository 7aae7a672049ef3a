//! `ottomato ui`: a live fleet page served from the binary (no CDN).
//!
//! The server connects as an operator, keeps the fleet in memory from KV
//! watches (state) and polls (membership, specs), and aggregates there: the
//! browser gets counts, the failing workloads (capped) and a feed of recent
//! changes — never 100 000 rows. Updates are pushed with server-sent events.
//!
//! Routes: `/` the page; `/api/summary` the aggregate (JSON);
//! `/api/stream` the same as SSE (`summary` events, debounced), plus
//! `change` events; `/api/search?q=` up to 100 workloads whose id contains
//! `q` or that have label `k=v`; `/api/workload/<id>` one workload;
//! `POST /api/task` `{"id", "command", "kwargs"}` runs a task.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::client::Client;
use crate::wire::{NodeInfo, StateRecord, TaskRequest};
use crate::Status;

const PAGE: &str = include_str!("ui/index.html");
/// Failing workloads shipped to the page, at most.
const MAX_FAILING: usize = 200;
/// Recent changes kept for the feed.
const FEED: usize = 100;

#[derive(Clone, Serialize)]
struct Row {
    owner: String,
    status: Status,
    reason: Option<String>,
    since: SystemTime,
    kind: String,
    labels: BTreeMap<String, String>,
}

#[derive(Clone, Serialize)]
struct Change {
    at: SystemTime,
    workload: String,
    from: Option<Status>,
    to: Option<Status>,
    owner: String,
    reason: Option<String>,
}

#[derive(Default)]
struct Fleet {
    rows: HashMap<String, Row>,
    nodes: Vec<NodeInfo>,
    /// Each node's lease time left, in ms, from its status endpoint
    /// (`None`: it did not answer).
    lease_ms: HashMap<String, Option<u64>>,
    feed: VecDeque<Change>,
    /// Bumped on every change; the stream sends a summary when it moved.
    version: u64,
    /// The summary of `version`, built once for every client.
    cached: Option<(u64, Bytes)>,
}

impl Fleet {
    fn apply(&mut self, id: String, rec: Option<StateRecord>) -> Option<Change> {
        let before = self.rows.get(&id).map(|r| r.status);
        let change = match rec {
            Some(rec) => {
                let row = self.rows.entry(id.clone()).or_insert_with(|| Row {
                    owner: String::new(),
                    status: rec.status,
                    reason: None,
                    since: rec.since,
                    kind: rec.kind.clone(),
                    labels: BTreeMap::new(),
                });
                row.owner = rec.owner.clone();
                row.status = rec.status;
                row.reason = rec.reason.clone();
                row.since = rec.since;
                if !rec.kind.is_empty() {
                    row.kind = rec.kind.clone();
                }
                (before != Some(rec.status)).then(|| Change {
                    at: SystemTime::now(),
                    workload: id,
                    from: before,
                    to: Some(rec.status),
                    owner: rec.owner,
                    reason: rec.reason,
                })
            }
            None => self.rows.remove(&id).map(|r| Change {
                at: SystemTime::now(),
                workload: id,
                from: Some(r.status),
                to: None,
                owner: r.owner,
                reason: None,
            }),
        };
        self.version += 1;
        if let Some(c) = &change {
            self.feed.push_front(c.clone());
            self.feed.truncate(FEED);
        }
        change
    }

    /// The summary as JSON bytes, built at most once per version.
    fn summary_bytes(&mut self) -> Bytes {
        if let Some((v, b)) = &self.cached {
            if *v == self.version {
                return b.clone();
            }
        }
        let b = Bytes::from(self.summary().to_string());
        self.cached = Some((self.version, b.clone()));
        b
    }

    fn summary(&self) -> Value {
        let live: std::collections::HashSet<&str> =
            self.nodes.iter().map(|n| n.id.as_str()).collect();
        let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
        let mut per_node: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
        let mut per_zone: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
        let zone_of: HashMap<&str, &str> = self
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.zone.as_deref().unwrap_or("(no zone)")))
            .collect();
        let mut orphaned = 0;
        let mut failing: Vec<(&String, &Row)> = Vec::new();
        for (id, r) in &self.rows {
            let s = r.status.as_str();
            *by_status.entry(s).or_default() += 1;
            *per_node
                .entry(r.owner.as_str())
                .or_default()
                .entry(s)
                .or_default() += 1;
            let zone = zone_of
                .get(r.owner.as_str())
                .copied()
                .unwrap_or("(no live node)");
            *per_zone
                .entry(zone.to_string())
                .or_default()
                .entry(s)
                .or_default() += 1;
            if !r.owner.is_empty() && !live.contains(r.owner.as_str()) {
                orphaned += 1;
            }
            if matches!(
                r.status,
                Status::Unreachable | Status::Dead | Status::Failed | Status::Unplaceable
            ) || (r.status == Status::Initializing && r.reason.is_some())
            {
                failing.push((id, r));
            }
        }
        failing.sort_by(|a, b| a.1.since.cmp(&b.1.since).then(a.0.cmp(b.0)));
        let failing_total = failing.len();
        let failing: Vec<Value> = failing
            .into_iter()
            .take(MAX_FAILING)
            .map(|(id, r)| json!({"id": id, "row": r}))
            .collect();
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id, "zone": n.zone, "load": n.load, "capacity": n.capacity,
                    "draining": n.draining, "version": n.version,
                    "workloads": per_node.get(n.id.as_str()),
                    "leaseMs": self.lease_ms.get(&n.id).copied().flatten(),
                })
            })
            .collect();
        json!({
            "total": self.rows.len(),
            "byStatus": by_status,
            "nodes": nodes,
            "zones": per_zone,
            "orphaned": orphaned,
            "failing": failing,
            "failingTotal": failing_total,
            "feed": self.feed.iter().take(30).collect::<Vec<_>>(),
        })
    }
}

type Shared = Arc<(Mutex<Fleet>, broadcast::Sender<Change>, Client)>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Fleet> {
    s.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads the fleet, keeps it current, and serves the page on `listener`
/// until `shutdown` resolves.
pub async fn run(
    client: Client,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (tx, _) = broadcast::channel(1024);
    let shared: Shared = Arc::new((Mutex::new(Fleet::default()), tx, client));
    refresh(&shared).await?;
    // State changes, live.
    let mut watch = shared.2.watch_state().await?;
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some((id, rec)) = watch.next().await {
                let change = lock(&shared).apply(id, rec);
                if let Some(c) = change {
                    let _ = shared.1.send(c);
                }
            }
        });
    }
    // Membership every second (nodes expire by TTL); specs (kinds, labels)
    // and a full resync every 30 s.
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                n += 1;
                if n % 30 == 0 {
                    let _ = refresh(&shared).await;
                } else if let Ok(nodes) = shared.2.nodes().await {
                    // Lease health from each node itself (a few nodes: in turn).
                    let mut lease = HashMap::new();
                    for n in &nodes {
                        let st = shared
                            .2
                            .node_status(&n.id, Duration::from_millis(300))
                            .await;
                        // Whole seconds: a new summary per second otherwise.
                        let ms = st
                            .and_then(|v| v["leaseRemainingMs"].as_u64())
                            .map(|ms| ms / 1000 * 1000);
                        lease.insert(n.id.clone(), ms);
                    }
                    let mut f = lock(&shared);
                    if f.lease_ms != lease {
                        f.lease_ms = lease;
                        f.version += 1;
                    }
                    let changed = nodes
                        .iter()
                        .map(|n| (&n.id, n.load, n.draining))
                        .ne(f.nodes.iter().map(|n| (&n.id, n.load, n.draining)));
                    f.nodes = nodes;
                    if changed {
                        f.version += 1;
                    }
                }
            }
        });
    }
    let listen = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    let accept = async {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req| route(shared.clone(), listen, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    Ok(())
}

/// The first load: every workload. Later ones merge only what the state
/// watch does not carry (kind, labels), so they never undo newer changes.
async fn refresh(shared: &Shared) -> anyhow::Result<()> {
    let views = shared.2.workloads().await?;
    let nodes = shared.2.nodes().await?;
    let loaded = !lock(shared).rows.is_empty();
    if loaded {
        let mut f = lock(shared);
        for v in views {
            if let (Some(spec), Some(row)) = (v.spec, f.rows.get_mut(&v.id)) {
                row.kind = spec.kind;
                row.labels = spec.labels;
            }
        }
        f.nodes = nodes;
        f.version += 1;
        return Ok(());
    }
    let mut rows = HashMap::with_capacity(views.len());
    for v in views {
        let Some(st) = v.state else { continue };
        let (kind, labels) = v
            .spec
            .map(|s| (s.kind, s.labels))
            .unwrap_or_else(|| (st.kind.clone(), BTreeMap::new()));
        rows.insert(
            v.id,
            Row {
                owner: st.owner,
                status: st.status,
                reason: st.reason,
                since: st.since,
                kind,
                labels,
            },
        );
    }
    let mut f = lock(shared);
    f.nodes = nodes;
    // Changes the watch applied meanwhile are newer: keep them.
    for (id, row) in rows {
        f.rows.entry(id).or_insert(row);
    }
    f.version += 1;
    Ok(())
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, ctype)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()).boxed())
        .expect("valid response")
}

fn json_response(v: &Value) -> Response<Body> {
    full(StatusCode::OK, "application/json", v.to_string())
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ASCII hex digits");
                out.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Largest request body accepted (a task form).
const MAX_BODY: usize = 64 << 10;

/// Refuses requests another site could make through the operator's
/// browser: a `Host` that is not this server (DNS rebinding), an `Origin` or
/// `Sec-Fetch-Site` from elsewhere (cross-site requests), and a task POST
/// that is not JSON (a plain form cannot set that content type).
fn foreign(req: &Request<Incoming>, listen: &std::net::SocketAddr) -> Option<&'static str> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header("host").unwrap_or("");
    let host_name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let local = ["localhost", "127.0.0.1", "[::1]"].contains(&host_name)
        || host_name == listen.ip().to_string()
        || host == listen.to_string();
    if !local {
        return Some("unknown Host: open the page by the address ottomato ui printed");
    }
    if let Some(origin) = header("origin") {
        let ok = origin.strip_prefix("http://").is_some_and(|o| o == host);
        if !ok {
            return Some("cross-origin request refused");
        }
    }
    if header("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none") {
        return Some("cross-site request refused");
    }
    if req.method() == Method::POST
        && !header("content-type").is_some_and(|c| c.starts_with("application/json"))
    {
        return Some("POST bodies must be application/json");
    }
    None
}

async fn route(
    shared: Shared,
    listen: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Some(why) = foreign(&req, &listen) {
        return Ok(full(StatusCode::FORBIDDEN, "text/plain", why));
    }
    let path = req.uri().path().to_string();
    Ok(match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => full(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        (Method::GET, "/api/summary") => {
            let body = lock(&shared).summary_bytes();
            full(StatusCode::OK, "application/json", body)
        }
        (Method::GET, "/api/search") => {
            let q = query_param(&req, "q").unwrap_or_default();
            json_response(&search(&lock(&shared), q.trim()))
        }
        (Method::GET, p) if p.starts_with("/api/workload/") => {
            let id = percent_decode(&p["/api/workload/".len()..]);
            match shared.2.workload(&id).await {
                Ok(v) => {
                    let feed: Vec<Change> = lock(&shared)
                        .feed
                        .iter()
                        .filter(|c| c.workload == id)
                        .cloned()
                        .collect();
                    json_response(&json!({"workload": v, "changes": feed}))
                }
                Err(e) => full(StatusCode::NOT_FOUND, "text/plain", e.to_string()),
            }
        }
        (Method::POST, "/api/task") => {
            let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
            let body = match limited.collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return Ok(full(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "text/plain",
                        "task form larger than 64 KiB",
                    ))
                }
            };
            run_task(&shared, &body).await
        }
        (Method::GET, "/api/stream") => stream(shared),
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found"),
    })
}

fn search(f: &Fleet, q: &str) -> Value {
    let label = q.split_once('=');
    let mut hits: Vec<(&String, &Row)> = f
        .rows
        .iter()
        .filter(|(id, r)| match label {
            Some((k, v)) => r.labels.get(k).is_some_and(|x| x == v),
            None => !q.is_empty() && id.contains(q),
        })
        .collect();
    hits.sort_by(|a, b| a.0.cmp(b.0));
    let total = hits.len();
    let rows: Vec<Value> = hits
        .into_iter()
        .take(100)
        .map(|(id, r)| json!({"id": id, "row": r}))
        .collect();
    json!({"total": total, "rows": rows})
}

async fn run_task(shared: &Shared, body: &[u8]) -> Response<Body> {
    #[derive(serde::Deserialize)]
    struct Form {
        id: String,
        command: String,
        #[serde(default)]
        kwargs: serde_json::Map<String, Value>,
    }
    let form: Form = match serde_json::from_slice(body) {
        Ok(f) => f,
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad task: {e}"),
            )
        }
    };
    let req = TaskRequest {
        command: form.command,
        args: Vec::new(),
        kwargs: form.kwargs,
        timeout_ms: None,
        keep_result: false,
    };
    match shared
        .2
        .run_task(&form.id, &req, Duration::from_secs(30))
        .await
    {
        Ok(r) => json_response(&serde_json::to_value(r).unwrap_or_default()),
        Err(e) => full(StatusCode::BAD_GATEWAY, "text/plain", e.to_string()),
    }
}

/// Server-sent events: a `summary` when the fleet changed (at most twice a
/// second), every `change` as it happens.
fn stream(shared: Shared) -> Response<Body> {
    let mut changes = shared.1.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut seen = u64::MAX;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (version, summary) = {
                        let mut f = lock(&shared);
                        let v = f.version;
                        (v, (v != seen).then(|| f.summary_bytes()))
                    };
                    if let Some(s) = summary {
                        seen = version;
                        let mut msg = Vec::with_capacity(s.len() + 32);
                        msg.extend_from_slice(b"event: summary\ndata: ");
                        msg.extend_from_slice(&s);
                        msg.extend_from_slice(b"\n\n");
                        if tx.send(Bytes::from(msg)).await.is_err() {
                            return;
                        }
                    } else if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                        return;
                    }
                }
                c = changes.recv() => match c {
                    Ok(c) => {
                        let data = serde_json::to_string(&c).unwrap_or_default();
                        if tx.send(Bytes::from(format!("event: change\ndata: {data}\n\n"))).await.is_err() {
                            return;
                        }
                    }
                    // Changes were skipped: a fresh summary (with the feed) covers them.
                    Err(broadcast::error::RecvError::Lagged(_)) => seen = u64::MAX,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(BodyExt::boxed(body))
        .expect("valid response")
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
