//! `ottomato demo`: one process on the embedded in-memory backend — add N sim
//! devices, wait until they run, run a round of tasks on all, report.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use ottomato_actors::sim::SimKind;
use serde_json::json;

use crate::{Node, NodeError, Status, Task, WorkloadSpec};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated devices to add.
    pub devices: usize,
    /// Tasks in flight during the task round.
    pub concurrency: usize,
    /// How long each simulated device's init takes, in ms.
    pub init_ms: u64,
    /// Show progress bars (on a terminal) or progress lines (elsewhere).
    pub progress: bool,
    /// Give up waiting for devices to run after this long.
    pub settle_timeout: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            devices: 10_000,
            concurrency: 256,
            init_ms: 10,
            progress: true,
            settle_timeout: Duration::from_secs(300),
        }
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// Devices added.
    pub devices: usize,
    /// Time to add them all (actors started, init still running).
    pub add_time: Duration,
    /// Time from the first add until every device was `running`.
    pub time_to_running: Duration,
    /// Workloads per status at the end of the task round.
    pub by_status: Vec<(Status, usize)>,
    /// Tasks run and how many succeeded.
    pub tasks: usize,
    /// Tasks that succeeded.
    pub tasks_ok: usize,
    /// Tasks per second during the round.
    pub tasks_per_sec: f64,
    /// Median task latency.
    pub p50: Duration,
    /// 99th percentile task latency.
    pub p99: Duration,
    /// Resident memory after the devices settled, in bytes (Linux), if known.
    pub rss_bytes: Option<u64>,
    /// The demo schedule (`hello` on every device every 2 s, splay 2 s):
    /// ticks run, results stored, and how long one round of ticks took.
    pub schedule_ticks: u64,
    /// Results of the demo schedule stored in the (in-memory) history.
    pub schedule_results: usize,
    /// Wall time of the schedule round.
    pub schedule_time: Duration,
    /// Whether Ctrl-C cut the demo short.
    pub interrupted: bool,
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "devices            {}", self.devices)?;
        writeln!(f, "added in           {:.2?}", self.add_time)?;
        writeln!(f, "all running after  {:.2?}", self.time_to_running)?;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        writeln!(f, "status             {}", statuses.join(" "))?;
        writeln!(
            f,
            "tasks              {} ok / {} run, {:.0} tasks/s, p50 {:.3?}, p99 {:.3?}",
            self.tasks_ok, self.tasks, self.tasks_per_sec, self.p50, self.p99
        )?;
        writeln!(
            f,
            "schedule           every 2s, splay 2s: {} ticks run, {} results kept, in {:.1?}",
            self.schedule_ticks, self.schedule_results, self.schedule_time
        )?;
        if let Some(rss) = self.rss_bytes {
            writeln!(
                f,
                "memory (RSS)       {:.1} MiB ({:.2} KiB per device)",
                rss as f64 / 1048576.0,
                rss as f64 / 1024.0 / self.devices.max(1) as f64
            )?;
        }
        if self.interrupted {
            writeln!(f, "(interrupted by Ctrl-C)")?;
        }
        Ok(())
    }
}

/// Resident set size of this process, from `/proc/self/statm` (Linux only).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn bar(len: usize, msg: &'static str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Prints a progress line when the bar can't draw (not a terminal).
fn note(show: bool, line: String) {
    if show && !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("{line}");
    }
}

