//! One cgroup per attempt: every process of the attempt is in it from before its exec, so a stop
//! reaches all of them (a process that cleared its environment and left its process group
//! included), and the spec's `memory` limit is enforced on them together.
//!
//! ```text
//! v2: <own cgroup>/runyard-<agent>/<job>-<attempt>          memory, pids enabled in the subtree
//! v1: <hierarchy>/<own cgroup>/runyard-<agent>/<job>-<attempt>   for freezer, memory and pids
//! none: not root, or no usable hierarchy → the marker sweep alone (see `reaper`)
//! ```
//! Life of an attempt's cgroup: `create` (limit written) → the job process writes itself into
//! every `cgroup.procs` before exec (`procs_files`, `process`) → `kill` (v1: freeze, SIGKILL each
//! task, thaw; v2: `cgroup.kill`, else freeze + kill) → `oom_killed` read → `remove` once empty.
//!
//! Invariants:
//! - An agent touches only its own subtree `runyard-<16 hex of sha256(name@data dir)>`, so agents
//!   on one host (or in one test process) never kill each other's jobs; at start it kills and
//!   removes whatever attempt cgroups a crashed run of it left there.
//! - v2 is used only where the agent's own cgroup can give `memory` and `pids` to its children
//!   (a delegated subtree: systemd `Delegate=yes`); the agent moves itself into a leaf
//!   (`runyard-agent`) first when its cgroup must stay free of processes.
//! - Everything here blocks on cgroupfs: async callers use `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// How long a freeze or an emptying cgroup is waited for.
const SETTLE: Duration = Duration::from_secs(5);
/// Pause between two looks at a cgroup that is freezing or emptying.
const POLL: Duration = Duration::from_millis(5);
/// The v1 controllers an attempt joins.
const V1_CONTROLLERS: [&str; 3] = ["freezer", "memory", "pids"];
/// The leaf a v2 agent moves itself into, so its own cgroup can enable controllers.
const V2_AGENT_LEAF: &str = "runyard-agent";

/// Which cgroups this agent gives its attempts.
#[derive(Debug)]
pub struct Cgroups {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// No cgroups; why, for the start log.
    None(String),
    /// The agent's subtree in each of freezer, memory, pids (in that order).
    V1([PathBuf; 3]),
    /// The agent's subtree in the unified hierarchy.
    V2(PathBuf),
}

/// One attempt's cgroup (a directory per v1 hierarchy, or one v2 directory).
#[derive(Debug)]
pub struct AttemptCgroup {
    v2: bool,
    /// v1: freezer, memory, pids; v2: the one directory.
    dirs: Vec<PathBuf>,
    /// The limit written, for messages.
    pub memory: Option<u64>,
}

impl Cgroups {
    /// Finds a usable hierarchy and makes this agent's subtree in it; `identity` is the agent's
    /// `name@data dir`. Never fails: without cgroups the mode is `none`, with the reason.
    pub fn detect(identity: &str) -> Cgroups {
        let name = agent_dir_name(identity);
        if !nix::unistd::Uid::effective().is_root() {
            return Cgroups {
                kind: Kind::None("the agent is not root".into()),
            };
        }
        let own = match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(t) => t,
            Err(e) => {
                return Cgroups {
                    kind: Kind::None(format!("cannot read /proc/self/cgroup: {e}")),
                };
            }
        };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let v2_error = match v2_subtree(&own, &mounts, &name) {
            Ok(dir) => {
                return Cgroups {
                    kind: Kind::V2(dir),
                };
            }
            Err(e) => e,
        };
        match v1_subtree(&own, &mounts, &name) {
            Ok(dirs) => Cgroups {
                kind: Kind::V1(dirs),
            },
            Err(v1_error) => Cgroups {
                kind: Kind::None(format!("v2: {v2_error}; v1: {v1_error}")),
            },
        }
    }

    /// No cgroups (the marker sweep alone).
    pub fn none(why: &str) -> Cgroups {
        Cgroups {
            kind: Kind::None(why.into()),
        }
    }

    /// A cgroup v2 subtree at `dir` (which must exist), whatever the host uses: for tests of the
    /// v2 code path on hosts whose agents use v1.
    pub fn v2_at(dir: PathBuf) -> Cgroups {
        Cgroups {
            kind: Kind::V2(dir),
        }
    }

    /// `"v2"`, `"v1"` or `"none"`.
    pub fn mode(&self) -> &'static str {
        match self.kind {
            Kind::None(_) => "none",
            Kind::V1(_) => "v1",
            Kind::V2(_) => "v2",
        }
    }

    /// Logs the mode in one line.
    pub fn log(&self) {
        match &self.kind {
            Kind::None(why) => warn!(
                mode = "none",
                %why,
                "job cgroups: none; stops rely on the process marker sweep and `memory` limits are not enforced"
            ),
            Kind::V1(dirs) => {
                info!(mode = "v1", memory = %dirs[1].display(), "job cgroups: v1 (freezer, memory, pids)")
            }
            Kind::V2(dir) => info!(mode = "v2", dir = %dir.display(), "job cgroups: v2"),
        }
    }

    /// Kills and removes the attempt cgroups a previous run of this agent left. Returns how many
    /// there were.
    pub fn clean_stale(&self) -> usize {
        let Some(first) = self.roots().first().cloned() else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(&first) else {
            return 0;
        };
        let mut cleaned = 0;
        for entry in entries.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = entry.file_name();
            let cg = self.attempt_at(&name.to_string_lossy());
            cg.kill(|_| {});
            if let Err(error) = cg.remove() {
                warn!(cgroup = %entry.path().display(), %error, "cannot remove a leftover job cgroup");
            }
            cleaned += 1;
        }
        cleaned
    }

    /// Makes the cgroup of one attempt (`name`: `<job>-<attempt>`) with its memory limit; `None`
    /// when this agent has no cgroups. A leftover of the same name is killed and replaced.
    pub fn create(&self, name: &str, memory: Option<u64>) -> io::Result<Option<AttemptCgroup>> {
        if matches!(self.kind, Kind::None(_)) {
            return Ok(None);
        }
        let mut cg = self.attempt_at(name);
        if cg.dirs[0].exists() {
            cg.kill(|_| {});
            cg.remove()?;
        }
        for dir in &cg.dirs {
            std::fs::create_dir(dir)?;
        }
        cg.memory = memory;
        if let Err(e) = cg.configure(memory) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(Some(cg))
    }

    /// Removes this agent's subtree once it is empty (at shutdown; also when dropped).
    pub fn close(&self) {
        for root in self.roots() {
            let _ = std::fs::remove_dir(root);
        }
    }

    fn roots(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::None(_) => Vec::new(),
            Kind::V1(dirs) => dirs.to_vec(),
            Kind::V2(dir) => vec![dir.clone()],
        }
    }

    fn attempt_at(&self, name: &str) -> AttemptCgroup {
        AttemptCgroup {
            v2: matches!(self.kind, Kind::V2(_)),
            dirs: self.roots().into_iter().map(|r| r.join(name)).collect(),
            memory: None,
        }
    }
}

