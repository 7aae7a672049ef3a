//! Bring-your-own task transport: a narrow trait shaped after NATS core
//! (subjects, headers, reply subjects, "no responders"), and
//! [`MemoryTransport`], the embedded default for one process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

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

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a node registers to answer messages on a subject. It must not block:
/// it hands the work to a task and publishes replies from there.
pub trait RequestHandler: Send + Sync + 'static {
    /// A message arrived on `subject`; `reply` is where answers go, if anywhere.
    fn handle(&self, subject: &str, message: Message, reply: Option<String>);
}

/// Why a transport operation failed.
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
    /// Starts delivering messages on `subject` to `handler`.
    async fn serve(
        &self,
        subject: &str,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError>;
    /// Stops delivering `subject` to `handler`.
    async fn unserve(
        &self,
        subject: &str,
        handler: &Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError>;
    /// The largest message (payload and headers) the transport carries, if
    /// it has a limit (NATS: the server's `max_payload`).
    fn max_message(&self) -> Option<usize> {
        None
    }

    /// Sends a message, expecting no answer.
    async fn publish(&self, subject: &str, message: Message) -> Result<(), TransportError>;
    /// Sends a request and waits for its one reply.
    async fn request(
        &self,
        subject: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message, TransportError>;
    /// Sends a request and returns every reply as it arrives (for fan-out).
    /// The stream never ends by itself: the caller decides when it has all.
    async fn request_many(
        &self,
        subject: &str,
        request: Message,
    ) -> Result<BoxStream<'static, Message>, TransportError>;
}
