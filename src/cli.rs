//! The `ottomato` command line, callable from any binary with its own kinds.
//!
//! The `ottomato` binary is `fn main() { ottomato::cli::main() }`. A binary
//! that adds its own device kinds gets the whole command line — `node` with
//! every flag, TOML file, auth and drain, plus `workload`, `task`, `watch`,
//! `status`, `demo` and `bench` — with [`main_with`]:
//!
//! ```no_run
//! let mut kinds = ottomato::Kinds::builtin();
//! // kinds.register(MyKind);
//! ottomato::cli::main_with(kinds);
//! ```
//!
//! Only built with the `cli` feature (on by default); an embedder that does
//! not need it turns default features off and compiles no clap, indicatif or
//! tracing-subscriber.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::demo::{self, DemoOptions};
use crate::subjects::Role;
use crate::Kinds;

#[allow(unreachable_pub)]
mod bench;
#[allow(unreachable_pub)]
mod commands;
mod schedules;

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
    /// Manage schedules: recurring tasks over selections, run by each
    /// workload's owner.
    #[command(subcommand)]
    Schedule(schedules::ScheduleCmd),
    /// Read the result history: the last result of each workload (per
    /// schedule), or more with --last / --since.
    #[command(
        after_help = "Examples:\n  ottomato results 'meter-*'\n  ottomato results --schedule meters --last 5\n  ottomato results plc-1 --since 1h --json"
    )]
    Results {
        /// Only workloads matching this glob.
        glob: Option<String>,
        /// One schedule's results (`_task`: ad-hoc tasks kept with keepResult).
        #[arg(long)]
        schedule: Option<String>,
        /// Results per workload and schedule, the newest [default: 1, or
        /// all with --since].
        #[arg(long)]
        last: Option<usize>,
        /// Only results stored within this long (e.g. 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// One JSON result per line.
        #[arg(long)]
        json: bool,
        /// Wait up to this long for a first result (e.g. right after
        /// adding a schedule).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
    },
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
    /// Serve a live fleet page (nodes, workloads by status, failing ones,
    /// changes as they happen, search, run a task) from this binary.
    #[command(after_help = "Example:\n  ottomato ui --listen 127.0.0.1:8080")]
    Ui {
        /// Address to serve the page on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Print the recommended NATS permissions of a role (nats-server config),
    /// for this prefix and the user's inbox prefix (`--inbox-prefix`, default
    /// `_INBOX.<role>`). The same lists as subjects.md.
    #[command(
        after_help = "Examples:\n  ottomato permissions --role operator --inbox-prefix _INBOX.alice\n  ottomato permissions --role node --prefix site7"
    )]
    Permissions {
        /// node, operator, reader (read-class tasks only), scheduler
        /// (writes schedules) or watcher.
        #[arg(long)]
        role: crate::subjects::Role,
        /// Limit an operator's or reader's task rights to the workloads
        /// matching this glob (listed one by one from the workloads bucket,
        /// as of now; no fan-out).
        #[arg(long)]
        select: Option<String>,
    },
    /// Benchmarks that print ratios against a raw baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(clap::Args)]
