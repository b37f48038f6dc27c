//! Finds, signals and reaps the processes of one job attempt through the marker each one carries
//! in its environment (`RUNYARD_ATTEMPT=<marker>`), plus the agent-wide `become_subreaper` and
//! `sweep_agent`.
//!
//! Invariants:
//! - A signal only goes to a pid that a /proc scan made just before found alive and belonging to
//!   the attempt: carrying the marker, in the attempt's process group while its leader is still
//!   unreaped (an unreaped leader pins the group id, so it cannot name someone else's group), or
//!   recorded earlier with the same start time (a process that re-executed with a cleaned
//!   environment is still ours).
//! - `waitpid` is only called on a recorded pid that is a zombie, a child of this process and has
//!   the recorded start time; never `waitpid(-1)`, which would steal the exit status of children
//!   owned by tokio, std or other attempts running in the same process.
//! - All state is per `Tracker` (one per attempt); nothing is global to the process, because
//!   several agents can live in one process (tests).
//! - Everything here blocks on /proc: async callers go through `spawn_blocking`.
//!
//! - With a cgroup, its members are the attempt's too, whatever their group or environment, and
//!   the kill round freezes the cgroup and records its members (pid and start time, stable while
//!   frozen) before killing them, so their zombies are reaped like the others.
//!
//! Limits without a cgroup: a process that both leaves the process group and clears its
//! environment before any scan saw it is invisible here. An orphaned job process that exits on
//! its own between two scans stays a zombie child of the agent until the agent exits.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tracing::warn;

use crate::cgroup::AttemptCgroup;

/// Environment variable naming the attempt a process belongs to (`<job id>/<attempt>`).
pub const ATTEMPT_VAR: &str = "RUNYARD_ATTEMPT";
/// Environment variable naming the agent that started a process.
pub const AGENT_VAR: &str = "RUNYARD_AGENT";

/// How many SIGKILL-and-rescan rounds before giving up on a process that will not die.
const KILL_ROUNDS: usize = 100;
/// How many reap rounds to wait for killed processes to become reapable zombies.
const SETTLE_ROUNDS: usize = 100;
/// Pause between two rounds.
const ROUND_PAUSE: Duration = Duration::from_millis(10);

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphaned descendants,
/// including double-forked daemons of jobs, are reparented to us instead of init, so they stay
/// visible and their zombies are ours to reap.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Kills (SIGKILL) every process whose environment holds `RUNYARD_AGENT=<agent_name>`, repeating
/// until none is left (bounded), and reaps those that end up as our zombie children. Meant for
/// agent start, before the agent runs any job: it clears what a previous incarnation left
/// behind. Returns how many processes were killed. Blocking.
pub fn sweep_agent(agent_name: &str) -> usize {
    let tracker = Tracker::new(AGENT_VAR, agent_name);
    let mut killed = HashSet::new();
    for _ in 0..KILL_ROUNDS {
        let live = tracker.scan(None);
        if live.is_empty() {
            break;
        }
        for pid in live {
            // ESRCH: it died between scan and kill, which is what we want.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.insert(pid);
        }
        std::thread::sleep(ROUND_PAUSE);
    }
    let pending = tracker.settle(None);
    if pending > 0 {
        warn!(
            agent = agent_name,
            pending, "agent leftovers still present after sweep"
        );
    }
    killed.len()
}

/// The processes of one attempt: how to recognise them and which ones were seen.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// The exact environment entry, e.g. `RUNYARD_ATTEMPT=job-1/3`.
    entry: Vec<u8>,
    /// Every pid seen belonging to the attempt and not yet known gone, with its start time
    /// (clock ticks since boot) so a reused pid is never mistaken for ours.
    seen: Mutex<HashMap<i32, u64>>,
    /// The attempt's cgroup: every process in it is the attempt's.
    cgroup: Option<Arc<AttemptCgroup>>,
}

impl Tracker {
    /// A tracker for processes whose environment holds `var=value`.
    pub(crate) fn new(var: &str, value: &str) -> Tracker {
        Tracker {
            entry: format!("{var}={value}").into_bytes(),
            seen: Mutex::new(HashMap::new()),
            cgroup: None,
        }
    }

