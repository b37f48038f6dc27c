//! A job reaches only what is its own: hostile jobs (real processes under the uids the agent
//! gives them, real cgroups) try to read the agent's secrets and another job's files, signal and
//! ptrace the agent, write into the uv cache and escape their stop; a job over its memory limit
//! fails with `oom`; git credentials go to their host over https only.
//!
//! The isolation tests need the agent to run as root (as on CI); run as another user they check
//! nothing and say so.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

fn root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    eprintln!("not root: jobs run as the agent's user, there is no isolation to test");
    false
}

fn spec(repo: &GitRepo, script: &str) -> Value {
    json!({"repo": repo.url(), "script": script})
}

/// Tries everything named in its JSON argument and prints one line per try: `DENIED name errno`,
/// `LEAKED name what`, `OWN name ok` for its own places, `FACT name value`.
const HOSTILE: &str = r##"
import ctypes, errno, importlib.util, json, os, signal, sys
t = json.loads(sys.argv[1])
def say(kind, name, detail=""):
    print(f"{kind} {name} {detail}", flush=True)
def denied(name, e):
    say("DENIED", name, errno.errorcode.get(e.errno, e.errno))
for name, path in t["read"].items():
    try:
        with open(path, "rb") as f:
            say("LEAKED", name, repr(f.read(120)))
    except OSError as e:
        denied(name, e)
for name, path in t["list"].items():
    try:
        say("LEAKED", name, repr(os.listdir(path)[:5]))
    except OSError as e:
        denied(name, e)
for name, path in t["create"].items():
    try:
        with open(os.path.join(path, "planted-by-a-job"), "w") as f:
            f.write("x")
        say("LEAKED", name, "created a file")
    except OSError as e:
        denied(name, e)
# The job's environment (shared with every job of the same requirements): read-only to it.
import sysconfig
try:
    with open(os.path.join(sysconfig.get_paths()["purelib"], "planted_by_a_job.py"), "w") as f:
        f.write("x")
    say("LEAKED", "env_write", sys.prefix)
except OSError as e:
    denied("env_write", e)
# A file of the venv hardlinked from the uv cache: readable, never writable.
cached = importlib.util.find_spec(t["cached_module"]).origin
say("FACT", "cached_links", os.stat(cached).st_nlink)
with open(cached, "rb") as f:
    f.read(10)
try:
    with open(cached, "ab") as f:
        f.write(b"# tampered by a job\n")
    say("LEAKED", "uv_cache_write", cached)
except OSError as e:
    denied("uv_cache_write", e)
try:
    os.chmod(cached, 0o666)
    say("LEAKED", "uv_cache_chmod", cached)
except OSError as e:
    denied("uv_cache_chmod", e)
pid = t["agent_pid"]
try:
    os.kill(pid, signal.SIGTERM)
    say("LEAKED", "signal", "SIGTERM sent to the agent")
except OSError as e:
    denied("signal", e)
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    say("LEAKED", "ptrace", "attached to the agent")
else:
    say("DENIED", "ptrace", errno.errorcode.get(ctypes.get_errno()))
for name, d in [("home", os.environ["HOME"]), ("tmp", os.environ["TMPDIR"]), ("cwd", os.getcwd())]:
    with open(os.path.join(d, "mine.txt"), "w") as f:
        f.write("mine")
    say("OWN", name, "ok")
with open(os.environ["RUNYARD_REPORT_FILE"], "a") as f:
    f.write('{"type": "metrics", "step": 1, "values": {"own": 1}}\n')
say("OWN", "report", "ok")
say("FACT", "uid", os.getuid())
say("FACT", "gid", os.getgid())
say("FACT", "groups", ",".join(map(str, os.getgroups())))
say("FACT", "env", " ".join(sorted(os.environ)))
"##;

/// Writes secrets into its own directory, says `ready`, and waits to be stopped.
const VICTIM: &str = r##"
import os, sys, time
with open("secret.txt", "w") as f:
    f.write(sys.argv[1])
with open(os.path.join(os.environ["HOME"], "secret.txt"), "w") as f:
    f.write(sys.argv[1])
print("ready", os.getuid(), flush=True)
while True:
    time.sleep(1)
"##;