impl Drop for Cgroups {
    /// An agent whose task is dropped (a test's runtime ending) leaves no empty subtree behind;
    /// one with attempt cgroups left is cleaned at its next start instead.
    fn drop(&mut self) {
        self.close();
    }
}

impl AttemptCgroup {
    fn configure(&self, memory: Option<u64>) -> io::Result<()> {
        let Some(limit) = memory else {
            return Ok(());
        };
        let limit = limit.to_string();
        if self.v2 {
            let dir = &self.dirs[0];
            write(&dir.join("memory.max"), &limit)?;
            // Swap would let the job run on past its limit, slowly.
            let _ = write(&dir.join("memory.swap.max"), "0");
            // An OOM ends the whole attempt, not a random process of it.
            let _ = write(&dir.join("memory.oom.group"), "1");
        } else {
            let dir = &self.dirs[1];
            write(&dir.join("memory.limit_in_bytes"), &limit)?;
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &limit)?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files, opened for writing, that the job process writes its pid into
    /// before exec (as root, before it drops privileges).
    pub fn procs_files(&self) -> io::Result<Vec<File>> {
        self.dirs
            .iter()
            .map(|d| OpenOptions::new().write(true).open(d.join("cgroup.procs")))
            .collect()
    }

    /// The pids in the cgroup now (zombies excluded).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dirs[0].join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether no process is left in it.
    pub fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// Kills every process in the cgroup at once, so none can fork or escape meanwhile: freezes
    /// it, hands the pids to `record` (they cannot exit, so their pids cannot be reused, while
    /// frozen), SIGKILLs them (v2: `cgroup.kill`), thaws it and waits (bounded) until it is empty.
    pub fn kill(&self, record: impl FnOnce(&[i32])) {
        let (freeze, frozen_value, thawed_value, frozen_file, frozen_line) = if self.v2 {
            let d = &self.dirs[0];
            (
                d.join("cgroup.freeze"),
                "1",
                "0",
                d.join("cgroup.events"),
                "frozen 1",
            )
        } else {
            let state = self.dirs[0].join("freezer.state");
            (state.clone(), "FROZEN", "THAWED", state, "FROZEN")
        };
        let frozen = write(&freeze, frozen_value).is_ok() && wait_for(&frozen_file, frozen_line);
        let pids = self.pids();
        record(&pids);
        let killed_all = self.v2 && write(&self.dirs[0].join("cgroup.kill"), "1").is_ok();
        if !killed_all {
            for &pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        if frozen || freeze.exists() {
            let _ = write(&freeze, thawed_value);
        }
        let deadline = Instant::now() + SETTLE;
        while !self.is_empty() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }

    /// Whether the kernel killed a process of it for going over its memory limit.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = if self.v2 {
            (self.dirs[0].join("memory.events"), "oom_kill")
        } else {
            (self.dirs[1].join("memory.oom_control"), "oom_kill")
        };
        std::fs::read_to_string(file)
            .map(|t| {
                t.lines().any(|l| {
                    let mut f = l.split_whitespace();
                    f.next() == Some(key)
                        && f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0
                })
            })
            .unwrap_or(false)
    }

