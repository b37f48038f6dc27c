//! Python environments for jobs: the agent's interpreter as is when a job needs nothing extra,
//! else a fresh venv in the job's directory built with uv (pip as the fallback).
//!
//! Invariants:
//! - A job without requirements gets the agent's `python3` and no venv: the fastest start.
//! - A venv is always new (an old one in the job directory is removed first) and lives in
//!   `<job_dir>/venv`; the spec's requirements go to `<job_dir>/requirements.runyard.txt` and
//!   reach the installer only through `-r`, never through a shell or as options.
//! - uv runs with `UV_PYTHON_DOWNLOADS=never`, an explicit `--python`, and one `UV_CACHE_DIR`
//!   shared by all jobs, so venvs are hardlinked from the cache when it is on the same file system.
//! - An installer failure becomes an [`EnvError`] carrying the tail of the installer's own output
//!   (last 20 lines, at most 4 KiB), which names the requirement that failed.
//! - Cancellation: installer processes are killed when the `prepare` future is dropped
//!   (`kill_on_drop`); there is no token.
//! - [`bootstrap_uv`] installs uv at most once per tools dir: under an exclusive file lock, into
//!   a temporary venv renamed into place only once its `uv --version` runs, so a crash or a
//!   concurrent agent never leaves or sees a half-installed uv.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Name of the venv directory inside a job directory.
pub const VENV_DIR: &str = "venv";
/// File the spec's requirements are written to inside a job directory.
pub const REQUIREMENTS_FILE: &str = "requirements.runyard.txt";
/// A shared environment is complete once this file exists in its directory (its mtime is its
/// last use).
pub const READY: &str = "ready";
/// The pinned packages of a shared environment, listed when it was built.
const PACKAGES_FILE: &str = "packages.txt";
/// Unpinned requirements are resolved again (a new shared environment) this often.
pub const RERESOLVE: Duration = Duration::from_secs(3600);
/// Directory of the bootstrapped uv (a venv) inside the agent's tools dir.
pub const UV_TOOL_DIR: &str = "uv";
/// Longest a uv bootstrap may take (a venv and a ~20 MB download).
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest `uv --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of the installer's last output lines an error keeps.
const TAIL_LINES: usize = 20;
/// At most this many bytes of installer output in an error.
const TAIL_BYTES: usize = 4096;

/// Why a job's environment could not be built. The messages are meant for users.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A requirement string that could smuggle installer options or extra lines.
    #[error("requirement `{0}` is not allowed: one requirement per entry, no options")]
    Requirement(String),
    /// The requirements file named by the job does not exist.
    #[error("requirements file {0} not found in the repository")]
    RequirementsFile(PathBuf),
    /// A file system step in the job directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The installer or interpreter could not be started at all.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// Creating the venv failed.
    #[error("creating the virtual environment with {installer} failed ({status}):\n{output}")]
    Venv {
        installer: &'static str,
        status: String,
        output: String,
    },
    /// Installing the requirements failed: the output names the requirement.
    #[error("installing requirements with {installer} failed ({status}):\n{output}")]
    Install {
        installer: &'static str,
        status: String,
        output: String,
    },
}

/// Decides and builds the interpreter for each job. One per agent; cheap to share by reference.
#[derive(Clone, Debug)]
pub struct EnvBuilder {
    python: PathBuf,
    uv: Option<PathBuf>,
    cache_dir: PathBuf,
    /// The interpreter's version (`3.11.7`), asked once.
    version: Arc<tokio::sync::OnceCell<Result<String, String>>>,
    /// Where environments shared between jobs live (see [`EnvBuilder::shared_in`]); `None`:
    /// every job builds its own.
    envs_dir: Option<PathBuf>,
}

impl EnvBuilder {
    /// `python`: the agent's interpreter; `uv`: an explicit uv binary, or `None` to look for `uv`
    /// on `PATH` (pip is used when there is none); `cache_dir`: uv's shared cache, best on the
    /// same file system as the job directories.
    pub fn new(python: PathBuf, uv: Option<PathBuf>, cache_dir: PathBuf) -> Self {
        let uv = uv.or_else(|| find_on_path("uv"));
        EnvBuilder {
            python,
            uv,
            cache_dir,
            version: Arc::default(),
            envs_dir: None,
        }
    }

    /// A builder that always uses `python -m venv` and pip, even when uv is available.
    pub fn pip(python: PathBuf) -> Self {
        EnvBuilder {
            python,
            uv: None,
            cache_dir: PathBuf::new(),
            version: Arc::default(),
            envs_dir: None,
        }
    }

    /// The uv binary environments are built with, if any (also what cache sweeps prune with).
    pub fn uv(&self) -> Option<&Path> {
        self.uv.as_deref()
    }

    /// Shares environments between jobs, under `dir`: jobs whose requirements (and the
    /// contents of their requirements files) are the same run in one environment, built once
    /// with uv, its bytecode compiled, read-only to jobs that run as their own user. Unpinned
    /// requirements are resolved again at most once per [`RERESOLVE`]. With pip, or requirements
    /// that point into the checkout (`-e .`, local paths), a job still builds its own.
    pub fn shared_in(mut self, dir: PathBuf) -> Self {
        self.envs_dir = Some(dir);
        self
    }

    /// The interpreter jobs run with.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// The interpreter's version (`3.11.7`), asked of it once.
    pub async fn python_version(&self) -> Result<String, String> {
        self.version
            .get_or_init(|| async {
                let out = Command::new(&self.python)
                    .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output();
                match tokio::time::timeout(VERSION_TIMEOUT, out).await {
                    Ok(Ok(o)) if o.status.success() => {
                        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
                    }
                    Ok(Ok(o)) => Err(format!(
                        "{} failed: {}",
                        self.python.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Ok(Err(e)) => Err(format!("cannot run {}: {e}", self.python.display())),
                    Err(_) => Err(format!("{} did not answer", self.python.display())),
                }
            })
            .await
            .clone()
    }

    /// The installer venvs are built with: `"uv"` or `"pip"`.
    pub fn installer(&self) -> &'static str {
        if self.uv.is_some() { "uv" } else { "pip" }
    }

    /// Returns the interpreter to run the job's script with: the agent's own when there is
    /// nothing to install, else the `python` of a fresh venv in `job_dir` holding `requirements`
    /// and the requirements in `requirements_file` (a path the caller has checked is inside the
    /// checkout).
    pub async fn prepare(
        &self,
        job_dir: &Path,
        requirements: &[String],
        requirements_file: Option<&Path>,
    ) -> Result<PathBuf, EnvError> {
        let files: Vec<PathBuf> = requirements_file
            .into_iter()
            .map(Path::to_path_buf)
            .collect();
        self.prepare_logged(job_dir, requirements, &files, None)
            .await
    }

    /// [`EnvBuilder::prepare`] with any number of requirements files, forwarding each line the
    /// installer prints to `sink` (batches of lines; a closed sink just stops the forwarding).
    pub async fn prepare_logged(
        &self,
        job_dir: &Path,
        requirements: &[String],
        requirements_files: &[PathBuf],
        sink: Option<mpsc::Sender<Vec<String>>>,
    ) -> Result<PathBuf, EnvError> {
        if requirements.is_empty() && requirements_files.is_empty() {
            return Ok(self.python.clone());
        }
        let started = Instant::now();
        for r in requirements {
            if r.trim().is_empty() || r.trim_start().starts_with('-') || r.contains(['\n', '\r']) {
                return Err(EnvError::Requirement(r.clone()));
            }
        }
        if let Some(f) = requirements_files.iter().find(|f| !f.is_file()) {
            return Err(EnvError::RequirementsFile(f.to_path_buf()));
        }

        let out = Output::new(sink);
        if let (Some(_), Some(root)) = (&self.uv, &self.envs_dir) {
            let version = self.python_version().await.unwrap_or_default();
            let key = tokio::task::spawn_blocking({
                let (python, requirements, files) = (
                    self.python.clone(),
                    requirements.to_vec(),
                    requirements_files.to_vec(),
                );
                move || shared_key(&python, &version, &requirements, &files, SystemTime::now())
            })
            .await
            .ok()
            .flatten();
            if let Some(key) = key {
                return self
                    .shared(
                        &root.join(key),
                        requirements,
                        requirements_files,
                        &out,
                        started,
                    )
                    .await;
            }
        }
        let venv_python = self
            .build(job_dir, requirements, requirements_files, &out, false)
            .await?;
        let venv = job_dir.join(VENV_DIR);
        info!(
            installer = self.installer(),
            venv = %venv.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "environment ready"
        );
        Ok(venv_python)
    }

    /// Builds a venv in `base` (`base/venv`, the spec's requirements in `base`), compiling its
    /// bytecode when asked.
    async fn build(
        &self,
        base: &Path,
        requirements: &[String],
        requirements_files: &[PathBuf],
        out: &Arc<Output>,
        compile: bool,
    ) -> Result<PathBuf, EnvError> {
        let job_dir = base;
        let venv = job_dir.join(VENV_DIR);
        if tokio::fs::symlink_metadata(&venv).await.is_ok() {
            tokio::fs::remove_dir_all(&venv)
                .await
                .map_err(|source| EnvError::Io {
                    what: "cannot remove an old venv",
                    path: venv.clone(),
                    source,
                })?;
        }
        let mut req_args: Vec<OsString> = Vec::new();
        if !requirements.is_empty() {
            let file = job_dir.join(REQUIREMENTS_FILE);
            let mut text = requirements.join("\n");
            text.push('\n');
            tokio::fs::write(&file, text)
                .await
                .map_err(|source| EnvError::Io {
                    what: "cannot write",
                    path: file.clone(),
                    source,
                })?;
            req_args.extend(["-r".into(), file.into_os_string()]);
        }
        for f in requirements_files {
            req_args.extend(["-r".into(), f.as_os_str().to_owned()]);
        }
        let venv_python = venv.join("bin").join("python");
        let out = out.clone();

        match &self.uv {
            Some(uv) => {
                tokio::fs::create_dir_all(&self.cache_dir)
                    .await
                    .map_err(|source| EnvError::Io {
                        what: "cannot create the uv cache",
                        path: self.cache_dir.clone(),
                        source,
                    })?;
                let mut cmd = self.uv_command(uv, job_dir);
                cmd.arg("venv").arg("--python").arg(&self.python).arg(&venv);
                run(cmd, uv, &out)
                    .await?
                    .map_err(|(status, output)| EnvError::Venv {
                        installer: "uv",
                        status,
                        output,
                    })?;
                let mut cmd = self.uv_command(uv, job_dir);
                cmd.args(["pip", "install", "--python"])
                    .arg(&venv_python)
                    .args(&req_args);
                if compile {
                    cmd.arg("--compile-bytecode");
                }
                run(cmd, uv, &out)
                    .await?
                    .map_err(|(status, output)| EnvError::Install {
                        installer: "uv",
                        status,
                        output,
                    })?;
            }
            None => {
                let mut cmd = Command::new(&self.python);
                cmd.current_dir(job_dir).args(["-m", "venv"]).arg(&venv);
                run(cmd, &self.python, &out)
                    .await?
                    .map_err(|(status, output)| EnvError::Venv {
                        installer: "pip",
                        status,
                        output,
                    })?;
                let mut cmd = Command::new(&venv_python);
                cmd.current_dir(job_dir)
                    .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
                    .env("PIP_NO_INPUT", "1")
                    .args(["-m", "pip", "install", "--progress-bar", "off"])
                    .args(&req_args);
                run(cmd, &venv_python, &out)
                    .await?
                    .map_err(|(status, output)| EnvError::Install {
                        installer: "pip",
                        status,
                        output,
                    })?;
            }
        }
        Ok(venv_python)
    }

    /// The shared environment in `dir`: ready, or built now under its lock (another job building
    /// the same one is waited for).
    async fn shared(
        &self,
        dir: &Path,
        requirements: &[String],
        requirements_files: &[PathBuf],
        out: &Arc<Output>,
        started: Instant,
    ) -> Result<PathBuf, EnvError> {
        let python = dir.join(VENV_DIR).join("bin").join("python");
        let ready = dir.join(READY);
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| EnvError::Io { what, path, source }
        };
        if touch(&ready).is_ok() {
            debug!(env = %dir.display(), "shared environment reused");
            return Ok(python);
        }
        let root = dir.parent().unwrap_or(dir).to_path_buf();
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(io("cannot create", &root))?;
        let lock_path = dir.with_extension("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        let _lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        })
        .await
        .map_err(|e| EnvError::Io {
            what: "cannot lock",
            path: lock_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|(_, e)| EnvError::Io {
            what: "cannot lock",
            path: lock_path.clone(),
            source: e.into(),
        })?;
        if touch(&ready).is_ok() {
            return Ok(python);
        }
        // A build that did not finish (a crash, a stop): start over.
        if tokio::fs::symlink_metadata(dir).await.is_ok() {
            tokio::fs::remove_dir_all(dir)
                .await
                .map_err(io("cannot remove", dir))?;
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io("cannot create", dir))?;
        self.build(dir, requirements, requirements_files, out, true)
            .await?;
        let packages = self.freeze(&python, dir).await?;
        let listed = dir.join(PACKAGES_FILE);
        let mut text = packages.join("\n");
        text.push('\n');
        tokio::fs::write(&listed, text)
            .await
            .map_err(io("cannot write", &listed))?;
        tokio::fs::write(&ready, b"")
            .await
            .map_err(io("cannot write", &ready))?;
        info!(
            env = %dir.display(),
            packages = packages.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shared environment built"
        );
        Ok(python)
    }

    /// The pinned package set of an environment `prepare` returned (`name==version` lines).
    pub async fn freeze(&self, python: &Path, job_dir: &Path) -> Result<Vec<String>, EnvError> {
        // A shared environment lists its packages once, when built.
        let listed = python
            .ancestors()
            .nth(3)
            .map(|env| env.join(PACKAGES_FILE))
            .filter(|f| {
                f.parent()
                    .and_then(|e| e.join(READY).metadata().ok())
                    .is_some()
            });
        if let Some(listed) = listed
            && let Ok(text) = tokio::fs::read_to_string(&listed).await
        {
            return Ok(text.lines().map(str::to_string).collect());
        }
        let mut cmd = match &self.uv {
            Some(uv) => {
                let mut c = self.uv_command(uv, job_dir);
                c.args(["pip", "freeze", "--python"]).arg(python);
                c
            }
            None => {
                let mut c = Command::new(python);
                c.args(["-m", "pip", "freeze", "--all"])
                    .current_dir(job_dir);
                c
            }
        };
        let program = cmd.as_std().get_program().into();
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| EnvError::Spawn { program, source })?;
        if !out.status.success() {
            return Err(EnvError::Install {
                installer: self.installer(),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    fn uv_command(&self, uv: &Path, job_dir: &Path) -> Command {
        let mut cmd = Command::new(uv);
        cmd.current_dir(job_dir)
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env("UV_CACHE_DIR", &self.cache_dir)
            .env("UV_NO_PROGRESS", "1")
            .env("NO_COLOR", "1")
            .env_remove("VIRTUAL_ENV");
        cmd
    }
}

/// The interpreter `python` really runs: a shim (pyenv's, asdf's: a script that execs the real
/// one) costs a shell start on every job, so the agent asks once (`sys.executable`) and runs jobs
/// with the answer. `python` itself when it cannot say (with why).
pub async fn real_interpreter(python: &Path) -> Result<PathBuf, String> {
    let out = Command::new(python)
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(VERSION_TIMEOUT, out)
        .await
        .map_err(|_| format!("{} did not answer", python.display()))?
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let real = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !real.is_absolute() || !real.is_file() {
        return Err(format!(
            "{} names its executable {:?}, which is not a file",
            python.display(),
            real
        ));
    }
    Ok(real)
}

/// The first executable file named `name` in `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Installs uv for an agent that has none: `python -m venv <tools_dir>/uv`, then `pip install
/// uv` into it (from the package index pip is configured with), and returns the path of its
/// `bin/uv`. Idempotent: an installed uv that runs `uv --version` is reused. Concurrent-safe
/// across tasks and processes (see the module invariants). Only `bin/uv` is meant to be used:
/// it is a standalone binary, while the venv's other scripts keep the temporary path they were
/// installed under. Bounded by five minutes.
///
/// On error the caller falls back to pip; nothing half-installed is left under `uv`.
pub async fn bootstrap_uv(python: &Path, tools_dir: &Path) -> Result<PathBuf, EnvError> {
    let dir = tools_dir.join(UV_TOOL_DIR);
    let uv = dir.join("bin").join("uv");
    if let Some(version) = uv_version(&uv).await {
        debug!(uv = %uv.display(), %version, "uv already installed");
        return Ok(uv);
    }
    let started = Instant::now();
    let built = tokio::time::timeout(BOOTSTRAP_TIMEOUT, install_uv(python, tools_dir, &dir)).await;
    let version = match built {
        Ok(result) => result?,
        Err(_) => {
            return Err(EnvError::Install {
                installer: "pip",
                status: format!("timed out after {} s", BOOTSTRAP_TIMEOUT.as_secs()),
                output: String::new(),
            });
        }
    };
    info!(
        uv = %uv.display(),
        %version,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "uv installed"
    );
    Ok(uv)
}

