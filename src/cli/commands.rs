//! Operator commands: `workload`, `task`, `watch`, `status`. Thin: parsing
//! and printing; the work is in `crate::client`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::{parse_import, Client, FanoutEvent, WorkloadView};
use crate::wire::{glob_match, FanoutRequest, TaskRequest, TaskResult};
use crate::WorkloadSpec;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Map, Value};

/// The NATS server used when none is given.
pub(crate) const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";

/// Where the cluster is.
#[derive(Args, Clone)]
pub(crate) struct Conn {
    /// NATS server URL(s), comma-separated [default: nats://127.0.0.1:4222].
    #[arg(short = 's', long = "server", env = "NATS_URL", global = true)]
    pub(crate) server: Option<String>,
    /// Subject and bucket prefix [default: otto].
    #[arg(long, env = "OTTOMATO_PREFIX", global = true)]
    pub(crate) prefix: Option<String>,
    /// NATS user (with --password).
    #[arg(long, env = "NATS_USER", global = true)]
    pub(crate) user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub(crate) password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// File with an NKey seed.
    #[arg(long, env = "NATS_NKEY", global = true)]
    pub(crate) nkey: Option<std::path::PathBuf>,
    /// NATS credentials file.
    #[arg(long, env = "NATS_CREDS", global = true)]
    pub(crate) creds: Option<std::path::PathBuf>,
    /// CA certificate for TLS.
    #[arg(long, env = "NATS_CA", global = true)]
    pub(crate) tls_ca: Option<std::path::PathBuf>,
    /// Client certificate for TLS.
    #[arg(long, env = "NATS_CERT", global = true)]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    /// Client key for TLS.
    #[arg(long, env = "NATS_KEY", global = true)]
    pub(crate) tls_key: Option<std::path::PathBuf>,
    /// Prefix of this client's reply inboxes, e.g. _INBOX.alice (NATS
    /// permissions can then give each user only its own inboxes) [default: _INBOX].
    #[arg(long, env = "NATS_INBOX_PREFIX", global = true)]
    pub(crate) inbox_prefix: Option<String>,
    /// Send tasks on read or write subjects (otto.task.<class>.<id>): a
    /// read-only operator uses read; write runs every command.
    #[arg(long, env = "OTTOMATO_TASK_CLASS", global = true, default_value = "write",
          value_parser = |s: &str| s.parse::<crate::CommandClass>())]
    pub(crate) task_class: crate::CommandClass,
}

impl Conn {
    pub(crate) fn auth(&self) -> crate::nats::Auth {
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

    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        let server = self.server.as_deref().unwrap_or(DEFAULT_SERVER);
        let prefix = self.prefix.as_deref().unwrap_or("otto");
        Ok(Client::connect_with(server, prefix, &self.auth())
            .await?
            .with_task_class(self.task_class))
    }
}

