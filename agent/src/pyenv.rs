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
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Name of the venv directory inside a job directory.
pub const VENV_DIR: &str = "venv";
/// File the spec's requirements are written to inside a job directory.
pub const REQUIREMENTS_FILE: &str = "requirements.runyard.txt";
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
        }
    }

    /// A builder that always uses `python -m venv` and pip, even when uv is available.
    pub fn pip(python: PathBuf) -> Self {
        EnvBuilder {
            python,
            uv: None,
            cache_dir: PathBuf::new(),
            version: Arc::default(),
        }
    }

    /// The uv binary environments are built with, if any (also what cache sweeps prune with).
    pub fn uv(&self) -> Option<&Path> {
        self.uv.as_deref()
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
        let out = Output::new(sink);

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
        info!(
            installer = self.installer(),
            venv = %venv.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "environment ready"
        );
        Ok(venv_python)
    }

    /// The pinned package set of an environment `prepare` returned (`name==version` lines).
    pub async fn freeze(&self, python: &Path, job_dir: &Path) -> Result<Vec<String>, EnvError> {
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
