//! Who a job runs as, and the hand-over of its directory to it.
//!
//! ```text
//! agent is root, no --run-as    → per-attempt uid from --job-uids, primary gid of `runyard-job`
//!                                 (the user is created when missing): jobs reach neither the
//!                                 agent nor each other
//! agent is root, --run-as USER  → every job runs as USER (its uid and primary gid): jobs cannot
//!                                 reach the agent, but can reach each other
//! agent is not root, --run-as   → refused at start: it cannot switch users
//! agent is not root             → jobs run as the agent's user: no isolation (warned at start)
//! ```
//!
//! Invariants:
//! - A per-attempt uid belongs to one attempt on this host at a time: its lock file
//!   (`/run/runyard/job-uids/<uid>`) stays flocked from before the attempt's directory is handed
//!   over until that directory is removed, whichever agent on the host holds it. The lock goes
//!   with the process, so a crashed agent frees its uids.
//! - Before exec the job process drops every supplementary group and takes the job's gid and
//!   uid (see `process`). Whatever runs under a per-attempt uid while no attempt holds it is a
//!   leftover: it is killed when the uid is taken (before the attempt's directory is given to
//!   it), before exec, and when the attempt ends (`clear`), cgroups or not.
//! - The hand-over chowns the attempt directory's tree to the job, except files with more than
//!   one link: venv files hardlinked from the uv cache stay the agent's (chowning one would chown
//!   the cache's inode), readable by the job and never writable by it.
//! - Nothing here changes the mode of a directory the agent did not create.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nix::unistd::{Gid, Group, Uid, User};
use tracing::{info, warn};

/// The dedicated account whose group per-attempt uids get, created when missing.
pub const JOB_USER: &str = "runyard-job";
/// First and last uid of the default per-attempt range: 65,536 uids at 0x70000000, above the
/// ranges systemd (DynamicUser, nspawn containers) and `/etc/subuid` defaults hand out.
pub const DEFAULT_JOB_UIDS: UidRange = UidRange {
    first: 0x7000_0000,
    last: 0x7000_ffff,
};
/// Host-wide lock files, one per per-attempt uid in use.
pub const UID_LOCK_DIR: &str = "/run/runyard/job-uids";
/// Serializes `useradd` between agents starting at once.
const USERADD_LOCK: &str = "/run/runyard/useradd.lock";

/// An inclusive range of uids, written `FIRST-LAST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    fn len(&self) -> u32 {
        self.last - self.first + 1
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<UidRange, String> {
        let bad = |why: &str| {
            format!("invalid uid range `{s}`: {why}; write FIRST-LAST, e.g. 1879048192-1879113727")
        };
        let (a, b) = s.trim().split_once('-').ok_or_else(|| bad("no `-`"))?;
        let first: u32 = a.trim().parse().map_err(|_| bad("FIRST is not a uid"))?;
        let last: u32 = b.trim().parse().map_err(|_| bad("LAST is not a uid"))?;
        if first > last {
            return Err(bad("FIRST is above LAST"));
        }
        if first < 1000 {
            return Err(bad(
                "it must start at 1000 or above (system users live below)",
            ));
        }
        if (first..=last).contains(&65534) || last == u32::MAX {
            return Err(bad(
                "it must not contain 65534 (nobody) or 4294967295 (invalid)",
            ));
        }
        Ok(UidRange { first, last })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// What the operator asked for (`--run-as`, `--job-uids`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsolationConfig {
    /// Run every job as this user instead of per-attempt uids; root only.
    pub run_as: Option<String>,
    /// Per-attempt uids (root, no `run_as`).
    pub job_uids: UidRange,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        IsolationConfig {
            run_as: None,
            job_uids: DEFAULT_JOB_UIDS,
        }
    }
}

