//! Core engine behaviour, on the embedded in-memory backend. Timer behaviour
//! runs on tokio's paused clock: no real waiting, no fixed sleeps.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ottomato::actors::sim::SimKind;
use ottomato::events::EventReceiver;
use ottomato::store::{MemoryStore, StateStore};
use ottomato::transport::{MemoryTransport, Message, Transport, TransportError};
use ottomato::{
    CommandClass, ConfigError, ErrorCode, Event, Kind, Node, NodeConfig, NodeError, RestartPolicy,
    Status, Task, TaskError, Workload, WorkloadError, WorkloadSpec,
};
use serde_json::{json, Value};
use tokio::time::Instant;

/// A device kind that records what the engine does to it.
#[derive(Default)]
struct Probe {
    init_calls: AtomicU32,
    pings: Mutex<Vec<(String, Instant)>>,
}

struct ProbeKind(Arc<Probe>);

struct ProbeDevice {
    id: String,
    probe: Arc<Probe>,
    /// The first this-many init attempts hang forever.
    hang_inits: u32,
}

impl Kind for ProbeKind {
    fn name(&self) -> &str {
        "probe"
    }
    fn create(&self, id: &str, config: &Value) -> Result<Arc<dyn Workload>, ConfigError> {
        Ok(Arc::new(ProbeDevice {
            id: id.to_string(),
            probe: self.0.clone(),
            hang_inits: config["hang_inits"].as_u64().unwrap_or(0) as u32,
        }))
    }
}

#[async_trait]
impl Workload for ProbeDevice {
    async fn init(&self) -> Result<(), WorkloadError> {
        let n = self.probe.init_calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= self.hang_inits {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn ping(&self) -> Result<(), WorkloadError> {
        self.probe
            .pings
            .lock()
            .unwrap()
            .push((self.id.clone(), Instant::now()));
        Ok(())
    }
    async fn run_task(&self, _task: &Task) -> Result<Value, TaskError> {
        Ok(Value::Null)
    }
    async fn stop(&self) -> Result<(), WorkloadError> {
        Ok(())
    }
}

async fn node_with(cfg: NodeConfig) -> Node {
    Node::builder()
        .config(cfg)
        .kind(SimKind)
        .start()
        .await
        .expect("node starts")
}

async fn sim_node() -> Node {
    node_with(NodeConfig::default()).await
}

fn sim(id: &str) -> WorkloadSpec {
    WorkloadSpec::new(id, "sim")
}

/// Waits (to a deadline) for the first event matching `pred`.
async fn wait_event(rx: &mut EventReceiver, secs: u64, pred: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if pred(&e) => return e,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => panic!("no matching event within {secs} s"),
        }
    }
}

