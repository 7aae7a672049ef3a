//! `ottomato schedule …` and `ottomato results`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use serde_json::{Map, Value};

use super::commands::Conn;
use crate::results::{ResultQuery, StoredResult};
use crate::schedule::{Missed, Overlap, Schedule, ScheduleSpec};
use crate::wire::glob_match;

#[derive(Subcommand)]
pub(crate) enum ScheduleCmd {
    /// Add (or replace) a schedule: a task run on a selection every
    /// interval or on a cron expression, by each workload's owner.
    #[command(
        after_help = "Examples:\n  ottomato schedule add meters --every 5m --splay 60s --select 'meter-*' poll\n  ottomato schedule add backup --cron '0 2 * * *' --tz Europe/Oslo --label role=router exec --kwargs '{\"command\":\"show running-config\"}'\n  ottomato schedule add --file schedules.jsonl   # one {\"id\": …, …} per line"
    )]
    Add(Box<AddArgs>),
    /// List schedules: timing, selection, next tick, and the last outcome
    /// of each selected workload.
    Ls {
        /// Only ids matching this glob.
        glob: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print one schedule as stored (JSON), with its next tick.
    Get {
        /// Schedule id.
        id: String,
    },
    /// Delete a schedule.
    Rm {
        /// Schedule id.
        id: String,
    },
    /// Pause a schedule (it stays stored; nothing runs).
    Pause {
        /// Schedule id.
        id: String,
    },
    /// Resume a paused schedule from its next tick.
    Resume {
        /// Schedule id.
        id: String,
    },
}