/// Why jobs cannot be given their identity. The messages are meant for operators.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "--run-as {user} needs the agent to run as root (it switches users for jobs); this agent \
         runs as uid {uid}: start it as root, or drop --run-as to run jobs as the agent's user"
    )]
    RunAsNotRoot { user: String, uid: u32 },
    #[error(
        "--run-as {0}: no such user on this host: create it (useradd --system {0}) or name another"
    )]
    NoSuchUser(String),
    #[error("--run-as {0}: jobs must not run as root; name an unprivileged user")]
    RunAsRoot(String),
    #[error("cannot create the job user {user}: {message}")]
    CreateUser { user: String, message: String },
    #[error("cannot look up user {user}: {source}")]
    Lookup { user: String, source: nix::Error },
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "jobs cannot reach {target}: {blocker} has mode {mode:04o} and is not {who}'s; let them \
         through (chmod o+x {blocker}) or use a path they can reach (a data dir such as \
         --data-dir /var/lib/runyard-agent, an interpreter such as --python /usr/bin/python3)"
    )]
    Unreachable {
        target: PathBuf,
        blocker: PathBuf,
        mode: u32,
        who: String,
    },
    #[error(
        "no free job uid in {0}: every one is held by a running attempt on this host; widen --job-uids"
    )]
    NoFreeUid(UidRange),
}

/// How this agent runs jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    /// Jobs run as the agent's own user.
    Shared,
    /// Every job runs as one user.
    User { uid: u32, gid: u32, name: String },
    /// Each attempt gets its own uid from the range, with the job group.
    PerAttempt {
        range: UidRange,
        gid: u32,
        name: String,
    },
}

/// The identities of this agent's jobs. One per agent.
#[derive(Debug)]
pub struct Identities {
    mode: Mode,
    /// Where the next search for a free uid starts.
    cursor: AtomicU32,
    /// Uids this agent holds now (another agent's are seen through the lock files).
    held: Arc<Mutex<HashSet<u32>>>,
}

/// The identity one attempt runs under, held until dropped.
#[derive(Debug)]
pub struct JobIdentity {
    /// `None`: the agent's own user.
    pub run_as: Option<RunAs>,
    /// The account name jobs see in `USER` and `LOGNAME`.
    pub user: String,
    _lease: Option<UidLease>,
}

/// A uid and gid to switch to before exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// The uid is this attempt's alone: kill what else runs under it before exec.
    pub sweep: bool,
}

#[derive(Debug)]
struct UidLease {
    uid: u32,
    held: Arc<Mutex<HashSet<u32>>>,
    /// Flocked; closing it releases the uid to other agents.
    _file: File,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.uid);
    }
}

impl Identities {
    /// Decides how jobs run, creating the job user when needed. Blocking (may run `useradd`).
    pub fn setup(config: &IsolationConfig) -> Result<Identities, IdentityError> {
        let me = Uid::effective();
        let mode = match (&config.run_as, me.is_root()) {
            (Some(user), false) => {
                return Err(IdentityError::RunAsNotRoot {
                    user: user.clone(),
                    uid: me.as_raw(),
                });
            }
            (None, false) => Mode::Shared,
            (Some(name), true) => {
                let user = lookup(name)?.ok_or_else(|| IdentityError::NoSuchUser(name.clone()))?;
                if user.uid.is_root() {
                    return Err(IdentityError::RunAsRoot(name.clone()));
                }
                Mode::User {
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                    name: name.clone(),
                }
            }
            (None, true) => {
                let user = ensure_user(JOB_USER)?;
                create_private_dir(Path::new(UID_LOCK_DIR))?;
                Mode::PerAttempt {
                    range: config.job_uids,
                    gid: user.gid.as_raw(),
                    name: JOB_USER.to_string(),
                }
            }
        };
        // Agents starting together should not all try the same first uid.
        let start = match &mode {
            Mode::PerAttempt { range, .. } => rand::random::<u32>() % range.len(),
            _ => 0,
        };
        Ok(Identities {
            mode,
            cursor: AtomicU32::new(start),
            held: Arc::default(),
        })
    }

    /// Jobs run as the agent's own user.
    pub fn shared() -> Identities {
        Identities {
            mode: Mode::Shared,
            cursor: AtomicU32::new(0),
            held: Arc::default(),
        }
    }

    /// Jobs run under another identity than the agent's.
    pub fn isolated(&self) -> bool {
        self.mode != Mode::Shared
    }

