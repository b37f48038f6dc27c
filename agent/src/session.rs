//! The agent's side of the `Session` stream: dial, register, then pump log chunks and statuses
//! out and handle assignments, stops, acks and releases coming in. Reconnects with backoff and
//! jitter; jobs keep running while the controller is away.
//!
//! Per session, the pump starts each attempt's log at its last acknowledged line and sends every
//! attempt's status once per change, always after the lines that precede it: the controller
//! deduplicates lines by number, so a reconnect neither loses nor repeats a line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use runyard_model::{AttemptState, AttemptStatus, FailureKind};
use runyard_proto::v1::{self, agent_message::Msg as Out, controller_message::Msg as In};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::attempts::StopRequest;
use crate::gpu::GpuProbe;
use crate::runner::{Services, run_attempt, supervise};

/// First reconnect delay; doubles up to `BACKOFF_MAX`, with ±25 % jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(30);
const OUT_BUFFER: usize = 16;

pub struct Offer {
    pub cpu_small_slots: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
}

pub struct SessionLoop {
    pub controller: String,
    /// Join token, name and the agent's own credential.
    pub auth: crate::dial::Auth,
    pub svc: Arc<Services>,
    pub gpus: Arc<GpuProbe>,
    pub offer: Offer,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Dial(#[from] crate::dial::DialError),
    #[error("the controller refused the session: {0}")]
    Refused(tonic::Status),
    #[error("session broke: {0}")]
    Broken(tonic::Status),
    #[error("the controller closed the session")]
    Closed,
}

/// The wait between sessions: `BACKOFF_MIN` doubling to `BACKOFF_MAX`, ±25 % jitter, back to
/// `BACKOFF_MIN` after a session that lasted `HEALTHY`.
#[derive(Debug)]
pub struct Backoff {
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            current: BACKOFF_MIN,
        }
    }
}

impl Backoff {
    /// The wait after a session that lasted `lasted`; `jitter` is a factor in `0.75..1.25`.
    pub fn next(&mut self, lasted: Duration, jitter: f64) -> Duration {
        if lasted > HEALTHY {
            self.current = BACKOFF_MIN;
        }
        let wait = self.current.mul_f64(jitter);
        self.current = (self.current * 2).min(BACKOFF_MAX);
        wait
    }
}

