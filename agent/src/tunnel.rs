//! The agent's end of a tunnel (see the controller's `tunnel.rs`): on `OpenTunnel`, connect to
//! the port of an attempt this agent holds, on the loopback only, and carry bytes both ways in a
//! `Tunnel` call made on the session's own connection (the controller may not reach the agent).
//!
//! ```text
//!  OpenTunnel { id, job, attempt }
//!    ├─ attempt held, not finished, has a port?  connect 127.0.0.1:port (TCP_NODELAY)
//!    │     no: Tunnel call with header { id, error: why }, and nothing more
//!    └─ Tunnel call: header { id, job, attempt }, then
//!         replica ──read 64 KiB──▶ data ──▶ controller      replica's end of file: our stream ends
//!         replica ◀──write─────── data ◀── controller      fin: shutdown(Write) to the replica
//!         the controller's stream ends (or fails): the replica's connection is closed
//! ```
//!
//! The controller names an attempt, never an address: nothing else on the host is reachable.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use runyard_proto::v1::{self, tunnel_frame::Part};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::attempts::Attempts;
use crate::dial::Client;

/// Bytes read from the replica at most per frame.
const READ_BUF: usize = 64 << 10;
/// Frames queued towards the controller before reading the replica waits.
const UP_FRAMES: usize = 16;
/// Connecting to the loopback is immediate, or refused; this bounds a host under stress.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn frame(part: Part) -> v1::TunnelFrame {
    v1::TunnelFrame { part: Some(part) }
}

/// Serves one `OpenTunnel` until the tunnel closes or `cancel` fires. Run it in its own task:
/// it lasts as long as the controller keeps the tunnel.
pub async fn serve(
    attempts: Attempts,
    mut client: Client,
    open: v1::OpenTunnel,
    cancel: CancellationToken,
) {
    let header = |error: String| {
        frame(Part::Header(v1::TunnelHeader {
            tunnel_id: open.tunnel_id.clone(),
            job_id: open.job_id.clone(),
            attempt: open.attempt,
            error,
        }))
    };
    let (tx, rx) = mpsc::channel(UP_FRAMES);
    let replica = connect(&attempts, &open.job_id, open.attempt).await;
    let first = match &replica {
        Ok(_) => header(String::new()),
        Err(reason) => {
            warn!(job = %open.job_id, attempt = open.attempt, %reason, "cannot open a tunnel");
            header(reason.clone())
        }
    };
    // Room for it: the channel is new.
    let _ = tx.try_send(first);
    let (tx, replica) = match replica {
        Ok(tcp) => (Some(tx), Some(tcp)),
        // The call ends after the header: the controller's `open` fails with the reason.
        Err(_) => {
            drop(tx);
            (None, None)
        }
    };
    let call = tokio::select! {
        r = client.tunnel(ReceiverStream::new(rx)) => r,
        _ = cancel.cancelled() => return,
    };
    let down = match call {
        Ok(r) => r.into_inner(),
        Err(status) => {
            warn!(job = %open.job_id, attempt = open.attempt, code = ?status.code(), reason = %status.message(), "the controller refused a tunnel");
            return;
        }
    };
    let (Some(tx), Some(tcp)) = (tx, replica) else {
        return;
    };
    debug!(job = %open.job_id, attempt = open.attempt, "tunnel open");
    tokio::select! {
        _ = pump(tcp, tx, down) => {}
        _ = cancel.cancelled() => {}
    }
    debug!(job = %open.job_id, attempt = open.attempt, "tunnel closed");
}

/// A connection to the port of attempt `attempt` of `job_id`, if this agent holds it, it has not
/// finished, and something listens there; else why not.
async fn connect(attempts: &Attempts, job_id: &str, attempt: u32) -> Result<TcpStream, String> {
    let a = attempts
        .get(job_id, attempt)
        .ok_or_else(|| format!("this agent holds no attempt {attempt} of job {job_id}"))?;
    if a.is_terminal() {
        return Err(format!("attempt {attempt} of job {job_id} has ended"));
    }
    let port = *a.port.get().ok_or_else(|| {
        format!("attempt {attempt} of job {job_id} has no port (its spec has no `port: true`, or it has not started)")
    })?;
    let addr = (Ipv4Addr::LOCALHOST, port);
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("cannot connect to 127.0.0.1:{port}: {e}")),
        Err(_) => {
            return Err(format!(
                "cannot connect to 127.0.0.1:{port} within {CONNECT_TIMEOUT:?}"
            ));
        }
    };
    // Requests and answers are small and must not wait for an acknowledgement.
    tcp.set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
    info!(job = %job_id, attempt, port, "tunnel connected to the attempt's port");
    Ok(tcp)
}

/// Carries bytes both ways until the controller's stream ends (it closed the tunnel) or breaks,
/// or the replica's connection breaks.
async fn pump(
    tcp: TcpStream,
    tx: mpsc::Sender<v1::TunnelFrame>,
    mut down: tonic::Streaming<v1::TunnelFrame>,
) {
    let (mut rd, mut wr) = tcp.into_split();
    // Weak: the stream must end when the replica's side is done, whatever happens down.
    let broken = tx.downgrade();
    // Replica → controller; its end of file ends our stream (drops `tx`): a half-close.
    let up = async move {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if tx.send(frame(Part::Data(data))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(frame(Part::Error(e.to_string()))).await;
                    return;
                }
            }
        }
    };
    // Controller → replica.
    let down = async move {
        loop {
            let part = match down.message().await {
                Ok(Some(f)) => f.part,
                Ok(None) => return,
                Err(status) => {
                    debug!(code = ?status.code(), reason = %status.message(), "the tunnel's call broke");
                    return;
                }
            };
            let written = match part {
                Some(Part::Data(d)) => wr.write_all(&d).await,
                // The controller writes no more: so does the replica's peer.
                Some(Part::Fin(_)) => wr.shutdown().await,
                Some(Part::Header(_)) | Some(Part::Error(_)) | None => {
                    warn!("the controller sent a tunnel frame out of place; closing the tunnel");
                    return;
                }
            };
            if let Err(e) = written {
                if let Some(tx) = broken.upgrade() {
                    let why = format!("cannot write to the replica: {e}");
                    let _ = tx.send(frame(Part::Error(why))).await;
                }
                return;
            }
        }
    };
    tokio::pin!(up, down);
    let mut up_done = false;
    loop {
        tokio::select! {
            _ = &mut up, if !up_done => up_done = true,
            _ = &mut down => return,
        }
    }
}
