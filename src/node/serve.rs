//! Answering task requests that arrive through a [`crate::transport::Transport`].
//!
//! **Invariant:** this is the only place in the node that decodes or encodes
//! a wire payload; everything behind it works on [`Task`] and [`TaskResult`].

use std::sync::Weak;

use crate::transport::{Message, Replier, RequestHandler};
use crate::wire::{ErrorCode, Task, TaskRequest, TaskResult};

use super::Shared;

/// The handler a node registers for each of its workloads' task subjects.
pub(crate) struct TaskServer {
    pub(crate) shared: Weak<Shared>,
}

impl RequestHandler for TaskServer {
    fn handle(&self, subject: &str, request: Message, replier: Replier) {
        let Some(shared) = self.shared.upgrade() else {
            return; // node gone: the requester times out, as with a dead process
        };
        let subject = subject.to_string();
        tokio::spawn(async move {
            let result = answer(&shared, &subject, request).await;
            let payload = match serde_json::to_vec(&result) {
                Ok(p) => p,
                // A Value tree from serde_json always serialises.
                Err(_) => return,
            };
            replier.reply(Message::new(payload));
        });
    }
}

async fn answer(shared: &Shared, subject: &str, request: Message) -> TaskResult {
    let id = shared.subjects.parse_task(subject).unwrap_or(subject);
    let refuse = |code: ErrorCode, msg: String| {
        shared.result(
            id,
            None,
            Task::default(),
            Err((code, msg)),
            std::time::Duration::ZERO,
        )
    };
    if request.payload.len() > shared.cfg.max_payload {
        return refuse(
            ErrorCode::PayloadTooLarge,
            format!(
                "request is {} bytes; this node accepts at most {}",
                request.payload.len(),
                shared.cfg.max_payload
            ),
        );
    }
    let req: TaskRequest = match serde_json::from_slice(&request.payload) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                ErrorCode::MalformedRequest,
                format!(
                    "request is not a task ({e}); expected {{\"command\": string, \"args\": [..], \"kwargs\": {{..}}}}"
                ),
            )
        }
    };
    let (task, timeout) = req.into_parts();
    shared
        .run_task(id, task, timeout.unwrap_or(shared.cfg.task_timeout))
        .await
}