    /// One line for the agent's start log: who jobs run as.
    pub fn describe(&self) -> String {
        match &self.mode {
            Mode::Shared => "the agent's user (no isolation)".into(),
            Mode::User { name, uid, .. } => format!("{name} (uid {uid}, shared by all jobs)"),
            Mode::PerAttempt { range, name, gid } => {
                format!("a uid of {range} per attempt, group {name} (gid {gid})")
            }
        }
    }

    /// Logs how jobs run; warns when they are not isolated.
    pub fn log(&self) {
        match &self.mode {
            Mode::Shared => warn!(
                uid = Uid::effective().as_raw(),
                "jobs run as the agent's user: no isolation (start the agent as root to isolate them)"
            ),
            _ => info!(jobs_run_as = %self.describe(), "jobs are isolated"),
        }
    }

    /// The identity of one new attempt. Blocking (opens and locks a file).
    pub fn acquire(&self) -> Result<JobIdentity, IdentityError> {
        match &self.mode {
            Mode::Shared => Ok(JobIdentity {
                run_as: None,
                user: std::env::var("USER").unwrap_or_default(),
                _lease: None,
            }),
            Mode::User { uid, gid, name } => Ok(JobIdentity {
                run_as: Some(RunAs {
                    uid: *uid,
                    gid: *gid,
                    sweep: false,
                }),
                user: name.clone(),
                _lease: None,
            }),
            Mode::PerAttempt { range, gid, name } => {
                let n = range.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
                for i in 0..n {
                    let uid = range.first + (start + i) % n;
                    if let Some(lease) = self.try_lease(uid)? {
                        return Ok(JobIdentity {
                            run_as: Some(RunAs {
                                uid,
                                gid: *gid,
                                sweep: true,
                            }),
                            user: name.clone(),
                            _lease: Some(lease),
                        });
                    }
                }
                Err(IdentityError::NoFreeUid(*range))
            }
        }
    }

    fn try_lease(&self, uid: u32) -> Result<Option<UidLease>, IdentityError> {
        if !self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid)
        {
            return Ok(None);
        }
        let release = || {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
        };
        let path = Path::new(UID_LOCK_DIR).join(uid.to_string());
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(source) => {
                release();
                return Err(IdentityError::Io { path, source });
            }
        };
        match file.try_lock() {
            Ok(()) => {
                let lease = UidLease {
                    uid,
                    held: self.held.clone(),
                    _file: file,
                };
                // Whatever still runs as this uid (left by a crashed agent, or one without
                // cgroups) dies before the uid is given a new attempt's directory.
                kill_uid(uid).map_err(|source| IdentityError::Io { path, source })?;
                Ok(Some(lease))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                release();
                Ok(None)
            }
            Err(std::fs::TryLockError::Error(source)) => {
                release();
                Err(IdentityError::Io { path, source })
            }
        }
    }

    /// Checks that a job could pass through every directory down to `target` (searchable by
    /// others, or by the job group), along its path as written and its real path (symlinks
    /// resolved), and use `target` itself (search a directory, run a file). Always true when
    /// jobs run as the agent's user.
    pub fn check_reachable(&self, target: &Path) -> Result<(), IdentityError> {
        let (uid, gid, who) = match &self.mode {
            Mode::Shared => return Ok(()),
            Mode::User { uid, gid, name } => (Some(*uid), *gid, name.clone()),
            Mode::PerAttempt { gid, name, .. } => (None, *gid, format!("group {name}")),
        };
        let written = std::path::absolute(target).map_err(|source| IdentityError::Io {
            path: target.to_path_buf(),
            source,
        })?;
        let real = std::fs::canonicalize(target).map_err(|source| IdentityError::Io {
            path: target.to_path_buf(),
            source,
        })?;
        let lexical = written.parent().map(Path::ancestors).into_iter().flatten();
        for dir in real.ancestors().chain(lexical) {
            let meta = std::fs::metadata(dir).map_err(|source| IdentityError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let mode = meta.permissions().mode();
            let bit = if Some(meta.uid()) == uid {
                0o100
            } else if meta.gid() == gid {
                0o010
            } else {
                0o001
            };
            if mode & bit == 0 {
                return Err(IdentityError::Unreachable {
                    target: written.clone(),
                    blocker: dir.to_path_buf(),
                    mode: mode & 0o7777,
                    who,
                });
            }
        }
        Ok(())
    }

    /// The interpreter jobs run: `python` itself when it is a path (it must be within jobs'
    /// reach), else the first `python` on `PATH` that jobs can reach and run (an interpreter
    /// under the agent user's private home, such as pyenv's, is skipped with a note).
    pub fn job_python(&self, python: &Path) -> Result<PathBuf, IdentityError> {
        if !self.isolated() {
            return Ok(python.to_path_buf());
        }
        if python.components().count() > 1 {
            self.check_reachable(python)?;
            return Ok(python.to_path_buf());
        }
        // Where exec looks when PATH is unset.
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let mut first_error = None;
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(python);
            let runnable = std::fs::metadata(&candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false);
            if !runnable {
                continue;
            }
            match self.check_reachable(&candidate) {
                Ok(()) => {
                    if let Some(skipped) = &first_error {
                        info!(python = %candidate.display(), %skipped, "jobs use the first interpreter on PATH they can reach");
                    }
                    return Ok(candidate);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| IdentityError::Io {
            path: python.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "not found on PATH"),
        }))
    }
}