/// The installing part of [`bootstrap_uv`]: lock, re-check, build, rename. Returns the version.
async fn install_uv(python: &Path, tools_dir: &Path, dir: &Path) -> Result<String, EnvError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| EnvError::Io { what, path, source }
    };
    tokio::fs::create_dir_all(tools_dir)
        .await
        .map_err(io("cannot create the tools dir", tools_dir))?;
    let lock_path = tools_dir.join(format!("{UV_TOOL_DIR}.lock"));
    let open_path = lock_path.clone();
    // Held until this function returns (closing the file releases the lock).
    let _lock = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&open_path)?;
        f.lock()?;
        Ok::<_, std::io::Error>(f)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r)
    .map_err(io("cannot lock", &lock_path))?;

    let uv = dir.join("bin").join("uv");
    // Someone else may have installed it while we waited for the lock.
    if let Some(version) = uv_version(&uv).await {
        return Ok(version);
    }
    // Under the lock nobody else builds: any temporary dir is a crashed attempt's.
    let tmp_prefix = format!("{UV_TOOL_DIR}.tmp-");
    let mut entries = tokio::fs::read_dir(tools_dir)
        .await
        .map_err(io("cannot list", tools_dir))?;
    while let Ok(Some(e)) = entries.next_entry().await {
        if e.file_name().to_string_lossy().starts_with(&tmp_prefix)
            && let Err(error) = tokio::fs::remove_dir_all(e.path()).await
        {
            warn!(path = %e.path().display(), %error, "cannot remove an interrupted uv install");
        }
    }
    let tmp = tools_dir.join(format!("{tmp_prefix}{}", std::process::id()));
    let out = Output::new(None);
    let mut cmd = Command::new(python);
    cmd.current_dir(tools_dir).args(["-m", "venv"]).arg(&tmp);
    run(cmd, python, &out)
        .await?
        .map_err(|(status, output)| EnvError::Venv {
            installer: "pip",
            status,
            output,
        })?;
    let tmp_python = tmp.join("bin").join("python");
    let mut cmd = Command::new(&tmp_python);
    cmd.current_dir(tools_dir)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_INPUT", "1")
        .env_remove("VIRTUAL_ENV")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-cache-dir",
            "--progress-bar",
            "off",
            "uv",
        ]);
    run(cmd, &tmp_python, &out)
        .await?
        .map_err(|(status, output)| EnvError::Install {
            installer: "pip",
            status,
            output,
        })?;
    let not_running = |path: &Path| EnvError::Install {
        installer: "pip",
        status: "installed, but `uv --version` fails".into(),
        output: path.display().to_string(),
    };
    let tmp_uv = tmp.join("bin").join("uv");
    if uv_version(&tmp_uv).await.is_none() {
        return Err(not_running(&tmp_uv));
    }
    // What is there does not run (checked under the lock): replace it.
    if tokio::fs::symlink_metadata(dir).await.is_ok() {
        tokio::fs::remove_dir_all(dir)
            .await
            .map_err(io("cannot remove a broken uv install", dir))?;
    }
    tokio::fs::rename(&tmp, dir)
        .await
        .map_err(io("cannot move uv into place at", dir))?;
    uv_version(&uv).await.ok_or_else(|| not_running(&uv))
}

