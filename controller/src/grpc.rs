//! The agent-facing gRPC service: one bidirectional `Session` stream per agent.
//!
//! Messages of a session are handled strictly in order, so log lines sent before a status are
//! persisted before the status is applied: a job's logs are complete before its terminal state
//! is visible. On (re-)registration the agent lists the attempts it holds; the controller
//! re-attaches current ones, fences stale ones (stop), resends lost assignments, and tells the
//! agent where each log resumes.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use runyard_model::{AgentInfo, FailureKind, GpuInfo, JobStatus, Timestamp};
use runyard_proto::v1::{self, agent_message, controller_message::Msg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::artifacts::ArtifactError;
use crate::executor::{Controller, assign_message};
use crate::logs::Appended;
use crate::reconcile::{self, Action, AttemptState, AttemptStatus, Reply};
use crate::tokens::token_eq;

/// Outbound messages buffered per session.
const SESSION_BUFFER: usize = 4096;

pub struct AgentService {
    ctl: Controller,
    join_token: String,
    heartbeat: Duration,
    cancel: CancellationToken,
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
        }
    }
}

impl AgentService {
    fn check_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if token_eq(presented, &self.join_token) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "invalid agent join token: pass the controller's agent.token with --token-file",
            ))
        }
    }
}

type Outbound =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentService {
    type SessionStream = Outbound;

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<v1::CheckpointChunk>>,
    ) -> Result<Response<v1::CheckpointReceipt>, Status> {
        self.check_token(&req)?;
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
        match self.ctl.jobs.get(&header.job_id) {
            Some(j) if header.attempt >= 1 && header.attempt <= j.attempt => {}
            Some(_) => {
                return Err(Status::failed_precondition(format!(
                    "job {} has no attempt {}",
                    header.job_id, header.attempt
                )));
            }
            None => return Err(Status::not_found(format!("no job {}", header.job_id))),
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

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        self.check_token(&req)?;
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
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
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = Session {
            ctl: self.ctl.clone(),
            name: first.name.clone(),
            tx,
        };
        let heartbeat = self.heartbeat;
        let cancel = self.cancel.clone();
        let span = info_span!("agent_session", agent = %first.name, %peer);
        tokio::spawn(
            async move {
                let id = session.open(first, heartbeat).await;
                let result = tokio::select! {
                    r = session.serve(&mut inbound) => r,
                    _ = cancel.cancelled() => Ok(()),
                };
                if let Err(error) = result {
                    warn!(%error, "agent session ended with an error");
                }
                session
                    .ctl
                    .agents
                    .disconnect(&session.name, id, Timestamp::now())
                    .await;
                session.ctl.kick();
                info!("agent disconnected");
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
}

impl Session {
    async fn send(&self, msg: Msg) {
        // A failed send means the agent is gone; the session ends on its own.
        let _ = self.tx.send(v1::ControllerMessage { msg: Some(msg) }).await;
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
        let id = self.ctl.agents.connect(info, self.tx.clone()).await;
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
            held.insert((a.job_id.clone(), a.attempt));
            for stream in [v1::Stream::Log, v1::Stream::Report] {
                let next = self
                    .ctl
                    .stream(stream)
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
        for job in self.ctl.jobs.active() {
            if job.agent.as_deref() != Some(&self.name)
                || !job.status.is_on_agent()
                || held.contains(&(job.id.clone(), job.attempt))
            {
                continue;
            }
            if job.status == JobStatus::Scheduled {
                self.send(assign_message(&job).msg.expect("assign")).await;
                continue;
            }
            // The agent came back without this attempt (it restarted): the attempt is lost.
            let lose = Action::Lose {
                job: job.id.clone(),
                attempt: job.attempt,
            };
            match self
                .ctl
                .jobs
                .update(&job.id, |j| {
                    reconcile::apply(j, &lose, now).map(|n| (n, ()))
                })
                .await
            {
                Ok(Some((j, ()))) => {
                    warn!(job = %j.id, attempt = job.attempt, "agent returned without the attempt; marked lost")
                }
                Ok(None) => {}
                Err(error) => warn!(job = %job.id, %error, "cannot mark attempt lost"),
            }
        }
    }

    /// An attempt the agent holds but has not reported on yet: fence it if it is not current.
    async fn fence_unknown(&self, job_id: &str, attempt: u32) {
        let current = self.ctl.jobs.get(job_id).is_some_and(|j| {
            j.attempt == attempt
                && j.agent.as_deref() == Some(&self.name)
                && j.status.is_on_agent()
                && j.status != JobStatus::Stopping
        });
        if !current {
            self.send(Msg::Stop(v1::Stop {
                job_id: job_id.into(),
                attempt,
                grace_ms: 10_000,
                reason: "attempt replaced".into(),
            }))
            .await;
        }
    }

    async fn serve(&self, inbound: &mut Streaming<v1::AgentMessage>) -> Result<(), Status> {
        while let Some(m) = inbound.message().await? {
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
                Some(agent_message::Msg::Register(_)) => {
                    return Err(Status::invalid_argument(
                        "Register is only valid as the first message",
                    ));
                }
                None => {}
            }
        }
        Ok(())
    }

    async fn logs(&self, c: v1::LogChunk) -> Result<(), Status> {
        let stream = c.stream();
        if matches!(self.ctl.jobs.fetch(&c.job_id).await, Ok(None)) {
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
        let store = self.ctl.stream(stream);
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
        let Some(status) = attempt_status(&st) else {
            warn!(job = %st.job_id, state = st.state, "status update with an unknown state");
            return;
        };
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
            if have < st.log_lines || reports < st.report_lines {
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
        match reply {
            Reply::Nothing => {}
            Reply::Release => {
                self.send(Msg::Release(v1::Release {
                    job_id: st.job_id,
                    attempt: st.attempt,
                }))
                .await
            }
            Reply::Stop => {
                let grace_ms = job
                    .map(|j| j.spec.stop_grace.as_millis() as u64)
                    .unwrap_or(10_000);
                self.send(Msg::Stop(v1::Stop {
                    job_id: st.job_id,
                    attempt: st.attempt,
                    grace_ms,
                    reason: "stopped by the controller".into(),
                }))
                .await
            }
        }
    }
}

fn attempt_status(st: &v1::StatusUpdate) -> Option<AttemptStatus> {
    let state = match v1::AttemptState::try_from(st.state).ok()? {
        v1::AttemptState::Preparing => AttemptState::Preparing,
        v1::AttemptState::Running => AttemptState::Running,
        v1::AttemptState::Succeeded => AttemptState::Succeeded,
        v1::AttemptState::Failed => AttemptState::Failed,
        v1::AttemptState::Stopped => AttemptState::Stopped,
        v1::AttemptState::Unspecified => return None,
    };
    Some(AttemptStatus {
        attempt: st.attempt,
        state,
        exit_code: st.exit_code,
        reason: st.reason.clone(),
        commit: Some(st.commit.clone()).filter(|c| !c.is_empty()),
        failure: FailureKind::parse(&st.failure),
    })
}
