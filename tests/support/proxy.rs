//! A TCP forwarder between a node process and nats-server that can stall:
//! while stalled it moves no byte either way, yet every connection stays
//! open, as a network that stops delivering for a while and then recovers
//! (what a node behind a congested or flapping link sees). Bytes sent during
//! the stall wait and are delivered, in order, on [`StallProxy::resume`].
#![allow(dead_code)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct StallProxy {
    /// `nats://127.0.0.1:<port>`: give this to the node behind the proxy.
    pub url: String,
    open: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free loopback port and forwards every connection to
    /// `upstream` (a `nats://host:port` URL).
    pub async fn start(upstream: &str) -> StallProxy {
        let upstream = upstream.trim_start_matches("nats://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        let accept = tokio::spawn(async move {
            // Connections live as long as the accept task: dropping the set
            // (on abort) closes them all.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(&upstream).await else {
                    continue; // the client sees its connection close
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                conns.spawn(pump(dr, uw, gate.subscribe()));
                conns.spawn(pump(ur, dw, gate.subscribe()));
            }
        });
        StallProxy { url, open, accept }
    }

    /// From now on no byte moves either way until [`Self::resume`].
    pub fn stall(&self) {
        self.open.send_replace(false);
    }

    /// Delivers what waited, in order, and forwards again.
    pub fn resume(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding every chunk read while stalled until the
/// stall ends.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut open: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
