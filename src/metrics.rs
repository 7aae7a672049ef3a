//! Prometheus metrics of a node: `ottomato node --metrics-addr 127.0.0.1:9464`
//! serves `GET /metrics` (OpenMetrics text, encoded by `prometheus-client`).
//!
//! Everything is read at scrape time from the node's atomic counters
//! (`node::counters`) and its workload table; labels are bounded (status,
//! kind, task outcome), never a workload id, so 100 000 workloads give the
//! same handful of series as ten.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::node::counters::LATENCY_BUCKETS;
use crate::{Node, Status};

/// Reads a node at scrape time.
pub struct NodeCollector {
    node: Node,
    nats: Option<async_nats::Client>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector")
            .field("node", &self.node.id())
            .finish()
    }
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.node.counters();
        let kinds = self.node.kind_names();
        // Workloads by status and kind: every pair, zeros included, so a
        // series never disappears when its last workload leaves.
        let by = self.node.count_by_status_and_kind();
        {
            let mut m = e.encode_descriptor(
                "ottomato_workloads",
                "Workloads on this node by status and kind",
                None,
                MetricType::Gauge,
            )?;
            for status in Status::ALL {
                for kind in &kinds {
                    let n = by.get(&(status, kind.to_string())).copied().unwrap_or(0);
                    let labels = [("status", status.as_str()), ("kind", kind.as_str())];
                    ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = e.encode_descriptor(
                "ottomato_tasks",
                "Tasks answered, by outcome (ok or the error code)",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in &c.tasks {
                let labels = [("outcome", *outcome)];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let m = e.encode_descriptor(
                "ottomato_task_duration_seconds",
                "Device time of answered tasks",
                None,
                MetricType::Histogram,
            )?;
            let count = c.latency_buckets.last().copied().unwrap_or(0);
            let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
            let mut prev = 0;
            for (i, le) in LATENCY_BUCKETS.iter().chain([f64::MAX].iter()).enumerate() {
                // encode_histogram takes per-bucket counts, not cumulative ones.
                let cum = c.latency_buckets[i];
                buckets.push((
                    if *le == f64::MAX { f64::INFINITY } else { *le },
                    cum - prev,
                ));
                prev = cum;
            }
            let mut m = m;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                c.latency_sum,
                count,
                &buckets,
                None,
            )?;
        }
        gauge(
            &mut e,
            "ottomato_tasks_queued",
            "Tasks waiting in workloads' queues",
            c.queued as f64,
        )?;
        gauge(
            &mut e,
            "ottomato_state_writer_backlog",
            "Workloads whose state record waits to be written",
            c.writer_backlog as f64,
        )?;
        counter(&mut e, "ottomato_pings", "Pings run", c.pings)?;
        counter(
            &mut e,
            "ottomato_ping_failures",
            "Pings that failed",
            c.ping_failures,
        )?;
        counter(&mut e, "ottomato_inits", "Init attempts", c.inits)?;
        counter(
            &mut e,
            "ottomato_init_failures",
            "Init attempts that failed",
            c.init_failures,
        )?;
        counter(
            &mut e,
            "ottomato_restarts",
            "Workload actors restarted by the supervisor",
            c.restarts,
        )?;
        counter(
            &mut e,
            "ottomato_claims",
            "Workloads claimed (cluster mode)",
            c.claims,
        )?;
        counter(
            &mut e,
            "ottomato_releases",
            "Workloads released to another node (cluster mode)",
            c.releases,
        )?;
        counter(
            &mut e,
            "ottomato_fences",
            "Workloads fenced (claim or lease lost)",
            c.fences,
        )?;
        counter(
            &mut e,
            "ottomato_lease_renewals",
            "Lease renewals (acknowledged heartbeats)",
            c.lease_renewals,
        )?;
        for (name, help, v) in [
            ("ottomato_ticks_run", "Scheduled runs started", c.ticks_run),
            (
                "ottomato_ticks_skipped",
                "Ticks skipped: the device was still busy with the previous one",
                c.ticks_skipped,
            ),
            (
                "ottomato_ticks_shed",
                "Ticks shed: late, or too many scheduled runs in flight",
                c.ticks_shed,
            ),
            (
                "ottomato_ticks_caught_up",
                "Missed ticks run once on a new owner",
                c.ticks_caught_up,
            ),
            (
                "ottomato_results_stored",
                "Results stored in the history",
                c.results_stored,
            ),
            (
                "ottomato_results_dropped",
                "Results dropped: the buffer to the history was full",
                c.results_dropped,
            ),
            (
                "ottomato_results_failed",
                "Results the history refused (backend errors)",
                c.results_failed,
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        if let Some(left) = self.node.lease_remaining() {
            gauge(
                &mut e,
                "ottomato_lease_remaining_seconds",
                "Time left before this node must stop touching devices",
                left.as_secs_f64(),
            )?;
        }
        if let Some(nats) = &self.nats {
            let up = matches!(
                nats.connection_state(),
                async_nats::connection::State::Connected
            );
            gauge(
                &mut e,
                "ottomato_nats_connected",
                "1 while the node is connected to NATS",
                if up { 1.0 } else { 0.0 },
            )?;
        }
        Ok(())
    }
}

/// The metrics of `node` (and of its NATS connection, if given), encoded
/// as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// A registry with the node's collector.
pub fn registry(node: Node, nats: Option<async_nats::Client>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(NodeCollector { node, nats }));
    r
}

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

/// Serves `GET /metrics` on `listener` until the returned task is aborted.
/// A connection that sends no request within 10 s is closed; at most
/// [`MAX_CONNECTIONS`] are served at once; a failing `accept` (out of file
/// descriptors) is logged and retried after a pause, not in a loop.
pub fn serve(listener: tokio::net::TcpListener, registry: Registry) -> tokio::task::JoinHandle<()> {
    let registry = Arc::new(registry);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    hyper::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(render(&registry))))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        };
                        Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
