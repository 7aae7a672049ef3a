//! At most one node drives a device — for slow devices too: a device call's
//! whole interval, from its start to its end, never overlaps another
//! instance's calls on the same device, whatever moves the workload (spec
//! change, drain, scale-out), and only the owner answers a task.
//!
//! Every node is an `ottomato node` process on a real nats-server; the sim
//! devices trace the start and end of each call with process and instance
//! ([`ottomato::actors::sim::trace::overlaps`]).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use support::fleet::{
    add_traced, all_running_on, assert_single_drivers, assert_single_drivers_frozen, ids, settle,
    traced_fleet, traced_fleet_via, traced_fleet_with, unix_ns, TTL,
};
use support::proxy::StallProxy;
use support::{eventually, signal, NatsServer, NodeProc, Operator, TempDir};

/// Sends a task over plain NATS and returns the reply (or why there was none).
async fn task(
    client: &async_nats::Client,
    id: &str,
    body: Value,
    timeout: Duration,
) -> Result<Value, String> {
    let req = async_nats::Request::new()
        .payload(Bytes::from(body.to_string()))
        .timeout(Some(timeout));
    match client
        .send_request(format!("otto.task.write.{id}"), req)
        .await
    {
        Ok(m) => Ok(serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?),
        Err(e) => Err(e.to_string()),
    }
}

/// Starts a 3 s `sleep` task on each id and waits until every one of them
/// is running on its device (its start is in the trace).
async fn start_long_tasks(
    op: &Operator,
    ids: &[String],
    trace: &std::path::Path,
) -> Vec<tokio::task::JoinHandle<(String, Result<Value, String>)>> {
    let handles = ids
        .iter()
        .map(|id| {
            let (client, id) = (op.client.clone(), id.clone());
            tokio::spawn(async move {
                let body = json!({"command": "sleep", "kwargs": {"ms": 3000}, "timeoutMs": 20000});
                let r = task(&client, &id, body, Duration::from_secs(25)).await;
                (id, r)
            })
        })
        .collect();
    eventually(10, "every long task started on its device", || async {
        let lines = ottomato::actors::sim::trace::read_trace(trace);
        ids.iter()
            .all(|id| {
                lines
                    .iter()
                    .any(|t| t.id == *id && t.event == "task" && t.start)
            })
            .then_some(())
    })
    .await;
    handles
}

