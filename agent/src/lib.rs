//! The Runyard agent.
//!
//! Work in progress: the modules below are filled in one by one.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

/// Validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC URL of the controller, e.g. `http://127.0.0.1:7901`.
    pub controller: String,
    /// The controller's agent join token.
    pub token: String,
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
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot prepare data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs the agent until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    cancel.cancelled().await;
    Ok(())
}