/// `schedule add`'s arguments.
#[derive(clap::Args)]
pub(crate) struct AddArgs {
    /// ID COMMAND [ARGS]... (ARGS are JSON values or plain strings);
    /// none with --file.
    words: Vec<String>,
    /// Interval between ticks (30s, 5m, 1h), counted from the epoch.
    #[arg(long)]
    every: Option<String>,
    /// Cron expression (5 fields, or 6 with seconds first).
    #[arg(long)]
    cron: Option<String>,
    /// Time zone of the cron expression (IANA, e.g. Europe/Oslo) [default: UTC].
    #[arg(long)]
    tz: Option<String>,
    /// Glob on workload ids [default: all].
    #[arg(long)]
    select: Option<String>,
    /// Label selector key=value (repeatable).
    #[arg(long = "label", value_parser = crate::cli::parse_kv)]
    labels: Vec<(String, String)>,
    /// Keyword arguments, a JSON object.
    #[arg(long)]
    kwargs: Option<String>,
    /// Spread each tick's runs over this window (e.g. 60s).
    #[arg(long)]
    splay: Option<String>,
    /// Deadline of each run.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// skip (a busy device skips the tick) or queue.
    #[arg(long, default_value = "skip", value_parser = ["skip", "queue"])]
    overlap: String,
    /// skip, or run-once (a tick missed during a move runs once on the new owner).
    #[arg(long, default_value = "skip", value_parser = ["skip", "run-once"])]
    missed: String,
    /// Store it paused.
    #[arg(long)]
    paused: bool,
    /// Read schedules from a file instead: JSON lines, each a schedule
    /// with its "id".
    #[arg(long)]
    file: Option<std::path::PathBuf>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn timing(s: &ScheduleSpec) -> String {
    match (&s.every, &s.cron) {
        (Some(e), _) => format!("every {e}"),
        (_, Some(c)) => format!("cron '{c}' {}", s.tz.as_deref().unwrap_or("UTC")),
        _ => "-".into(),
    }
}

/// How many stored workload specs `s` selects.
async fn selected(client: &crate::client::Client, s: &Schedule) -> anyhow::Result<usize> {
    Ok(client
        .workloads()
        .await?
        .iter()
        .filter(|w| {
            w.spec
                .as_ref()
                .is_some_and(|sp| s.selects(&w.id, &sp.labels))
        })
        .count())
}

pub(crate) async fn schedule(conn: &Conn, cmd: ScheduleCmd) -> anyhow::Result<()> {
    let client = conn.client().await?;
    match cmd {
        ScheduleCmd::Add(args) => {
            let AddArgs {
                words,
                every,
                cron,
                tz,
                select,
                labels,
                kwargs,
                splay,
                timeout,
                overlap,
                missed,
                paused,
                file,
            } = *args;
            let mut todo: Vec<(String, ScheduleSpec)> = Vec::new();
            if let Some(path) = file {
                let flags = every.is_some()
                    || cron.is_some()
                    || tz.is_some()
                    || select.is_some()
                    || !labels.is_empty()
                    || kwargs.is_some()
                    || splay.is_some()
                    || timeout.is_some()
                    || paused
                    || overlap != "skip"
                    || missed != "skip";
                if !words.is_empty() || flags {
                    anyhow::bail!(
                        "--file takes every setting from the file: give it alone (no ID COMMAND, no --every/--select/…)"
                    );
                }
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let at = format!("{}:{}", path.display(), n + 1);
                    let mut v: Map<String, Value> = serde_json::from_str(line)
                        .map_err(|e| anyhow::anyhow!("{at}: not a JSON object: {e}"))?;
                    let Some(Value::String(id)) = v.remove("id") else {
                        anyhow::bail!("{at}: no \"id\"");
                    };
                    let spec: ScheduleSpec = serde_json::from_value(Value::Object(v))
                        .map_err(|e| anyhow::anyhow!("{at}: schedule {id}: {e}"))?;
                    Schedule::parse(&id, spec.clone())
                        .map_err(|e| anyhow::anyhow!("{at}: schedule {id}: {e}"))?;
                    todo.push((id, spec));
                }
            } else {
                let [id, command, args @ ..] = words.as_slice() else {
                    anyhow::bail!(
                        "usage: ottomato schedule add ID (--every D | --cron EXPR) COMMAND [ARGS]... (or --file F)"
                    );
                };
                let spec = ScheduleSpec {
                    select,
                    labels: labels.into_iter().collect(),
                    command: command.clone(),
                    args: args
                        .iter()
                        .map(|a| {
                            serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.clone()))
                        })
                        .collect(),
                    kwargs: match kwargs {
                        Some(k) => serde_json::from_str(&k)
                            .map_err(|e| anyhow::anyhow!("--kwargs: not a JSON object: {e}"))?,
                        None => Map::new(),
                    },
                    timeout_ms: timeout.map(|d| d.as_millis() as u64),
                    every,
                    cron,
                    tz,
                    splay,
                    enabled: !paused,
                    overlap: if overlap == "queue" {
                        Overlap::Queue
                    } else {
                        Overlap::Skip
                    },
                    missed: if missed == "run-once" {
                        Missed::RunOnce
                    } else {
                        Missed::Skip
                    },
                };
                todo.push((id.clone(), spec));
            }
            for (id, spec) in todo {
                let s = client.put_schedule(&id, &spec).await?;
                let n = selected(&client, &s).await?;
                let next = s
                    .next_tick_after(SystemTime::now())
                    .map_or("-".into(), rfc3339);
                println!(
                    "schedule {id}: {}, {} on {n} workload(s); next tick {next}{}",
                    timing(&spec),
                    spec.command,
                    if spec.enabled { "" } else { " (paused)" }
                );
                if n == 0 {
                    eprintln!("warning: schedule {id} selects no workload now (it will run on any that match later)");
                }
            }
            Ok(())
        }
        ScheduleCmd::Ls { glob, json } => {
            let all = client.schedules().await?;
            let workloads = client.workloads().await?;
            let mut rows = Vec::new();
            for (id, parsed) in all {
                if glob.as_deref().is_some_and(|g| !glob_match(g, &id)) {
                    continue;
                }
                let s = match parsed {
                    Ok(s) => s,
                    Err(e) => {
                        rows.push(serde_json::json!({"id": id, "error": e}));
                        continue;
                    }
                };
                let n = workloads
                    .iter()
                    .filter(|w| {
                        w.spec
                            .as_ref()
                            .is_some_and(|sp| s.selects(&w.id, &sp.labels))
                    })
                    .count();
                let last = client
                    .results(&ResultQuery {
                        source: Some(id.clone()),
                        last: Some(1),
                        ..Default::default()
                    })
                    .await;
                let last = match last {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("warning: schedule {id}: could not read its results: {e}");
                        Vec::new()
                    }
                };
                let ok = last.iter().filter(|r| r.result.success).count();
                rows.push(serde_json::json!({
                    "id": id,
                    "when": timing(&s.spec),
                    "select": s.spec.select.clone().unwrap_or_else(|| "*".into()),
                    "labels": s.spec.labels,
                    "command": s.spec.command,
                    "enabled": s.spec.enabled,
                    "workloads": n,
                    "nextTick": s.spec.enabled.then(|| s.next_tick_after(SystemTime::now()).map(rfc3339)).flatten(),
                    "lastOk": ok,
                    "lastFailed": last.len() - ok,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<28} {:<14} {:<12} {:>9} {:<21} {:>7} {:>7}",
                "ID", "WHEN", "SELECT", "COMMAND", "WORKLOADS", "NEXT TICK", "LAST OK", "FAILED"
            );
            for r in rows {
                if let Some(e) = r.get("error") {
                    println!("{:<16} INVALID: {}", r["id"].as_str().unwrap_or(""), e);
                    continue;
                }
                let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                let mut sel = s("select");
                if let Some(l) = r["labels"].as_object().filter(|l| !l.is_empty()) {
                    let ls: Vec<String> = l
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect();
                    sel = format!("{sel} {}", ls.join(","));
                }
                let next = if r["enabled"] == true {
                    s("nextTick")
                } else {
                    "paused".into()
                };
                println!(
                    "{:<16} {:<28} {:<14} {:<12} {:>9} {:<21} {:>7} {:>7}",
                    s("id"),
                    s("when"),
                    sel,
                    s("command"),
                    r["workloads"],
                    next,
                    r["lastOk"],
                    r["lastFailed"]
                );
            }
            Ok(())
        }
        ScheduleCmd::Get { id } => {
            let Some(spec) = client.schedule(&id).await? else {
                anyhow::bail!("no schedule {id:?}");
            };
            let mut v = serde_json::to_value(&spec)?;
            if let (Ok(s), Some(o)) = (Schedule::parse(&id, spec), v.as_object_mut()) {
                o.insert("id".into(), Value::String(id.clone()));
                if let Some(t) = s.next_tick_after(SystemTime::now()) {
                    o.insert("nextTick".into(), Value::String(rfc3339(t)));
                }
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        ScheduleCmd::Rm { id } => {
            client.delete_schedule(&id).await?;
            println!("schedule {id} deleted");
            Ok(())
        }
        ScheduleCmd::Pause { id } => set_enabled(&client, &id, false).await,
        ScheduleCmd::Resume { id } => set_enabled(&client, &id, true).await,
    }
}

async fn set_enabled(client: &crate::client::Client, id: &str, on: bool) -> anyhow::Result<()> {
    client.set_schedule_enabled(id, on).await?;
    println!("schedule {id} {}", if on { "resumed" } else { "paused" });
    Ok(())
}

/// `ottomato results`.
pub(crate) async fn results(
    conn: &Conn,
    glob: Option<String>,
    schedule: Option<String>,
    last: Option<usize>,
    since: Option<Duration>,
    json: bool,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let client = conn.client().await?;
    let q = ResultQuery {
        select: glob,
        source: schedule,
        since: since.map(|d| SystemTime::now() - d),
        last: match (last, since) {
            (Some(n), _) => Some(n.max(1)),
            (None, Some(_)) => None,
            (None, None) => Some(1),
        },
    };
    let deadline = std::time::Instant::now() + wait.unwrap_or_default();
    let rows = loop {
        let rows = client.results(&q).await?;
        if !rows.is_empty() || std::time::Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if json {
        for r in &rows {
            let mut v = serde_json::to_value(&r.result)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("source".into(), Value::String(r.source.clone()));
                o.insert("seq".into(), Value::from(r.seq));
            }
            println!("{}", serde_json::to_string(&v)?);
        }
        return Ok(());
    }
    let mut by: BTreeMap<(String, String), Vec<&StoredResult>> = BTreeMap::new();
    for r in &rows {
        by.entry((r.workload.clone(), r.source.clone()))
            .or_default()
            .push(r);
    }
    println!(
        "{:<20} {:<14} {:<21} {:<8} {:<10} RESULT",
        "WORKLOAD", "SOURCE", "TICK/TIME", "OUTCOME", "NODE"
    );
    for ((w, src), rs) in by {
        for r in rs {
            let t = r.result.tick.unwrap_or(r.result.timestamp);
            let outcome = if r.result.success {
                "ok".to_string()
            } else {
                r.result
                    .error_code
                    .map_or("error".into(), |c| c.as_str().to_string())
            };
            let mut text = if r.result.success {
                r.result.ret.to_string()
            } else {
                r.result.error.clone().unwrap_or_default()
            };
            if text.len() > 80 {
                let cut = (0..=77)
                    .rev()
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(0);
                text.truncate(cut);
                text.push('…');
            }
            println!(
                "{w:<20} {src:<14} {:<21} {outcome:<8} {:<10} {text}",
                rfc3339(t),
                r.result.worker_id
            );
        }
    }
    eprintln!("{} result(s)", rows.len());
    Ok(())
}