/// `uv --version` of the binary at `uv`, or `None` when it is missing or does not run.
async fn uv_version(uv: &Path) -> Option<String> {
    if !uv.is_file() {
        return None;
    }
    let out = Command::new(uv)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(VERSION_TIMEOUT, out)
        .await
        .ok()?
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !version.is_empty()).then_some(version)
}

/// Installer output of one `prepare`: the tail kept for errors, and the optional line sink.
struct Output {
    tail: Mutex<VecDeque<String>>,
    sink: Option<mpsc::Sender<Vec<String>>>,
}

impl Output {
    fn new(sink: Option<mpsc::Sender<Vec<String>>>) -> Arc<Self> {
        Arc::new(Output {
            tail: Mutex::new(VecDeque::new()),
            sink,
        })
    }

    fn push(&self, line: &str) {
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    }

    /// The kept lines, at most [`TAIL_BYTES`] of them from the end.
    fn tail_text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let text = tail.iter().cloned().collect::<Vec<_>>().join("\n");
        if text.len() <= TAIL_BYTES {
            return text;
        }
        let mut start = text.len() - TAIL_BYTES;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("...{}", &text[start..])
    }
}

/// Runs one installer step. `Ok(Err((status, output tail)))` when it ran and failed.
async fn run(
    mut cmd: Command,
    program: &Path,
    out: &Arc<Output>,
) -> Result<Result<(), (String, String)>, EnvError> {
    debug!(program = %program.display(), "installer step started");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| EnvError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    // Earlier steps' lines stay out of this step's error.
    out.tail.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (_, _, status) = tokio::join!(pump(stdout, out), pump(stderr, out), child.wait());
    let status: ExitStatus = status.map_err(|source| EnvError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    if status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err((status.to_string(), out.tail_text())))
    }
}

