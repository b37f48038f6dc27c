//! Tunnels: the controller opens a byte stream to a replica's port through the replica's agent,
//! over the agent's own gRPC connection. A real controller and agent, a real Python HTTP server
//! as the job; and a fake agent with a valid credential trying to take tunnels it was not asked
//! for.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use runyard_agent::dial::{self, Auth};
use runyard_controller::tunnel::{Tunnel, TunnelError};
use runyard_proto::v1::{self, agent_message::Msg as Out, controller_message::Msg as In};
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const LONG: Duration = Duration::from_secs(60);

/// A replica: HTTP/1.1 with keep-alive on `0.0.0.0:$PORT`; GET answers `echo <path>`, POST
/// answers its body.
const SERVER: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(("echo " + self.path).encode())

    def do_POST(self):
        self.answer(self.rfile.read(int(self.headers["Content-Length"])))

print("serving", flush=True)
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Echo).serve_forever()
"#;

/// A cluster with agent `a1` running the replica; returns it with the job id and the port, and
/// the repository (`serve.py`, `idle.py`), kept while jobs may still check it out.
async fn replica() -> anyhow::Result<(TestCluster, String, u16, GitRepo)> {
    let repo = GitRepo::new(&[
        ("serve.py", SERVER),
        ("idle.py", "import time\ntime.sleep(300)\n"),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(2))
        .start()
        .await?;
    let id = c
        .submit(json!({"repo": repo.url(), "script": "serve.py", "port": true}))
        .await?;
    c.wait_status(&id, &["running"], LONG).await?;
    let ctl = c.ctl();
    let port = runyard_tests::eventually(LONG, "the replica's port", || async {
        ctl.jobs.get(&id).and_then(|j| j.port)
    })
    .await;
    let Ok(port) = port else {
        bail!(
            "no port: {} {:?} {}",
            c.job(&id).await?,
            ctl.jobs.get(&id),
            c.logs(&id).await?
        );
    };
    let view = c.job(&id).await?;
    assert_eq!(view["port"], port, "the API shows the port: {view}");
    let placements = c.get(&format!("/api/v1/jobs/{id}/placements")).await?;
    assert_eq!(placements["placements"][0]["port"], port, "{placements}");
    Ok((c, id, port, repo))
}

/// Opens a tunnel to attempt 1 of `id` on `a1`, waiting for the replica to listen.
async fn open(c: &TestCluster, id: &str) -> anyhow::Result<Tunnel> {
    let ctl = c.ctl();
    let deadline = Instant::now() + LONG;
    loop {
        match ctl.tunnels.open(&ctl.agents, "a1", id, 1).await {
            Ok(t) => return Ok(t),
            // Not listening yet.
            Err(TunnelError::Refused { reason, .. })
                if reason.contains("cannot connect") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => bail!("cannot open a tunnel: {e}"),
        }
    }
}

/// One HTTP/1.1 exchange on a kept-alive connection: status and body.
async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: replica\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    io.write_all(&req).await?;
    io.flush().await?;
    response(io).await
}

