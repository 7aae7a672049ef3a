//! The `ottomato` command line: a thin clap layer over the library.

use std::time::Duration;

use clap::{Parser, Subcommand};
use ottomato::demo::{self, DemoOptions};

mod bench;
mod commands;

#[derive(Parser)]
#[command(
    name = "ottomato",
    version,
    about = "Keeps a supervised handle on every device of a fleet and runs tasks against them",
    after_help = "Start here:\n  ottomato demo                 # 10 000 simulated devices, in one process\n  ottomato demo --devices 100000"
)]
struct Cli {
    #[command(flatten)]
    conn: commands::Conn,
    /// Log level (error, warn, info, debug, trace); RUST_LOG wins when set.
    /// Default: info for `node`, warn otherwise.
    #[arg(long, global = true, env = "OTTOMATO_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N simulated devices in this process on the embedded backend, run a
    /// task on each, print a summary. Ctrl-C stops cleanly.
    #[command(
        after_help = "Examples:\n  ottomato demo\n  ottomato demo --devices 100000 --concurrency 512"
    )]
    Demo {
        /// Simulated devices to add.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        devices: usize,
        /// Tasks in flight during the task round.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// How long each device's init takes, in ms.
        #[arg(long, default_value_t = 10)]
        init_ms: u64,
        /// No progress bars or lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Run a worker node: join the cluster on NATS, claim workloads, serve tasks.
    /// SIGINT/SIGTERM release every workload and leave cleanly.
    #[command(
        after_help = "Examples:\n  ottomato node -s nats://127.0.0.1:4222\n  ottomato node -s nats://n1:4222,nats://n2:4222 --zone a --label rack=r1 --replicas 3"
    )]
    Node(Box<NodeArgs>),
    /// Manage workload specs (the desired state).
    #[command(subcommand)]
    Workload(commands::WorkloadCmd),
    /// Run tasks on one workload or a selection.
    #[command(subcommand)]
    Task(commands::TaskCmd),
    /// Print workload state changes as they happen, one line each.
    Watch {
        /// Only ids matching this glob.
        glob: Option<String>,
    },
    /// Nodes and workloads at a glance.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks that print ratios against a raw baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Node id (a random UUID when not given).
    #[arg(long, env = "OTTOMATO_NODE_ID")]
    node_id: Option<String>,
    /// Availability zone of this node.
    #[arg(long, env = "OTTOMATO_ZONE")]
    zone: Option<String>,
    /// Node label, key=value (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// Most workloads this node takes.
    #[arg(long, env = "OTTOMATO_CAPACITY")]
    capacity: Option<u32>,
    /// Bucket replicas (3 on a 3-server NATS cluster).
    #[arg(long, env = "OTTOMATO_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// Membership heartbeat, e.g. 1s.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Membership TTL: a node silent this long is gone, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Shortest interval between two pings of a workload.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    ping_splay_min: Duration,
    /// Longest interval between two pings of a workload.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ping_splay_max: Duration,
    /// Workloads handed over at once when rebalancing or draining.
    #[arg(long, default_value_t = 64)]
    max_handoffs: usize,
    /// Hand a workload dead here this long to another node (another zone
    /// preferred) to try, e.g. 60s; off when not given.
    #[arg(long, value_parser = humantime::parse_duration)]
    move_dead_after: Option<Duration>,
    /// How many times one workload may be handed on for being dead.
    #[arg(long, default_value_t = 2)]
    max_moves: u32,
    /// On SIGINT/SIGTERM, how long to drain before leaving anyway.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => ctrl_c().await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
}

async fn run_node(conn: &commands::Conn, args: NodeArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use ottomato::nats::{connect_with, NatsStore, NatsTransport};
    use ottomato::subjects::Subjects;
    use ottomato::{Cluster, ClusterConfig, Node};

    Subjects::validate_prefix(&conn.prefix).map_err(anyhow::Error::msg)?;
    let mut builder = Node::builder()
        .kind(ottomato::actors::sim::SimKind)
        .prefix(&conn.prefix)
        .ping_splay(args.ping_splay_min, args.ping_splay_max);
    if let Some(id) = &args.node_id {
        builder = builder.node_id(id);
    }
    let name = format!("ottomato node {}", args.node_id.as_deref().unwrap_or(""));
    let client = connect_with(&conn.server, name.trim(), &conn.auth())
        .await
        .map_err(anyhow::Error::msg)?;
    let cfg = ClusterConfig {
        heartbeat: args.heartbeat,
        node_ttl: args.ttl,
        zone: args.zone,
        labels: args.labels.into_iter().collect(),
        capacity: args.capacity,
        replicas: args.replicas,
        max_handoffs: args.max_handoffs,
        move_dead_after: args.move_dead_after,
        max_moves: args.max_moves,
        ..Default::default()
    };
    let cluster = Cluster::start(
        builder,
        Arc::new(NatsStore::new(client.clone())),
        Arc::new(NatsTransport::new(client)),
        cfg,
    )
    .await?;
    println!(
        "node {} joined the cluster at {}",
        cluster.node().id(),
        conn.server
    );
    shutdown_signal().await;
    println!("draining: handing over {} workloads", cluster.node().len());
    cluster.drain(args.drain_timeout).await;
    println!("left cleanly");
    Ok(())
}

fn init_logging(level: &str, format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handler available: never interrupt.
        std::future::pending::<()>().await;
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        // One line, for operators; details are in the log at debug level.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // CLI commands print their own one-line errors; the client library's log would repeat them.
    let default_level = if matches!(cli.command, Command::Node(_)) {
        "info"
    } else {
        "warn,async_nats=off"
    };
    init_logging(
        cli.log_level.as_deref().unwrap_or(default_level),
        &cli.log_format,
    );
    match cli.command {
        Command::Demo {
            devices,
            concurrency,
            init_ms,
            quiet,
        } => {
            let opts = DemoOptions {
                devices,
                concurrency,
                init_ms,
                progress: !quiet,
                settle_timeout: Duration::from_secs(600),
            };
            let node = demo::demo_node().await?;
            println!(
                "ottomato demo: {devices} simulated devices on node {:?} (embedded in-memory backend)",
                node.id()
            );
            let summary = demo::run(&node, &opts, ctrl_c()).await?;
            print!("{summary}");
            demo::stop_with_progress(&node, !quiet).await;
            println!("stopped cleanly");
            if summary.interrupted {
                std::process::exit(130);
            }
            Ok(())
        }
        Command::Node(args) => run_node(&cli.conn, *args).await,
        Command::Workload(cmd) => commands::workload(&cli.conn, cmd).await,
        Command::Task(cmd) => {
            if !commands::task(&cli.conn, cmd).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Watch { glob } => commands::watch(&cli.conn, glob).await,
        Command::Status { json } => commands::status(&cli.conn, json).await,
        Command::Bench(cmd) => bench::run(cmd).await,
    }
}