#[derive(Subcommand)]
pub(crate) enum WorkloadCmd {
    /// Add (or replace) a workload spec.
    #[command(
        after_help = "Example:\n  ottomato workload add router-1 --kind sim --label site=oslo --zone b"
    )]
    Add {
        /// Workload id (letters, digits, '_' and '-').
        id: String,
        /// Device kind.
        #[arg(long)]
        kind: String,
        /// Kind config, a JSON object.
        #[arg(long)]
        config: Option<String>,
        /// Label key=value (repeatable).
        #[arg(long = "label", value_parser = crate::cli::parse_kv)]
        labels: Vec<(String, String)>,
        /// Run only in this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Prefer this zone.
        #[arg(long)]
        prefer_zone: Option<String>,
    },
    /// Remove a workload: it stops wherever it runs.
    Rm {
        /// Workload id.
        id: String,
    },
    /// Show one workload's spec and state.
    Get {
        /// Workload id.
        id: String,
    },
    /// List workloads, optionally filtered.
    #[command(
        after_help = "Examples:\n  ottomato workload ls\n  ottomato workload ls 'router-*' --status dead --json"
    )]
    Ls {
        /// Glob on ids.
        glob: Option<String>,
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Only workloads owned by this node.
        #[arg(long)]
        node: Option<String>,
        /// Only workloads with this label, key=value (repeatable).
        #[arg(long = "label", value_parser = crate::cli::parse_kv)]
        labels: Vec<(String, String)>,
        /// JSON output (one array).
        #[arg(long)]
        json: bool,
    },
    /// Import specs from a file: JSON lines, or CSV with a header
    /// `id,kind[,config][,labels][,zone]` (labels as k=v;k=v). Every row is
    /// checked first; a bad file writes nothing unless --skip-invalid.
    Import {
        /// The file.
        file: std::path::PathBuf,
        /// Write the good rows even if some are bad.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Wait until every workload (matching GLOB, as they are when it starts)
    /// has a status on a live node, e.g. after an import, a node crash or a
    /// drain. Exit 1 at --timeout.
    #[command(
        after_help = "Examples:\n  ottomato workload wait\n  ottomato workload wait 'router-*' --not-on node-a --timeout 2m"
    )]
    Wait {
        /// Glob on ids.
        glob: Option<String>,
        /// The status to wait for.
        #[arg(long, default_value = "running")]
        status: String,
        /// Also require that this node owns none of them (it crashed or drains).
        #[arg(long)]
        not_on: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand)]
pub(crate) enum TaskCmd {
    /// Run a task on one workload, or on a selection (--select / --label).
    #[command(
        after_help = "Examples:\n  ottomato task run router-1 echo hello --kwargs '{\"verbose\":true}'\n  ottomato task run --select 'router-*' hello\n  ottomato task run --label site=oslo sleep --kwargs '{\"ms\":100}' --batch 10%"
    )]
    Run {
        /// [TARGET] COMMAND [ARGS]...: TARGET is a workload id unless
        /// --select/--label is given. ARGS are JSON values or plain strings.
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
        /// Glob on workload ids (fan-out).
        #[arg(long)]
        select: Option<String>,
        /// Label selector key=value (fan-out; repeatable).
        #[arg(long = "label", value_parser = crate::cli::parse_kv)]
        labels: Vec<(String, String)>,
        /// Keyword arguments, a JSON object.
        #[arg(long)]
        kwargs: Option<String>,
        /// Deadline per task.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Run the selection in waves of N workloads or P% of them.
        #[arg(long)]
        batch: Option<String>,
        /// Print each result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn arg_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

fn kwargs(s: &Option<String>) -> anyhow::Result<Map<String, Value>> {
    match s {
        None => Ok(Map::new()),
        Some(s) => match serde_json::from_str(s) {
            Ok(Value::Object(m)) => Ok(m),
            _ => anyhow::bail!("--kwargs must be a JSON object, got {s}"),
        },
    }
}

fn short_time(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `workload wait`: the specs that exist now (one snapshot), their state
/// from a live watch of the state bucket (no re-reading it), live nodes
/// checked twice a second.
async fn wait(
    client: &Client,
    glob: Option<String>,
    status: &str,
    not_on: Option<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let wanted: std::collections::HashSet<String> = client
        .workloads()
        .await?
        .into_iter()
        .filter(|w| w.spec.is_some() && glob.as_deref().is_none_or(|g| glob_match(g, &w.id)))
        .map(|w| w.id)
        .collect();
    let mut states = std::collections::HashMap::new();
    let mut changes = client.watch_state().await?;
    // First look after the watch has had time to replay the current state.
    let every = Duration::from_millis(500);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = String::new();
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some((id, record)) if wanted.contains(&id) => match record {
                    Some(r) => { states.insert(id, r); }
                    None => { states.remove(&id); }
                },
                Some(_) => {}
                None => anyhow::bail!("the state watch ended (connection lost?)"),
            },
            _ = tick.tick() => {
                let live: std::collections::HashSet<String> =
                    client.nodes().await?.into_iter().map(|n| n.id).collect();
                let done = states
                    .values()
                    .filter(|st| {
                        st.status.as_str() == status
                            && live.contains(&st.owner)
                            && not_on.as_deref() != Some(st.owner.as_str())
                    })
                    .count();
                let line = format!("{done} of {} workloads {status}", wanted.len());
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
                if done == wanted.len() {
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "timed out after {}: {last}",
                        humantime::format_duration(timeout)
                    );
                }
            }
        }
    }
}