/// Polls `node` (to a deadline) until workload `id` has `status`.
async fn wait_status(node: &Node, id: &str, status: Status) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if node.workload(id).map(|w| w.status) == Some(status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {status}: {:?}",
            node.workload(id)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn add_run_delete_and_result_fields() {
    let node = sim_node().await;
    let mut ev = node.subscribe();
    node.add_workload(sim("r1").with_label("site", "oslo"))
        .await
        .unwrap();
    wait_event(
        &mut ev,
        5,
        |e| matches!(e, Event::Initialized { workload } if &**workload == "r1"),
    )
    .await;
    assert_eq!(node.workload("r1").unwrap().status, Status::Running);

    let r = node
        .run_task("r1", Task::new("echo").arg("a").kwarg("k", 1))
        .await;
    assert!(r.success, "{r:?}");
    assert_eq!(r.ret, json!({"args": ["a"], "kwargs": {"k": 1}}));
    assert_eq!((r.workload.as_str(), r.command.as_str()), ("r1", "echo"));
    assert_eq!(r.worker_id, node.id());
    assert_eq!(r.tags.get("site").map(String::as_str), Some("oslo"));
    assert_eq!((r.error, r.error_code), (None, None));
    let v = serde_json::to_value(node.run_task("r1", Task::new("fail")).await).unwrap();
    assert_eq!(
        (v["success"].clone(), v["errorCode"].clone()),
        (json!(false), json!("task_failed"))
    );
    assert_eq!(v["return"], Value::Null);
    assert!(v["jobId"].as_str().is_some_and(|s| s.len() == 36));

    let unknown = node.run_task("r1", Task::new("frobnicate")).await;
    assert_eq!(unknown.error_code, Some(ErrorCode::UnknownCommand));
    let missing = node.run_task("nope", Task::new("echo")).await;
    assert_eq!(missing.error_code, Some(ErrorCode::NotFound));

    node.delete_workload("r1").unwrap();
    wait_event(&mut ev, 15, |e| matches!(e, Event::Deleted { .. })).await;
    assert!(node.workload("r1").is_none());
    assert_eq!(
        node.delete_workload("r1"),
        Err(NodeError::NotFound("r1".into()))
    );
}

#[tokio::test]
async fn duplicate_invalid_id_unknown_kind_and_bad_config_are_refused() {
    let node = sim_node().await;
    node.add_workload(sim("a")).await.unwrap();
    assert_eq!(
        node.add_workload(sim("a")).await,
        Err(NodeError::AlreadyExists("a".into()))
    );
    assert!(
        matches!(node.add_workload(sim("a.b")).await, Err(NodeError::InvalidId(m)) if m.contains("'.'"))
    );
    let e = node
        .add_workload(WorkloadSpec::new("b", "plc9000"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NodeError::UnknownKind { kind, known } if kind == "plc9000" && known == "sim")
    );
    assert_eq!(
        e.to_string(),
        "unknown kind \"plc9000\" (this node runs: sim)"
    );
    let e = node
        .add_workload(sim("c").with_config(json!({"ping_fail_rate": 7})))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("ping_fail_rate must be between 0 and 1"),
        "{e}"
    );
    // Nothing of the refused specs stays, and the node still serves.
    assert_eq!(node.len(), 1);
    wait_status(&node, "a", Status::Running).await;
    assert!(node.run_task("a", Task::new("echo")).await.success);
}

#[tokio::test(start_paused = true)]
async fn panicking_task_answers_and_restarts_with_backoff_then_gives_up() {
    let cfg = NodeConfig {
        restart: RestartPolicy {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_restarts: 3,
            window: Duration::from_secs(60),
        },
        ..Default::default()
    };
    let node = node_with(cfg).await;
    let mut ev = node.subscribe();
    node.add_workload(sim("bad")).await.unwrap();
    node.add_workload(sim("good")).await.unwrap();
    wait_status(&node, "bad", Status::Running).await;
    wait_status(&node, "good", Status::Running).await;

    let mut delays = vec![];
    for restart in 1..=3u32 {
        let r = node.run_task("bad", Task::new("panic")).await;
        assert_eq!(r.error_code, Some(ErrorCode::Panicked), "{r:?}");
        assert!(r.error.unwrap().contains("simulated panic"));
        let panicked_at = Instant::now();
        let e = wait_event(&mut ev, 60, |e| matches!(e, Event::Restarted { .. })).await;
        assert!(
            matches!(e, Event::Restarted { restarts, ref cause, .. } if restarts == restart && cause.contains("panic"))
        );
        delays.push(panicked_at.elapsed());
        wait_status(&node, "bad", Status::Running).await;
        // The healthy neighbour never noticed.
        assert!(node.run_task("good", Task::new("echo")).await.success);
    }
    // Exponential backoff: 100 ms, 200 ms, 400 ms (paused clock: exact to the ms).
    let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
    assert!(ms[0] >= 100 && ms[1] >= 200 && ms[2] >= 400, "{ms:?}");
    assert!(ms[0] < 200 && ms[1] < 400 && ms[2] < 800, "{ms:?}");

    // The fourth failure within the window exceeds max_restarts: failed, with the reason.
    let _ = node.run_task("bad", Task::new("panic")).await;
    let e = wait_event(&mut ev, 60, |e| matches!(e, Event::Failed { .. })).await;
    assert!(
        matches!(e, Event::Failed { ref reason, .. } if reason.contains("gave up after 3 restarts"))
    );
    let info = node.workload("bad").unwrap();
    assert_eq!(info.status, Status::Failed);
    assert_eq!(info.restarts, 3);
    assert!(info.reason.unwrap().contains("simulated panic"));
    let r = node.run_task("bad", Task::new("echo")).await;
    assert_eq!(r.error_code, Some(ErrorCode::Unavailable));
    let good = node.workload("good").unwrap();
    assert_eq!((good.status, good.restarts), (Status::Running, 0));
    // A failed workload can still be deleted.
    node.delete_workload("bad").unwrap();
    wait_event(&mut ev, 5, |e| matches!(e, Event::Deleted { .. })).await;
}

