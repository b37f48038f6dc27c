//! Runs one attempt's job process, captures its output as lines, and guarantees that nothing of
//! the attempt outlives `wait` or `stop`.
//!
//! ```text
//! spawn ─▶ running ──(main process exits)──▶ leftovers: SIGTERM, 2 s, SIGKILL ─┐
//!             │                                                              ├─▶ reap ─▶ drain output ─▶ done
//!             └──(stop(grace))──▶ SIGTERM group + marked, grace, SIGKILL ───┘
//! ```
//!
//! Invariants:
//! - Started without a shell, in its own process group, stdin on /dev/null, with exactly the
//!   caller's environment plus `PYTHONUNBUFFERED=1`, `RUNYARD_ATTEMPT=<marker>` and
//!   `RUNYARD_AGENT=<name>`, which every descendant inherits (see `reaper`).
//! - Between fork and exec, in this order: the process writes its pid into its cgroup (as root,
//!   so nothing of the job ever runs outside it), then (isolated jobs) drops every supplementary
//!   group, takes the job's gid and uid, sets no-new-privileges (a setuid binary cannot raise it
//!   again) and, under a per-attempt uid, SIGKILLs every other process of that uid (leftovers).
//! - With a cgroup, nothing of the attempt outlives `wait` or `stop` however it left its group
//!   and environment: the kill round freezes and kills the whole cgroup; `finish` removes it.
//! - stdout and stderr are the same pipe, so lines keep the order in which the process wrote them.
//! - The main process is reaped only after every other process of the attempt is gone: while it
//!   is an unreaped zombie its pid, hence its process group id, cannot be reused, so `killpg` can
//!   never hit a stranger's group.
//! - `wait` and `stop` return only after every line read from the pipe has been sent to the
//!   caller's channel; the pipe gets at most `EOF_TIMEOUT` to close once the processes are gone.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cgroup::AttemptCgroup;
use crate::identity::RunAs;
use crate::reaper::{AGENT_VAR, ATTEMPT_VAR, Tracker};

pub use crate::reaper::{become_subreaper, sweep_agent};

/// Bytes asked for per read of the output pipe; one read gives one batch of lines.
const READ_BUF: usize = 64 * 1024;
/// Lines longer than this many bytes are split.
pub const MAX_LINE: usize = 64 * 1024;
/// At most one progress-bar redraw per this interval is kept in the log.
pub const REDRAW_INTERVAL: Duration = Duration::from_secs(1);
/// Grace given to leftovers after the main process exited on its own.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);
/// How long the output pipe may stay open once every process of the attempt is gone (a process
/// that escaped tracking may still hold it).
const EOF_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a running attempt's processes are recorded (so orphans that die later are reaped).
const RECORD_INTERVAL: Duration = Duration::from_secs(2);
/// How often liveness is polled during a grace period, and exit when there is no pidfd.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What to run for one attempt.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// The executable (usually the venv's python); looked up on the given `PATH` if bare.
    pub program: PathBuf,
    /// Arguments, passed verbatim (no shell).
    pub args: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The complete environment; nothing is inherited from the agent.
    pub env: Vec<(String, String)>,
    /// Unique per attempt, e.g. `"<job id>/3"`; becomes `RUNYARD_ATTEMPT`.
    pub marker: String,
    /// The agent's name; becomes `RUNYARD_AGENT`.
    pub agent_name: String,
    /// The identity to switch to before exec; `None`: the agent's own.
    pub run_as: Option<RunAs>,
    /// The attempt's cgroup, joined before exec and removed by `finish`.
    pub cgroup: Option<Arc<AttemptCgroup>>,
}

