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

/// Sends a task over plain NATS (on the write subject) and returns the reply.
async fn task(op: &Operator, id: &str, command: &str, kwargs: Value) -> Value {
    task_as(op, "write", id, command, kwargs).await
}

/// Sends a task on the `class` subject and returns the reply.
async fn task_as(op: &Operator, class: &str, id: &str, command: &str, kwargs: Value) -> Value {
    let body = json!({"command": command, "kwargs": kwargs});
    let req = async_nats::Request::new()
        .payload(Bytes::from(body.to_string()))
        .timeout(Some(Duration::from_secs(20)));
    let m = op
        .client
        .send_request(format!("otto.task.{class}.{id}"), req)
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

/// Waits (polling to a deadline) until the workload's state record
/// satisfies `ok`; the record. On timeout the last record seen is in the
/// failure message.
async fn wait_record(
    op: &Operator,
    id: &str,
    what: &str,
    secs: u64,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(v)) = op.state.get(id).await {
            last = serde_json::from_slice(&v).unwrap_or_default();
            if ok(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id}: not {what} within {secs} s; last record: {last}");
}

/// Waits until the workload's status is `status`; its record.
async fn wait_status(op: &Operator, id: &str, status: &str, secs: u64) -> Value {
    wait_record(op, id, status, secs, |r| r["status"] == status).await
}

/// Waits until the workload's reason contains `needle`; its record.
async fn wait_reason(op: &Operator, id: &str, needle: &str, secs: u64) -> Value {
    let what = format!("giving a reason with {needle:?}");
    wait_record(op, id, &what, secs, |r| {
        r["reason"].as_str().unwrap_or("").contains(needle)
    })
    .await
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
    // Past the protocol's per-request limits: refused before anything is sent.
    let (code, msg) = fails(
        op,
        "plc-1",
        "read_holding_registers",
        json!({"address": 0, "count": 126}),
    )
    .await;
    assert_eq!(code, "invalid_args", "{msg}");
    assert!(msg.contains("125"), "{msg}");
    let (code, _) = fails(
        op,
        "plc-1",
        "write_multiple_registers",
        json!({"address": 0, "values": vec![1; 124]}),
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
    let mtls_port = low_port();
    let _mutual = peers::httpbin_with(mtls_port, Some(&tls), true);
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
    // Mutual TLS: the node presents a client certificate from its own files.
    let mbase = format!("https://127.0.0.1:{mtls_port}");
    op.add(
        "gw-mtls",
        json!({"kind": "http", "config": {
            "baseUrl": mbase, "caFile": tls.path("ca.pem"), "healthPath": "/status/200",
            "clientCertFile": tls.path("client.pem"), "clientKeyFile": tls.path("client.key")}}),
    )
    .await;
    op.add(
        "gw-nocert",
        json!({"kind": "http", "config": {
            "baseUrl": mbase, "caFile": tls.path("ca.pem"), "healthPath": "/status/200",
            "timeoutMs": 1500}}),
    )
    .await;
    for id in ["gw-1", "gw-wrong", "gw-bearer", "gw-mtls"] {
        wait_status(op, id, "running", 30).await;
    }
    let v = ok(op, "gw-mtls", "get", json!({"path": "/get"})).await;
    assert_eq!(v["status"], 200);
    let rec = wait_reason(op, "gw-nocert", "init attempt", 30).await;
    assert_ne!(rec["status"], "running", "{rec}");

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

    // A server that goes away and comes back: unreachable, then running by itself.
    drop(plain);
    let rec = wait_status(op, "gw-bearer", "unreachable", 30).await;
    assert!(
        rec["reason"].as_str().unwrap_or("").contains("unreachable"),
        "{rec}"
    );
    let _plain = peers::httpbin(plain_port, None);
    wait_status(op, "gw-bearer", "running", 60).await;
    ok(op, "gw-bearer", "get", json!({"path": "/bearer"})).await;
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
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let printed = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{status}: {printed}");
    assert!(
        printed.contains("node edge-1 joined") && printed.contains("left cleanly"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snmp_v2c_and_v3_get_walk_set_poll_against_net_snmp() {
    let port = low_port();
    let agent = peers::snmpd(port);
    let creds = TempDir::new("creds");
    let file = creds.0.join("credentials.toml");
    std::fs::write(
        &file,
        "[ro]\ncommunity = \"public\"\n[rw]\ncommunity = \"private\"\n\
         [v3-sha-aes]\nusername = \"shaAesUser\"\nauth_password = \"authpass123\"\npriv_password = \"privpass123\"\n\
         [v3-sha256]\nusername = \"sha256User\"\nauth_password_env = \"KINDS_SNMP_AUTH\"\npriv_password = \"privpass256\"\n\
         [v3-auth-only]\nusername = \"authOnlyUser\"\nauth_password = \"authonly123\"\n\
         [v3-wrong]\nusername = \"sha256User\"\nauth_password = \"wrongpass1\"\npriv_password = \"privpass256\"\n\
         [v3-unknown]\nusername = \"nosuchUser\"\nauth_password = \"whatever1\"\npriv_password = \"whatever1\"\n",
    )
    .unwrap();
    std::env::set_var("KINDS_SNMP_AUTH", "authpass256");
    let file_arg = file.display().to_string();
    let c = cluster(&["--credentials", &file_arg]).await;
    let op = &c.op;
    let base = |creds: &str, version: &str| {
        json!({"host": "127.0.0.1", "port": port, "version": version, "credentials": creds,
               "timeoutMs": 500, "retries": 1})
    };
    let mut v2c = base("ro", "2c");
    v2c["fields"] = json!([
        {"name": "uptime", "oid": "1.3.6.1.2.1.1.3.0"},
        {"name": "uptime_s", "oid": "1.3.6.1.2.1.1.3.0", "conversion": "float(2)"},
        {"name": "location", "oid": "1.3.6.1.2.1.1.6.0"}
    ]);
    v2c["tables"] = json!([{"name": "if", "oid": "1.3.6.1.2.1.2.2.1",
        "columns": [{"name": "descr", "oid": "1.3.6.1.2.1.2.2.1.2"},
                    {"name": "mtu", "oid": "1.3.6.1.2.1.2.2.1.4"},
                    {"name": "mac", "oid": "1.3.6.1.2.1.2.2.1.6", "conversion": "hwaddr"}]}]);
    let mut v3a = base("v3-sha-aes", "3");
    v3a["authProtocol"] = json!("sha1");
    v3a["privProtocol"] = json!("aes128");
    let mut v3b = base("v3-sha256", "3");
    v3b["authProtocol"] = json!("sha256");
    v3b["privProtocol"] = json!("aes256");
    let mut v3c = base("v3-auth-only", "3");
    v3c["authProtocol"] = json!("sha1");
    let mut v3bad = base("v3-wrong", "3");
    v3bad["authProtocol"] = json!("sha256");
    v3bad["privProtocol"] = json!("aes256");
    let mut v3unknown = base("v3-unknown", "3");
    v3unknown["authProtocol"] = json!("sha256");
    v3unknown["privProtocol"] = json!("aes256");
    for (id, config) in [
        ("sw-v2c", v2c),
        ("sw-rw", base("rw", "2c")),
        ("sw-v3a", v3a),
        ("sw-v3b", v3b),
        ("sw-v3c", v3c),
        ("sw-v3bad", v3bad),
        ("sw-v3unknown", v3unknown),
    ] {
        op.add(id, json!({"kind": "snmp", "config": config})).await;
    }
    for id in ["sw-v2c", "sw-rw", "sw-v3a", "sw-v3b", "sw-v3c"] {
        wait_status(op, id, "running", 30).await;
    }
    let location = json!({"oids": ["1.3.6.1.2.1.1.6.0"]});
    for id in ["sw-v2c", "sw-v3a", "sw-v3b", "sw-v3c"] {
        let v = ok(op, id, "get", location.clone()).await;
        assert_eq!(
            v["varbinds"],
            json!([{"oid": "1.3.6.1.2.1.1.6.0", "type": "string", "value": "lab-rack-7"}]),
            "{id}"
        );
    }
    // Wrong credentials, known user or not: auth_failed, not a timeout.
    for id in ["sw-v3unknown", "sw-v3bad"] {
        let rec = wait_reason(op, id, "auth_failed", 30).await;
        assert_ne!(rec["status"], "running", "{rec}");
    }

    let v = ok(
        op,
        "sw-v2c",
        "getnext",
        json!({"oids": ["1.3.6.1.2.1.1.6"]}),
    )
    .await;
    assert_eq!(v["varbinds"][0]["oid"], "1.3.6.1.2.1.1.6.0");
    // walk and bulkwalk see the same subtree, and only it.
    let oids = |v: &Value| -> Vec<String> {
        v["varbinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["oid"].as_str().unwrap().to_string())
            .collect()
    };
    let walk = ok(op, "sw-v3b", "walk", json!({"oid": "1.3.6.1.2.1.1"})).await;
    let bulk = ok(
        op,
        "sw-v3b",
        "bulkwalk",
        json!({"oid": "1.3.6.1.2.1.1", "maxRepetitions": 5}),
    )
    .await;
    assert_eq!(oids(&walk), oids(&bulk));
    assert!(oids(&walk).len() > 5, "{walk}");
    assert!(
        oids(&walk).iter().all(|o| o.starts_with("1.3.6.1.2.1.1.")),
        "{walk}"
    );
    assert!(oids(&walk).contains(&"1.3.6.1.2.1.1.3.0".to_string()));
    let descr = ok(
        op,
        "sw-v2c",
        "bulkwalk",
        json!({"oid": "1.3.6.1.2.1.2.2.1.2"}),
    )
    .await;
    assert!(
        descr["varbinds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["value"] == "lo"),
        "{descr}"
    );

    // poll: fields and a table joined by index (interface 1 is lo, MTU 65536).
    let v = ok(op, "sw-v2c", "poll", json!({})).await;
    assert_eq!(v["fields"]["location"], "lab-rack-7");
    assert!(v["fields"]["uptime"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["tables"]["if"]["1"]["descr"], "lo", "{v}");
    assert_eq!(v["tables"]["if"]["1"]["mtu"], 65536, "{v}");
    // Conversions: TimeTicks in seconds; lo's (empty) MAC, every other
    // interface's as aa:bb:cc:dd:ee:ff.
    let ticks = v["fields"]["uptime"].as_f64().unwrap();
    let secs = v["fields"]["uptime_s"].as_f64().unwrap();
    assert!((secs - ticks / 100.0).abs() < 1e-9, "{v}");
    let macs: Vec<&Value> = v["tables"]["if"]
        .as_object()
        .unwrap()
        .values()
        .map(|row| &row["mac"])
        .filter(|m| m.as_str().is_some_and(|s| !s.is_empty()))
        .collect();
    assert!(
        macs.iter()
            .all(|m| m.as_str().unwrap().split(':').count() == 6),
        "{v}"
    );

    // set: writable over v2c `private` and v3 rwuser; protocol errors otherwise.
    ok(
        op,
        "sw-rw",
        "set",
        json!({"oid": "1.3.6.1.2.1.1.5.0", "type": "string", "value": "edge-7"}),
    )
    .await;
    let v = ok(op, "sw-v3b", "get", json!({"oids": ["1.3.6.1.2.1.1.5.0"]})).await;
    assert_eq!(v["varbinds"][0]["value"], "edge-7");
    ok(
        op,
        "sw-v3b",
        "set",
        json!({"oid": "1.3.6.1.2.1.1.5.0", "type": "string", "value": "edge-8"}),
    )
    .await;
    let (code, msg) = fails(
        op,
        "sw-rw",
        "set",
        json!({"oid": "1.3.6.1.2.1.1.6.0", "type": "string", "value": "x"}),
    )
    .await;
    assert_eq!(code, "device_error", "{msg}");
    let (code, msg) = fails(
        op,
        "sw-rw",
        "set",
        json!({"oid": "1.3.6.1.2.1.1.5.0", "type": "counter99", "value": 1}),
    )
    .await;
    assert_eq!(code, "invalid_args", "{msg}");
    let (code, msg) = fails(op, "sw-v2c", "get", json!({"oids": ["sysName.0"]})).await;
    assert_eq!(code, "invalid_args", "{msg}");
    assert!(msg.contains("numeric"), "{msg}");

    // An agent that stops answering: timeout; fine again once it resumes.
    agent.signal("STOP");
    let (code, msg) = fails(op, "sw-v2c", "get", location.clone()).await;
    assert_eq!(code, "timeout", "{msg}");
    agent.signal("CONT");
    ok(op, "sw-v2c", "get", location.clone()).await;

    // An agent that goes away and comes back: unreachable, then running by itself.
    drop(agent);
    let rec = wait_status(op, "sw-v2c", "unreachable", 30).await;
    assert!(
        rec["reason"].as_str().unwrap_or("").contains("timeout"),
        "{rec}"
    );
    let _agent = peers::snmpd(port);
    wait_status(op, "sw-v2c", "running", 60).await;
    ok(op, "sw-v2c", "get", location).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_exec_and_interactive_send_with_a_pinned_host_key_against_openssh() {
    let keys = peers::SshKeys::generate();
    let port = low_port();
    let server = peers::sshd(port, &keys, "host_a");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let creds = TempDir::new("creds");
    let file = creds.0.join("credentials.toml");
    std::fs::write(
        &file,
        format!(
            "[ops]\nusername = \"{user}\"\nprivate_key_file = \"{}\"\n\
             [stranger]\nusername = \"{user}\"\nprivate_key_file = \"{}\"\n",
            keys.path("client"),
            keys.path("stranger")
        ),
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let c = cluster(&["--credentials", &file_arg]).await;
    let op = &c.op;
    let spec = |creds: &str, pin: (&str, String)| {
        let mut config = json!({"host": "127.0.0.1", "port": port, "credentials": creds,
                                "timeoutMs": 2000, "readOnlyCommands": ["uname -s"]});
        config[pin.0] = json!(pin.1);
        json!({"kind": "ssh", "config": config})
    };
    op.add("srv-1", spec("ops", ("hostKey", keys.public("host_a"))))
        .await;
    op.add(
        "srv-fp",
        spec("ops", ("hostKeyFingerprint", keys.fingerprint("host_a"))),
    )
    .await;
    op.add(
        "srv-stranger",
        spec("stranger", ("hostKey", keys.public("host_a"))),
    )
    .await;
    op.add(
        "srv-wrongpin",
        spec("ops", ("hostKey", keys.public("host_b"))),
    )
    .await;
    for id in ["srv-1", "srv-fp"] {
        wait_status(op, id, "running", 30).await;
    }
    let rec = wait_reason(op, "srv-stranger", "auth_failed", 30).await;
    assert_ne!(rec["status"], "running", "{rec}");
    let rec = wait_reason(op, "srv-wrongpin", "not the pinned", 30).await;
    assert!(
        rec["reason"].as_str().unwrap().contains("auth_failed"),
        "{rec}"
    );

    let v = ok(
        op,
        "srv-1",
        "exec",
        json!({"command": "echo hi; echo err >&2; exit 3"}),
    )
    .await;
    assert_eq!(
        v,
        json!({"stdout": "hi\n", "stderr": "err\n", "exitStatus": 3})
    );
    let v = ok(op, "srv-fp", "exec", json!({"command": "echo $((6 * 7))"})).await;
    assert_eq!(v["stdout"], "42\n");
    let v = ok(
        op,
        "srv-1",
        "send",
        json!({"commands": ["echo hello", "printf 'a\\nb\\n'"]}),
    )
    .await;
    assert_eq!(v["outputs"], json!(["hello", "a\nb"]), "{v}");
    // Only the exact command lines the spec lists run on the read subject.
    let r = task_as(op, "read", "srv-1", "exec", json!({"command": "uname -s"})).await;
    assert_eq!(r["return"]["stdout"], "Linux\n", "{r}");
    let r = task_as(
        op,
        "read",
        "srv-1",
        "send",
        json!({"commands": ["uname -s"]}),
    )
    .await;
    assert_eq!(r["return"]["outputs"], json!(["Linux"]), "{r}");
    for (command, kwargs) in [
        (
            "exec",
            json!({"command": "uname -s; touch /tmp/ottomato-forbidden"}),
        ),
        ("exec", json!({"command": "echo hi"})),
        ("send", json!({"commands": ["uname -s", "echo hi"]})),
    ] {
        let r = task_as(op, "read", "srv-1", command, kwargs.clone()).await;
        assert_eq!(r["errorCode"], "forbidden", "{command} {kwargs}: {r}");
    }
    assert!(!std::path::Path::new("/tmp/ottomato-forbidden").exists());
    let (code, _) = fails(op, "srv-1", "exec", json!({"cmd": "typo"})).await;
    assert_eq!(code, "invalid_args");

    // A server that stops answering: timeout; fine again once it resumes.
    server.signal("STOP");
    let (code, msg) = fails(op, "srv-1", "exec", json!({"command": "true"})).await;
    assert_eq!(code, "timeout", "{msg}");
    server.signal("CONT");
    eventually(30, "srv-1 answers again", || async {
        let r = task(op, "srv-1", "exec", json!({"command": "echo back"})).await;
        (r["return"]["stdout"] == "back\n").then_some(())
    })
    .await;

    // The server goes away and comes back (same key): unreachable, then
    // running again by itself, on a fresh session.
    drop(server);
    wait_status(op, "srv-1", "unreachable", 30).await;
    let server = peers::sshd(port, &keys, "host_a");
    wait_status(op, "srv-1", "running", 60).await;
    ok(op, "srv-1", "exec", json!({"command": "true"})).await;

    // The server comes back with another host key: never accepted.
    drop(server);
    let _server = peers::sshd(port, &keys, "host_b");
    let rec = wait_reason(op, "srv-1", "not the pinned", 60).await;
    assert_ne!(rec["status"], "running", "{rec}");
    let (code, msg) = fails(op, "srv-1", "exec", json!({"command": "true"})).await;
    assert!(
        code == "auth_failed" || code == "unreachable",
        "{code}: {msg}"
    );
}
