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
//! - `reporter`: the Lightning reporter (Python) installed for every job's PYTHONPATH.
//! - `process`: the job's process group, line capture, stop and sweep (child subreaper).
//! - `upload`: streams the best checkpoint to the controller's artifact store.
//! - `gpu`: GPU detection and sampling through NVML.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub mod attempts;
pub mod cache;
pub mod checkout;
pub mod credential;
pub mod dial;
pub mod gpu;
pub mod process;
pub mod pyenv;
pub mod reaper;
pub mod reporter;
pub mod runner;
pub mod session;
pub mod spool;
pub mod trust;
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
}

/// How often the caches are swept besides before each job.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

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
    // One agent per data dir, locked before anything else touches it: a second one would wipe
    // the first one's job dirs, kill its processes (same marker) and share its credential. Held
    // until `run` returns.
    let _lock = lock_data_dir(&config.data_dir)?;
    let jobs_dir = config.data_dir.join("jobs");
    // A previous incarnation's leftovers: working dirs and spools of attempts nobody will report.
    if jobs_dir.exists() {
        let _ = std::fs::remove_dir_all(&jobs_dir);
    }
    std::fs::create_dir_all(&jobs_dir).map_err(data_err)?;
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
    let uv = match config.uv.clone().or_else(|| pyenv::find_on_path("uv")) {
        Some(uv) => Some(uv),
        None => match pyenv::bootstrap_uv(&config.python, &data_dir.join("tools")).await {
            Ok(uv) => Some(uv),
            Err(error) => {
                warn!(%error, "cannot install uv; environments are built with pip");
                None
            }
        },
    };
    let uv_cache = config
        .uv_cache
        .clone()
        .unwrap_or_else(|| config.data_dir.join("uv-cache"));
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
        checkouts: checkout::CheckoutCache::new(config.data_dir.join("mirrors")),
        envs: pyenv::EnvBuilder::new(config.python.clone(), uv, uv_cache),
        attempts: attempts::Attempts::default(),
        tasks: tokio_util::task::TaskTracker::new(),
        janitor: Arc::new(janitor),
        in_use: cache::InUse::default(),
        min_free: config.min_free,
    });
    let sweeper = {
        let (svc, cancel) = (svc.clone(), cancel.clone());
        tokio::spawn(
            async move {
                loop {
                    runner::sweep_caches(&svc).await;
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(SWEEP_EVERY) => {}
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