/// [`Identities::check_reachable`] for each target.
pub fn check_reachable_all(
    identities: &Identities,
    targets: &[&Path],
) -> Result<(), IdentityError> {
    targets
        .iter()
        .try_for_each(|t| identities.check_reachable(t))
}

impl JobIdentity {
    /// Kills whatever still runs under a per-attempt uid (a process that escaped without a
    /// cgroup); called when the attempt has ended. Blocking.
    pub fn clear(&self) {
        if let (Some(run_as), Some(_)) = (self.run_as, &self._lease)
            && let Err(error) = kill_uid(run_as.uid)
        {
            warn!(uid = run_as.uid, %error, "cannot clear the job uid's processes");
        }
    }

    /// Gives the attempt directory to the job: the tree is chowned to its uid and gid (files
    /// hardlinked from a cache excepted), the directory itself made 0700, and `home` and `tmp`
    /// created in it. Nothing changes for a job run as the agent's user but the two
    /// directories. Blocking.
    pub fn hand_over(&self, dir: &Path) -> io::Result<()> {
        for sub in [HOME_DIR, TMP_DIR] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir.join(sub))
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
        }
        let Some(run_as) = self.run_as else {
            return Ok(());
        };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        chown_tree(dir, run_as.uid, run_as.gid)
    }
}

