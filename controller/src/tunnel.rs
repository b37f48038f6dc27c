//! Tunnels: a byte stream from the controller to the port of an attempt (`$PORT`), carried by
//! the agent's own connection to the controller, since the controller may be unable to dial an
//! agent (NAT, firewalls). The service proxy opens one per pooled connection to a replica.
//!
//! ```text
//!  open(agent, job, attempt)                                   agent
//!    ├─ pending[id] = (agent, job, attempt, waiter)
//!    ├─ OpenTunnel { id, job, attempt } on the session ──────▶ holds the attempt? its port?
//!    │                                                         connect 127.0.0.1:port
//!    │                        Tunnel call: header { id, job, attempt[, error] } ◀──┘
//!    │  accept (grpc.rs): the caller's credential checked; pending[id] taken only if it
//!    │  names that agent, job and attempt, else refused and left as it was
//!    ◀─ Tunnel (AsyncRead + AsyncWrite)      data ⇄ data, fin (our half-close), end (close)
//!    timeout, or the caller gives up: the guard removes pending[id]
//! ```
//!
//! The agent connects only to its own loopback and only to the port of an attempt it holds: the
//! controller names a tunnel, never an address. A tunnel id is 128 random bits, used once.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use rand::RngExt;
use runyard_model::AgentCommand;
use runyard_proto::v1::{self, tunnel_frame::Part};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;

use crate::agents::Agents;

/// How long `open` waits for the agent's `Tunnel` call.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest data frame the controller sends; a larger write is sent in parts.
const MAX_FRAME: usize = 256 << 10;
/// Frames queued towards the agent's call before a write waits.
const OUT_FRAMES: usize = 16;

/// The agent's frames as the gRPC handler receives them.
pub type Inbound = Pin<Box<dyn Stream<Item = Result<v1::TunnelFrame, tonic::Status>> + Send>>;
/// The controller's frames to the agent, as the gRPC handler returns them.
pub type Outbound = Pin<Box<dyn Stream<Item = Result<v1::TunnelFrame, tonic::Status>> + Send>>;

/// Why `open` gave no tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {agent} did not open the tunnel within {after:?}")]
    TimedOut { agent: String, after: Duration },
    #[error("agent {agent} refused the tunnel: {reason}")]
    Refused { agent: String, reason: String },
    #[error("agent {0}'s tunnel call ended before the tunnel opened")]
    Abandoned(String),
}

/// Why an agent's `Tunnel` call is refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("the tunnel id is not of the controller's form")]
    BadId,
    /// No tunnel with that id was asked of this agent for that job and attempt.
    #[error("no tunnel {0} was asked of this agent for this job and attempt")]
    Unsolicited(String),
    /// `open` stopped waiting (timed out or gave up) just before the call arrived.
    #[error("the controller no longer waits for tunnel {0}")]
    Gone(String),
}

/// The tunnels the controller waits for; cheap to clone.
#[derive(Clone)]
pub struct Tunnels {
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    timeout: Duration,
}

/// One tunnel asked of an agent and not opened yet.
struct Pending {
    agent: String,
    job_id: String,
    attempt: u32,
    /// The agent's refusal, or the open tunnel.
    tx: oneshot::Sender<Result<Tunnel, String>>,
}

/// Removes a pending entry when `open` returns or is dropped, however it ends.
struct Forget<'a> {
    pending: &'a Mutex<HashMap<String, Pending>>,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.pending.lock().unwrap().remove(self.id);
    }
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels::new(OPEN_TIMEOUT)
    }
}

impl Tunnels {
    /// Tunnels whose `open` waits at most `timeout` for the agent.
    pub fn new(timeout: Duration) -> Tunnels {
        Tunnels {
            pending: Arc::default(),
            timeout,
        }
    }

