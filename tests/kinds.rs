//! The protocol kinds against real peers nobody here wrote (pymodbus,
//! httpbin under gunicorn, plain TCP listeners), end to end through a
//! cluster: spec in the bucket → a node process runs it → a task from a
//! plain NATS client → the protocol's values (or its error code).

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use support::peers::{self, low_port, Tls};
use support::{eventually, NatsServer, NodeProc, Operator, TempDir};

/// Sends a task over plain NATS and returns the reply.
async fn task(op: &Operator, id: &str, command: &str, kwargs: Value) -> Value {
    let body = json!({"command": command, "kwargs": kwargs});
    let req = async_nats::Request::new()
        .payload(Bytes::from(body.to_string()))
        .timeout(Some(Duration::from_secs(20)));
    let m = op
        .client
        .send_request(format!("otto.task.{id}"), req)
        .await
        .unwrap_or_else(|e| panic!("{command} on {id}: no reply: {e}"));
    serde_json::from_slice(&m.payload).unwrap()
}

/// The task's return value, asserting success.
async fn ok(op: &Operator, id: &str, command: &str, kwargs: Value) -> Value {
    let r = task(op, id, command, kwargs.clone()).await;
    assert_eq!(r["success"], true, "{command} {kwargs} on {id}: {r}");
    r["return"].clone()
}

/// The task's error code and message, asserting failure.
async fn fails(op: &Operator, id: &str, command: &str, kwargs: Value) -> (String, String) {
    let r = task(op, id, command, kwargs.clone()).await;
    assert_eq!(r["success"], false, "{command} {kwargs} on {id}: {r}");
    (
        r["errorCode"].as_str().unwrap_or("").to_string(),
        r["error"].as_str().unwrap_or("").to_string(),
    )
}

/// Waits until the workload's status (from the state bucket) is `status`;
/// its record.
async fn wait_status(op: &Operator, id: &str, status: &str, secs: u64) -> Value {
    eventually(secs, &format!("{id} {status}"), || async {
        let v = op.state.get(id).await.ok().flatten()?;
        let rec: Value = serde_json::from_slice(&v).ok()?;
        (rec["status"] == status).then_some(rec)
    })
    .await
}

/// Waits until the workload's record gives a reason containing `needle`;
/// the record (the last one seen is in the failure message).
async fn wait_reason(op: &Operator, id: &str, needle: &str, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(v)) = op.state.get(id).await {
            last = serde_json::from_slice(&v).unwrap_or_default();
            if last["reason"].as_str().unwrap_or("").contains(needle) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id}: no reason with {needle:?} within {secs} s; last record: {last}");
}

/// One node process on a fresh NATS server, with `extra` node flags.
struct Cluster {
    op: Operator,
    _node: NodeProc,
    _logs: TempDir,
    _server: NatsServer,
}

