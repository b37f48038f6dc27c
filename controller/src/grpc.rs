//! The agent-facing gRPC service: one bidirectional `Session` stream per agent.
//!
//! Messages of a session are handled strictly in order, so log lines sent before a status are
//! persisted before the status is applied: a job's logs are complete before its terminal state
//! is visible. On (re-)registration the agent lists the attempts it holds; the controller
//! re-attaches current ones, fences stale ones (stop), resends lost assignments, and tells the
//! agent where each log resumes.
//!
//! The session is a translator and a trust boundary. It turns messages into calls on the core
//! (jobs, logs, agents) and checks each one against what the controller placed on this agent:
//! lines, report lines, statuses and checkpoints are accepted only for an attempt placed on the
//! calling agent (`Job::placed_on`), with a job id of the controller's own form (it names
//! files). Anything else is refused, logged with the agent, job and attempt, and changes
//! nothing. An agent authenticates with its own credential (`Agents::admit`); one agent has one
//! session at a time (`Agents::claim`).
//!
//! `UploadCheckpoint` and `Tunnel` are calls of their own, made with the agent's own credential
//! (`enrolled`). A `Tunnel` call is accepted only for a tunnel the controller asked that agent
//! for, naming the same job and attempt (`tunnel.rs`); anything else is refused, logged and
//! changes nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use runyard_model::{AgentInfo, GpuInfo, Job, Timestamp, is_job_id};
use runyard_proto::v1::{self, agent_message, controller_message::Msg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agents::AdmitError;
use crate::artifacts::ArtifactError;
use crate::attach::{self, Missing};
use crate::executor::Controller;
use crate::logs::Appended;
use crate::reconcile::{self, Reply};
use crate::tokens::token_eq;
use crate::tunnel;

/// The controller's store of a line stream.
fn line_store(ctl: &Controller, stream: v1::Stream) -> &crate::logs::LogStore {
    match stream {
        v1::Stream::Log => &ctl.logs,
        v1::Stream::Report => &ctl.reports,
    }
}

/// Grace period of a stop about an attempt whose job spec is not at hand.
const DEFAULT_STOP_GRACE_MS: u64 = 10_000;

/// Outbound messages buffered per session (more wait in the agent's backlog, see `agents`).
const SESSION_BUFFER: usize = 4096;
/// Longest agent name (a host name is at most 253 characters).
const MAX_NAME: usize = 253;

pub struct AgentService {
    ctl: Controller,
    join_token: String,
    heartbeat: Duration,
    cancel: CancellationToken,
    /// Every session task; `run` waits for them at shutdown.
    tasks: TaskTracker,
}

impl AgentService {
    pub fn new(ctl: Controller, join_token: String, cancel: CancellationToken) -> AgentService {
        let heartbeat =
            (ctl.agent_ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
        AgentService {
            ctl,
            join_token,
            heartbeat,
            cancel,
            tasks: TaskTracker::new(),
        }
    }

    /// The session tasks, to wait for at shutdown.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }
}

/// Who is calling, from the call's metadata.
struct Caller {
    join_token_ok: bool,
    name: Option<String>,
    credential: Option<String>,
}

impl AgentService {
    fn caller<T>(&self, req: &Request<T>) -> Caller {
        let header = |key: &str| {
            req.metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let presented = header("authorization");
        let join_token = presented
            .as_deref()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        Caller {
            join_token_ok: token_eq(join_token, &self.join_token),
            name: header(runyard_proto::AGENT_NAME_HEADER),
            credential: header(runyard_proto::CREDENTIAL_HEADER),
        }
    }
}

impl AgentService {
    /// The calling agent's name, when the call carries that enrolled agent's own credential
    /// (uploads and tunnels: only a session enrols).
    fn enrolled<T>(&self, req: &Request<T>, what: &str) -> Result<String, Status> {
        let caller = self.caller(req);
        let name = caller.name.unwrap_or_default();
        if !self.ctl.agents.verify(&name, caller.credential.as_deref()) {
            return Err(Status::unauthenticated(format!(
                "{what} need an enrolled agent's name and credential"
            )));
        }
        Ok(name)
    }
}

/// The one place an enrolment refusal becomes a gRPC status.
fn admit_status(e: AdmitError) -> Status {
    match e {
        AdmitError::NameTaken(_) => Status::permission_denied(e.to_string()),
        AdmitError::JoinToken(_) => Status::unauthenticated(e.to_string()),
        AdmitError::NoCredential(_) => Status::unauthenticated(e.to_string()),
        AdmitError::Store(ref error) => {
            warn!(%error, "cannot record an agent's enrolment");
            Status::unavailable(e.to_string())
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.contains('/')
        && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Why a message about an attempt is refused.
#[derive(Debug)]
enum Refusal {
    /// The job id is not of the controller's form (it would name another path).
    BadId,
    UnknownJob,
    /// The attempt was not placed on the calling agent.
    NotPlacedHere,
    /// The job store cannot be read now; the agent resends later.
    Unavailable,
}

/// The job, if the controller placed `attempt` of it on `agent`.
async fn placed_on(
    ctl: &Controller,
    agent: &str,
    job_id: &str,
    attempt: u32,
) -> Result<Job, Refusal> {
    if !is_job_id(job_id) {
        return Err(Refusal::BadId);
    }
    let job = match ctl.jobs.fetch(job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return Err(Refusal::UnknownJob),
        Err(_) => return Err(Refusal::Unavailable),
    };
    if job.placed_on(attempt) == Some(agent) {
        Ok(job)
    } else {
        Err(Refusal::NotPlacedHere)
    }
}

fn refused(agent: &str, what: &'static str, job_id: &str, attempt: u32, why: &Refusal) {
    warn!(%agent, job = ?job_id, attempt, what, why = ?why, "refused a message about an attempt not placed on this agent");
}

type Outbound =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::ControllerMessage, Status>> + Send>>;

type CheckpointStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::CheckpointChunk, Status>> + Send>>;

type SnapshotStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentService {
    type SessionStream = Outbound;
    type TunnelStream = tunnel::Outbound;
    type DownloadCheckpointStream = CheckpointStream;
    type DownloadSnapshotStream = SnapshotStream;

    async fn download_snapshot(
        &self,
        req: Request<v1::SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let name = self.enrolled(&req, "snapshot downloads")?;
        let r = req.into_inner();
        let job = match placed_on(&self.ctl, &name, &r.job_id, r.attempt).await {
            Ok(job) => job,
            Err(why) => {
                refused(&name, "snapshot download", &r.job_id, r.attempt, &why);
                return Err(Status::permission_denied(format!(
                    "attempt {} of job {:?} was not placed on agent {name}",
                    r.attempt, r.job_id
                )));
            }
        };
        if runyard_model::spec::snapshot_of(&job.spec.repo) != Some(r.sha256.as_str()) {
            warn!(agent = %name, job = %r.job_id, snapshot = ?r.sha256, "refused a snapshot the job's spec does not name");
            return Err(Status::permission_denied(format!(
                "job {:?} does not run snapshot {:?}",
                r.job_id, r.sha256
            )));
        }
        let file = match &self.ctl.snapshots {
            Some(store) => store.open_archive(&r.sha256).await,
            None => None,
        };
        let Some(mut file) = file else {
            return Err(Status::not_found(format!("no snapshot {:?}", r.sha256)));
        };
        info!(agent = %name, job = %r.job_id, snapshot = %r.sha256, "sending a snapshot");
        let stream = async_stream::try_stream! {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).await.map_err(|e| Status::unavailable(format!("reading the snapshot: {e}")))?;
                if n == 0 {
                    break;
                }
                yield v1::SnapshotChunk { data: buf[..n].to_vec() };
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn download_checkpoint(
        &self,
        req: Request<v1::CheckpointRequest>,
    ) -> Result<Response<CheckpointStream>, Status> {
        let name = self.enrolled(&req, "checkpoint downloads")?;
        let r = req.into_inner();
        let job = match placed_on(&self.ctl, &name, &r.job_id, r.attempt).await {
            Ok(job) => job,
            Err(why) => {
                refused(&name, "checkpoint download", &r.job_id, r.attempt, &why);
                return Err(Status::permission_denied(format!(
                    "attempt {} of job {:?} was not placed on agent {name}",
                    r.attempt, r.job_id
                )));
            }
        };
        if job.spec.model_from.as_deref() != Some(r.source_job_id.as_str()) {
            warn!(agent = %name, job = %r.job_id, source = ?r.source_job_id, "refused a checkpoint the job's spec does not name");
            return Err(Status::permission_denied(format!(
                "job {:?} does not name job {:?} in model_from",
                r.job_id, r.source_job_id
            )));
        }
        let source = match self.ctl.jobs.fetch(&r.source_job_id).await {
            Ok(Some(j)) => j,
            Ok(None) => {
                return Err(Status::not_found(format!(
                    "job {:?} is gone",
                    r.source_job_id
                )));
            }
            Err(_) => return Err(Status::unavailable("the job store is unavailable; retry")),
        };
        let (meta, mut file) = match self.ctl.checkpoint_of(&source).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Err(Status::not_found(format!(
                    "job {:?} has no checkpoint",
                    r.source_job_id
                )));
            }
            Err(e) => {
                warn!(error = %e, "cannot open a checkpoint");
                return Err(Status::unavailable("cannot read the checkpoint; retry"));
            }
        };
        info!(agent = %name, job = %r.job_id, source = %r.source_job_id, size = meta.size, "sending a checkpoint");
        let stream = async_stream::try_stream! {
            use tokio::io::AsyncReadExt;
            yield v1::CheckpointChunk {
                part: Some(v1::checkpoint_chunk::Part::Header(v1::CheckpointHeader {
                    job_id: r.source_job_id.clone(),
                    attempt: 0,
                    file_name: meta.file_name.clone(),
                    size: meta.size,
                })),
            };
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).await.map_err(|e| Status::unavailable(format!("reading the checkpoint: {e}")))?;
                if n == 0 {
                    break;
                }
                yield v1::CheckpointChunk {
                    part: Some(v1::checkpoint_chunk::Part::Data(buf[..n].to_vec())),
                };
            }
            yield v1::CheckpointChunk {
                part: Some(v1::checkpoint_chunk::Part::Sha256(meta.sha256.clone())),
            };
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<v1::CheckpointChunk>>,
    ) -> Result<Response<v1::CheckpointReceipt>, Status> {
        let name = self.enrolled(&req, "checkpoint uploads")?;
        let mut chunks = req.into_inner();
        let header = match chunks.message().await? {
            Some(v1::CheckpointChunk {
                part: Some(v1::checkpoint_chunk::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of an upload must be its header",
                ));
            }
        };
        if let Err(why) = placed_on(&self.ctl, &name, &header.job_id, header.attempt).await {
            refused(&name, "checkpoint", &header.job_id, header.attempt, &why);
            return Err(Status::permission_denied(format!(
                "attempt {} of job {:?} was not placed on agent {name}",
                header.attempt, header.job_id
            )));
        }
        let to_status = |e: ArtifactError| match e {
            ArtifactError::Io(e) => {
                warn!(error = %e, "artifact store error");
                Status::unavailable("the controller cannot store the artifact; retry")
            }
            other => Status::invalid_argument(other.to_string()),
        };
        let mut upload = self
            .ctl
            .artifacts
            .begin(
                &header.job_id,
                header.attempt,
                &header.file_name,
                header.size,
            )
            .await
            .map_err(to_status)?;
        while let Some(chunk) = chunks.message().await? {
            match chunk.part {
                Some(v1::checkpoint_chunk::Part::Data(d)) => {
                    upload.write(&d).await.map_err(to_status)?
                }
                Some(v1::checkpoint_chunk::Part::Sha256(sum)) => {
                    let meta = upload.finish(&sum).await.map_err(to_status)?;
                    info!(job = %header.job_id, attempt = header.attempt, file = %meta.file_name, size = meta.size, "checkpoint stored");
                    return Ok(Response::new(v1::CheckpointReceipt {
                        size: meta.size,
                        sha256: meta.sha256,
                    }));
                }
                _ => return Err(Status::invalid_argument("unexpected message in an upload")),
            }
        }
        Err(Status::invalid_argument("upload ended before its sha256"))
    }

    /// Checked like an upload (the agent's own credential), then handed to the tunnel that
    /// waits for it only if that tunnel was asked of this agent for this job and attempt.
    async fn tunnel(
        &self,
        req: Request<Streaming<v1::TunnelFrame>>,
    ) -> Result<Response<tunnel::Outbound>, Status> {
        let name = self.enrolled(&req, "tunnels")?;
        let mut frames = req.into_inner();
        let header = match frames.message().await? {
            Some(v1::TunnelFrame {
                part: Some(v1::tunnel_frame::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a tunnel must be its header",
                ));
            }
        };
        match self.ctl.tunnels.accept(&name, &header, Box::pin(frames)) {
            // A tunnel lasts as long as its user keeps it, but not past shutdown.
            Ok(out) => Ok(Response::new(Box::pin(
                out.take_until(self.cancel.clone().cancelled_owned()),
            ))),
            Err(error @ tunnel::AcceptError::Gone(_)) => {
                debug!(agent = %name, %error, "a tunnel opened too late");
                Err(Status::cancelled(error.to_string()))
            }
            Err(error) => {
                warn!(agent = %name, job = ?header.job_id, attempt = header.attempt, %error, "refused a tunnel the controller did not ask this agent for");
                Err(Status::permission_denied(error.to_string()))
            }
        }
    }

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let caller = self.caller(&req);
        if !caller.join_token_ok && caller.credential.is_none() {
            return Err(Status::unauthenticated(
                "invalid agent join token: pass the controller's agent.token with --token-file",
            ));
        }
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let peer_ip = req.remote_addr().map(|a| a.ip().to_canonical());
        let mut inbound = req.into_inner();
        let first = match inbound.message().await? {
            Some(v1::AgentMessage {
                msg: Some(agent_message::Msg::Register(r)),
            }) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Register",
                ));
            }
        };
        if first.name.is_empty() {
            return Err(Status::invalid_argument("Register.name must not be empty"));
        }
        if !valid_name(&first.name) {
            return Err(Status::invalid_argument(
                "Register.name must be at most 253 characters without '/', spaces or control characters",
            ));
        }
        if caller.name.as_deref().is_some_and(|n| n != first.name) {
            return Err(Status::invalid_argument(
                "Register.name differs from the x-runyard-agent metadata",
            ));
        }
        let enrolled = self
            .ctl
            .agents
            .admit(
                &first.name,
                caller.credential.as_deref(),
                caller.join_token_ok,
            )
            .await
            .map_err(|e| {
                warn!(agent = %first.name, %peer, error = %e, "agent session refused");
                admit_status(e)
            })?;
        if enrolled {
            info!(agent = %first.name, %peer, "agent enrolled");
        }
        let (turn, claim) = self.ctl.agents.claim(&first.name);
        // Replicas on the agent are dialed directly only where its session comes straight from
        // it: behind NAT or a proxy, the address seen is not the agent's host.
        let own = first.address.parse::<std::net::IpAddr>().ok();
        match (peer_ip, own.map(|ip| ip.to_canonical())) {
            (Some(seen), Some(own)) if seen != own => {
                info!(agent = %first.name, %seen, %own, "the agent's session comes through NAT or a proxy: its service replicas are reached through tunnels");
                self.ctl.agents.forget_address(&first.name);
            }
            (Some(seen), _) => self.ctl.agents.note_address(&first.name, seen),
            (None, _) => self.ctl.agents.forget_address(&first.name),
        }
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = Session {
            ctl: self.ctl.clone(),
            name: first.name.clone(),
            tx,
            claim: claim.clone(),
        };
        let heartbeat = self.heartbeat;
        let cancel = self.cancel.clone();
        let span = info_span!("agent_session", agent = %first.name, %peer);
        let first_name = first.name.clone();
        // The session's id once connected, for the cleanup of a session task that panics.
        let connected = Arc::new(AtomicU64::new(0));
        let opened = connected.clone();
        let run = async move {
            // Wait for the agent's previous session to end (it was told to).
            let _turn = tokio::select! {
                t = turn.lock_owned() => t,
                _ = claim.cancelled() => return info!("superseded before it started"),
                _ = cancel.cancelled() => return,
            };
            let id = session.open(first, heartbeat).await;
            opened.store(id, Ordering::Relaxed);
            let result = tokio::select! {
                r = session.serve(&mut inbound, &claim, &cancel) => r,
                _ = session.ctl.agents.forward(&session.name, id) => Ok(()),
            };
            // A silent agent was last seen at its last message, not now.
            let seen = match &result {
                Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
                    session.ctl.agents.last_seen(&session.name)
                }
                _ => None,
            };
            if let Err(error) = result {
                warn!(%error, "agent session ended with an error");
            }
            session
                .ctl
                .agents
                .disconnect(&session.name, id, seen.unwrap_or_else(Timestamp::now))
                .await;
            session.ctl.kick();
            info!("agent disconnected");
        };
        let (ctl, name) = (self.ctl.clone(), first_name);
        self.tasks.spawn(
            async move {
                // A panic must not leave the agent looking connected with nobody serving it.
                if let Err(error) = tokio::spawn(run.in_current_span()).await {
                    tracing::error!(%error, "agent session task failed");
                    let id = connected.load(Ordering::Relaxed);
                    if id != 0 {
                        ctl.agents.disconnect(&name, id, Timestamp::now()).await;
                        ctl.kick();
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

struct Session {
    ctl: Controller,
    name: String,
    tx: mpsc::Sender<v1::ControllerMessage>,
    /// Fires when a newer session of the agent claims its turn.
    claim: CancellationToken,
}

impl Session {
    async fn send(&self, msg: Msg) {
        // A failed send means the agent is gone; the session ends on its own. A send stuck on a
        // dead connection gives way to the agent's newer session.
        tokio::select! {
            _ = self.tx.send(v1::ControllerMessage { msg: Some(msg) }) => {}
            _ = self.claim.cancelled() => {}
        }
    }

    async fn open(&self, reg: v1::Register, heartbeat: Duration) -> u64 {
        let now = Timestamp::now();
        let info = AgentInfo {
            name: reg.name.clone(),
            connected: true,
            cpu_small_slots: reg.cpu_small_slots,
            gpus: reg.gpus.into_iter().map(GpuInfo::from).collect(),
            cpus: reg.cpus,
            memory_bytes: reg.memory_bytes,
            version: reg.version,
            last_seen: now,
            jobs: Vec::new(),
        };
        info!(
            slots = info.cpu_small_slots,
            gpus = info.gpus.len(),
            attempts = reg.attempts.len(),
            "agent registered"
        );
        let id = self
            .ctl
            .agents
            .connect(info, self.tx.clone(), self.claim.clone())
            .await;
        self.send(Msg::Registered(v1::Registered {
            heartbeat_interval_ms: heartbeat.as_millis() as u64,
            controller_version: env!("CARGO_PKG_VERSION").into(),
        }))
        .await;
        self.reattach(reg.attempts).await;
        self.ctl.kick();
        id
    }

    /// Reconciles what the agent holds with what the controller expects of it.
    async fn reattach(&self, attempts: Vec<v1::AttemptReport>) {
        let mut held = HashSet::new();
        for a in attempts {
            match placed_on(&self.ctl, &self.name, &a.job_id, a.attempt).await {
                Ok(_) => {}
                Err(Refusal::UnknownJob) => {
                    // Not the controller's (a wiped store?): stop it; its final status is
                    // answered with a release.
                    self.fence_unknown(&a.job_id, a.attempt).await;
                    continue;
                }
                Err(why) => {
                    refused(&self.name, "register", &a.job_id, a.attempt, &why);
                    continue;
                }
            }
            held.insert((a.job_id.clone(), a.attempt));
            for stream in [v1::Stream::Log, v1::Stream::Report] {
                let next = line_store(&self.ctl, stream)
                    .lines(&a.job_id, a.attempt)
                    .await
                    .unwrap_or(0);
                self.send(Msg::LogAck(v1::LogAck {
                    job_id: a.job_id.clone(),
                    attempt: a.attempt,
                    next_seq: next,
                    stream: stream as i32,
                }))
                .await;
            }
            match a.status {
                Some(st) => self.status(st).await,
                None => self.fence_unknown(&a.job_id, a.attempt).await,
            }
        }
        let now = Timestamp::now();
        let active = self.ctl.jobs.active();
        for m in attach::missing(&active, &self.name, &held) {
            let lose = match m {
                Missing::Resend(id) => {
                    if let Some(job) = active.iter().find(|j| j.id == id) {
                        match self.ctl.assignment(job).await {
                            Ok(cmd) => {
                                if let Some(msg) = runyard_proto::command_to_wire(&cmd).msg {
                                    self.send(msg).await;
                                }
                            }
                            Err(error) => {
                                warn!(job = %id, %error, "cannot resolve the job's secrets; the assignment waits")
                            }
                        }
                    }
                    continue;
                }
                Missing::Lose(action) => action,
            };
            match self
                .ctl
                .jobs
                .update(lose.job(), |j| {
                    reconcile::apply(j, &lose, now).map(|n| (n, ()))
                })
                .await
            {
                Ok(Some((j, ()))) => {
                    warn!(job = %j.id, attempt = j.attempt, "agent returned without the attempt; marked lost")
                }
                Ok(None) => {}
                Err(error) => warn!(job = %lose.job(), %error, "cannot mark attempt lost"),
            }
        }
    }

    /// An attempt the agent holds but has not reported on yet: fence it if it is not current.
    async fn fence_unknown(&self, job_id: &str, attempt: u32) {
        let current = self
            .ctl
            .jobs
            .get(job_id)
            .is_some_and(|j| attach::is_current(&j, &self.name, attempt));
        if !current {
            self.reply(Reply::Stop, job_id, attempt, None, "attempt replaced")
                .await;
        }
    }

    /// Sends what reconcile answered about an attempt.
    async fn reply(
        &self,
        reply: Reply,
        job_id: &str,
        attempt: u32,
        grace: Option<Duration>,
        reason: &str,
    ) {
        let (job_id, grace_ms) = (
            job_id.to_string(),
            grace.map_or(DEFAULT_STOP_GRACE_MS, |g| g.as_millis() as u64),
        );
        match reply {
            Reply::Nothing => {}
            Reply::Release => {
                self.send(Msg::Release(v1::Release { job_id, attempt }))
                    .await
            }
            Reply::Stop => {
                self.send(Msg::Stop(v1::Stop {
                    job_id,
                    attempt,
                    grace_ms,
                    reason: reason.into(),
                }))
                .await
            }
        }
    }

    /// Handles messages in order until the stream ends or a token fires; a token is checked
    /// between messages only, so a message is never half handled. An agent silent for the TTL
    /// (it heartbeats four times per TTL) ends its session with `DeadlineExceeded`: a hung agent
    /// whose connection stays up is then lost like one whose connection broke.
    async fn serve(
        &self,
        inbound: &mut (impl futures::Stream<Item = Result<v1::AgentMessage, Status>> + Unpin),
        claim: &CancellationToken,
        cancel: &CancellationToken,
    ) -> Result<(), Status> {
        loop {
            let silence = tokio::time::sleep(self.ctl.agent_ttl);
            let m = tokio::select! {
                m = inbound.next() => match m.transpose()? {
                    Some(m) => m,
                    None => return Ok(()),
                },
                _ = silence => {
                    warn!(ttl = ?self.ctl.agent_ttl, "agent silent past the TTL; ending its session");
                    return Err(Status::deadline_exceeded("no message from the agent within the TTL"));
                }
                _ = claim.cancelled() => {
                    info!("a newer session of this agent replaces this one");
                    return Ok(());
                }
                _ = cancel.cancelled() => return Ok(()),
            };
            let now = Timestamp::now();
            match m.msg {
                Some(agent_message::Msg::Heartbeat(h)) => self.ctl.agents.heartbeat(
                    &self.name,
                    h.gpus.into_iter().map(GpuInfo::from).collect(),
                    now,
                ),
                Some(agent_message::Msg::Logs(chunk)) => {
                    self.ctl.agents.heartbeat(&self.name, Vec::new(), now);
                    self.logs(chunk).await?;
                }
                Some(agent_message::Msg::Status(st)) => {
                    self.ctl.agents.heartbeat(&self.name, Vec::new(), now);
                    self.status(st).await;
                }
                Some(agent_message::Msg::Evaluated(e)) => {
                    let result = match e.value {
                        Some(v) => Ok(v),
                        None => Err(e.error),
                    };
                    // Only an answer to a call made to this agent is taken.
                    self.ctl
                        .services
                        .evaluated(&self.name, &e.request_id, result);
                }
                Some(agent_message::Msg::Register(_)) => {
                    return Err(Status::invalid_argument(
                        "Register is only valid as the first message",
                    ));
                }
                None => {}
            }
        }
    }

    async fn logs(&self, c: v1::LogChunk) -> Result<(), Status> {
        let stream = c.stream();
        match placed_on(&self.ctl, &self.name, &c.job_id, c.attempt).await {
            Ok(_) => {}
            Err(Refusal::UnknownJob) => {
                // A deleted job (or none at all): acknowledge the lines so the agent frees its
                // spool, and keep nothing, so no file outlives its job.
                debug!(job = %c.job_id, attempt = c.attempt, ?stream, "lines of an unknown job dropped");
                self.send(Msg::LogAck(v1::LogAck {
                    job_id: c.job_id,
                    attempt: c.attempt,
                    next_seq: c.first_seq + u64::from(c.count),
                    stream: stream as i32,
                }))
                .await;
                return Ok(());
            }
            Err(Refusal::Unavailable) => {
                return Err(Status::unavailable(
                    "controller cannot read its jobs; retry",
                ));
            }
            Err(why) => {
                refused(&self.name, "lines", &c.job_id, c.attempt, &why);
                return Ok(());
            }
        }
        let store = line_store(&self.ctl, stream);
        let before = store.lines(&c.job_id, c.attempt).await.unwrap_or(0);
        let appended = store
            .append(&c.job_id, c.attempt, c.first_seq, c.count, c.data.clone())
            .await
            .map_err(|e| {
                warn!(job = %c.job_id, attempt = c.attempt, error = %e, ?stream, "cannot persist lines");
                Status::unavailable("controller cannot persist log lines; retry")
            })?;
        let next_seq = match appended {
            Appended::Through(n) => n,
            Appended::Gap(n) => {
                warn!(job = %c.job_id, attempt = c.attempt, have = n, got = c.first_seq, ?stream, "gap; asking the agent to resend");
                n
            }
        };
        if stream == v1::Stream::Report && next_seq > before {
            // Folded into the job's summary in batches (see `reports.rs`).
            self.ctl.fold.mark(&c.job_id);
        }
        self.send(Msg::LogAck(v1::LogAck {
            job_id: c.job_id,
            attempt: c.attempt,
            next_seq,
            stream: stream as i32,
        }))
        .await;
        Ok(())
    }

    async fn status(&self, st: v1::StatusUpdate) {
        let Some(status) = runyard_proto::status_from_wire(&st) else {
            warn!(job = %st.job_id, state = st.state, "status update with an unknown state");
            return;
        };
        match placed_on(&self.ctl, &self.name, &st.job_id, st.attempt).await {
            Ok(_) => {}
            // Not a job of this controller: nothing to change; let the agent stop and forget it.
            Err(Refusal::UnknownJob) => {
                let reply = attach::unknown_job_reply(status.state.is_terminal());
                return self
                    .reply(reply, &st.job_id, st.attempt, None, "unknown job")
                    .await;
            }
            Err(why) => return refused(&self.name, "status", &st.job_id, st.attempt, &why),
        }
        if status.state.is_terminal() {
            let have = self
                .ctl
                .logs
                .lines(&st.job_id, st.attempt)
                .await
                .unwrap_or(0);
            let reports = self
                .ctl
                .reports
                .lines(&st.job_id, st.attempt)
                .await
                .unwrap_or(0);
            if !attach::lines_complete((have, reports), (st.log_lines, st.report_lines)) {
                // Not all lines are here yet: the agent resends the status after the lines.
                warn!(job = %st.job_id, attempt = st.attempt, have, want = st.log_lines, reports, "terminal status before its lines; waiting");
                return;
            }
            // Every line is here: the count of lines dropped over the size limit is final.
            if let Err(error) = self.ctl.logs.seal(&st.job_id, st.attempt).await {
                warn!(job = %st.job_id, attempt = st.attempt, %error, "cannot write the log limit marker; the agent will resend the status");
                return;
            }
            // The summary holds every report line before the job shows as finished.
            if let Err(error) = self
                .ctl
                .fold
                .flush(&self.ctl.jobs, &self.ctl.reports, &st.job_id)
                .await
            {
                warn!(job = %st.job_id, %error, "cannot fold report lines; the agent will resend the status");
                return;
            }
        }
        let now = Timestamp::now();
        let updated = self
            .ctl
            .jobs
            .update(&st.job_id, |j| {
                let (next, reply) = reconcile::on_status(j, &status, &self.name, now);
                Some((next.unwrap_or_else(|| j.clone()), reply))
            })
            .await;
        let (job, reply) = match updated {
            Ok(Some((job, reply))) => (Some(job), reply),
            Ok(None) => (
                None,
                if status.state.is_terminal() {
                    Reply::Release
                } else {
                    Reply::Stop
                },
            ),
            Err(error) => {
                warn!(job = %st.job_id, %error, "cannot record job status; the agent will resend it");
                return;
            }
        };
        if let Some(job) = &job
            && job.updated_at == now
        {
            info!(job = %job.id, attempt = st.attempt, status = %job.status, exit_code = ?job.exit_code, reason = ?job.reason, "job status");
            self.ctl.kick();
        }
        let grace = job.map(|j| j.spec.stop_grace);
        self.reply(
            reply,
            &st.job_id,
            st.attempt,
            grace,
            "stopped by the controller",
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use runyard_model::{JobSpec, JobStatus};

    use super::*;
    use crate::{agents, artifacts, jobs, logs, reconcile, store};

    const TTL: Duration = Duration::from_secs(30);

    async fn controller(dir: &std::path::Path) -> Controller {
        let store = store::open("file:", dir).await.unwrap();
        Controller::new(
            jobs::Jobs::load(store.clone()).await.unwrap(),
            agents::Agents::load(store, Timestamp::now()).await.unwrap(),
            logs::LogStore::open(dir.join("logs")).unwrap(),
            logs::LogStore::open(dir.join("reports")).unwrap(),
            Arc::new(artifacts::DirStore::open(dir.join("artifacts")).unwrap()),
            TTL,
        )
    }

    /// The heartbeat TTL under tokio's paused clock: an agent whose stream stays open but which
    /// sends nothing (hung) has its session ended after the TTL, is last seen at its last
    /// message, and reconcile (pure, `now` passed in) loses its job one TTL after that.
    /// Regression: a connected agent was never lost, however long it stayed silent.
    #[tokio::test(start_paused = true)]
    async fn an_agent_silent_past_the_ttl_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path()).await;
        let spec = JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py"}"#).unwrap();
        let job = ctl.submit(spec, "admin").await.unwrap();
        let (tx, _rx) = mpsc::channel(64);
        let (_turn, claim) = ctl.agents.claim("a");
        let session = Session {
            ctl: ctl.clone(),
            name: "a".into(),
            tx,
            claim: claim.clone(),
        };
        let reg = v1::Register {
            name: "a".into(),
            cpu_small_slots: 1,
            ..Default::default()
        };
        let id = session.open(reg, Duration::from_secs(1)).await;
        ctl.reconcile_once().await;
        assert_eq!(ctl.jobs.get(&job.id).unwrap().status, JobStatus::Scheduled);

        let started = tokio::time::Instant::now();
        let mut hung = futures::stream::pending();
        let ended = session
            .serve(&mut hung, &claim, &CancellationToken::new())
            .await;
        assert_eq!(ended.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() >= TTL && started.elapsed() < TTL + Duration::from_secs(1));

        let seen = ctl.agents.last_seen("a").unwrap();
        ctl.agents.disconnect("a", id, seen).await;
        let views = ctl.agents.views();
        assert!(!views[0].connected);
        let jobs = ctl.jobs.active_states();
        let refs: Vec<&runyard_model::JobState> = jobs.iter().collect();
        let at = |ms: u64| Timestamp(seen.0 + ms);
        let ttl_ms = TTL.as_millis() as u64;
        let lose = reconcile::Action::Lose {
            job: job.id.clone(),
            attempt: 1,
        };
        assert!(!reconcile::reconcile(&refs, &views, at(ttl_ms), TTL).contains(&lose));
        assert!(reconcile::reconcile(&refs, &views, at(ttl_ms + 1), TTL).contains(&lose));
    }
}
