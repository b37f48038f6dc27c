//! Harness for tests of the built `runyard` binary: one temp HOME per test, free loopback ports,
//! long-running processes whose stdout and stderr go to files, client commands with a deadline,
//! and /proc scans for the job processes agents start.
//!
//! Invariants: every process a test starts through a `Proc` is SIGKILLed and reaped when the
//! `Proc` drops; when the `Sandbox` drops, every job process marked (`RUNYARD_AGENT=`) with a path
//! inside the sandbox is SIGKILLed too, so nothing outlives a test, passing or panicking. On a
//! panic the sandbox prints every log file it holds, so a failure shows what the servers said.

#![allow(dead_code)] // Each test binary that includes this module uses a different part of it.

use std::fmt;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Client commands (`submit`, `ls`, ...) must finish within this.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(30);
/// Environment entry naming the agent that started a job process (see `runyard_agent::reaper`).
pub const AGENT_MARK: &str = "RUNYARD_AGENT=";
/// Environment entry naming the attempt a job process belongs to.
pub const ATTEMPT_MARK: &str = "RUNYARD_ATTEMPT=";
/// Pause between two polls of `eventually`.
const POLL: Duration = Duration::from_millis(100);

/// A free port on 127.0.0.1: bound to port 0, read, released.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Polls `f` every 100 ms until it returns `Some`; panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// One test's world: a temp dir used as HOME that also holds data dirs and log files, and the
/// environment client commands run with.
pub struct Sandbox {
    dir: tempfile::TempDir,
    /// `dir`, canonical: agents mark their job processes with their canonical data dir.
    canonical: PathBuf,
    client_env: Vec<(String, String)>,
    /// Numbers log files so a restarted process keeps its predecessor's logs.
    spawned: usize,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        // Jobs run under their own uid when the tests run as root: they pass through this dir
        // to their agent's data dir below it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("traversable temp dir");
        }
        let canonical = std::fs::canonicalize(dir.path()).expect("canonical temp dir");
        for sub in ["logs", "client"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("log dirs");
        }
        Sandbox {
            dir,
            canonical,
            client_env: Vec::new(),
            spawned: 0,
        }
    }

    /// The temp dir (HOME of every process started here).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Sets an environment variable for the client commands run after this.
    pub fn set_client_env(&mut self, key: &str, value: &str) {
        self.client_env.retain(|(k, _)| k != key);
        self.client_env.push((key.to_string(), value.to_string()));
    }

    /// Unsets an environment variable for the client commands run after this.
    pub fn remove_client_env(&mut self, key: &str) {
        self.client_env.retain(|(k, _)| k != key);
    }

    /// `runyard` with a clean environment: HOME is the sandbox, PATH the test's (jobs find
    /// `python3` on it), nothing else.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_runyard"));
        c.args(args)
            .env_clear()
            .env("HOME", self.path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(self.path())
            .stdin(Stdio::null());
        c
    }

    /// Fresh stdout/stderr files for a process called `name`: in `logs/` (printed when the test
    /// fails) for background processes, in `client/` for client commands (whose output the
    /// assertions show).
    fn log_files(&mut self, name: &str, background: bool) -> (PathBuf, PathBuf) {
        self.spawned += 1;
        let dir = self.path().join(if background { "logs" } else { "client" });
        let base = dir.join(format!("{:03}-{name}", self.spawned));
        (base.with_extension("stdout"), base.with_extension("stderr"))
    }

    /// Starts a long-running `runyard` process (server or follower) in the background.
    pub fn spawn(&mut self, name: &str, args: &[&str]) -> Proc {
        self.spawn_with_env(name, args, false, true)
    }

    /// Like `spawn`, with the client environment (`RUNYARD_CONTROLLER`, `RUNYARD_TOKEN`).
    pub fn spawn_client(&mut self, name: &str, args: &[&str]) -> Proc {
        self.spawn_with_env(name, args, true, true)
    }

    /// Starts a long-running `runyard` process inside network namespace `netns` (`ip netns
    /// exec`, which execs it: the process is `runyard` itself).
    pub fn spawn_in_netns(&mut self, name: &str, netns: &str, args: &[&str]) -> Proc {
        let plain = self.command(args);
        // The same clean environment and directory as `command` gives, under `ip netns exec`.
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_runyard")])
            .args(args)
            .env_clear()
            .envs(plain.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .current_dir(self.path())
            .stdin(Stdio::null());
        self.start(name, c, args, true)
    }

    fn spawn_with_env(
        &mut self,
        name: &str,
        args: &[&str],
        client: bool,
        background: bool,
    ) -> Proc {
        let mut c = self.command(args);
        if client {
            c.envs(self.client_env.iter().map(|(k, v)| (k, v)));
        }
        self.start(name, c, args, background)
    }

    /// Runs `c` with its output in fresh log files.
    fn start(&mut self, name: &str, mut c: Command, args: &[&str], background: bool) -> Proc {
        let (out, err) = self.log_files(name, background);
        let child = c
            .stdout(File::create(&out).expect("stdout file"))
            .stderr(File::create(&err).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start runyard {args:?}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            stdout: out,
            stderr: err,
            exited: None,
        }
    }

    /// Runs a client command to completion (at most `CLIENT_DEADLINE`).
    pub fn run(&mut self, args: &[&str]) -> Run {
        let mut p = self.spawn_with_env(args.first().unwrap_or(&"runyard"), args, true, false);
        let status = p.wait_exit(CLIENT_DEADLINE).unwrap_or_else(|| {
            panic!(
                "runyard {args:?} did not finish within {CLIENT_DEADLINE:?}; stderr:\n{}",
                p.stderr()
            )
        });
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: status.code(),
            stdout: p.stdout(),
            stderr: p.stderr(),
        }
    }

    /// Runs a client command that must exit 0; returns its stdout.
    pub fn ok(&mut self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "{r}");
        r.stdout
    }

    /// `runyard status --json ID`, parsed.
    pub fn job(&mut self, id: &str) -> serde_json::Value {
        let out = self.ok(&["status", "--json", id]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
    }

    /// The job (`status --json`) once its status is one of `wanted`; panics after `timeout`
    /// showing the job as last seen.
    pub fn wait_status(
        &mut self,
        id: &str,
        wanted: &[&str],
        timeout: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if wanted.contains(&job["status"].as_str().unwrap_or_default()) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for job {id} to be {wanted:?}; last seen:\n{job:#}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Live (not zombie) processes whose environment holds `entry` exactly, e.g.
    /// `RUNYARD_AGENT=a1@/tmp/.../a1`.
    pub fn processes_with(&self, entry: &str) -> Vec<i32> {
        live_processes(|environ| environ.contains(&entry.as_bytes()))
    }

    /// The canonical form of a path inside the sandbox (as agents record their data dir).
    pub fn canonical(&self, p: &Path) -> PathBuf {
        let rel = p.strip_prefix(self.path()).unwrap_or(p);
        self.canonical.join(rel)
    }

    /// Job processes started by any agent whose data dir is inside this sandbox.
    fn marked_processes(&self) -> Vec<i32> {
        let needle = self.canonical.display().to_string();
        live_processes(|environ| {
            environ.iter().any(|e| {
                e.strip_prefix(AGENT_MARK.as_bytes())
                    .is_some_and(|v| String::from_utf8_lossy(v).contains(&needle))
            })
        })
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Orphaned job processes of killed agents: nothing else would end them.
        for _ in 0..50 {
            let left = self.marked_processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                signal(pid, "KILL");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            print_logs(&self.path().join("logs"));
        }
    }
}

/// Prints every log file of a failed test to stderr (the test harness shows it).
fn print_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        if !text.trim().is_empty() {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            eprintln!("──── {name} ────\n{text}");
        }
    }
}

/// The outcome of a client command.
pub struct Run {
    pub args: Vec<String>,
    /// `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "runyard {:?} exited {:?}\n── stdout ──\n{}\n── stderr ──\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// A `runyard` process running in the background, SIGKILLed and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`).
    pub fn signal(&self, name: &str) {
        if self.exited.is_none() {
            signal(self.pid(), name);
        }
    }

    /// Its exit status once it exits, or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kill -<name> <pid>`; a process already gone is not an error.
fn signal(pid: i32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Pids of live (not zombie, not dead) processes whose environment entries satisfy `pick`.
fn live_processes(pick: impl Fn(&[&[u8]]) -> bool) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let entries: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if pick(&entries) && is_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether the process exists and is neither a zombie nor dead (state after the `comm` field).
fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}
