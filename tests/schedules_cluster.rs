//! Schedules across `ottomato node` processes on a real nats-server: every
//! workload's ticks run on its owner, continue on the new owner after a
//! kill -9 (the missed-tick policy honoured), never twice, and an edit or a
//! delete reaches every node. Results are read back from the stream.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use ottomato::results::{NatsResults, ResultQuery, ResultStore, StoredResult};
use ottomato::subjects::Subjects;
use serde_json::json;
use support::{eventually, NatsServer, NodeProc, Operator, TempDir};

const N: usize = 60;

async fn all_results(store: &NatsResults) -> Vec<StoredResult> {
    store.query(&ResultQuery::default()).await.unwrap()
}

fn cli(url: &str, args: &[&str]) -> String {
    let (code, out, err) = support::cli(url, args);
    assert_eq!(code, 0, "ottomato {args:?}: {out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_continue_on_the_new_owner_after_kill_9_and_none_runs_twice() {
    support::init_logs();
    let server = NatsServer::start();
    let url = server.url.clone();
    let op = Operator::connect(&url, 1).await;
    let logs = TempDir::new("logs");
    let mut nodes: Vec<NodeProc> = ["a", "b", "c"]
        .iter()
        .map(|id| NodeProc::start(&url, id, &logs.0, &[]))
        .collect();
    for i in 0..N {
        op.add(&format!("s{i}"), json!({"kind": "sim"})).await;
    }
    eventually(60, "every workload running", || async {
        (op.running().len() == N).then_some(())
    })
    .await;
    let out = cli(
        &url,
        &[
            "schedule", "add", "tick", "--every", "2s", "--splay", "1s", "--missed", "run-once",
            "hello",
        ],
    );
    assert!(out.contains("on 60 workload(s)"), "{out}");
    let store = NatsResults::open(
        async_nats::connect(&url).await.unwrap(),
        Subjects::default(),
    )
    .await
    .unwrap();
    // Two ticks everywhere before the kill.
    eventually(30, "two ticks of every workload", || async {
        let mut per: HashMap<String, usize> = HashMap::new();
        for r in all_results(&store).await {
            *per.entry(r.workload).or_default() += 1;
        }
        (per.len() == N && per.values().all(|n| *n >= 2)).then_some(())
    })
    .await;

    let victims: HashSet<String> = op
        .running()
        .into_iter()
        .filter(|(_, o)| o == "b")
        .map(|(w, _)| w)
        .collect();
    assert!(victims.len() >= 10, "b owns {}", victims.len());
    op.gone.lock().unwrap().insert("b".into());
    let killed = SystemTime::now();
    nodes[1].kill();
    eventually(30, "b's workloads running elsewhere", || async {
        let r = op.running();
        victims
            .iter()
            .all(|w| r.get(w).is_some_and(|o| o != "b"))
            .then_some(())
    })
    .await;
    // Then every workload ticks on, on its new owner.
    let later = killed + Duration::from_secs(10);
    eventually(40, "ticks after the failover everywhere", || async {
        let rs = all_results(&store).await;
        let ticked: HashSet<&str> = rs
            .iter()
            .filter(|r| r.result.tick.is_some_and(|t| t > later))
            .map(|r| r.workload.as_str())
            .collect();
        (ticked.len() == N).then_some(())
    })
    .await;

    let rs = all_results(&store).await;
    // One result per tick identity, and each from the workload's owner then.
    let mut seen = HashSet::new();
    for r in &rs {
        let tick = r.result.tick.expect("scheduled results carry their tick");
        assert_eq!(r.result.schedule_id.as_deref(), Some("tick"));
        assert!(
            seen.insert((r.workload.clone(), tick)),
            "tick {} of {} ran twice",
            humantime::format_rfc3339_millis(tick),
            r.workload
        );
        if r.result.worker_id == "b" {
            assert!(tick < killed, "b ran a tick after its death: {r:?}");
        }
    }
    // missed: run-once: each moved workload ran exactly one missed tick on
    // its new owner — the last one due, so later than its regular time —
    // and no workload that stayed put did.
    let mut late: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rs.iter().filter(|r| r.result.caught_up) {
        *late.entry(r.workload.as_str()).or_default() += 1;
        assert!(
            victims.contains(&r.workload),
            "a workload that did not move caught up: {r:?}"
        );
        assert_ne!(r.result.worker_id, "b");
        let tick = r.result.tick.unwrap();
        assert!(tick > killed && tick < r.result.timestamp, "{r:?}");
    }
    for v in &victims {
        assert_eq!(
            late.get(v.as_str()),
            Some(&1),
            "{v}: missed ticks run {late:?}"
        );
    }
    let c = cli(&url, &["schedule", "ls", "--json"]);
    let ls: serde_json::Value = serde_json::from_str(&c).unwrap();
    assert_eq!(ls[0]["workloads"], N, "{ls}");
    assert_eq!(ls[0]["lastOk"], N, "{ls}");

    // An edit reaches every node: the new command from the next tick on.
    cli(
        &url,
        &["schedule", "add", "tick", "--every", "2s", "echo", "v2"],
    );
    let edited = SystemTime::now();
    eventually(30, "every workload runs the edited task", || async {
        let rs = all_results(&store).await;
        let done: HashSet<&str> = rs
            .iter()
            .filter(|r| r.result.command == "echo" && r.result.tick.is_some_and(|t| t > edited))
            .map(|r| r.workload.as_str())
            .collect();
        (done.len() == N).then_some(())
    })
    .await;
    // A pause, then a delete, stop it everywhere.
    cli(&url, &["schedule", "pause", "tick"]);
    let paused = SystemTime::now() + Duration::from_secs(1);
    let count_after = |rs: &[StoredResult], t: SystemTime| {
        rs.iter()
            .filter(|r| r.result.tick.is_some_and(|k| k > t))
            .count()
    };
    tokio::time::sleep(Duration::from_secs(5)).await; // an observation window, not a wait for convergence
    assert_eq!(
        count_after(&all_results(&store).await, paused),
        0,
        "ran while paused"
    );
    cli(&url, &["schedule", "resume", "tick"]);
    let resumed = SystemTime::now();
    eventually(30, "ticks again after resume", || async {
        (count_after(&all_results(&store).await, resumed) >= N).then_some(())
    })
    .await;
    cli(&url, &["schedule", "rm", "tick"]);
    let deleted = SystemTime::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(5)).await; // an observation window
    assert_eq!(
        count_after(&all_results(&store).await, deleted),
        0,
        "ran after delete"
    );
    let out = cli(&url, &["results", "s1", "--last", "3"]);
    assert!(out.contains("s1") && out.contains("tick"), "{out}");
    op.assert_no_double_owner();
}