/// Every long task answered success by the node that ran it.
async fn long_tasks_succeeded(
    handles: Vec<tokio::task::JoinHandle<(String, Result<Value, String>)>>,
    owners: &HashMap<String, String>,
) {
    for h in handles {
        let (id, r) = h.await.unwrap();
        let v = r.unwrap_or_else(|e| panic!("{id}: no answer to the long task: {e}"));
        assert_eq!(v["success"], true, "{id}: {v}");
        assert_eq!(v["workerId"], owners[&id].as_str(), "{id}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_in_flight_while_a_spec_change_moves_its_workload_never_overlaps() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let trace = logs.0.join("trace.log");
    let ids = ids("z", 8);
    add_traced(&op, &ids, &trace, json!({"placement": {"zone": "one"}})).await;
    let _a = NodeProc::start(&server.url, "a", &logs.0, &["--zone", "one"]);
    let _b = NodeProc::start(&server.url, "b", &logs.0, &["--zone", "two"]);
    let owners = all_running_on(&op, &ids, &["a"], 60).await;

    let handles = start_long_tasks(&op, &ids, &trace).await;
    // The spec now wants zone two: a must let go, b takes over.
    add_traced(&op, &ids, &trace, json!({"placement": {"zone": "two"}})).await;
    all_running_on(&op, &ids, &["b"], 60).await;
    long_tasks_succeeded(handles, &owners).await;
    assert_single_drivers(&trace, &HashMap::new());
    op.assert_no_double_owner();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_in_flight_while_its_node_drains_never_overlaps() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let mut fleet = traced_fleet(&op, &server.url, "d", 30, &[], 60).await;
    let on_a: Vec<String> = fleet.owned_by("a");
    assert!(!on_a.is_empty());
    let handles = start_long_tasks(&op, &on_a, &fleet.trace).await;
    signal(fleet.nodes[0].pid(), "TERM");
    all_running_on(&op, &fleet.ids, &["b", "c"], 60).await;
    let status = fleet.nodes[0].child.wait().unwrap();
    assert!(status.success(), "a drained and left: {status:?}");
    long_tasks_succeeded(handles, &fleet.owners).await;
    assert_single_drivers(&fleet.trace, &fleet.died);
    op.assert_no_double_owner();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_in_flight_while_scale_out_moves_its_workload_never_overlaps() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let trace = logs.0.join("trace.log");
    let ids = ids("s", 40);
    add_traced(&op, &ids, &trace, json!({})).await;
    let _a = NodeProc::start(&server.url, "a", &logs.0, &[]);
    let owners = all_running_on(&op, &ids, &["a"], 60).await;
    let handles = start_long_tasks(&op, &ids, &trace).await;
    let _b = NodeProc::start(&server.url, "b", &logs.0, &[]);
    let after = settle(&op, &ids, Duration::from_secs(2), 60).await;
    assert!(
        after.values().any(|o| o == "b"),
        "scale-out moved nothing to b"
    );
    long_tasks_succeeded(handles, &owners).await;
    assert_single_drivers(&trace, &HashMap::new());
    op.assert_no_double_owner();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_for_nats_is_answered_with_an_error_not_silence() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    op.add("big", json!({"kind": "sim"})).await;
    let _a = NodeProc::start(&server.url, "a", &logs.0, &[]);
    all_running_on(&op, &["big".to_string()], &["a"], 60).await;
    // 600 KB in, ~1.2 MB out (echo returns its args): more than the server's 1 MiB.
    let blob = "x".repeat(600 * 1024);
    let started = Instant::now();
    let v = task(
        &op.client,
        "big",
        json!({"command": "echo", "args": [blob]}),
        Duration::from_secs(10),
    )
    .await
    .expect("an answer, not silence");
    assert!(started.elapsed() < Duration::from_secs(5), "answered late");
    assert_eq!(v["success"], false, "{}", &v.to_string()[..200]);
    assert_eq!(v["errorCode"], "payload_too_large", "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("max_payload") && msg.contains("1048576"),
        "{msg}"
    );
    // A result that fits still goes through.
    let v = task(
        &op.client,
        "big",
        json!({"command": "hello"}),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(v["success"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resumed_after_its_ttl_stays_silent_and_every_reply_is_the_owners() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    // Devices whose `stop` takes 2 s: a fenced node that still ran `stop`
    // (instead of abandoning the instance) would sit in `stopping`, still
    // subscribed, answering `unavailable` for workloads others now own.
    let fleet =
        traced_fleet_with(&op, &server.url, "q", 30, &[], 60, json!({"stop_ms": 2000})).await;
    let b = &fleet.nodes[1];
    let on_b: Vec<String> = fleet.owned_by("b");
    assert!(!on_b.is_empty());
    let requests = ContinuousRequests::start(&op, &on_b).await;

    op.gone.lock().unwrap().insert("b".into());
    let paused = Instant::now();
    signal(b.pid(), "STOP");
    // (Taken after the signal: b runs until it lands.)
    let stopped = unix_ns();
    all_running_on(&op, &on_b, &["a", "c"], 30).await;
    // Resume at once: b's connection is still open (the server has not yet
    // given up writing to it), so b finds the requests of the freeze waiting.
    eprintln!("resuming b after {:?}", paused.elapsed());
    let resumed = unix_ns();
    signal(b.pid(), "CONT");
    // Requests keep flowing while b wakes up, fences and rejoins.
    settle(&op, &fleet.ids, Duration::from_secs(3), 60).await;
    let replies = requests.finish().await;
    assert_every_reply_is_the_owners(&op, &replies, on_b.len(), paused, "b");
    let frozen = HashMap::from([(b.pid(), (stopped, resumed))]);
    assert_single_drivers_frozen(&fleet.trace, &fleet.died, &frozen);
}

/// The same as a frozen process, with the process running: b's connection to
/// NATS stalls (no byte moves either way, the connection stays open) until
/// b's lease has run out, then delivers everything that waited. b wakes to a
/// backlog of requests while its lease is gone but before its heartbeat has
/// given up and fenced: it must not answer them (not even `unavailable`),
/// since the workloads may be someone else's by now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_connection_stalls_past_its_lease_stays_silent_when_it_resumes() {
    support::init_logs();
    let server = NatsServer::start();
    let proxy = StallProxy::start(&server.url).await;
    let op = Operator::connect(&server.url, 1).await;
    let urls = [server.url.as_str(), proxy.url.as_str(), server.url.as_str()];
    let fleet = traced_fleet_via(&op, urls, "s", 30, &[], 60, json!({})).await;
    let on_b: Vec<String> = fleet.owned_by("b");
    assert!(!on_b.is_empty());
    let requests = ContinuousRequests::start(&op, &on_b).await;

    // Stall right after one of b's heartbeats has landed: b's lease then
    // runs until TTL - margin (4 s) from now at most, and its next heartbeat
    // (about 1 s from now) waits up to a TTL for its answer.
    let beat = next_heartbeat(&op, "b").await;
    proxy.stall();
    op.gone.lock().unwrap().insert("b".into());
    let paused = Instant::now();
    eprintln!(
        "stalled b's connection {:?} after its heartbeat",
        beat.elapsed()
    );
    // The fault's length (not a wait for convergence): past b's lease,
    // before its pending heartbeat can time out and fence. b wakes to the
    // requests of the stall with its lease gone and its workloads not yet
    // fenced (then fences them when the heartbeat's answer arrives).
    tokio::time::sleep_until((beat + TTL - Duration::from_millis(400)).into()).await;
    proxy.resume();
    eprintln!("resumed b's connection after {:?}", paused.elapsed());
    settle(&op, &fleet.ids, Duration::from_secs(3), 60).await;
    let replies = requests.finish().await;
    assert_every_reply_is_the_owners(&op, &replies, on_b.len(), paused, "b");
    assert_single_drivers(&fleet.trace, &fleet.died);
}

/// Requests sent to some workloads every 50 ms over plain NATS, each with its
/// own reply subject, and every reply collected — late ones too (a reply to
/// a request its sender gave up on is still a reply from a node that thought
/// it could answer).
struct ContinuousRequests {
    replies: Arc<Mutex<Vec<(Instant, String, Value)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sender: tokio::task::JoinHandle<()>,
    collector: tokio::task::JoinHandle<()>,
}

impl ContinuousRequests {
    async fn start(op: &Operator, ids: &[String]) -> ContinuousRequests {
        let replies: Arc<Mutex<Vec<(Instant, String, Value)>>> = Arc::default();
        let mut inbox = op.client.subscribe("_INBOX_TEST.>").await.unwrap();
        op.client.flush().await.unwrap();
        let collector = {
            let replies = replies.clone();
            tokio::spawn(async move {
                while let Some(m) = futures::StreamExt::next(&mut inbox).await {
                    let id = m
                        .subject
                        .as_str()
                        .rsplit('.')
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if m.payload.is_empty() {
                        continue; // "no responders" status, not a node's reply
                    }
                    let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                    replies.lock().unwrap().push((Instant::now(), id, v));
                }
            })
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (client, ids, stop) = (op.client.clone(), ids.to_vec(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for id in &ids {
                        n += 1;
                        let body = Bytes::from_static(br#"{"command":"hello"}"#);
                        let reply = format!("_INBOX_TEST.{n}.{id}");
                        let _ = client
                            .publish_with_reply(format!("otto.task.write.{id}"), reply, body)
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        ContinuousRequests {
            replies,
            stop,
            sender,
            collector,
        }
    }

    /// Stops sending; every reply received, with when and for which workload.
    /// (Called once the placement has settled for seconds: a backlog of
    /// requests from a fault was handled long before, so late replies are in.)
    async fn finish(self) -> Vec<(Instant, String, Value)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sender.await.unwrap();
        self.collector.abort();
        let replies = self.replies.lock().unwrap();
        replies.clone()
    }
}

/// Every reply came from the workload's owner at that moment (as the
/// watcher saw it, give or take its lag), and none says the node answering
/// had lost its lease: a node that is not sure it owns a workload stays
/// silent. `resumed`, the node the fault hit, never answers `unavailable`:
/// its workloads never moved off it by a handover (which may answer so),
/// so such an answer could only come from it while it was not sure
/// (lease lost, or fencing). `fault`: when the fault began (for the summary).
fn assert_every_reply_is_the_owners(
    op: &Operator,
    replies: &[(Instant, String, Value)],
    workloads: usize,
    fault: Instant,
    resumed: &str,
) {
    assert!(
        replies.len() > workloads * 5,
        "too few replies: {}",
        replies.len()
    );
    let mut by: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for (at, _, v) in replies {
        let phase = if *at < fault { "before" } else { "after" };
        let key = (
            format!("{phase} {}", v["workerId"].as_str().unwrap_or("")),
            v["errorCode"].as_str().unwrap_or("ok").to_string(),
        );
        *by.entry(key).or_default() += 1;
    }
    eprintln!("replies by node and outcome: {by:?}");
    let mut wrong = Vec::new();
    for (at, id, v) in replies {
        let from = v["workerId"].as_str().unwrap_or("");
        if v["error"].as_str().unwrap_or("").contains("lease") {
            wrong.push(format!("{id}: {from} answered after losing its lease: {v}"));
        } else if from == resumed && v["errorCode"] == "unavailable" {
            wrong.push(format!(
                "{id}: {from} answered while not sure it owned it: {v}"
            ));
        } else if !op.owned_around(id, from, *at, Duration::from_millis(300)) {
            wrong.push(format!("{id}: answered by {from}, not its owner: {v}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} replies not from the owner: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    op.assert_no_double_owner();
}

/// Waits for the next heartbeat of node `id` to land in the nodes bucket; when it was seen.
async fn next_heartbeat(op: &Operator, id: &str) -> Instant {
    let js = async_nats::jetstream::new(op.client.clone());
    let nodes = js.get_key_value("otto_nodes").await.unwrap();
    let mut watch = nodes.watch(id).await.unwrap();
    // The watch first delivers the entry as it is: skip it, wait for a new one.
    let first = futures::StreamExt::next(&mut watch).await.unwrap().unwrap();
    loop {
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut watch),
        )
        .await
        .expect("a heartbeat within 10 s")
        .unwrap()
        .unwrap();
        if e.revision > first.revision {
            return Instant::now();
        }
    }
}

/// Waits for a process to exit (polling, to a deadline); its exit code.
fn wait_exit(child: &mut std::process::Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Publishes one request per id with its own reply subject and counts the
/// replies each gets: every request must be answered exactly once.
async fn replies_per_request(op: &Operator, ids: &[String]) -> HashMap<String, Vec<Value>> {
    let tag = format!("_INBOX_COUNT_{}", rand_tag());
    let mut sub = op.client.subscribe(format!("{tag}.>")).await.unwrap();
    for id in ids {
        op.client
            .publish_with_reply(
                format!("otto.task.write.{id}"),
                format!("{tag}.{id}"),
                Bytes::from_static(br#"{"command":"hello"}"#),
            )
            .await
            .unwrap();
    }
    // One round trip to every node's connection later, then a short window
    // for any second answer (a second responder answers as fast as the first).
    let mut got: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Ok(Some(m)) =
        tokio::time::timeout_at(deadline.into(), futures::StreamExt::next(&mut sub)).await
    {
        if m.payload.is_empty() {
            continue;
        }
        let id = m.subject.as_str().rsplit('.').next().unwrap().to_string();
        got.entry(id)
            .or_default()
            .push(serde_json::from_slice(&m.payload).unwrap());
    }
    got
}

fn rand_tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_node_id_in_use_is_refused_and_a_stale_one_is_fenced() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let trace = logs.0.join("trace.log");
    let ids = ids("n", 20);
    add_traced(&op, &ids, &trace, json!({})).await;
    let mut first = NodeProc::start(&server.url, "a", &logs.0, &[]);
    all_running_on(&op, &ids, &["a"], 60).await;

    // A copy of the config started next to it: refused, one clear line.
    let copy_logs = TempDir::new("logs-copy");
    let mut copy = NodeProc::start(&server.url, "a", &copy_logs.0, &[]);
    let code = wait_exit(&mut copy.child, Duration::from_secs(20)).expect("the copy exits");
    let err = std::fs::read_to_string(&copy.log).unwrap();
    assert_eq!(code, 1, "refused: {err}");
    assert!(err.contains("is in use by a running node"), "{err}");
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the first keeps running"
    );
    let once = replies_per_request(&op, &ids).await;
    for id in &ids {
        assert_eq!(
            once.get(id).map_or(0, Vec::len),
            1,
            "{id}: {:?}",
            once.get(id)
        );
    }

    // The first is frozen; a second process under its id starts (the
    // predecessor looks gone), takes the workloads over the normal way…
    let first_pid = first.pid();
    signal(first_pid, "STOP");
    let stopped = support::fleet::unix_ns();
    let logs2 = TempDir::new("logs2");
    let second = NodeProc::start(&server.url, "a", &logs2.0, &[]);
    eventually(60, "the second process runs every workload", || async {
        let lines = ottomato::actors::sim::trace::read_trace(&trace);
        ids.iter()
            .all(|id| {
                lines
                    .iter()
                    .any(|t| t.id == *id && t.pid == second.pid() && t.event == "init")
            })
            .then_some(())
    })
    .await;
    // …and when the first wakes up, it sees another process wrote its
    // entry: it fences everything and exits with code 3, never driving a device.
    let resumed = support::fleet::unix_ns();
    signal(first_pid, "CONT");
    let code = wait_exit(&mut first.child, Duration::from_secs(20)).expect("the first exits");
    let log = std::fs::read_to_string(&first.log).unwrap();
    assert_eq!(code, 3, "{}", &log[log.len().saturating_sub(2000)..]);
    assert!(log.contains("two processes run with node id"), "{log}");
    let lines = assert_single_drivers_frozen(
        &trace,
        &HashMap::from([(first_pid, resumed)]),
        &HashMap::from([(first_pid, (stopped, resumed))]),
    );
    assert!(
        !lines
            .iter()
            .any(|t| t.pid == first_pid && t.start && t.ns > resumed),
        "the stale process drove a device after it woke up"
    );
    all_running_on(&op, &ids, &["a"], 30).await;
    let once = replies_per_request(&op, &ids).await;
    for id in &ids {
        assert_eq!(
            once.get(id).map_or(0, Vec::len),
            1,
            "{id}: {:?}",
            once.get(id)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_server_restart_a_killed_node_still_fails_over_within_ttl_plus_2s() {
    support::init_logs();
    let server = NatsServer::start();
    let url = server.url.clone();
    let op = Operator::connect(&url, 1).await;
    let mut fleet = traced_fleet(&op, &url, "x", 300, &[], 90).await;
    let (port, store) = server.kill();
    let _server = NatsServer::start_with(Some(port), store, &[]);
    // Everyone reconnected and resynced: the placement is stable again.
    let owners = settle(&op, &fleet.ids, Duration::from_secs(3), 90).await;
    let victims: Vec<String> = owners
        .iter()
        .filter(|(_, o)| *o == "b")
        .map(|(i, _)| i.clone())
        .collect();
    assert!(victims.len() > 50, "b owns only {}", victims.len());
    op.gone.lock().unwrap().insert("b".into());
    let killed = Instant::now();
    fleet.kill(1);
    all_running_on(&op, &victims, &["a", "c"], 60).await;
    let took = killed.elapsed();
    eprintln!(
        "failover of {} workloads after a NATS restart took {took:?}",
        victims.len()
    );
    assert!(
        took <= support::fleet::TTL + Duration::from_secs(2),
        "failover took {took:?}"
    );
    assert_single_drivers(&fleet.trace, &fleet.died);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_with_another_ttl_or_replica_count_is_refused() {
    support::init_logs();
    let server = NatsServer::start();
    let logs = TempDir::new("logs");
    let _a = NodeProc::start(&server.url, "a", &logs.0, &[]);
    let op = Operator::connect(&server.url, 1).await;
    eventually(30, "a registered", || async {
        let js = async_nats::jetstream::new(op.client.clone());
        let kv = js.get_key_value("otto_nodes").await.ok()?;
        kv.get("a").await.ok()?.map(|_| ())
    })
    .await;
    for (name, flags, wanted) in [
        (
            "short",
            &["--ttl", "2s", "--heartbeat", "500ms"][..],
            "--ttl 5s",
        ),
        ("copies", &["--replicas", "3"][..], "--replicas 1"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ottomato"))
            .args(["node", "-s", &server.url, "--node-id", name])
            .args(flags)
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(wanted), "{name}: {err}");
    }
    // The running node's membership TTL is untouched.
    let js = async_nats::jetstream::new(op.client.clone());
    let mut stream = js.get_stream("KV_otto_nodes").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_age,
        Duration::from_secs(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_unreachable_exits_within_the_drain_limit() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let ids = ids("t", 1000);
    for id in &ids {
        op.add(id, json!({"kind": "sim"})).await;
    }
    let mut a = NodeProc::start(&server.url, "a", &logs.0, &["--drain-timeout", "5s"]);
    all_running_on(&op, &ids, &["a"], 120).await;
    drop(op);
    drop(server); // nats-server stopped
    let asked = Instant::now();
    signal(a.pid(), "TERM");
    let code = wait_exit(&mut a.child, Duration::from_secs(20));
    let log = std::fs::read_to_string(&a.log).unwrap();
    let took = asked.elapsed();
    assert!(
        code.is_some() && took <= Duration::from_secs(7),
        "still running {took:?} after SIGTERM (drain limit 5 s): {}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert_ne!(code, Some(0), "it could not hand over: not a clean exit");
    assert!(log.contains("drain limit"), "{log}");
}