pub(crate) async fn workload(conn: &Conn, cmd: WorkloadCmd) -> anyhow::Result<()> {
    let client = conn.client().await?;
    match cmd {
        WorkloadCmd::Add {
            id,
            kind,
            config,
            labels,
            zone,
            prefer_zone,
        } => {
            let mut spec = WorkloadSpec::new(id, kind);
            if let Some(c) = config {
                spec.config = serde_json::from_str(&c)
                    .map_err(|e| anyhow::anyhow!("--config is not JSON: {e}"))?;
            }
            spec.labels = labels.into_iter().collect();
            spec.placement.zone = zone;
            spec.placement.prefer_zone = prefer_zone;
            client.put_spec(&spec).await?;
            println!("added {}", spec.id);
        }
        WorkloadCmd::Rm { id } => {
            client.delete_spec(&id).await?;
            println!("removed {id}");
        }
        WorkloadCmd::Get { id } => {
            let w = client.workload(&id).await?;
            println!("{}", serde_json::to_string_pretty(&w)?);
        }
        WorkloadCmd::Ls {
            glob,
            status,
            node,
            labels,
            json,
        } => {
            let all = client.workloads().await?;
            let keep = |w: &&WorkloadView| {
                glob.as_deref().is_none_or(|g| glob_match(g, &w.id))
                    && status
                        .as_deref()
                        .is_none_or(|s| w.state.as_ref().is_some_and(|st| st.status.as_str() == s))
                    && node
                        .as_deref()
                        .is_none_or(|n| w.state.as_ref().is_some_and(|st| st.owner == n))
                    && labels
                        .iter()
                        .all(|(k, v)| w.spec.as_ref().is_some_and(|s| s.labels.get(k) == Some(v)))
            };
            let shown: Vec<&WorkloadView> = all.iter().filter(keep).collect();
            if json {
                println!("{}", serde_json::to_string(&shown)?);
            } else {
                let mut rows = vec![vec![
                    "ID".into(),
                    "KIND".into(),
                    "STATUS".into(),
                    "OWNER".into(),
                    "SINCE".into(),
                    "REASON".into(),
                ]];
                for w in &shown {
                    let st = w.state.as_ref();
                    rows.push(vec![
                        w.id.clone(),
                        w.spec.as_ref().map_or("?".into(), |s| s.kind.clone()),
                        st.map_or("unclaimed".into(), |s| s.status.to_string()),
                        st.map_or("-".into(), |s| {
                            if s.owner.is_empty() {
                                "-".into()
                            } else {
                                s.owner.clone()
                            }
                        }),
                        st.map_or("-".into(), |s| short_time(s.since)),
                        st.and_then(|s| s.reason.clone()).unwrap_or_default(),
                    ]);
                }
                print_table(&rows);
                eprintln!("{} of {} workloads", shown.len(), all.len());
            }
        }
        WorkloadCmd::Wait {
            glob,
            status,
            not_on,
            timeout,
        } => wait(&client, glob, &status, not_on, timeout).await?,
        WorkloadCmd::Import { file, skip_invalid } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let (specs, errors) = parse_import(&text);
            for e in &errors {
                eprintln!("{}: {e}", file.display());
            }
            if !errors.is_empty() && !skip_invalid {
                anyhow::bail!("{} bad rows in {}; nothing written (use --skip-invalid to write the {} good ones)", errors.len(), file.display(), specs.len());
            }
            let pb = indicatif::ProgressBar::new(specs.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "importing [{bar:40}] {pos}/{len} {per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let client = &client;
            let mut writes = futures::stream::iter(specs.iter())
                .map(|s| async move { client.put_spec(s).await })
                .buffer_unordered(256);
            let mut n = 0u64;
            while let Some(r) = writes.next().await {
                r?;
                n += 1;
                if n % 512 == 0 {
                    pb.set_position(n);
                }
            }
            pb.finish_and_clear();
            println!("imported {n} workloads ({} bad rows skipped)", errors.len());
        }
    }
    Ok(())
}

