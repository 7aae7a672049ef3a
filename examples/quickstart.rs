//! The original's quickstart, in Rust: start a worker, add 10 devices, run
//! `hello` on each, delete them, stop.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use ottomato::actors::sim::SimKind;
use ottomato::{Event, Node, Status, Task, WorkloadSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let node = Node::builder()
        .kind(SimKind)
        .ping_splay(Duration::from_secs(8), Duration::from_secs(10))
        .on_event(|e: &Event| println!("event: {} {}", e.name(), e.workload()))
        .on_error(|e| eprintln!("error: {e}"))
        .start()
        .await?;
    println!("worker {}", node.id());

    for i in 0..10 {
        node.add_workload(WorkloadSpec::new(format!("device-{i}"), "sim"))
            .await?;
    }
    // Init runs off our path; wait until every device answers.
    while node.count_by_status().get(&Status::Running) != Some(&10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for w in node.workloads() {
        let result = node.run_task(&w.id, Task::new("hello")).await;
        println!("{}", serde_json::to_string(&result)?);
    }
    for job in node.scheduled() {
        println!(
            "health check of {} next at {:?}",
            job.workload, job.next_run
        );
    }

    for w in node.workloads() {
        node.delete_workload(&w.id)?;
    }
    node.stop().await;
    println!("stopped; {} workloads left", node.len());
    Ok(())
}