    /// Also counts every process in `cgroup` as the attempt's.
    pub(crate) fn with_cgroup(mut self, cgroup: Option<Arc<AttemptCgroup>>) -> Tracker {
        self.cgroup = cgroup;
        self
    }

    /// Freezes the cgroup (if any), records its members and kills them all (see the module
    /// invariants).
    fn kill_cgroup(&self) {
        let Some(cgroup) = &self.cgroup else { return };
        cgroup.kill(|pids| {
            let mut seen = self.seen();
            for &pid in pids {
                if let Some(stat) = read_stat(pid) {
                    seen.insert(pid, stat.start);
                }
            }
        });
    }

    fn seen(&self) -> MutexGuard<'_, HashMap<i32, u64>> {
        // The map stays consistent even if a holder panicked: every update is a single insert
        // or remove.
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Scans /proc, records every live (non-zombie) process of the attempt and returns their
    /// pids. `group` is the attempt's process group id, passed only while its leader is unreaped.
    pub(crate) fn scan(&self, group: Option<i32>) -> Vec<i32> {
        let members: HashSet<i32> = match &self.cgroup {
            Some(cgroup) => cgroup.pids().into_iter().collect(),
            None => HashSet::new(),
        };
        let mut seen = self.seen();
        let mut live = Vec::new();
        let result = for_each_process(|pid, stat, environ| {
            if stat.is_dead() {
                return;
            }
            let ours = group == Some(stat.pgrp)
                || seen.get(&pid) == Some(&stat.start)
                || members.contains(&pid)
                || has_entry(environ, &self.entry);
            if ours {
                live.push((pid, stat.start));
            }
        });
        if let Err(error) = result {
            warn!(%error, "cannot scan /proc");
        }
        for &(pid, start) in &live {
            seen.insert(pid, start);
        }
        live.into_iter().map(|(pid, _)| pid).collect()
    }

    /// Sends `signals`, in order, to the process group (if given) and to every live process of
    /// the attempt; returns how many live processes the scan found.
    pub(crate) fn signal_all(&self, group: Option<i32>, signals: &[Signal]) -> usize {
        for &signal in signals {
            if let Some(group) = group {
                // ESRCH: the group is empty, which is fine.
                let _ = killpg(Pid::from_raw(group), signal);
            }
        }
        let live = self.scan(group);
        for &signal in signals {
            for &pid in &live {
                // ESRCH: it died since the scan, which is fine.
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
        live.len()
    }

    /// SIGKILLs the group and every process of the attempt, rescanning until a scan finds none
    /// (bounded by `KILL_ROUNDS`). Returns how many were still alive at the last scan.
    pub(crate) fn kill_until_gone(&self, group: Option<i32>) -> usize {
        self.kill_cgroup();
        for _ in 0..KILL_ROUNDS {
            if self.signal_all(group, &[Signal::SIGKILL]) == 0 {
                return 0;
            }
            std::thread::sleep(ROUND_PAUSE);
        }
        self.scan(group).len()
    }

    /// One pass over the recorded pids, except `skip` (the main process, reaped by its owner):
    /// reaps those that are zombie children of this process, forgets those that are gone,
    /// reused, or zombies another live process will reap. Returns how many are still pending:
    /// alive, or zombies whose parent is itself a recorded process (they will be reparented).
    pub(crate) fn reap(&self, skip: Option<i32>) -> usize {
        let me = std::process::id() as i32;
        let mut seen = self.seen();
        let recorded: Vec<(i32, u64)> = seen.iter().map(|(&pid, &start)| (pid, start)).collect();
        let mut pending = 0;
        for (pid, start) in recorded {
            if Some(pid) == skip {
                continue;
            }
            let stat = match read_stat(pid) {
                Some(stat) if stat.start == start => stat,
                _ => {
                    seen.remove(&pid);
                    continue;
                }
            };
            if !stat.is_dead() {
                pending += 1;
            } else if stat.ppid == me {
                // A zombie child of ours with the recorded start time: this is the process we
                // recorded, and only its parent (us) can reap it, so the pid cannot be reused
                // before this call.
                let mut status = 0;
                // SAFETY: waitpid with a valid out-pointer to a local; WNOHANG never blocks.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                seen.remove(&pid);
            } else if seen.contains_key(&stat.ppid) {
                pending += 1;
            } else {
                seen.remove(&pid);
            }
        }
        pending
    }

    /// Repeats `reap` until nothing is pending (bounded by `SETTLE_ROUNDS`); returns how many
    /// are still pending.
    pub(crate) fn settle(&self, skip: Option<i32>) -> usize {
        let mut pending = self.reap(skip);
        for _ in 0..SETTLE_ROUNDS {
            if pending == 0 {
                break;
            }
            std::thread::sleep(ROUND_PAUSE);
            pending = self.reap(skip);
        }
        pending
    }
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    state: u8,
    ppid: i32,
    pgrp: i32,
    /// Start time in clock ticks since boot: together with the pid, a process identity.
    start: u64,
}

impl Stat {
    /// Zombie or dead: no longer runs, has no environment, only waits to be reaped.
    fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_stat(text: &[u8]) -> Option<Stat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // Fields 6 to 21 (session .. itrealvalue), then 22: starttime.
    let start = fields.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        start,
    })
}

