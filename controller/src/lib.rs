//! The Runyard controller.
//!
//! Work in progress: the modules below are filled in one by one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod tokens;

pub use tokens::{Tokens, ensure_tokens};

/// Default HTTP API address.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7900";
/// Default agent gRPC address.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:7901";
/// An agent silent for this long is lost, and so are its jobs.
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(30);

/// Validated controller configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds the embedded store, logs, artifacts and tokens.
    pub data_dir: PathBuf,
    /// `file:` (embedded, under the data dir) or `etcd://host:port[,host:port...]`.
    pub store: String,
    pub agent_ttl: Duration,
}

impl Config {
    pub fn new(data_dir: impl AsRef<Path>) -> Config {
        Config {
            data_dir: data_dir.as_ref().to_path_buf(),
            store: "file:".into(),
            agent_ttl: DEFAULT_AGENT_TTL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot prepare data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs the controller on the given listeners until `cancel` fires.
pub async fn run(
    config: Config,
    http: TcpListener,
    grpc: TcpListener,
    cancel: CancellationToken,
) -> Result<(), ControllerError> {
    ensure_tokens(&config.data_dir).map_err(|source| ControllerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let _ = (http, grpc);
    cancel.cancelled().await;
    Ok(())
}

pub mod reconcile;
pub mod scheduler;
pub mod logs;