struct NodeArgs {
    /// TOML file with any of these settings (keys as the long flags, with
    /// `_` for `-`); the environment overrides it, flags override both.
    #[arg(long, env = "OTTOMATO_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Print the effective settings (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
    /// Node id (a random UUID when not given).
    #[arg(long, env = "OTTOMATO_NODE_ID")]
    node_id: Option<String>,
    /// Availability zone of this node.
    #[arg(long, env = "OTTOMATO_ZONE")]
    zone: Option<String>,
    /// Node label, key=value (repeatable; env: comma-separated).
    #[arg(long = "label", env = "OTTOMATO_LABELS", value_delimiter = ',', value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// Most workloads this node takes.
    #[arg(long, env = "OTTOMATO_CAPACITY")]
    capacity: Option<u32>,
    /// Bucket replicas (3 on a 3-server NATS cluster) [default: 1].
    #[arg(long, env = "OTTOMATO_REPLICAS")]
    replicas: Option<usize>,
    /// Membership heartbeat [default: 1s].
    #[arg(long, env = "OTTOMATO_HEARTBEAT", value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// Membership TTL: a node silent this long is gone [default: 5s].
    #[arg(long, env = "OTTOMATO_TTL", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Shortest interval between two pings of a workload [default: 8s].
    #[arg(long, env = "OTTOMATO_PING_SPLAY_MIN", value_parser = humantime::parse_duration)]
    ping_splay_min: Option<Duration>,
    /// Longest interval between two pings of a workload [default: 10s].
    #[arg(long, env = "OTTOMATO_PING_SPLAY_MAX", value_parser = humantime::parse_duration)]
    ping_splay_max: Option<Duration>,
    /// How long one ping may take [default: 10s].
    #[arg(long, env = "OTTOMATO_PING_TIMEOUT", value_parser = humantime::parse_duration)]
    ping_timeout: Option<Duration>,
    /// How long one init may take [default: 25s].
    #[arg(long, env = "OTTOMATO_INIT_TIMEOUT", value_parser = humantime::parse_duration)]
    init_timeout: Option<Duration>,
    /// Default task deadline [default: 30s].
    #[arg(long, env = "OTTOMATO_TASK_TIMEOUT", value_parser = humantime::parse_duration)]
    task_timeout: Option<Duration>,
    /// Longest deadline a task may ask for; longer ones are cut to this. A
    /// release (rebalance, drain) waits for tasks in flight up to it [default: 15m].
    #[arg(long, env = "OTTOMATO_MAX_TASK_DEADLINE", value_parser = humantime::parse_duration)]
    max_task_deadline: Option<Duration>,
    /// Workloads handed over at once when rebalancing or draining [default: 64].
    #[arg(long, env = "OTTOMATO_MAX_HANDOFFS")]
    max_handoffs: Option<usize>,
    /// Hand a workload dead here this long to another node (another zone
    /// preferred) to try, e.g. 60s; off when not given.
    #[arg(long, env = "OTTOMATO_MOVE_DEAD_AFTER", value_parser = humantime::parse_duration)]
    move_dead_after: Option<Duration>,
    /// How many times one workload may be handed on for being dead [default: 2].
    #[arg(long, env = "OTTOMATO_MAX_MOVES")]
    max_moves: Option<u32>,
    /// On SIGINT/SIGTERM, how long to drain before leaving anyway [default: 60s].
    #[arg(long, env = "OTTOMATO_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// TOML file of named device credentials that specs refer to by name
    /// (`"credentials": "core-routers"`); `<field>_env = "VAR"` reads a field
    /// from the environment. Secrets never go in specs.
    #[arg(long, env = "OTTOMATO_CREDENTIALS")]
    credentials: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464); off when not given.
    #[arg(long, env = "OTTOMATO_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Result history: drop results older than this. Applies when the
    /// first node creates the otto_results stream [default: 7d].
    #[arg(long, env = "OTTOMATO_RESULTS_MAX_AGE", value_parser = humantime::parse_duration)]
    results_max_age: Option<Duration>,
    /// Result history: size cap, oldest dropped first (e.g. 512MiB, 2GiB) [default: 1GiB].
    #[arg(long, env = "OTTOMATO_RESULTS_MAX_BYTES", value_parser = parse_bytes)]
    results_max_bytes: Option<u64>,
    /// Result history: results kept per workload and schedule [default: 100].
    #[arg(long, env = "OTTOMATO_RESULTS_HISTORY")]
    results_history: Option<u32>,
}

