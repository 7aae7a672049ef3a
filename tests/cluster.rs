//! Cluster mode against real nats-server processes (JetStream), driven the
//! way an operator would: specs written and state read with a plain
//! async-nats client, tasks sent as plain NATS requests.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use ottomato::actors::sim::SimKind;
use ottomato::nats::{NatsStore, NatsTransport};
use ottomato::subjects::Subjects;
use ottomato::{Cluster, ClusterConfig, Node, NodeConfig};
use serde_json::{json, Value};
use support::{eventually, NatsServer, Operator};

/// A device kind whose devices answer pings only from some nodes (a device
/// reachable from one zone but not another).
struct ZonedKind {
    reachable: bool,
}

struct ZonedDevice {
    reachable: bool,
}

impl ottomato::Kind for ZonedKind {
    fn name(&self) -> &str {
        "zoned"
    }
    fn create(
        &self,
        _id: &str,
        _c: &Value,
    ) -> Result<Arc<dyn ottomato::Workload>, ottomato::ConfigError> {
        Ok(Arc::new(ZonedDevice {
            reachable: self.reachable,
        }))
    }
}

#[async_trait::async_trait]
impl ottomato::Workload for ZonedDevice {
    async fn init(&self) -> Result<(), ottomato::WorkloadError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), ottomato::WorkloadError> {
        if self.reachable {
            Ok(())
        } else {
            Err(ottomato::WorkloadError::new("no route to device from here"))
        }
    }
    async fn run_task(&self, _t: &ottomato::Task) -> Result<Value, ottomato::TaskError> {
        Ok(Value::Null)
    }
    async fn stop(&self) -> Result<(), ottomato::WorkloadError> {
        Ok(())
    }
}

async fn start_node(url: &str, id: &str, cfg: NodeConfig) -> Cluster {
    let client = ottomato::nats::connect(url, id).await.expect("connect");
    let store = Arc::new(NatsStore::new(client.clone()));
    let transport = Arc::new(NatsTransport::new(client));
    Cluster::start(
        Node::builder().config(cfg).node_id(id).kind(SimKind),
        store,
        transport,
        ClusterConfig::default(),
    )
    .await
    .expect("node joins")
}