/// Why a job process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A spec field is unusable.
    #[error("invalid process spec: {field} {reason}")]
    InvalidSpec {
        field: &'static str,
        reason: &'static str,
    },
    /// The output pipe could not be set up.
    #[error("cannot create output pipe: {0}")]
    Pipe(#[source] io::Error),
    /// The attempt's cgroup could not be opened.
    #[error("cannot join the job's cgroup: {0}")]
    Cgroup(#[source] io::Error),
    /// fork/exec failed: missing program, missing working directory, permissions.
    #[error("cannot start {program} in {cwd}: {source}")]
    Exec {
        program: PathBuf,
        cwd: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How the main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Exited on its own with this code.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
    /// Its status was taken by someone else's `waitpid(-1)`; should not happen.
    Lost,
}

impl ExitOutcome {
    /// Exited with code 0.
    pub fn success(self) -> bool {
        self == ExitOutcome::Exited(0)
    }
}

impl fmt::Display for ExitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitOutcome::Exited(code) => write!(f, "exited with code {code}"),
            ExitOutcome::Signaled(number) => match Signal::try_from(number) {
                Ok(signal) => write!(f, "killed by signal {number} ({})", signal.as_str()),
                Err(_) => write!(f, "killed by signal {number}"),
            },
            ExitOutcome::Lost => f.write_str("exit status lost (reaped elsewhere)"),
        }
    }
}

/// How we learn that the main process exited, without reaping it.
enum ExitWatch {
    /// A pidfd: readable once the process has exited.
    Pidfd(AsyncFd<OwnedFd>),
    /// Kernels without `pidfd_open` (before 5.3): poll `waitid`.
    Poll,
}

/// A running attempt: its main process, every process that carries its marker, and the task
/// that turns their output into lines. Dropping it unfinished SIGKILLs everything of the
/// attempt in the background.
pub struct JobProcess {
    pid: i32,
    marker: String,
    tracker: Arc<Tracker>,
    exit_watch: ExitWatch,
    record_tick: Interval,
    /// The main process has exited with this status (it may still be an unreaped zombie).
    main_exit: Option<ExitOutcome>,
    /// The main process has been reaped: its pid no longer pins the process group id.
    main_reaped: bool,
    reader: Option<JoinHandle<()>>,
    /// Fired by the reader when the pipe reached EOF (or reading was stopped).
    output_closed: CancellationToken,
    /// Tells the reader to stop reading (the pipe stayed open too long).
    stop_reading: CancellationToken,
    /// Everything is over: the final outcome.
    outcome: Option<ExitOutcome>,
    cgroup: Option<Arc<AttemptCgroup>>,
    /// The kernel killed a process of the attempt for going over its memory limit.
    oom_killed: bool,
}

impl JobProcess {
    /// Starts the process and the task that sends its output, one batch of lines per read, to
    /// `lines`. The receiver must be drained concurrently with `wait`/`stop`: they return only
    /// once every line was sent. If the receiver is dropped, output is read and discarded so the
    /// process never blocks on a full pipe. Must be called inside a tokio runtime.
    pub fn spawn(
        spec: ProcessSpec,
        lines: mpsc::Sender<Vec<String>>,
    ) -> Result<JobProcess, SpawnError> {
        if spec.marker.is_empty() {
            return Err(SpawnError::InvalidSpec {
                field: "marker",
                reason: "must not be empty",
            });
        }
        if spec.agent_name.is_empty() {
            return Err(SpawnError::InvalidSpec {
                field: "agent_name",
                reason: "must not be empty",
            });
        }
        // Both ends are close-on-exec: no other child of this process inherits them. The write
        // end becomes fd 1 and 2 of the job only.
        let (read_end, write_end) = io::pipe().map_err(SpawnError::Pipe)?;
        let write_end_err = write_end.try_clone().map_err(SpawnError::Pipe)?;
        let output =
            pipe::Receiver::from_owned_fd(OwnedFd::from(read_end)).map_err(SpawnError::Pipe)?;

        let mut command = std::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("PYTHONUNBUFFERED", "1")
            .env(ATTEMPT_VAR, &spec.marker)
            .env(AGENT_VAR, &spec.agent_name)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(write_end_err))
            .process_group(0);
        // Open in this process, written in the child: the files close at exec (O_CLOEXEC).
        let procs = match &spec.cgroup {
            Some(cg) => cg.procs_files().map_err(SpawnError::Cgroup)?,
            None => Vec::new(),
        };
        let procs_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let run_as = spec.run_as;
        if !procs_fds.is_empty() || run_as.is_some() {
            // SAFETY: the closure runs in the child between fork and exec and calls only
            // async-signal-safe functions (getpid, write, setgroups, setgid, setuid, prctl,
            // kill); it allocates nothing (the fd list was built before the fork).
            unsafe {
                command.pre_exec(move || enter(&procs_fds, run_as));
            }
        }
        let child = command.spawn().map_err(|source| SpawnError::Exec {
            program: spec.program.clone(),
            cwd: spec.cwd.clone(),
            source,
        })?;
        // Close our copies of the write end now: EOF must mean the job's processes closed theirs.
        drop(command);
        drop(procs);
        // The std handle is not used to wait: the main process is reaped by hand, late (see the
        // module invariants). Dropping it neither kills nor reaps.
        let pid = child.id() as i32;
        drop(child);