#[tokio::test(start_paused = true)]
async fn init_timeout_is_retried_with_growing_backoff() {
    let probe = Arc::new(Probe::default());
    let node = Node::builder()
        .kind(ProbeKind(probe.clone()))
        .init_timeout(Duration::from_secs(25))
        .start()
        .await
        .unwrap();
    let mut ev = node.subscribe();
    let t0 = Instant::now();
    node.add_workload(WorkloadSpec::new("slow", "probe").with_config(json!({"hang_inits": 2})))
        .await
        .unwrap();
    // add_workload returned without waiting for init.
    assert_eq!(node.workload("slow").unwrap().status, Status::Initializing);
    let first = wait_event(&mut ev, 120, |e| matches!(e, Event::InitError { .. })).await;
    assert_eq!(t0.elapsed().as_secs(), 25, "init timeout");
    assert!(
        matches!(first, Event::InitError { attempt: 1, ref error, retry_in_ms: 1000, .. } if error.contains("timed out"))
    );
    let info = node.workload("slow").unwrap();
    assert_eq!(info.status, Status::Initializing);
    assert!(info.reason.unwrap().contains("init attempt 1 failed"));
    let second = wait_event(&mut ev, 120, |e| matches!(e, Event::InitError { .. })).await;
    assert!(matches!(
        second,
        Event::InitError {
            attempt: 2,
            retry_in_ms: 2000,
            ..
        }
    ));
    wait_event(&mut ev, 120, |e| matches!(e, Event::Initialized { .. })).await;
    // 25 s + 1 s + 25 s + 2 s, then the third attempt succeeds at once.
    assert_eq!(t0.elapsed().as_secs(), 53);
    assert_eq!(probe.init_calls.load(Ordering::SeqCst), 3);
    assert_eq!(node.workload("slow").unwrap().status, Status::Running);
}