fn file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reaches_nothing_of_the_agent_or_of_other_jobs() -> anyhow::Result<()> {
    if !root() {
        return Ok(());
    }
    // The git credential sits where jobs could pass (0711): only its own mode protects it.
    let creds = runyard_tests::reachable_tempdir()?;
    let git_token = creds.path().join("git.example.com.token");
    std::fs::write(&git_token, "ghp_runyardIsolationTestSecret0123456789")?;
    std::fs::set_permissions(&git_token, std::fs::Permissions::from_mode(0o600))?;
    let c = TestCluster::builder()
        .agent(
            AgentSpec::new("a1")
                .git_credential(&format!("git.example.com={}", git_token.display())),
        )
        .start()
        .await?;
    let agent_dir = c.agent_dir("a1");
    let repo = GitRepo::new(&[("hostile.py", HOSTILE), ("victim.py", VICTIM)])?;

    // Job B holds a secret in its directory and keeps running.
    let b_secret = "b-secret-7f3a9c1e5d";
    let mut b = spec(&repo, "victim.py");
    b["args"] = json!([b_secret]);
    let b_id = c.submit(b).await?;
    runyard_tests::eventually(LONG, "job B ready", || async {
        c.logs(&b_id).await.ok()?.contains("ready").then_some(())
    })
    .await?;
    let b_dir = agent_dir.join("jobs").join(format!("{b_id}-1"));
    assert!(b_dir.join("src/secret.txt").exists());
    let b_spool = agent_dir.join("jobs/spool").join(&b_id).join("1.log");
    assert!(b_spool.exists(), "{}", b_spool.display());

    let read = json!({
        "agent_credential": agent_dir.join("agent.credential"),
        "agent_lock": agent_dir.join("agent.lock"),
        "admin_token": c.config.data_dir.join("admin.token"),
        "agent_token": c.config.data_dir.join("agent.token"),
        "git_credential": git_token,
        "agent_environ": format!("/proc/{}/environ", std::process::id()),
        "agent_mem": format!("/proc/{}/mem", std::process::id()),
        "other_job_file": b_dir.join("src/secret.txt"),
        "other_job_home": b_dir.join("home/secret.txt"),
        "other_job_log_spool": b_spool,
    });
    let list = json!({
        "agent_data_dir": agent_dir,
        "jobs_dir": agent_dir.join("jobs"),
        "spool_dir": agent_dir.join("jobs/spool"),
        "mirrors": agent_dir.join("mirrors"),
        "other_job_dir": b_dir,
        "uv_cache": runyard_tests::shared_uv_cache(),
    });
    let create = json!({
        "jobs_dir": agent_dir.join("jobs"),
        "agent_data_dir": agent_dir,
        "reporter": agent_dir.join("reporter"),
        "uv_cache": runyard_tests::shared_uv_cache(),
    });
    let targets = json!({
        "read": read, "list": list, "create": create,
        "cached_module": "six",
        "agent_pid": std::process::id(),
    });
    let mut a = spec(&repo, "hostile.py");
    a["args"] = json!([targets.to_string()]);
    a["requirements"] = json!(["six==1.16.0"]);
    let a_id = c.submit(a).await?;
    let job = c.wait_status(&a_id, &["succeeded", "failed"], LONG).await?;
    let logs = c.logs(&a_id).await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{logs}");

    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| !l.starts_with("[runyard]"))
        .collect();
    let leaks: Vec<&&str> = lines.iter().filter(|l| l.starts_with("LEAKED")).collect();
    assert!(
        leaks.is_empty(),
        "the job reached what is not its own: {leaks:#?}"
    );
    let expected: Vec<String> = ["read", "list", "create"]
        .iter()
        .flat_map(|k| {
            targets[k]
                .as_object()
                .unwrap()
                .keys()
                .map(|n| n.to_string())
        })
        .chain(
            [
                "env_write",
                "uv_cache_write",
                "uv_cache_chmod",
                "signal",
                "ptrace",
            ]
            .map(String::from),
        )
        .collect();
    for name in &expected {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("DENIED {name} "))),
            "no denial reported for {name}:\n{logs}"
        );
    }
    for own in ["home", "tmp", "cwd", "report"] {
        assert!(
            lines.contains(&format!("OWN {own} ok").as_str()),
            "{own}: {logs}"
        );
    }
    let fact = |name: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("FACT {name} ")))
            .unwrap_or_else(|| panic!("no fact {name}: {logs}"))
            .to_string()
    };
    let links: u64 = fact("cached_links").parse()?;
    assert!(
        links > 1,
        "the venv file is hardlinked from the uv cache (links: {links})"
    );
    let uid: u32 = fact("uid").parse()?;
    let range = runyard_agent::identity::DEFAULT_JOB_UIDS;
    assert!(
        (range.first..=range.last).contains(&uid),
        "a per-attempt uid: {uid}"
    );
    let job_group = nix::unistd::User::from_name(runyard_agent::identity::JOB_USER)?
        .expect("the job user exists");
    assert_eq!(fact("gid"), job_group.gid.to_string());
    assert_eq!(
        fact("groups"),
        job_group.gid.to_string(),
        "no supplementary group"
    );
    // B runs under another uid than A.
    let b_logs = c.logs(&b_id).await?;
    let b_uid: u32 = b_logs
        .lines()
        .find_map(|l| l.strip_prefix("ready "))
        .expect("B says its uid")
        .trim()
        .parse()?;
    assert_ne!(b_uid, uid, "each running attempt has its own uid");
    assert_eq!(c.job(&a_id).await?["metrics"]["own"], 1.0);

    // No secret ever appears in what the job printed.
    let secrets = [
        file(&agent_dir.join("agent.credential")),
        file(&c.config.data_dir.join("admin.token")),
        file(&c.config.data_dir.join("agent.token")),
        file(&git_token),
        b_secret.to_string(),
    ];
    for s in &secrets {
        assert!(
            !logs.contains(s.trim()),
            "a secret leaked into the job's log"
        );
    }
    // The cache's file is intact.
    assert!(!logs.contains("tampered"));

    c.post(&format!("/api/v1/jobs/{b_id}/stop"), &json!({}))
        .await?;
    c.wait_status(&b_id, &["stopped"], LONG).await?;
    c.shutdown().await
}