fn print_result(r: &TaskResult, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else if r.success {
        println!(
            "{}  ok    {}  ({:.1} ms, {})",
            r.workload, r.ret, r.execution_time, r.worker_id
        );
    } else {
        println!(
            "{}  FAIL  {}: {}",
            r.workload,
            r.error_code.map_or("error", |c| c.as_str()),
            r.error.as_deref().unwrap_or("")
        );
    }
}

/// Runs `task run`; returns whether everything succeeded.
pub(crate) async fn task(conn: &Conn, cmd: TaskCmd) -> anyhow::Result<bool> {
    let client = conn.client().await?;
    let TaskCmd::Run {
        words,
        select,
        labels,
        kwargs: kw,
        timeout,
        batch,
        json,
    } = cmd;
    let fan = select.is_some() || !labels.is_empty();
    let (target, command, args) = if fan {
        (None, words[0].clone(), &words[1..])
    } else {
        if words.len() < 2 {
            anyhow::bail!("usage: ottomato task run TARGET COMMAND [ARGS]... (or --select/--label for a selection)");
        }
        (Some(words[0].clone()), words[1].clone(), &words[2..])
    };
    let req = TaskRequest {
        command,
        args: args.iter().map(|a| arg_value(a)).collect(),
        kwargs: kwargs(&kw)?,
        timeout_ms: Some(timeout.as_millis() as u64),
        keep_result: false,
    };
    if let Some(id) = target {
        let r = client.run_task(&id, &req, timeout).await?;
        print_result(&r, json);
        return Ok(r.success);
    }
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut no_answer: Vec<String> = Vec::new();
    if let Some(b) = batch {
        // Waves: resolve the selection from the specs, then run each wave's tasks.
        let ids: Vec<String> = client
            .workloads()
            .await?
            .into_iter()
            .filter(|w| select.as_deref().is_none_or(|g| glob_match(g, &w.id)))
            .filter(|w| {
                labels
                    .iter()
                    .all(|(k, v)| w.spec.as_ref().is_some_and(|s| s.labels.get(k) == Some(v)))
            })
            .filter(|w| w.spec.is_some())
            .map(|w| w.id)
            .collect();
        let size = match b.strip_suffix('%') {
            Some(p) => ((ids.len() as f64 * p.parse::<f64>()? / 100.0).ceil() as usize).max(1),
            None => b.parse::<usize>()?.max(1),
        };
        for (i, wave) in ids.chunks(size).enumerate() {
            eprintln!("wave {} ({} workloads)", i + 1, wave.len());
            let client = &client;
            let req = &req;
            let mut results = futures::stream::iter(wave.iter())
                .map(|id| async move { (id.clone(), client.run_task(id, req, timeout).await) })
                .buffer_unordered(256);
            while let Some((id, r)) = results.next().await {
                match r {
                    Ok(r) => {
                        print_result(&r, json);
                        if r.success {
                            ok += 1
                        } else {
                            failed += 1
                        }
                    }
                    Err(e) => {
                        eprintln!("{id}  NO ANSWER  {e}");
                        no_answer.push(id);
                    }
                }
            }
        }
    } else {
        let req = FanoutRequest {
            select,
            labels,
            command: req.command,
            args: req.args,
            kwargs: req.kwargs,
            timeout_ms: req.timeout_ms,
            keep_result: false,
        };
        let mut events = client.fanout(req, timeout + Duration::from_secs(2)).await?;
        while let Some(e) = events.next().await {
            match e {
                FanoutEvent::Result(r) => {
                    print_result(&r, json);
                    if r.success {
                        ok += 1
                    } else {
                        failed += 1
                    }
                }
                FanoutEvent::Complete => break,
                FanoutEvent::TimedOut { silent_nodes } => {
                    eprintln!("no complete answer from nodes: {}", silent_nodes.join(", "));
                    no_answer.extend(silent_nodes);
                }
            }
        }
    }
    eprintln!(
        "summary: {ok} ok, {failed} failed, {} no answer",
        no_answer.len()
    );
    Ok(failed == 0 && no_answer.is_empty())
}

