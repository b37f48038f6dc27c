//! Runs one attempt: checkout, environment, process, and the report of how it ended.
//!
//! ```text
//!  preparing (checkout → script check → environment) ──▶ running ──▶ succeeded | failed
//!        │                                                  │
//!        └──────────── stop request / timeout ──────────────┴──▶ stopped | failed (timeout)
//! ```
//! Invariant: the terminal status is set only after the process and everything it started are
//! gone and every line it printed is in the spool, with the final line count in the status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runyard_model::report::{self, Best, Report};
use runyard_model::{AttemptState, FailureKind, JobSpec};
use tokio::sync::mpsc;
use tracing::{Instrument, error, info, warn};

use crate::attempts::{Attempt, Attempts, StopRequest};
use crate::cgroup::AttemptCgroup;
use crate::checkout::{CheckoutCache, CheckoutError, resolve_script_at};
use crate::identity::JobIdentity;
use crate::process::{ExitOutcome, JobProcess, ProcessSpec};
use crate::pyenv::EnvBuilder;

/// Marks the lines the agent adds to a job's log (environment build), so they are told apart
/// from the script's own. Jobs without requirements have none.
pub const LOG_PREFIX: &str = "[runyard] ";

/// How often the job's report file is read.
const REPORT_POLL: Duration = Duration::from_millis(100);
/// Longer report lines are dropped (a report is a small JSON object).
const MAX_REPORT_LINE: usize = 64 << 10;

/// Environment variables passed from the agent to jobs; everything else (tokens included) stays out.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Shared services every runner uses.
pub struct Services {
    /// Where the Lightning reporter is installed (prepended to every job's PYTHONPATH).
    pub reporter_dir: PathBuf,
    pub agent_name: String,
    /// Controller gRPC URL and the agent's identity, for checkpoint uploads.
    pub controller: String,
    pub auth: crate::dial::Auth,
    /// `name@data_dir`: marks this agent's job processes (see `process`).
    pub identity: String,
    pub jobs_dir: PathBuf,
    pub checkouts: CheckoutCache,
    pub envs: EnvBuilder,
    pub attempts: Attempts,
    /// Every attempt's task (see `supervise`); shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// Keeps the caches under their limit.
    pub janitor: Arc<crate::cache::Janitor>,
    /// Attempt dirs and mirrors sweeps must spare.
    pub in_use: crate::cache::InUse,
    /// A job does not start while the data dir's file system has less free space.
    pub min_free: u64,
    /// Asks the background sweeper for a sweep soon (coalesced): job starts never walk the
    /// caches themselves unless the disk is short of space.
    pub sweep_soon: Arc<tokio::sync::Notify>,
    /// Who jobs run as.
    pub identities: Arc<crate::identity::Identities>,
    /// The attempts' cgroups.
    pub cgroups: Arc<crate::cgroup::Cgroups>,
}

/// Runs one cache sweep off the async threads; failures are logged.
pub async fn sweep_caches(svc: &Services) {
    let janitor = svc.janitor.clone();
    let in_use = svc.in_use.snapshot();
    let uv = svc.envs.uv().map(Path::to_path_buf);
    match tokio::task::spawn_blocking(move || janitor.sweep(&in_use, uv.as_deref())).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => warn!(%error, "cache sweep failed"),
        Err(error) => warn!(%error, "cache sweep panicked"),
    }
}

/// How an attempt ended, before it is turned into a status.
struct End {
    state: AttemptState,
    failure: Option<FailureKind>,
    exit_code: Option<i32>,
    reason: String,
}

impl End {
    fn failed(failure: FailureKind, reason: impl Into<String>) -> End {
        End {
            state: AttemptState::Failed,
            failure: Some(failure),
            exit_code: None,
            reason: reason.into(),
        }
    }

    fn stopped(req: &StopRequest) -> End {
        End {
            state: AttemptState::Stopped,
            failure: None,
            exit_code: None,
            reason: req.reason.clone(),
        }
    }
}

