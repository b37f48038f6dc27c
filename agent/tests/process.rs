//! Job process supervision against real python processes and real signals: output capture,
//! spawn contract, stop leaving nothing behind, leftover cleanup, agent sweep.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use runyard_agent::cgroup::Cgroups;
use runyard_agent::process::{
    ExitOutcome, JobProcess, ProcessSpec, SpawnError, become_subreaper, sweep_agent,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Upper bound for any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

/// A spec that runs `python3 <dir>/main.py <args>` with `script` as main.py.
fn python(dir: &Path, name: &str, script: &str, args: &[&str]) -> ProcessSpec {
    std::fs::write(dir.join("main.py"), script).expect("write script");
    let mut all_args = vec!["main.py".to_string()];
    all_args.extend(args.iter().map(|a| a.to_string()));
    ProcessSpec {
        program: PathBuf::from("python3"),
        args: all_args,
        cwd: dir.to_path_buf(),
        env: vec![(
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )],
        marker: format!("{name}-{}/1", std::process::id()),
        agent_name: format!("agent-{name}-{}", std::process::id()),
        run_as: None,
        cgroup: None,
    }
}

/// Collects every line until the channel closes (the reader is done).
fn collect(mut rx: mpsc::Receiver<Vec<String>>) -> JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(batch) = rx.recv().await {
            all.extend(batch);
        }
        all
    })
}

/// Runs a script to completion and returns its outcome and lines.
async fn run(spec: ProcessSpec) -> (ExitOutcome, Vec<String>) {
    let (tx, rx) = mpsc::channel(16);
    let mut process = JobProcess::spawn(spec, tx).expect("spawn");
    let lines = collect(rx);
    let outcome = tokio::time::timeout(DEADLINE, process.wait())
        .await
        .expect("wait timed out");
    let lines = tokio::time::timeout(DEADLINE, lines)
        .await
        .expect("lines timed out")
        .expect("collector");
    (outcome, lines)
}

/// Reads batches until a line starting with `prefix` arrives; returns that line.
async fn line_starting(rx: &mut mpsc::Receiver<Vec<String>>, prefix: &str) -> String {
    let found = async {
        while let Some(batch) = rx.recv().await {
            if let Some(line) = batch.into_iter().find(|l| l.starts_with(prefix)) {
                return line;
            }
        }
        panic!("output ended before a line starting with {prefix:?}");
    };
    tokio::time::timeout(DEADLINE, found)
        .await
        .expect("line timed out")
}

fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn pids(line: &str) -> Vec<i32> {
    line.split_whitespace()
        .skip(1)
        .map(|p| p.parse().expect("pid"))
        .collect()
}

/// Polls until none of `pids` exists (zombies count as existing).
async fn all_gone(pids: &[i32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !pids.iter().any(|&p| exists(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ten_thousand_lines_arrive_complete_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let script = "for i in range(10000):\n    print(f'line {i}')\n";
    let (outcome, lines) = run(python(dir.path(), "order", script, &[])).await;
    assert_eq!(outcome, ExitOutcome::Exited(0));
    let expected: Vec<String> = (0..10000).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected);
}

#[tokio::test]
async fn carriage_returns_stderr_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys
sys.stdout.write("a\rb\r\nc\n")
sys.stdout.write("\rprogress 1\rprogress 2\n")
print()
print("to stderr", file=sys.stderr)
sys.stdout.buffer.write(b"bad \xff byte\n")
sys.stdout.write("no newline at end")
sys.exit(3)
"#;
    let (outcome, lines) = run(python(dir.path(), "cr", script, &[])).await;
    assert_eq!(outcome, ExitOutcome::Exited(3));
    assert_eq!(outcome.to_string(), "exited with code 3");
    assert_eq!(
        lines,
        [
            "a",
            "b",
            "c",
            // "progress 1" was a redraw right after the redraw "a": coalesced away, and the
            // line that overwrote it is what remains.
            "progress 2",
            "",
            "to stderr",
            "bad \u{fffd} byte",
            "no newline at end"
        ]
    );
}

#[tokio::test]
async fn args_env_cwd_and_stdin_are_as_specified() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import json, os, sys
print(json.dumps({
    "args": sys.argv[1:],
    "cwd": os.getcwd(),
    "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
    "attempt": os.environ.get("RUNYARD_ATTEMPT"),
    "agent": os.environ.get("RUNYARD_AGENT"),
    "custom": os.environ.get("CUSTOM"),
    "home": os.environ.get("HOME"),
    "stdin": sys.stdin.read(),
    "own_group": os.getpgrp() == os.getpid(),
}))
"#;
    let args = ["hello world", "it's \"quoted\"", "$HOME", "*", "", "a\\b"];
    let mut spec = python(dir.path(), "args", script, &args);
    spec.env.push(("CUSTOM".into(), "value with spaces".into()));
    let (marker, agent) = (spec.marker.clone(), spec.agent_name.clone());
    let (outcome, lines) = run(spec).await;
    assert!(outcome.success(), "{outcome}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let seen: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(
        seen,
        serde_json::json!({
            "args": args,
            "cwd": cwd.to_str().unwrap(),
            "unbuffered": "1",
            "attempt": marker,
            "agent": agent,
            "custom": "value with spaces",
            "home": null,
            "stdin": "",
            "own_group": true,
        })
    );
}

