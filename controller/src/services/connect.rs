//! How the proxy reaches a replica: the connection pool's connector. A replica's pool key is its
//! endpoint (`e<id>.replica`); a new connection goes directly to the agent's address when that
//! works, else through a tunnel over the agent's own connection to the controller (agents may
//! sit where the controller cannot dial). Which one worked is remembered per replica.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::route::{Endpoint, Path, Routes};

/// How long a direct connection may take before the tunnel is tried.
pub const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Which paths the proxy may use (`--service-path`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathMode {
    /// Direct when it connects, else the tunnel.
    #[default]
    Auto,
    Direct,
    Tunnel,
}

impl std::str::FromStr for PathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<PathMode, String> {
        match s {
            "auto" => Ok(PathMode::Auto),
            "direct" => Ok(PathMode::Direct),
            "tunnel" => Ok(PathMode::Tunnel),
            _ => Err(format!(
                "`{s}` is not a service path: auto, direct or tunnel"
            )),
        }
    }
}

/// A byte stream to a replica through its agent.
pub trait TunnelIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> TunnelIo for T {}

/// A tunnel being opened.
pub type OpeningTunnel = Pin<Box<dyn Future<Output = io::Result<Box<dyn TunnelIo>>> + Send>>;

/// Opens tunnels to replicas (the agent session's side of it).
pub trait Tunneler: Send + Sync + 'static {
    fn open(&self, endpoint: Arc<Endpoint>) -> OpeningTunnel;
}

/// A connection to a replica, either way.
pub enum ReplicaIo {
    Tcp(TokioIo<TcpStream>),
    Tunnel(TokioIo<Box<dyn TunnelIo>>),
}

impl Connection for ReplicaIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ReplicaIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReplicaIo::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            ReplicaIo::Tunnel(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ReplicaIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ReplicaIo::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            ReplicaIo::Tunnel(t) => Pin::new(t).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReplicaIo::Tcp(t) => Pin::new(t).poll_flush(cx),
            ReplicaIo::Tunnel(t) => Pin::new(t).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReplicaIo::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            ReplicaIo::Tunnel(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

/// The connection pool's connector.
#[derive(Clone)]
pub struct Connector {
    pub routes: Arc<Routes>,
    pub mode: PathMode,
    pub tunneler: Option<Arc<dyn Tunneler>>,
}

impl Connector {
    /// A connection to `endpoint` by the path it is known to take, or by trying them in turn.
    pub async fn connect(&self, endpoint: Arc<Endpoint>) -> io::Result<ReplicaIo> {
        let direct_allowed = self.mode != PathMode::Tunnel && endpoint.host.is_some();
        let tunnel = self
            .tunneler
            .as_ref()
            .filter(|_| self.mode != PathMode::Direct);
        if endpoint.path() != Path::Tunnel && direct_allowed {
            let host = endpoint.host.expect("checked");
            match tokio::time::timeout(
                DIRECT_CONNECT_TIMEOUT,
                TcpStream::connect((host, endpoint.port)),
            )
            .await
            {
                Ok(Ok(s)) => {
                    s.set_nodelay(true)?;
                    endpoint.set_path(Path::Direct);
                    return Ok(ReplicaIo::Tcp(TokioIo::new(s)));
                }
                Ok(Err(e)) if tunnel.is_none() || endpoint.path() == Path::Direct => {
                    return Err(e);
                }
                Err(_) if tunnel.is_none() => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection to {host}:{} in time", endpoint.port),
                    ));
                }
                _ => {}
            }
        }
        let Some(tunnel) = tunnel else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no path to the replica: the controller cannot dial its agent and has no tunnel",
            ));
        };
        let io = tunnel.open(endpoint.clone()).await?;
        if direct_allowed && endpoint.path() == Path::Unknown {
            // The agent reaches its replica, the controller does not: the tunnel it is.
            endpoint.set_path(Path::Tunnel);
        } else if !direct_allowed {
            endpoint.set_path(Path::Tunnel);
        }
        Ok(ReplicaIo::Tunnel(TokioIo::new(io)))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = ReplicaIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ReplicaIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let endpoint = uri
                .host()
                .and_then(|h| h.strip_prefix('e'))
                .and_then(|h| h.strip_suffix(".replica"))
                .and_then(|id| id.parse().ok())
                .and_then(|id| this.routes.endpoint(id))
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the replica is gone"))?;
            this.connect(endpoint).await
        })
    }
}
