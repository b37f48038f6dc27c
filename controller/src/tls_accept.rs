//! Accepting TLS connections on a bound listener, for both servers: axum (as an
//! `axum::serve::Listener`) and tonic (as a stream of connections).
//!
//! ```text
//!   accept loop ──tcp──▶ handshake task (≤ HANDSHAKE_TIMEOUT) ──TlsStream──▶ channel ──▶ server
//!                            └─ first byte not a TLS handshake: plain-text reply, close
//! ```
//!
//! Invariants: a slow or hostile client costs one short-lived task, never the accept loop; a
//! client speaking plain text to a TLS port gets one clear line (HTTP port) or a close (gRPC
//! port) and nothing is read from it beyond its first bytes; the loop ends with `cancel`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A client must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 64;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Bytes of a plain-text request read before it is answered.
const PLAIN_HEAD_LIMIT: usize = 16 << 10;
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What to tell a client that speaks plain text to a TLS port.
#[derive(Clone, Copy, Debug)]
pub enum PlainReply {
    /// An HTTP/1.1 400 saying to use `https://` (the HTTP API port).
    Http,
    /// Close the connection (the gRPC port: a plain HTTP/2 client reads no text).
    Close,
}

/// TLS connections accepted on one listener, handshake done.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` until `cancel` fires.
    pub fn spawn(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        plain: PlainReply,
        cancel: CancellationToken,
    ) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(accept_loop(listener, acceptor, plain, tx, cancel));
        Ok(TlsListener { rx, local })
    }

    /// The connections as tonic's `serve_with_incoming` takes them.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> {
        futures::stream::unfold(self.rx, |mut rx| async move {
            rx.recv().await.map(|(stream, _)| (Ok(stream), rx))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): the server's own shutdown signal ends it.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    plain: PlainReply,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = cancel.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        // Small messages (assignments, acks) must not wait for delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        // Not tracked: each lasts at most HANDSHAKE_TIMEOUT and owns nothing but its socket.
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, &acceptor, plain)).await {
                Ok(Ok(Some(stream))) => {
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Ok(None)) => {
                    debug!(%peer, "plain-text connection to a TLS port refused")
                }
                Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// The handshake, or `None` when the client spoke plain text (answered per `plain`).
async fn handshake(
    mut tcp: TcpStream,
    acceptor: &TlsAcceptor,
    plain: PlainReply,
) -> io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] != TLS_HANDSHAKE {
        if let PlainReply::Http = plain {
            // Read the request head first: closing with unread bytes would reset the
            // connection before the client reads the reply.
            let mut head = Vec::new();
            let mut buf = [0u8; 2048];
            while head.len() < PLAIN_HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut buf).await? {
                    0 => break,
                    n => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = "This port serves HTTPS: use an https:// URL (and the controller's CA: --ca or RUNYARD_CA).\n";
            let reply = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(reply.as_bytes()).await?;
            tcp.shutdown().await?;
        }
        return Ok(None);
    }
    acceptor.accept(tcp).await.map(Some)
}