/// `1073741824`, `512MiB`, `2GiB`, `100MB` (powers of 1024 for both).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512MiB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Node settings as written in a `--config` TOML file.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    server: Option<String>,
    prefix: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    nkey: Option<std::path::PathBuf>,
    creds: Option<std::path::PathBuf>,
    tls_ca: Option<std::path::PathBuf>,
    tls_cert: Option<std::path::PathBuf>,
    tls_key: Option<std::path::PathBuf>,
    inbox_prefix: Option<String>,
    node_id: Option<String>,
    zone: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    capacity: Option<u32>,
    replicas: Option<usize>,
    heartbeat: Option<String>,
    ttl: Option<String>,
    ping_splay_min: Option<String>,
    ping_splay_max: Option<String>,
    ping_timeout: Option<String>,
    init_timeout: Option<String>,
    task_timeout: Option<String>,
    max_task_deadline: Option<String>,
    max_handoffs: Option<usize>,
    move_dead_after: Option<String>,
    max_moves: Option<u32>,
    drain_timeout: Option<String>,
    credentials: Option<std::path::PathBuf>,
    metrics_addr: Option<std::net::SocketAddr>,
    results_max_age: Option<String>,
    results_max_bytes: Option<String>,
    results_history: Option<u32>,
}

/// The effective node settings: flags > environment > file > defaults.
#[derive(serde::Serialize)]
struct NodeSettings {
    server: String,
    prefix: String,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    nkey: Option<std::path::PathBuf>,
    creds: Option<std::path::PathBuf>,
    tls_ca: Option<std::path::PathBuf>,
    tls_cert: Option<std::path::PathBuf>,
    tls_key: Option<std::path::PathBuf>,
    inbox_prefix: Option<String>,
    node_id: Option<String>,
    zone: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    capacity: Option<u32>,
    replicas: usize,
    #[serde(with = "human")]
    heartbeat: Duration,
    #[serde(with = "human")]
    ttl: Duration,
    #[serde(with = "human")]
    ping_splay_min: Duration,
    #[serde(with = "human")]
    ping_splay_max: Duration,
    #[serde(with = "human")]
    ping_timeout: Duration,
    #[serde(with = "human")]
    init_timeout: Duration,
    #[serde(with = "human")]
    task_timeout: Duration,
    #[serde(with = "human")]
    max_task_deadline: Duration,
    max_handoffs: usize,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "human_opt")]
    move_dead_after: Option<Duration>,
    max_moves: u32,
    #[serde(with = "human")]
    drain_timeout: Duration,
    credentials: Option<std::path::PathBuf>,
    metrics_addr: Option<std::net::SocketAddr>,
    #[serde(with = "human")]
    results_max_age: Duration,
    results_max_bytes: u64,
    results_history: u32,
}

mod human {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

fn human_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&humantime::format_duration(*d)),
        None => s.serialize_none(),
    }
}