/// Forks a grandchild that clears its environment, leaves the session and outlives the job's
/// main process, which exits at once: before any marker scan can see it.
const ESCAPE: &str = r##"
import os, sys, time
pidfile = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve(sys.executable, [sys.executable, "-c",
            "import os, sys, time\n"
            "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
            "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
            "while True: time.sleep(1)\n", pidfile], {})
    os._exit(0)
while not os.path.exists(pidfile):
    time.sleep(0.01)
print("escaped", open(pidfile).read(), flush=True)
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_cleared_its_environment_and_left_its_session_dies_with_the_job()
-> anyhow::Result<()> {
    if !root() {
        return Ok(());
    }
    let exchange = runyard_tests::exchange_dir()?;
    let pidfile = exchange.path().join("escaped.pid");
    let repo = GitRepo::new(&[("escape.py", ESCAPE)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let mut s = spec(&repo, "escape.py");
    s["args"] = json!([pidfile]);
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let pid: i32 = file(&pidfile).trim().parse()?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists(),
        "process {pid} (environment: {:?}) outlived its job",
        String::from_utf8_lossy(&environ)
    );
    c.shutdown().await
}

/// Allocates 1 MiB at a time, for ever.
const HOG: &str = r##"
import time
hoard = []
while True:
    hoard.append(bytearray(1 << 20))
    if len(hoard) % 16 == 0:
        print("allocated", len(hoard), "MiB", flush=True)
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_limit_fails_with_oom() -> anyhow::Result<()> {
    if !root() {
        return Ok(());
    }
    let repo = GitRepo::new(&[("hog.py", HOG), ("small.py", "print('fits')\n")])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let mut s = spec(&repo, "hog.py");
    s["memory"] = json!("64MiB");
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["failure"], "oom", "{job}");
    assert_eq!(job["spec"]["memory"], "64MiB", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("out of memory") && reason.contains("64MiB"),
        "{reason}"
    );
    let logs = c.logs(&id).await?;
    assert!(
        logs.contains("allocated 16 MiB"),
        "it ran until the limit: {logs}"
    );
    assert!(!logs.contains("allocated 80 MiB"), "the limit held: {logs}");
    // Under the limit, a job runs as usual.
    let mut s = spec(&repo, "small.py");
    s["memory"] = json!("64MiB");
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    c.shutdown().await
}
