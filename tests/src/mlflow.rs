//! Real MLflow for tests: one client venv (MLflow from PyPI plus `python/mlflow-runyard`, built
//! once per target dir under a lock, from the shared uv cache) and `mlflow server` on SQLite on a
//! free loopback port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// The MLflow the tests run (the version the plugin was written against).
pub const MLFLOW: &str = "mlflow==3.17.2";
/// The client library a job's environment gets (what `mlflow` depends on, without the server).
pub const MLFLOW_SKINNY: &str = "mlflow-skinny==3.17.2";
/// A loaded 2-core machine needs up to ~50 s for the server's first answer.
const SERVER_START: Duration = Duration::from_secs(240);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn uv() -> anyhow::Result<PathBuf> {
    runyard_agent::pyenv::find_on_path("uv")
        .context("uv is not on PATH: scripts/install-test-deps installs it")
}

/// The client venv's `python`: MLflow and the plugin, installed when missing (the plugin again
/// every time, so a change to it is tested). Concurrent tests wait on a lock file.
pub async fn client_python() -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let dir = root.join("target").join("mlflow-test-venv");
    std::fs::create_dir_all(root.join("target"))?;
    let lock_path = root.join("target").join("mlflow-test-venv.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    let lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", lock_path.display()))
    })
    .await??;
    let python = dir.join("bin/python");
    let uv = uv()?;
    let run = |args: Vec<std::ffi::OsString>| {
        let uv = uv.clone();
        async move {
            let out = tokio::process::Command::new(&uv)
                .args(&args)
                .env("UV_CACHE_DIR", crate::shared_uv_cache())
                .env("UV_PYTHON_DOWNLOADS", "never")
                .env_remove("VIRTUAL_ENV")
                .stdin(Stdio::null())
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "uv {:?} failed: {}",
                    args,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            anyhow::Ok(())
        }
    };
    if !python.exists() {
        run(vec![
            "venv".into(),
            "--python".into(),
            "/usr/bin/python3".into(),
            dir.clone().into(),
        ])
        .await?;
        run(vec![
            "pip".into(),
            "install".into(),
            "--python".into(),
            python.clone().into(),
            MLFLOW.into(),
            "pytest".into(),
        ])
        .await?;
    }
    run(vec![
        "pip".into(),
        "install".into(),
        "--python".into(),
        python.clone().into(),
        "--reinstall-package".into(),
        "mlflow-runyard".into(),
        root.join("python/mlflow-runyard").into(),
    ])
    .await?;
    drop(lock);
    Ok(python)
}

/// `mlflow server` on SQLite on a free loopback port; killed (with its workers) on drop.
pub struct MlflowServer {
    pub url: String,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl MlflowServer {
    pub async fn start(python: &Path) -> anyhow::Result<MlflowServer> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = tokio::process::Command::new(python)
            .args(["-m", "mlflow", "server", "--backend-store-uri"])
            .arg(format!("sqlite:///{}/mlflow.db", dir.path().display()))
            .arg("--default-artifact-root")
            .arg(dir.path().join("artifacts"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "1",
            ])
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start mlflow server")?;
        let mut server = MlflowServer {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        let deadline = tokio::time::Instant::now() + SERVER_START;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("mlflow server exited ({status}):\n{}", server.log());
            }
            let health = server
                .http
                .get(format!("{}/health", server.url))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(server);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "mlflow server did not answer in {SERVER_START:?}:\n{}",
                    server.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default();
        let skip = text.chars().count().saturating_sub(3000);
        text.chars().skip(skip).collect()
    }

    /// A run as the REST API gives it: `info`, `data` (`params`, `metrics`, `tags` as lists).
    pub async fn run(&self, run_id: &str) -> anyhow::Result<Value> {
        let v: Value = self
            .http
            .get(format!("{}/api/2.0/mlflow/runs/get", self.url))
            .query(&[("run_id", run_id)])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v["run"].clone())
    }

    /// Waits until the run's status is `status`.
    pub async fn wait_run(
        &self,
        run_id: &str,
        status: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let run = self.run(run_id).await?;
            if run["info"]["status"] == status {
                return Ok(run);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("run {run_id} is not {status} after {timeout:?}: {run}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `key → value` of a run's `params` or `tags` list.
pub fn pairs(run: &Value, what: &str) -> std::collections::BTreeMap<String, String> {
    run["data"][what]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["key"].as_str()?.to_string(),
                        p["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}
