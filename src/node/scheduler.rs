//! Runs the schedules' ticks for the workloads this node holds.
//!
//! One tokio task per node. It keeps, for every (schedule, workload this
//! node holds that the schedule selects), the next run in one min-heap, and
//! sleeps until the earliest. Whether the node still owns the workload is
//! decided where every task is: the run goes through the workload's actor
//! like any request, so a node that lost the workload (fenced, lease run
//! out, released) neither runs the tick nor publishes a result. A new owner
//! arms the workload when it is added to it (the node's `Added` event) from
//! the next tick on — or, with `missed: run-once`, runs the last due tick
//! once if the results store shows it did not run.
//!
//! Never an unbounded backlog: a run still going when the next tick comes
//! skips it (`overlap: skip`, counted), at most `schedule_max_inflight`
//! runs are in flight per node (the rest are shed, counted), and a tick
//! found late by more than its slack (a paused process, an overloaded node)
//! is shed rather than run late; the workload goes on from the next tick.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::time::Instant;

use super::counters::Counters;
use super::Shared;
use crate::events::Event;
use crate::results::{ResultPublisher, ResultStore};
use crate::schedule::{Missed, Overlap, Schedule};
use crate::CommandClass;

/// The wall clock ticks are computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleClock {
    /// The system clock, re-read at least every second (follows NTP steps).
    #[default]
    System,
    /// Wall time derived from tokio's clock at start: a paused tokio clock
    /// (tests) drives the schedules too.
    Tokio,
    /// Like [`ScheduleClock::Tokio`], with the origin given: wall time
    /// `wall` at tokio instant `at` (a test computes due times from the
    /// same origin as the node, whatever real time starting it takes).
    TokioFrom {
        /// The wall time at `at`.
        wall: SystemTime,
        /// The tokio instant of `wall`.
        at: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Clock {
    System,
    Tokio { wall: SystemTime, at: Instant },
}

impl Clock {
    pub(crate) fn new(kind: ScheduleClock) -> Self {
        match kind {
            ScheduleClock::System => Clock::System,
            ScheduleClock::Tokio => Clock::Tokio {
                wall: SystemTime::now(),
                at: Instant::now(),
            },
            ScheduleClock::TokioFrom { wall, at } => Clock::Tokio { wall, at },
        }
    }

    pub(crate) fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { wall, at } => *wall + at.elapsed(),
        }
    }

    /// When to wake up to be at `t` (re-checked after each wake-up).
    fn wake_at(&self, t: SystemTime) -> Instant {
        let left = t.duration_since(self.now()).unwrap_or_default();
        match self {
            // The system clock may be stepped: look again within a second.
            Clock::System => Instant::now() + left.min(Duration::from_secs(1)),
            Clock::Tokio { .. } => Instant::now() + left,
        }
    }
}

pub(crate) enum Msg {
    /// A schedule was written (new or changed).
    Put(Arc<Schedule>),
    /// A schedule was deleted (or became invalid).
    Remove(Arc<str>),
    /// A run ended (or will never run).
    Done(Arc<str>, Arc<str>),
    /// A missed tick to run once (from the results check), if still current.
    CatchUp {
        schedule: Arc<str>,
        generation: u64,
        workload: Arc<str>,
        tick: SystemTime,
        /// The first regular run armed for this ownership: the catch-up
        /// tick must be before it.
        armed: SystemTime,
    },
}

/// Handle of a node's scheduler task.
#[derive(Clone)]
pub(crate) struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl SchedulerHandle {
    pub(crate) fn send(&self, m: Msg) {
        let _ = self.tx.send(m);
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    fire: SystemTime,
    tick: SystemTime,
    generation: u64,
    schedule: Arc<str>,
    workload: Arc<str>,
}

struct Current {
    generation: u64,
    schedule: Arc<Schedule>,
}

type Key = (Arc<str>, Arc<str>);

struct State {
    shared: Weak<Shared>,
    clock: Clock,
    tx: mpsc::UnboundedSender<Msg>,
    results: Arc<ResultPublisher>,
    store: Arc<dyn ResultStore>,
    lookups: Arc<Semaphore>,
    schedules: HashMap<Arc<str>, Current>,
    next_generation: u64,
    heap: BinaryHeap<Reverse<Entry>>,
    /// The one valid heap entry per key: (generation, fire time).
    armed: HashMap<Key, (u64, SystemTime)>,
    /// The last tick handled (run, skipped or shed) per key: an edit that
    /// moves a workload's offset never runs a tick it already handled.
    last_tick: HashMap<Key, SystemTime>,
    busy: HashSet<Key>,
    inflight: usize,
    max_inflight: usize,
}

/// Starts the scheduler of a node.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    clock: Clock,
    results: Arc<ResultPublisher>,
    store: Arc<dyn ResultStore>,
) -> SchedulerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = State {
        shared: Arc::downgrade(shared),
        clock,
        tx: tx.clone(),
        results,
        store,
        lookups: Arc::new(Semaphore::new(64)),
        schedules: HashMap::new(),
        next_generation: 1,
        heap: BinaryHeap::new(),
        armed: HashMap::new(),
        last_tick: HashMap::new(),
        busy: HashSet::new(),
        inflight: 0,
        max_inflight: shared.cfg.schedule_max_inflight.max(1),
    };
    let events = shared.events.subscribe();
    tokio::spawn(run(state, rx, events));
    SchedulerHandle { tx }
}

