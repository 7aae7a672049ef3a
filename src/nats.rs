//! The production backends: [`NatsStore`] (JetStream KV) and
//! [`NatsTransport`] (core NATS request/reply).
//!
//! **Architecture Invariant:** nothing outside this module names an
//! async-nats type; async-nats error kinds are mapped here, explicitly, to
//! [`StoreError`] / [`TransportError`] variants the claim protocol matches on.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, SelectAll, StreamExt};
use futures::Stream;
use tokio::sync::mpsc;

use crate::store::{BucketSpec, KvBucket, KvChange, KvEntry, StateStore, StoreError};
use crate::transport::{Message, RequestHandler, Transport, TransportError};

/// How to authenticate to NATS. Secrets are never logged; `Debug` masks them.
#[derive(Clone, Default)]
pub struct Auth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// File holding an NKey seed (`SU…`).
    pub nkey_file: Option<std::path::PathBuf>,
    /// Credentials file (JWT + seed).
    pub creds_file: Option<std::path::PathBuf>,
    /// CA certificate to trust (turns TLS on).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (with `tls_key`).
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client key.
    pub tls_key: Option<std::path::PathBuf>,
    /// Prefix of this client's reply inboxes (`_INBOX.alice`: replies
    /// arrive on `_INBOX.alice.<id>`), so NATS permissions can give each user
    /// its own inboxes only. `None`: the NATS default `_INBOX`.
    pub inbox_prefix: Option<String>,
}