/// Runs `run` (an attempt's `run_attempt`) as a task of its own and makes sure the attempt ends:
/// if the task panics, the attempt fails with failure kind `agent` and a reason naming the
/// panic, so it never stays unfinished (its process group is killed as the panic unwinds).
pub async fn supervise(
    attempts: Attempts,
    a: Arc<Attempt>,
    run: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let Err(e) = tokio::spawn(run.in_current_span()).await else {
        return;
    };
    if a.is_terminal() {
        return;
    }
    let reason = if e.is_panic() {
        let payload = e.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("agent error: the attempt's task panicked: {message}")
    } else {
        "agent error: the attempt's task was cancelled".into()
    };
    error!(job = %a.job_id, attempt = a.attempt, %reason, "attempt task failed");
    attempts.set_status(&a, |s| {
        s.state = AttemptState::Failed;
        s.exit_code = None;
        s.reason = reason;
        s.failure = Some(FailureKind::Agent);
        s.log_lines = a.spool.lines();
        s.report_lines = a.reports.lines();
    });
}

pub async fn run_attempt(svc: Arc<Services>, a: Arc<Attempt>, spec: JobSpec) {
    let dir = svc.jobs_dir.join(format!("{}-{}", a.job_id, a.attempt));
    let held = svc.in_use.hold(&dir);
    // Held until the attempt's directory is gone: no other attempt gets its uid before.
    let identities = svc.identities.clone();
    let identity = match tokio::task::spawn_blocking(move || identities.acquire()).await {
        Ok(Ok(identity)) => Some(Arc::new(identity)),
        Ok(Err(e)) => {
            error!(job = %a.job_id, error = %e, "no identity for the job");
            None
        }
        Err(e) => {
            error!(job = %a.job_id, error = %e, "identity lookup panicked");
            None
        }
    };
    let (end, best) = match &identity {
        Some(identity) => execute(&svc, &a, &spec, &dir, identity).await,
        None => (
            End::failed(
                FailureKind::Agent,
                format!(
                    "agent {} has no free job identity (see its log)",
                    svc.agent_name
                ),
            ),
            None,
        ),
    };
    if let Some(best) = best {
        upload_best(&svc, &a, &dir, &best).await;
    }
    let lines = a.spool.lines();
    let report_lines = a.reports.lines();
    info!(job = %a.job_id, attempt = a.attempt, state = ?end.state, exit_code = ?end.exit_code, reason = %end.reason, lines, "attempt ended");
    svc.attempts.set_status(&a, |s| {
        s.state = end.state;
        s.exit_code = end.exit_code;
        s.reason = end.reason;
        s.failure = end.failure;
        s.log_lines = lines;
        s.report_lines = report_lines;
    });
    if let Err(error) = tokio::fs::remove_dir_all(&dir).await
        && error.kind() != std::io::ErrorKind::NotFound
    {
        warn!(job = %a.job_id, %error, dir = %dir.display(), "cannot remove the job's working dir");
    }
    if let Some(identity) = identity {
        // Nothing may run under the uid once another attempt can take it.
        let _ = tokio::task::spawn_blocking(move || identity.clear()).await;
    }
    drop(held);
}