        let exit_watch = match open_pidfd(pid).and_then(watch_pidfd) {
            Ok(fd) => ExitWatch::Pidfd(fd),
            Err(error) => {
                debug!(%error, "no pidfd; polling for job process exit");
                ExitWatch::Poll
            }
        };
        let mut record_tick =
            tokio::time::interval_at(Instant::now() + RECORD_INTERVAL, RECORD_INTERVAL);
        record_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

        let output_closed = CancellationToken::new();
        let stop_reading = CancellationToken::new();
        let reader = tokio::spawn(
            read_output(output, lines, output_closed.clone(), stop_reading.clone())
                .instrument(info_span!("job_output", attempt = %spec.marker, pid)),
        );
        info!(attempt = %spec.marker, pid, program = %spec.program.display(), "job process started");
        Ok(JobProcess {
            pid,
            tracker: Arc::new(
                Tracker::new(ATTEMPT_VAR, &spec.marker).with_cgroup(spec.cgroup.clone()),
            ),
            marker: spec.marker,
            exit_watch,
            record_tick,
            main_exit: None,
            main_reaped: false,
            reader: Some(reader),
            output_closed,
            stop_reading,
            outcome: None,
            cgroup: spec.cgroup,
            oom_killed: false,
        })
    }

    /// Whether the kernel killed a process of the attempt for going over its memory limit;
    /// known once `wait` or `stop` returned.
    pub fn oom_killed(&self) -> bool {
        self.oom_killed
    }

    /// The main process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for the main process to exit, then terminates what is left of the attempt
    /// (SIGTERM, 2 s, SIGKILL), reaps, and waits (at most 5 s) for the output pipe to close, so
    /// every line has been sent before this returns. Cancel-safe: after a drop midway, `stop`
    /// or `wait` resumes. Once finished, returns the same outcome at once.
    pub async fn wait(&mut self) -> ExitOutcome {
        if let Some(outcome) = self.outcome {
            return outcome;
        }
        self.main_exited().await;
        self.finish(LEFTOVER_GRACE).await
    }

    /// Sends SIGTERM (and SIGCONT) to the process group and every marked process, waits up to
    /// `grace` for all of them to exit, SIGKILLs the rest until a scan finds none, then finishes
    /// as `wait` does. Returns within about `grace` plus the kill and reap rounds.
    pub async fn stop(&mut self, grace: Duration) -> ExitOutcome {
        if let Some(outcome) = self.outcome {
            return outcome;
        }
        info!(attempt = %self.marker, pid = self.pid, grace = ?grace, "stopping job process");
        self.terminate(grace).await;
        self.finish(grace).await
    }

    /// The process group id while it is pinned by the unreaped main process.
    fn group(&self) -> Option<i32> {
        (!self.main_reaped).then_some(self.pid)
    }

    /// Waits until the main process has exited (without reaping it), recording the attempt's
    /// processes every `RECORD_INTERVAL` meanwhile.
    async fn main_exited(&mut self) -> ExitOutcome {
        let mut woken = false;
        loop {
            if let Some(outcome) = self.main_exit {
                return outcome;
            }
            if let Some(outcome) = peek_exit(self.pid) {
                self.main_exit = Some(outcome);
                return outcome;
            }
            if woken {
                // A pidfd said "exited" but waitid disagrees; never spin on that.
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            tokio::select! {
                pidfd_ready = exit_signalled(&self.exit_watch) => woken = pidfd_ready,
                _ = self.record_tick.tick() => self.record().await,
            }
        }
    }

    /// Records the attempt's live processes and reaps orphans of it that died meanwhile.
    async fn record(&self) {
        let tracker = Arc::clone(&self.tracker);
        let group = self.group();
        let pid = self.pid;
        blocking(move || {
            tracker.scan(group);
            tracker.reap(Some(pid));
        })
        .await;
    }

    /// SIGTERM + SIGCONT to everything of the attempt, up to `grace` for it to go, then SIGKILL
    /// until a scan finds nothing. Returns at once if nothing is alive.
    async fn terminate(&mut self, grace: Duration) {
        let group = self.group();
        let tracker = Arc::clone(&self.tracker);
        let live =
            blocking(move || tracker.signal_all(group, &[Signal::SIGTERM, Signal::SIGCONT])).await;
        if live == 0 {
            return;
        }
        debug!(attempt = %self.marker, live, "job processes sent SIGTERM");
        let deadline = Instant::now() + grace;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
            let tracker = Arc::clone(&self.tracker);
            if blocking(move || tracker.scan(group)).await.is_empty() {
                return;
            }
        }
        let tracker = Arc::clone(&self.tracker);
        let remaining = blocking(move || tracker.kill_until_gone(group)).await;
        info!(attempt = %self.marker, "job processes killed after grace");
        if remaining > 0 {
            warn!(attempt = %self.marker, remaining, "job processes survived SIGKILL");
        }
    }

    /// Leftovers, reaping, output drain; records and returns the outcome.
    async fn finish(&mut self, grace: Duration) -> ExitOutcome {
        self.terminate(grace).await;
        let main = self.main_exited().await;
        if !self.main_reaped {
            reap_main(self.pid);
            self.main_reaped = true;
        }
        let tracker = Arc::clone(&self.tracker);
        let pid = self.pid;
        let pending = blocking(move || tracker.settle(Some(pid))).await;
        if pending > 0 {
            warn!(attempt = %self.marker, pending, "job processes still not reaped");
        }
        if let Some(cgroup) = self.cgroup.take() {
            let (oom, removed) = blocking(move || {
                // Anything left (a process that escaped every scan) dies with the cgroup.
                if !cgroup.is_empty() {
                    cgroup.kill(|_| {});
                }
                (
                    cgroup.oom_killed(),
                    cgroup.remove().err().map(|e| e.to_string()),
                )
            })
            .await;
            self.oom_killed = oom;
            if let Some(error) = removed {
                warn!(attempt = %self.marker, %error, "cannot remove the job's cgroup");
            }
        }
        self.drain_output().await;
        self.outcome = Some(main);
        info!(attempt = %self.marker, outcome = %main, "job process finished");
        main
    }

    /// Waits for the pipe to close (bounded), then for the reader to send its last lines.
    async fn drain_output(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        let closed = tokio::time::timeout(EOF_TIMEOUT, self.output_closed.cancelled()).await;
        if closed.is_err() {
            warn!(attempt = %self.marker, "job output still open after its processes ended");
            self.stop_reading.cancel();
        }
        if let Err(error) = reader.await
            && error.is_panic()
        {
            std::panic::resume_unwind(error.into_panic());
        }
        self.reader = None;
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        self.stop_reading.cancel();
        let group = self.group();
        if let Some(group) = group {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group), Signal::SIGKILL);
        }
        let tracker = Arc::clone(&self.tracker);
        let pid = self.pid;
        let reaped = self.main_reaped;
        let cgroup = self.cgroup.take();
        // A plain thread, not spawn_blocking: a drop may happen while the runtime shuts down,
        // when blocking tasks are no longer started.
        let cleanup = std::thread::Builder::new()
            .name("runyard-job-cleanup".into())
            .spawn(move || {
                tracker.kill_until_gone(group);
                if !reaped {
                    let mut status = 0;
                    // SAFETY: waitpid on our own unreaped child with a valid out-pointer; it has
                    // been SIGKILLed, so this returns promptly.
                    while unsafe { libc::waitpid(pid, &mut status, 0) } == -1
                        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                    {
                    }
                }
                tracker.settle(Some(pid));
                if let Some(cgroup) = cgroup {
                    let _ = cgroup.remove();
                }
            });
        if let Err(error) = cleanup {
            warn!(attempt = %self.marker, %error, "cannot start job cleanup thread");
        }
    }
}