async fn run(
    mut st: State,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut events: broadcast::Receiver<Event>,
) {
    loop {
        let wake = st.heap.peek().map(|Reverse(e)| st.clock.wake_at(e.fire));
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            m = rx.recv() => match m {
                Some(m) => st.on_msg(m),
                None => return,
            },
            e = events.recv() => match e {
                Ok(Event::Added { workload }) => st.on_added(&workload),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => st.arm_all(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = sleep => st.fire_due(),
        }
        if st.shared.strong_count() == 0 {
            return;
        }
    }
}

impl State {
    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Put(s) => {
                let id = s.id.clone();
                // First seen here (node start): workloads it already holds
                // may have missed a tick while they moved to it.
                let first_seen = !self.schedules.contains_key(&id);
                let generation = self.next_generation;
                self.next_generation += 1;
                self.armed.retain(|k, _| k.0 != id);
                self.schedules.insert(
                    id.clone(),
                    Current {
                        generation,
                        schedule: s,
                    },
                );
                self.arm_schedule(&id, first_seen);
            }
            Msg::Remove(id) => {
                self.schedules.remove(&id);
                self.armed.retain(|k, _| k.0 != id);
                self.last_tick.retain(|k, _| k.0 != id);
            }
            Msg::Done(s, w) => {
                self.inflight = self.inflight.saturating_sub(1);
                self.busy.remove(&(s, w));
            }
            Msg::CatchUp {
                schedule,
                generation,
                workload,
                tick,
                armed,
            } => {
                let key = (schedule.clone(), workload.clone());
                let current = self
                    .schedules
                    .get(&schedule)
                    .filter(|c| c.generation == generation)
                    .map(|c| c.schedule.clone());
                // Still held and selected (armed under this generation),
                // and the tick is before the first one this ownership
                // armed: this node has not run it.
                let held = self.armed.get(&key).is_some_and(|(g, _)| *g == generation);
                if let (Some(s), true, true) = (current, held, tick < armed) {
                    if let Some(shared) = self.shared.upgrade() {
                        Counters::inc(&shared.counters.ticks_caught_up);
                    }
                    tracing::info!(schedule = %s.id, %workload,
                        tick = %humantime::format_rfc3339_millis(tick),
                        "running a tick missed while the workload moved (missed: run-once)");
                    self.start(&s, &workload, tick, true);
                }
            }
        }
    }

    /// Arms every held workload `id` selects that is not armed yet.
    /// Arms every held workload `id` selects that is not armed yet; with
    /// `check`, looks for a missed tick of each one newly armed (a schedule
    /// first seen by this node, after workloads came to it).
    fn arm_schedule(&mut self, id: &Arc<str>, check: bool) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let now = self.clock.now();
        let slots: Vec<_> = shared.registry().values().cloned().collect();
        for slot in slots {
            self.arm_and_check(id, &slot.id, &slot.spec.labels, now, check);
        }
    }

    /// After a lagging event stream: arm whatever came meanwhile.
    fn arm_all(&mut self) {
        let ids: Vec<Arc<str>> = self.schedules.keys().cloned().collect();
        for id in ids {
            self.arm_schedule(&id, true);
        }
    }

    /// Arms (schedule, workload); when it was not armed before and `check`
    /// is set, runs the `missed: run-once` check for it.
    fn arm_and_check(
        &mut self,
        id: &Arc<str>,
        workload: &Arc<str>,
        labels: &std::collections::BTreeMap<String, String>,
        now: SystemTime,
        check: bool,
    ) {
        let key = (id.clone(), workload.clone());
        let was_armed = self.armed.contains_key(&key);
        if !self.arm(id, workload, labels, now) || was_armed || !check {
            return;
        }
        let Some(c) = self.schedules.get(id) else {
            return;
        };
        let armed = self.armed.get(&key).map(|(_, f)| *f);
        if let (Missed::RunOnce, Some(armed)) = (c.schedule.spec.missed, armed) {
            self.check_missed(
                c.schedule.clone(),
                c.generation,
                workload.clone(),
                now,
                armed,
            );
        }
    }

    /// Arms (schedule, workload) for its next run, unless armed already.
    /// Returns whether the schedule selects the workload.
    fn arm(
        &mut self,
        schedule: &Arc<str>,
        workload: &Arc<str>,
        labels: &std::collections::BTreeMap<String, String>,
        now: SystemTime,
    ) -> bool {
        let Some(c) = self.schedules.get(schedule) else {
            return false;
        };
        if !c.schedule.spec.enabled || !c.schedule.selects(workload, labels) {
            return false;
        }
        let key = (schedule.clone(), workload.clone());
        if self
            .armed
            .get(&key)
            .is_some_and(|(g, _)| *g == c.generation)
        {
            return true;
        }
        let (generation, s) = (c.generation, c.schedule.clone());
        let mut next = s.next_run(workload, now);
        // Never a tick already handled (an edit may move the offset back).
        let handled = self.last_tick.get(&key).copied();
        for _ in 0..4 {
            match (next, handled) {
                (Some((tick, fire)), Some(h)) if tick <= h => next = s.next_run(workload, fire),
                _ => break,
            }
        }
        match next {
            Some((tick, fire)) if fire > now && handled.is_none_or(|h| tick > h) => {
                self.armed.insert(key, (generation, fire));
                self.heap.push(Reverse(Entry {
                    fire,
                    tick,
                    generation,
                    schedule: schedule.clone(),
                    workload: workload.clone(),
                }));
            }
            _ => {
                tracing::warn!(schedule = %schedule, %workload, "no next tick; not armed");
                self.armed.remove(&key);
            }
        }
        self.compact();
        true
    }

    /// Drops superseded heap entries once they outnumber the live ones
    /// (every edit leaves one per workload until its time comes).
    fn compact(&mut self) {
        if self.heap.len() > 2 * self.armed.len() + 1024 {
            let armed = &self.armed;
            self.heap.retain(|Reverse(e)| {
                armed.get(&(e.schedule.clone(), e.workload.clone()))
                    == Some(&(e.generation, e.fire))
            });
        }
    }

    /// A workload came to this node: arm it for every schedule selecting
    /// it, and look for a missed tick where the schedule asks for one.
    fn on_added(&mut self, workload: &Arc<str>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Some(slot) = shared.slot(workload) else {
            return;
        };
        let now = self.clock.now();
        let ids: Vec<Arc<str>> = self.schedules.keys().cloned().collect();
        for id in ids {
            self.arm_and_check(&id, &slot.id, &slot.spec.labels, now, true);
        }
    }

    /// Runs the last due tick once if the results show the workload ran
    /// this schedule before but not that tick.
    fn check_missed(
        &self,
        s: Arc<Schedule>,
        generation: u64,
        workload: Arc<str>,
        now: SystemTime,
        armed: SystemTime,
    ) {
        let Some((tick, _)) = s.last_due(&workload, now) else {
            return;
        };
        // The previous owner's last result may still be on its way to the
        // store (its publisher is asynchronous): a tick that looks missed
        // is looked at again a moment later — before this node's own first
        // run of the schedule, whose result would hide the answer.
        let settle = RESULT_SETTLE.min(armed.duration_since(now).unwrap_or_default() / 2);
        let (store, tx, lookups) = (self.store.clone(), self.tx.clone(), self.lookups.clone());
        tokio::spawn(async move {
            let Ok(_permit) = lookups.acquire().await else {
                return;
            };
            let last = |store: Arc<dyn ResultStore>, w: Arc<str>, id: Arc<str>| async move {
                store
                    .last(&w, &id)
                    .await
                    .map(|r| r.and_then(|r| r.result.tick))
            };
            let missed = match last(store.clone(), workload.clone(), s.id.clone()).await {
                // Never ran this schedule here before: nothing was missed.
                Ok(Some(prev)) => prev < tick,
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(schedule = %s.id, workload = %workload, error = %e,
                        "could not read the last result; not running a missed tick");
                    false
                }
            };
            if !missed {
                return;
            }
            tokio::time::sleep(settle).await;
            if let Ok(Some(now_last)) = last(store, workload.clone(), s.id.clone()).await {
                if now_last == tick {
                    return; // the previous owner did run it
                }
            }
            let _ = tx.send(Msg::CatchUp {
                schedule: s.id.clone(),
                generation,
                workload,
                tick,
                armed,
            });
        });
    }

    fn fire_due(&mut self) {
        let now = self.clock.now();
        while let Some(Reverse(top)) = self.heap.peek() {
            if top.fire > now {
                return;
            }
            let Some(Reverse(e)) = self.heap.pop() else {
                return;
            };
            let key = (e.schedule.clone(), e.workload.clone());
            if self.armed.get(&key) != Some(&(e.generation, e.fire)) {
                continue; // superseded (schedule changed, re-armed)
            }
            let Some(c) = self
                .schedules
                .get(&e.schedule)
                .filter(|c| c.generation == e.generation)
            else {
                self.armed.remove(&key);
                continue;
            };
            let s = c.schedule.clone();
            let (tick, fired) = (e.tick, e.fire);
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let Some(slot) = shared.slot(&e.workload) else {
                // Gone from this node: armed again if it comes back.
                self.armed.remove(&key);
                self.last_tick.remove(&key);
                continue;
            };
            if !s.selects(&slot.id, &slot.spec.labels) {
                self.armed.remove(&key);
                continue;
            }
            // The next run: after this one, and never in the past.
            let next = s
                .next_run(&e.workload, e.fire)
                .filter(|(t, fire)| *fire > now && *t > tick)
                .or_else(|| s.next_run(&e.workload, now))
                .filter(|(t, fire)| *fire > now && *t > tick);
            match next {
                Some((tick, fire)) => {
                    self.armed.insert(key.clone(), (e.generation, fire));
                    self.heap.push(Reverse(Entry { fire, tick, ..e }));
                }
                None => {
                    self.armed.remove(&key);
                }
            }
            self.last_tick.insert(key.clone(), tick);
            let late = now.duration_since(fired).unwrap_or_default();
            if late > slack(&s) {
                Counters::inc(&shared.counters.ticks_shed);
                tracing::debug!(schedule = %key.0, workload = %key.1, ?late, "tick shed: late");
                continue;
            }
            self.start(&s, &key.1, tick, false);
        }
    }

    /// Starts one run (overlap and in-flight limits permitting).
    fn start(&mut self, s: &Arc<Schedule>, workload: &Arc<str>, tick: SystemTime, caught_up: bool) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let key = (s.id.clone(), workload.clone());
        if self.busy.contains(&key) && s.spec.overlap == Overlap::Skip {
            Counters::inc(&shared.counters.ticks_skipped);
            return;
        }
        if self.inflight >= self.max_inflight {
            Counters::inc(&shared.counters.ticks_shed);
            return;
        }
        self.inflight += 1;
        self.busy.insert(key.clone());
        Counters::inc(&shared.counters.ticks_run);
        let done = DoneGuard(Some((self.tx.clone(), key)));
        let results = self.results.clone();
        let id = s.id.clone();
        let timeout = s.timeout().unwrap_or(shared.cfg.task_timeout);
        shared.submit_task(
            workload,
            s.task(),
            CommandClass::Write,
            timeout,
            move |mut r| {
                r.schedule_id = Some(id.to_string());
                r.tick = Some(tick);
                r.caught_up = caught_up;
                results.publish(&id, &r);
                drop(done);
                async {}.boxed()
            },
        );
    }
}

/// How long a new owner waits before reading the last result of a workload
/// it took over (`missed: run-once`): results are stored asynchronously.
const RESULT_SETTLE: Duration = Duration::from_secs(2);

/// How late a run may start and still run: half the interval up to a
/// minute (a minute for cron).
fn slack(s: &Schedule) -> Duration {
    match s.period() {
        Some(p) => (p / 2).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        None => Duration::from_secs(60),
    }
}

/// Tells the scheduler a run ended — also when it never ran (the task was
/// dropped because the node no longer owns the workload).
struct DoneGuard(Option<(mpsc::UnboundedSender<Msg>, Key)>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some((tx, (s, w))) = self.0.take() {
            let _ = tx.send(Msg::Done(s, w));
        }
    }
}
