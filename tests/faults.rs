//! Failover, fencing and placement under faults, with every worker node a
//! separate `ottomato node` OS process and real nats-servers: kill -9, SIGSTOP
//! past the TTL, a nats-server restart, the loss of one server of a 3-server
//! JetStream cluster, zones, capacity and scale-out.
//!
//! "Exactly once" is checked twice: by a KV watcher (no owner change except
//! from a node the test killed or froze) and by the simulated devices
//! themselves, which trace the start and end of every call with the calling
//! process and instance ([`ottomato::actors::sim::trace::overlaps`]).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use support::fleet::{
    add_traced, all_running_on, answered_by_owners, assert_single_drivers,
    assert_single_drivers_frozen, ids, settle, traced_fleet, unix_ns, TTL,
};
use support::{eventually, signal, NatsServer, NodeProc, Operator, TempDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_three_nodes_fails_over_within_ttl_plus_2s() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let mut fleet = traced_fleet(&op, &server.url, "k", 300, &[], 90).await;
    let victims = fleet.owned_by("b");
    assert!(victims.len() > 50, "b owns only {}", victims.len());

    op.gone.lock().unwrap().insert("b".into());
    let killed = Instant::now();
    fleet.kill(1);
    all_running_on(&op, &victims, &["a", "c"], 30).await;
    let took = killed.elapsed();
    assert!(
        took <= TTL + Duration::from_secs(2),
        "failover took {took:?}"
    );
    eprintln!("failover of {} workloads took {took:?}", victims.len());

    let owners = all_running_on(&op, &fleet.ids, &["a", "c"], 30).await;
    answered_by_owners(&op, &owners).await;
    op.assert_no_double_owner();
    assert_single_drivers(&fleet.trace, &fleet.died);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_ttl_fences_itself_and_nothing_runs_twice() {
    support::init_logs();
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let fleet = traced_fleet(&op, &server.url, "p", 150, &[], 90).await;
    let ids = &fleet.ids;
    let [a, b, c] = &fleet.nodes[..] else {
        unreachable!("three nodes")
    };
    let frozen = fleet.owned_by("b");
    assert!(!frozen.is_empty());

    op.gone.lock().unwrap().insert("b".into());
    let paused = Instant::now();
    signal(b.pid(), "STOP");
    // (Taken after the signal: b runs until it lands.)
    let stopped_ns = unix_ns();
    // Its workloads move while it is frozen…
    all_running_on(&op, &frozen, &["a", "c"], 30).await;
    // …and it stays frozen for 2 × TTL in all (the scenario, not a wait for convergence).
    tokio::time::sleep((paused + 2 * TTL).saturating_duration_since(Instant::now())).await;
    let resumed_ns = unix_ns();
    signal(b.pid(), "CONT");
    let resumed = Instant::now();

    // It rejoins and may get a share back, by clean handover only.
    let owners = settle(&op, ids, Duration::from_secs(3), 90).await;
    answered_by_owners(&op, &owners).await;
    op.assert_no_double_owner();
    let trace_lines = assert_single_drivers_frozen(
        &fleet.trace,
        &fleet.died,
        &HashMap::from([(b.pid(), (stopped_ns, resumed_ns))]),
    );
    // No stale actor on the resumed node: in the last second, each device is
    // pinged by one process only, the one whose node owns it.
    let pids: HashMap<u32, &str> = [(a.pid(), "a"), (b.pid(), "b"), (c.pid(), "c")].into();
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        - 1_500_000_000;
    let mut pingers: HashMap<&str, HashSet<&str>> = HashMap::new();
    for t in trace_lines
        .iter()
        .filter(|t| t.ns > cutoff && t.event == "ping" && t.start)
    {
        pingers.entry(&t.id).or_default().insert(pids[&t.pid]);
    }
    for (id, who) in &pingers {
        assert_eq!(who.len(), 1, "{id} pinged by {who:?}");
        assert!(
            who.contains(owners[*id].as_str()),
            "{id} pinged by {who:?}, owned by {}",
            owners[*id]
        );
    }
    // The resumed node refused device work until it had sorted itself out:
    // nothing it traced between resume and its first re-init is a ping.
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        log.contains("lease expired"),
        "b did not notice its lease ran out:\n{log}"
    );
    eprintln!("resumed after {:?}", resumed - paused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_loses_nothing() {
    support::init_logs();
    let server = NatsServer::start();
    let url = server.url.clone();
    let op = Operator::connect(&url, 1).await;
    let fleet = traced_fleet(&op, &url, "r", 150, &[], 90).await;

    let (port, store) = server.kill();
    let server = NatsServer::start_with(Some(port), store, &[]);
    assert_eq!(server.url, url);

    let owners = settle(&op, &fleet.ids, Duration::from_secs(3), 90).await;
    // No spec lost.
    assert_eq!(op.spec_count().await, fleet.ids.len());
    answered_by_owners(&op, &owners).await;
    assert_single_drivers(&fleet.trace, &fleet.died);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_server_of_a_three_server_cluster_is_survived() {
    support::init_logs();
    support::ensure_nats_server();
    let client_ports: Vec<u16> = (0..3).map(|_| support::free_port()).collect();
    let route_ports: Vec<u16> = (0..3).map(|_| support::free_port()).collect();
    let mut servers: Vec<Option<NatsServer>> = (0..3)
        .map(|i| {
            let routes: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats://127.0.0.1:{}", route_ports[j]))
                .collect();
            let name = format!("s{i}");
            let cluster = format!("nats://127.0.0.1:{}", route_ports[i]);
            let routes = routes.join(",");
            Some(NatsServer::start_with(
                Some(client_ports[i]),
                TempDir::new("nats"),
                &[
                    "-n",
                    &name,
                    "--cluster_name",
                    "otto",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &routes,
                ],
            ))
        })
        .collect();
    let urls: Vec<String> = client_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    let all = urls.join(",");
    let op = Operator::connect(&urls[1], 3).await;
    let fleet = traced_fleet(&op, &all, "c", 60, &["--replicas", "3"], 120).await;

    servers[0].take(); // killed and cleaned
    let owners = settle(&op, &fleet.ids, Duration::from_secs(3), 120).await;
    answered_by_owners(&op, &owners).await;
    assert_eq!(op.spec_count().await, fleet.ids.len(), "a spec was lost");
    assert_single_drivers(&fleet.trace, &fleet.died);
    drop(fleet); // nodes before servers
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_and_capacity_are_honoured() {
    support::init_logs();
    let server = NatsServer::start();
    let logs = TempDir::new("logs");
    let trace = logs.0.join("trace.log");
    let op = Operator::connect(&server.url, 1).await;
    let zone_b = ids("zb", 60);
    let free = ids("f", 60);
    let nowhere = ids("zc", 2);
    add_traced(&op, &zone_b, &trace, json!({"placement": {"zone": "b"}})).await;
    add_traced(&op, &free, &trace, json!({})).await;
    add_traced(&op, &nowhere, &trace, json!({"placement": {"zone": "c"}})).await;
    let _a = NodeProc::start(&server.url, "a1", &logs.0, &["--zone", "a"]);
    let _b1 = NodeProc::start(&server.url, "b1", &logs.0, &["--zone", "b"]);
    let _b2 = NodeProc::start(
        &server.url,
        "b2",
        &logs.0,
        &["--zone", "b", "--capacity", "25"],
    );
    let mut all = zone_b.clone();
    all.extend(free.iter().cloned());
    let owners = settle(&op, &all, Duration::from_secs(2), 90).await;
    for id in &zone_b {
        assert_ne!(owners[id], "a1", "{id} requires zone b");
    }
    // Never, not even for a moment: the watcher saw every owner.
    for (id, hist) in op.history.lock().unwrap().iter() {
        if id.starts_with("zb") {
            assert!(
                !hist.iter().any(|o| o == "a1"),
                "{id} ran in zone a: {hist:?}"
            );
        }
    }
    let b2 = owners.values().filter(|o| *o == "b2").count();
    assert!(b2 <= 25, "b2 holds {b2} > capacity 25");
    let peak = op.max_load.lock().unwrap().get("b2").copied().unwrap_or(0);
    assert!(peak <= 25, "b2 held {peak} at some moment > capacity 25");
    assert!(peak > 0, "b2 never held anything");
    // A workload no live node may run shows why.
    let snap = eventually(30, "unplaceable records", || async {
        let snap = op.snapshot().await;
        nowhere
            .iter()
            .all(|id| snap.get(id).is_some_and(|(_, s)| s == "unplaceable"))
            .then_some(snap)
    })
    .await;
    assert_eq!(
        snap[&nowhere[0]].0, "",
        "an unplaceable workload has no owner"
    );
    let rec: Value =
        serde_json::from_slice(&op.state.get(&nowhere[0]).await.unwrap().unwrap()).unwrap();
    assert!(
        rec["reason"].as_str().unwrap().contains("zone \"c\""),
        "{rec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_from_three_to_four_moves_a_quarter_and_ends_balanced() {
    support::init_logs();
    let server = NatsServer::start();
    let logs = TempDir::new("logs");
    let op = Operator::connect(&server.url, 1).await;
    let ids = ids("s", 2000);
    for id in &ids {
        op.add(id, json!({"kind": "sim"})).await;
    }
    let _a = NodeProc::start(&server.url, "a", &logs.0, &[]);
    let _b = NodeProc::start(&server.url, "b", &logs.0, &[]);
    let _c = NodeProc::start(&server.url, "c", &logs.0, &[]);
    let before = settle(&op, &ids, Duration::from_secs(2), 120).await;
    let deletes_before = *op.deletes.lock().unwrap();
    let _d = NodeProc::start(&server.url, "d", &logs.0, &[]);
    let after = settle(&op, &ids, Duration::from_secs(3), 120).await;
    let moves = *op.deletes.lock().unwrap() - deletes_before;
    let changed = ids.iter().filter(|i| before[*i] != after[*i]).count() as u64;
    let ideal = ids.len() as f64 / 4.0;
    eprintln!("scale-out: {moves} handoffs, {changed} changed owner, ideal {ideal}");
    assert!(
        moves as f64 <= 1.1 * ideal,
        "{moves} handoffs > 1.1 × {ideal}"
    );
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for o in after.values() {
        *load.entry(o).or_insert(0) += 1;
    }
    let (max, min) = (*load.values().max().unwrap(), *load.values().min().unwrap());
    assert_eq!(load.len(), 4, "{load:?}");
    assert!((max - min) as f64 <= 0.01 * ideal, "unbalanced: {load:?}");
    op.assert_no_double_owner();
}

/// The permissions subjects.md recommends, as a nats-server authorization block.
fn auth_conf() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/subjects.md")).unwrap();
    let quote = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let user = |name: &str, pw: &str, role: &str| {
        let (p, s) = support::role_permissions(&doc, role);
        assert!(!p.is_empty() && !s.is_empty(), "{role}: empty permissions");
        format!(
            "{{ user: {name}, password: {pw}, permissions: {{ publish: [{}], subscribe: [{}] }} }}",
            quote(&p),
            quote(&s)
        )
    };
    format!(
        "authorization {{\n  users = [\n    {},\n    {},\n    {},\n    {},\n    {}\n  ]\n}}\n",
        user("node", "npw", "Worker node"),
        user("op", "opw", "Operator client"),
        user("reader", "rpw", "Read-only operator"),
        user("sched", "spw", "Schedule manager"),
        user("watcher", "wpw", "Read-only watcher")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommended_permissions_let_each_role_do_its_job_and_no_more() {
    support::init_logs();
    let logs = TempDir::new("logs");
    let conf = logs.0.join("auth.conf");
    std::fs::write(&conf, auth_conf()).unwrap();
    let server =
        NatsServer::start_with(None, TempDir::new("nats"), &["-c", conf.to_str().unwrap()]);
    let url = server.url.clone();
    let _node = NodeProc::start(
        &url,
        "n1",
        &logs.0,
        &[
            "--user",
            "node",
            "--password",
            "npw",
            "--inbox-prefix",
            "_INBOX.node",
        ],
    );
    let op = [
        "--user",
        "op",
        "--password",
        "opw",
        "--inbox-prefix",
        "_INBOX.operator",
    ];
    let run = |args: Vec<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || support::cli(&url, &args))
    };
    // The node creates the buckets; then the operator adds a workload and runs a task.
    eventually(30, "the node registered", || async {
        let (code, out, _) = run([&op[..], &["status", "--json"]].concat())
            .await
            .unwrap();
        (code == 0 && out.contains("\"n1\"")).then_some(())
    })
    .await;
    let (code, _, err) = run([&op[..], &["workload", "add", "w1", "--kind", "sim"]].concat())
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let out = eventually(30, "w1 answers", || async {
        let (code, out, _) = run([&op[..], &["task", "run", "w1", "hello"]].concat())
            .await
            .unwrap();
        (code == 0).then_some(out)
    })
    .await;
    assert!(out.contains("hello from w1"), "{out}");
    let (code, out, _) = run(vec![
        "--user",
        "watcher",
        "--password",
        "wpw",
        "--inbox-prefix",
        "_INBOX.watcher",
        "workload",
        "ls",
        "--json",
    ])
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("\"running\""), "{out}");

    // The watcher finds the node through NATS service discovery and reads
    // its status (the node may subscribe to $SRV and its status subject).
    let (denied_tx, mut denied) = tokio::sync::mpsc::unbounded_channel::<String>();
    let watcher =
        async_nats::ConnectOptions::with_user_and_password("watcher".into(), "wpw".into())
            .custom_inbox_prefix("_INBOX.watcher")
            .event_callback(move |e| {
                let tx = denied_tx.clone();
                async move {
                    if let async_nats::Event::ServerError(err) = e {
                        let _ = tx.send(err.to_string());
                    }
                }
            })
            .connect(&url)
            .await
            .unwrap();
    // The watcher may not listen on the operator's inboxes: the server
    // refuses the subscription, and nothing of the operator's arrives.
    let mut spy = watcher.subscribe("_INBOX.operator.>").await.unwrap();
    let refusal = tokio::time::timeout(Duration::from_secs(5), denied.recv())
        .await
        .expect("the server refuses the watcher's subscription to the operator's inboxes")
        .unwrap();
    assert!(
        refusal.to_lowercase().contains("permissions violation")
            && refusal.contains("_INBOX.operator"),
        "{refusal}"
    );
    let (code, _, err) = run([&op[..], &["task", "run", "w1", "hello"]].concat())
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut spy)
        )
        .await
        .map_or(true, |m| m.is_none()),
        "the watcher read an operator's task reply"
    );
    let ping = eventually(20, "the node answers $SRV.PING", || async {
        let m = watcher
            .request("$SRV.PING.ottomato", Bytes::new())
            .await
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&m.payload).ok()
    })
    .await;
    assert_eq!(ping["name"], "ottomato", "{ping}");
    let m = watcher
        .request("otto.node.n1.status", Bytes::new())
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(status["nodeId"], "n1", "{status}");

    // The operator can't write state; the watcher can't add workloads.
    let nc = async_nats::ConnectOptions::with_user_and_password("op".into(), "opw".into())
        .custom_inbox_prefix("_INBOX.operator")
        .connect(&url)
        .await
        .unwrap();
    let mut js = async_nats::jetstream::new(nc);
    js.set_timeout(Duration::from_secs(2));
    let state = js.get_key_value("otto_state").await.unwrap();
    assert!(
        state.put("w1", Bytes::from_static(b"{}")).await.is_err(),
        "operator wrote otto_state"
    );
    let (code, _, err) = run(vec![
        "--user",
        "watcher",
        "--password",
        "wpw",
        "--inbox-prefix",
        "_INBOX.watcher",
        "workload",
        "add",
        "w2",
        "--kind",
        "sim",
    ])
    .await
    .unwrap();
    assert_ne!(code, 0, "the watcher added a workload");
    assert!(!err.is_empty());

    // The read-only operator, from the CLI: reads run; a write is refused
    // by NATS itself on the write subject, and by the node (`forbidden`)
    // when smuggled onto the read subject; the same for fan-out.
    let reader = |extra: &[&'static str]| -> Vec<&'static str> {
        [
            &[
                "--user",
                "reader",
                "--password",
                "rpw",
                "--inbox-prefix",
                "_INBOX.reader",
            ][..],
            extra,
        ]
        .concat()
    };
    let set: &[&str] = &["--kwargs", r#"{"ping_ms": 5}"#, "--timeout", "3s"];
    let (code, out, err) = run(reader(&[
        "--task-class",
        "read",
        "task",
        "run",
        "w1",
        "echo",
        "7",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "reader's read: {out}{err}");
    let (code, out, _) = run(reader(
        &[
            &["--task-class", "read", "task", "run", "w1", "set"][..],
            set,
        ]
        .concat(),
    ))
    .await
    .unwrap();
    assert_ne!(code, 0);
    assert!(out.contains("forbidden"), "{out}");
    let (code, _, err) = run(reader(&[&["task", "run", "w1", "set"][..], set].concat()))
        .await
        .unwrap();
    assert_ne!(code, 0, "the reader wrote to a device");
    assert!(
        err.to_lowercase().contains("permissions violation") && err.contains("otto.task.write.w1"),
        "{err}"
    );
    let (code, out, err) = run(reader(&[
        "--task-class",
        "read",
        "task",
        "run",
        "--select",
        "w*",
        "hello",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "reader's read fan-out: {out}{err}");
    assert!(out.contains("hello from w1"), "{out}");
    let (code, out, _) = run(reader(
        &[
            &[
                "--task-class",
                "read",
                "task",
                "run",
                "--select",
                "w*",
                "set",
            ][..],
            set,
        ]
        .concat(),
    ))
    .await
    .unwrap();
    assert_ne!(code, 0);
    assert!(out.contains("forbidden"), "{out}");
    let (code, _, err) = run(reader(
        &[&["task", "run", "--select", "w*", "set"][..], set].concat(),
    ))
    .await
    .unwrap();
    assert_ne!(code, 0, "the reader fanned out a write");
    assert!(
        err.to_lowercase().contains("permissions violation") && err.contains("otto.fanout.write"),
        "{err}"
    );

    // The schedule manager writes schedules, not specs; its schedule runs
    // (with the node's rights) and the reader reads the results; the
    // watcher may not.
    let sched = |extra: &[&'static str]| -> Vec<&'static str> {
        [
            &[
                "--user",
                "sched",
                "--password",
                "spw",
                "--inbox-prefix",
                "_INBOX.scheduler",
            ][..],
            extra,
        ]
        .concat()
    };
    let (code, out, err) = run(sched(&[
        "schedule", "add", "hi", "--every", "1s", "--select", "w1", "hello",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, _) = run(sched(&["workload", "add", "w3", "--kind", "sim"]))
        .await
        .unwrap();
    assert_ne!(code, 0, "the schedule manager added a workload");
    let out = eventually(30, "the reader reads the schedule's results", || async {
        let (code, out, _) = run(reader(&["results", "--schedule", "hi"])).await.unwrap();
        (code == 0 && out.contains("hello from w1")).then_some(out)
    })
    .await;
    assert!(out.contains("w1"), "{out}");
    let (code, _, err) = run(vec![
        "--user",
        "watcher",
        "--password",
        "wpw",
        "--inbox-prefix",
        "_INBOX.watcher",
        "results",
    ])
    .await
    .unwrap();
    assert_ne!(code, 0, "the watcher read results");
    assert!(!err.is_empty());
    let (code, _, err) = run(sched(&["schedule", "rm", "hi"])).await.unwrap();
    assert_eq!(code, 0, "{err}");

    // Task rights for a selection, listed from the workloads bucket.
    let (code, out, err) = run(reader(&[
        "permissions",
        "--role",
        "reader",
        "--select",
        "w*",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"otto.task.read.w1\"") && !out.contains("fanout"),
        "{out}"
    );

    // The same roles from a plain nats-py client.
    support::peers::ensure_pip("nats-py", "nats");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/roles_check.py");
    let url2 = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &url2, "w1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("OK"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Wrong or missing credentials: one clear line, non-zero exit.
    for args in [
        vec!["--user", "op", "--password", "nope", "status"],
        vec!["status"],
    ] {
        let (code, _, err) = run(args).await.unwrap();
        assert_eq!(code, 1);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: cannot connect to NATS")
                && err.to_lowercase().contains("authoriz"),
            "{err}"
        );
    }
}
