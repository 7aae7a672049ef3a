//! The health-check scheduler: one task per node that decides when each
//! workload is pinged, so no workload needs a timer of its own.
//!
//! Every workload is pinged on a random interval in `[splay_min, splay_max]`
//! (times `dead_ping_factor` while dead). The scheduler also spreads pings
//! evenly: time is cut into 1 ms ticks and no tick gets more than
//! `ceil(scheduled / window_ms)` pings; a random tick that is full moves to
//! the next free one. With 1 000 workloads over the default 2 s window, no
//! two pings start in the same millisecond.
//!
//! **Invariant:** the scheduler only sends `Ping` messages; what a ping means
//! (status, events) is the workload actor's business.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::slot::Slot;
use super::workload_actor::WorkloadMsg;
use crate::config::NodeConfig;
use crate::status::Status;

struct Entry {
    tick: u64,
    generation: u32,
    slot: Arc<Slot>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.tick == other.tick
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tick.cmp(&other.tick)
    }
}

struct Scheduler {
    epoch: Instant,
    min: Duration,
    max: Duration,
    dead_factor: u32,
    heap: BinaryHeap<Reverse<Entry>>,
    /// Pings due per tick, for the ticks that have any.
    per_tick: HashMap<u64, u32>,
}

impl Scheduler {
    fn tick_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Picks the tick of the next ping of `slot`, at least `min` from now.
    fn pick(&mut self, dead: bool) -> u64 {
        let f = if dead { self.dead_factor.max(1) } else { 1 };
        let lo = self.tick_at(Instant::now() + self.min * f);
        let width = ((self.max - self.min) * f).as_millis().max(1) as u64;
        let cap = (self.heap.len() as u64 + 1).div_ceil(width).max(1) as u32;
        let start = rand::thread_rng().gen_range(0..width);
        let mut chosen = lo + start;
        for i in 0..width {
            let t = lo + (start + i) % width;
            if self.per_tick.get(&t).copied().unwrap_or(0) < cap {
                chosen = t;
                break;
            }
        }
        *self.per_tick.entry(chosen).or_insert(0) += 1;
        chosen
    }

    fn push(&mut self, slot: Arc<Slot>, generation: u32, dead: bool) {
        let tick = self.pick(dead);
        slot.lock().next_ping = Some(self.epoch + Duration::from_millis(tick));
        self.heap.push(Reverse(Entry {
            tick,
            generation,
            slot,
        }));
    }

    fn fire_due(&mut self) {
        let now = self.tick_at(Instant::now());
        while self.heap.peek().is_some_and(|e| e.0.tick <= now) {
            let Some(Reverse(e)) = self.heap.pop() else {
                break;
            };
            if let Some(n) = self.per_tick.get_mut(&e.tick) {
                *n -= 1;
                if *n == 0 {
                    self.per_tick.remove(&e.tick);
                }
            }
            if e.slot.sched_gen.load(Ordering::Acquire) != e.generation {
                continue; // cancelled or rescheduled
            }
            let (actor, dead) = {
                let g = e.slot.lock();
                (g.actor.clone(), g.status == Status::Dead)
            };
            let Some(actor) = actor else { continue };
            if actor.send_message(WorkloadMsg::Ping).is_err() {
                continue; // actor gone; a new one reschedules after its init
            }
            self.push(e.slot, e.generation, dead);
        }
    }
}

/// Starts the scheduler; send it a slot to start (or restart) its pings.
pub(crate) fn spawn(cfg: &NodeConfig) -> mpsc::UnboundedSender<Arc<Slot>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Arc<Slot>>();
    let mut s = Scheduler {
        epoch: Instant::now(),
        min: cfg.ping_splay_min,
        max: cfg.ping_splay_max,
        dead_factor: cfg.dead_ping_factor,
        heap: BinaryHeap::new(),
        per_tick: HashMap::new(),
    };
    tokio::spawn(async move {
        loop {
            let next = s
                .heap
                .peek()
                .map(|e| s.epoch + Duration::from_millis(e.0.tick));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(slot) => {
                        let generation = slot.sched_gen.fetch_add(1, Ordering::AcqRel) + 1;
                        s.push(slot, generation, false);
                    }
                    None => return, // node stopped
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    s.fire_due();
                }
            }
        }
    });
    tx
}