fn resolve(conn: &commands::Conn, a: &NodeArgs) -> anyhow::Result<NodeSettings> {
    let file: NodeFile = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => NodeFile::default(),
    };
    let dur = |flag: Option<Duration>,
               file: &Option<String>,
               name: &str,
               default: &str|
     -> anyhow::Result<Duration> {
        if let Some(d) = flag {
            return Ok(d);
        }
        let text = file.as_deref().unwrap_or(default);
        humantime::parse_duration(text).map_err(|e| anyhow::anyhow!("{name} = {text:?}: {e}"))
    };
    let c = conn.clone();
    let mut labels = file.labels.clone();
    labels.extend(a.labels.iter().cloned());
    Ok(NodeSettings {
        server: c
            .server
            .or(file.server)
            .unwrap_or_else(|| commands::DEFAULT_SERVER.into()),
        prefix: c.prefix.or(file.prefix).unwrap_or_else(|| "otto".into()),
        user: c.user.or(file.user),
        password: c.password.or(file.password),
        token: c.token.or(file.token),
        nkey: c.nkey.or(file.nkey),
        creds: c.creds.or(file.creds),
        tls_ca: c.tls_ca.or(file.tls_ca),
        tls_cert: c.tls_cert.or(file.tls_cert),
        tls_key: c.tls_key.or(file.tls_key),
        inbox_prefix: c.inbox_prefix.or(file.inbox_prefix),
        node_id: a.node_id.clone().or(file.node_id),
        zone: a.zone.clone().or(file.zone),
        labels,
        capacity: a.capacity.or(file.capacity),
        replicas: a.replicas.or(file.replicas).unwrap_or(1),
        heartbeat: dur(a.heartbeat, &file.heartbeat, "heartbeat", "1s")?,
        ttl: dur(a.ttl, &file.ttl, "ttl", "5s")?,
        ping_splay_min: dur(
            a.ping_splay_min,
            &file.ping_splay_min,
            "ping_splay_min",
            "8s",
        )?,
        ping_splay_max: dur(
            a.ping_splay_max,
            &file.ping_splay_max,
            "ping_splay_max",
            "10s",
        )?,
        ping_timeout: dur(a.ping_timeout, &file.ping_timeout, "ping_timeout", "10s")?,
        init_timeout: dur(a.init_timeout, &file.init_timeout, "init_timeout", "25s")?,
        task_timeout: dur(a.task_timeout, &file.task_timeout, "task_timeout", "30s")?,
        max_task_deadline: dur(
            a.max_task_deadline,
            &file.max_task_deadline,
            "max_task_deadline",
            "15m",
        )?,
        max_handoffs: a.max_handoffs.or(file.max_handoffs).unwrap_or(64),
        move_dead_after: match a.move_dead_after {
            Some(d) => Some(d),
            None => file
                .move_dead_after
                .as_deref()
                .map(humantime::parse_duration)
                .transpose()
                .map_err(|e| anyhow::anyhow!("move_dead_after: {e}"))?,
        },
        max_moves: a.max_moves.or(file.max_moves).unwrap_or(2),
        drain_timeout: dur(a.drain_timeout, &file.drain_timeout, "drain_timeout", "60s")?,
        credentials: a.credentials.clone().or(file.credentials),
        metrics_addr: a.metrics_addr.or(file.metrics_addr),
        results_max_age: dur(
            a.results_max_age,
            &file.results_max_age,
            "results_max_age",
            "7d",
        )?,
        results_max_bytes: match (a.results_max_bytes, &file.results_max_bytes) {
            (Some(b), _) => b,
            (None, Some(s)) => {
                parse_bytes(s).map_err(|e| anyhow::anyhow!("results_max_bytes: {e}"))?
            }
            (None, None) => 1 << 30,
        },
        results_history: a.results_history.or(file.results_history).unwrap_or(100),
    })
}

impl NodeSettings {
    fn auth(&self) -> crate::nats::Auth {
        crate::nats::Auth {
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            nkey_file: self.nkey.clone(),
            creds_file: self.creds.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            inbox_prefix: self.inbox_prefix.clone(),
        }
    }