#[tokio::test]
async fn spawn_errors_are_specific() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let mut spec = python(dir.path(), "errors", "", &[]);
    spec.program = dir.path().join("no-such-python");
    match JobProcess::spawn(spec.clone(), tx.clone()) {
        Err(SpawnError::Exec { program, .. }) => assert_eq!(program, spec.program),
        other => panic!("expected Exec error, got {:?}", other.err()),
    }
    spec.marker.clear();
    match JobProcess::spawn(spec, tx) {
        Err(SpawnError::InvalidSpec { field, .. }) => assert_eq!(field, "marker"),
        other => panic!("expected InvalidSpec error, got {:?}", other.err()),
    }
}

/// A main process ignoring SIGTERM, a `setsid` grandchild and a double-forked daemon that both
/// ignore SIGTERM too: after `stop`, none of them exists, not even as a zombie.
#[tokio::test]
async fn stop_leaves_nothing_behind() {
    become_subreaper().expect("subreaper");
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
loop = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)"
grandchild = subprocess.Popen([sys.executable, "-c", loop], start_new_session=True)
r, w = os.pipe()
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, b"%d" % os.getpid())
        while True:
            time.sleep(1)
    os._exit(0)
os.waitpid(first, 0)
daemon = int(os.read(r, 32))
print(f"pids {os.getpid()} {grandchild.pid} {daemon}")
while True:
    time.sleep(1)
"#;
    let (tx, mut rx) = mpsc::channel(16);
    let mut process = JobProcess::spawn(python(dir.path(), "stop", script, &[]), tx).unwrap();
    let pids = pids(&line_starting(&mut rx, "pids ").await);
    assert_eq!(pids.len(), 3);
    assert_eq!(pids[0], process.pid() as i32);
    assert!(pids.iter().all(|&p| exists(p)));
    let rest = collect(rx);

    let grace = Duration::from_secs(1);
    let started = Instant::now();
    let outcome = process.stop(grace).await;
    let took = started.elapsed();

    assert_eq!(outcome, ExitOutcome::Signaled(9));
    assert_eq!(outcome.to_string(), "killed by signal 9 (SIGKILL)");
    let left: Vec<i32> = pids.iter().copied().filter(|&p| exists(p)).collect();
    assert!(left.is_empty(), "processes left after stop: {left:?}");
    assert!(
        took >= grace,
        "stop returned before the grace period: {took:?}"
    );
    assert!(took <= grace + Duration::from_secs(1), "stop took {took:?}");
    tokio::time::timeout(DEADLINE, rest).await.unwrap().unwrap();
    // Stopping again is a no-op with the same answer.
    assert_eq!(process.stop(grace).await, outcome);
}

/// A script that terminates on SIGTERM is stopped without waiting for the grace period.
#[tokio::test]
async fn stop_is_quick_when_the_job_obeys_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import time\nprint('ready')\nwhile True:\n    time.sleep(1)\n";
    let (tx, mut rx) = mpsc::channel(16);
    let mut process = JobProcess::spawn(python(dir.path(), "quick", script, &[]), tx).unwrap();
    line_starting(&mut rx, "ready").await;
    let rest = collect(rx);
    let started = Instant::now();
    let outcome = process.stop(Duration::from_secs(10)).await;
    assert_eq!(outcome, ExitOutcome::Signaled(15));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    tokio::time::timeout(DEADLINE, rest).await.unwrap().unwrap();
}

