//! Schedules on the embedded (in-memory) backend, on a paused tokio clock:
//! ticks fire at their times with splay, a busy device skips, edits and
//! deletes take effect, bad schedules are refused, results are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ottomato::node::scheduler::ScheduleClock;
use ottomato::results::ResultQuery;
use ottomato::schedule::{Overlap, Schedule, ScheduleSpec};
use ottomato::{
    ConfigError, Kind, Node, NodeError, Status, Task, TaskError, Workload, WorkloadError,
    WorkloadSpec,
};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Records every task run: (workload, command, when on tokio's clock).
#[derive(Default)]
struct Log(Mutex<Vec<(String, String, Instant)>>);

struct RecKind(Arc<Log>);
struct Rec {
    id: String,
    log: Arc<Log>,
}

impl Kind for RecKind {
    fn name(&self) -> &str {
        "rec"
    }
    fn create(&self, id: &str, _: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        Ok(Arc::new(Rec {
            id: id.into(),
            log: self.0.clone(),
        }))
    }
}

#[async_trait]
impl Workload for Rec {
    async fn init(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
    async fn run_task(&self, task: &Task) -> Result<Value, TaskError> {
        self.log
            .0
            .lock()
            .unwrap()
            .push((self.id.clone(), task.command.clone(), Instant::now()));
        if let Some(ms) = task.kwargs.get("ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(json!(task.command))
    }
    async fn stop(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
}

/// A node on a paused clock with `n` recording workloads, and the wall
/// time its schedules start from (with the tokio instant it maps to).
async fn node(n: usize) -> (Node, Arc<Log>, SystemTime, Instant) {
    let log = Arc::new(Log::default());
    let (wall, at) = (SystemTime::now(), Instant::now());
    let node = Node::builder()
        .kind(RecKind(log.clone()))
        // The node's wall clock from the same origin as the due times
        // below (starting it takes real time on a busy machine).
        .schedule_clock(ScheduleClock::TokioFrom { wall, at })
        .start()
        .await
        .unwrap();
    for i in 0..n {
        let mut spec = WorkloadSpec::new(format!("d{i}"), "rec");
        spec.labels = BTreeMap::from([("site".into(), if i % 2 == 0 { "a" } else { "b" }.into())]);
        node.add_workload(spec).await.unwrap();
    }
    for i in 0..n {
        node.wait_for_status(&format!("d{i}"), Status::Running, Duration::from_secs(30))
            .await
            .unwrap();
    }
    (node, log, wall, at)
}

/// The tokio instant of wall time `t` on a node started at (`wall`, `at`).
fn instant(wall: SystemTime, at: Instant, t: SystemTime) -> Instant {
    at + t.duration_since(wall).unwrap()
}

fn runs(log: &Log, command: &str) -> Vec<(String, Instant)> {
    log.0
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, c, _)| c == command)
        .map(|(w, _, t)| (w.clone(), *t))
        .collect()
}

/// Advances the paused clock by `d` (timers fire on the way).
async fn advance(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn interval_ticks_fire_at_their_times_spread_over_the_splay() {
    let (node, log, wall, at) = node(40).await;
    let mut spec = ScheduleSpec::every("poll", "10s");
    spec.splay = Some("10s".into());
    spec.labels = BTreeMap::from([("site".into(), "a".into())]);
    node.put_schedule("meters", &spec).await.unwrap();
    let s = Schedule::parse("meters", spec).unwrap();
    advance(Duration::from_secs(45)).await;
    let got = runs(&log, "poll");
    // Only site a (20 workloads), each at every tick + its own offset.
    let ids: BTreeSet<&str> = got.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(ids.len(), 20, "{ids:?}");
    assert!(ids
        .iter()
        .all(|w| w[1..].parse::<usize>().unwrap() % 2 == 0));
    let end = wall + Duration::from_secs(45);
    let mut offsets = Vec::new();
    for w in &ids {
        let mut mine: Vec<Instant> = got
            .iter()
            .filter(|(x, _)| x == w)
            .map(|(_, t)| *t)
            .collect();
        // Every run due between the schedule's start and now, on time.
        let mut want = Vec::new();
        let mut t = wall;
        while let Some((_, fire)) = s.next_run(w, t) {
            if fire > end {
                break;
            }
            want.push(instant(wall, at, fire));
            t = fire;
        }
        // A tick due before the node can have had the schedule (within
        // 100 ms of adding it) may go unrun: a node runs the ticks due
        // after it learns of a schedule (seen: one due 0.4 ms after).
        let learned = instant(wall, at, wall + Duration::from_millis(100));
        if want.first().is_some_and(|f| *f < learned) {
            want.remove(0);
            // (and its run, if it had one: 10 s before the next)
            mine.retain(|m| {
                want.first()
                    .is_none_or(|f| *m + Duration::from_secs(5) > *f)
            });
        }
        assert!(want.len() >= 4, "{w}: {want:?}");
        assert_eq!(mine.len(), want.len(), "{w}: runs {mine:?}, due {want:?}");
        for (m, w2) in mine.iter().zip(&want) {
            let drift = if m > w2 { *m - *w2 } else { *w2 - *m };
            assert!(drift < Duration::from_millis(150), "{w}: ran {drift:?} off");
        }
        offsets.push(s.offset(w));
    }
    // The splay spreads them: offsets cover most of the window.
    let (lo, hi) = (offsets.iter().min().unwrap(), offsets.iter().max().unwrap());
    assert!(*hi - *lo > Duration::from_secs(6), "{offsets:?}");

    // The results carry the schedule and the tick, one per tick.
    assert!(node.flush_results(Duration::from_secs(5)).await);
    let results = node
        .results(&ResultQuery {
            source: Some("meters".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(results.len(), got.len());
    let mut ticks = BTreeSet::new();
    for r in &results {
        assert_eq!(r.result.schedule_id.as_deref(), Some("meters"));
        let tick = r.result.tick.expect("a tick");
        assert_eq!(Some(tick), s.tick_at_or_before(tick));
        assert!(
            ticks.insert((r.workload.clone(), tick)),
            "tick twice: {r:?}"
        );
    }
    assert_eq!(node.counters().ticks_run as usize, got.len());
}

#[tokio::test(start_paused = true)]
async fn cron_ticks_fire_on_the_expression() {
    let (node, log, wall, at) = node(3).await;
    let spec = ScheduleSpec {
        every: None,
        cron: Some("*/15 * * * * *".into()),
        tz: Some("Europe/Oslo".into()),
        splay: Some("5s".into()),
        ..ScheduleSpec::every("read", "1s")
    };
    let put_at = wall + Instant::now().duration_since(at);
    node.put_schedule("quarter", &spec).await.unwrap();
    let s = Schedule::parse("quarter", spec).unwrap();
    advance(Duration::from_secs(46)).await;
    let end = wall + Instant::now().duration_since(at);
    let got = runs(&log, "read");
    for w in ["d0", "d1", "d2"] {
        // Every run due on the cron expression (+ the workload's offset
        // in the 5 s splay) between the put and now, on time.
        let mut due = Vec::new();
        let mut t = put_at;
        let mut last_fire = put_at;
        while let Some((tick, fire)) = s.next_run(w, t) {
            if fire > end {
                break;
            }
            let secs = tick
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert_eq!(secs % 15, 0, "{w}");
            due.push(instant(wall, at, fire));
            (t, last_fire) = (fire, fire);
        }
        let mine: Vec<Instant> = got
            .iter()
            .filter(|(x, _)| x == w)
            .map(|(_, t)| *t)
            .collect();
        // A run due in the last 200 ms may not have happened yet (the
        // ticks are on the wall clock, so where they fall in the window
        // changes from run to run); if it did, it is checked like the rest.
        if mine.len() + 1 == due.len() && last_fire > end - Duration::from_millis(200) {
            due.pop();
        }
        assert!(due.len() >= 2, "{w}: {due:?}");
        assert_eq!(mine.len(), due.len(), "{w}: ran {mine:?}, due {due:?}");
        for (m, d) in mine.iter().zip(&due) {
            let drift = if m > d { *m - *d } else { *d - *m };
            assert!(drift < Duration::from_millis(250), "{w}: ran {drift:?} off");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_busy_device_skips_the_tick_and_the_skip_is_counted() {
    let (node, log, _, _) = node(1).await;
    let mut spec = ScheduleSpec::every("slow", "10s");
    spec.kwargs.insert("ms".into(), json!(15_000));
    spec.timeout_ms = Some(60_000);
    node.put_schedule("slow", &spec).await.unwrap();
    advance(Duration::from_secs(61)).await;
    let n = runs(&log, "slow").len();
    let c = node.counters();
    // Each 15 s run covers the next tick: every other tick runs.
    assert!((3..=4).contains(&n), "{n} runs");
    assert!(c.ticks_skipped >= 2, "{c:?}");
    assert_eq!(c.ticks_run as usize, n);

    // With overlap: queue, the device gets every tick, one after the other.
    let (node, log, _, _) = node_q().await;
    spec.overlap = Overlap::Queue;
    node.put_schedule("slow", &spec).await.unwrap();
    advance(Duration::from_secs(61)).await;
    let c = node.counters();
    assert_eq!(c.ticks_skipped, 0, "{c:?}");
    assert!(runs(&log, "slow").len() >= 4);
}

async fn node_q() -> (Node, Arc<Log>, SystemTime, Instant) {
    node(1).await
}

#[tokio::test(start_paused = true)]
async fn edits_and_deletes_take_effect_and_bad_schedules_are_refused() {
    let (node, log, _, _) = node(4).await;
    node.put_schedule("s", &ScheduleSpec::every("one", "5s"))
        .await
        .unwrap();
    advance(Duration::from_secs(11)).await;
    assert!(runs(&log, "one").len() >= 8);
    // Edited: the new command from the next tick on, the old one no more.
    node.put_schedule("s", &ScheduleSpec::every("two", "5s"))
        .await
        .unwrap();
    advance(Duration::from_millis(200)).await;
    let ones = runs(&log, "one").len();
    advance(Duration::from_secs(11)).await;
    assert_eq!(runs(&log, "one").len(), ones);
    assert!(runs(&log, "two").len() >= 8);
    // Paused, then deleted: nothing more runs.
    let mut paused = ScheduleSpec::every("two", "5s");
    paused.enabled = false;
    node.put_schedule("s", &paused).await.unwrap();
    advance(Duration::from_millis(200)).await;
    let twos = runs(&log, "two").len();
    advance(Duration::from_secs(11)).await;
    assert_eq!(runs(&log, "two").len(), twos);
    node.put_schedule("s", &ScheduleSpec::every("two", "5s"))
        .await
        .unwrap();
    advance(Duration::from_secs(6)).await;
    assert!(runs(&log, "two").len() > twos, "resumed");
    node.delete_schedule("s").await.unwrap();
    advance(Duration::from_millis(200)).await;
    let twos = runs(&log, "two").len();
    advance(Duration::from_secs(11)).await;
    assert_eq!(runs(&log, "two").len(), twos);
    // A workload added later is picked up by a schedule selecting it.
    node.put_schedule("late", &ScheduleSpec::every("three", "5s"))
        .await
        .unwrap();
    node.add_workload(WorkloadSpec::new("d9", "rec"))
        .await
        .unwrap();
    advance(Duration::from_secs(11)).await;
    assert!(runs(&log, "three").iter().any(|(w, _)| w == "d9"));

    for (spec, want) in [
        (
            ScheduleSpec {
                every: Some("soon".into()),
                ..ScheduleSpec::every("x", "1s")
            },
            "every: \"soon\"",
        ),
        (
            ScheduleSpec {
                every: None,
                cron: Some("99 * * * *".into()),
                ..ScheduleSpec::every("x", "1s")
            },
            "cron",
        ),
        (
            ScheduleSpec {
                every: None,
                ..ScheduleSpec::every("x", "1s")
            },
            "give every",
        ),
    ] {
        match node.put_schedule("bad", &spec).await {
            Err(NodeError::InvalidSchedule(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("{spec:?}: {other:?}"),
        }
    }
    assert!(node
        .schedules()
        .await
        .unwrap()
        .iter()
        .all(|(id, _)| id != "bad"));
}

#[tokio::test]
async fn an_ad_hoc_task_keeps_its_result_when_asked() {
    use ottomato::transport::{MemoryTransport, Message, Transport};
    let transport = Arc::new(MemoryTransport::new());
    let node = Node::builder()
        .kind(ottomato::actors::sim::SimKind)
        .transport(transport.clone())
        .start()
        .await
        .unwrap();
    node.add_workload(WorkloadSpec::new("k1", "sim"))
        .await
        .unwrap();
    node.wait_for_status("k1", Status::Running, Duration::from_secs(30))
        .await
        .unwrap();
    for body in [
        r#"{"command":"hello"}"#,
        r#"{"command":"echo","args":[5],"keepResult":true}"#,
    ] {
        let reply = transport
            .request(
                "otto.task.read.k1",
                Message::new(body.as_bytes().to_vec()),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(v["success"], true, "{v}");
    }
    assert!(node.flush_results(Duration::from_secs(5)).await);
    let kept = node.results(&ResultQuery::default()).await.unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        (kept[0].workload.as_str(), kept[0].source.as_str()),
        ("k1", "_task")
    );
    assert_eq!(kept[0].result.ret, json!({"args": [5], "kwargs": {}}));
    assert_eq!(kept[0].result.schedule_id, None);
}

#[tokio::test(start_paused = true)]
async fn a_workload_that_comes_back_runs_its_missed_tick_once_with_run_once() {
    use ottomato::schedule::Missed;
    let (node, log, wall, _) = node(2).await;
    // Start half a second after a 10 s boundary of the node's clock.
    let into = wall
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 10_000;
    advance(Duration::from_millis((10_500 - into as u64) % 10_000)).await;
    let mut spec = ScheduleSpec::every("m", "10s");
    spec.missed = Missed::RunOnce;
    spec.select = Some("d0".into());
    node.put_schedule("once", &spec).await.unwrap();
    let mut skip = ScheduleSpec::every("k", "10s");
    skip.select = Some("d0".into());
    node.put_schedule("skip", &skip).await.unwrap();
    advance(Duration::from_secs(21)).await;
    assert_eq!(runs(&log, "m").len(), 2);
    assert!(node.flush_results(Duration::from_secs(5)).await);
    // Away for three ticks (as if on a node that died), then back.
    node.delete_workload("d0").unwrap();
    advance(Duration::from_secs(35)).await;
    node.add_workload(WorkloadSpec::new("d0", "rec"))
        .await
        .unwrap();
    advance(Duration::from_secs(3)).await;
    // run-once: the last due tick ran at once; skip: nothing until the next.
    assert_eq!(runs(&log, "m").len(), 3, "{:?}", runs(&log, "m"));
    assert_eq!(runs(&log, "k").len(), 2);
    assert_eq!(node.counters().ticks_caught_up, 1);
    assert!(node.flush_results(Duration::from_secs(5)).await);
    let last = node
        .results(&ResultQuery {
            source: Some("once".into()),
            last: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(last[0].result.caught_up, "{last:?}");
}