/// Reads lines (split on `\n` and `\r`) from one pipe into the tail and the sink.
async fn pump(reader: Option<impl AsyncRead + Unpin>, out: &Output) {
    let Some(reader) = reader else { return };
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut sink_open = out.sink.is_some();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<String> = text
            .split(['\n', '\r'])
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if lines.is_empty() {
            continue;
        }
        for l in &lines {
            out.push(l);
        }
        if sink_open && let Some(sink) = &out.sink {
            sink_open = sink.send(lines).await.is_ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines_and_bytes() {
        let out = Output::new(None);
        for i in 0..30 {
            out.push(&format!("line {i}"));
        }
        let t = out.tail_text();
        assert!(t.starts_with("line 10\n"), "{t}");
        assert!(t.ends_with("line 29"), "{t}");
        let out = Output::new(None);
        out.push(&"é".repeat(3000));
        let t = out.tail_text();
        assert!(
            t.len() <= TAIL_BYTES + 3 && t.starts_with("..."),
            "{}",
            t.len()
        );
    }

    #[tokio::test]
    async fn requirement_options_are_rejected_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let b = EnvBuilder::new("/nonexistent/python".into(), None, dir.path().join("c"));
        for bad in ["--index-url=http://x", "six\n--pre", " -e ."] {
            let e = b
                .prepare(dir.path(), &[bad.to_string()], None)
                .await
                .unwrap_err();
            assert!(matches!(e, EnvError::Requirement(_)), "{bad}: {e}");
        }
        assert!(!dir.path().join(VENV_DIR).exists());
    }

    #[tokio::test]
    async fn missing_requirements_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let b = EnvBuilder::new("/nonexistent/python".into(), None, dir.path().join("c"));
        let f = dir.path().join("src/requirements.txt");
        let e = b.prepare(dir.path(), &[], Some(&f)).await.unwrap_err();
        assert!(e.to_string().contains("src/requirements.txt"), "{e}");
    }

    #[test]
    fn explicit_uv_wins_and_installer_reports_it() {
        let b = EnvBuilder::new("python3".into(), Some("/opt/uv".into()), "/tmp/c".into());
        assert_eq!(b.installer(), "uv");
        assert_eq!(b.uv(), Some(Path::new("/opt/uv")));
        assert_eq!(EnvBuilder::pip("python3".into()).uv(), None);
    }
}

