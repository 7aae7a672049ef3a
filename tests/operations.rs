//! What operators use to see a fleet: Prometheus metrics of a node process
//! (parsed by the Prometheus project's own Python parser) and NATS service
//! discovery (`$SRV.*`) read with a plain NATS client.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::peers::{ensure_pip, low_port};
use support::{eventually, NatsServer, NodeProc, Operator, TempDir};

async fn task(op: &Operator, id: &str, command: &str) -> Value {
    let req = async_nats::Request::new()
        .payload(Bytes::from(json!({ "command": command }).to_string()))
        .timeout(Some(Duration::from_secs(10)));
    let m = op
        .client
        .send_request(format!("otto.task.write.{id}"), req)
        .await
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

/// `GET /metrics` over a plain socket.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("application/openmetrics-text"),
        "{head}"
    );
    // Chunked or not: hyper sends a Content-Length for a full body.
    body.to_string()
}

/// Parses OpenMetrics text with the `prometheus_client` Python package's
/// parser (the Prometheus project's reference client): sample name and
/// labels → value. Panics with the parser's error on invalid exposition.
fn parse(text: &str) -> HashMap<String, f64> {
    ensure_pip("prometheus-client", "prometheus_client");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_metrics_count_what_it_did_and_parse_as_openmetrics() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let port = low_port();
    let addr = format!("127.0.0.1:{port}");
    let _node = NodeProc::start(&server.url, "m1", &logs.0, &["--metrics-addr", &addr]);
    for i in 0..5 {
        op.add(&format!("ok-{i}"), json!({"kind": "sim"})).await;
    }
    op.add(
        "never",
        json!({"kind": "sim", "config": {"init_fail_rate": 1.0}}),
    )
    .await;
    eventually(30, "five running", || async {
        let snap = op.snapshot().await;
        (snap.values().filter(|(_, s)| s == "running").count() == 5).then_some(())
    })
    .await;
    for i in 0..7 {
        let r = task(&op, &format!("ok-{}", i % 5), "hello").await;
        assert_eq!(r["success"], true, "{r}");
    }
    for _ in 0..3 {
        let r = task(&op, "ok-0", "no-such-command").await;
        assert_eq!(r["errorCode"], "unknown_command", "{r}");
    }

    let m = eventually(20, "metrics agree with what was done", || async {
        let m = parse(&scrape(port));
        let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
        (get("ottomato_workloads{kind=sim,status=running}") == 5.0
            && get("ottomato_workloads{kind=sim,status=initializing}") == 1.0
            && get("ottomato_init_failures_total{}") >= 1.0)
            .then_some(m)
    })
    .await;
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in {:?}", m.keys().collect::<Vec<_>>()))
    };
    assert_eq!(get("ottomato_tasks_total{outcome=ok}"), 7.0);
    assert_eq!(get("ottomato_tasks_total{outcome=unknown_command}"), 3.0);
    assert_eq!(get("ottomato_tasks_total{outcome=busy}"), 0.0);
    assert_eq!(get("ottomato_task_duration_seconds_count{}"), 10.0);
    assert_eq!(get("ottomato_task_duration_seconds_bucket{le=+Inf}"), 10.0);
    assert_eq!(get("ottomato_workloads{kind=sim,status=dead}"), 0.0);
    assert_eq!(get("ottomato_claims_total{}"), 6.0);
    assert_eq!(get("ottomato_fences_total{}"), 0.0);
    assert!(get("ottomato_inits_total{}") >= 6.0);
    assert_eq!(get("ottomato_nats_connected{}"), 1.0);
    assert!(get("ottomato_lease_remaining_seconds{}") > 0.0);
    assert!(get("ottomato_lease_renewals_total{}") >= 1.0);
    assert_eq!(get("ottomato_tasks_queued{}"), 0.0);
    // Three slow tasks on one workload (one at a time): two wait in its queue.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let client = op.client.clone();
        slow.push(tokio::spawn(async move {
            let req = async_nats::Request::new()
                .payload(Bytes::from(r#"{"command":"sleep","kwargs":{"ms":1500}}"#))
                .timeout(Some(Duration::from_secs(15)));
            client
                .send_request("otto.task.write.ok-1", req)
                .await
                .map(|_| ())
        }));
    }
    eventually(10, "two tasks queued", || async {
        let m = parse(&scrape(port));
        (m.get("ottomato_tasks_queued{}") == Some(&2.0)).then_some(())
    })
    .await;
    for t in slow {
        t.await.unwrap().unwrap();
    }
    let m = parse(&scrape(port));
    assert_eq!(m.get("ottomato_tasks_queued{}"), Some(&0.0));
    assert!(get("ottomato_state_writer_backlog{}") >= 0.0);
    // Bounded labels: no series carries a workload id.
    assert!(
        m.keys()
            .all(|k| !k.contains("ok-0") && !k.contains("never")),
        "{:?}",
        m.keys().collect::<Vec<_>>()
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_found_through_srv_ping_and_inspected_with_a_plain_nats_client() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let _a = NodeProc::start(&server.url, "a", &logs.0, &["--zone", "z1"]);
    let _b = NodeProc::start(&server.url, "b", &logs.0, &["--zone", "z2"]);
    for i in 0..4 {
        op.add(&format!("w-{i}"), json!({"kind": "sim"})).await;
    }
    eventually(30, "four running", || async {
        let snap = op.snapshot().await;
        (snap.values().filter(|(_, s)| s == "running").count() == 4).then_some(())
    })
    .await;

    // Every node answers $SRV.PING.ottomato; gather the answers for a moment.
    let client = &op.client;
    let gather = |subject: String| async move {
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply(subject, inbox, Bytes::new())
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(750), sub.next()).await {
            got.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
        }
        got
    };
    let pings = eventually(20, "both nodes answer $SRV.PING", || async {
        let p = gather("$SRV.PING.ottomato".into()).await;
        (p.len() == 2).then_some(p)
    })
    .await;
    assert!(
        pings
            .iter()
            .all(|p| p["name"] == "ottomato" && p["type"] == "io.nats.micro.v1.ping_response"),
        "{pings:?}"
    );
    let infos = gather("$SRV.INFO.ottomato".into()).await;
    let mut nodes: Vec<(String, String, String)> = infos
        .iter()
        .map(|i| {
            (
                i["metadata"]["node_id"].as_str().unwrap().to_string(),
                i["metadata"]["zone"].as_str().unwrap().to_string(),
                i["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    nodes.sort();
    assert_eq!(
        nodes
            .iter()
            .map(|n| (n.0.as_str(), n.1.as_str()))
            .collect::<Vec<_>>(),
        vec![("a", "z1"), ("b", "z2")],
        "{infos:?}"
    );
    assert!(infos
        .iter()
        .all(|i| i["metadata"]["kinds"].as_str().unwrap().contains("sim")));
    // STATS of one service instance: its node's workloads, as placed.
    let owned_by_a = op
        .snapshot()
        .await
        .values()
        .filter(|(o, s)| o == "a" && s == "running")
        .count();
    let stats = gather(format!("$SRV.STATS.ottomato.{}", nodes[0].2)).await;
    assert_eq!(stats.len(), 1, "{stats:?}");
    let data = &stats[0]["endpoints"][0]["data"];
    assert_eq!(data["nodeId"], "a", "{stats:?}");
    assert_eq!(
        data["byStatus"]["running"].as_u64().unwrap_or(0) as usize,
        owned_by_a,
        "{stats:?}"
    );
    // The same status on the node's own subject.
    let m = client
        .request("otto.node.b.status", Bytes::new())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["nodeId"], "b");
    assert_eq!(v["zone"], "z2");
    assert_eq!(v["workloads"].as_u64().unwrap() as usize, 4 - owned_by_a);
}