fn read_stat(pid: i32) -> Option<Stat> {
    let mut buf = Vec::with_capacity(512);
    read_into(&format!("/proc/{pid}/stat"), &mut buf).ok()?;
    parse_stat(&buf)
}

fn read_into(path: &str, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    std::fs::File::open(path)?.read_to_end(buf)?;
    Ok(())
}

/// Calls `f(pid, stat, environ)` for every process but this one. `environ` is empty for zombies
/// and for processes whose environment we may not read.
fn for_each_process(mut f: impl FnMut(i32, Stat, &[u8])) -> io::Result<()> {
    let me = std::process::id() as i32;
    let mut stat_buf = Vec::with_capacity(512);
    let mut env_buf = Vec::with_capacity(16 * 1024);
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process can vanish at any point of this: skip it then.
        if read_into(&format!("/proc/{pid}/stat"), &mut stat_buf).is_err() {
            continue;
        }
        let Some(stat) = parse_stat(&stat_buf) else {
            continue;
        };
        env_buf.clear();
        if !stat.is_dead() && read_into(&format!("/proc/{pid}/environ"), &mut env_buf).is_err() {
            env_buf.clear();
        }
        f(pid, stat, &env_buf);
    }
    Ok(())
}

/// Whether a NUL-separated environment block holds exactly `entry`.
fn has_entry(environ: &[u8], entry: &[u8]) -> bool {
    environ.split(|&b| b == 0).any(|e| e == entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_name() {
        let text = b"4242 (we ird) (x) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67";
        let stat = parse_stat(text).expect("parse");
        assert_eq!(
            stat,
            Stat {
                state: b'S',
                ppid: 17,
                pgrp: 4242,
                start: 987654
            }
        );
        assert!(!stat.is_dead());
        let zombie = parse_stat(b"5 (z) Z 1 5 5 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 33 0 0").unwrap();
        assert!(zombie.is_dead());
        assert_eq!(parse_stat(b"5 (z) Z 1"), None);
    }

    #[test]
    fn own_stat_is_readable() {
        let me = std::process::id() as i32;
        let stat = read_stat(me).expect("own stat");
        assert!(!stat.is_dead());
        assert_eq!(stat.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(stat.pgrp, nix::unistd::getpgrp().as_raw());
        assert!(stat.start > 0);
    }

    #[test]
    fn matches_whole_entries_only() {
        let environ = b"A=1\0RUNYARD_ATTEMPT=job/3\0B=2\0";
        assert!(has_entry(environ, b"RUNYARD_ATTEMPT=job/3"));
        assert!(!has_entry(environ, b"RUNYARD_ATTEMPT=job/"));
        assert!(!has_entry(environ, b"RUNYARD_ATTEMPT=job/31"));
        assert!(!has_entry(b"", b"RUNYARD_ATTEMPT=job/3"));
    }
}