fn touch(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now())
}

/// The key of the shared environment a job's requirements give, or `None` when they cannot be
/// shared (they name paths: editable installs, local directories or files). The key covers the
/// interpreter, each requirement, the content of every requirements file (and of the files those
/// include), and, when something is not pinned with `==`, the hour: unpinned requirements are
/// resolved again at most once per [`RERESOLVE`].
fn shared_key(
    python: &Path,
    version: &str,
    requirements: &[String],
    files: &[PathBuf],
    now: SystemTime,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("runyard-env-v1\n{}\n{version}\n", python.display()));
    let mut pinned = true;
    let mut lines: Vec<String> = requirements.to_vec();
    let mut pending: Vec<(PathBuf, usize)> = files.iter().map(|f| (f.clone(), 0)).collect();
    while let Some((file, depth)) = pending.pop() {
        if depth > 8 {
            return None;
        }
        let text = std::fs::read_to_string(&file).ok()?;
        // The content counts, not where the file is (every attempt has its own directory).
        h.update(b"file\n");
        for raw in text.lines() {
            let line = raw.split(" #").next().unwrap_or(raw).trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let nested = ["-r", "-c", "--requirement", "--constraint"]
                .iter()
                .find_map(|f| line.strip_prefix(f).filter(|r| r.starts_with([' ', '='])));
            if let Some(rest) = nested {
                let target = rest.trim_start_matches('=').trim();
                let path = file.parent().unwrap_or(Path::new("/")).join(target);
                pending.push((path, depth + 1));
                continue;
            }
            lines.push(line.to_string());
        }
    }
    for line in &lines {
        let local = line.starts_with("-e")
            || line.starts_with("--editable")
            || line.starts_with('.')
            || line.starts_with('/')
            || line.starts_with("file:")
            || line.contains("@ file:");
        if local {
            return None;
        }
        if !line.starts_with('-') && !line.contains("==") {
            pinned = false;
        }
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    if !pinned {
        let hour = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / RERESOLVE.as_secs();
        h.update(format!("resolved in period {hour}\n"));
    }
    Some(hex::encode(h.finalize()))
}