/// Runs blocking /proc work off the async threads. A panic inside is re-raised; a runtime that
/// shuts down yields `T::default()`.
async fn blocking<T, F>(f: F) -> T
where
    T: Default + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => T::default(),
    }
}

/// In the child, before exec: joins the cgroup, then drops to the job's identity (see the
/// module invariants). Async-signal-safe only.
fn enter(procs: &[RawFd], run_as: Option<RunAs>) -> io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut buf = [0u8; 12];
    let digits = format_pid(pid, &mut buf);
    for &fd in procs {
        // SAFETY: fd is open (the parent keeps the file until spawn returns); digits is valid.
        if unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let Some(id) = run_as else { return Ok(()) };
    let groups = [id.gid as libc::gid_t];
    // SAFETY: plain system calls on values; `groups` outlives the call.
    unsafe {
        if libc::setgroups(1, groups.as_ptr()) != 0
            || libc::setgid(id.gid) != 0
            || libc::setuid(id.uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if id.sweep {
            // Every other process of this uid: leftovers of an earlier holder (ESRCH: none).
            libc::kill(-1, libc::SIGKILL);
        }
    }
    Ok(())
}

/// Writes `pid` in decimal into `buf` without allocating; returns the digits.
fn format_pid(pid: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut n = pid.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn open_pidfd(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new close-on-exec fd or -1. The pid
    // is our unreaped child, so it names that process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn watch_pidfd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and always returns the same fd until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Resolves when the exit watch may have something to say; true if a pidfd reported an exit.
async fn exit_signalled(watch: &ExitWatch) -> bool {
    match watch {
        // The guard is dropped without clearing readiness: an exit is forever.
        ExitWatch::Pidfd(fd) => match fd.readable().await {
            Ok(_) => true,
            Err(_) => {
                tokio::time::sleep(POLL_INTERVAL).await;
                false
            }
        },
        ExitWatch::Poll => {
            tokio::time::sleep(POLL_INTERVAL).await;
            false
        }
    }
}

/// The main process's exit status if it has exited, without reaping it (`WNOWAIT`).
fn peek_exit(pid: i32) -> Option<ExitOutcome> {
    loop {
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid out-pointer; WNOHANG never blocks.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        if result == -1 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Some(ExitOutcome::Lost);
        }
        // SAFETY: waitid filled a SIGCHLD siginfo (or left it zeroed: si_pid 0, still running).
        let (child, status) = unsafe { (info.si_pid(), info.si_status()) };
        if child == 0 {
            return None;
        }
        return Some(match info.si_code {
            libc::CLD_EXITED => ExitOutcome::Exited(status),
            libc::CLD_KILLED | libc::CLD_DUMPED => ExitOutcome::Signaled(status),
            _ => ExitOutcome::Lost,
        });
    }
}

/// Reaps the main process, whose status `peek_exit` already took.
fn reap_main(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on our own exited child with a valid out-pointer; WNOHANG never blocks.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Reads the job's output pipe until EOF (or `stop`), sending one batch of lines per read.
async fn read_output(
    mut output: pipe::Receiver,
    lines: mpsc::Sender<Vec<String>>,
    closed: CancellationToken,
    stop: CancellationToken,
) {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; READ_BUF];
    let mut deliver = true;
    loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = output.read(&mut buf) => read,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                warn!(%error, "cannot read job output");
                break;
            }
        };
        let batch = splitter.push(&buf[..n]);
        if deliver && !batch.is_empty() && lines.send(batch).await.is_err() {
            debug!("job output receiver gone; discarding output");
            deliver = false;
        }
    }
    closed.cancel();
    if let Some(last) = splitter.finish()
        && deliver
    {
        let _ = lines.send(vec![last]).await;
    }
}

