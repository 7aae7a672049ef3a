//! `ottomato bench snmp|modbus`: real protocol peers polled through the whole
//! engine (an embedded node running the built-in kind) against the same
//! polls issued by a bare loop of the same protocol crate, in the same run,
//! with A/B rounds alternated.
//!
//! - snmp: one net-snmp `snmpd` listening on N UDP ports (passed as
//!   arguments), one workload per port; each poll is a GET of sysUpTime.0
//!   and sysName.0. Bare loop: async-snmp clients on one shared socket.
//! - modbus: pymodbus servers on N TCP ports (`tests/peers/modbus_peer.py`);
//!   each poll reads 4 holding registers. Bare loop: one tokio-modbus
//!   connection per device.
//!
//! Pings are spaced to a minute in the engine so both sides do the same
//! device work; latencies are per poll, from request to result.

use std::process::{Child, Command as Proc, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::demo::rss_bytes;
use crate::{Kinds, Node, NodeConfig, Status, Task, WorkloadSpec};

/// What one measured round gives.
struct Round {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn round(n: usize, elapsed: Duration, mut lat: Vec<f64>) -> Round {
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Round {
        per_sec: n as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// A contiguous run of `n` ports below 32768 that are free for `udp`/tcp.
fn free_ports(n: usize, udp: bool) -> anyhow::Result<u16> {
    let free = |p: u16| {
        if udp {
            std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        } else {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        }
    };
    let mut base = 20_000u16;
    while (base as usize) + n < 32_000 {
        match (base..base + n as u16).find(|p| !free(*p)) {
            Some(taken) => base = taken + 1,
            None => return Ok(base),
        }
    }
    anyhow::bail!("no {n} contiguous free ports between 20000 and 32000")
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a protocol benchmark: the engine vs the bare loop, `rounds` each.
#[allow(clippy::too_many_arguments)]
async fn compare<B, BF>(
    title: &str,
    node: &Node,
    ids: &[String],
    polls: usize,
    task: Task,
    concurrency: usize,
    rounds: usize,
    bare: B,
) -> anyhow::Result<(Vec<Round>, Vec<Round>)>
where
    B: Fn(usize) -> BF,
    BF: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let n = ids.len();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        eprintln!(
            "{title} round {}/{rounds}: bare loop, then through the engine",
            r + 1
        );
        raw.push(measure(polls, concurrency, |i| bare(i % n)).await?);
        ours.push(
            measure(polls, concurrency, |i| {
                let id = ids[i % n].clone();
                let (node, task) = (node.clone(), task.clone());
                async move {
                    let r = node.run_task(&id, task).await;
                    if r.success {
                        Ok(())
                    } else {
                        Err(format!("{id}: {:?}", r.error))
                    }
                }
            })
            .await?,
        );
    }
    Ok((ours, raw))
}

/// `polls` calls of `poll(i)`, `concurrency` at a time: rate and latencies.
async fn measure<F, Fut>(polls: usize, concurrency: usize, poll: F) -> anyhow::Result<Round>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let t = Instant::now();
    let lat: Vec<Result<f64, String>> = futures::stream::iter(0..polls)
        .map(|i| {
            let f = poll(i);
            async move {
                let s = Instant::now();
                f.await.map(|()| s.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = t.elapsed();
    let lat: Vec<f64> = lat
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    Ok(round(polls, elapsed, lat))
}

fn median_by(v: &[Round], f: impl Fn(&Round) -> f64) -> f64 {
    let mut x: Vec<f64> = v.iter().map(f).collect();
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

#[allow(clippy::too_many_arguments)]
fn report(
    kind: &str,
    n: usize,
    polls: usize,
    concurrency: usize,
    ours: &[Round],
    raw: &[Round],
    start: Duration,
    mem_ours: f64,
    mem_bare: f64,
) {
    let (o, r) = (
        median_by(ours, |x| x.per_sec),
        median_by(raw, |x| x.per_sec),
    );
    println!("| scenario | parameters | ours | baseline | ratio | target | verdict |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {kind} polls | {n} devices, {concurrency} in flight, {polls} polls a round | {o:.0}/s | {r:.0}/s (bare loop) | {:.2}× | ≥ 0.8× | {} |",
        o / r,
        if o / r >= 0.8 { "met" } else { "missed" }
    );
    println!(
        "| {kind} poll latency p50 / p99 | same | {:.2} / {:.2} ms | {:.2} / {:.2} ms | — | — | info |",
        median_by(ours, |x| x.p50_ms),
        median_by(ours, |x| x.p99_ms),
        median_by(raw, |x| x.p50_ms),
        median_by(raw, |x| x.p99_ms)
    );
    println!(
        "| {kind} memory per device | RSS growth / {n} | {mem_ours:.0} B per workload | {mem_bare:.0} B per bare client | {:.2}× | — | info |",
        mem_ours / mem_bare.max(1.0)
    );
    println!(
        "| {kind} start | add {n} workloads until all running (init = one poll each) | {:.2} s | — | — | — | info |",
        start.as_secs_f64()
    );
}

async fn engine(creds: Option<(&str, &str, &str)>) -> anyhow::Result<Node> {
    let kinds = Kinds::builtin();
    if let Some((name, field, value)) = creds {
        kinds
            .credentials()
            .insert(name, ottomato_actors::Credential::new([(field, value)]));
    }
    Ok(Node::builder()
        .node_id("bench")
        .config(NodeConfig {
            node_id: "bench".into(),
            ping_splay_min: Duration::from_secs(60),
            ping_splay_max: Duration::from_secs(70),
            ..Default::default()
        })
        .kinds(kinds)
        .start()
        .await?)
}

async fn add_all(node: &Node, specs: Vec<WorkloadSpec>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let n = specs.len();
    for s in specs {
        node.add_workload(s).await?;
    }
    loop {
        let by = node.count_by_status();
        if by.get(&Status::Running).copied() == Some(n) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("not all {n} devices running within 600 s: {by:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `ottomato bench snmp`.
pub(crate) async fn snmp(n: usize, concurrency: usize, rounds: usize) -> anyhow::Result<()> {
    let polls = (n * 3).max(30_000);
    use async_snmp::{oid, Auth, Client, Retry, UdpTransport};

    let base = free_ports(n, true)?;
    let dir = std::env::temp_dir().join(format!("ottomato-bench-snmpd-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _ = Proc::new("chmod").arg("777").arg(&dir).status();
    std::fs::write(
        dir.join("snmpd.conf"),
        format!(
            "rocommunity public 127.0.0.1\npersistentDir {}\n",
            dir.display()
        ),
    )?;
    let snmpd = ["/usr/sbin/snmpd", "snmpd"]
        .into_iter()
        .find(|p| {
            Proc::new(p)
                .arg("-v")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .ok_or_else(|| anyhow::anyhow!("snmpd not found: apt-get install snmpd"))?;
    let mut cmd = Proc::new(snmpd);
    cmd.args(["-f", "-C", "-c"]).arg(dir.join("snmpd.conf"));
    cmd.args(["-Lf", "/dev/null", "-M", "/dev/null"]);
    // snmpd can drop to nobody only when started as root.
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        cmd.args(["-u", "nobody"]);
    }
    for p in base..base + n as u16 {
        cmd.arg(format!("udp:127.0.0.1:{p}"));
    }
    eprintln!(
        "starting snmpd on {n} UDP ports {base}..{}",
        base as usize + n - 1
    );
    let _peer = Peer(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);

    let socket = UdpTransport::bind("0.0.0.0:0").await?;
    let sys = [
        oid!(1, 3, 6, 1, 2, 1, 1, 3, 0),
        oid!(1, 3, 6, 1, 2, 1, 1, 5, 0),
    ];
    // Ready once the last port answers.
    let last = Client::builder(
        ("127.0.0.1".to_string(), base + n as u16 - 1),
        Auth::v2c("public"),
    )
    .request_timeout(Duration::from_millis(500))
    .build_with(&socket)
    .await?;
    let t = Instant::now();
    while last.get_many(&sys).await.is_err() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "snmpd did not answer within 120 s"
        );
    }

    // Bare clients (the baseline), memory measured around their creation.
    let before = rss_bytes().unwrap_or(0);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        clients.push(
            Client::builder(
                ("127.0.0.1".to_string(), base + i as u16),
                Auth::v2c("public"),
            )
            .request_timeout(Duration::from_secs(2))
            .retry(Retry::fixed(1, Duration::ZERO).expect("retries"))
            .build_with(&socket)
            .await?,
        );
    }
    let mem_bare = rss_bytes().unwrap_or(0).saturating_sub(before) as f64 / n as f64;
    let clients = Arc::new(clients);

    let node = engine(Some(("bench", "community", "public"))).await?;
    let ids: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
    let specs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            WorkloadSpec::new(id.clone(), "snmp").with_config(json!({
                "host": "127.0.0.1", "port": base as usize + i, "version": "2c",
                "credentials": "bench", "timeoutMs": 2000, "retries": 1}))
        })
        .collect();
    let before = rss_bytes().unwrap_or(0);
    let start = add_all(&node, specs).await?;
    let mem_ours = rss_bytes().unwrap_or(0).saturating_sub(before) as f64 / n as f64;

    let task = Task::new("get").kwarg("oids", json!(["1.3.6.1.2.1.1.3.0", "1.3.6.1.2.1.1.5.0"]));
    let sys = Arc::new(sys);
    let (ours, raw) = compare("snmp", &node, &ids, polls, task, concurrency, rounds, |i| {
        let (clients, sys) = (clients.clone(), sys.clone());
        async move {
            clients[i]
                .get_many(&sys[..])
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    report(
        "snmp",
        n,
        polls,
        concurrency,
        &ours,
        &raw,
        start,
        mem_ours,
        mem_bare,
    );
    node.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `ottomato bench modbus`.
pub(crate) async fn modbus(n: usize, concurrency: usize, rounds: usize) -> anyhow::Result<()> {
    let polls = (n * 3).max(10_000);
    use tokio_modbus::client::{tcp, Reader};

    let base = free_ports(n, false)?;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/modbus_peer.py");
    anyhow::ensure!(
        script.exists(),
        "{} not found (run from a checkout)",
        script.display()
    );
    let mut cmd = Proc::new("python3");
    cmd.arg(&script);
    for p in base..base + n as u16 {
        cmd.arg(p.to_string());
    }
    eprintln!(
        "starting pymodbus on {n} TCP ports {base}..{}",
        base as usize + n - 1
    );
    let _peer = Peer(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", base + n as u16 - 1)).is_err() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "pymodbus did not listen within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let before = rss_bytes().unwrap_or(0);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], base + i as u16));
        conns.push(tokio::sync::Mutex::new(
            tcp::connect_slave(addr, tokio_modbus::Slave(1)).await?,
        ));
    }
    let mem_bare = rss_bytes().unwrap_or(0).saturating_sub(before) as f64 / n as f64;
    let conns = Arc::new(conns);

    let node = engine(None).await?;
    let ids: Vec<String> = (0..n).map(|i| format!("plc-{i:05}")).collect();
    let specs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            WorkloadSpec::new(id.clone(), "modbus").with_config(
                json!({"host": "127.0.0.1", "port": base as usize + i, "timeoutMs": 5000}),
            )
        })
        .collect();
    let before = rss_bytes().unwrap_or(0);
    let start = add_all(&node, specs).await?;
    let mem_ours = rss_bytes().unwrap_or(0).saturating_sub(before) as f64 / n as f64;

    let task = Task::new("read_holding_registers")
        .kwarg("address", 0)
        .kwarg("count", 4);
    let (ours, raw) = compare(
        "modbus",
        &node,
        &ids,
        polls,
        task,
        concurrency,
        rounds,
        |i| {
            let conns = conns.clone();
            async move {
                let mut c = conns[i].lock().await;
                match c.read_holding_registers(0, 4).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("exception {e:?}")),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await?;
    report(
        "modbus",
        n,
        polls,
        concurrency,
        &ours,
        &raw,
        start,
        mem_ours,
        mem_bare,
    );
    node.stop().await;
    Ok(())
}