/// Every workload in `ids` runs on exactly one of `nodes`.
fn exactly_once(nodes: &[&Cluster], ids: &[String]) -> Result<(), String> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for n in nodes {
        for id in n.node().workload_ids() {
            if let Some(other) = seen.insert(id.clone(), n.node().id()) {
                return Err(format!("{id} runs on {other} and {}", n.node().id()));
            }
        }
    }
    let want: HashSet<&String> = ids.iter().collect();
    let have: HashSet<&String> = seen.keys().collect();
    if want != have {
        return Err(format!("{} wanted, {} running", want.len(), have.len()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_claim_every_workload_exactly_once() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let ids: Vec<String> = (0..1000).map(|i| format!("dev-{i:04}")).collect();
    for id in &ids {
        op.add(id, json!({"kind": "sim"})).await;
    }
    let (a, b, c) = tokio::join!(
        start_node(&server.url, "node-a", NodeConfig::default()),
        start_node(&server.url, "node-b", NodeConfig::default()),
        start_node(&server.url, "node-c", NodeConfig::default()),
    );
    eventually(120, "1000 workloads running, each on one node", || async {
        let running = op.running();
        (running.len() == 1000 && exactly_once(&[&a, &b, &c], &ids).is_ok()).then_some(())
    })
    .await;
    // The state bucket's owner is the node that runs it.
    for (id, owner) in op.running() {
        let runner = [&a, &b, &c]
            .into_iter()
            .find(|n| n.node().has_workload(&id))
            .unwrap();
        assert_eq!(owner, runner.node().id(), "{id}");
    }
    // Work is spread: rendezvous hashing gives each node about a third.
    for n in [&a, &b, &c] {
        let len = n.node().len();
        assert!((230..=440).contains(&len), "{} runs {len}", n.node().id());
    }
    op.assert_no_double_owner();
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_nats_clients_get_documented_replies_and_errors() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    op.add("t1", json!({"kind": "sim", "labels": {"site": "oslo"}}))
        .await;
    op.add("t2", json!({"kind": "sim", "queue": 1})).await;
    op.add("t3", json!({"kind": "sim", "labels": {"site": "bergen"}}))
        .await;
    let cfg = NodeConfig {
        max_payload: 64 * 1024,
        ..Default::default()
    };
    let node = start_node(&server.url, "solo", cfg).await;
    eventually(30, "3 running", || async {
        (op.running().len() == 3).then_some(())
    })
    .await;
    let nc = op.client.clone();
    let ask = move |subject: &'static str, body: Vec<u8>| {
        let nc = nc.clone();
        async move {
            let reply = nc.request(subject, Bytes::from(body)).await.unwrap();
            serde_json::from_slice::<Value>(&reply.payload).unwrap()
        }
    };
    let nc = &op.client;

    let ok = ask(
        "otto.task.write.t1",
        br#"{"command":"echo","args":[1,"x"],"kwargs":{"k":true}}"#.to_vec(),
    )
    .await;
    for key in [
        "jobId",
        "workerId",
        "workload",
        "hostname",
        "command",
        "args",
        "kwargs",
        "success",
        "error",
        "errorCode",
        "return",
        "timestamp",
        "executionTime",
    ] {
        assert!(ok.get(key).is_some(), "reply lacks {key}: {ok}");
    }
    assert_eq!(ok["success"], true);
    assert_eq!(ok["workerId"], "solo");
    assert_eq!(ok["workload"], "t1");
    assert_eq!(
        ok["return"],
        json!({"args": [1, "x"], "kwargs": {"k": true}})
    );
    assert_eq!(
        (ok["error"].clone(), ok["errorCode"].clone()),
        (Value::Null, Value::Null)
    );

    // Unknown workload: NATS "no responders", at once.
    let t = std::time::Instant::now();
    let err = nc
        .request("otto.task.write.ghost", Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    assert!(t.elapsed() < Duration::from_secs(1));

    let code = |v: &Value| v["errorCode"].as_str().unwrap_or("").to_string();
    assert_eq!(
        code(&ask("otto.task.write.t1", b"{nope".to_vec()).await),
        "malformed_request"
    );
    assert_eq!(
        code(&ask("otto.task.write.t1", br#"{"args":[]}"#.to_vec()).await),
        "malformed_request"
    );
    assert_eq!(
        code(&ask("otto.task.write.t1", br#"{"command":"frob"}"#.to_vec()).await),
        "unknown_command"
    );
    assert_eq!(
        code(&ask("otto.task.write.t1", br#"{"command":"sleep"}"#.to_vec()).await),
        "invalid_args"
    );
    assert_eq!(
        code(&ask("otto.task.write.t1", br#"{"command":"fail"}"#.to_vec()).await),
        "task_failed"
    );
    let big = format!(
        r#"{{"command":"echo","args":["{}"]}}"#,
        "x".repeat(100 * 1024)
    );
    assert_eq!(
        code(&ask("otto.task.write.t1", big.into_bytes()).await),
        "payload_too_large"
    );
    let late = ask(
        "otto.task.write.t1",
        br#"{"command":"sleep","kwargs":{"ms":5000},"timeoutMs":100}"#.to_vec(),
    )
    .await;
    assert_eq!(code(&late), "deadline_exceeded");
    // t2 has a queue of 1: of three at once, one runs, one waits, one is busy.
    let slow = || {
        ask(
            "otto.task.write.t2",
            br#"{"command":"sleep","kwargs":{"ms":1500}}"#.to_vec(),
        )
    };
    let all = futures::future::join_all([
        tokio::spawn(slow()),
        tokio::spawn(slow()),
        tokio::spawn(slow()),
    ])
    .await;
    let mut codes: Vec<String> = all.into_iter().map(|r| code(&r.unwrap())).collect();
    codes.sort();
    assert_eq!(codes, vec!["", "", "busy"]);

    // The bincode fast path, negotiated by header.
    let req = ottomato::wire::TaskRequest {
        command: "echo".into(),
        args: vec![json!({"nested": [1, 2.5, null]})],
        kwargs: serde_json::Map::new(),
        timeout_ms: None,
        keep_result: false,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Otto-Encoding", "bincode-v1");
    let reply = nc
        .request_with_headers(
            "otto.task.write.t1",
            headers,
            Bytes::from(ottomato::wire::bin::encode_request(&req)),
        )
        .await
        .unwrap();
    assert_eq!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Otto-Encoding"))
            .map(|v| v.as_str()),
        Some("bincode-v1")
    );
    let r = ottomato::wire::bin::decode_result(&reply.payload).unwrap();
    assert!(r.success);
    assert_eq!(
        r.ret,
        json!({"args": [{"nested": [1, 2.5, null]}], "kwargs": {}})
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Otto-Encoding", "msgpack");
    let reply = nc
        .request_with_headers("otto.task.write.t1", headers, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(
        code(&serde_json::from_slice(&reply.payload).unwrap()),
        "malformed_request"
    );

    // Fan-out by label: one result per match, then the node's done marker.
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish_with_reply(
        "otto.fanout.write",
        inbox,
        Bytes::from(json!({"labels": {"site": "oslo"}, "command": "hello"}).to_string()),
    )
    .await
    .unwrap();
    let mut results = vec![];
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["done"] == true {
            assert_eq!(
                (v["node"].clone(), v["results"].clone()),
                (json!("solo"), json!(1))
            );
            break;
        }
        results.push(v);
    }
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["return"], "hello from t1");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_node_hands_its_workloads_to_the_others() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let ids: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
    for id in &ids {
        op.add(id, json!({"kind": "sim"})).await;
    }
    let a = start_node(&server.url, "a", NodeConfig::default()).await;
    let b = start_node(&server.url, "b", NodeConfig::default()).await;
    let c = start_node(&server.url, "c", NodeConfig::default()).await;
    eventually(60, "300 running on 3 nodes", || async {
        (op.running().len() == 300
            && exactly_once(&[&a, &b, &c], &ids).is_ok()
            && !b.node().is_empty())
        .then_some(())
    })
    .await;
    let had = b.node().len();
    b.stop().await;
    eventually(60, "300 running on a and c", || async {
        let running = op.running();
        (running.len() == 300
            && running.values().all(|o| o != "b")
            && exactly_once(&[&a, &c], &ids).is_ok())
        .then_some(())
    })
    .await;
    assert!(had > 50, "b had only {had}");
    op.assert_no_double_owner();
    // Its membership entry is gone at once, not after the TTL.
    let nodes = jetstream::new(op.client.clone())
        .get_key_value("otto_nodes")
        .await
        .unwrap();
    assert_eq!(nodes.get("b").await.unwrap(), None);
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_dead_from_one_zone_is_handed_to_another_zone_with_a_move_limit() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    op.add(
        "m1",
        json!({"kind": "zoned", "placement": {"preferZone": "a"}}),
    )
    .await;
    let fast = NodeConfig {
        ping_splay_min: Duration::from_millis(200),
        ping_splay_max: Duration::from_millis(300),
        ..Default::default()
    };
    let start = |id: &'static str, zone: &'static str, reachable: bool| {
        let url = server.url.clone();
        let cfg = fast.clone();
        async move {
            let client = ottomato::nats::connect(&url, id).await.unwrap();
            Cluster::start(
                Node::builder()
                    .config(cfg)
                    .node_id(id)
                    .kind(ZonedKind { reachable }),
                Arc::new(NatsStore::new(client.clone())),
                Arc::new(NatsTransport::new(client)),
                ClusterConfig {
                    zone: Some(zone.into()),
                    move_dead_after: Some(Duration::from_secs(1)),
                    max_moves: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    let a = start("a", "a", false).await;
    let b = start("b", "b", true).await;
    // Placed in zone a (preferred), dead there, handed on, running in zone b.
    eventually(60, "m1 running on b", || async {
        (op.running().get("m1").map(String::as_str) == Some("b")).then_some(())
    })
    .await;
    let hist = op.history.lock().unwrap().get("m1").cloned().unwrap();
    assert!(
        hist.iter().any(|o| o == "a"),
        "m1 should have started on a: {hist:?}"
    );
    let rec: Value = serde_json::from_slice(&op.state.get("m1").await.unwrap().unwrap()).unwrap();
    assert_eq!(
        (rec["avoid"].clone(), rec["moves"].clone()),
        (json!(["a"]), json!(1)),
        "{rec}"
    );
    assert!(b.node().has_workload("m1") && !a.node().has_workload("m1"));
    op.assert_no_double_owner();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_left_unclaimed_past_the_grace_period_are_taken_by_any_eligible_node() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let ids: Vec<String> = (0..40).map(|i| format!("g{i}")).collect();
    for id in &ids {
        op.add(id, json!({"kind": "sim"})).await;
    }
    let join = |id: &'static str, settle: Duration| {
        let url = server.url.clone();
        async move {
            let client = ottomato::nats::connect(&url, id).await.unwrap();
            Cluster::start(
                Node::builder().node_id(id).kind(SimKind),
                Arc::new(NatsStore::new(client.clone())),
                Arc::new(NatsTransport::new(client)),
                ClusterConfig {
                    join_settle: settle,
                    unclaimed_grace: Duration::from_secs(3),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    // `stuck` is alive (heartbeats) but will not claim for an hour: placement
    // gives it about half the workloads, which nobody would run without the grace rule.
    let stuck = join("stuck", Duration::from_secs(3600)).await;
    let ok = join("ok", Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let running = op.running();
        if running.len() == 40 && running.values().all(|o| o == "ok") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all 40 running on `ok`: {:?}",
            op.view.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "the placement owner gets its chance first"
    );
    assert!(stuck.node().is_empty());
    // And they stay (held for 10 grace periods), not bounced back to `stuck`:
    // no `deleted` event on `ok` for longer than two grace periods.
    let mut events = ok.node().subscribe();
    let bounced = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            if let Ok(ottomato::Event::Deleted { workload }) = events.recv().await {
                return workload;
            }
        }
    })
    .await;
    assert!(
        bounced.is_err(),
        "a grace-claimed workload was released again: {bounced:?}"
    );
    assert_eq!(ok.node().len(), 40);
    op.assert_no_double_owner();
    ok.stop().await;
    stuck.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_hands_over_at_a_bounded_pace_then_leaves() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let ids: Vec<String> = (0..200).map(|i| format!("dr{i}")).collect();
    for id in &ids {
        op.add(id, json!({"kind": "sim"})).await;
    }
    let a = start_node(&server.url, "a", NodeConfig::default()).await;
    let b = start_node(&server.url, "b", NodeConfig::default()).await;
    eventually(60, "200 running on 2 nodes", || async {
        (op.running().len() == 200 && exactly_once(&[&a, &b], &ids).is_ok() && !b.node().is_empty())
            .then_some(())
    })
    .await;
    // While b drains, it never holds a workload that a already runs.
    let had = b.node().len();
    let drain = tokio::spawn(b.drain(Duration::from_secs(60)));
    eventually(60, "all 200 on a", || async {
        let running = op.running();
        (running.len() == 200 && running.values().all(|o| o == "a")).then_some(())
    })
    .await;
    drain.await.unwrap();
    assert!(had > 50);
    op.assert_no_double_owner();
    let nodes = jetstream::new(op.client.clone())
        .get_key_value("otto_nodes")
        .await
        .unwrap();
    assert_eq!(nodes.get("b").await.unwrap(), None, "a drained node leaves");
    assert_eq!(a.node().len(), 200);
    // The last node has nobody to hand over to: draining it stops it (and
    // releases every claim) instead of waiting out a 10-minute drain limit.
    let node = a.node().clone();
    tokio::time::timeout(Duration::from_secs(60), a.drain(Duration::from_secs(600)))
        .await
        .expect("the last node waited for its drain timeout");
    assert!(node.is_empty());
    assert_eq!(nodes.get("a").await.unwrap(), None, "the last node leaves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_spec_stops_it_everywhere_and_readding_brings_it_back() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    for i in 0..40 {
        op.add(&format!("d{i}"), json!({"kind": "sim"})).await;
    }
    let a = start_node(&server.url, "a", NodeConfig::default()).await;
    let b = start_node(&server.url, "b", NodeConfig::default()).await;
    eventually(60, "40 running", || async {
        (op.running().len() == 40).then_some(())
    })
    .await;
    for i in 0..10 {
        op.specs.delete(format!("d{i}")).await.unwrap();
    }
    eventually(
        30,
        "deleted specs stopped and their state removed",
        || async {
            let gone = (0..10).all(|i| {
                let id = format!("d{i}");
                !a.node().has_workload(&id) && !b.node().has_workload(&id)
            });
            (gone && op.view.lock().unwrap().len() == 30).then_some(())
        },
    )
    .await;
    assert_eq!(op.state.get("d3").await.unwrap(), None);
    let mut events = op.client.subscribe("otto.events.d3.>").await.unwrap();
    op.client.flush().await.unwrap();
    op.add("d3", json!({"kind": "sim"})).await;
    // Lifecycle events on subjects: claimed, then added, initialized.
    let mut seen = vec![];
    while !seen.contains(&"initialized".to_string()) {
        let m = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("events for d3")
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["workload"], "d3");
        assert!(v["node"] == "a" || v["node"] == "b", "{v}");
        assert_eq!(
            m.subject.as_str(),
            format!("otto.events.d3.{}", v["event"].as_str().unwrap())
        );
        seen.push(v["event"].as_str().unwrap().to_string());
    }
    assert!(
        seen.contains(&"claimed".to_string()) && seen.contains(&"added".to_string()),
        "{seen:?}"
    );
    eventually(30, "d3 back", || async {
        (op.running().contains_key("d3")
            && (a.node().has_workload("d3") ^ b.node().has_workload("d3")))
        .then_some(())
    })
    .await;
    // A task reaches it again by subject.
    let reply = op
        .client
        .request(
            "otto.task.write.d3",
            Bytes::from_static(br#"{"command":"hello"}"#),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["return"], "hello from d3");
    op.assert_no_double_owner();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_specs_from_storage_show_why_they_do_not_run() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    op.add("x-kind", json!({"kind": "plc9000"})).await;
    op.add(
        "x-config",
        json!({"kind": "sim", "config": {"ping_fail_rate": 9}}),
    )
    .await;
    op.specs
        .put("x-json", Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    op.add("fine", json!({"kind": "sim"})).await;
    let node = start_node(&server.url, "n", NodeConfig::default()).await;
    // A kind no live node runs is not claimed (a node that joins later
    // with that kind may take it): unplaceable, saying why. The others
    // are failed records with the reason.
    let reasons = eventually(30, "three records saying why", || async {
        let mut out = BTreeMap::new();
        for (id, status) in [
            ("x-kind", "unplaceable"),
            ("x-config", "failed"),
            ("x-json", "failed"),
        ] {
            let e = op.state.get(id).await.unwrap()?;
            let v: Value = serde_json::from_slice(&e).unwrap();
            if v["status"] != status {
                return None;
            }
            out.insert(id, v["reason"].as_str().unwrap_or("").to_string());
        }
        Some(out)
    })
    .await;
    assert!(
        reasons["x-kind"].contains("no live node runs kind \"plc9000\""),
        "{reasons:?}"
    );
    assert!(
        reasons["x-config"].contains("ping_fail_rate"),
        "{reasons:?}"
    );
    assert!(reasons["x-json"].contains("not JSON"), "{reasons:?}");
    eventually(30, "the good one runs", || async {
        op.running().contains_key("fine").then_some(())
    })
    .await;
    assert!(!node.node().has_workload("x-kind"));
    // Fixing the spec brings it up.
    op.add("x-kind", json!({"kind": "sim"})).await;
    eventually(30, "fixed spec runs", || async {
        op.running().contains_key("x-kind").then_some(())
    })
    .await;
    node.stop().await;
}

#[test]
fn subjects_md_documents_every_subject_bucket_code_and_event() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/subjects.md"))
        .expect("subjects.md at the repository root");
    let mut missing = vec![];
    for p in ottomato::subjects::SUBJECT_PATTERNS
        .iter()
        .chain(ottomato::subjects::BUCKET_PATTERNS)
    {
        if !doc.contains(&format!("`{p}`")) {
            missing.push(p.to_string());
        }
    }
    let s = Subjects::default();
    for name in [
        s.task(ottomato::CommandClass::Read, "ID"),
        s.task(ottomato::CommandClass::Write, "ID"),
        s.fanout(ottomato::CommandClass::Read),
        s.fanout(ottomato::CommandClass::Write),
        s.workloads_bucket(),
        s.nodes_bucket(),
        s.state_bucket(),
    ] {
        let generic = name
            .replace("ID", "<workload-id>")
            .replace("otto", "<prefix>")
            .replace(".read", ".<class>")
            .replace(".write", ".<class>");
        if !doc.contains(&generic) {
            missing.push(generic);
        }
    }
    for code in ottomato::ErrorCode::ALL.map(|c| c.as_str()) {
        let parsed: ottomato::ErrorCode = serde_json::from_value(json!(code)).unwrap();
        assert_eq!(parsed.as_str(), code);
        if !doc.contains(&format!("`{code}`")) {
            missing.push(code.into());
        }
    }
    for ev in [
        "added",
        "initialized",
        "reachable",
        "unreachable",
        "dead",
        "deleted",
        "init_error",
        "stop_error",
        "restarted",
        "failed",
        "claimed",
        "released",
    ] {
        if !doc.contains(&format!("`{ev}`")) {
            missing.push(ev.into());
        }
    }
    if !doc.contains(ottomato::subjects::ENCODING_HEADER) {
        missing.push(ottomato::subjects::ENCODING_HEADER.into());
    }
    for field in [
        "jobId",
        "workerId",
        "executionTime",
        "errorCode",
        "owner",
        "since",
        "results",
    ] {
        if !doc.contains(field) {
            missing.push(field.into());
        }
    }
    assert!(
        missing.is_empty(),
        "subjects.md does not document: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_steer_the_cluster_with_the_cli() {
    support::init_logs();
    let server = NatsServer::start();
    let url = server.url.clone();
    let node = start_node(&url, "n1", NodeConfig::default()).await;
    let run = |args: &[&str]| {
        let (url, args) = (
            url.clone(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                support::cli(&url, &refs)
            })
            .await
            .unwrap()
        }
    };

    let (code, out, _) = run(&[
        "workload",
        "add",
        "r1",
        "--kind",
        "sim",
        "--label",
        "site=oslo",
    ])
    .await;
    assert_eq!((code, out.trim()), (0, "added r1"));
    let (code, _, err) = run(&["workload", "add", "bad.id", "--kind", "sim"]).await;
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: ") && err.contains("'.'") && err.lines().count() == 1,
        "{err}"
    );

    // Import: a bad row blocks the whole file, with its line number…
    let dir = support::TempDir::new("import");
    let file = dir.0.join("specs.jsonl");
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!(
            "{{\"id\":\"i{i:02}\",\"kind\":\"sim\",\"labels\":{{\"batch\":\"x\"}}}}\n"
        ));
    }
    text.push_str("{\"id\":\"oops\"}\n");
    std::fs::write(&file, &text).unwrap();
    let f = file.to_str().unwrap();
    let (code, _, err) = run(&["workload", "import", f]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("line 21") && err.contains("nothing written"),
        "{err}"
    );
    let (_, out, _) = run(&["workload", "ls", "--json"]).await;
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "a bad file writes nothing");
    // …unless told to skip it.
    let (code, out, _) = run(&["workload", "import", f, "--skip-invalid"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("imported 20 workloads (1 bad rows skipped)"),
        "{out}"
    );

    eventually(60, "21 running per `workload ls`", || async move {
        let (_, out, _) = run(&["workload", "ls", "--status", "running", "--json"]).await;
        let v: Vec<Value> = serde_json::from_str(&out).ok()?;
        (v.len() == 21).then_some(())
    })
    .await;
    let (code, out, _) = run(&["workload", "ls", "i0*", "--node", "n1"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 11, "header + i00..i09:\n{out}");

    let (code, out, _) = run(&[
        "task",
        "run",
        "r1",
        "echo",
        "hi",
        "42",
        "--kwargs",
        "{\"k\":1}",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["return"], json!({"args": ["hi", 42], "kwargs": {"k": 1}}));
    let (code, _, err) = run(&["task", "run", "ghost", "echo"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no node owns it"), "{err}");
    let (code, out, _) = run(&["task", "run", "r1", "fail"]).await;
    assert_eq!(code, 1, "a failed task is a failed exit: {out}");

    // Fan-out by label, and by glob in waves.
    let (code, out, err) = run(&["task", "run", "--label", "site=oslo", "hello"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("r1  ok") && err.contains("summary: 1 ok, 0 failed, 0 no answer"),
        "{out}{err}"
    );
    let (code, out, err) = run(&["task", "run", "--select", "i*", "hello", "--batch", "25%"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("  ok  ")).count(),
        20,
        "{out}"
    );
    assert_eq!(err.matches("wave ").count(), 4, "{err}");

    let (code, out, _) = run(&["status", "--json"]).await;
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["nodes"][0]["id"], "n1");
    assert_eq!(s["byStatus"]["running"], 21);

    let (code, _, _) = run(&["workload", "rm", "r1"]).await;
    assert_eq!(code, 0);
    let (code, _, err) = run(&["workload", "rm", "r1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
    eventually(30, "r1 gone from the node", || async {
        (!node.node().has_workload("r1")).then_some(())
    })
    .await;
    node.stop().await;
}

#[test]
fn node_settings_come_from_file_env_and_flags_with_flags_winning() {
    let dir = support::TempDir::new("cfg");
    let file = dir.0.join("node.toml");
    std::fs::write(
        &file,
        "server = \"nats://10.0.0.1:4222\"\nzone = \"a\"\nuser = \"node\"\npassword = \"s3cret\"\nheartbeat = \"2s\"\nttl = \"10s\"\n[labels]\nrack = \"r1\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ottomato"))
        .args([
            "node",
            "--config",
            file.to_str().unwrap(),
            "--ttl",
            "12s",
            "--print-config",
        ])
        .env("OTTOMATO_ZONE", "b")
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(v["server"].as_str(), Some("nats://10.0.0.1:4222"), "file");
    assert_eq!(v["zone"].as_str(), Some("b"), "environment beats file");
    assert_eq!(v["ttl"].as_str(), Some("12s"), "flag beats file");
    assert_eq!(v["heartbeat"].as_str(), Some("2s"));
    assert_eq!(v["labels"]["rack"].as_str(), Some("r1"));
    assert_eq!(v["ping_splay_min"].as_str(), Some("8s"), "default");
    assert_eq!(v["password"].as_str(), Some("***"), "secrets are masked");
    assert!(!text.contains("s3cret"));
    // A typo in the file is a clear error naming the key.
    std::fs::write(&file, "heartbaet = \"1s\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ottomato"))
        .args(["node", "--config", file.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `heartbaet`"));
}

/// The long options `ottomato <cmd> --help` lists.
fn cli_options(cmd: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ottomato"))
        .args(cmd)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches(',')
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn docker_compose_describes_a_real_topology_with_real_cli_options() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap();
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    doc.apply_merge().expect("YAML merge keys resolve");
    let services = doc["services"].as_mapping().expect("services");
    let cmd = |name: &str| -> Vec<String> {
        serde_yaml::from_value(doc["services"][name]["command"].clone()).unwrap_or_default()
    };
    // Three NATS servers, clustered, JetStream on, each routed to the other two.
    let nats: Vec<&str> = ["nats-1", "nats-2", "nats-3"].to_vec();
    for n in &nats {
        assert!(services.contains_key(*n), "service {n}");
        let c = cmd(n);
        assert!(c.contains(&"-js".to_string()), "{n}: JetStream");
        let pos = |flag: &str| c.iter().position(|a| a == flag).map(|i| c[i + 1].clone());
        assert_eq!(pos("-n").as_deref(), Some(*n), "{n}: server name");
        assert_eq!(pos("--cluster_name").as_deref(), Some("otto"));
        assert!(pos("--cluster").is_some(), "{n}: cluster listen");
        let routes = pos("--routes").expect("routes");
        for other in nats.iter().filter(|o| *o != n) {
            assert!(
                routes.contains(&format!("nats://{other}:6222")),
                "{n} routes to {other}"
            );
        }
    }
    // Three worker nodes in two zones, with options the binary really has.
    let node_opts = cli_options(&["node"]);
    let mut zones = std::collections::BTreeSet::new();
    let workers: Vec<String> = services
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| cmd(k).first().map(String::as_str) == Some("node"))
        .map(str::to_string)
        .collect();
    assert_eq!(workers.len(), 3, "{workers:?}");
    for w in &workers {
        let c = cmd(w);
        for flag in c.iter().filter(|a| a.starts_with("--")) {
            assert!(
                node_opts.contains(flag),
                "{w}: `ottomato node` has no {flag}"
            );
        }
        let zone = c
            .iter()
            .position(|a| a == "--zone")
            .map(|i| c[i + 1].clone())
            .expect("zone");
        zones.insert(zone);
        assert_eq!(
            c.iter()
                .position(|a| a == "--replicas")
                .map(|i| c[i + 1].as_str()),
            Some("3")
        );
        let url = doc["services"][w.as_str()]["environment"]["NATS_URL"]
            .as_str()
            .unwrap_or("");
        assert!(
            nats.iter()
                .all(|n| url.contains(&format!("nats://{n}:4222"))),
            "{w}: {url}"
        );
    }
    assert_eq!(zones.len(), 2, "two zones: {zones:?}");
    // Prometheus scrapes exactly the workers, on the port each serves.
    let prom: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let mut targets: Vec<String> =
        serde_yaml::from_value(prom["scrape_configs"][0]["static_configs"][0]["targets"].clone())
            .unwrap();
    targets.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .map(|w| {
            let c = cmd(w);
            let addr = c
                .iter()
                .position(|a| a == "--metrics-addr")
                .map(|i| c[i + 1].clone())
                .unwrap_or_else(|| panic!("{w}: no --metrics-addr"));
            format!("{w}:{}", addr.rsplit(':').next().unwrap())
        })
        .collect();
    expected.sort();
    assert_eq!(targets, expected);
    // The Grafana dashboard queries only metrics a node exports.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/dashboards/ottomato.json"))
            .unwrap(),
    )
    .unwrap();
    let exported = std::fs::read_to_string(format!("{root}/src/metrics.rs")).unwrap();
    let mut queried = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("ottomato_"))
            {
                let base = name.trim_end_matches("_total").trim_end_matches("_bucket");
                assert!(
                    exported.contains(&format!("\"{base}\"")),
                    "dashboard queries {name}, which no node exports"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10, "{queried}");
    // The loader imports 10 000 devices with the real import command.
    let loader: Vec<String> = cmd("loader");
    let script = loader.join(" ");
    assert!(
        script.contains("10000") && script.contains("ottomato workload import"),
        "{script}"
    );
    assert!(cli_options(&["workload", "import"]).contains(&"--skip-invalid".to_string()));
    // The image: multi-stage, release build, the binary as entrypoint.
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2
    );
    assert!(
        dockerfile.contains("cargo build --release")
            && dockerfile.contains("ENTRYPOINT [\"ottomato\"]")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_line_per_state_change() {
    use std::io::BufRead;
    support::init_logs();
    let server = NatsServer::start();
    let node = start_node(&server.url, "n1", NodeConfig::default()).await;
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_ottomato"))
        .args(["-s", &server.url, "watch", "w*"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Until the watcher is attached, keep adding (idempotent) and look for its line.
    let url = server.url.clone();
    let mut lines = vec![];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lines
        .iter()
        .any(|l: &String| l.contains(" w1  running  owner=n1"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no running line for w1: {lines:?}"
        );
        let u = url.clone();
        tokio::task::spawn_blocking(move || {
            support::cli(&u, &["workload", "add", "w1", "--kind", "sim"])
        })
        .await
        .unwrap();
        let u = url.clone();
        tokio::task::spawn_blocking(move || {
            support::cli(&u, &["workload", "add", "x1", "--kind", "sim"])
        })
        .await
        .unwrap();
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
            lines.push(l);
        }
    }
    assert!(
        lines.iter().all(|l| !l.contains(" x1 ")),
        "the glob filters: {lines:?}"
    );
    let u = url.clone();
    tokio::task::spawn_blocking(move || support::cli(&u, &["workload", "rm", "w1"]))
        .await
        .unwrap();
    let removed = (0..60).any(|_| {
        rx.recv_timeout(Duration::from_millis(500))
            .is_ok_and(|l| l.contains(" w1  removed"))
    });
    assert!(removed, "no removed line for w1");
    let _ = watch.kill();
    let _ = watch.wait();
    node.stop().await;
}

#[test]
fn permissions_command_prints_what_subjects_md_recommends() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/subjects.md")).unwrap();
    for (role, title) in [
        ("node", "Worker node"),
        ("operator", "Operator client"),
        ("reader", "Read-only operator"),
        ("scheduler", "Schedule manager"),
        ("watcher", "Read-only watcher"),
    ] {
        let (code, out, err) = support::cli("nats://127.0.0.1:1", &["permissions", "--role", role]);
        assert_eq!(code, 0, "{err}");
        let (publish, subscribe) = out.split_once("subscribe:").expect("two lists");
        let quoted = |s: &str| -> std::collections::BTreeSet<String> {
            s.split('"')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let (dp, ds) = support::role_permissions(&doc, title);
        assert_eq!(quoted(publish), dp.into_iter().collect(), "{role}: publish");
        assert_eq!(
            quoted(subscribe),
            ds.into_iter().collect(),
            "{role}: subscribe"
        );
    }
    // Another prefix and a user's own inboxes.
    let (code, out, _) = support::cli(
        "nats://127.0.0.1:1",
        &[
            "--prefix",
            "site7",
            "--inbox-prefix",
            "_INBOX.alice",
            "permissions",
            "--role",
            "operator",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("\"site7.task.*.*\"") && out.contains("\"_INBOX.alice.>\""),
        "{out}"
    );
    assert!(!out.contains("otto"), "{out}");
    // A reader limited to one workload: its read subject only, no fan-out.
    let (code, out, err) = support::cli(
        "nats://127.0.0.1:1",
        &["permissions", "--role", "reader", "--select", "plc-7"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"otto.task.read.plc-7\""), "{out}");
    assert!(
        !out.contains("otto.task.read.*") && !out.contains("fanout"),
        "{out}"
    );
    let (code, _, err) = support::cli(
        "nats://127.0.0.1:1",
        &["permissions", "--role", "watcher", "--select", "plc-7"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("operator and reader"), "{err}");
    let (code, _, err) = support::cli("nats://127.0.0.1:1", &["permissions", "--role", "admin"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("node, operator, reader, scheduler, watcher"),
        "{err}"
    );
    // Prefixes that would share inboxes, or that nodes could not reply to.
    for bad in ["_INBOX", "alice", "otto", "_INBOX.*"] {
        let (code, _, err) = support::cli(
            "nats://127.0.0.1:1",
            &["--inbox-prefix", bad, "permissions", "--role", "operator"],
        );
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains("_INBOX.alice"), "{bad}: {err}");
    }
}

#[test]
fn a_node_id_that_is_not_one_subject_token_is_refused_before_connecting() {
    let (code, _, err) = support::cli("nats://127.0.0.1:1", &["node", "--node-id", "rack1.n3"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--node-id \"rack1.n3\"") && err.contains("node id"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