/// Splits a byte stream into lines: a break is `\n`, `\r` or `\r\n`; invalid UTF-8 becomes
/// U+FFFD; lines longer than `MAX_LINE` bytes are cut (at a character boundary when possible).
/// Empty lines ended by `\n` are kept (`print()` is a line); an empty segment ended by a lone
/// `\r` is not a line: tqdm starts every update with `\r`, which would otherwise put a blank
/// line before each bar.
///
/// Redraws (lines ended by a lone `\r`, as progress bars print them) are coalesced: at most one
/// per `REDRAW_INTERVAL` is kept, the others are replaced by the next redraw, and a pending
/// redraw is dropped when a `\n` line follows (that line overwrote it on a terminal too). A
/// three-epoch tqdm run prints hundreds of KB of redraws; its log keeps a few lines a second.
#[derive(Debug, Default)]
struct LineSplitter {
    /// The latest redraw not emitted yet.
    held: Option<String>,
    /// When a redraw was last emitted.
    last_redraw: Option<std::time::Instant>,
    /// Bytes of a line whose break has not arrived yet.
    partial: Vec<u8>,
    /// The last byte was a `\r`: `Some(true)` if it ended a non-empty line (a `\n` right after
    /// is the rest of that `\r\n` break), `Some(false)` if it ended nothing (a `\n` right after
    /// makes an empty `\r\n` line).
    after_cr: Option<bool>,
}