    /// Asks `agent` (over its live session) to open a tunnel to the port of attempt `attempt`
    /// of job `job_id`, and waits (at most the timeout, `OPEN_TIMEOUT` by default) for the
    /// agent's `Tunnel` call. An agent that cannot (it does not hold the attempt, the attempt
    /// has no port, nothing listens there) says why, and `open` fails at once with it.
    pub async fn open(
        &self,
        agents: &Agents,
        agent: &str,
        job_id: &str,
        attempt: u32,
    ) -> Result<Tunnel, TunnelError> {
        let id = hex::encode(rand::rng().random::<[u8; 16]>());
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(
            id.clone(),
            Pending {
                agent: agent.to_string(),
                job_id: job_id.to_string(),
                attempt,
                tx,
            },
        );
        let _forget = Forget {
            pending: &self.pending,
            id: &id,
        };
        let ask = AgentCommand::OpenTunnel {
            tunnel_id: id.clone(),
            job_id: job_id.to_string(),
            attempt,
        };
        if !agents.command(agent, &ask) {
            return Err(TunnelError::NotConnected(agent.to_string()));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(tunnel))) => Ok(tunnel),
            Ok(Ok(Err(reason))) => Err(TunnelError::Refused {
                agent: agent.to_string(),
                reason,
            }),
            Ok(Err(_)) => Err(TunnelError::Abandoned(agent.to_string())),
            Err(_) => Err(TunnelError::TimedOut {
                agent: agent.to_string(),
                after: self.timeout,
            }),
        }
    }

    /// The agent `agent`'s `Tunnel` call with its first frame, `header`: hands the call to the
    /// waiting `open` (or its refusal, when the header carries an error) and returns what the
    /// call answers with. A header naming no tunnel asked of this agent for that job and
    /// attempt is refused and changes nothing: the entry, if any, still waits for its own agent.
    pub fn accept(
        &self,
        agent: &str,
        header: &v1::TunnelHeader,
        frames: Inbound,
    ) -> Result<Outbound, AcceptError> {
        let id = &header.tunnel_id;
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AcceptError::BadId);
        }
        let waiter = {
            let mut pending = self.pending.lock().unwrap();
            match pending.get(id) {
                Some(p)
                    if p.agent == agent
                        && p.job_id == header.job_id
                        && p.attempt == header.attempt =>
                {
                    pending.remove(id).map(|p| p.tx)
                }
                _ => None,
            }
        };
        let Some(waiter) = waiter else {
            return Err(AcceptError::Unsolicited(id.clone()));
        };
        if !header.error.is_empty() {
            // Nobody waiting is no matter: the agent's answer is the same.
            let _ = waiter.send(Err(header.error.clone()));
            return Ok(Box::pin(futures::stream::empty()));
        }
        let (tx, rx) = mpsc::channel(OUT_FRAMES);
        waiter
            .send(Ok(Tunnel::new(frames, tx)))
            .map_err(|_| AcceptError::Gone(id.clone()))?;
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Tunnels asked for and not opened yet.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

/// An open tunnel: bytes written go to the replica's port, bytes read come from it. Each write
/// is sent as it comes (no batching, so nothing waits for more), reads hand out the agent's
/// frames without copying them again. `shutdown` is a half-close (the replica reads end of
/// file, and can still answer); dropping the tunnel closes it.
pub struct Tunnel {
    inbound: Inbound,
    /// The rest of the last data frame read.
    unread: Bytes,
    /// End of file (or an error) was returned; nothing more is read.
    read_done: bool,
    out: PollSender<Result<v1::TunnelFrame, tonic::Status>>,
    write_done: bool,
}

fn frame(part: Part) -> Result<v1::TunnelFrame, tonic::Status> {
    Ok(v1::TunnelFrame { part: Some(part) })
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the tunnel's call has ended")
}

impl Tunnel {
    fn new(inbound: Inbound, out: mpsc::Sender<Result<v1::TunnelFrame, tonic::Status>>) -> Tunnel {
        Tunnel {
            inbound,
            unread: Bytes::new(),
            read_done: false,
            out: PollSender::new(out),
            write_done: false,
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            let part = match ready!(this.inbound.poll_next_unpin(cx)) {
                Some(Ok(f)) => f.part,
                // The agent ended its stream: the replica wrote all it will.
                None => {
                    this.read_done = true;
                    continue;
                }
                Some(Err(status)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the tunnel's call failed: {}", status.message()),
                    )));
                }
            };
            match part {
                Some(Part::Data(d)) => this.unread = d,
                Some(Part::Fin(_)) => this.read_done = true,
                Some(Part::Error(e)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("the agent's connection to the replica broke: {e}"),
                    )));
                }
                Some(Part::Header(_)) | None => {
                    this.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the agent sent a tunnel frame out of place",
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tunnel was shut down for writing",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.out.poll_reserve(cx)).map_err(|_| closed())?;
        let n = buf.len().min(MAX_FRAME);
        this.out
            .send_item(frame(Part::Data(Bytes::copy_from_slice(&buf[..n]))))
            .map_err(|_| closed())?;
        Poll::Ready(Ok(n))
    }

    /// Every write is already on its way: the gRPC stream sends a frame as soon as it has one.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_done {
            return Poll::Ready(Ok(()));
        }
        ready!(this.out.poll_reserve(cx)).map_err(|_| closed())?;
        this.out
            .send_item(frame(Part::Fin(true)))
            .map_err(|_| closed())?;
        this.write_done = true;
        Poll::Ready(Ok(()))
    }
}

