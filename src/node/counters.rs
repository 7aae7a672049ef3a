//! What a node counts as it works: plain atomics on the hot paths (a task,
//! a ping, a claim costs one relaxed add), read by the metrics exporter
//! (`crate::metrics`) at scrape time. No per-workload state: 100 000
//! workloads cost nothing here.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::wire::ErrorCode;

/// Upper bounds of the task latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Task outcomes: `ok` and every error code.
pub const OUTCOMES: usize = ErrorCode::ALL.len() + 1;

/// A node's counters since it started.
#[derive(Debug, Default)]
pub struct Counters {
    tasks: [AtomicU64; OUTCOMES],
    /// Per latency bucket (the last counts the rest), sum in microseconds.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    pub(crate) pings: AtomicU64,
    pub(crate) ping_failures: AtomicU64,
    pub(crate) inits: AtomicU64,
    pub(crate) init_failures: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) fences: AtomicU64,
    pub(crate) claims: AtomicU64,
    pub(crate) releases: AtomicU64,
    pub(crate) lease_renewals: AtomicU64,
    /// Scheduled runs started.
    pub(crate) ticks_run: AtomicU64,
    /// Ticks skipped: the device was still busy with the previous one.
    pub(crate) ticks_skipped: AtomicU64,
    /// Ticks shed: too late, or too many runs in flight.
    pub(crate) ticks_shed: AtomicU64,
    /// Missed ticks run once on a new owner (`missed: run-once`).
    pub(crate) ticks_caught_up: AtomicU64,
    /// Tasks waiting in workloads' queues (not yet on the device).
    queued: AtomicI64,
    /// Workloads whose state waits to be written (queued or in flight).
    pub(crate) writer_backlog: AtomicI64,
}

/// A read of [`Counters`].
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Tasks answered, by outcome (`"ok"` or an error code).
    pub tasks: Vec<(&'static str, u64)>,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`] (then +Inf).
    pub latency_buckets: Vec<u64>,
    /// Sum of task latencies, seconds.
    pub latency_sum: f64,
    /// Pings run, and those that failed.
    pub pings: u64,
    /// Failed pings.
    pub ping_failures: u64,
    /// Init attempts, and those that failed.
    pub inits: u64,
    /// Failed init attempts.
    pub init_failures: u64,
    /// Actor restarts by the supervisor.
    pub restarts: u64,
    /// Workloads fenced (claim lost, lease run out, another incarnation).
    pub fences: u64,
    /// Workloads claimed (cluster mode: created or taken over).
    pub claims: u64,
    /// Workloads released to another node (cluster mode).
    pub releases: u64,
    /// Lease renewals (cluster mode: acknowledged heartbeats).
    pub lease_renewals: u64,
    /// Scheduled runs started.
    pub ticks_run: u64,
    /// Ticks skipped because the device was busy with the previous one.
    pub ticks_skipped: u64,
    /// Ticks shed: late, or too many runs in flight.
    pub ticks_shed: u64,
    /// Missed ticks run once on a new owner.
    pub ticks_caught_up: u64,
    /// Results stored in the result history.
    pub results_stored: u64,
    /// Results dropped: the buffer to the store was full.
    pub results_dropped: u64,
    /// Results the store refused (backend errors).
    pub results_failed: u64,
    /// Tasks waiting in workloads' queues.
    pub queued: i64,
    /// Workloads whose state record waits to be written.
    pub writer_backlog: i64,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// A task was answered (any outcome); `elapsed`: the device's time,
    /// zero for a task refused before it reached the device (those are
    /// counted, but kept out of the latency histogram).
    pub(crate) fn task_done(&self, code: Option<ErrorCode>, elapsed: Duration) {
        add(&self.tasks[code.map_or(0, |c| c.index() + 1)]);
        if elapsed.is_zero() {
            return;
        }
        let s = elapsed.as_secs_f64();
        let b = LATENCY_BUCKETS
            .iter()
            .position(|le| s <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        add(&self.latency[b]);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn queued_delta(&self, d: i64) {
        self.queued.fetch_add(d, Ordering::Relaxed);
    }

    pub(crate) fn inc(c: &AtomicU64) {
        add(c);
    }

    /// A task counted with outcome `from` was answered as `to` after all
    /// (a result too large to send), or (`to: None`) not answered by this
    /// node at all (a fan-out result left to its owner).
    pub(crate) fn recount(&self, from: Option<ErrorCode>, to: Option<ErrorCode>) {
        self.tasks[from.map_or(0, |c| c.index() + 1)].fetch_sub(1, Ordering::Relaxed);
        if let Some(to) = to {
            add(&self.tasks[to.index() + 1]);
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut tasks = vec![("ok", get(&self.tasks[0]))];
        for c in ErrorCode::ALL {
            tasks.push((c.as_str(), get(&self.tasks[c.index() + 1])));
        }
        let mut acc = 0;
        let latency_buckets = self
            .latency
            .iter()
            .map(|b| {
                acc += get(b);
                acc
            })
            .collect();
        Snapshot {
            tasks,
            latency_buckets,
            latency_sum: get(&self.latency_sum_us) as f64 / 1e6,
            pings: get(&self.pings),
            ping_failures: get(&self.ping_failures),
            inits: get(&self.inits),
            init_failures: get(&self.init_failures),
            restarts: get(&self.restarts),
            fences: get(&self.fences),
            ticks_run: get(&self.ticks_run),
            ticks_skipped: get(&self.ticks_skipped),
            ticks_shed: get(&self.ticks_shed),
            ticks_caught_up: get(&self.ticks_caught_up),
            results_stored: 0,
            results_dropped: 0,
            results_failed: 0,
            claims: get(&self.claims),
            releases: get(&self.releases),
            lease_renewals: get(&self.lease_renewals),
            queued: self.queued.load(Ordering::Relaxed).max(0),
            writer_backlog: self.writer_backlog.load(Ordering::Relaxed).max(0),
        }
    }
}