/// SIGKILLs every process running as `uid`: a child takes that uid, so `kill(-1)` reaches
/// exactly them. Blocking (a fork and a wait, well under a millisecond).
pub fn kill_uid(uid: u32) -> io::Result<()> {
    // SAFETY: the child only makes raw system calls (setuid, kill, exit), which are
    // async-signal-safe, and never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; the raw setuid changes this single-threaded child only.
        unsafe {
            if libc::syscall(libc::SYS_setuid, uid as libc::c_long) != 0 {
                libc::_exit(1);
            }
            // kill(-1) reaches every process the caller may signal at once (a fork racing it
            // fails on its parent's pending SIGKILL); its result says nothing about how many
            // were ours (EPERM from others is not reported), so it is not looked at.
            for _ in 0..3 {
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on the child just forked, with a valid out-pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(()),
        Some(1) => Err(io::Error::other(format!(
            "cannot take uid {uid} to clear it"
        ))),
        _ => Err(io::Error::other(format!(
            "processes of uid {uid} survive SIGKILL"
        ))),
    }
}

/// The job's `HOME`, inside its attempt directory (isolated jobs only).
pub const HOME_DIR: &str = "home";
/// The job's `TMPDIR`, inside its attempt directory (isolated jobs only).
pub const TMP_DIR: &str = "tmp";

/// Chowns `root` and everything below it (symlinks themselves, never their targets), except
/// regular files with more than one link.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_file() && meta.nlink() > 1 {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        if kind.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Creates `path` (and missing parents) with mode 0700, or makes an existing one 0700: only for
/// directories the agent owns.
pub fn create_private_dir(path: &Path) -> Result<(), IdentityError> {
    set_dir_mode(path, 0o700)
}

/// Creates `path` (and missing parents) and sets its mode: only for directories of the agent.
pub fn set_dir_mode(path: &Path, mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

fn lookup(name: &str) -> Result<Option<User>, IdentityError> {
    User::from_name(name).map_err(|source| IdentityError::Lookup {
        user: name.to_string(),
        source,
    })
}

/// The user `name`, created as a system user (no home, no login shell, its own group) when
/// missing. Agents starting at once create it once.
pub fn ensure_user(name: &str) -> Result<User, IdentityError> {
    if let Some(user) = lookup(name)? {
        return Ok(user);
    }
    let lock_path = Path::new(USERADD_LOCK);
    if let Some(parent) = lock_path.parent() {
        create_private_dir(parent)?;
    }
    let lock = File::create(lock_path).map_err(|source| IdentityError::Io {
        path: lock_path.to_path_buf(),
        source,
    })?;
    lock.lock().map_err(|source| IdentityError::Io {
        path: lock_path.to_path_buf(),
        source,
    })?;
    if let Some(user) = lookup(name)? {
        return Ok(user);
    }
    let shell = ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/bin/false");
    let out = std::process::Command::new("useradd")
        .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
        .args([
            "--shell",
            shell,
            "--user-group",
            "--comment",
            "Runyard jobs",
            name,
        ])
        .output()
        .map_err(|e| IdentityError::CreateUser {
            user: name.to_string(),
            message: format!("cannot run useradd: {e}"),
        })?;
    if !out.status.success() {
        return Err(IdentityError::CreateUser {
            user: name.to_string(),
            message: format!(
                "useradd {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    drop(lock);
    let user = lookup(name)?.ok_or_else(|| IdentityError::CreateUser {
        user: name.to_string(),
        message: "useradd succeeded but the user is not found".into(),
    })?;
    info!(
        user = name,
        uid = user.uid.as_raw(),
        gid = user.gid.as_raw(),
        "created the job user"
    );
    Ok(user)
}

/// The group name of `gid`, for messages.
pub fn group_name(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

/// Whether a file with this metadata can be read by a job of these identities (by others, or through
/// the job group). Used to refuse secrets jobs could read.
pub fn readable_by_jobs(identities: &Identities, meta: &std::fs::Metadata) -> bool {
    let mode = meta.permissions().mode();
    match &identities.mode {
        Mode::Shared => true,
        Mode::User { uid, gid, .. } => {
            (meta.uid() == *uid && mode & 0o400 != 0)
                || (meta.gid() == *gid && mode & 0o040 != 0)
                || mode & 0o004 != 0
        }
        Mode::PerAttempt { gid, .. } => {
            (meta.gid() == *gid && mode & 0o040 != 0) || mode & 0o004 != 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_and_refuse_dangerous_ones() {
        assert_eq!(
            "1879048192-1879113727".parse::<UidRange>(),
            Ok(DEFAULT_JOB_UIDS)
        );
        assert_eq!(DEFAULT_JOB_UIDS.to_string(), "1879048192-1879113727");
        assert_eq!(DEFAULT_JOB_UIDS.len(), 65536);
        for bad in [
            "",
            "5",
            "200000-100000",
            "0-100",
            "999-2000",
            "60000-70000",
            "1000-4294967295",
            "a-b",
        ] {
            let e = bad.parse::<UidRange>().unwrap_err();
            assert!(e.contains("invalid uid range"), "{bad}: {e}");
        }
    }

    #[test]
    fn not_root_with_run_as_is_refused_and_shared_mode_is_open() {
        if Uid::effective().is_root() {
            // The refusal is for agents that cannot switch users; as root it does not apply.
            let ids = Identities::shared();
            assert!(!ids.isolated());
            return;
        }
        let err = Identities::setup(&IsolationConfig {
            run_as: Some("nobody".into()),
            ..IsolationConfig::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("needs the agent to run as root"),
            "{err}"
        );
    }

    #[test]
    fn hand_over_spares_hardlinked_files_and_symlink_targets() {
        if !Uid::effective().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let attempt = dir.path().join("attempt");
        std::fs::create_dir_all(attempt.join("venv/lib")).unwrap();
        let cache_file = dir.path().join("cached.py");
        std::fs::write(&cache_file, "x = 1\n").unwrap();
        std::fs::hard_link(&cache_file, attempt.join("venv/lib/cached.py")).unwrap();
        std::fs::write(attempt.join("venv/lib/own.py"), "y = 2\n").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "secret").unwrap();
        std::os::unix::fs::symlink(&outside, attempt.join("link")).unwrap();
        let id = JobIdentity {
            run_as: Some(RunAs {
                uid: 0x7000_fff0,
                gid: 0x7000_fff0,
                sweep: true,
            }),
            user: "t".into(),
            _lease: None,
        };
        id.hand_over(&attempt).unwrap();
        let owner = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
        assert_eq!(owner(&attempt), 0x7000_fff0);
        assert_eq!(owner(&attempt.join("venv/lib")), 0x7000_fff0);
        assert_eq!(owner(&attempt.join("venv/lib/own.py")), 0x7000_fff0);
        assert_eq!(owner(&attempt.join(HOME_DIR)), 0x7000_fff0);
        assert_eq!(owner(&attempt.join(TMP_DIR)), 0x7000_fff0);
        assert_eq!(owner(&attempt.join("link")), 0x7000_fff0);
        assert_eq!(owner(&cache_file), 0, "the cache's inode is not the job's");
        assert_eq!(owner(&outside), 0, "a symlink's target is never chowned");
        let mode = std::fs::metadata(&attempt).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn the_job_user_is_created_when_missing() {
        if !Uid::effective().is_root()
            || std::process::Command::new("useradd")
                .arg("--help")
                .output()
                .is_err()
        {
            return;
        }
        let name = format!("ryt{}", std::process::id());
        let user = ensure_user(&name).unwrap();
        let again = ensure_user(&name).unwrap();
        let group = group_name(user.gid.as_raw());
        let _ = std::process::Command::new("userdel").arg(&name).output();
        assert_eq!(user.uid, again.uid);
        assert!(user.uid.as_raw() < 1000, "a system user: {}", user.uid);
        assert_eq!(group, name, "with its own group");
        assert!(user.shell.to_string_lossy().contains("nologin") || user.shell.ends_with("false"));
    }

    #[test]
    fn kill_uid_kills_exactly_that_uids_processes() {
        use std::os::unix::process::CommandExt;
        if !Uid::effective().is_root() {
            return;
        }
        let uid = 0x7002_0000 + std::process::id() % 1000;
        let spawn = |uid: u32| {
            std::process::Command::new("sleep")
                .arg("60")
                .uid(uid)
                .gid(uid)
                .spawn()
                .unwrap()
        };
        let (mut target, mut bystander) = (spawn(uid), spawn(uid + 1000));
        kill_uid(uid).unwrap();
        let status = target.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "another uid is left alone"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
        kill_uid(uid).unwrap();
    }

    #[test]
    fn uids_are_held_by_one_attempt_at_a_time() {
        if !Uid::effective().is_root() {
            return;
        }
        create_private_dir(Path::new(UID_LOCK_DIR)).unwrap();
        // A small range of its own, so this test never waits on other agents' uids.
        let first = 0x7001_0000 + (std::process::id() % 1000) * 4;
        let ids = Identities {
            mode: Mode::PerAttempt {
                range: UidRange {
                    first,
                    last: first + 1,
                },
                gid: 0x7001_0000,
                name: "t".into(),
            },
            cursor: AtomicU32::new(0),
            held: Arc::default(),
        };
        let a = ids.acquire().unwrap();
        let b = ids.acquire().unwrap();
        let (ua, ub) = (a.run_as.unwrap().uid, b.run_as.unwrap().uid);
        assert_ne!(ua, ub);
        assert!(matches!(ids.acquire(), Err(IdentityError::NoFreeUid(_))));
        // Another agent (another open file description) sees the lock too.
        let other = File::open(Path::new(UID_LOCK_DIR).join(ua.to_string())).unwrap();
        assert!(other.try_lock().is_err());
        drop(a);
        assert!(other.try_lock().is_ok(), "released with the attempt");
        other.unlock().unwrap();
        let c = ids.acquire().unwrap();
        assert_eq!(c.run_as.unwrap().uid, ua);
    }
}