#[cfg(test)]
mod shared_tests {
    use super::*;

    #[test]
    fn keys_follow_requirements_and_files_and_unpinned_ones_expire_each_period() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.txt");
        let nested = dir.path().join("more.txt");
        std::fs::write(&file, "numpy==2.0.0\n-r more.txt\n").unwrap();
        std::fs::write(&nested, "six==1.16.0  # pinned\n").unwrap();
        let py = Path::new("/usr/bin/python3");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 * 3600);
        let later = t0 + RERESOLVE;
        let key = |reqs: &[&str], files: &[PathBuf], now| {
            let reqs: Vec<String> = reqs.iter().map(|s| s.to_string()).collect();
            shared_key(py, "3.11.7", &reqs, files, now)
        };
        let pinned = key(&["a==1"], std::slice::from_ref(&file), t0).unwrap();
        assert_eq!(
            key(&["a==1"], std::slice::from_ref(&file), later),
            Some(pinned.clone())
        );
        assert_ne!(
            key(&["a==2"], std::slice::from_ref(&file), t0),
            Some(pinned.clone())
        );
        std::fs::write(&nested, "six==1.17.0\n").unwrap();
        assert_ne!(
            key(&["a==1"], std::slice::from_ref(&file), t0),
            Some(pinned.clone()),
            "a nested file's content counts"
        );
        assert_ne!(
            key(&["a"], &[], t0),
            key(&["a"], &[], later),
            "unpinned: resolved again"
        );
        assert_eq!(
            key(&["a"], &[], t0),
            key(&["a"], &[], t0 + Duration::from_secs(1)),
            "within one period: the same"
        );
        assert_ne!(
            shared_key(py, "3.12.1", &["a==1".into()], &[], t0),
            key(&["a==1"], &[], t0)
        );
        let elsewhere = dir.path().join("sub");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::copy(&file, elsewhere.join("r.txt")).unwrap();
        std::fs::copy(&nested, elsewhere.join("more.txt")).unwrap();
        assert_eq!(
            key(&["a==1"], &[elsewhere.join("r.txt")], t0),
            key(&["a==1"], std::slice::from_ref(&file), t0),
            "the same contents in another attempt's directory: the same environment"
        );
        std::fs::write(&nested, "-e .\n").unwrap();
        assert_eq!(
            key(&["a==1"], std::slice::from_ref(&file), t0),
            None,
            "editable: not shared"
        );
        assert_eq!(key(&[], &[dir.path().join("missing.txt")], t0), None);
    }
}
