//! Bring-your-own task transport: a narrow request/reply trait shaped after
//! NATS (subjects, headers, "no responders"), and [`MemoryTransport`], the
//! embedded default for one process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

mod memory;

pub use memory::MemoryTransport;

/// A request or reply: headers and a payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// Header name/value pairs (e.g. the encoding negotiation).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub payload: Bytes,
}

impl Message {
    /// A message with a body and no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends the one reply to a request.
pub struct Replier(Box<dyn FnOnce(Message) + Send>);

impl Replier {
    /// Wraps the transport's way of answering.
    pub fn new(f: impl FnOnce(Message) + Send + 'static) -> Self {
        Replier(Box::new(f))
    }

    /// Answers the request.
    pub fn reply(self, msg: Message) {
        (self.0)(msg)
    }
}

/// What a node registers to answer requests on its subjects. It must not
/// block: it hands the work to a task and replies from there.
pub trait RequestHandler: Send + Sync + 'static {
    /// One request arrived on `subject`.
    fn handle(&self, subject: &str, request: Message, replier: Replier);
}

/// Why a request got no reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    /// Nobody serves that subject (NATS "no responders"): unknown or unowned workload.
    #[error("no responders on {0}")]
    NoResponders(String),
    /// No reply within the timeout.
    #[error("request timed out")]
    Timeout,
    /// The backend failed.
    #[error("transport: {0}")]
    Backend(String),
}

/// A request/reply transport.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Starts answering requests on `subject` with `handler`.
    async fn serve(
        &self,
        subject: &str,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError>;
    /// Stops answering on `subject`.
    async fn unserve(&self, subject: &str) -> Result<(), TransportError>;
    /// Sends a request and waits for its reply.
    async fn request(
        &self,
        subject: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message, TransportError>;
}