/// The services data plane's path through agents: a tunnel to a replica's port.
pub struct ThroughAgents {
    pub tunnels: Tunnels,
    pub agents: Agents,
}

impl crate::services::connect::Tunneler for ThroughAgents {
    fn open(
        &self,
        endpoint: Arc<crate::services::route::Endpoint>,
    ) -> crate::services::connect::OpeningTunnel {
        let (tunnels, agents) = (self.tunnels.clone(), self.agents.clone());
        Box::pin(async move {
            tunnels
                .open(&agents, &endpoint.agent, &endpoint.job, endpoint.attempt)
                .await
                .map(|t| Box::new(t) as Box<dyn crate::services::connect::TunnelIo>)
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use runyard_model::Timestamp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A registry with agent `a` connected; its session's messages arrive on the receiver.
    async fn agents(dir: &std::path::Path) -> (Agents, mpsc::Receiver<v1::ControllerMessage>) {
        let store = crate::store::open("file:", dir).await.unwrap();
        let agents = Agents::load(store, Timestamp::now()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let (_turn, claim) = agents.claim("a");
        let info = runyard_model::AgentInfo {
            name: "a".into(),
            connected: true,
            cpu_small_slots: 1,
            gpus: Vec::new(),
            cpus: 1,
            memory_bytes: 0,
            version: String::new(),
            last_seen: Timestamp::now(),
            jobs: Vec::new(),
        };
        agents.connect(info, tx, claim).await;
        (agents, rx)
    }

    fn asked(m: Option<v1::ControllerMessage>) -> v1::OpenTunnel {
        match m.and_then(|m| m.msg) {
            Some(v1::controller_message::Msg::OpenTunnel(o)) => o,
            other => panic!("expected OpenTunnel, got {other:?}"),
        }
    }

    fn header(o: &v1::OpenTunnel) -> v1::TunnelHeader {
        v1::TunnelHeader {
            tunnel_id: o.tunnel_id.clone(),
            job_id: o.job_id.clone(),
            attempt: o.attempt,
            error: String::new(),
        }
    }

    fn no_frames() -> Inbound {
        Box::pin(futures::stream::pending())
    }

    /// An agent that never calls back: `open` times out and its entry is gone; a call arriving
    /// late is refused.
    #[tokio::test(start_paused = true)]
    async fn a_timed_out_open_leaves_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (agents, mut rx) = agents(dir.path()).await;
        let tunnels = Tunnels::default();
        let started = tokio::time::Instant::now();
        let err = tunnels.open(&agents, "a", "j", 1).await.err().unwrap();
        assert!(matches!(err, TunnelError::TimedOut { .. }), "{err}");
        assert_eq!(started.elapsed(), OPEN_TIMEOUT);
        assert_eq!(tunnels.pending(), 0);
        let late = asked(rx.recv().await);
        assert!(matches!(
            tunnels.accept("a", &header(&late), no_frames()),
            Err(AcceptError::Unsolicited(_))
        ));
    }

    /// A caller that gives up (its future dropped) leaves nothing pending either.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_open_leaves_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (agents, mut rx) = agents(dir.path()).await;
        let tunnels = Tunnels::default();
        {
            let open = tunnels.open(&agents, "a", "j", 1);
            tokio::pin!(open);
            tokio::select! {
                _ = &mut open => panic!("opened without an agent"),
                m = rx.recv() => { asked(m); }
            }
            assert_eq!(tunnels.pending(), 1);
        }
        assert_eq!(tunnels.pending(), 0);
    }

    #[tokio::test]
    async fn an_agent_without_a_session_is_not_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (agents, _rx) = agents(dir.path()).await;
        let tunnels = Tunnels::default();
        let err = tunnels.open(&agents, "b", "j", 1).await.err().unwrap();
        assert!(matches!(err, TunnelError::NotConnected(_)), "{err}");
        assert_eq!(tunnels.pending(), 0);
    }

    /// Another agent, another job or attempt, a made-up id: each refused, and the tunnel still
    /// opens for its own agent; the agent's refusal reaches the caller.
    #[tokio::test]
    async fn only_the_asked_agent_opens_its_tunnel() {
        let dir = tempfile::tempdir().unwrap();
        let (agents, mut rx) = agents(dir.path()).await;
        let tunnels = Tunnels::default();
        let t = tunnels.clone();
        let (a, r) = (agents.clone(), "a");
        let open = tokio::spawn(async move { t.open(&a, r, "j", 1).await });
        let o = asked(rx.recv().await);
        let mut wrong = Vec::new();
        let mut h = header(&o);
        wrong.push(("b", h.clone()));
        h.job_id = "k".into();
        wrong.push(("a", h.clone()));
        h = header(&o);
        h.attempt = 2;
        wrong.push(("a", h.clone()));
        h = header(&o);
        h.tunnel_id = "0".repeat(32);
        wrong.push(("a", h.clone()));
        h.tunnel_id = "../x".into();
        wrong.push(("a", h));
        for (agent, h) in wrong {
            assert!(
                tunnels.accept(agent, &h, no_frames()).is_err(),
                "{agent} {h:?}"
            );
            assert_eq!(tunnels.pending(), 1);
        }
        let mut refusal = header(&o);
        refusal.error = "attempt 1 has no port".into();
        drop(tunnels.accept("a", &refusal, no_frames()).unwrap());
        let err = open.await.unwrap().err().unwrap();
        assert_eq!(
            err.to_string(),
            "agent a refused the tunnel: attempt 1 has no port"
        );
        assert_eq!(tunnels.pending(), 0);
        // Used once: the same id again is unsolicited.
        assert!(tunnels.accept("a", &header(&o), no_frames()).is_err());
    }

    /// Bytes both ways through the tunnel's frames; a large write goes in parts; shutdown sends
    /// `fin`; the agent's end of stream reads as end of file.
    #[tokio::test]
    async fn a_tunnel_moves_bytes_and_half_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (agents, mut rx) = agents(dir.path()).await;
        let tunnels = Tunnels::default();
        let t = tunnels.clone();
        let a = agents.clone();
        let open = tokio::spawn(async move { t.open(&a, "a", "j", 1).await });
        let o = asked(rx.recv().await);
        let (in_tx, in_rx) = mpsc::channel(4);
        let mut out = tunnels
            .accept("a", &header(&o), Box::pin(ReceiverStream::new(in_rx)))
            .unwrap();
        let mut tunnel = open.await.unwrap().unwrap();

        let big = vec![7u8; MAX_FRAME + 10];
        let writer = tokio::spawn(async move {
            tunnel.write_all(&big).await.unwrap();
            tunnel.shutdown().await.unwrap();
            tunnel
        });
        let mut got = Vec::new();
        loop {
            match out.next().await.unwrap().unwrap().part.unwrap() {
                Part::Data(d) => {
                    assert!(d.len() <= MAX_FRAME);
                    got.extend_from_slice(&d)
                }
                Part::Fin(true) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got.len(), MAX_FRAME + 10);
        let mut tunnel = writer.await.unwrap();
        assert!(tunnel.write_all(b"late").await.is_err());

        for part in [&b"hello "[..], b"world"] {
            in_tx
                .send(frame(Part::Data(Bytes::from_static(part))))
                .await
                .unwrap();
        }
        drop(in_tx);
        let mut read = String::new();
        tunnel.read_to_string(&mut read).await.unwrap();
        assert_eq!(read, "hello world");
        drop(tunnel);
        assert!(
            out.next().await.is_none(),
            "dropping the tunnel ends the call"
        );
    }
}
