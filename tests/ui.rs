//! The fleet page (`ottomato ui`) in headless Chromium: counts, failing
//! workloads with reasons, a kill -9 of a node shown live, search, and the
//! run-task form — driven by `tests/peers/ui_check.py` (Selenium).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::json;
use support::peers::{ensure_apt, ensure_pip, low_port};
use support::{eventually, NatsServer, NodeProc, Operator, TempDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_the_fleet_live_searches_and_runs_tasks() {
    support::init_logs();
    ensure_apt("chromium", "chromium");
    ensure_apt("chromium-driver", "chromedriver");
    ensure_pip("selenium", "selenium");
    let server = NatsServer::start();
    let op = Operator::connect(&server.url, 1).await;
    let logs = TempDir::new("logs");
    let _a = NodeProc::start(&server.url, "a", &logs.0, &["--zone", "z1"]);
    let mut b = NodeProc::start(&server.url, "b", &logs.0, &["--zone", "z2"]);
    for i in 0..6 {
        let site = if i < 3 { "oslo" } else { "bergen" };
        op.add(
            &format!("w-{i}"),
            json!({"kind": "sim", "labels": {"site": site}}),
        )
        .await;
    }
    op.add(
        "never",
        json!({"kind": "sim", "config": {"init_fail_rate": 1.0}}),
    )
    .await;
    eventually(30, "six running on both nodes", || async {
        let snap = op.snapshot().await;
        let running: Vec<&String> = snap
            .values()
            .filter(|(_, s)| s == "running")
            .map(|(o, _)| o)
            .collect();
        (running.len() == 6
            && running.iter().any(|o| *o == "b")
            && running.iter().any(|o| *o == "a"))
        .then_some(())
    })
    .await;

    let port = low_port();
    let ui = support::ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_ottomato"))
            .args([
                "-s",
                &server.url,
                "ui",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.0.join("ui.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually(30, "the page is served", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop)
    })
    .await;

    // Another site cannot drive the page's API through the operator's browser.
    let post = |headers: &str| -> String {
        let body = r#"{"id":"w-1","command":"hello"}"#;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "POST /api/task HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut c, &mut out).unwrap();
        out
    };
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    for (headers, why) in [
        (
            format!("{host}Content-Type: text/plain\r\n"),
            "a plain form post",
        ),
        (
            format!("{host}Content-Type: application/json\r\nOrigin: http://evil.example\r\n"),
            "another origin",
        ),
        (
            "Host: evil.example:80\r\nContent-Type: application/json\r\n".to_string(),
            "a rebound host name",
        ),
    ] {
        let r = post(&headers);
        assert!(r.starts_with("HTTP/1.1 403"), "{why}: {r}");
    }
    let r = post(&format!("{host}Content-Type: application/json\r\n"));
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("hello from w-1"),
        "{r}"
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/ui_check.py");
    let mut check = Command::new("python3")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // A hung browser must not hang the suite.
    let pid = check.id();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(240));
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    });
    let mut out = BufReader::new(check.stdout.take().unwrap());
    let mut said = String::new();
    let mut line = String::new();
    let ready = tokio::task::block_in_place(|| loop {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        said.push_str(&line);
        if line.trim() == "READY" {
            return true;
        }
    });
    assert!(ready, "the page's first checks failed:\n{said}");
    b.kill(); // kill -9: the page must show it without a reload
    check.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let rest = tokio::task::block_in_place(|| {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    let status = tokio::task::block_in_place(|| check.wait()).unwrap();
    assert!(
        status.success() && rest.contains("OK"),
        "the page failed a check:\n{said}{rest}"
    );
    drop(ui);
}
