//! The in-memory [`Transport`]: handlers called directly, in one process.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use super::{Message, Replier, RequestHandler, Transport, TransportError};

/// Subjects served in this process. Clones share the same table.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    served: Arc<RwLock<HashMap<String, Arc<dyn RequestHandler>>>>,
}

impl MemoryTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn serve(
        &self,
        subject: &str,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<(), TransportError> {
        self.served
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(subject.to_string(), handler);
        Ok(())
    }

    async fn unserve(&self, subject: &str) -> Result<(), TransportError> {
        self.served
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(subject);
        Ok(())
    }

    async fn request(
        &self,
        subject: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let handler = self
            .served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(subject)
            .cloned()
            .ok_or_else(|| TransportError::NoResponders(subject.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        handler.handle(
            subject,
            request,
            Replier::new(move |m| {
                let _ = tx.send(m);
            }),
        );
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            // The handler dropped the replier without answering: like NATS, the
            // requester only sees that nothing came back.
            Ok(Err(_)) | Err(_) => Err(TransportError::Timeout),
        }
    }
}
