//! Harness for cluster-level tests: a real controller and real agents in this process, talking
//! over real gRPC and HTTP on loopback, each with its own temp dir.
//!
//! - `bench`: helpers of the benchmark (`cargo bench -p runyard-tests --bench bench`).
//! - `browser`: headless Chromium through chromedriver, for the web page's tests.
//! - `cluster`: `TestCluster` — start, restart the controller, kill and add agents, HTTP client.
//! - `fixture`: git repositories made at test time.
//! - `scripts`: Python scripts the tests run as jobs (a small Lightning training).
//! - `proxy`: a loopback TCP proxy that can cut and restore connections (network partitions).
//! - `etcd`: a real etcd server on free loopback ports.
//! - `faulty_store`: a store wrapper that injects lost answers, failed writes and conflicts.
//! - `fake_nvml`: builds a fake `libnvidia-ml.so` so the real NVML code path runs without a GPU.

pub mod bench;
pub mod browser;
pub mod cluster;
pub mod etcd;
pub mod fake_nvml;
pub mod faulty_store;
pub mod fixture;
pub mod mlflow;
pub mod proxy;
pub mod scripts;
pub mod services;

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(
    timeout: std::time::Duration,
    what: &str,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A temp dir that jobs may pass through (0711), for agent data dirs: a job running under its
/// own uid must reach its directory below it (`tempfile` makes 0700 dirs).
pub fn reachable_tempdir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

/// A temp dir anyone may write into (1777, like /tmp), for files a test and its jobs exchange.
pub fn exchange_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))?;
    Ok(dir)
}

/// The uv cache shared by tests: `RUNYARD_TEST_UV_CACHE`, else `$HOME/.cache/runyard-test-uv`.
pub fn shared_uv_cache() -> std::path::PathBuf {
    match std::env::var_os("RUNYARD_TEST_UV_CACHE") {
        Some(p) => p.into(),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/runyard-test-uv"),
    }
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` to change the level).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn".into()),
        )
        .with_test_writer()
        .try_init();
}