async fn response<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut status = None;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            bail!("end of stream inside a response head");
        }
        if line == "\r\n" {
            break;
        }
        if status.is_none() {
            status = Some(line.split_whitespace().nth(1).context("status")?.parse()?);
        } else if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    io.read_exact(&mut body).await?;
    Ok((status.context("no status line")?, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_carries_kept_alive_requests_large_bodies_and_half_closes() -> anyhow::Result<()> {
    let (c, id, _port, _repo) = replica().await?;

    // Several requests on one tunnel (one connection to the replica, kept alive).
    let mut io = BufReader::new(open(&c, &id).await?);
    for i in 0..20 {
        let (status, body) = call(&mut io, "GET", &format!("/echo?{i}"), b"").await?;
        assert_eq!(
            (status, body),
            (200, format!("echo /echo?{i}").into_bytes())
        );
    }
    // 8 MiB up and the same 8 MiB back, intact.
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (status, back) = tokio::time::timeout(LONG, call(&mut io, "POST", "/big", &big)).await??;
    assert_eq!(status, 200);
    assert!(
        back == big,
        "the 8 MiB body came back changed ({} bytes)",
        back.len()
    );
    let (status, body) = call(&mut io, "GET", "/after", b"").await?;
    assert_eq!((status, body), (200, b"echo /after".to_vec()));
    drop(io);

    // Half-close: a request, then our end of writing. The replica still answers, then reads
    // end of file and closes, so we read the answer and then end of file.
    let mut io = BufReader::new(open(&c, &id).await?);
    io.write_all(b"GET /last HTTP/1.1\r\nHost: replica\r\n\r\n")
        .await?;
    io.get_mut().shutdown().await?;
    let (status, body) = response(&mut io).await?;
    assert_eq!((status, body), (200, b"echo /last".to_vec()));
    let mut rest = Vec::new();
    tokio::time::timeout(LONG, io.read_to_end(&mut rest))
        .await
        .context("the replica saw our end of file and closed")??;
    assert!(rest.is_empty());
    assert!(
        io.get_mut().write_all(b"x").await.is_err(),
        "no write after shutdown"
    );

    // Many tunnels at once, each its own connection.
    let mut tunnels = Vec::new();
    for _ in 0..8 {
        tunnels.push(BufReader::new(open(&c, &id).await?));
    }
    for (i, io) in tunnels.iter_mut().enumerate() {
        let (status, body) = call(io, "GET", &format!("/t{i}"), b"").await?;
        assert_eq!((status, body), (200, format!("echo /t{i}").into_bytes()));
    }
    assert_eq!(c.ctl().tunnels.pending(), 0);
    drop(tunnels);
    c.shutdown().await
}

/// The agent refuses what it does not hold or cannot reach, at once and with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_tunnels_to_what_it_does_not_hold() -> anyhow::Result<()> {
    let (c, id, _port, repo) = replica().await?;
    let ctl = c.ctl();
    let plain = c
        .submit(json!({"repo": repo.url(), "script": "idle.py"}))
        .await?;
    c.wait_status(&plain, &["running"], LONG).await?;
    let refused = |r: Result<Tunnel, TunnelError>| match r {
        Err(TunnelError::Refused { reason, .. }) => reason,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a tunnel"),
    };
    let started = Instant::now();
    let no_port = refused(ctl.tunnels.open(&ctl.agents, "a1", &plain, 1).await);
    assert!(no_port.contains("has no port"), "{no_port}");
    let not_held = refused(ctl.tunnels.open(&ctl.agents, "a1", &id, 2).await);
    assert!(not_held.contains("holds no attempt 2"), "{not_held}");
    let unknown = refused(
        ctl.tunnels
            .open(&ctl.agents, "a1", "01hzx3k8m9q2r4s5t6v7w8x9yz", 1)
            .await,
    );
    assert!(unknown.contains("holds no attempt"), "{unknown}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refusals come at once, not at the timeout: {:?}",
        started.elapsed()
    );
    match ctl.tunnels.open(&ctl.agents, "nobody", &id, 1).await {
        Err(TunnelError::NotConnected(name)) => assert_eq!(name, "nobody"),
        Err(e) => panic!("expected not connected, got {e}"),
        Ok(_) => panic!("a tunnel through no agent"),
    }
    assert_eq!(ctl.tunnels.pending(), 0);
    // And the real one still opens.
    let mut io = BufReader::new(open(&c, &id).await?);
    assert_eq!(call(&mut io, "GET", "/ok", b"").await?.0, 200);

    // A tunnel left open does not hold the controller's shutdown; its user reads the end.
    let mut c = c;
    let started = Instant::now();
    c.stop_controller().await?;
    assert!(
        started.elapsed() < runyard_controller::SHUTDOWN_DEADLINE,
        "the controller stopped in {:?} with a tunnel open",
        started.elapsed()
    );
    let mut rest = Vec::new();
    let end = tokio::time::timeout(LONG, io.read_to_end(&mut rest)).await?;
    assert!(rest.is_empty(), "{end:?}");
    c.shutdown().await
}

fn auth(name: &str, credential: &str, token: &str) -> Auth {
    Auth {
        token: token.into(),
        name: name.into(),
        credential: credential.into(),
        tls: None,
    }
}

/// A fake agent's session, open until dropped.
async fn session(
    c: &TestCluster,
    auth: &Auth,
) -> anyhow::Result<(
    mpsc::Sender<v1::AgentMessage>,
    tonic::Streaming<v1::ControllerMessage>,
)> {
    let mut client = dial::connect(&format!("http://{}", c.grpc_addr), auth).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(v1::AgentMessage {
        msg: Some(Out::Register(v1::Register {
            name: auth.name.clone(),
            version: "fake".into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match tokio::time::timeout(LONG, inbound.message()).await?? {
        Some(v1::ControllerMessage {
            msg: Some(In::Registered(_)),
        }) => Ok((tx, inbound)),
        other => bail!("expected Registered, got {other:?}"),
    }
}

fn header(tunnel_id: &str, job_id: &str, attempt: u32) -> v1::TunnelFrame {
    v1::TunnelFrame {
        part: Some(v1::tunnel_frame::Part::Header(v1::TunnelHeader {
            tunnel_id: tunnel_id.into(),
            job_id: job_id.into(),
            attempt,
            error: String::new(),
        })),
    }
}

/// A `Tunnel` call of `auth` with these frames; the controller's answer.
async fn call_tunnel(
    c: &TestCluster,
    auth: &Auth,
    frames: Vec<v1::TunnelFrame>,
) -> Result<tonic::Streaming<v1::TunnelFrame>, tonic::Status> {
    let mut client = dial::connect(&format!("http://{}", c.grpc_addr), auth)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client
        .tunnel(futures::stream::iter(frames))
        .await
        .map(|r| r.into_inner())
}

/// A hostile agent with a valid credential: a made-up tunnel id, another agent's tunnel id, a
/// wrong credential, a call without a header. Each is refused and the pending tunnel still
/// belongs to its agent, which then opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_cannot_open_or_take_tunnels() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .agent_ttl(Duration::from_secs(60))
        .start()
        .await?;
    let ctl = c.ctl();
    let token = c.agent_token.clone();
    let owner = auth("owner", "ryc_owner-own-credential", &token);
    let mallory = auth("mallory", "ryc_mallory-own-credential", &token);
    let (_owner_tx, mut owner_in) = session(&c, &owner).await?;
    let (_mallory_tx, _mallory_in) = session(&c, &mallory).await?;
    const JOB: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";

    let opening = {
        let ctl = ctl.clone();
        tokio::spawn(async move { ctl.tunnels.open(&ctl.agents, "owner", JOB, 1).await })
    };
    let asked = loop {
        match tokio::time::timeout(LONG, owner_in.message()).await?? {
            Some(v1::ControllerMessage {
                msg: Some(In::OpenTunnel(o)),
            }) => break o,
            Some(_) => continue,
            None => bail!("the owner's session ended"),
        }
    };
    assert_eq!((asked.job_id.as_str(), asked.attempt), (JOB, 1));
    assert_eq!(asked.tunnel_id.len(), 32);

    let denied = |r: Result<tonic::Streaming<v1::TunnelFrame>, tonic::Status>, code| match r {
        Err(s) => assert_eq!(s.code(), code, "{s:?}"),
        Ok(_) => panic!("a hostile tunnel call was accepted"),
    };
    // Another agent's tunnel id, as it is and for another job.
    let theirs = header(&asked.tunnel_id, JOB, 1);
    denied(
        call_tunnel(&c, &mallory, vec![theirs.clone()]).await,
        tonic::Code::PermissionDenied,
    );
    denied(
        call_tunnel(
            &c,
            &mallory,
            vec![header(&asked.tunnel_id, "01hzx3k8m9q2r4s5t6v7w8x9zz", 1)],
        )
        .await,
        tonic::Code::PermissionDenied,
    );
    // Made-up ids, one of them not of the controller's form.
    for made_up in ["0123456789abcdef0123456789abcdef", "../../etc/passwd", ""] {
        denied(
            call_tunnel(&c, &mallory, vec![header(made_up, JOB, 1)]).await,
            tonic::Code::PermissionDenied,
        );
    }
    // The owner's name without its credential; no header first.
    let impostor = auth("owner", "ryc_not-the-owners", &token);
    denied(
        call_tunnel(&c, &impostor, vec![theirs.clone()]).await,
        tonic::Code::Unauthenticated,
    );
    let data = v1::TunnelFrame {
        part: Some(v1::tunnel_frame::Part::Data(
            b"GET / HTTP/1.1\r\n\r\n".to_vec().into(),
        )),
    };
    denied(
        call_tunnel(&c, &mallory, vec![data]).await,
        tonic::Code::InvalidArgument,
    );
    assert_eq!(ctl.tunnels.pending(), 1, "the owner's tunnel still waits");
    assert!(!opening.is_finished(), "nothing was handed to the waiter");

    // The owner opens it, and bytes flow.
    let (tx, rx) = mpsc::channel(4);
    tx.send(theirs).await?;
    tx.send(v1::TunnelFrame {
        part: Some(v1::tunnel_frame::Part::Data(b"hello".to_vec().into())),
    })
    .await?;
    let mut client = dial::connect(&format!("http://{}", c.grpc_addr), &owner).await?;
    let mut down = client.tunnel(ReceiverStream::new(rx)).await?.into_inner();
    let mut tunnel = tokio::time::timeout(LONG, opening).await???;
    let mut got = [0u8; 5];
    tunnel.read_exact(&mut got).await?;
    assert_eq!(&got, b"hello");
    tunnel.write_all(b"back").await?;
    match down.message().await?.and_then(|f| f.part) {
        Some(v1::tunnel_frame::Part::Data(d)) => assert_eq!(&d[..], b"back"),
        other => bail!("expected data, got {other:?}"),
    }
    // Used once: the same id again is refused.
    denied(
        call_tunnel(&c, &owner, vec![header(&asked.tunnel_id, JOB, 1)]).await,
        tonic::Code::PermissionDenied,
    );
    drop(tunnel);
    assert!(
        down.message().await?.is_none(),
        "closing the tunnel ends the call"
    );
    assert_eq!(ctl.tunnels.pending(), 0);
    drop(tx);
    c.shutdown().await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let (status, _) = call(io, "GET", &format!("/r{i}"), b"").await?;
        times.push(t.elapsed());
        assert_eq!(status, 200);
    }
    times.sort();
    Ok(times)
}

/// Not a check: prints the round trip of a small request through a tunnel and directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_a_tunnel_and_directly() -> anyhow::Result<()> {
    const N: usize = 2000;
    let (c, id, port, _repo) = replica().await?;
    let mut tunnel = BufReader::new(open(&c, &id).await?);
    let direct = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    direct.set_nodelay(true)?;
    let mut direct = BufReader::new(direct);
    // Warm both up.
    round_trips(&mut tunnel, 100).await?;
    round_trips(&mut direct, 100).await?;
    let t = round_trips(&mut tunnel, N).await?;
    let d = round_trips(&mut direct, N).await?;
    println!(
        "round trip over {N} kept-alive requests: tunnel p50 {:?} p90 {:?} p99 {:?}; direct p50 {:?} p90 {:?} p99 {:?}; tunnel overhead p50 {:?}",
        percentile(&t, 0.5),
        percentile(&t, 0.9),
        percentile(&t, 0.99),
        percentile(&d, 0.5),
        percentile(&d, 0.9),
        percentile(&d, 0.99),
        percentile(&t, 0.5).saturating_sub(percentile(&d, 0.5)),
    );
    drop(tunnel);
    c.shutdown().await
}
