//! Answering task requests that arrive through a [`crate::transport::Transport`].
//!
//! **Invariant:** this is the only place in the node that decodes or encodes
//! a wire payload; everything behind it works on [`Task`] and [`TaskResult`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::{FutureExt, StreamExt};

use crate::schedule::AD_HOC;
use crate::subjects::ENCODING_HEADER;
use crate::transport::{Message, RequestHandler};
use crate::wire::{bin, ErrorCode, FanoutDone, FanoutRequest, Task, TaskRequest, TaskResult};
use crate::CommandClass;

use super::Shared;

/// The handler a node registers for each of its workloads' task subjects.
pub(crate) struct TaskServer {
    pub(crate) shared: Weak<Shared>,
}

impl RequestHandler for TaskServer {
    fn handle(&self, subject: &str, request: Message, reply: Option<String>) {
        let Some(shared) = self.shared.upgrade() else {
            return; // node gone: the requester times out, as with a dead process
        };
        let Some(reply) = reply else {
            return; // a publish without a reply subject: nobody to answer
        };
        if from_jetstream(&reply) {
            return;
        }
        let Some((class, id)) = shared.subjects.parse_task(subject) else {
            return; // not a task subject: nothing this handler serves
        };
        if !shared.owns(shared.slot(id).as_ref()) {
            // Lease run out, fenced, or released: another node may own it
            // now, and its answer must be the only one. Stay silent.
            return;
        }
        // Decoding happens here, in the dispatcher; the answer is encoded and
        // published by the task's own tokio task (no task waits per request).
        let bincode = match request.header(ENCODING_HEADER) {
            None | Some("json") => false,
            Some(bin::BINCODE_V1) => true,
            Some(other) => {
                let msg = format!(
                    "unknown {ENCODING_HEADER} {other:?}; this node speaks json and {}",
                    bin::BINCODE_V1
                );
                let r = shared.result(
                    "",
                    None,
                    Task::default(),
                    Err((ErrorCode::MalformedRequest, msg)),
                    Duration::ZERO,
                );
                tokio::spawn(send_result(shared, reply, r, false));
                return;
            }
        };
        let decoded =
            parse_class(class).and_then(|class| Ok((class, decode(&shared, &request, bincode)?)));
        match decoded {
            Ok((class, req)) => {
                let keep = req.keep_result;
                let (task, timeout) = req.into_parts();
                let timeout = timeout.unwrap_or(shared.cfg.task_timeout);
                let sh = shared.clone();
                shared.submit_task(id, task, class, timeout, move |r| {
                    if keep {
                        sh.results.publish(AD_HOC, &r);
                    }
                    send_result(sh, reply, r, bincode).boxed()
                });
            }
            Err((code, msg)) => {
                let r = shared.result(id, None, Task::default(), Err((code, msg)), Duration::ZERO);
                tokio::spawn(send_result(shared, reply, r, bincode));
            }
        }
    }
}

fn encode(result: &TaskResult, bincode: bool) -> Message {
    if bincode {
        Message::new(bin::encode_result(result)).with_header(ENCODING_HEADER, bin::BINCODE_V1)
    } else {
        // A Value tree from serde_json always serialises.
        Message::new(serde_json::to_vec(result).unwrap_or_default())
    }
}

/// Bytes a message takes against the transport's limit.
fn message_size(m: &Message) -> usize {
    m.payload.len()
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
        + if m.headers.is_empty() { 0 } else { 12 }
}

/// `message`, or — when it is larger than the transport carries — the
/// encoding of an error result saying so (without the task's arguments,
/// which may be what made it large).
pub(crate) fn fit(
    shared: &Shared,
    result: &TaskResult,
    message: Message,
    bincode: bool,
) -> Message {
    let size = message_size(&message);
    match shared.transport.max_message() {
        Some(max) if size > max => {
            shared
                .counters
                .recount(result.error_code, Some(ErrorCode::PayloadTooLarge));
            let mut r = result.clone();
            r.args = Vec::new();
            r.kwargs = Default::default();
            r.ret = serde_json::Value::Null;
            r.success = false;
            r.error_code = Some(ErrorCode::PayloadTooLarge);
            r.error = Some(format!(
                "the result of {:?} is {size} bytes; the NATS server carries at most {max} \
                 bytes per message (its max_payload): return less, or raise max_payload",
                result.command
            ));
            encode(&r, bincode)
        }
        _ => message,
    }
}

/// Encodes a result as the request was encoded and publishes it.
async fn send_result(shared: Arc<Shared>, reply: String, result: TaskResult, bincode: bool) {
    let message = fit(&shared, &result, encode(&result, bincode), bincode);
    if let Err(e) = shared.transport.publish(&reply, message).await {
        tracing::warn!(workload = %result.workload, error = %e, "could not send a task reply");
    }
}