async fn cluster(extra: &[&str]) -> Cluster {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let mut args = vec!["--ping-timeout", "2s"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(&server.url, "n1", &logs.0, &args);
    Cluster {
        op,
        _node: node,
        _logs: logs,
        _server: server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_reads_decodes_writes_and_reports_exceptions_and_outages_against_pymodbus() {
    let port = low_port();
    let peer = peers::modbus(port);
    let c = cluster(&[]).await;
    let op = &c.op;
    op.add(
        "plc-1",
        json!({"kind": "modbus", "config": {
        "host": "127.0.0.1", "port": port, "unit": 1, "timeoutMs": 1000,
        "fields": [
            {"name": "voltage", "register": "input", "address": 0, "type": "uint16", "scale": 0.1},
            {"name": "energy", "register": "input", "address": 1, "type": "uint32"},
            {"name": "setpoint", "address": 9, "type": "float32", "order": "CDAB"}
        ]}}),
    )
    .await;
    wait_status(op, "plc-1", "running", 30).await;

    // Raw tables.
    let v = ok(
        op,
        "plc-1",
        "read_holding_registers",
        json!({"address": 0, "count": 1}),
    )
    .await;
    assert_eq!(v["values"], json!([1234]));
    let v = ok(op, "plc-1", "read_coils", json!({"address": 0, "count": 4})).await;
    assert_eq!(v["values"], json!([true, false, true, false]));
    let v = ok(
        op,
        "plc-1",
        "read_discrete_inputs",
        json!({"address": 0, "count": 2}),
    )
    .await;
    assert_eq!(v["values"], json!([true, true]));
    // Every data type, as the peer stored it.
    for (address, ty, order, want) in [
        (1, "int32", "ABCD", json!(-123456)),
        (3, "float32", "ABCD", json!(3.5)),
        (5, "float64", "ABCD", json!(-2.25)),
        (9, "float32", "CDAB", json!(3.5)),
        (11, "int64", "ABCD", json!(-9876543210i64)),
        (15, "int16", "ABCD", json!(-42)),
    ] {
        let v = ok(
            op,
            "plc-1",
            "read",
            json!({"address": address, "type": ty, "order": order}),
        )
        .await;
        assert_eq!(v["value"], want, "{ty} {order} at {address}");
    }
    // The configured fields, scaled.
    let v = ok(op, "plc-1", "poll", json!({})).await;
    assert_eq!(v["fields"]["energy"], json!(4_000_000_000u64));
    assert_eq!(v["fields"]["setpoint"], json!(3.5));
    assert!(
        (v["fields"]["voltage"].as_f64().unwrap() - 230.0).abs() < 1e-9,
        "{v}"
    );
    // Writes land on the device.
    ok(
        op,
        "plc-1",
        "write",
        json!({"address": 20, "type": "float32", "order": "BADC", "value": 1.25}),
    )
    .await;
    let v = ok(
        op,
        "plc-1",
        "read",
        json!({"address": 20, "type": "float32", "order": "BADC"}),
    )
    .await;
    assert_eq!(v["value"], json!(1.25));
    ok(
        op,
        "plc-1",
        "write_multiple_registers",
        json!({"address": 30, "values": [7, 8]}),
    )
    .await;
    let v = ok(
        op,
        "plc-1",
        "read_holding_registers",
        json!({"address": 30, "count": 2}),
    )
    .await;
    assert_eq!(v["values"], json!([7, 8]));
    ok(
        op,
        "plc-1",
        "write_single_coil",
        json!({"address": 1, "value": true}),
    )
    .await;
    let v = ok(op, "plc-1", "read_coils", json!({"address": 1, "count": 1})).await;
    assert_eq!(v["values"], json!([true]));

    // Protocol errors and bad arguments.
    let (code, msg) = fails(
        op,
        "plc-1",
        "read_holding_registers",
        json!({"address": 5000}),
    )
    .await;
    assert_eq!(code, "device_error", "{msg}");
    assert!(
        msg.contains("exception 2") && msg.contains("IllegalDataAddress"),
        "{msg}"
    );
    let (code, msg) = fails(op, "plc-1", "read", json!({"address": 0, "type": "int99"})).await;
    assert_eq!(code, "invalid_args", "{msg}");
    assert!(msg.contains("int99"), "{msg}");
    let (code, _) = fails(
        op,
        "plc-1",
        "write",
        json!({"address": 20, "type": "uint16", "value": 70000}),
    )
    .await;
    assert_eq!(code, "invalid_args");

    // A peer that stops answering: the call times out, the node stays up.
    peer.signal("STOP");
    let (code, msg) = fails(op, "plc-1", "read_holding_registers", json!({"address": 0})).await;
    assert_eq!(code, "timeout", "{msg}");
    peer.signal("CONT");
    let v = ok(op, "plc-1", "read_holding_registers", json!({"address": 0})).await;
    assert_eq!(v["values"], json!([1234]));

    // A peer that goes away: unreachable, then back by itself once it returns.
    drop(peer);
    let (code, msg) = fails(op, "plc-1", "read_holding_registers", json!({"address": 0})).await;
    assert!(code == "unreachable" || code == "timeout", "{code}: {msg}");
    let rec = wait_reason(op, "plc-1", "unreachable", 30).await;
    assert_ne!(rec["status"], "running", "{rec}");
    let _peer = peers::modbus(port);
    wait_status(op, "plc-1", "running", 60).await;
    let v = ok(op, "plc-1", "read_holding_registers", json!({"address": 0})).await;
    assert_eq!(v["values"], json!([1234]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_tls_with_named_credentials_against_httpbin() {
    let tls = Tls::generate();
    let (plain_port, tls_port) = (low_port(), low_port());
    let plain = peers::httpbin(plain_port, None);
    let _secure = peers::httpbin(tls_port, Some(&tls));
    let creds = TempDir::new("creds");
    let file = creds.0.join("credentials.toml");
    std::fs::write(
        &file,
        "[httpbin]\nusername = \"ops\"\npassword_env = \"KINDS_TEST_PW\"\n\n\
         [wrong]\nusername = \"ops\"\npassword = \"nope\"\n\n\
         [api]\ntoken = \"t0k3n\"\n",
    )
    .unwrap();
    // The password comes from the node's environment, named in the file.
    std::env::set_var("KINDS_TEST_PW", "s3cret");
    let file_arg = file.display().to_string();
    let c = cluster(&["--credentials", &file_arg]).await;
    let op = &c.op;
    let base = format!("https://127.0.0.1:{tls_port}");
    op.add(
        "gw-1",
        json!({"kind": "http", "config": {
            "baseUrl": base, "caFile": tls.path("ca.pem"), "credentials": "httpbin",
            "auth": "basic", "healthPath": "/status/200", "timeoutMs": 1500}}),
    )
    .await;
    op.add(
        "gw-wrong",
        json!({"kind": "http", "config": {
            "baseUrl": base, "caFile": tls.path("ca.pem"), "credentials": "wrong",
            "auth": "basic", "healthPath": "/status/200"}}),
    )
    .await;
    op.add(
        "gw-bearer",
        json!({"kind": "http", "config": {
            "baseUrl": format!("http://127.0.0.1:{plain_port}"), "credentials": "api",
            "auth": "bearer", "healthPath": "/status/204", "timeoutMs": 1500}}),
    )
    .await;
    // No CA: the peer's certificate is not trusted, never accepted.
    op.add(
        "gw-untrusted",
        json!({"kind": "http", "config": {"baseUrl": base, "healthPath": "/status/200"}}),
    )
    .await;
    for id in ["gw-1", "gw-wrong", "gw-bearer"] {
        wait_status(op, id, "running", 30).await;
    }

    let v = ok(op, "gw-1", "get", json!({"path": "/basic-auth/ops/s3cret"})).await;
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"]["authenticated"], true, "{v}");
    let (code, msg) = fails(
        op,
        "gw-wrong",
        "get",
        json!({"path": "/basic-auth/ops/s3cret"}),
    )
    .await;
    assert_eq!(code, "auth_failed", "{msg}");
    let v = ok(op, "gw-bearer", "get", json!({"path": "/bearer"})).await;
    assert_eq!(v["body"]["token"], "t0k3n", "{v}");
    let v = ok(
        op,
        "gw-1",
        "post",
        json!({"path": "/anything/setpoint", "json": {"value": 42}, "query": {"unit": "C"}}),
    )
    .await;
    assert_eq!(v["body"]["json"], json!({"value": 42}), "{v}");
    assert_eq!(v["body"]["args"]["unit"], "C", "{v}");
    assert_eq!(v["body"]["method"], "POST");
    let (code, msg) = fails(op, "gw-1", "delete", json!({"path": "/status/418"})).await;
    assert_eq!(code, "device_error", "{msg}");
    assert!(msg.starts_with("http 418"), "{msg}");
    let (code, _) = fails(op, "gw-1", "get", json!({"pth": "/typo"})).await;
    assert_eq!(code, "invalid_args");

    let rec = wait_reason(op, "gw-untrusted", "auth_failed", 30).await;
    assert_ne!(rec["status"], "running", "{rec}");

    // A peer that stops answering: timeout; back when it resumes.
    plain.signal("STOP");
    let (code, msg) = fails(op, "gw-bearer", "get", json!({"path": "/get"})).await;
    assert_eq!(code, "timeout", "{msg}");
    plain.signal("CONT");
    ok(op, "gw-bearer", "get", json!({"path": "/get"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_probe_and_specs_refused_at_import() {
    // Any real listener will do: the NATS server of this very test.
    let c = cluster(&[]).await;
    let op = &c.op;
    let nats_port: u16 = c._server.port;
    op.add(
        "port-1",
        json!({"kind": "tcp", "config": {"host": "127.0.0.1", "port": nats_port}}),
    )
    .await;
    wait_status(op, "port-1", "running", 30).await;
    let v = ok(op, "port-1", "probe", json!({})).await;
    assert_eq!(v["address"], format!("127.0.0.1:{nats_port}"));
    assert!(v["connectMs"].as_f64().unwrap() >= 0.0);
    // Nothing listens there: the workload is not running, and says why.
    let closed = low_port();
    op.add(
        "port-closed",
        json!({"kind": "tcp", "config": {"host": "127.0.0.1", "port": closed, "timeoutMs": 500}}),
    )
    .await;
    let rec = wait_reason(op, "port-closed", "unreachable", 30).await;
    assert_ne!(rec["status"], "running");

    // The CLI refuses bad configs and inline secrets before the bucket.
    let dir = TempDir::new("import");
    let file = dir.0.join("specs.jsonl");
    std::fs::write(
        &file,
        concat!(
            "{\"id\":\"ok-1\",\"kind\":\"tcp\",\"config\":{\"host\":\"127.0.0.1\",\"port\":1}}\n",
            "{\"id\":\"bad-1\",\"kind\":\"tcp\",\"config\":{\"host\":\"127.0.0.1\",\"prot\":1}}\n",
            "{\"id\":\"bad-2\",\"kind\":\"http\",\"config\":{\"baseUrl\":\"http://x\",\"password\":\"p\"}}\n",
            "{\"id\":\"bad-3\",\"kind\":\"modbus\",\"config\":{\"host\":\"h\",\"fields\":[{\"name\":\"a\",\"address\":0,\"type\":\"int17\"}]}}\n",
        ),
    )
    .unwrap();
    let url = c._server.url.clone();
    let (code, _out, err) =
        support::cli(&url, &["workload", "import", &file.display().to_string()]);
    assert_ne!(code, 0);
    assert!(err.contains("line 2") && err.contains("prot"), "{err}");
    assert!(
        err.contains("line 3") && err.contains("password") && err.contains("credentials"),
        "{err}"
    );
    assert!(err.contains("line 4") && err.contains("int17"), "{err}");
    // Nothing of a refused file is written.
    assert!(op.specs.get("ok-1").await.unwrap().is_none());
}

/// The `custom_node` example binary (built by `cargo test`; built here when
/// this test runs alone).
fn custom_node_exe() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join("custom_node");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = std::process::Command::new(cargo)
            .args(["build", "--quiet", "--example", "custom_node"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cargo build --example custom_node");
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_of_your_own_runs_in_a_cluster_node_with_the_full_command_line() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let dir = TempDir::new("custom");
    let config = dir.0.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"{}\"\nnode_id = \"edge-1\"\nheartbeat = \"1s\"\nttl = \"5s\"\n\
             drain_timeout = \"20s\"\nping_splay_min = \"500ms\"\nping_splay_max = \"1s\"\n\
             [labels]\nsite = \"lab\"\n",
            server.url
        ),
    )
    .unwrap();
    let out = dir.0.join("stdout");
    let mut child = std::process::Command::new(custom_node_exe())
        .args(["node", "--config", &config.display().to_string()])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.0.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    op.add("lamp-1", json!({"kind": "lamp"})).await;
    op.add("sim-1", json!({"kind": "sim"})).await;
    for id in ["lamp-1", "sim-1"] {
        let rec = wait_status(&op, id, "running", 30).await;
        assert_eq!(rec["owner"], "edge-1", "{rec}");
    }
    let v = ok(&op, "lamp-1", "switch", json!({"on": true})).await;
    assert_eq!(v, json!({"on": true}));
    let v = ok(&op, "lamp-1", "state", json!({})).await;
    assert_eq!(v, json!({"on": true}));
    let (code, _) = fails(&op, "lamp-1", "switch", json!({})).await;
    assert_eq!(code, "invalid_args");
    ok(&op, "sim-1", "hello", json!({})).await;

    // SIGTERM drains and leaves cleanly, as `ottomato node` does.
    support::signal(child.id(), "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let printed = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{status}: {printed}");
    assert!(printed.contains("node edge-1 joined") && printed.contains("left cleanly"), "{printed}");
}