/// Runs the demo on `node` (which must have the `sim` kind). Stops early,
/// with `interrupted` set, when `shutdown` completes.
pub async fn run(
    node: &Node,
    opts: &DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<DemoSummary, NodeError> {
    tokio::pin!(shutdown);
    let mut interrupted = false;
    let started = Instant::now();
    let config = if opts.init_ms > 0 {
        json!({ "init_ms": opts.init_ms })
    } else {
        serde_json::Value::Null
    };

    // 1. Add the devices.
    let pb = bar(opts.devices, "adding", opts.progress);
    note(
        opts.progress,
        format!("adding {} sim devices", opts.devices),
    );
    for i in 0..opts.devices {
        let spec = WorkloadSpec::new(format!("sim-{i:06}"), "sim").with_config(config.clone());
        node.add_workload(spec).await?;
        if i % 1024 == 0 {
            pb.set_position(i as u64);
            tokio::task::yield_now().await;
            if futures::poll!(&mut shutdown).is_ready() {
                interrupted = true;
                break;
            }
        }
    }
    pb.finish_and_clear();
    let add_time = started.elapsed();
    note(opts.progress, format!("added in {add_time:.2?}"));

    // 2. Wait until they all run.
    let pb = bar(opts.devices, "running", opts.progress);
    let deadline = Instant::now() + opts.settle_timeout;
    let mut last_note = Instant::now();
    while !interrupted {
        let running = node
            .count_by_status()
            .get(&Status::Running)
            .copied()
            .unwrap_or(0);
        pb.set_position(running as u64);
        if running >= opts.devices || Instant::now() >= deadline {
            break;
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            note(
                opts.progress,
                format!("running: {running}/{}", opts.devices),
            );
            last_note = Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = &mut shutdown => interrupted = true,
        }
    }
    pb.finish_and_clear();
    let time_to_running = started.elapsed();
    let rss = rss_bytes();

    // 3. One task on every device.
    let pb = bar(opts.devices, "tasks", opts.progress);
    note(
        opts.progress,
        format!("running echo on {} devices", opts.devices),
    );
    let ids: Vec<String> = (0..opts.devices).map(|i| format!("sim-{i:06}")).collect();
    let round = Instant::now();
    let mut latencies = Vec::with_capacity(ids.len());
    let mut ok = 0usize;
    if !interrupted {
        let node2 = node.clone();
        let mut results = futures::stream::iter(ids.iter().cloned())
            .map(move |id| {
                let node = node2.clone();
                async move {
                    let t = Instant::now();
                    let r = node.run_task(&id, Task::new("echo").arg(1)).await;
                    (r.success, t.elapsed())
                }
            })
            .buffer_unordered(opts.concurrency.max(1));
        loop {
            tokio::select! {
                next = results.next() => match next {
                    Some((success, latency)) => {
                        ok += usize::from(success);
                        latencies.push(latency);
                        if latencies.len() % 1024 == 0 {
                            pb.set_position(latencies.len() as u64);
                        }
                    }
                    None => break,
                },
                _ = &mut shutdown => { interrupted = true; break; }
            }
        }
    }
    let round_time = round.elapsed();
    pb.finish_and_clear();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    // 4. A schedule over every device, run by the node that owns each (the
    // embedded default runs schedules too), until each device ran a tick.
    let sched_started = Instant::now();
    let mut schedule_results = 0;
    if !interrupted {
        note(
            opts.progress,
            format!("schedule: hello on {} devices every 2s", opts.devices),
        );
        let mut spec = crate::schedule::ScheduleSpec::every("hello", "2s");
        spec.splay = Some("2s".into());
        node.put_schedule("demo", &spec).await?;
        let pb = bar(opts.devices, "scheduled", opts.progress);
        let deadline = Instant::now() + opts.settle_timeout;
        loop {
            let ticks = node.counters().ticks_run;
            pb.set_position(ticks.min(opts.devices as u64));
            if ticks >= opts.devices as u64 || Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut shutdown => { interrupted = true; break; }
            }
        }
        pb.finish_and_clear();
        node.delete_schedule("demo").await?;
        node.flush_results(Duration::from_secs(10)).await;
        schedule_results = node
            .results(&crate::results::ResultQuery {
                source: Some("demo".into()),
                ..Default::default()
            })
            .await?
            .len();
    }
    let schedule_time = sched_started.elapsed();
    let counts = node.count_by_status();
    let by_status = Status::ALL
        .iter()
        .filter_map(|s| counts.get(s).map(|n| (*s, *n)))
        .collect();
    Ok(DemoSummary {
        devices: opts.devices,
        add_time,
        time_to_running,
        by_status,
        tasks: latencies.len(),
        tasks_ok: ok,
        tasks_per_sec: latencies.len() as f64 / round_time.as_secs_f64().max(1e-9),
        p50: pct(0.50),
        p99: pct(0.99),
        rss_bytes: rss,
        schedule_ticks: node.counters().ticks_run,
        schedule_results,
        schedule_time,
        interrupted,
    })
}

/// Builds the demo's node: the `sim` kind on the in-memory backend.
pub async fn demo_node() -> Result<Node, NodeError> {
    Node::builder().node_id("demo").kind(SimKind).start().await
}

/// Stops `node`, showing progress while workloads are deleted.
pub async fn stop_with_progress(node: &Node, progress: bool) {
    let total = node.len();
    let pb = bar(total, "stopping", progress);
    let n = node.clone();
    let stopper = tokio::spawn(async move { n.stop().await });
    let shared_pb = Arc::new(pb);
    while !stopper.is_finished() {
        shared_pb.set_position((total - node.len()) as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stopper.await;
    shared_pb.finish_and_clear();
}