    /// Removes the cgroup, waiting (bounded) for its last processes to be gone.
    pub fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + SETTLE;
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(POLL);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// `runyard-<16 hex of sha256(identity)>`.
fn agent_dir_name(identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    format!("runyard-{}", &hex::encode(digest)[..16])
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
}

/// Polls a cgroup file until it contains `want` (bounded by `SETTLE`).
fn wait_for(path: &Path, want: &str) -> bool {
    let deadline = Instant::now() + SETTLE;
    loop {
        if std::fs::read_to_string(path)
            .map(|t| t.lines().any(|l| l.trim() == want))
            .unwrap_or(false)
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// This process's cgroup path in the hierarchy of `controller` (`""`: the unified one), from
/// `/proc/self/cgroup` (`id:controllers:path` lines).
fn own_path<'a>(own: &'a str, controller: &str) -> Option<&'a str> {
    own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then_some(path)
    })
}

/// The mount point of the hierarchy holding `controller` (`""`: the cgroup2 one), from
/// `/proc/self/mountinfo`.
fn mount_point(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        let mut r = right.split_whitespace();
        let (fstype, _source, options) = (r.next()?, r.next()?, r.next().unwrap_or(""));
        let hit = if controller.is_empty() {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && options.split(',').any(|o| o == controller)
        };
        hit.then(|| PathBuf::from(mount))
    })
}

fn under(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

fn v2_subtree(own: &str, mounts: &str, name: &str) -> Result<PathBuf, String> {
    let mount = mount_point(mounts, "").ok_or("no cgroup2 mount")?;
    let path = own_path(own, "").ok_or("this process is in no cgroup2 cgroup")?;
    let base = under(&mount, path);
    let has = |file: &str| {
        std::fs::read_to_string(base.join(file))
            .map(|t| {
                let c: Vec<&str> = t.split_whitespace().collect();
                c.contains(&"memory") && c.contains(&"pids")
            })
            .unwrap_or(false)
    };
    if !has("cgroup.subtree_control") {
        if !has("cgroup.controllers") {
            return Err(format!(
                "{} does not offer the memory and pids controllers (not delegated: Delegate=yes)",
                base.display()
            ));
        }
        // The agent's cgroup may hold no process once it enables controllers for children.
        if path != "/" {
            let leaf = base.join(V2_AGENT_LEAF);
            std::fs::create_dir_all(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                .map_err(|e| format!("cannot move the agent into {}: {e}", leaf.display()))?;
        }
        write(&base.join("cgroup.subtree_control"), "+memory +pids")
            .map_err(|e| format!("cannot enable memory and pids in {}: {e}", base.display()))?;
    }
    let dir = base.join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    write(&dir.join("cgroup.subtree_control"), "+memory +pids")
        .map_err(|e| format!("cannot enable memory and pids in {}: {e}", dir.display()))?;
    Ok(dir)
}

fn v1_subtree(own: &str, mounts: &str, name: &str) -> Result<[PathBuf; 3], String> {
    let mut dirs = Vec::with_capacity(3);
    for controller in V1_CONTROLLERS {
        let mount =
            mount_point(mounts, controller).ok_or_else(|| format!("no {controller} hierarchy"))?;
        let path = own_path(own, controller).unwrap_or("/");
        let dir = under(&mount, path).join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        dirs.push(dir);
    }
    Ok(dirs.try_into().expect("three controllers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "12:pids:/user.slice\n6:freezer:/\n4:memory:/process_api/6a8b\n1:name=systemd:/\n0::/user.slice/x.scope\n";
    const MOUNTS: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        35 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        40 31 0:36 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
        42 31 0:38 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
        44 31 0:40 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn own_cgroups_and_mounts_are_found() {
        assert_eq!(own_path(OWN, "memory"), Some("/process_api/6a8b"));
        assert_eq!(own_path(OWN, "freezer"), Some("/"));
        assert_eq!(own_path(OWN, ""), Some("/user.slice/x.scope"));
        assert_eq!(own_path(OWN, "cpu"), None);
        assert_eq!(
            mount_point(MOUNTS, "memory"),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(
            mount_point(MOUNTS, ""),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(mount_point(MOUNTS, "cpu"), None);
        assert_eq!(
            under(Path::new("/sys/fs/cgroup/memory"), "/process_api/6a8b"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/6a8b")
        );
        let a = agent_dir_name("a1@/var/lib/runyard-agent");
        assert!(
            a.starts_with("runyard-") && a.len() == "runyard-".len() + 16,
            "{a}"
        );
        assert_ne!(a, agent_dir_name("a2@/var/lib/runyard-agent"));
    }
}