async fn wait_stop(rx: &mut tokio::sync::watch::Receiver<Option<StopRequest>>) -> StopRequest {
    loop {
        if let Some(req) = rx.borrow_and_update().clone() {
            return req;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn execute(
    svc: &Services,
    a: &Arc<Attempt>,
    spec: &JobSpec,
    dir: &Path,
    identity: &Arc<JobIdentity>,
) -> (End, Option<Best>) {
    let mut stop_rx = a.stop.subscribe();
    let src = dir.join("src");
    // A stop while preparing cancels the fetch (token) and the installer (dropped future).
    let cancel = tokio_util::sync::CancellationToken::new();
    let prepared = tokio::select! {
        p = prepare(svc, a, spec, dir, &src, &cancel) => p,
        req = wait_stop(&mut stop_rx) => {
            cancel.cancel();
            return (End::stopped(&req), None);
        }
    };
    let Prepared {
        python,
        program,
        args,
    } = match prepared {
        Ok(p) => p,
        Err(end) => return (end, None),
    };
    // A shared environment is spared by cache sweeps while the attempt uses it.
    let _env_held = (python != svc.envs.python())
        .then(|| python.ancestors().nth(3).map(|env| svc.in_use.hold(env)))
        .flatten();
    let checkpoint = match &spec.model_from {
        None => None,
        Some(from) => {
            let into = dir.join("checkpoint");
            let fetch = crate::download::download_checkpoint(
                &svc.controller,
                &svc.auth,
                &a.job_id,
                a.attempt,
                from,
                &into,
            );
            tokio::select! {
                r = fetch => match r {
                    Ok(path) => {
                        info!(job = %a.job_id, source = %from, path = %path.display(), "checkpoint fetched");
                        Some(path)
                    }
                    Err(e) => {
                        return (
                            End::failed(
                                FailureKind::Agent,
                                format!("model_from: cannot fetch the checkpoint of job {from}: {e}"),
                            ),
                            None,
                        );
                    }
                },
                req = wait_stop(&mut stop_rx) => return (End::stopped(&req), None),
            }
        }
    };
    let report_file = dir.join("report.jsonl");
    let cgroup = match hand_over(svc, a, spec, dir, identity).await {
        Ok(cgroup) => cgroup,
        Err(end) => return (end, None),
    };
    if let (Some(limit), None) = (spec.memory, &cgroup) {
        let line = format!(
            "{LOG_PREFIX}memory limit {} not enforced: agent {} has no cgroups ({})",
            runyard_model::size::format(limit),
            svc.agent_name,
            "see its start log"
        );
        warn!(job = %a.job_id, "memory limit not enforced: no cgroups");
        if let Err(error) = a.spool.append(&[line]) {
            warn!(job = %a.job_id, %error, "cannot spool the memory line");
        }
    }

    let mut env: Vec<(String, String)> = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    if let Some(venv_bin) = python.parent().filter(|_| python != svc.envs.python()) {
        let path = std::env::var("PATH").unwrap_or_default();
        env.retain(|(k, _)| k != "PATH");
        env.push(("PATH".into(), format!("{}:{path}", venv_bin.display())));
        if let Some(venv) = venv_bin.parent() {
            env.push(("VIRTUAL_ENV".into(), venv.display().to_string()));
        }
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // Secret values: into the job's environment, and nowhere else (never logged).
    env.extend(spec.secrets.iter().filter_map(|(k, v)| match v {
        runyard_model::spec::SecretSource::Value(v) => Some((k.clone(), v.clone())),
        _ => None,
    }));
    let visible: Vec<String> = a.gpus.iter().map(u32::to_string).collect();
    env.push(("CUDA_VISIBLE_DEVICES".into(), visible.join(",")));
    let user_pythonpath = env
        .iter()
        .rposition(|(k, _)| k == "PYTHONPATH")
        .map(|i| env.remove(i).1);
    env.push((
        "PYTHONPATH".into(),
        crate::reporter::pythonpath(&svc.reporter_dir, user_pythonpath.as_deref()),
    ));
    env.push((
        "RUNYARD_REPORT_FILE".into(),
        report_file.display().to_string(),
    ));
    if spec.port {
        match free_port() {
            Ok(port) => {
                let port = *a.port.get_or_init(|| port);
                env.push(("PORT".into(), port.to_string()));
            }
            Err(e) => {
                return (
                    End::failed(FailureKind::Agent, format!("cannot find a free port: {e}")),
                    None,
                );
            }
        }
    }
    if let Some(path) = &checkpoint {
        env.push(("RUNYARD_CHECKPOINT".into(), path.display().to_string()));
    }
    env.push(("RUNYARD_JOB_ID".into(), a.job_id.clone()));
    env.push(("RUNYARD_ATTEMPT_NUMBER".into(), a.attempt.to_string()));
    if identity.run_as.is_some() {
        // Its own scratch and identity: nothing of the agent's user's HOME or TMPDIR.
        env.retain(|(k, _)| !matches!(k.as_str(), "HOME" | "TMPDIR" | "USER" | "LOGNAME"));
        let home = dir.join(crate::identity::HOME_DIR).display().to_string();
        let tmp = dir.join(crate::identity::TMP_DIR).display().to_string();
        env.push(("HOME".into(), home));
        env.push(("TMPDIR".into(), tmp));
        env.push(("USER".into(), identity.user.clone()));
        env.push(("LOGNAME".into(), identity.user.clone()));
    }

    let (tx, rx) = mpsc::channel::<Vec<String>>(256);
    let writer = tokio::spawn(write_lines(svc.attempts.clone(), a.clone(), rx));
    let tail_done = tokio_util::sync::CancellationToken::new();
    // Ends the tailer however this function ends (a panic included).
    let _tail_guard = tail_done.clone().drop_guard();
    let tailer = tokio::spawn(tail_reports(
        report_file,
        svc.attempts.clone(),
        a.clone(),
        tail_done.clone(),
    ));
    let process = ProcessSpec {
        program: program.clone(),
        args,
        cwd: src.clone(),
        env,
        marker: format!("{}/{}", a.job_id, a.attempt),
        agent_name: svc.identity.clone(),
        run_as: identity.run_as,
        cgroup: cgroup.clone(),
    };
    let _ = a.runtime.set(process.clone());
    let spawned = JobProcess::spawn(process, tx);
    let mut proc = match spawned {
        Ok(p) => p,
        Err(e) => {
            let _ = writer.await;
            tail_done.cancel();
            let _ = tailer.await;
            return (
                End::failed(
                    FailureKind::Agent,
                    format!("cannot start {}: {e}", program.display()),
                ),
                None,
            );
        }
    };
    info!(job = %a.job_id, attempt = a.attempt, pid = proc.pid(), "process started");
    let port = a.port.get().copied();
    svc.attempts.set_status(a, |s| {
        s.state = AttemptState::Running;
        s.port = port;
    });

    let timeout = spec.timeout.unwrap_or(Duration::MAX);
    let end = tokio::select! {
        outcome = proc.wait() => {
            match (proc.oom_killed(), spec.memory) {
                (true, Some(limit)) => End {
                    exit_code: exit_code(outcome),
                    ..End::failed(
                        FailureKind::Oom,
                        format!(
                            "out of memory: the job used more than its {} limit (`memory` in the job spec)",
                            runyard_model::size::format(limit)
                        ),
                    )
                },
                _ => exit_end(outcome),
            }
        }
        req = wait_stop(&mut stop_rx) => {
            let outcome = proc.stop(req.grace).await;
            End { exit_code: exit_code(outcome), ..End::stopped(&req) }
        }
        _ = sleep_max(timeout) => {
            let outcome = proc.stop(spec.stop_grace).await;
            End {
                exit_code: exit_code(outcome),
                ..End::failed(FailureKind::Timeout, format!("timed out after {}", runyard_model::spec::format_duration(timeout)))
            }
        }
    };
    drop(proc);
    // Every line is in the spool once the writer has drained the closed channel.
    if let Err(e) = writer.await {
        warn!(job = %a.job_id, error = %e, "log writer failed");
    }
    tail_done.cancel();
    let best = tailer.await.ok().flatten();
    (end, best)
}

/// A port nothing listens on now, on every address, for a server the attempt starts (`$PORT`).
/// The kernel picks it from the ephemeral range; it is free again once the probe closes.
fn free_port() -> std::io::Result<u16> {
    let probe = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    Ok(probe.local_addr()?.port())
}

/// Gives the attempt's directory to its identity and makes its cgroup, off the async threads.
async fn hand_over(
    svc: &Services,
    a: &Attempt,
    spec: &JobSpec,
    dir: &Path,
    identity: &Arc<JobIdentity>,
) -> Result<Option<Arc<AttemptCgroup>>, End> {
    let (identity, cgroups) = (identity.clone(), svc.cgroups.clone());
    let (dir, name, memory) = (
        dir.to_path_buf(),
        format!("{}-{}", a.job_id, a.attempt),
        spec.memory,
    );
    let agent = svc.agent_name.clone();
    tokio::task::spawn_blocking(move || {
        identity.hand_over(&dir).map_err(|e| {
            End::failed(
                FailureKind::Agent,
                format!(
                    "agent {agent} cannot give {} to the job: {e}",
                    dir.display()
                ),
            )
        })?;
        cgroups
            .create(&name, memory)
            .map(|c| c.map(Arc::new))
            .map_err(|e| {
                End::failed(
                    FailureKind::Agent,
                    format!("agent {agent} cannot make the job's cgroup: {e}"),
                )
            })
    })
    .await
    .unwrap_or_else(|e| {
        Err(End::failed(
            FailureKind::Agent,
            format!("agent error: the job's setup panicked: {e}"),
        ))
    })
}

/// Copies complete JSON lines the job appends to its report file into the report spool, until
/// `done`, then once more to the end of the file.
async fn tail_reports(
    path: PathBuf,
    attempts: Attempts,
    a: Arc<Attempt>,
    done: tokio_util::sync::CancellationToken,
) -> Option<Best> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    // The same fold as the controller's, to know which checkpoint is the best one to upload.
    let mut summary = runyard_model::Placement::new(
        &a.job_id,
        a.attempt,
        "",
        Vec::new(),
        runyard_model::Timestamp(0),
    );
    let mut offset = 0u64;
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let last = done.is_cancelled();
        if let Ok(mut f) = tokio::fs::File::open(&path).await
            && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
        {
            let mut buf = Vec::new();
            if let Ok(n) = f.read_to_end(&mut buf).await {
                offset += n as u64;
                partial.extend_from_slice(&buf);
                if let Some(end) = partial.iter().rposition(|&b| b == b'\n') {
                    let lines: Vec<String> = partial[..end]
                        .split(|&b| b == b'\n')
                        .map(|l| String::from_utf8_lossy(l).trim().to_string())
                        .filter(|l| !l.is_empty() && l.len() <= MAX_REPORT_LINE)
                        .collect();
                    partial.drain(..=end);
                    for l in &lines {
                        if let Some(r) = Report::parse(l) {
                            report::apply(&mut summary, &r);
                        }
                    }
                    if let Err(error) = a.reports.append(&lines) {
                        warn!(job = %a.job_id, %error, "cannot spool report lines");
                    }
                    attempts.wake();
                }
            }
        }
        if last {
            return summary.best;
        }
        tokio::select! {
            _ = tokio::time::sleep(REPORT_POLL) => {}
            _ = done.cancelled() => {}
        }
    }
}

/// Uploads the best checkpoint and reports the result; a missing file or a failed upload is
/// reported, never fatal to the job.
async fn upload_best(svc: &Services, a: &Attempt, dir: &Path, best: &Best) {
    let path = Path::new(&best.path);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join("src").join(path)
    };
    let started = std::time::Instant::now();
    // The agent reads the file with its own rights: an isolated job may only name its own files
    // (everything of the job has ended, so nothing can change under this check).
    let outside = svc.identities.isolated()
        && std::fs::symlink_metadata(&path).is_ok()
        && !inside(&path, dir);
    let result = if outside {
        Err(crate::upload::UploadError::Outside(path.clone()))
    } else {
        crate::upload::upload_checkpoint(&svc.controller, &svc.auth, &a.job_id, a.attempt, &path)
            .await
    };
    let report = match result {
        Ok((size, sha256)) => {
            info!(job = %a.job_id, path = %path.display(), size, elapsed_ms = started.elapsed().as_millis() as u64, "checkpoint uploaded");
            Report::Artifact {
                path: best.path.clone(),
                size: Some(size),
                sha256: Some(sha256),
                error: None,
            }
        }
        Err(e) => {
            warn!(job = %a.job_id, path = %path.display(), error = %e, "checkpoint not uploaded");
            Report::Artifact {
                path: best.path.clone(),
                size: None,
                sha256: None,
                error: Some(e.to_string()),
            }
        }
    };
    let line = serde_json::to_string(&report).expect("a report serializes");
    if let Err(error) = a.reports.append(&[line]) {
        warn!(job = %a.job_id, %error, "cannot spool the artifact report");
    }
    svc.attempts.wake();
}

/// Whether `path`, symlinks resolved, is inside `dir`.
fn inside(path: &Path, dir: &Path) -> bool {
    match (std::fs::canonicalize(path), std::fs::canonicalize(dir)) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

async fn sleep_max(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The snapshot `sha` (hex) fetched into the agent's snapshot cache (once per snapshot) and
/// unpacked into `src`, after the same checks the controller made; returns it as the commit.
async fn unpack_snapshot(
    svc: &Services,
    a: &Attempt,
    sha: &str,
    src: &Path,
) -> Result<String, String> {
    let cache = svc
        .jobs_dir
        .parent()
        .unwrap_or(&svc.jobs_dir)
        .join("snapshots");
    let file = cache.join(format!("{sha}.tar"));
    crate::download::download_snapshot(
        &svc.controller,
        &svc.auth,
        &a.job_id,
        a.attempt,
        sha,
        &file,
    )
    .await
    .map_err(|e| format!("cannot fetch the snapshot {sha}: {e}"))?;
    let src = src.to_path_buf();
    let summary = tokio::task::spawn_blocking(move || {
        let open = || {
            std::fs::File::open(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))
        };
        runyard_proto::snapshot::check(std::io::BufReader::new(open()?))?;
        if src.exists() {
            std::fs::remove_dir_all(&src)
                .map_err(|e| format!("cannot clear {}: {e}", src.display()))?;
        }
        std::fs::create_dir_all(&src)
            .map_err(|e| format!("cannot create {}: {e}", src.display()))?;
        runyard_proto::snapshot::unpack(std::io::BufReader::new(open()?), &src)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("snapshot {sha}: {e}"))?;
    info!(job = %a.job_id, snapshot = %sha, files = summary.files, bytes = summary.bytes, "snapshot unpacked");
    Ok(sha.to_string())
}

/// What an attempt runs once prepared: the interpreter of its environment, and the program with
/// its arguments (the script's path first for a script; an entry point's command otherwise).
struct Prepared {
    python: PathBuf,
    program: PathBuf,
    args: Vec<String>,
}

async fn prepare(
    svc: &Services,
    a: &Arc<Attempt>,
    spec: &JobSpec,
    dir: &Path,
    src: &Path,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Prepared, End> {
    let disk_full = |m: &dyn std::fmt::Display| {
        End::failed(
            FailureKind::Agent,
            format!("disk full on agent {}: {m}", svc.agent_name),
        )
    };
    let mirror = svc.in_use.hold(svc.checkouts.mirror_path(&spec.repo));
    // The caches grow with this job: the sweeper reclaims in the background. The job itself
    // pays a free-space check (one statvfs), and a sweep only when space is short.
    svc.sweep_soon.notify_one();
    let low = || {
        let (jobs_dir, min_free) = (svc.jobs_dir.clone(), svc.min_free);
        tokio::task::spawn_blocking(move || crate::cache::low_space(&jobs_dir, min_free))
    };
    if let Ok(Some(_)) = low().await {
        sweep_caches(svc).await;
        if let Ok(Some(why)) = low().await {
            return Err(disk_full(&why));
        }
    }
    if let Err(e) = tokio::fs::create_dir_all(dir).await {
        if crate::cache::is_disk_full(&e) {
            return Err(disk_full(&format!("cannot create {}: {e}", dir.display())));
        }
        return Err(End::failed(
            FailureKind::Agent,
            format!("cannot create {}: {e}", dir.display()),
        ));
    }
    let commit = if let Some(sha) = runyard_model::spec::snapshot_of(&spec.repo) {
        unpack_snapshot(svc, a, sha, src).await.map_err(|m| {
            if crate::cache::mentions_disk_full(&m) {
                disk_full(&m)
            } else {
                End::failed(FailureKind::Clone, m)
            }
        })?
    } else {
        svc.checkouts
            .checkout(&spec.repo, &spec.revision, src, cancel)
            .await
            .map_err(|e| match e {
                CheckoutError::Io { ref source, .. } if crate::cache::is_disk_full(source) => {
                    disk_full(&e)
                }
                e if crate::cache::mentions_disk_full(&e.to_string()) => disk_full(&e),
                CheckoutError::Revision(m) => End::failed(FailureKind::Revision, m),
                CheckoutError::Clone(m) => End::failed(FailureKind::Clone, m),
                other => End::failed(FailureKind::Agent, other.to_string()),
            })?
    };
    drop(mirror);
    info!(job = %a.job_id, attempt = a.attempt, %commit, "checked out");
    svc.attempts
        .set_status(a, |s| s.commit = Some(commit.clone()));
    // A script, or an MLflow project's entry point: the command, and what its project needs.
    let (command, entry) = if spec.script.is_empty() {
        let plan = crate::project::plan(src, &commit, spec, &svc.agent_name, &dir.join("params"))
            .await
            .map_err(|(kind, m)| End::failed(kind, m))?;
        (plan.argv.clone(), Some(plan))
    } else {
        let script = resolve_script_at(src, &spec.script, &commit)
            .map_err(|m| End::failed(FailureKind::Script, m))?;
        let mut argv = vec!["python".to_string(), script.display().to_string()];
        argv.extend(spec.args.iter().cloned());
        (argv, None)
    };
    let mut req_files = Vec::new();
    if let Some(f) = &spec.requirements_file {
        req_files.push(
            resolve_script_at(src, f, &commit)
                .map_err(|m| End::failed(FailureKind::Env, format!("requirements_file: {m}")))?,
        );
    }
    if let Some(request) = entry.as_ref().and_then(|e| e.env.as_ref()) {
        if let Some(want) = &request.python {
            let have = svc
                .envs
                .python_version()
                .await
                .map_err(|m| End::failed(FailureKind::Agent, m))?;
            if !runyard_model::project_env::python_matches(want, &have) {
                return Err(End::failed(
                    FailureKind::Env,
                    format!(
                        "the project needs Python {want}; agent {} has {have} ({}). Runyard does not download interpreters: change the version the project asks for, or run an agent with --python pointing at a {want} interpreter",
                        svc.agent_name,
                        svc.envs.python().display()
                    ),
                ));
            }
        }
        if !request.requirements.is_empty() {
            let file = dir.join(crate::project::PROJECT_REQUIREMENTS);
            let mut text = request.requirements.join("\n");
            text.push('\n');
            tokio::fs::write(&file, text).await.map_err(|e| {
                End::failed(
                    FailureKind::Agent,
                    format!("cannot write {}: {e}", file.display()),
                )
            })?;
            req_files.push(file);
        }
    }
    if let Some(plan) = &entry {
        let line =
            serde_json::to_string(&Report::Project(plan.run.clone())).expect("a report serializes");
        if let Err(error) = a.reports.append(&[line]) {
            warn!(job = %a.job_id, %error, "cannot spool the project report");
        }
    }
    let started = std::time::Instant::now();
    // The installer's lines go to the job's log, marked as ours, before anything the script prints.
    let (sink, mut installer_lines) = mpsc::channel::<Vec<String>>(64);
    let forward = {
        let a = a.clone();
        let attempts = svc.attempts.clone();
        tokio::spawn(async move {
            while let Some(batch) = installer_lines.recv().await {
                let lines: Vec<String> = batch
                    .into_iter()
                    .map(|l| format!("{LOG_PREFIX}{l}"))
                    .collect();
                if let Err(error) = a.spool.append(&lines) {
                    warn!(job = %a.job_id, %error, "cannot spool installer output");
                }
                attempts.wake();
            }
        })
    };
    let prepared = svc
        .envs
        .prepare_logged(dir, &spec.requirements, &req_files, Some(sink))
        .await;
    let _ = forward.await;
    let python = prepared.map_err(|e| {
        let message = format!("environment build failed ({}): {e}", svc.envs.installer());
        if crate::cache::mentions_disk_full(&message) {
            disk_full(&message)
        } else {
            End::failed(FailureKind::Env, message)
        }
    })?;
    let environment = if python != svc.envs.python() {
        let packages = svc.envs.freeze(&python, dir).await.unwrap_or_else(|e| {
            warn!(job = %a.job_id, error = %e, "cannot list the environment's packages");
            Vec::new()
        });
        runyard_model::Environment {
            installer: svc.envs.installer().into(),
            packages,
            seconds: started.elapsed().as_secs_f64(),
        }
    } else {
        runyard_model::Environment {
            installer: "system".into(),
            packages: Vec::new(),
            seconds: 0.0,
        }
    };
    info!(
        job = %a.job_id,
        installer = %environment.installer,
        packages = environment.packages.len(),
        seconds = environment.seconds,
        "environment ready"
    );
    if environment.installer != "system" {
        let line = format!(
            "{LOG_PREFIX}environment ready: {} packages with {} in {:.1} s",
            environment.packages.len(),
            environment.installer,
            environment.seconds
        );
        if let Err(error) = a.spool.append(&[line]) {
            warn!(job = %a.job_id, %error, "cannot spool the environment line");
        }
    }
    let line =
        serde_json::to_string(&Report::Environment(environment)).expect("a report serializes");
    if let Err(error) = a.reports.append(&[line]) {
        warn!(job = %a.job_id, %error, "cannot spool the environment report");
    }
    svc.attempts.wake();
    let program =
        program_of(&command[0], &python, src).map_err(|m| End::failed(FailureKind::Script, m))?;
    Ok(Prepared {
        python,
        program,
        args: command[1..].to_vec(),
    })
}

/// The executable a command names: `python` (and `python3`, `python3.X`) is the environment's
/// interpreter; a path is taken inside the checkout; a bare name is looked up on the
/// environment's `PATH` (its venv first).
fn program_of(name: &str, python: &Path, src: &Path) -> Result<PathBuf, String> {
    let is_python = name == "python"
        || name
            .strip_prefix("python3")
            .is_some_and(|v| v.is_empty() || v.starts_with('.'));
    if is_python {
        return Ok(python.to_path_buf());
    }
    if name.contains('/') {
        let rel = Path::new(name);
        if rel.is_absolute() {
            return Ok(rel.to_path_buf());
        }
        return resolve_script_at(src, name, "HEAD").map_err(|m| format!("command: {m}"));
    }
    let venv_bin = python.parent().map(Path::to_path_buf);
    venv_bin
        .map(|b| b.join(name))
        .filter(|p| p.is_file())
        .or_else(|| crate::pyenv::find_on_path(name))
        .ok_or_else(|| {
            format!("command: `{name}` is not in the environment or on the agent's PATH")
        })
}

fn exit_code(o: ExitOutcome) -> Option<i32> {
    match o {
        ExitOutcome::Exited(c) => Some(c),
        ExitOutcome::Signaled(s) => Some(128 + s),
        ExitOutcome::Lost => None,
    }
}

fn exit_end(o: ExitOutcome) -> End {
    match o {
        ExitOutcome::Exited(0) => End {
            state: AttemptState::Succeeded,
            failure: None,
            exit_code: Some(0),
            reason: String::new(),
        },
        other => End {
            state: AttemptState::Failed,
            failure: Some(FailureKind::Exit),
            exit_code: exit_code(other),
            reason: format!("script {other}"),
        },
    }
}

/// Drains captured lines into the spool and wakes the session pump.
async fn write_lines(attempts: Attempts, a: Arc<Attempt>, mut rx: mpsc::Receiver<Vec<String>>) {
    while let Some(mut batch) = rx.recv().await {
        // Coalesce what is already queued into one write.
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        if let Err(error) = a.spool.append(&batch) {
            warn!(job = %a.job_id, %error, "cannot spool log lines");
        }
        attempts.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;

    fn attempt(attempts: &Attempts, dir: &Path, n: u32) -> Arc<Attempt> {
        let spool = |ext: &str| Spool::create(dir.join(format!("{n}.{ext}"))).unwrap();
        let job = "01hzx3k8m9q2r4s5t6v7w8x9yz";
        let spools = (spool("log"), spool("reports"));
        attempts.insert(job, n, spools.0, spools.1, vec![]).unwrap()
    }

    /// Regression: the attempt task was spawned and forgotten, so a panic in it left the attempt
    /// `preparing` or `running` forever (and its job with it).
    #[tokio::test]
    async fn a_panicking_attempt_task_fails_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let attempts = Attempts::default();
        let a = attempt(&attempts, dir.path(), 1);
        a.spool
            .append(&["printed before the panic".into()])
            .unwrap();
        let injected = async { panic!("injected failure") };
        supervise(attempts.clone(), a.clone(), injected).await;
        assert!(a.is_terminal());
        let (st, _) = a.status();
        assert_eq!(st.state, AttemptState::Failed);
        assert_eq!(st.failure, Some(FailureKind::Agent));
        assert!(
            st.reason.contains("panicked: injected failure"),
            "{}",
            st.reason
        );
        assert_eq!(
            st.log_lines, 1,
            "the controller waits for the lines before it"
        );

        // An attempt that ended normally is left as it ended.
        let b = attempt(&attempts, dir.path(), 2);
        let (svc_attempts, bb) = (attempts.clone(), b.clone());
        let ends = async move {
            svc_attempts.set_status(&bb, |s| s.state = AttemptState::Succeeded);
        };
        supervise(attempts.clone(), b.clone(), ends).await;
        assert_eq!(b.status().0.state, AttemptState::Succeeded);
    }
}