/// Whether a request's reply subject is JetStream's own (`$JS.…`): then
/// it is a stream's delivery, not a client's request. NATS does not check
/// who may publish where a consumer delivers (nats-server#8274), so a
/// user allowed to create consumers could aim stored messages at a task
/// subject; such deliveries are never run.
fn from_jetstream(reply: &str) -> bool {
    reply.starts_with("$JS.")
}

/// The command class of a subject's class token.
fn parse_class(token: &str) -> Result<CommandClass, (ErrorCode, String)> {
    token.parse().map_err(|e| {
        (
            ErrorCode::MalformedRequest,
            format!("subject: {e} (the token after \"task.\" or \"fanout.\")"),
        )
    })
}

/// Checks the size and decodes a task request.
fn decode(
    shared: &Shared,
    request: &Message,
    bincode: bool,
) -> Result<TaskRequest, (ErrorCode, String)> {
    if request.payload.len() > shared.cfg.max_payload {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "request is {} bytes; this node accepts at most {}",
                request.payload.len(),
                shared.cfg.max_payload
            ),
        ));
    }
    let decoded = if bincode {
        bin::decode_request(&request.payload)
    } else {
        serde_json::from_slice::<TaskRequest>(&request.payload).map_err(|e| e.to_string())
    };
    decoded.map_err(|e| {
        (
            ErrorCode::MalformedRequest,
            format!(
                "request is not a task ({e}); expected {{\"command\": string, \"args\": [..], \"kwargs\": {{..}}}}"
            ),
        )
    })
}

/// The handler every node registers on `<prefix>.fanout.*`: runs the task on
/// each of its own workloads that match, streams each result to the reply
/// subject as it comes, then sends one [`FanoutDone`].
pub(crate) struct FanoutServer {
    pub(crate) shared: Weak<Shared>,
}

/// Tasks one node runs at once for one fan-out.
const FANOUT_CONCURRENCY: usize = 256;

impl RequestHandler for FanoutServer {
    fn handle(&self, subject: &str, request: Message, reply: Option<String>) {
        let (Some(shared), Some(reply)) = (self.shared.upgrade(), reply) else {
            return;
        };
        if from_jetstream(&reply) {
            return;
        }
        let Some(class) = shared.subjects.parse_fanout(subject) else {
            return; // not a fan-out subject
        };
        let class = parse_class(class);
        tokio::spawn(async move {
            let send = |payload: Vec<u8>| {
                let shared = shared.clone();
                let reply = reply.clone();
                async move {
                    if let Err(e) = shared
                        .transport
                        .publish(&reply, Message::new(payload))
                        .await
                    {
                        tracing::warn!(error = %e, "could not send a fan-out reply");
                    }
                }
            };
            let mut results = 0u64;
            let parsed = if let Err(e) = &class {
                Err(e.clone())
            } else if request.payload.len() > shared.cfg.max_payload {
                Err((
                    ErrorCode::PayloadTooLarge,
                    "fan-out request too large".to_string(),
                ))
            } else {
                serde_json::from_slice::<FanoutRequest>(&request.payload).map_err(|e| {
                    (
                        ErrorCode::MalformedRequest,
                        format!("not a fan-out request: {e}"),
                    )
                })
            };
            match parsed {
                Err(err) => {
                    let r = shared.result("", None, Task::default(), Err(err), Duration::ZERO);
                    if let Ok(p) = serde_json::to_vec(&r) {
                        send(p).await;
                        results += 1;
                    }
                }
                Ok(req) => {
                    let ids = shared.matching(req.select.as_deref(), &req.labels);
                    let timeout = req
                        .timeout_ms
                        .map(Duration::from_millis)
                        .unwrap_or(shared.cfg.task_timeout);
                    let task = Task {
                        command: req.command,
                        args: req.args,
                        kwargs: req.kwargs,
                    };
                    let class = class.unwrap_or(CommandClass::Read);
                    let mut stream = futures::stream::iter(ids)
                        .map(|id| {
                            let shared = shared.clone();
                            let task = task.clone();
                            async move { shared.run_task(&id, task, class, timeout).await }
                        })
                        .buffer_unordered(FANOUT_CONCURRENCY);
                    while let Some(r) = stream.next().await {
                        let not_ours = !r.success
                            && matches!(
                                r.error_code,
                                Some(ErrorCode::Unavailable | ErrorCode::NotFound)
                            )
                            && !shared.owns(shared.slot(&r.workload).as_ref());
                        if not_ours {
                            // Not sure we own it: its owner answers (and counts it).
                            shared.counters.recount(r.error_code, None);
                            continue;
                        }
                        if req.keep_result {
                            shared.results.publish(AD_HOC, &r);
                        }
                        let m = fit(&shared, &r, encode(&r, false), false);
                        send(m.payload.to_vec()).await;
                        results += 1;
                    }
                }
            }
            let done = FanoutDone {
                done: true,
                node: shared.node_id.to_string(),
                results,
            };
            if let Ok(p) = serde_json::to_vec(&done) {
                send(p).await;
            }
        });
    }
}
