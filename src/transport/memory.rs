//! The in-memory [`Transport`]: handlers called directly, in one process.
//! Serves exact subjects and patterns with one `*` token (what a node
//! subscribes: `<prefix>.task.*.<id>`, `<prefix>.fanout.*`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;

use super::{Message, RequestHandler, Transport, TransportError};

const INBOX_PREFIX: &str = "_INBOX.";

#[derive(Default)]
struct Table {
    served: HashMap<String, Vec<Arc<dyn RequestHandler>>>,
    inboxes: HashMap<String, mpsc::UnboundedSender<Message>>,
}

/// Subjects served in this process. Clones share the same table, so several
/// nodes in one process can share one transport.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    table: Arc<RwLock<Table>>,
    next_inbox: Arc<AtomicU64>,
}

impl MemoryTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // Each write is one insert or remove: nothing is left torn by a panic.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an inbox; the returned stream unregisters it when dropped.
    fn inbox(&self) -> (String, InboxStream) {
        let name = format!(
            "{INBOX_PREFIX}{}",
            self.next_inbox.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = mpsc::unbounded_channel();
        self.write().inboxes.insert(name.clone(), tx);
        let stream = InboxStream {
            rx,
            name: name.clone(),
            owner: self.clone(),
        };
        (name, stream)
    }

    /// Handlers of `subject`: served on it exactly, or on a pattern with
    /// one `*` token in place of one of its tokens (NATS semantics for such
    /// patterns).
    fn handlers(&self, subject: &str) -> Vec<Arc<dyn RequestHandler>> {
        let t = self.read();
        let mut out: Vec<Arc<dyn RequestHandler>> =
            t.served.get(subject).cloned().unwrap_or_default();
        let tokens: Vec<&str> = subject.split('.').collect();
        let mut pattern = String::with_capacity(subject.len() + 1);
        for i in 0..tokens.len() {
            if tokens[i] == "*" {
                continue; // a literal `*` token: the exact lookup found it
            }
            pattern.clear();
            for (j, tok) in tokens.iter().enumerate() {
                if j > 0 {
                    pattern.push('.');
                }
                pattern.push_str(if i == j { "*" } else { tok });
            }
            if let Some(v) = t.served.get(&pattern) {
                out.extend(v.iter().cloned());
            }
        }
        out
    }

    fn deliver(&self, subject: &str, message: Message, reply: Option<String>) -> usize {
        let handlers = self.handlers(subject);
        for h in &handlers {
            h.handle(subject, message.clone(), reply.clone());
        }
        handlers.len()
    }
}

struct InboxStream {
    rx: mpsc::UnboundedReceiver<Message>,
    name: String,
    owner: MemoryTransport,
}

impl Drop for InboxStream {
    fn drop(&mut self) {
        self.owner.write().inboxes.remove(&self.name);
    }
}

impl futures::Stream for InboxStream {
    type Item = Message;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn serve(
        &self,
        subject: &str,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let stars = tokens.iter().filter(|t| **t == "*").count();
        if stars > 1 || tokens.iter().any(|t| t.is_empty() || *t == ">") {
            return Err(TransportError::Backend(format!(
                "the in-memory transport serves exact subjects and patterns with one `*` \
                 token, not {subject:?}"
            )));
        }
        self.write()
            .served
            .entry(subject.to_string())
            .or_default()
            .push(handler);
        Ok(())
    }

    async fn unserve(
        &self,
        subject: &str,
        handler: &Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError> {
        let mut t = self.write();
        if let Some(v) = t.served.get_mut(subject) {
            v.retain(|h| !Arc::ptr_eq(h, handler));
            if v.is_empty() {
                t.served.remove(subject);
            }
        }
        Ok(())
    }

    async fn publish(&self, subject: &str, message: Message) -> Result<(), TransportError> {
        if subject.starts_with(INBOX_PREFIX) {
            if let Some(tx) = self.read().inboxes.get(subject) {
                let _ = tx.send(message);
            }
            return Ok(());
        }
        self.deliver(subject, message, None);
        Ok(())
    }

    async fn request(
        &self,
        subject: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let (inbox, mut replies) = self.inbox();
        if self.deliver(subject, request, Some(inbox)) == 0 {
            return Err(TransportError::NoResponders(subject.to_string()));
        }
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) | Err(_) => Err(TransportError::Timeout),
        }
    }

    async fn request_many(
        &self,
        subject: &str,
        request: Message,
    ) -> Result<BoxStream<'static, Message>, TransportError> {
        let (inbox, replies) = self.inbox();
        if self.deliver(subject, request, Some(inbox)) == 0 {
            return Err(TransportError::NoResponders(subject.to_string()));
        }
        Ok(replies.boxed())
    }
}