impl LineSplitter {
    /// Feeds bytes; returns the lines they complete.
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        // Validate the whole read once (the common case: all of it is UTF-8) instead of per
        // line; lines inside the valid prefix are then copied without another check.
        let text = match std::str::from_utf8(data) {
            Ok(text) => text,
            Err(error) => std::str::from_utf8(&data[..error.valid_up_to()]).unwrap_or(""),
        };
        // Sized up front: growing it would reallocate a large block several times per read.
        let mut out = Vec::new();
        let mut start = 0;
        for end in memchr::memchr2_iter(b'\n', b'\r', data) {
            let (segment, is_cr) = (start..end, data[end] == b'\r');
            start = end + 1;
            let empty = segment.is_empty() && self.partial.is_empty();
            if is_cr {
                if empty {
                    self.after_cr = Some(false);
                } else {
                    let mut redraw = Vec::with_capacity(1);
                    self.emit(data, text, segment, &mut redraw);
                    self.redraw(redraw, &mut out);
                    self.after_cr = Some(true);
                }
            } else {
                let rest_of_crlf = empty && self.after_cr == Some(true);
                if rest_of_crlf {
                    // `\r\n`: the held line was an ordinary line after all.
                    out.extend(self.held.take());
                } else {
                    self.held = None;
                    self.emit(data, text, segment, &mut out);
                }
                self.after_cr = None;
            }
        }
        if start < data.len() {
            self.after_cr = None;
            self.partial.extend_from_slice(&data[start..]);
            self.cut_long(&mut out);
        }
        out
    }

    /// Emits a redraw, or holds it if one was emitted less than `REDRAW_INTERVAL` ago.
    fn redraw(&mut self, mut lines: Vec<String>, out: &mut Vec<String>) {
        let now = std::time::Instant::now();
        let Some(last) = lines.pop() else { return };
        // Parts of an overlong redraw are plain lines.
        out.append(&mut lines);
        if self
            .last_redraw
            .is_none_or(|t| now.duration_since(t) >= REDRAW_INTERVAL)
        {
            self.held = None;
            self.last_redraw = Some(now);
            out.push(last);
        } else {
            self.held = Some(last);
        }
    }

    /// The unfinished last line (or the last held redraw), at end of stream.
    fn finish(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return self.held.take();
        }
        let line = decode(&self.partial);
        self.partial.clear();
        Some(line)
    }

    /// Emits `partial + data[segment]` as one line (or several, if too long). `text` is the
    /// valid UTF-8 prefix of `data`.
    fn emit(
        &mut self,
        data: &[u8],
        text: &str,
        segment: std::ops::Range<usize>,
        out: &mut Vec<String>,
    ) {
        if self.partial.is_empty() && segment.len() <= MAX_LINE {
            // Breaks are ASCII, so a segment inside the valid prefix is on char boundaries.
            out.push(match text.get(segment.clone()) {
                Some(line) => line.to_owned(),
                None => decode(&data[segment]),
            });
            return;
        }
        self.partial.extend_from_slice(&data[segment]);
        self.cut_long(out);
        out.push(decode(&self.partial));
        self.partial.clear();
    }

    /// Moves `MAX_LINE`-sized lines out of `partial` while it is longer than that.
    fn cut_long(&mut self, out: &mut Vec<String>) {
        while self.partial.len() > MAX_LINE {
            let cut = char_boundary(&self.partial, MAX_LINE);
            out.push(decode(&self.partial[..cut]));
            self.partial.drain(..cut);
        }
    }
}

/// A cut point at or up to 3 bytes before `max` that does not split a UTF-8 sequence; `max`
/// itself if the bytes there are not UTF-8 anyway. Requires `bytes.len() > max`.
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    (max - 3..=max)
        .rev()
        .find(|&cut| !is_continuation(bytes[cut]))
        .unwrap_or(max)
}