/// Checks an inbox prefix: `_INBOX.<user>[.<more>]` — under `_INBOX.` so
/// nodes may reply to it (their permission is `publish: _INBOX.>`), and
/// with a token of its own so permissions can keep it private.
pub fn validate_inbox_prefix(p: &str) -> Result<(), String> {
    let ok = p.starts_with("_INBOX.")
        && p.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "inbox prefix {p:?}: _INBOX. and a token of your own, letters, digits, '_' and '-' \
             (e.g. _INBOX.alice): nodes reply only under _INBOX., and a prefix of its own \
             keeps your replies yours"
        ))
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mask = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("Auth")
            .field("user", &self.user)
            .field("password", &mask(&self.password))
            .field("token", &mask(&self.token))
            .field("nkey_file", &self.nkey_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

impl Auth {
    async fn apply(
        &self,
        mut o: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, String> {
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => o = o.user_and_password(u.clone(), p.clone()),
            (Some(_), None) | (None, Some(_)) => {
                return Err("user and password go together: give both".into())
            }
            _ => {}
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(p) = &self.inbox_prefix {
            validate_inbox_prefix(p)?;
            o = o.custom_inbox_prefix(p.clone());
        }
        if let Some(path) = &self.nkey_file {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read NKey seed file {}: {e}", path.display()))?;
            o = o.nkey(seed.trim().to_string());
        }
        if let Some(path) = &self.creds_file {
            o = o
                .credentials_file(path)
                .await
                .map_err(|e| format!("cannot use credentials file {}: {e}", path.display()))?;
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                o = o
                    .add_client_certificate(c.clone(), k.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => return Err("TLS client certificate and key go together: give both".into()),
        }
        Ok(o)
    }
}

/// Connects to NATS: `urls` is one or more comma-separated server URLs.
pub async fn connect(urls: &str, name: &str) -> Result<async_nats::Client, String> {
    connect_with(urls, name, &Auth::default()).await
}

/// Connects, retrying for up to `patience` while the servers are not
/// reachable yet (a node started together with its NATS servers). Any
/// other error (authorization, bad URL, TLS) fails at once.
pub async fn connect_patiently(
    urls: &str,
    name: &str,
    auth: &Auth,
    patience: Duration,
) -> Result<async_nats::Client, String> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match connect_with(urls, name, auth).await {
            Ok(c) => return Ok(c),
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && (e.contains("IO error") || e.contains("timed out")) =>
            {
                tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to NATS with authentication / TLS.
pub async fn connect_with(
    urls: &str,
    name: &str,
    auth: &Auth,
) -> Result<async_nats::Client, String> {
    let servers = parse_servers(urls)?;
    auth.apply(async_nats::ConnectOptions::new())
        .await?
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                // Permission violations (a publish or subscribe this user may
                // not make): the request in question only times out, so say why.
                async_nats::Event::ServerError(e) => tracing::warn!("NATS server refused: {e}"),
                other => tracing::debug!(event = %other, "NATS connection event"),
            }
        })
        .connect(servers)
        .await
        .map_err(|e| format!("cannot connect to NATS at {urls}: {e}"))
}

/// Parses `nats://a:4222,nats://b:4222` (the nats CLI's `-s` convention).
pub fn parse_servers(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let servers: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse()
                .map_err(|e| format!("invalid NATS server URL {u:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("no NATS server URL given".into());
    }
    Ok(servers)
}

/// JetStream KV buckets as a [`StateStore`].
#[derive(Clone)]
pub struct NatsStore {
    js: jetstream::Context,
    /// Create or update buckets (nodes) or only open existing ones first
    /// (operators, who may lack the right to create streams).
    open_first: bool,
}

impl NatsStore {
    /// A store on this connection that creates buckets (and updates their
    /// settings) as needed: what nodes use.
    pub fn new(client: async_nats::Client) -> Self {
        NatsStore {
            js: jetstream::new(client),
            open_first: false,
        }
    }

    /// A store that opens existing buckets and creates one only when it is
    /// missing: what operator tools use (they need no stream-admin rights).
    pub fn for_operators(client: async_nats::Client) -> Self {
        NatsStore {
            js: jetstream::new(client),
            open_first: true,
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

#[async_trait]
impl StateStore for NatsStore {
    fn connects(&self) -> u64 {
        self.js
            .client()
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens the bucket as it exists — its settings are never changed here:
    /// the first node creates it, later ones read what it really is
    /// ([`KvBucket::settings`]) and check that they can honour it.
    async fn bucket(&self, spec: &BucketSpec) -> Result<Arc<dyn KvBucket>, StoreError> {
        if let Ok(store) = self.js.get_key_value(&spec.name).await {
            if !self.open_first {
                self.raise_replicas(&store, spec.replicas).await;
            }
            return open(self.js.client(), store).await;
        }
        let config = kv::Config {
            bucket: spec.name.clone(),
            description: spec.description.clone(),
            history: i64::from(spec.history.max(1)),
            max_age: spec.max_age.unwrap_or_default(),
            storage: if spec.in_memory {
                jetstream::stream::StorageType::Memory
            } else {
                jetstream::stream::StorageType::File
            },
            num_replicas: spec.replicas.max(1),
            // Expiry leaves a marker so watchers see an entry go.
            limit_markers: spec.max_age.map(|ttl| ttl.max(Duration::from_secs(1))),
            ..Default::default()
        };
        match self.js.create_key_value(config).await {
            Ok(store) => open(self.js.client(), store).await,
            // Created by another node meanwhile: open that one.
            Err(e) => match self.js.get_key_value(&spec.name).await {
                Ok(store) => open(self.js.client(), store).await,
                Err(_) => Err(backend(format!("creating bucket {}: {e}", spec.name))),
            },
        }
    }
}

impl NatsStore {
    /// The bucket if it exists (never creates it).
    pub async fn open_existing(&self, name: &str) -> Option<Arc<dyn KvBucket>> {
        let store = self.js.get_key_value(name).await.ok()?;
        open(self.js.client(), store).await.ok()
    }

    /// A node asked for more copies than the bucket keeps (an operator tool
    /// created it first, with one): raise them. Never lowers them. On
    /// failure the bucket stays as it is and the node's settings check
    /// says why it cannot start.
    async fn raise_replicas(&self, store: &kv::Store, replicas: usize) {
        let mut stream = store.stream.clone();
        let Ok(info) = stream.info().await else {
            return;
        };
        if info.config.num_replicas >= replicas {
            return;
        }
        let mut config = info.config.clone();
        config.num_replicas = replicas;
        match self.js.update_stream(&config).await {
            Ok(_) => tracing::info!(bucket = %store.name, replicas, "raised the bucket's replicas"),
            Err(e) => {
                tracing::warn!(bucket = %store.name, replicas, error = %e, "could not raise the bucket's replicas")
            }
        }
    }
}

/// A bucket with the settings its stream really has.
async fn open(
    client: async_nats::Client,
    store: kv::Store,
) -> Result<Arc<dyn KvBucket>, StoreError> {
    let mut stream = store.stream.clone();
    let c = stream.info().await.map_err(backend)?.config.clone();
    let settings = BucketSpec {
        name: store.name.clone(),
        max_age: (!c.max_age.is_zero()).then_some(c.max_age),
        history: u8::try_from(c.max_messages_per_subject.max(1)).unwrap_or(u8::MAX),
        replicas: c.num_replicas,
        in_memory: c.storage == jetstream::stream::StorageType::Memory,
        description: c.description.clone().unwrap_or_default(),
    };
    Ok(Arc::new(NatsBucket {
        store,
        settings,
        client,
    }))
}

/// One JetStream KV bucket.
pub(crate) struct NatsBucket {
    store: kv::Store,
    settings: BucketSpec,
    client: async_nats::Client,
}

#[async_trait]
impl KvBucket for NatsBucket {
    fn settings(&self) -> Option<BucketSpec> {
        Some(self.settings.clone())
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        match self.store.entry(key).await.map_err(backend)? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some(KvEntry {
                key: e.key,
                value: e.value,
                revision: e.revision,
            })),
            _ => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        self.store.put(key, value).await.map_err(backend)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        match self.store.create(key, value).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let revision = self.get(key).await?.map_or(0, |e| e.revision);
                Err(StoreError::AlreadyExists {
                    key: key.to_string(),
                    revision,
                })
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, StoreError> {
        match self.store.update(key, value, expected).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(StoreError::RevisionMismatch {
                    key: key.to_string(),
                    expected,
                    found: None,
                })
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<(), StoreError> {
        match self.store.delete_expect_revision(key, expected).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(StoreError::RevisionMismatch {
                    key: key.to_string(),
                    expected: expected.unwrap_or(0),
                    found: None,
                })
            }
            Err(e) => Err(backend(e)),
        }
    }

    /// The last value (or delete marker) of every key, then `Synced`, then
    /// every change. The end of the replay is known from the consumer: the
    /// number of messages pending when it was created (0: nothing to
    /// replay), then each message's own pending count — never a timeout.
    async fn watch(&self) -> Result<BoxStream<'static, KvChange>, StoreError> {
        use jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
        let store = &self.store;
        let consumer = store
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("ottomato watch".to_string()),
                filter_subject: format!("{}>", store.prefix),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(backend)?;
        // From the create response: no extra request (and no consumer-info
        // permission) needed.
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(backend)?;
        let prefix = store.prefix.clone();
        let bucket = store.name.clone();
        let synced_first = if pending == 0 {
            futures::stream::iter(vec![KvChange::Synced]).boxed()
        } else {
            futures::stream::empty().boxed()
        };
        let state = (messages, pending > 0, None::<KvChange>);
        let changes =
            futures::stream::unfold(state, move |(mut messages, mut syncing, mut queued)| {
                let (prefix, bucket) = (prefix.clone(), bucket.clone());
                async move {
                    loop {
                        if let Some(c) = queued.take() {
                            return Some((c, (messages, syncing, None)));
                        }
                        let m = match messages.next().await? {
                            Ok(m) => m,
                            Err(e) => {
                                tracing::warn!(%bucket, error = %e, "watch error; continuing");
                                continue;
                            }
                        };
                        let Ok(info) = m.info() else { continue };
                        let (revision, left) = (info.stream_sequence, info.pending);
                        let Some(key) = m.subject.as_str().strip_prefix(prefix.as_str()) else {
                            continue;
                        };
                        let key = key.to_string();
                        let change = if is_delete(&m) {
                            KvChange::Delete { key, revision }
                        } else {
                            KvChange::Put(KvEntry {
                                key,
                                value: m.payload.clone(),
                                revision,
                            })
                        };
                        if syncing && left == 0 {
                            syncing = false;
                            queued = Some(KvChange::Synced); // after this change
                        }
                        return Some((change, (messages, syncing, queued)));
                    }
                }
            });
        Ok(synced_first.chain(changes).boxed())
    }
}

/// Whether a KV stream message is a delete, purge or expiry marker.
fn is_delete(m: &jetstream::Message) -> bool {
    let Some(h) = m.headers.as_ref() else {
        return false;
    };
    match h.get("KV-Operation").map(|v| v.as_str()) {
        Some("DEL") | Some("PURGE") => true,
        Some(_) => false,
        // Server-written markers (expiry, purge) carry a reason instead.
        None => h.get("Nats-Marker-Reason").is_some(),
    }
}

/// Core NATS as a [`Transport`]. One dispatcher task serves every
/// subscription of the node (no task per workload).
pub struct NatsTransport {
    client: async_nats::Client,
    new_subs: mpsc::UnboundedSender<Served>,
    cancels: Mutex<HashMap<String, Arc<Cancel>>>,
}

impl NatsTransport {
    /// A transport on this connection. Must be called inside a tokio runtime.
    pub fn new(client: async_nats::Client) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Served>();
        tokio::spawn(async move {
            let mut all: SelectAll<Served> = SelectAll::new();
            loop {
                tokio::select! {
                    new = rx.recv() => match new {
                        Some(s) => all.push(s),
                        None => return, // transport dropped
                    },
                    Some((handler, msg)) = all.next(), if !all.is_empty() => {
                        let reply = msg.reply.as_ref().map(|r| r.to_string());
                        handler.handle(&msg.subject, from_nats(&msg), reply);
                    }
                }
            }
        });
        NatsTransport {
            client,
            new_subs: tx,
            cancels: Mutex::new(HashMap::new()),
        }
    }

    /// The underlying connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

/// Ends one subscription in the dispatcher: a flag plus the waker of the
/// dispatcher's poll of it (registered again only when that waker changes,
/// not on every message).
#[derive(Default)]
struct Cancel {
    fired: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl Cancel {
    fn fire(&self) {
        self.fired.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }
}

/// One subscription inside the dispatcher; ends (and unsubscribes, by
/// dropping the subscriber) when its cancel fires.
struct Served {
    sub: async_nats::Subscriber,
    cancel: Arc<Cancel>,
    registered: Option<std::task::Waker>,
    handler: Arc<dyn RequestHandler>,
}

impl Stream for Served {
    type Item = (Arc<dyn RequestHandler>, async_nats::Message);
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.cancel.waker.register(cx.waker());
            self.registered = Some(cx.waker().clone());
        }
        if self.cancel.fired.load(std::sync::atomic::Ordering::Acquire) {
            return Poll::Ready(None);
        }
        match self.sub.poll_next_unpin(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some((self.handler.clone(), m))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn from_nats(m: &async_nats::Message) -> Message {
    let headers = m
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Message {
        headers,
        payload: m.payload.clone(),
    }
}

fn to_headers(m: &Message) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in &m.headers {
        h.append(k.as_str(), v.as_str());
    }
    h
}

fn transport_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Backend(e.to_string())
}

#[async_trait]
impl Transport for NatsTransport {
    async fn serve(
        &self,
        subject: &str,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError> {
        let sub = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(transport_err)?;
        let cancel = Arc::new(Cancel::default());
        let previous = self
            .cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(subject.to_string(), cancel.clone());
        if let Some(p) = previous {
            p.fire(); // a previous subscription on the subject ends
        }
        self.new_subs
            .send(Served {
                sub,
                cancel,
                registered: None,
                handler,
            })
            .map_err(|_| TransportError::Backend("transport dispatcher stopped".into()))
    }

    async fn unserve(
        &self,
        subject: &str,
        _handler: &Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError> {
        let cancel = self
            .cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(subject);
        if let Some(c) = cancel {
            c.fire();
        }
        Ok(())
    }

    fn max_message(&self) -> Option<usize> {
        // What the server said in its INFO (updated on every reconnect).
        Some(self.client.server_info().max_payload).filter(|m| *m > 0)
    }

    async fn publish(&self, subject: &str, message: Message) -> Result<(), TransportError> {
        let subject = subject.to_string();
        if message.headers.is_empty() {
            // PUB, not HPUB with an empty header block.
            return self
                .client
                .publish(subject, message.payload)
                .await
                .map_err(transport_err);
        }
        let headers = to_headers(&message);
        self.client
            .publish_with_headers(subject, headers, message.payload)
            .await
            .map_err(transport_err)
    }

    async fn request(
        &self,
        subject: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let req = async_nats::Request::new()
            .headers(to_headers(&request))
            .payload(request.payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject.to_string(), req).await {
            Ok(m) => Ok(from_nats(&m)),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    TransportError::NoResponders(subject.to_string())
                }
                async_nats::RequestErrorKind::TimedOut => TransportError::Timeout,
                _ => transport_err(e),
            }),
        }
    }

    async fn request_many(
        &self,
        subject: &str,
        request: Message,
    ) -> Result<BoxStream<'static, Message>, TransportError> {
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(transport_err)?;
        self.client
            .publish_with_reply_and_headers(
                subject.to_string(),
                inbox,
                to_headers(&request),
                request.payload,
            )
            .await
            .map_err(transport_err)?;
        Ok(sub.map(|m| from_nats(&m)).boxed())
    }
}

/// Registers a node as a NATS micro service (`$SRV.PING|INFO|STATS`, name
/// `ottomato`), so `nats micro ls/info/stats` and any NATS client find and
/// inspect nodes. INFO's metadata carries the node id, zone, prefix and
/// kinds; STATS' endpoint data carries the node id, zone and workloads by
/// status, read when asked. One endpoint, `<prefix>.node.<node-id>.status`,
/// answers the same as JSON.
pub async fn register_service(
    client: &async_nats::Client,
    node: &crate::Node,
    subjects: &crate::subjects::Subjects,
    zone: Option<&str>,
) -> Result<async_nats::service::Service, String> {
    use async_nats::service::ServiceExt;
    use futures::StreamExt;

    let status = {
        let node = node.clone();
        let zone = zone.map(str::to_string);
        move || {
            let by: std::collections::BTreeMap<&str, usize> = node
                .count_by_status()
                .into_iter()
                .map(|(s, n)| (s.as_str(), n))
                .collect();
            serde_json::json!({
                "nodeId": node.id(),
                "zone": zone,
                "workloads": node.len(),
                "byStatus": by,
                "leaseRemainingMs": node.lease_remaining().map(|d| d.as_millis() as u64),
            })
        }
    };
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("node_id".to_string(), node.id().to_string());
    metadata.insert("zone".to_string(), zone.unwrap_or("").to_string());
    metadata.insert("prefix".to_string(), subjects.prefix().to_string());
    metadata.insert("kinds".to_string(), node.kind_names().join(","));
    let stats = status.clone();
    let service = client
        .service_builder()
        .description(format!("Ottomato worker node {}", node.id()))
        .metadata(metadata)
        .stats_handler(move |_endpoint, _| stats())
        .start("ottomato", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| format!("NATS service registration: {e}"))?;
    let mut endpoint = service
        .endpoint_builder()
        .name("status")
        // Each node answers its own subject: no queue group sharing.
        // Per process: a stale process under the same id never takes the
        // requests of the live one.
        .queue_group(format!("ottomato-{}-{}", node.id(), node.incarnation()))
        .add(subjects.node_status(node.id()))
        .await
        .map_err(|e| format!("NATS service endpoint: {e}"))?;
    tokio::spawn(async move {
        while let Some(req) = endpoint.next().await {
            let body = serde_json::to_vec(&status()).unwrap_or_default();
            let _ = req.respond(Ok(body.into())).await;
        }
    });
    Ok(service)
}
