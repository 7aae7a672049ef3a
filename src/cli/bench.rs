//! `ottomato bench core`: memory per idle workload, in-process task rate and
//! time to start N workloads, each against a raw ractor baseline measured in
//! the same run, with A/B rounds alternated.
//!
//! Memory is measured in fresh child processes (this binary, re-executed with
//! `bench core-child`) so one measurement's heap can't flatter the next.

use std::process::Command as Proc;
use std::time::{Duration, Instant};

use crate::actors::sim::SimKind;
use crate::demo::rss_bytes;
use crate::{Node, Status, Task, WorkloadSpec};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

mod cluster;
mod devices;
use cluster::{Opts, Scenario};

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Core engine: memory per idle workload, task rate, start time.
    #[command(after_help = "Example:\n  cargo run --release -- bench core --workloads 100000")]
    Core {
        /// Workloads (and bare actors) per memory measurement.
        #[arg(long, default_value_t = 100_000)]
        workloads: usize,
        /// A/B rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Tasks per task-rate measurement.
        #[arg(long, default_value_t = 200_000)]
        tasks: usize,
        /// Tasks in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// Tasks through a node vs a raw async-nats echo responder (1, 64, 256 in flight; JSON and bincode).
    #[command(after_help = "Example:\n  ottomato bench tasks --quick")]
    Tasks(Opts),
    /// Time until N specs written run on 3 nodes vs raw KV creates of N keys.
    Claims(Opts),
    /// kill -9 one of 3 nodes: time until its workloads run elsewhere, minus the TTL; double runs.
    Failover(Opts),
    /// 3 → 4 nodes: moved / ideal, final balance, time to settle.
    ScaleOut(Opts),
    /// RSS per idle workload on one node vs a bare ractor actor + a bare subscription.
    Memory(Opts),
    /// A task to every workload by selection vs as many raw echo requests.
    Fanout(Opts),
    /// Task throughput with /metrics served and scraped every second vs without.
    Metrics(Opts),
    /// One schedule over N workloads on 3 nodes (every 60 s, splay 60 s,
    /// 3 ticks): ticks run / due, spread, drift; result publishing vs raw
    /// JetStream publishes.
    Schedule(Opts),
    /// N real SNMP agents (one snmpd on N UDP ports) polled through the engine vs a bare async-snmp loop.
    #[command(after_help = "Example:\n  ottomato bench snmp --devices 10000")]
    Snmp {
        /// Agents (UDP ports of one snmpd).
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Polls in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// A/B rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// N Modbus/TCP servers (pymodbus) polled through the engine vs a bare tokio-modbus loop.
    #[command(after_help = "Example:\n  ottomato bench modbus --devices 1000")]
    Modbus {
        /// Servers (TCP ports of one pymodbus process).
        #[arg(long, default_value_t = 1_000)]
        devices: usize,
        /// Polls in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// A/B rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Every scenario above, one table at the end.
    #[command(
        after_help = "Examples:\n  ottomato bench all --quick      # about a minute, CI's smoke run\n  ottomato bench all              # default sizes (100k claims/memory, 30k failover/scale-out/fan-out, 10k tasks)"
    )]
    All(Opts),
    /// (internal) a raw echo responder on <prefix>.task.*.dev-<i>.
    #[command(hide = true)]
    EchoResponder {
        #[arg(long)]
        server: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        n: usize,
    },
    /// (internal) the memory floor in a fresh process.
    #[command(hide = true)]
    MemFloor {
        #[arg(long)]
        server: String,
        #[arg(long)]
        n: usize,
    },
    /// (internal) one memory measurement in a fresh process.
    #[command(hide = true)]
    CoreChild {
        #[arg(long)]
        what: What,
        #[arg(long)]
        n: usize,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize)]
pub(crate) enum What {
    /// Bare ractor actors (the floor).
    Floor,
    /// Idle sim workloads on a node.
    Workloads,
}

