//! The Runyard agent: runs jobs from git repositories on this machine and streams their logs and
//! statuses to the controller.
//!
//! - `dial`: connecting to the controller with the agent's identity (join token, credential).
//! - `trust`: how the controller is verified: the join token's pinned CA, `--ca`, system roots.
//! - `credential`: the agent's own credential, made once in the data dir (0600).
//! - `session`: the gRPC session with the controller (register, heartbeat, pump, reconnect).
//! - `attempts`: the attempts this agent holds, their statuses and stop channels.
//! - `cache`: disk hygiene: cache size limit (LRU sweeps), free-space and disk-full checks.
//! - `runner`: one attempt's lifecycle: checkout, environment, process, report.
//! - `spool`: per-attempt on-disk log spool, kept until the controller acknowledges lines.
//! - `checkout`: bare mirror cache and per-job working trees (git2).
//! - `pyenv`: per-job Python environments (uv, or venv + pip).
//! - `project`: an MLflow project's entry point after checkout: command, parameters, environment.
//! - `reporter`: the Lightning reporter (Python) installed for every job's PYTHONPATH.
//! - `process`: the job's process group, line capture, stop and sweep (child subreaper).
//! - `identity`: who jobs run as (per-attempt uids, `--run-as`), and handing a job its directory.
//! - `cgroup`: one cgroup per attempt (v2, v1 or none): kill-all, memory limit, OOM.
//! - `git_auth`: git credentials by host, sent over https or ssh only.
//! - `upload`: streams the best checkpoint to the controller's artifact store.
//! - `tunnel`: the agent's end of a tunnel: the controller's bytes to and from an attempt's port.
//! - `gpu`: GPU detection and sampling through NVML.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub mod attempts;
pub mod cache;
pub mod cgroup;
pub mod checkout;
pub mod credential;
pub mod dial;
pub mod download;
pub mod git_auth;
pub mod gpu;
pub mod identity;
pub mod policy;
pub mod process;
pub mod project;
pub mod pyenv;
pub mod reaper;
pub mod reporter;
pub mod runner;
pub mod session;
pub mod spool;
pub mod trust;
pub mod tunnel;
pub mod upload;

/// Validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC URL of the controller, e.g. `http://127.0.0.1:7901`.
    pub controller: String,
    /// The controller's agent join token (`RY1<CA fingerprint>::<secret>`, or an old one).
    pub token: String,
    /// Trust anchors for an `https://` controller whose join token pins no CA (default: the
    /// system's roots). Unused when the token carries the CA fingerprint.
    pub ca: Option<PathBuf>,
    /// Caches (mirrors, uv), job working trees and log spools.
    pub data_dir: PathBuf,
    /// Stable name; the controller keys agents by it.
    pub name: String,
    /// How many `cpu-small` jobs may run at once.
    pub cpu_small_slots: u32,
    /// Offer the GPUs NVML finds.
    pub offer_gpus: bool,
    /// Load NVML from this path instead of the system's `libnvidia-ml.so.1`.
    pub nvml_library: Option<PathBuf>,
    /// Python interpreter for jobs and venvs.
    pub python: PathBuf,
    /// uv binary; `None` looks on PATH, then falls back to pip.
    pub uv: Option<PathBuf>,
    /// uv's shared cache; `None`: `<data_dir>/uv-cache`. Keep it on the data dir's file system
    /// so venvs are hardlinked from it.
    pub uv_cache: Option<PathBuf>,
    /// Limit on the caches (mirrors, uv cache, leftover job dirs) in bytes; `None`:
    /// [`cache::DEFAULT_CACHE_PERCENT`] of the space they can use at start.
    pub cache_size: Option<u64>,
    /// New jobs fail ("disk full") while the data dir's file system has less free space.
    pub min_free: u64,
    /// Who jobs run as (`--run-as`, `--job-uids`).
    pub isolation: identity::IsolationConfig,
    /// Git credentials by host (`--git-credential HOST=FILE`).
    pub git_credentials: Vec<git_auth::HostCredential>,
}