/// Runs `session` again and again until cancelled, waiting per `Backoff` in between.
async fn reconnect<F, Fut>(cancel: &CancellationToken, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), SessionError>>,
{
    let mut backoff = Backoff::default();
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = session() => r,
            _ = cancel.cancelled() => return,
        };
        if cancel.is_cancelled() {
            return;
        }
        let wait = backoff.next(started.elapsed(), rand::rng().random_range(0.75..1.25));
        match result {
            Ok(()) | Err(SessionError::Closed) => info!("session ended; reconnecting"),
            Err(SessionError::Refused(status))
                if status.code() == tonic::Code::PermissionDenied =>
            {
                // The operator must act (another --name, or remove the old agent).
                error!(reason = %status.message(), retry_in = ?wait, "the controller refused this agent")
            }
            Err(error) => warn!(%error, retry_in = ?wait, "session failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

impl SessionLoop {
    /// Runs sessions until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let span = info_span!("session", controller = %self.controller);
        reconnect(&cancel, || self.session(&cancel).instrument(span.clone())).await
    }

    async fn session(&self, cancel: &CancellationToken) -> Result<(), SessionError> {
        let mut client = crate::dial::connect(&self.controller, &self.auth).await?;

        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(OUT_BUFFER);
        tx.send(msg(Out::Register(self.register().await)))
            .await
            .map_err(|_| SessionError::Closed)?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(SessionError::Refused)?
            .into_inner();

        let heartbeat = match inbound.message().await.map_err(SessionError::Broken)? {
            Some(v1::ControllerMessage {
                msg: Some(In::Registered(r)),
            }) => Duration::from_millis(r.heartbeat_interval_ms.max(100)),
            Some(v1::ControllerMessage {
                msg: Some(In::Reject(r)),
            }) => {
                return Err(SessionError::Refused(tonic::Status::permission_denied(
                    r.reason,
                )));
            }
            _ => return Err(SessionError::Closed),
        };
        info!(?heartbeat, "registered with the controller");

        let session_cancel = cancel.child_token();
        let pump = tokio::spawn(pump(
            self.svc.clone(),
            self.gpus.clone(),
            tx.clone(),
            heartbeat,
            session_cancel.clone(),
        ));
        let result = loop {
            match inbound.message().await {
                Ok(Some(m)) => self.handle(m, &tx, &client, cancel).await,
                Ok(None) => break Err(SessionError::Closed),
                Err(status) => break Err(SessionError::Broken(status)),
            }
        };
        session_cancel.cancel();
        if let Err(error) = pump.await {
            error!(%error, "the session pump failed");
        }
        result
    }

    async fn register(&self) -> v1::Register {
        let attempts = self
            .svc
            .attempts
            .all()
            .into_iter()
            .map(|a| {
                let (status, _) = a.status();
                v1::AttemptReport {
                    job_id: a.job_id.clone(),
                    attempt: a.attempt,
                    log_lines: a.spool.lines(),
                    report_lines: a.reports.lines(),
                    status: Some(runyard_proto::status_to_wire(&a.job_id, &status)),
                }
            })
            .collect();
        let gpus = self.gpus.clone();
        let gpus = tokio::task::spawn_blocking(move || gpus.sample())
            .await
            .unwrap_or_default();
        v1::Register {
            name: self.svc.agent_name.clone(),
            cpu_small_slots: self.offer.cpu_small_slots,
            gpus: gpus.iter().map(v1::Gpu::from).collect(),
            cpus: self.offer.cpus,
            memory_bytes: self.offer.memory_bytes,
            attempts,
            version: env!("CARGO_PKG_VERSION").into(),
            address: own_address(&self.svc.controller)
                .await
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
        }
    }

    async fn handle(
        &self,
        m: v1::ControllerMessage,
        tx: &mpsc::Sender<v1::AgentMessage>,
        client: &crate::dial::Client,
        cancel: &CancellationToken,
    ) {
        let attempts = &self.svc.attempts;
        match m.msg {
            Some(In::Assign(a)) => self.assign(a, tx).await,
            Some(In::Stop(s)) => {
                let req = StopRequest {
                    grace: Duration::from_millis(s.grace_ms),
                    reason: if s.reason.is_empty() {
                        "stopped".into()
                    } else {
                        s.reason
                    },
                };
                match attempts.get(&s.job_id, s.attempt) {
                    Some(a) => {
                        info!(job = %s.job_id, attempt = s.attempt, grace = ?req.grace, "stop requested");
                        a.stop.send_if_modified(|cur| {
                            if cur.is_none() {
                                *cur = Some(req);
                                true
                            } else {
                                false
                            }
                        });
                    }
                    None => {
                        // Never started here (or long gone): confirm it is stopped.
                        let st = AttemptStatus {
                            state: AttemptState::Stopped,
                            reason: req.reason,
                            ..AttemptStatus::preparing(s.attempt)
                        };
                        let wire = runyard_proto::status_to_wire(&s.job_id, &st);
                        let _ = tx.send(msg(Out::Status(wire))).await;
                    }
                }
            }
            Some(In::LogAck(ack)) => {
                if let Some(a) = attempts.get(&ack.job_id, ack.attempt) {
                    a.stream(ack.stream()).ack(ack.next_seq);
                    attempts.wake();
                }
            }
            Some(In::Release(r)) => {
                if attempts.release(&r.job_id, r.attempt) {
                    debug!(job = %r.job_id, attempt = r.attempt, "attempt released");
                }
            }
            Some(In::Evaluate(e)) => {
                let attempt = attempts.get(&e.job_id, e.attempt);
                let tx = tx.clone();
                // Off the session loop: a policy may take seconds.
                self.svc.tasks.spawn(async move {
                    let result = match attempt {
                        Some(a) => crate::policy::evaluate(&a, &e.policy, &e.input_json).await,
                        None => Err("this agent does not hold that replica".into()),
                    };
                    let (value, error) = match result {
                        Ok(v) => (Some(v), String::new()),
                        Err(why) => (None, why),
                    };
                    let _ = tx
                        .send(msg(Out::Evaluated(v1::Evaluated {
                            request_id: e.request_id,
                            value,
                            error,
                        })))
                        .await;
                });
            }
            Some(In::OpenTunnel(o)) => {
                // On the session's own connection (its client): the controller may not be able
                // to reach this host. The tunnel outlives no shutdown, and blocks no message.
                let span = info_span!(parent: None, "tunnel", job = %o.job_id, attempt = o.attempt);
                let serve =
                    crate::tunnel::serve(attempts.clone(), client.clone(), o, cancel.child_token());
                self.svc.tasks.spawn(serve.instrument(span));
            }
            Some(In::Registered(_)) | Some(In::Reject(_)) | None => {}
        }
    }

    async fn assign(&self, a: v1::Assign, tx: &mpsc::Sender<v1::AgentMessage>) {
        let spec = match a.spec.map(runyard_proto::spec_from_wire) {
            Some(Ok(spec)) => spec,
            Some(Err(e)) => {
                return self
                    .refuse(&a.job_id, a.attempt, format!("invalid assignment: {e}"), tx)
                    .await;
            }
            None => {
                return self
                    .refuse(&a.job_id, a.attempt, "assignment without a spec".into(), tx)
                    .await;
            }
        };
        let busy: Vec<u32> = self.svc.attempts.gpus_in_use();
        if let Some(g) = a.gpus.iter().find(|g| busy.contains(g)) {
            return self
                .refuse(
                    &a.job_id,
                    a.attempt,
                    format!(
                        "GPU {g} is still held by another job on agent {}",
                        self.svc.agent_name
                    ),
                    tx,
                )
                .await;
        }
        let spool_path = self
            .svc
            .jobs_dir
            .join("spool")
            .join(&a.job_id)
            .join(format!("{}.log", a.attempt));
        let spools = crate::spool::Spool::create(&spool_path).and_then(|log| {
            Ok((
                log,
                crate::spool::Spool::create(spool_path.with_extension("reports"))?,
            ))
        });
        let (spool, reports) = match spools {
            Ok(s) => s,
            Err(e) => {
                return self
                    .refuse(
                        &a.job_id,
                        a.attempt,
                        format!("cannot create the log spool: {e}"),
                        tx,
                    )
                    .await;
            }
        };
        let Some(attempt) =
            self.svc
                .attempts
                .insert(&a.job_id, a.attempt, spool, reports, a.gpus.clone())
        else {
            return; // already held: assignments are idempotent
        };
        info!(job = %a.job_id, attempt = a.attempt, repo = %spec.repo, script = %spec.script, gpus = ?a.gpus, "assignment accepted");
        let span = info_span!(parent: None, "job", job = %a.job_id, attempt = a.attempt);
        let run = run_attempt(self.svc.clone(), attempt.clone(), spec);
        self.svc
            .tasks
            .spawn(supervise(self.svc.attempts.clone(), attempt, run).instrument(span));
    }

    async fn refuse(
        &self,
        job_id: &str,
        attempt: u32,
        reason: String,
        tx: &mpsc::Sender<v1::AgentMessage>,
    ) {
        warn!(job = %job_id, attempt, %reason, "assignment refused");
        let st = AttemptStatus {
            state: AttemptState::Failed,
            reason,
            failure: Some(FailureKind::Agent),
            ..AttemptStatus::preparing(attempt)
        };
        let wire = runyard_proto::status_to_wire(job_id, &st);
        let _ = tx.send(msg(Out::Status(wire))).await;
    }
}

fn msg(m: Out) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

/// Sends log chunks, statuses and heartbeats for one session.
async fn pump(
    svc: Arc<Services>,
    gpus: Arc<GpuProbe>,
    tx: mpsc::Sender<v1::AgentMessage>,
    heartbeat: Duration,
    cancel: CancellationToken,
) {
    // Per attempt: next line to send of each stream, and the status version sent.
    let mut sent: HashMap<(String, u32), ([u64; 2], u64)> = HashMap::new();
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = svc.attempts.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();

        let mut progressed = false;
        for a in svc.attempts.all() {
            let key = (a.job_id.clone(), a.attempt);
            let entry = sent.entry(key).or_insert(([0, 0], 0));
            let mut all_sent = true;
            for (i, stream) in [v1::Stream::Log, v1::Stream::Report]
                .into_iter()
                .enumerate()
            {
                let spool = a.stream(stream);
                let next = &mut entry.0[i];
                *next = (*next).max(spool.acked());
                // A few chunks per attempt per round, so one chatty job cannot starve the
                // others; the bounded channel limits what is in flight.
                for _ in 0..4 {
                    match spool.read(*next) {
                        Ok(Some(c)) => {
                            let m = v1::LogChunk {
                                job_id: a.job_id.clone(),
                                attempt: a.attempt,
                                first_seq: c.first_seq,
                                count: c.count,
                                data: c.data.into(),
                                stream: stream as i32,
                            };
                            if tx.send(msg(Out::Logs(m))).await.is_err() {
                                return;
                            }
                            *next = c.first_seq + c.count as u64;
                            progressed = true;
                        }
                        Ok(None) => break,
                        Err(error) => {
                            warn!(job = %a.job_id, %error, ?stream, "cannot read the spool");
                            break;
                        }
                    }
                }
                all_sent &= *next >= spool.lines();
            }
            let (status, version) = a.status();
            if version > entry.1 && (!a.is_terminal() || all_sent) {
                let wire = runyard_proto::status_to_wire(&a.job_id, &status);
                if tx.send(msg(Out::Status(wire))).await.is_err() {
                    return;
                }
                entry.1 = version;
            }
        }
        sent.retain(|(j, n), _| svc.attempts.get(j, *n).is_some());
        if progressed {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tick.tick() => {
                let gpus = gpus.clone();
                let sample = tokio::task::spawn_blocking(move || gpus.sample()).await.unwrap_or_default();
                if tx.send(msg(Out::Heartbeat(v1::Heartbeat { gpus: sample.iter().map(v1::Gpu::from).collect() }))).await.is_err() {
                    return;
                }
                // Terminal statuses not yet released are resent now and then.
                for a in svc.attempts.all() {
                    if a.is_terminal() && a.all_acked()
                        && let Some(e) = sent.get_mut(&(a.job_id.clone(), a.attempt))
                    {
                        e.1 = 0;
                    }
                }
            }
            _ = cancel.cancelled() => return,
        }
    }
}