#[derive(Serialize, Deserialize)]
struct ChildReport {
    bytes_per_item: f64,
    start_secs: f64,
}

/// The floor: an actor that does nothing.
struct Bare;

#[ractor::async_trait]
impl Actor for Bare {
    type Msg = RpcReplyPort<u64>;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        reply: Self::Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(1);
        Ok(())
    }
}

async fn bench_node() -> anyhow::Result<Node> {
    Ok(Node::builder()
        .node_id("bench")
        .kind(SimKind)
        .start()
        .await?)
}

async fn add_and_settle(node: &Node, prefix: &str, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let before = node.len();
    for i in 0..n {
        node.add_workload(WorkloadSpec::new(format!("{prefix}{i:07}"), "sim"))
            .await?;
    }
    loop {
        let running = node.count_by_status().get(&Status::Running).copied();
        if running == Some(before + n) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("workloads did not all reach running within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn child(what: What, n: usize) -> anyhow::Result<()> {
    // Warm up the runtime and allocator before the first reading.
    let node = bench_node().await?;
    add_and_settle(&node, "warm", 100).await?;
    let mut keep = Vec::new();
    let before = rss_bytes().unwrap_or(0);
    let t = Instant::now();
    let start_secs = match what {
        What::Floor => {
            keep.reserve(n);
            for _ in 0..n {
                keep.push(Actor::spawn(None, Bare, ()).await?.0);
            }
            t.elapsed().as_secs_f64()
        }
        What::Workloads => add_and_settle(&node, "w", n).await?.as_secs_f64(),
    };
    // Let deferred frees and first pings settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes().unwrap_or(0);
    let report = ChildReport {
        bytes_per_item: after.saturating_sub(before) as f64 / n as f64,
        start_secs,
    };
    println!("{}", serde_json::to_string(&report)?);
    std::process::exit(0); // skip teardown: only the reading matters
}

fn measure_in_child(what: What, n: usize) -> anyhow::Result<ChildReport> {
    let exe = std::env::current_exe()?;
    let out = Proc::new(exe)
        .args(["bench", "core-child", "--what"])
        .arg(format!("{what:?}").to_lowercase())
        .args(["--n", &n.to_string()])
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "child {what:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(line.trim())?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn task_rate_ours(node: &Node, ids: &[String], tasks: usize, conc: usize) -> f64 {
    let t = Instant::now();
    let n = node.clone();
    let ids = ids.to_vec();
    let ok = futures::stream::iter(0..tasks)
        .map(move |i| {
            let node = n.clone();
            let id = ids[i % ids.len()].clone();
            async move { node.run_task(&id, Task::new("echo").arg(1)).await.success }
        })
        .buffer_unordered(conc)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, tasks, "some benchmark tasks failed");
    tasks as f64 / t.elapsed().as_secs_f64()
}

async fn task_rate_raw(actors: &[ActorRef<RpcReplyPort<u64>>], tasks: usize, conc: usize) -> f64 {
    let t = Instant::now();
    let actors = actors.to_vec();
    futures::stream::iter(0..tasks)
        .map(move |i| {
            let a = actors[i % actors.len()].clone();
            async move {
                let (tx, rx) = ractor::concurrency::oneshot();
                let _ = a.send_message(tx.into());
                rx.await.unwrap_or(0)
            }
        })
        .buffer_unordered(conc)
        .count()
        .await;
    tasks as f64 / t.elapsed().as_secs_f64()
}

pub(crate) async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::CoreChild { what, n } => child(what, n).await,
        BenchCommand::Snmp {
            devices,
            concurrency,
            rounds,
        } => devices::snmp(devices, concurrency, rounds).await,
        BenchCommand::Modbus {
            devices,
            concurrency,
            rounds,
        } => devices::modbus(devices, concurrency, rounds).await,
        BenchCommand::Tasks(o) => cluster::run(&[Scenario::Tasks], &o).await,
        BenchCommand::Claims(o) => cluster::run(&[Scenario::Claims], &o).await,
        BenchCommand::Failover(o) => cluster::run(&[Scenario::Failover], &o).await,
        BenchCommand::ScaleOut(o) => cluster::run(&[Scenario::ScaleOut], &o).await,
        BenchCommand::Memory(o) => cluster::run(&[Scenario::Memory], &o).await,
        BenchCommand::Fanout(o) => cluster::run(&[Scenario::Fanout], &o).await,
        BenchCommand::Metrics(o) => cluster::run(&[Scenario::Metrics], &o).await,
        BenchCommand::Schedule(o) => cluster::run(&[Scenario::Schedule], &o).await,
        BenchCommand::All(o) => {
            use Scenario::*;
            cluster::run(
                &[
                    Tasks, Claims, Failover, ScaleOut, Memory, Fanout, Metrics, Schedule,
                ],
                &o,
            )
            .await
        }
        BenchCommand::EchoResponder { server, prefix, n } => {
            cluster::echo_responder(&server, &prefix, n).await
        }
        BenchCommand::MemFloor { server, n } => cluster::mem_floor(&server, n).await,
        BenchCommand::Core {
            workloads,
            rounds,
            tasks,
            concurrency,
        } => {
            let (mut floor, mut ours, mut start_ours, mut start_floor) =
                (vec![], vec![], vec![], vec![]);
            for r in 0..rounds {
                eprintln!(
                    "memory round {}/{rounds}: {workloads} bare actors, then {workloads} workloads",
                    r + 1
                );
                let f = measure_in_child(What::Floor, workloads)?;
                let o = measure_in_child(What::Workloads, workloads)?;
                floor.push(f.bytes_per_item);
                start_floor.push(f.start_secs);
                ours.push(o.bytes_per_item);
                start_ours.push(o.start_secs);
            }
            // Task rate: 10k workloads vs 10k bare echo actors, same concurrency.
            let targets = workloads.min(10_000);
            let node = bench_node().await?;
            add_and_settle(&node, "w", targets).await?;
            let ids: Vec<String> = (0..targets).map(|i| format!("w{i:07}")).collect();
            let mut actors = Vec::with_capacity(targets);
            for _ in 0..targets {
                actors.push(Actor::spawn(None, Bare, ()).await?.0);
            }
            let (mut rate_ours, mut rate_raw) = (vec![], vec![]);
            for r in 0..rounds {
                eprintln!(
                    "task round {}/{rounds}: {tasks} tasks at {concurrency} in flight",
                    r + 1
                );
                rate_raw.push(task_rate_raw(&actors, tasks, concurrency).await);
                rate_ours.push(task_rate_ours(&node, &ids, tasks, concurrency).await);
            }
            let (f, o) = (median(floor), median(ours));
            let (ro, rr) = (median(rate_ours), median(rate_raw));
            let (so, sf) = (median(start_ours), median(start_floor));
            println!("| scenario | parameters | ours | baseline | ratio | target | verdict |");
            println!("|---|---|---|---|---|---|---|");
            let verdict = |ok: bool| if ok { "met" } else { "missed" };
            println!(
                "| memory per idle workload | {workloads} sim workloads vs {workloads} bare ractor actors | {:.0} B | {:.0} B | {:.2}× | ≤ 1.25× | {} |",
                o, f, o / f, verdict(o / f <= 1.25)
            );
            println!(
                "| in-process task rate | echo on {targets} workloads, {concurrency} in flight | {ro:.0}/s | {rr:.0}/s (bare actor call) | {:.2}× | — | info |",
                ro / rr
            );
            println!(
                "| start {workloads} workloads | add + init until all running | {so:.2} s | {sf:.2} s (spawn bare actors) | {:.2}× | — | info |",
                so / sf
            );
            node.stop().await;
            Ok(())
        }
    }
}