pub(crate) async fn watch(conn: &Conn, glob: Option<String>) -> anyhow::Result<()> {
    let client = conn.client().await?;
    let mut changes = client.watch_state().await?;
    while let Some((id, rec)) = changes.next().await {
        if glob.as_deref().is_some_and(|g| !glob_match(g, &id)) {
            continue;
        }
        match rec {
            Some(r) => println!(
                "{}  {id}  {}  owner={}{}",
                short_time(r.since),
                r.status,
                if r.owner.is_empty() { "-" } else { &r.owner },
                r.reason
                    .map(|x| format!("  reason={x}"))
                    .unwrap_or_default()
            ),
            None => println!(
                "{}  {id}  removed",
                short_time(std::time::SystemTime::now())
            ),
        }
    }
    Ok(())
}

pub(crate) async fn status(conn: &Conn, json: bool) -> anyhow::Result<()> {
    let client = conn.client().await?;
    let nodes = client.nodes().await?;
    let workloads = client.workloads().await?;
    let zone_of: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.zone.as_deref().unwrap_or("-")))
        .collect();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_zone: BTreeMap<String, usize> = BTreeMap::new();
    for w in &workloads {
        let (status, owner) = w
            .state
            .as_ref()
            .map_or(("unclaimed".to_string(), String::new()), |s| {
                (s.status.to_string(), s.owner.clone())
            });
        *by_status.entry(status).or_insert(0) += 1;
        if !owner.is_empty() {
            *by_zone
                .entry(zone_of.get(owner.as_str()).unwrap_or(&"?").to_string())
                .or_insert(0) += 1;
            *by_node.entry(owner).or_insert(0) += 1;
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"nodes": nodes, "workloads": workloads.len(), "byStatus": by_status, "byNode": by_node, "byZone": by_zone})
        );
        return Ok(());
    }
    let mut rows = vec![vec![
        "NODE".into(),
        "ZONE".into(),
        "LOAD".into(),
        "CAPACITY".into(),
        "STARTED".into(),
        "STATE".into(),
    ]];
    for n in &nodes {
        rows.push(vec![
            n.id.clone(),
            n.zone.clone().unwrap_or("-".into()),
            n.load.to_string(),
            n.capacity.map_or("-".into(), |c| c.to_string()),
            short_time(n.started),
            if n.draining {
                "draining".into()
            } else {
                "live".into()
            },
        ]);
    }
    print_table(&rows);
    println!();
    println!("workloads: {}", workloads.len());
    for (title, m) in [
        ("by status", &by_status),
        ("by node", &by_node),
        ("by zone", &by_zone),
    ] {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {title:<10} {}", parts.join(" "));
    }
    // The failing ones, oldest first (as the fleet page shows them).
    let mut failing: Vec<&WorkloadView> = workloads
        .iter()
        .filter(|w| {
            w.state.as_ref().is_some_and(|s| {
                matches!(
                    s.status,
                    crate::Status::Unreachable
                        | crate::Status::Dead
                        | crate::Status::Failed
                        | crate::Status::Unplaceable
                ) || (s.status == crate::Status::Initializing && s.reason.is_some())
            })
        })
        .collect();
    if !failing.is_empty() {
        failing.sort_by_key(|w| w.state.as_ref().map(|s| s.since));
        println!("\nfailing: {} (oldest first)", failing.len());
        for w in failing.iter().take(10) {
            let s = w.state.as_ref().expect("filtered");
            println!(
                "  {}  {}  {}  since {}  {}",
                w.id,
                s.status,
                if s.owner.is_empty() { "-" } else { &s.owner },
                short_time(s.since),
                s.reason.as_deref().unwrap_or("")
            );
        }
        if failing.len() > 10 {
            println!(
                "  … {} more: ottomato workload ls --status <status>",
                failing.len() - 10
            );
        }
    }
    Ok(())
}