/// The main process exits on its own while a daemon it started (ignoring SIGTERM, holding the
/// output pipe) keeps running: `wait` returns with the main exit code and the daemon is gone.
#[tokio::test]
async fn wait_kills_leftovers_of_a_finished_job() {
    become_subreaper().expect("subreaper");
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import os, signal, sys, time
r, w = os.pipe()
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, b"%d" % os.getpid())
        while True:
            # One write per line: two processes share the pipe, and print() may write a
            # line and its newline separately, so lines could interleave mid-line.
            os.write(1, b"still here\n")
            time.sleep(0.2)
    os._exit(0)
os.waitpid(first, 0)
os.write(1, b"daemon %d\n" % int(os.read(r, 32)))
sys.exit(7)
"#;
    let (tx, mut rx) = mpsc::channel(16);
    let mut process = JobProcess::spawn(python(dir.path(), "leftover", script, &[]), tx).unwrap();
    let daemon = pids(&line_starting(&mut rx, "daemon ").await)[0];
    let rest = collect(rx);
    let outcome = tokio::time::timeout(DEADLINE, process.wait())
        .await
        .expect("wait timed out");
    assert_eq!(outcome, ExitOutcome::Exited(7));
    assert!(!exists(daemon), "daemon {daemon} survived the job");
    assert!(!exists(process.pid() as i32));
    tokio::time::timeout(DEADLINE, rest).await.unwrap().unwrap();
}

/// Dropping an unfinished JobProcess kills everything of the attempt in the background.
#[tokio::test]
async fn drop_kills_the_attempt() {
    become_subreaper().expect("subreaper");
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"], start_new_session=True)
print(f"pids {os.getpid()} {child.pid}")
while True:
    time.sleep(1)
"#;
    let (tx, mut rx) = mpsc::channel(16);
    let process = JobProcess::spawn(python(dir.path(), "drop", script, &[]), tx).unwrap();
    let pids = pids(&line_starting(&mut rx, "pids ").await);
    drop(process);
    assert!(
        all_gone(&pids, Duration::from_secs(5)).await,
        "left after drop: {pids:?}"
    );
}

#[tokio::test]
async fn sweep_agent_kills_marked_processes_only() {
    let name = format!("sweep-{}", std::process::id());
    let sleeper = |agent: &str| {
        std::process::Command::new("sleep")
            .arg("60")
            .env("RUNYARD_AGENT", agent)
            .spawn()
            .expect("sleep")
    };
    let mut marked = sleeper(&name);
    let mut other = sleeper(&format!("{name}-other"));
    let mut unmarked = std::process::Command::new("sleep")
        .arg("60")
        .env_remove("RUNYARD_AGENT")
        .spawn()
        .expect("sleep");

    let killed = tokio::task::spawn_blocking({
        let name = name.clone();
        move || sweep_agent(&name)
    })
    .await
    .unwrap();

    assert_eq!(killed, 1);
    assert!(all_gone(&[marked.id() as i32], Duration::from_secs(5)).await);
    // It was our child: the sweep reaped it, or (on a loaded machine, if it died after the
    // sweep's last look) it is a zombie killed by SIGKILL. Either way it ran no further.
    match marked.try_wait() {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ECHILD)),
        Ok(Some(status)) => {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        }
        Ok(None) => panic!("the marked process is still running"),
    }
    assert!(
        other.try_wait().unwrap().is_none(),
        "other agent's process was killed"
    );
    assert!(
        unmarked.try_wait().unwrap().is_none(),
        "unmarked process was killed"
    );
    for child in [&mut other, &mut unmarked] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Smoke test of output throughput: many short lines through pipe, splitter and channel.
/// Prints MB/s; no timing assertion (debug builds are much slower than release).
#[tokio::test]
async fn throughput_of_short_lines() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys
chunk = b"".join(b"%08d some log text\n" % i for i in range(10000))
out = sys.stdout.buffer
for _ in range(300):
    out.write(chunk)