#[tokio::test(start_paused = true)]
async fn pings_are_splayed_so_no_two_of_1000_fire_at_once() {
    let probe = Arc::new(Probe::default());
    let node = Node::builder()
        .kind(ProbeKind(probe.clone()))
        .start()
        .await
        .unwrap();
    let t0 = Instant::now();
    for i in 0..1000 {
        node.add_workload(WorkloadSpec::new(format!("p{i}"), "probe"))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.pings.lock().unwrap().len() < 1000 {
        assert!(Instant::now() < deadline, "not all workloads pinged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pings = probe.pings.lock().unwrap().clone();
    let mut times: Vec<Instant> = pings.iter().take(1000).map(|(_, t)| *t).collect();
    times.sort();
    times.dedup();
    assert_eq!(times.len(), 1000, "two pings fired at the same instant");
    for t in &times {
        let after = t.duration_since(t0);
        assert!(
            after >= Duration::from_secs(8) && after <= Duration::from_millis(10_050),
            "{after:?}"
        );
    }
    let jobs = node.scheduled();
    assert_eq!(jobs.len(), 1000);
    assert!(jobs.iter().all(|j| j.next_run.is_some()));
}

#[tokio::test(start_paused = true)]
async fn ping_down_makes_dead_then_recovers_by_itself() {
    let node = sim_node().await;
    let mut ev = node.subscribe();
    node.add_workload(sim("flappy")).await.unwrap();
    wait_status(&node, "flappy", Status::Running).await;
    assert!(
        node.run_task("flappy", Task::new("set").kwarg("ping_fail_rate", 1.0))
            .await
            .success
    );
    let e = wait_event(&mut ev, 60, |e| {
        !matches!(e, Event::Added { .. } | Event::Initialized { .. })
    })
    .await;
    assert!(matches!(e, Event::Unreachable { failures: 1, .. }), "{e:?}");
    assert_eq!(node.workload("flappy").unwrap().status, Status::Unreachable);
    let e = wait_event(&mut ev, 60, |_| true).await;
    assert!(matches!(e, Event::Dead { failures: 2, .. }), "{e:?}");
    assert_eq!(node.workload("flappy").unwrap().status, Status::Dead);
    // Dead workloads are still checked (less often) and still take tasks.
    assert!(
        node.run_task("flappy", Task::new("set").kwarg("ping_fail_rate", 0.0))
            .await
            .success
    );
    let dead_at = Instant::now();
    let e = wait_event(&mut ev, 120, |_| true).await;
    assert!(matches!(e, Event::Reachable { .. }), "{e:?}");
    assert!(dead_at.elapsed() >= Duration::from_secs(8));
    let info = node.workload("flappy").unwrap();
    assert_eq!((info.status, info.reason), (Status::Running, None));
    assert!(info.last_ping.is_some());
}

#[tokio::test(start_paused = true)]
async fn remove_dead_option_deletes_dead_workloads() {
    let node = node_with(NodeConfig {
        remove_dead: true,
        ..Default::default()
    })
    .await;
    let mut ev = node.subscribe();
    node.add_workload(sim("gone").with_config(json!({"ping_fail_rate": 1.0})))
        .await
        .unwrap();
    node.add_workload(sim("fine")).await.unwrap();
    wait_event(&mut ev, 60, |e| matches!(e, Event::Dead { .. })).await;
    let e = wait_event(&mut ev, 60, |e| matches!(e, Event::Deleted { .. })).await;
    assert_eq!(e.workload(), "gone");
    assert!(node.workload("gone").is_none());
    assert_eq!(node.workload("fine").unwrap().status, Status::Running);
}

#[tokio::test(start_paused = true)]
async fn full_queue_answers_busy_at_once_and_deadlines_hold() {
    let node = node_with(NodeConfig {
        queue_capacity: 2,
        ..Default::default()
    })
    .await;
    node.add_workload(sim("q")).await.unwrap();
    wait_status(&node, "q", Status::Running).await;
    let long = || Task::new("sleep").kwarg("ms", 5_000);
    let mut pending = vec![];
    for _ in 0..3 {
        let n = node.clone();
        pending.push(tokio::spawn(async move { n.run_task("q", long()).await }));
        tokio::task::yield_now().await;
    }
    // Let the three reach the actor: one running, two queued.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let t = Instant::now();
    let busy = node.run_task("q", long()).await;
    assert_eq!(busy.error_code, Some(ErrorCode::Busy), "{busy:?}");
    assert_eq!(t.elapsed(), Duration::ZERO, "busy must answer at once");
    for p in pending {
        assert!(p.await.unwrap().success);
    }
    // A deadline shorter than the work: deadline_exceeded, and the workload carries on.
    let t = Instant::now();
    let late = node
        .run_task_with_timeout(
            "q",
            Task::new("sleep").kwarg("ms", 60_000),
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(
        late.error_code,
        Some(ErrorCode::DeadlineExceeded),
        "{late:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(node.run_task("q", Task::new("echo")).await.success);
}

#[tokio::test(start_paused = true)]
async fn slow_stop_never_blocks_the_caller_or_other_workloads() {
    let node = sim_node().await;
    let mut ev = node.subscribe();
    node.add_workload(sim("stuck").with_config(json!({"stop_ms": 3_600_000})))
        .await
        .unwrap();
    node.add_workload(sim("other")).await.unwrap();
    wait_status(&node, "stuck", Status::Running).await;
    wait_status(&node, "other", Status::Running).await;
    let t = Instant::now();
    node.delete_workload("stuck").unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(
        node.workload("stuck").map(|w| w.status),
        Some(Status::Stopping)
    );
    assert_eq!(
        node.run_task("stuck", Task::new("echo")).await.error_code,
        Some(ErrorCode::Unavailable)
    );
    assert!(node.run_task("other", Task::new("echo")).await.success);
    let e = wait_event(&mut ev, 60, |e| matches!(e, Event::StopError { .. })).await;
    assert!(matches!(e, Event::StopError { ref error, .. } if error.contains("timed out")));
    assert_eq!(t.elapsed().as_secs(), 10, "stop timeout");
    wait_event(&mut ev, 5, |e| matches!(e, Event::Deleted { .. })).await;
    assert!(node.workload("stuck").is_none());
    // Deleting again while stopping would have been refused; now it is simply gone.
    assert_eq!(node.workload("other").unwrap().status, Status::Running);
}

#[tokio::test]
async fn events_reach_fast_subscribers_and_callbacks_despite_a_slow_one() {
    let seen = Arc::new(AtomicU32::new(0));
    let seen2 = seen.clone();
    let node = Node::builder()
        .config(NodeConfig {
            event_capacity: 16,
            ..Default::default()
        })
        .kind(SimKind)
        .on_event(move |e| {
            if matches!(e, Event::Initialized { .. }) {
                seen2.fetch_add(1, Ordering::SeqCst);
            }
        })
        .start()
        .await
        .unwrap();
    let mut slow = node.subscribe(); // never read until the end
    let mut fast = node.subscribe();
    let reader = tokio::spawn(async move {
        let mut initialized = 0;
        while initialized < 200 {
            match fast.recv().await {
                Ok(Event::Initialized { .. }) => initialized += 1,
                Ok(_) => {}
                Err(e) => panic!("fast subscriber: {e}"),
            }
        }
    });
    for i in 0..200 {
        node.add_workload(sim(&format!("e{i}"))).await.unwrap();
        tokio::task::yield_now().await;
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("fast subscriber got every event")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.load(Ordering::SeqCst) < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "callback missed events"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The slow subscriber lagged instead of blocking anyone.
    assert!(matches!(
        slow.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_))
    ));
}

/// A node serving on an in-memory transport, with one running sim workload.
async fn node_on_a_transport(id: &str) -> (Arc<MemoryTransport>, Node) {
    let transport = Arc::new(MemoryTransport::new());
    let node = Node::builder()
        .kind(SimKind)
        .transport(transport.clone())
        .start()
        .await
        .unwrap();
    node.add_workload(sim(id)).await.unwrap();
    wait_status(&node, id, Status::Running).await;
    (transport, node)
}

#[tokio::test]
async fn tasks_over_the_transport_speak_json_and_refuse_bad_input() {
    let (transport, node) = node_on_a_transport("t1").await;
    let ask = |subject: &str, body: &[u8]| {
        let t = transport.clone();
        let subject = subject.to_string();
        let body = Bytes::copy_from_slice(body);
        async move {
            let reply = t
                .request(&subject, Message::new(body), Duration::from_secs(5))
                .await?;
            Ok::<Value, TransportError>(serde_json::from_slice(&reply.payload).unwrap())
        }
    };
    let ok = ask(
        "otto.task.write.t1",
        br#"{"command":"echo","args":[1],"kwargs":{"x":true}}"#,
    )
    .await
    .unwrap();
    assert_eq!(ok["success"], true);
    assert_eq!(ok["return"], json!({"args": [1], "kwargs": {"x": true}}));
    let bad = ask("otto.task.write.t1", b"{not json").await.unwrap();
    assert_eq!(
        (bad["success"].clone(), bad["errorCode"].clone()),
        (json!(false), json!("malformed_request"))
    );
    let big = vec![b' '; 2 * 1024 * 1024];
    let too_big = ask("otto.task.write.t1", &big).await.unwrap();
    assert_eq!(too_big["errorCode"], "payload_too_large");
    let deadline = ask(
        "otto.task.write.t1",
        br#"{"command":"sleep","kwargs":{"ms":5000},"timeoutMs":50}"#,
    )
    .await
    .unwrap();
    assert_eq!(deadline["errorCode"], "deadline_exceeded");
    assert_eq!(
        ask("otto.task.write.nobody", br#"{"command":"echo"}"#).await,
        Err(TransportError::NoResponders(
            "otto.task.write.nobody".into()
        ))
    );
    // Command classes: the read subject runs reads and refuses writes
    // before they reach the device; the write subject runs both.
    let read = ask("otto.task.read.t1", br#"{"command":"echo","args":[2]}"#)
        .await
        .unwrap();
    assert_eq!(read["success"], true, "{read}");
    let set = br#"{"command":"set","kwargs":{"ping_ms":7}}"#;
    let smuggled = ask("otto.task.read.t1", set).await.unwrap();
    assert_eq!(smuggled["errorCode"], "forbidden", "{smuggled}");
    assert!(
        smuggled["error"]
            .as_str()
            .unwrap()
            .contains("write subject"),
        "{smuggled}"
    );
    let info = node.run_task("t1", Task::new("info")).await;
    assert_ne!(
        info.ret["ping_ms"],
        json!(7),
        "a forbidden set changed the device"
    );
    let unknown = ask("otto.task.read.t1", br#"{"command":"frobnicate"}"#)
        .await
        .unwrap();
    assert_eq!(
        unknown["errorCode"], "forbidden",
        "unknown commands count as writes"
    );
    let written = ask("otto.task.write.t1", set).await.unwrap();
    assert_eq!(written["success"], true, "{written}");
    let bogus = ask("otto.task.admin.t1", br#"{"command":"echo"}"#)
        .await
        .unwrap();
    assert_eq!(bogus["errorCode"], "malformed_request", "{bogus}");
    assert!(
        bogus["error"].as_str().unwrap().contains("\"admin\""),
        "{bogus}"
    );
    // The same split through the library API.
    let api = node
        .run_task_as(
            "t1",
            Task::new("set"),
            CommandClass::Read,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(api.error_code, Some(ErrorCode::Forbidden));
    // Deleting the workload stops serving its subject.
    node.delete_workload("t1").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ask("otto.task.write.t1", br#"{"command":"echo"}"#).await {
            Err(TransportError::NoResponders(_)) => break,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "still served after delete"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_queued_transport_task_is_answered_at_its_own_deadline() {
    let (transport, node) = node_on_a_transport("q1").await;
    let ask = |body: &'static [u8]| {
        let t = transport.clone();
        async move {
            let reply = t
                .request(
                    "otto.task.write.q1",
                    Message::new(Bytes::from_static(body)),
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&reply.payload).unwrap()
        }
    };
    // One task at a time per workload: a 2 s task holds it...
    let long = tokio::spawn(ask(
        br#"{"command":"sleep","kwargs":{"ms":2000},"timeoutMs":5000}"#,
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // ...so this one waits in the queue, and must hear back at its own
    // 100 ms deadline, not when the long one is done.
    let t0 = tokio::time::Instant::now();
    let queued = ask(br#"{"command":"echo","timeoutMs":100}"#).await;
    let waited = t0.elapsed();
    assert_eq!(queued["errorCode"], "deadline_exceeded", "{queued}");
    assert!(
        waited < Duration::from_millis(500),
        "answered after {waited:?}"
    );
    assert_eq!(long.await.unwrap()["success"], true);
    node.stop().await;
}

#[tokio::test]
async fn status_is_mirrored_to_the_state_store_and_a_lost_claim_fences() {
    let store = Arc::new(MemoryStore::new());
    let node = Node::builder()
        .node_id("n1")
        .kind(SimKind)
        .state_store(store.clone())
        .start()
        .await
        .unwrap();
    let bucket = store
        .bucket(&ottomato::store::BucketSpec::new("otto_state"))
        .await
        .unwrap();
    node.add_workload(sim("s1")).await.unwrap();
    node.add_workload(sim("s2")).await.unwrap();
    wait_status(&node, "s1", Status::Running).await;
    wait_status(&node, "s2", Status::Running).await;
    node.flush_state().await;
    let rec: Value =
        serde_json::from_slice(&bucket.get("s1").await.unwrap().unwrap().value).unwrap();
    assert_eq!(
        (rec["owner"].clone(), rec["status"].clone()),
        (json!("n1"), json!("running"))
    );
    assert!(rec["since"].as_str().is_some());

    // Deleting removes the state key.
    let mut ev = node.subscribe();
    node.delete_workload("s2").unwrap();
    wait_event(&mut ev, 30, |e| matches!(e, Event::Deleted { .. })).await;
    node.flush_state().await;
    assert_eq!(bucket.get("s2").await.unwrap(), None);

    // Somebody else takes s1's key: the node's next write loses the
    // compare-and-set, and it stops s1 instead of overwriting.
    let theirs = bucket.get("s1").await.unwrap().unwrap();
    bucket
        .update(
            "s1",
            Bytes::from_static(br#"{"owner":"n2","status":"running"}"#),
            theirs.revision,
        )
        .await
        .unwrap();
    assert!(
        node.run_task("s1", Task::new("set").kwarg("ping_fail_rate", 1.0))
            .await
            .success
    );
    let e = wait_event(&mut ev, 60, |e| matches!(e, Event::Failed { .. })).await;
    assert!(matches!(e, Event::Failed { ref reason, .. } if reason.contains("claim lost")));
    wait_event(&mut ev, 30, |e| matches!(e, Event::Deleted { .. })).await;
    assert!(node.workload("s1").is_none());
    let after: Value =
        serde_json::from_slice(&bucket.get("s1").await.unwrap().unwrap().value).unwrap();
    assert_eq!(
        after["owner"], "n2",
        "the fenced node must not write over the new owner"
    );
}

#[tokio::test]
async fn stop_deletes_every_workload_and_refuses_more() {
    let node = sim_node().await;
    for i in 0..50 {
        node.add_workload(sim(&format!("s{i}"))).await.unwrap();
    }
    node.stop().await;
    assert!(node.is_empty());
    assert_eq!(
        node.add_workload(sim("late")).await,
        Err(NodeError::ShuttingDown)
    );
}

#[tokio::test]
async fn demo_runs_end_to_end() {
    let node = ottomato::demo::demo_node().await.unwrap();
    let opts = ottomato::demo::DemoOptions {
        devices: 500,
        progress: false,
        ..Default::default()
    };
    let s = ottomato::demo::run(&node, &opts, std::future::pending())
        .await
        .unwrap();
    assert_eq!(s.by_status, vec![(Status::Running, 500)]);
    assert_eq!((s.tasks, s.tasks_ok), (500, 500));
    assert!(s.p99 >= s.p50);
    // The demo schedule ran a tick on every device and kept each result.
    assert!(s.schedule_ticks >= 500, "{s}");
    assert_eq!(s.schedule_results as u64, s.schedule_ticks, "{s}");
    node.stop().await;
    assert!(node.is_empty());
}