/// How often the caches are swept besides before each job.
/// Shared job environments in the agent's data dir (see `pyenv::EnvBuilder::shared_in`).
pub const ENVS_DIR: &str = "envs";
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(300);
/// Least time between two sweeps asked for by job starts.
const SWEEP_SPACING: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot prepare data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "agent data dir {0} is in use by another agent on this host (`runyard up` runs one in \
         <data dir>/agent): give this agent its own --data-dir and --name"
    )]
    InUse(PathBuf),
    #[error("GPU detection failed: {0}")]
    Gpu(#[from] gpu::GpuError),
    #[error("{0}")]
    Trust(#[from] trust::TrustError),
    #[error("{0}")]
    Identity(#[from] identity::IdentityError),
    #[error(
        "{} is no longer used: it was sent to every git host, even over plain http. Put the token \
         in a file only the agent can read (chmod 600) and give --git-credential HOST=FILE \
         (or RUNYARD_GIT_CREDENTIALS=HOST=FILE,...): it then goes to HOST alone, over https",
        git_auth::LEGACY_TOKEN_ENV
    )]
    LegacyGitToken,
    #[error("git credential {}: {message}", path.display())]
    GitCredential { path: PathBuf, message: String },
}

/// Runs the agent until `cancel` fires. Jobs still running then are stopped (their grace
/// applies); the controller declares them lost and places them again.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AgentError> {
    let data_err = |source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    // Before anything else: a URL or token that cannot be trusted is a configuration error.
    let trust = trust::Trust::new(&config.controller, &config.token, config.ca.as_deref())?;
    info!(controller = %config.controller, trust = %trust.describe, "controller trust");
    if std::env::var_os(git_auth::LEGACY_TOKEN_ENV).is_some() {
        return Err(AgentError::LegacyGitToken);
    }
    if !config.data_dir.exists() {
        // Made here, so its mode is ours to choose: jobs pass through it (traverse only) to
        // their directories and the reporter. A data dir that exists keeps its mode.
        identity::set_dir_mode(&config.data_dir, 0o711)?;
    }
    // One agent per data dir, locked before anything else touches it: a second one would wipe
    // the first one's job dirs, kill its processes (same marker) and share its credential. Held
    // until `run` returns.
    let _lock = lock_data_dir(&config.data_dir)?;
    let isolation = config.isolation.clone();
    let identities = tokio::task::spawn_blocking(move || identity::Identities::setup(&isolation))
        .await
        .expect("identity setup panicked")?;
    let jobs_dir = config.data_dir.join("jobs");
    // A previous incarnation's leftovers: working dirs and spools of attempts nobody will report.
    if jobs_dir.exists() {
        let _ = std::fs::remove_dir_all(&jobs_dir);
    }
    // Modes: what jobs pass through 0711, what they read 0755, the rest the agent's alone.
    identity::set_dir_mode(&jobs_dir, 0o711)?;
    identity::create_private_dir(&jobs_dir.join(cache::SPOOL_DIR))?;
    for private in ["mirrors", "tools"] {
        identity::create_private_dir(&config.data_dir.join(private))?;
    }
    identity::check_reachable_all(&identities, &[&jobs_dir])?;
    // Venvs link to it and jobs without requirements run it: it must be within their reach.
    let given = identities.job_python(&config.python)?;
    // Through a shim (pyenv), every job would pay a shell start: run the real interpreter, when
    // jobs can reach it too.
    let python = match pyenv::real_interpreter(&given).await {
        Ok(real) if real == given => given,
        Ok(real) => match identities.check_reachable(&real) {
            Ok(()) => {
                info!(given = %given.display(), python = %real.display(), "jobs run the interpreter the given one execs");
                real
            }
            Err(error) => {
                warn!(given = %given.display(), real = %real.display(), %error, "jobs run the given interpreter: they cannot reach the one it execs");
                given
            }
        },
        Err(error) => {
            warn!(python = %given.display(), %error, "cannot ask the interpreter for its executable; jobs run it as given");
            given
        }
    };
    check_git_credentials(&config.git_credentials, &identities)?;
    if let Err(error) = process::become_subreaper() {
        warn!(%error, "cannot become a child subreaper; processes that leave their group may escape stops");
    }
    // Job processes carry this identity in their environment. The data dir makes it unique per
    // installation, so two agents on one host (or in one test run) never sweep each other's jobs.
    let data_dir = std::fs::canonicalize(&config.data_dir).map_err(data_err)?;
    let identity = format!("{}@{}", config.name, data_dir.display());
    let sweep_identity = identity.clone();
    let swept = tokio::task::spawn_blocking(move || process::sweep_agent(&sweep_identity))
        .await
        .unwrap_or(0);
    if swept > 0 {
        warn!(
            processes = swept,
            "killed processes left by a previous run of this agent"
        );
    }
    let cgroup_identity = identity.clone();
    let cgroups = tokio::task::spawn_blocking(move || {
        let cgroups = cgroup::Cgroups::detect(&cgroup_identity);
        let stale = cgroups.clean_stale();
        (cgroups, stale)
    })
    .await
    .map(|(cgroups, stale)| {
        if stale > 0 {
            warn!(
                cgroups = stale,
                "killed and removed job cgroups left by a previous run of this agent"
            );
        }
        cgroups
    })
    .unwrap_or_else(|_| cgroup::Cgroups::none("cgroup detection panicked"));
    cgroups.log();
    identities.log();

    let credential = credential::load_or_create(&config.data_dir).map_err(data_err)?;
    let auth = dial::Auth {
        token: trust.secret.clone(),
        name: config.name.clone(),
        credential,
        tls: trust.tls.clone(),
    };
    let gpus = if config.offer_gpus {
        let lib = config.nvml_library.clone();
        tokio::task::spawn_blocking(move || gpu::detect(lib.as_deref()))
            .await
            .expect("GPU detection panicked")?
    } else {
        gpu::GpuProbe::none()
    };
    let gpus = Arc::new(gpus);
    let reporter_root = data_dir.join("reporter");
    let reporter_dir = tokio::task::spawn_blocking(move || reporter::install(&reporter_root))
        .await
        .expect("reporter install panicked")
        .map_err(data_err)?;
    // Every job imports it: readable by all, writable by the agent alone.
    identity::set_dir_mode(&reporter_dir, 0o755)?;
    identity::check_reachable_all(&identities, &[&reporter_dir])?;
    let uv = match config.uv.clone().or_else(|| pyenv::find_on_path("uv")) {
        Some(uv) => Some(uv),
        None => match pyenv::bootstrap_uv(&python, &data_dir.join("tools")).await {
            Ok(uv) => Some(uv),
            Err(error) => {
                warn!(%error, "cannot install uv; environments are built with pip");
                None
            }
        },
    };
    let uv_cache = match config.uv_cache.clone() {
        Some(dir) => dir,
        None => {
            // Jobs read its files through the hardlinks in their venvs, never through this path.
            let dir = config.data_dir.join("uv-cache");
            identity::create_private_dir(&dir)?;
            dir
        }
    };
    let janitor = {
        let (dir, uv_cache, size) = (data_dir.clone(), uv_cache.clone(), config.cache_size);
        tokio::task::spawn_blocking(move || match size {
            Some(max) => Ok(cache::Janitor::new(dir, uv_cache, max)),
            None => cache::Janitor::with_default_limit(dir, uv_cache),
        })
        .await
        .expect("cache measurement panicked")
        .map_err(data_err)?
    };
    let svc = Arc::new(runner::Services {
        reporter_dir,
        agent_name: config.name.clone(),
        controller: config.controller.clone(),
        auth: auth.clone(),
        identity,
        jobs_dir,
        checkouts: checkout::CheckoutCache::with_credentials(
            config.data_dir.join("mirrors"),
            git_auth::GitCredentials::new(config.git_credentials.clone()),
        ),
        envs: pyenv::EnvBuilder::new(python.clone(), uv, uv_cache)
            .shared_in(config.data_dir.join(ENVS_DIR)),
        attempts: attempts::Attempts::default(),
        tasks: tokio_util::task::TaskTracker::new(),
        janitor: Arc::new(janitor),
        in_use: cache::InUse::default(),
        min_free: config.min_free,
        sweep_soon: Arc::default(),
        identities: Arc::new(identities),
        cgroups: Arc::new(cgroups),
    });
    let sweeper = {
        let (svc, cancel) = (svc.clone(), cancel.clone());
        tokio::spawn(
            async move {
                loop {
                    runner::sweep_caches(&svc).await;
                    let last = tokio::time::Instant::now();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(SWEEP_EVERY) => continue,
                        _ = svc.sweep_soon.notified() => {}
                    }
                    // Asked by a job start: at most one sweep per SWEEP_SPACING, so a burst of
                    // jobs costs one walk of the caches, not one each.
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep_until(last + SWEEP_SPACING) => {}
                    }
                }
            }
            .instrument(info_span!("cache_sweep")),
        )
    };
    let (cpus, memory_bytes) = machine_size();
    info!(
        name = %config.name,
        controller = %config.controller,
        cpu_small_slots = config.cpu_small_slots,
        gpus = gpus.sample().len(),
        installer = svc.envs.installer(),
        cache_max_bytes = svc.janitor.max_bytes,
        cgroups = svc.cgroups.mode(),
        jobs_run_as = %svc.identities.describe(),
        "agent started"
    );
    let session = session::SessionLoop {
        controller: config.controller.clone(),
        auth,
        svc: svc.clone(),
        gpus,
        offer: session::Offer {
            cpu_small_slots: config.cpu_small_slots,
            cpus,
            memory_bytes,
        },
    };
    session.run(cancel.clone()).await;
    let _ = sweeper.await;

    // Shutting down: stop what still runs, within each job's grace.
    let running: Vec<_> = svc
        .attempts
        .all()
        .into_iter()
        .filter(|a| !a.is_terminal())
        .collect();
    if !running.is_empty() {
        info!(jobs = running.len(), "stopping jobs before exit");
    }
    for a in &running {
        let _ = a.stop.send(Some(attempts::StopRequest {
            grace: std::time::Duration::from_secs(5),
            reason: "agent shut down".into(),
        }));
    }
    // Every attempt task ends once its process is gone (or panics, and is failed).
    svc.tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(7), svc.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = svc.tasks.len(),
            "attempts did not end in time; exiting"
        );
    }
    svc.cgroups.close();
    Ok(())
}