"#;
    let (tx, mut rx) = mpsc::channel::<Vec<String>>(64);
    let started = Instant::now();
    let mut process = JobProcess::spawn(python(dir.path(), "throughput", script, &[]), tx).unwrap();
    let counter = tokio::spawn(async move {
        let (mut lines, mut bytes) = (0usize, 0usize);
        while let Some(batch) = rx.recv().await {
            lines += batch.len();
            bytes += batch.iter().map(|l| l.len() + 1).sum::<usize>();
        }
        (lines, bytes)
    });
    let outcome = tokio::time::timeout(Duration::from_secs(120), process.wait())
        .await
        .expect("wait timed out");
    let (lines, bytes) = counter.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(outcome.success(), "{outcome}");
    assert_eq!(lines, 3_000_000);
    assert_eq!(bytes, 3_000_000 * 23);
    println!(
        "throughput: {:.1} MB/s, {:.2} M lines/s ({} bytes in {:.2} s)",
        bytes as f64 / secs / 1e6,
        lines as f64 / secs / 1e6,
        bytes,
        secs
    );
}

/// A grandchild that leaves the session, clears its environment and ignores SIGTERM, while the
/// main process exits at once: before any scan can record it, and with nothing that marks it.
const ESCAPE: &str = r#"
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve(sys.executable, [sys.executable, "-c",
            "import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
            "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
            "while True: time.sleep(1)\n", sys.argv[1]], {})
    os._exit(0)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
"#;

/// Runs `ESCAPE` in `cgroups`' attempt cgroup: once `wait` returns the escaped process is gone
/// (reaped, not a zombie) and the cgroup removed. Also shows that without a cgroup it escapes.
async fn an_escaped_process_dies_with_its_cgroup(cgroups: &Cgroups) {
    become_subreaper().expect("subreaper");
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("escaped.pid");
    let name = format!("escape-{}", std::process::id());
    let cgroup = Arc::new(cgroups.create(&name, None).unwrap().expect("a cgroup"));
    let mut spec = python(dir.path(), &name, ESCAPE, &[pidfile.to_str().unwrap()]);
    spec.cgroup = Some(cgroup.clone());
    let (outcome, _) = run(spec).await;
    assert_eq!(outcome, ExitOutcome::Exited(0));
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().parse().unwrap();
    assert!(
        !exists(pid),
        "the escaped process {pid} outlived its attempt"
    );
    assert!(cgroup.pids().is_empty());
    assert!(
        cgroups.create(&name, None).unwrap().is_some(),
        "the name is free again: the old cgroup was removed"
    );

    // The same without a cgroup: the escaped process survives the attempt (then it is killed).
    std::fs::remove_file(&pidfile).unwrap();
    let (outcome, _) = run(python(
        dir.path(),
        "escape-free",
        ESCAPE,
        &[pidfile.to_str().unwrap()],
    ))
    .await;
    assert_eq!(outcome, ExitOutcome::Exited(0));
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().parse().unwrap();
    let escaped = exists(pid);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    assert!(
        escaped,
        "without a cgroup the marker sweep cannot see it (the reason for cgroups)"
    );
    let leftover = cgroups.create(&name, None).unwrap().unwrap();
    leftover.remove().unwrap();
}

fn root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[tokio::test]
async fn cgroup_v1_catches_an_escaped_process() {
    let cgroups = Cgroups::detect(&format!("process-test-v1@{}", std::process::id()));
    if !root() || cgroups.mode() != "v1" {
        eprintln!(
            "no cgroup v1 here (mode {}): nothing to test",
            cgroups.mode()
        );
        return;
    }
    an_escaped_process_dies_with_its_cgroup(&cgroups).await;
}

/// The v2 code path (cgroup.procs before exec, cgroup.kill, removal) on the unified hierarchy,
/// also where agents use v1 (a hybrid host: no controllers needed for this).
#[tokio::test]
async fn cgroup_v2_catches_an_escaped_process() {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let unified = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    });
    let (true, Some(unified)) = (root(), unified) else {
        eprintln!("no cgroup2 hierarchy to write to: nothing to test");
        return;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    let subtree = unified
        .join(path.trim_start_matches('/'))
        .join(format!("runyard-process-test-v2-{}", std::process::id()));
    std::fs::create_dir(&subtree).unwrap();
    let cgroups = Cgroups::v2_at(subtree.clone());
    an_escaped_process_dies_with_its_cgroup(&cgroups).await;
    drop(cgroups);
    assert!(!subtree.exists(), "the agent's subtree goes with it");
}