fn decode(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        for chunk in chunks {
            lines.extend(splitter.push(chunk));
        }
        lines.extend(splitter.finish());
        lines
    }

    #[test]
    fn splits_on_lf_cr_and_crlf() {
        assert_eq!(split(&[b"a\nb\rc\r\nd"]), ["a", "b", "c", "d"]);
    }

    #[test]
    fn crlf_split_across_reads_is_one_break() {
        assert_eq!(split(&[b"a\r", b"\nb\n"]), ["a", "b"]);
        assert_eq!(split(&[b"a", b"\r", b"\n", b"b", b"\n"]), ["a", "b"]);
    }

    #[test]
    fn empty_lines_are_kept() {
        assert_eq!(split(&[b"a\n\n\nb\n"]), ["a", "", "", "b"]);
        assert_eq!(split(&[b"\n"]), [""]);
        assert_eq!(split(&[b"a\r\n\r\nb\r\n"]), ["a", "", "b"]);
    }

    #[test]
    fn progress_updates_become_lines_without_blanks() {
        // The first redraw shows, the rapid ones after it are replaced, the final line stays.
        let tqdm = b"start\n\r  0%|   | 0/3\r 33%|#  | 1/3\r100%|###| 3/3\n";
        assert_eq!(split(&[tqdm]), ["start", "  0%|   | 0/3", "100%|###| 3/3"]);
    }

    #[test]
    fn redraws_are_coalesced_to_a_few_per_second() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for i in 0..10_000 {
            out.extend(s.push(format!("\r{i:>5}/10000").as_bytes()));
        }
        out.extend(s.push(b"\r10000/10000"));
        out.extend(s.finish());
        assert!(out.len() < 10, "{} lines kept of 10,001 redraws", out.len());
        assert_eq!(out.first().map(String::as_str), Some("    0/10000"));
        // A redraw at the end of the stream is its last state.
        assert_eq!(out.last().map(String::as_str), Some("10000/10000"));
        // Redraws a second apart are all kept.
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\r"), ["a"]);
        s.last_redraw = Some(std::time::Instant::now() - REDRAW_INTERVAL);
        assert_eq!(s.push(b"b\r"), ["b"]);
    }

    #[test]
    fn unterminated_last_line_is_flushed() {
        assert_eq!(split(&[b"a\nb", b"c"]), ["a", "bc"]);
        assert_eq!(split(&[b""]), Vec::<String>::new());
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(
            split(&[b"ok \xff\xfe\n", "é\n".as_bytes()]),
            ["ok \u{fffd}\u{fffd}", "é"]
        );
        // A multibyte character split across two reads survives.
        assert_eq!(split(&[b"\xc3", b"\xa9\n"]), ["é"]);
    }

    #[test]
    fn long_lines_are_cut() {
        let long = vec![b'x'; 2 * MAX_LINE + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nend\n");
        let lines = split(&[&input]);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1].len(), MAX_LINE);
        assert_eq!(lines[2].len(), 10);
        assert_eq!(lines[3], "end");
        // Same input in small reads: same result.
        let chunks: Vec<&[u8]> = input.chunks(1000).collect();
        assert_eq!(split(&chunks), lines);
        // Exactly MAX_LINE bytes is one line.
        let exact = [vec![b'y'; MAX_LINE], b"\n".to_vec()].concat();
        assert_eq!(split(&[&exact]).len(), 1);
    }

    #[test]
    fn long_lines_are_cut_at_character_boundaries() {
        // 'é' is 2 bytes; an odd prefix puts a character across the MAX_LINE boundary.
        let mut input = b"x".to_vec();
        while input.len() <= MAX_LINE + 10 {
            input.extend_from_slice("é".as_bytes());
        }
        input.push(b'\n');
        let lines = split(&[&input]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE - 1);
        assert!(!lines.concat().contains('\u{fffd}'));
        assert_eq!(lines.concat().len(), input.len() - 1);
    }

    #[test]
    fn outcome_reads_well() {
        assert_eq!(ExitOutcome::Exited(3).to_string(), "exited with code 3");
        assert_eq!(
            ExitOutcome::Signaled(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(ExitOutcome::Signaled(40).to_string(), "killed by signal 40");
        assert!(ExitOutcome::Exited(0).success());
        assert!(!ExitOutcome::Signaled(15).success());
    }
}