    /// TOML of the settings with secrets masked.
    fn masked_toml(&self) -> anyhow::Result<String> {
        let mut v = toml::Value::try_from(self)?;
        if let Some(t) = v.as_table_mut() {
            for secret in ["password", "token"] {
                if t.contains_key(secret) {
                    t.insert(secret.into(), toml::Value::String("***".into()));
                }
            }
        }
        Ok(toml::to_string(&v)?)
    }
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

async fn run_node(conn: &commands::Conn, args: NodeArgs, kinds: Kinds) -> anyhow::Result<()> {
    use std::sync::Arc;

    use crate::nats::{connect_patiently, NatsStore, NatsTransport};
    use crate::subjects::Subjects;
    use crate::{Cluster, ClusterConfig, Node, NodeConfig};

    let st = resolve(conn, &args)?;
    if args.print_config {
        print!("{}", st.masked_toml()?);
        return Ok(());
    }
    Subjects::validate_prefix(&st.prefix).map_err(anyhow::Error::msg)?;
    if let Some(id) = &st.node_id {
        // One subject token (`<prefix>.node.<id>.status`) and one KV key.
        crate::spec::validate_id(id).map_err(|e| {
            anyhow::anyhow!("--node-id {id:?}: {}", e.replace("workload id", "node id"))
        })?;
    }
    if let Some(path) = &st.credentials {
        let n = kinds
            .credentials()
            .load_file(path)
            .map_err(anyhow::Error::msg)?;
        println!("loaded {n} device credentials from {}", path.display());
    }
    let node_cfg = NodeConfig {
        node_id: st.node_id.clone().unwrap_or_default(),
        ping_splay_min: st.ping_splay_min,
        ping_splay_max: st.ping_splay_max,
        ping_timeout: st.ping_timeout,
        init_timeout: st.init_timeout,
        task_timeout: st.task_timeout,
        max_task_deadline: st.max_task_deadline,
        ..Default::default()
    };
    let builder = Node::builder()
        .config(node_cfg)
        .kinds(kinds)
        .prefix(&st.prefix);
    let name = format!("ottomato node {}", st.node_id.as_deref().unwrap_or(""));
    let client = connect_patiently(&st.server, name.trim(), &st.auth(), Duration::from_secs(60))
        .await
        .map_err(anyhow::Error::msg)?;
    let cfg = ClusterConfig {
        heartbeat: st.heartbeat,
        node_ttl: st.ttl,
        zone: st.zone.clone(),
        labels: st.labels.clone(),
        capacity: st.capacity,
        replicas: st.replicas,
        max_handoffs: st.max_handoffs,
        move_dead_after: st.move_dead_after,
        max_moves: st.max_moves,
        ..Default::default()
    };
    // Bound before joining: a taken port stops the node before it claims anything.
    let metrics_listener = match st.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?,
        ),
        None => None,
    };
    // A NATS cluster still electing its JetStream leader (or creating the
    // stream for another node starting at the same moment) times out
    // requests for a while: retry for up to a minute, as for the buckets.
    let limits = crate::results::ResultLimits {
        max_age: st.results_max_age,
        max_bytes: st.results_max_bytes,
        per_subject: st.results_history.max(1),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let results = loop {
        match crate::results::NatsResults::open_or_create(
            client.clone(),
            Subjects::new(&st.prefix),
            limits,
            st.replicas,
        )
        .await
        {
            Ok(r) => break r,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "results stream not ready; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    };
    let builder = builder.results(Arc::new(results));
    let cluster = Cluster::start(
        builder,
        Arc::new(NatsStore::new(client.clone())),
        Arc::new(NatsTransport::new(client.clone())),
        cfg,
    )
    .await?;
    let _metrics = match metrics_listener {
        Some(listener) => {
            let registry = crate::metrics::registry(cluster.node().clone(), Some(client.clone()));
            let bound = listener.local_addr()?;
            let task = crate::metrics::serve(listener, registry);
            println!("metrics at http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    // NATS service discovery: a node without the permission still runs.
    let _service = match crate::nats::register_service(
        &client,
        cluster.node(),
        &Subjects::new(&st.prefix),
        st.zone.as_deref(),
    )
    .await
    {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "NATS service discovery ($SRV) not available");
            None
        }
    };
    println!(
        "node {} joined the cluster at {}",
        cluster.node().id(),
        st.server
    );
    tokio::select! {
        _ = shutdown_signal() => {}
        reason = cluster.failed() => {
            // Every workload is fenced and no device call runs by now.
            eprintln!("error: {reason}; this process stops");
            std::process::exit(3);
        }
    }
    println!(
        "draining: handing over {} workloads (at most {}; a second signal stops at once)",
        cluster.node().len(),
        humantime::format_duration(st.drain_timeout)
    );
    let node = cluster.node().clone();
    tokio::select! {
        _ = cluster.drain(st.drain_timeout) => {}
        _ = shutdown_signal() => {
            eprintln!(
                "second signal: stopping at once; {} workloads not handed over move to other \
                 nodes once the TTL has passed",
                node.len()
            );
            std::process::exit(130);
        }
    }
    if node.is_empty() {
        println!("left cleanly");
        Ok(())
    } else {
        anyhow::bail!(
            "drain limit ({}) passed with {} workloads not handed over; other nodes take \
             them over once the TTL has passed",
            humantime::format_duration(st.drain_timeout),
            node.len()
        )
    }
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

/// The `ottomato` command line with the built-in kinds ([`Kinds::builtin`]).
pub fn main() -> ! {
    main_with(Kinds::builtin())
}

/// The `ottomato` command line with these kinds: parses the process's
/// arguments, runs the command on a multi-threaded tokio runtime and exits
/// with its code (0 done, 1 error, 3 node id taken over, 130 interrupted).
pub fn main_with(kinds: Kinds) -> ! {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(cli, kinds)) {
        Ok(()) => 0,
        Err(e) => {
            // One line, for operators; details are in the log at debug level.
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code)
}

async fn run(cli: Cli, kinds: Kinds) -> anyhow::Result<()> {
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
        Command::Node(args) => run_node(&cli.conn, *args, kinds).await,
        Command::Workload(cmd) => commands::workload(&cli.conn, cmd).await,
        Command::Task(cmd) => {
            if !commands::task(&cli.conn, cmd).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Watch { glob } => commands::watch(&cli.conn, glob).await,
        Command::Schedule(cmd) => schedules::schedule(&cli.conn, cmd).await,
        Command::Results {
            glob,
            schedule,
            last,
            since,
            json,
            wait,
        } => schedules::results(&cli.conn, glob, schedule, last, since, json, wait).await,
        Command::Status { json } => commands::status(&cli.conn, json).await,
        Command::Bench(cmd) => bench::run(cmd).await,
        Command::Ui { listen } => {
            let client = cli.conn.client().await?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
            println!(
                "fleet page at http://{}/ (Ctrl-C stops)",
                listener.local_addr()?
            );
            crate::ui::run(client, listener, ctrl_c()).await
        }
        Command::Permissions { role, select } => {
            let prefix = cli.conn.prefix.as_deref().unwrap_or("otto");
            crate::subjects::Subjects::validate_prefix(prefix).map_err(anyhow::Error::msg)?;
            let inbox = match &cli.conn.inbox_prefix {
                Some(p) => {
                    crate::nats::validate_inbox_prefix(p).map_err(anyhow::Error::msg)?;
                    p.clone()
                }
                None => format!(
                    "_INBOX.{}",
                    match role {
                        Role::Node => "node",
                        Role::Operator => "operator",
                        Role::Reader => "reader",
                        Role::Scheduler => "scheduler",
                        Role::Watcher => "watcher",
                    }
                ),
            };
            let ids = match &select {
                None => None,
                Some(_) if !matches!(role, Role::Operator | Role::Reader) => {
                    anyhow::bail!(
                        "--select limits task rights: it applies to the operator and reader roles"
                    )
                }
                Some(glob) if !glob.contains(['*', '?']) => {
                    crate::spec::validate_id(glob).map_err(anyhow::Error::msg)?;
                    Some(vec![glob.clone()])
                }
                Some(glob) => {
                    let client = cli.conn.client().await?;
                    let ids: Vec<String> = client
                        .workloads()
                        .await?
                        .into_iter()
                        .filter(|w| w.spec.is_some() && crate::wire::glob_match(glob, &w.id))
                        .map(|w| w.id)
                        .collect();
                    if ids.is_empty() {
                        anyhow::bail!(
                            "--select {glob:?} matches no workload in {prefix}_workloads"
                        );
                    }
                    Some(ids)
                }
            };
            println!(
                "# NATS permissions of the {role:?} role for prefix {prefix}: start this user's \
                 clients with --inbox-prefix {inbox} (env NATS_INBOX_PREFIX), one prefix per user"
            );
            if let (Some(ids), Some(glob)) = (&ids, &select) {
                println!(
                    "# task rights limited to the {} workload(s) matching {glob:?} now (run again \
                     after adding workloads); no fan-out: NATS cannot check a fan-out's selection",
                    ids.len()
                );
            }
            if role == Role::Reader {
                println!(
                    "# this user's clients send tasks on read subjects: --task-class read \
                     (env OTTOMATO_TASK_CLASS=read; library Client::with_task_class)"
                );
            }
            print!(
                "{}",
                crate::subjects::Subjects::new(prefix).permissions_conf(
                    role,
                    &inbox,
                    ids.as_deref()
                )
            );
            Ok(())
        }
    }
}