/// The source address this host uses towards the controller at `url` (a UDP socket connected
/// to it sends nothing; the kernel only picks the route).
async fn own_address(url: &str) -> Option<std::net::IpAddr> {
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next()?;
    let target = tokio::net::lookup_host(authority).await.ok()?.next()?;
    let any: std::net::SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any).await.ok()?;
    socket.connect(target).await.ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The waits between sessions, under tokio's paused clock: 250 ms doubling to the 5 s cap,
    /// each within ±25 %, and back to 250 ms after a healthy session.
    #[tokio::test(start_paused = true)]
    async fn reconnect_backs_off_with_jitter_to_the_cap_and_resets_after_a_healthy_session() {
        let cancel = CancellationToken::new();
        // (start, end) of each session.
        let sessions: Mutex<Vec<(tokio::time::Instant, tokio::time::Instant)>> = Mutex::default();
        let healthy_at = 7;
        let total = 10;
        reconnect(&cancel, || async {
            let n = sessions.lock().unwrap().len();
            let start = tokio::time::Instant::now();
            if n == healthy_at {
                tokio::time::sleep(HEALTHY + Duration::from_secs(1)).await;
            }
            sessions
                .lock()
                .unwrap()
                .push((start, tokio::time::Instant::now()));
            if n + 1 == total {
                cancel.cancel();
            }
            Err(SessionError::Closed)
        })
        .await;
        let sessions = sessions.into_inner().unwrap();
        assert_eq!(sessions.len(), total);
        let waits: Vec<Duration> = sessions.windows(2).map(|w| w[1].0 - w[0].1).collect();
        let expected_ms = [250, 500, 1000, 2000, 4000, 5000, 5000, 250, 500];
        for (i, (wait, ms)) in waits.iter().zip(expected_ms).enumerate() {
            let base = Duration::from_millis(ms);
            assert!(
                *wait >= base.mul_f64(0.75) && *wait <= base.mul_f64(1.25),
                "wait {i}: {wait:?}, expected {base:?} ±25 %"
            );
        }
        assert!(
            waits.windows(2).any(|w| w[0] != w[1]),
            "jittered: {waits:?}"
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let quick = Duration::ZERO;
        let waits: Vec<u128> = (0..7).map(|_| b.next(quick, 1.0).as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(b.next(HEALTHY + Duration::from_millis(1), 1.0), BACKOFF_MIN);
        assert_eq!(b.next(quick, 1.2), Duration::from_millis(600));
    }
}