/// Refuses credential files that are missing or that a job could read.
fn check_git_credentials(
    creds: &[git_auth::HostCredential],
    identities: &identity::Identities,
) -> Result<(), AgentError> {
    for c in creds {
        let meta = std::fs::metadata(&c.file).map_err(|e| AgentError::GitCredential {
            path: c.file.clone(),
            message: format!("cannot read it ({e}): give an existing file for {}", c.host),
        })?;
        if identities.isolated() && identity::readable_by_jobs(identities, &meta) {
            use std::os::unix::fs::PermissionsExt;
            return Err(AgentError::GitCredential {
                path: c.file.clone(),
                message: format!(
                    "jobs could read it (mode {:04o}): make it the agent's alone (chmod 600 {})",
                    meta.permissions().mode() & 0o7777,
                    c.file.display()
                ),
            });
        }
    }
    Ok(())
}

/// Locks `<data_dir>/agent.lock` for this process (creating the dir, private, if it is missing);
/// refuses a data dir another agent holds.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, AgentError> {
    use runyard_proto::datadir::{self, LockError};
    datadir::lock(data_dir, "agent.lock").map_err(|e| match e {
        LockError::InUse(dir) => AgentError::InUse(dir),
        LockError::Io { path, source } => AgentError::DataDir { path, source },
    })
}

/// Number of CPUs and bytes of memory of this machine.
pub fn machine_size() -> (u32, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    (cpus, mem)
}
