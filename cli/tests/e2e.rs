//! End-to-end tests of the built `runyard` binary: `up`, `controller` and `agent` as real
//! processes on free loopback ports, driven by the real client commands, with real jobs from
//! git repositories made at test time.
//!
//! Each test owns a `Sandbox` (temp HOME, data dirs, log files printed on failure); every process
//! it starts, job processes included, is killed when the test ends, even on panic. No fixed
//! sleeps: every wait polls with a deadline, and each test stays well under a minute.

mod common;

use std::path::Path;
use std::time::Duration;

use runyard_tests::fixture::GitRepo;
use serde_json::Value;

use common::{AGENT_MARK, ATTEMPT_MARK, Proc, Sandbox, eventually, free_port};

/// Time for a server to start and answer, or for agents to connect.
const STARTUP: Duration = Duration::from_secs(30);
/// Time for a short job to finish or change state.
const JOB: Duration = Duration::from_secs(30);

/// Prints each argument on its own line: shows that arguments arrive verbatim, without a shell.
const HELLO: &str = "import sys\nfor a in sys.argv[1:]:\n    print(f\"arg: {a}\")\n";
const FAIL: &str = "import sys\nprint('about to fail')\nsys.exit(3)\n";
const SLEEP: &str = "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n";
/// Ten numbered lines over about 5 s. When its output pipe breaks (its agent died) it lingers
/// for a minute, like a job process that outlives its agent, so only a sweep ends it early.
const SLOW: &str = "\
import time
orphaned = False
for i in range(10):
    try:
        print(f'line {i}', flush=True)
    except BrokenPipeError:
        orphaned = True
        break
    time.sleep(0.5)
if orphaned:
    time.sleep(60)
";
/// `COUNTED_LINES` numbered lines over about 8 s.
const COUNTED: &str = "\
import time
for i in range(40):
    print(f'line {i}', flush=True)
    time.sleep(0.2)
";
const COUNTED_LINES: usize = 40;

fn numbered(n: usize) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The value of `key` in `runyard status` text (`key: value` lines).
fn field<'a>(details: &'a str, key: &str) -> &'a str {
    details
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no `{key}` in\n{details}"))
        .trim()
}

/// `runyard agents --json` entries.
fn agents(sb: &mut Sandbox) -> Vec<Value> {
    let out = sb.ok(&["agents", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["agents"].as_array().cloned().unwrap_or_default()
}

/// Waits until every agent in `names` is connected.
fn wait_connected(sb: &mut Sandbox, names: &[&str]) {
    eventually(STARTUP, &format!("agents {names:?} to connect"), || {
        let list = agents(sb);
        names
            .iter()
            .all(|n| {
                list.iter()
                    .any(|a| a["name"] == *n && a["connected"] == Value::Bool(true))
            })
            .then_some(())
    });
}

/// Submits with `--json` and returns the job id.
fn submit(sb: &mut Sandbox, repo: &GitRepo, script: &str) -> String {
    let out = sb.ok(&[
        "submit",
        "--json",
        "--repo",
        &repo.url(),
        "--script",
        script,
    ]);
    let job: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    job["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("no id in {out}"))
        .to_string()
}

/// Waits until the job runs and its log holds `line`.
fn wait_running_with(sb: &mut Sandbox, id: &str, line: &str) -> Value {
    eventually(
        JOB,
        &format!("job {id} running with `{line}` in its log"),
        || {
            let job = sb.job(id);
            let running = job["status"] == "running";
            (running && sb.ok(&["logs", id]).lines().any(|l| l == line)).then_some(job)
        },
    )
}

/// Starts `runyard controller` (TLS with the data dir's CA) and waits until it answers with its
/// admin token; sets the client environment for it (https:// URL, `RUNYARD_CA`).
fn start_controller(sb: &mut Sandbox, data: &Path, http: u16, grpc: u16, extra: &[&str]) -> Proc {
    let ca = data.join("tls").join("ca.crt");
    start_controller_with(sb, data, http, grpc, extra, &ca)
}

/// `start_controller` whose clients trust `ca`.
fn start_controller_with(
    sb: &mut Sandbox,
    data: &Path,
    http: u16,
    grpc: u16,
    extra: &[&str],
    ca: &Path,
) -> Proc {
    let data_arg = data.display().to_string();
    let (http_arg, grpc_arg) = (addr(http), addr(grpc));
    let mut args = vec![
        "controller",
        "--data-dir",
        &data_arg,
        "--http",
        &http_arg,
        "--grpc",
        &grpc_arg,
    ];
    args.extend_from_slice(extra);
    let mut ctl = sb.spawn("controller", &args);
    let token = eventually(STARTUP, "the controller's admin token", || {
        std::fs::read_to_string(data.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });
    sb.set_client_env("RUNYARD_CONTROLLER", &format!("https://{http_arg}"));
    sb.set_client_env("RUNYARD_CA", &ca.display().to_string());
    sb.set_client_env("RUNYARD_TOKEN", &token);
    eventually(STARTUP, "the controller to answer", || {
        assert!(
            ctl.wait_exit(Duration::ZERO).is_none(),
            "the controller exited:\n{}",
            ctl.stderr()
        );
        (sb.run(&["agents"]).code == Some(0)).then_some(())
    });
    ctl
}

/// Starts `runyard agent NAME` with its own data dir, dialing the controller over TLS with the
/// controller's join token file (which pins its CA).
fn start_agent(sb: &mut Sandbox, name: &str, grpc: u16, data: &Path, dir: &Path) -> Proc {
    let controller = format!("https://{}", addr(grpc));
    let token_file = data.join("agent.token").display().to_string();
    agent_with(sb, name, &controller, &["--token-file", &token_file], dir)
}

/// Starts `runyard agent NAME` dialing `controller` with the token flags given.
fn agent_with(sb: &mut Sandbox, name: &str, controller: &str, token: &[&str], dir: &Path) -> Proc {
    let dir = dir.display().to_string();
    let mut args = vec!["agent", "--controller", controller];
    args.extend_from_slice(token);
    args.extend_from_slice(&[
        "--name",
        name,
        "--data-dir",
        &dir,
        "--compute",
        "cpu-small:2",
    ]);
    sb.spawn(name, &args)
}

/// sha256 of the first certificate of a PEM file, in hex: the fingerprint a join token carries.
fn fingerprint(pem_file: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = CertificateDer::from_pem_file(pem_file)
        .unwrap_or_else(|e| panic!("{}: {e:?}", pem_file.display()));
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

/// The join token in a controller's `agent.token`: (fingerprint, secret).
fn join_token(data: &Path) -> (String, String) {
    let text = std::fs::read_to_string(data.join("agent.token")).expect("agent.token");
    let (fp, secret) = text
        .trim()
        .strip_prefix("RY1")
        .and_then(|t| t.split_once("::"))
        .unwrap_or_else(|| panic!("a join token without a CA fingerprint: {text}"));
    (fp.to_string(), secret.to_string())
}

/// Waits until the log of `p` contains `needle`; fails early if `p` exits without it.
fn wait_log(p: &mut Proc, needle: &str) -> String {
    eventually(
        STARTUP,
        &format!("`{needle}` in the log of {}", p.name),
        || {
            let log = p.stderr();
            if log.contains(needle) {
                return Some(log);
            }
            assert!(
                p.wait_exit(Duration::ZERO).is_none() || p.stderr().contains(needle),
                "{} exited without saying `{needle}`:\n{}",
                p.name,
                p.stderr()
            );
            None
        },
    )
}

/// A TCP server that records what each connection sends, answers like a plain HTTP/2 server
/// (an empty SETTINGS frame) and closes: the stand-in for a controller run with `--no-tls`.
fn raw_listener() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = vec![0u8; 64 << 10];
            let n = conn.read(&mut buf).unwrap_or(0);
            record.lock().unwrap().push(buf[..n].to_vec());
            let _ = conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        }
    });
    (port, seen)
}

#[test]
fn up_runs_jobs_for_the_client_commands() {
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("hello.py", HELLO), ("fail.py", FAIL), ("sleep.py", SLEEP)])
        .expect("git fixture");
    let data = sb.path().join("data");
    let (http, grpc) = (free_port(), free_port());
    let data_arg = data.display().to_string();
    let mut up = sb.spawn(
        "up",
        &[
            "up",
            "--data-dir",
            &data_arg,
            "--http",
            &addr(http),
            "--grpc",
            &addr(grpc),
        ],
    );

    // The banner: where the API is and the token, as lines to paste into a shell.
    let banner = eventually(STARTUP, "the banner of runyard up", || {
        assert!(
            up.wait_exit(Duration::ZERO).is_none(),
            "runyard up exited:\n{}",
            up.stderr()
        );
        let out = up.stdout();
        let done = out.lines().any(|l| l.starts_with("export RUNYARD_TOKEN="));
        (done && out.ends_with('\n')).then_some(out)
    });
    let export = |key: &str| {
        banner
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {key}=")))
            .unwrap_or_else(|| panic!("no export of {key} in\n{banner}"))
            .to_string()
    };
    let controller = export("RUNYARD_CONTROLLER");
    let token = export("RUNYARD_TOKEN");
    assert_eq!(controller, format!("http://127.0.0.1:{http}"), "{banner}");
    let stored = std::fs::read_to_string(data.join("admin.token")).expect("admin.token");
    assert_eq!(token, stored.trim(), "the printed token is the stored one");
    sb.set_client_env("RUNYARD_CONTROLLER", &controller);
    sb.set_client_env("RUNYARD_TOKEN", &token);

    // `agents` lists the local agent, named for the host.
    let host = host_name();
    wait_connected(&mut sb, &[&host]);
    let table = sb.ok(&["agents"]);
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(host.as_str()))
        .unwrap_or_else(|| panic!("no agent {host} in\n{table}"));
    assert_eq!(row.split_whitespace().nth(1), Some("yes"), "{table}");

    // submit --follow prints the id, then the script's output; exit 0.
    let url = repo.url();
    let r = sb.run(&[
        "submit",
        "--repo",
        &url,
        "--script",
        "hello.py",
        "--follow",
        "--",
        "two words",
        "it's",
    ]);
    assert_eq!(r.code, Some(0), "{r}");
    let id = r.stdout.lines().next().unwrap_or_default().to_string();
    let hello_out = "arg: two words\narg: it's\n";
    assert_eq!(r.stdout, format!("{id}\n{hello_out}"), "{r}");
    assert!(r.stderr.contains(&format!("job {id} succeeded")), "{r}");

    // ls: the job succeeded.
    let table = sb.ok(&["ls"]);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no {id} in\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(row.get(1..3), Some(&["hello", "succeeded"][..]), "{table}");

    // status: the commit the default branch resolved to.
    let details = sb.ok(&["status", &id]);
    assert_eq!(field(&details, "commit"), repo.head().unwrap(), "{details}");
    assert_eq!(field(&details, "status"), "succeeded", "{details}");
    assert_eq!(
        field(&details, "args"),
        "'two words' 'it'\\''s'",
        "{details}"
    );

    // logs: exactly the script's lines.
    assert_eq!(sb.ok(&["logs", &id]), hello_out);

    // submit --json: the API's job, with an id.
    let out = sb.ok(&[
        "submit", "--json", "--repo", &url, "--script", "hello.py", "--", "x",
    ]);
    let job: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let json_id = job["id"].as_str().expect("id").to_string();
    assert!(!json_id.is_empty() && json_id != id, "{out}");
    assert_eq!(job["spec"]["args"], serde_json::json!(["x"]), "{out}");
    sb.wait_status(&json_id, &["succeeded"], JOB);
    assert_eq!(sb.ok(&["logs", &json_id]), "arg: x\n");

    // A failing script: --follow exits with the script's exit code.
    let r = sb.run(&["submit", "--repo", &url, "--script", "fail.py", "--follow"]);
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stdout.ends_with("\nabout to fail\n"), "{r}");
    let fail_id = r.stdout.lines().next().unwrap_or_default().to_string();
    let failed = sb.job(&fail_id);
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["exit_code"], 3, "{failed:#}");

    // stop on a running job: stopped, and none of its processes is left.
    let sleep_id = submit(&mut sb, &repo, "sleep.py");
    wait_running_with(&mut sb, &sleep_id, "sleeping");
    let mark = format!("{ATTEMPT_MARK}{sleep_id}/1");
    assert!(!sb.processes_with(&mark).is_empty(), "the job process runs");
    let out = sb.ok(&["stop", &sleep_id]);
    assert!(out.starts_with(&format!("{sleep_id} ")), "{out}");
    let stopped = sb.wait_status(&sleep_id, &["stopped", "failed", "succeeded"], JOB);
    assert_eq!(stopped["status"], "stopped", "{stopped:#}");
    assert!(
        sb.processes_with(&mark).is_empty(),
        "a stopped job's processes are gone once it shows stopped"
    );

    // Bad input: one line naming the field, non-zero exit, nothing submitted.
    let before = sb.ok(&["ls", "--json"]);
    let r = sb.run(&["submit", "--repo", "notaurl", "--script", "x.py"]);
    assert!(matches!(r.code, Some(c) if c != 0), "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "{r}");
    assert!(r.stderr.starts_with("error: repo"), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
    let after = sb.ok(&["ls", "--json"]);
    let count = |s: &str| {
        let v: Value = serde_json::from_str(s).expect("ls JSON");
        v["jobs"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(count(&before), 4);
    assert_eq!(count(&after), 4, "a refused submit adds no job");

    // SIGTERM: a clean exit.
    up.signal("TERM");
    let status = up.wait_exit(JOB).expect("runyard up stops on SIGTERM");
    assert!(status.success(), "{status:?}:\n{}", up.stderr());
}

#[test]
fn job_of_a_killed_agent_reruns_elsewhere_and_its_orphan_is_swept() {
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("slow.py", SLOW)]).expect("git fixture");
    let data = sb.path().join("controller");
    let (http, grpc) = (free_port(), free_port());
    let _ctl = start_controller(&mut sb, &data, http, grpc, &["--agent-ttl", "2s"]);
    let dirs = [sb.path().join("a1"), sb.path().join("a2")];
    let mut agents = [
        start_agent(&mut sb, "a1", grpc, &data, &dirs[0]),
        start_agent(&mut sb, "a2", grpc, &data, &dirs[1]),
    ];
    wait_connected(&mut sb, &["a1", "a2"]);

    let id = submit(&mut sb, &repo, "slow.py");
    let job = wait_running_with(&mut sb, &id, "line 1");
    let victim_name = job["agent"].as_str().expect("agent").to_string();
    let (victim, survivor) = if victim_name == "a1" { (0, 1) } else { (1, 0) };
    let survivor_name = agents[survivor].name.clone();
    let orphan_mark = format!(
        "{AGENT_MARK}{victim_name}@{}",
        sb.canonical(&dirs[victim]).display()
    );
    assert!(
        !sb.processes_with(&orphan_mark).is_empty(),
        "the job process of {victim_name} carries {orphan_mark}"
    );

    // SIGKILL the agent: no goodbye, no stop of its job.
    agents[victim].kill();
    let done = sb.wait_status(
        &id,
        &["succeeded", "failed", "stopped"],
        Duration::from_secs(40),
    );
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["agent"], survivor_name.as_str(), "{done:#}");
    assert_eq!(done["attempt"], 2, "{done:#}");
    assert_eq!(done["lost_count"], 1, "{done:#}");
    // attempts: each placement keeps its own outcome.
    let table = sb.ok(&["attempts", &id]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert_eq!(rows[0][..2], ["1", victim_name.as_str()], "{table}");
    assert!(rows[0].contains(&"lost"), "{table}");
    assert_eq!(rows[1][..2], ["2", survivor_name.as_str()], "{table}");
    assert!(rows[1].contains(&"succeeded"), "{table}");
    let json: Value = serde_json::from_str(&sb.ok(&["attempts", &id, "--json"])).expect("json");
    assert_eq!(json["placements"][0]["status"], "lost", "{json:#}");
    assert_eq!(json["placements"][1]["exit_code"], 0, "{json:#}");
    assert_eq!(
        sb.ok(&["logs", &id]),
        numbered(10),
        "the rerun's log, complete"
    );

    // The orphan outlives its agent (it lingers once its output breaks) ...
    let orphan_was_alive = !sb.processes_with(&orphan_mark).is_empty();
    // ... until the agent comes back with the same data dir and sweeps it.
    let restarted = start_agent(&mut sb, &victim_name, grpc, &data, &dirs[victim]);
    agents[victim] = restarted;
    wait_connected(&mut sb, &[&victim_name, &survivor_name]);
    eventually(
        Duration::from_secs(10),
        "the orphan of the killed agent to be gone",
        || sb.processes_with(&orphan_mark).is_empty().then_some(()),
    );
    if orphan_was_alive {
        let log = agents[victim].stderr();
        assert!(
            log.contains("killed processes left by a previous run of this agent"),
            "the orphan was alive before the restart, so the restarted agent swept it:\n{log}"
        );
    }
    // The finished job stays finished on the agent's return.
    assert_eq!(sb.job(&id)["status"], "succeeded");
}

#[test]
fn follow_survives_a_controller_restart_with_every_line_once() {
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("counted.py", COUNTED)]).expect("git fixture");
    let data = sb.path().join("controller");
    let (http, grpc) = (free_port(), free_port());
    let mut ctl = start_controller(&mut sb, &data, http, grpc, &[]);
    let agent_dir = sb.path().join("a1");
    let _agent = start_agent(&mut sb, "a1", grpc, &data, &agent_dir);
    wait_connected(&mut sb, &["a1"]);

    let id = submit(&mut sb, &repo, "counted.py");
    let mut follower = sb.spawn_client("logs-f", &["logs", "-f", &id]);
    eventually(JOB, "the follower to print 5 lines", || {
        (follower.stdout().lines().count() >= 5).then_some(())
    });

    // Restart the controller on the same ports and data dir while the job runs.
    let token_before = join_token(&data);
    let ca_before = std::fs::read(data.join("tls/ca.crt")).expect("ca.crt");
    ctl.signal("TERM");
    let status = ctl.wait_exit(JOB).expect("the controller stops on SIGTERM");
    assert!(status.success(), "{status:?}:\n{}", ctl.stderr());
    assert!(
        follower.stdout().lines().count() < COUNTED_LINES,
        "the job was still running at the restart"
    );
    let _ctl = start_controller(&mut sb, &data, http, grpc, &[]);
    assert_eq!(
        std::fs::read(data.join("tls/ca.crt")).expect("ca.crt"),
        ca_before,
        "the CA is made once and kept"
    );
    assert_eq!(
        join_token(&data),
        token_before,
        "the same pinned fingerprint"
    );

    let status = follower
        .wait_exit(Duration::from_secs(45))
        .expect("logs -f ends when the job does");
    assert!(status.success(), "{status:?}:\n{}", follower.stderr());
    assert_eq!(
        follower.stdout(),
        numbered(COUNTED_LINES),
        "every line once, in order"
    );
    let job = sb.job(&id);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 1, "the job kept running: {job:#}");
    assert_eq!(job["lost_count"], 0, "{job:#}");
}

#[test]
fn agents_pin_the_controllers_ca_and_https_never_downgrades() {
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("hello.py", HELLO)]).expect("git fixture");
    let data = sb.path().join("controller");
    let (http, grpc) = (free_port(), free_port());
    let _ctl = start_controller(&mut sb, &data, http, grpc, &[]);

    // The join token carries the sha256 of the CA certificate; key files are private.
    let ca = data.join("tls/ca.crt");
    let (fp, secret) = join_token(&data);
    assert_eq!(fp, fingerprint(&ca));
    use std::os::unix::fs::PermissionsExt;
    for key in ["tls/ca.key", "tls/server.key", "agent.token"] {
        let mode = std::fs::metadata(data.join(key))
            .expect(key)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }

    // An agent with the token and an https:// URL, nothing else: enrols and runs a job.
    let a1_dir = sb.path().join("a1");
    let _a1 = start_agent(&mut sb, "a1", grpc, &data, &a1_dir);
    wait_connected(&mut sb, &["a1"]);
    let id = sb.ok(&[
        "submit",
        "--repo",
        &repo.url(),
        "--script",
        "hello.py",
        "--follow",
        "--",
        "tls",
    ]);
    assert_eq!(id.lines().nth(1), Some("arg: tls"), "{id}");

    // A token pinning another CA: refused, saying which fingerprints differ.
    let wrong = format!(
        "{}{}",
        if fp.starts_with('0') { "1" } else { "0" },
        &fp[1..]
    );
    let url = format!("https://{}", addr(grpc));
    let bad_token = format!("RY1{wrong}::{secret}");
    let bad_dir = sb.path().join("bad");
    let mut bad = agent_with(&mut sb, "bad", &url, &["--token", &bad_token], &bad_dir);
    wait_log(
        &mut bad,
        &format!(
            "the controller's CA does not match the join token: fingerprint {fp}, token expects {wrong}"
        ),
    );
    assert!(
        agents(&mut sb).iter().all(|a| a["name"] != "bad"),
        "the agent with the wrong pin never enrolled"
    );

    // https:// to a plain server: a clear error, never a plain retry; the server sees a TLS
    // ClientHello and never the token or the agent's credential.
    let (raw, seen) = raw_listener();
    let token_file = data.join("agent.token").display().to_string();
    let raw_url = format!("https://{}", addr(raw));
    let plain_dir = sb.path().join("plain");
    let mut plain = agent_with(
        &mut sb,
        "plain",
        &raw_url,
        &["--token-file", &token_file],
        &plain_dir,
    );
    let log = wait_log(&mut plain, "the server did not answer in TLS");
    assert!(log.contains("Nothing secret was sent"), "{log}");
    eventually(STARTUP, "two attempts at the plain server", || {
        (seen.lock().unwrap().len() >= 2).then_some(())
    });
    let credential = std::fs::read_to_string(sb.path().join("plain/agent.credential"))
        .expect("the agent's credential")
        .trim()
        .to_string();
    for bytes in seen.lock().unwrap().iter() {
        assert_eq!(
            bytes.first(),
            Some(&0x16),
            "a TLS handshake record: {bytes:?}"
        );
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(&secret),
            "the join token reached the plain server"
        );
        assert!(
            !text.contains(&credential),
            "the credential reached the plain server"
        );
        assert!(
            !text.contains("authorization"),
            "no request was sent in clear"
        );
    }
    // A pinned token with an http:// URL is a configuration error before any connection.
    let before = seen.lock().unwrap().len();
    let r = sb.run(&[
        "agent",
        "--controller",
        &format!("http://{}", addr(raw)),
        "--token-file",
        &token_file,
        "--data-dir",
        &sb.path().join("clear").display().to_string(),
        "--name",
        "clear",
    ]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("is plain http://: use https://"), "{r}");
    assert_eq!(seen.lock().unwrap().len(), before, "nothing was dialed");

    // The CLI: without the CA it refuses the controller and says how to trust it ...
    sb.remove_client_env("RUNYARD_CA");
    let r = sb.run(&["agents"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("cannot verify the TLS certificate of the controller"),
        "{r}"
    );
    assert!(r.stderr.contains("--ca"), "{r}");
    // ... trusts it with --ca ...
    let ca_arg = ca.display().to_string();
    let table = sb.ok(&["agents", "--ca", &ca_arg]);
    assert!(table.lines().any(|l| l.starts_with("a1 ")), "{table}");
    // ... and an http:// URL to the TLS port is told to use https://.
    let r = sb.run(&["agents", "--controller", &format!("http://{}", addr(http))]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("use an https:// URL"), "{r}");
}

#[test]
fn an_operator_certificate_is_served_and_pinned() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("hello.py", HELLO)]).expect("git fixture");
    // The operator's own CA and a server certificate it issued, chain file leaf first.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Operator CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let pki = sb.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let (chain, key, ca) = (
        pki.join("chain.pem"),
        pki.join("key.pem"),
        pki.join("ca.pem"),
    );
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ca_cert.pem()).unwrap();

    let data = sb.path().join("controller");
    let (http, grpc) = (free_port(), free_port());
    let (chain_arg, key_arg) = (chain.display().to_string(), key.display().to_string());
    let _ctl = start_controller_with(
        &mut sb,
        &data,
        http,
        grpc,
        &["--tls-cert", &chain_arg, "--tls-key", &key_arg],
        &ca,
    );
    assert!(
        !data.join("tls/ca.key").exists(),
        "no CA of its own is made"
    );
    let (fp, _) = join_token(&data);
    assert_eq!(fp, fingerprint(&ca), "the token pins the operator's CA");

    let a1_dir = sb.path().join("a1");
    let _a1 = start_agent(&mut sb, "a1", grpc, &data, &a1_dir);
    wait_connected(&mut sb, &["a1"]);
    let id = submit(&mut sb, &repo, "hello.py");
    sb.wait_status(&id, &["succeeded"], JOB);

    // A key that is not the certificate's is refused at start, naming both files.
    let other = pki.join("other-key.pem");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let r = sb.run(&[
        "controller",
        "--data-dir",
        &sb.path().join("c2").display().to_string(),
        "--http",
        &addr(free_port()),
        "--grpc",
        &addr(free_port()),
        "--tls-cert",
        &chain_arg,
        "--tls-key",
        &other.display().to_string(),
    ]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("do not belong together"), "{r}");
}

/// A second `runyard up` on a data dir in use fails at once, with the reason, before it prints
/// a banner or touches anything: the first one's running job goes on and succeeds (before, the
/// second instance's agent killed it and deleted its working tree). An existing data dir keeps
/// its mode (before, it was changed to 0700).
#[test]
fn a_second_up_on_a_data_dir_in_use_refuses_and_touches_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("slow.py", SLOW)]).expect("git fixture");
    let data = sb.path().join("shared");
    std::fs::create_dir(&data).expect("data dir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let data_arg = data.display().to_string();
    let start = |sb: &mut Sandbox, name: &str| {
        let (http, grpc) = (addr(free_port()), addr(free_port()));
        let args = [
            "up",
            "--data-dir",
            &data_arg,
            "--http",
            &http,
            "--grpc",
            &grpc,
        ];
        (sb.spawn(name, &args), http)
    };
    let (mut first, http) = start(&mut sb, "up-1");
    let token = eventually(STARTUP, "the first instance's admin token", || {
        assert!(
            first.wait_exit(Duration::ZERO).is_none(),
            "{}",
            first.stderr()
        );
        std::fs::read_to_string(data.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });
    sb.set_client_env("RUNYARD_CONTROLLER", &format!("http://{http}"));
    sb.set_client_env("RUNYARD_TOKEN", &token);
    wait_connected(&mut sb, &[&host_name()]);
    let id = submit(&mut sb, &repo, "slow.py");
    wait_running_with(&mut sb, &id, "line 1");
    let tree_before: Vec<_> = std::fs::read_dir(data.join("agent/jobs"))
        .expect("the first agent's job dirs")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        !tree_before.is_empty(),
        "the running job has a working tree"
    );

    let (mut second, _) = start(&mut sb, "up-2");
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("the second instance stops at once");
    assert!(!status.success());
    let err = second.stderr();
    assert!(err.contains("is in use by another controller"), "{err}");
    assert!(
        !second.stdout().contains("Runyard is up"),
        "no banner: {}",
        second.stdout()
    );

    // The first instance's job and files are untouched.
    for entry in &tree_before {
        assert!(
            data.join("agent/jobs").join(entry).exists(),
            "{entry:?} survives"
        );
    }
    let done = sb.wait_status(&id, &["succeeded", "failed", "stopped"], JOB);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["attempt"], 1, "never lost: {done:#}");
    assert_eq!(sb.ok(&["logs", &id]), numbered(10));
    let mode = std::fs::metadata(&data)
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o1777, "the data dir keeps its mode");
    assert!(
        first.wait_exit(Duration::ZERO).is_none(),
        "the first instance runs on"
    );
}

/// `runyard token create|ls|revoke` and `whoami` against a real controller: a token made for a
/// viewer reads and cannot submit, and is refused once revoked.
#[test]
fn tokens_are_made_listed_and_revoked_from_the_cli() {
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("hello.py", HELLO)]).expect("git fixture");
    let data = sb.path().join("controller");
    let (http, grpc) = (free_port(), free_port());
    let ctl = start_controller(&mut sb, &data, http, grpc, &[]);
    let agent_dir = sb.path().join("a1");
    let agent = start_agent(&mut sb, "a1", grpc, &data, &agent_dir);
    assert_eq!(sb.ok(&["whoami"]), "admin (admin)\n");

    let r = sb.run(&["token", "create", "vera", "--role", "viewer"]);
    assert_eq!(r.code, Some(0), "{r}");
    let vera = r.stdout.trim().to_string();
    assert!(vera.starts_with("ryt_") && !vera.contains(' '), "{r}");
    assert!(r.stderr.contains("shown once"), "{r}");
    let table = sb.ok(&["token", "ls"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!((row[0], row[1]), ("vera", "viewer"), "{table}");
    assert!(!table.contains(&vera), "never the token: {table}");
    let r = sb.run(&["token", "create", "vera"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("exists"), "{r}");

    // A controller-side secret: set from a file, listed by name, in the job's environment and
    // in none of the CLI's output.
    let value = "hub-token-5f1e7c";
    let file = sb.path().join("hub.secret");
    std::fs::write(&file, format!("{value}\n")).expect("secret file");
    assert_eq!(
        sb.ok(&[
            "secret",
            "set",
            "hub",
            "--from-file",
            &file.display().to_string()
        ]),
        "hub set\n"
    );
    let table = sb.ok(&["secret", "ls"]);
    assert!(table.contains("hub") && !table.contains(value), "{table}");
    let out = sb.ok(&[
        "submit",
        "--json",
        "--repo",
        &repo.url(),
        "--script",
        "hello.py",
        "--secret",
        "HUB_TOKEN=hub",
        "--",
        "x",
    ]);
    assert!(!out.contains(value), "{out}");
    let job: Value = serde_json::from_str(&out).expect("json");
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(
        job["spec"]["secrets"]["HUB_TOKEN"],
        serde_json::json!({"secret": "hub"})
    );
    sb.wait_status(&id, &["succeeded"], JOB);
    for args in [["status", &id], ["attempts", &id], ["ls", "--all"]] {
        let out = sb.ok(&args);
        assert!(!out.contains(value), "{args:?}: {out}");
    }
    let r = sb.run(&["secret", "rm", "nope"]);
    assert_eq!(r.code, Some(1), "{r}");
    // Nor in the servers' logs (the value crossed both).
    for (who, log) in [("controller", ctl.stderr()), ("agent", agent.stderr())] {
        assert!(log.contains("job"), "{who} logged: {log}");
        assert!(!log.contains(value), "{who} logged the secret: {log}");
    }

    let admin = std::fs::read_to_string(data.join("admin.token")).expect("admin.token");
    sb.set_client_env("RUNYARD_TOKEN", &vera);
    assert_eq!(sb.ok(&["whoami"]), "vera (viewer)\n");
    sb.ok(&["ls"]);
    let r = sb.run(&["submit", "--repo", &repo.url(), "--script", "hello.py"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("may not submit"), "{r}");
    let r = sb.run(&["token", "ls"]);
    assert!(r.stderr.contains("needs an admin token"), "{r}");

    sb.set_client_env("RUNYARD_TOKEN", admin.trim());
    assert_eq!(sb.ok(&["token", "revoke", "vera"]), "vera revoked\n");
    sb.set_client_env("RUNYARD_TOKEN", &vera);
    let r = sb.run(&["ls"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("revoked"), "{r}");
}

/// Tries to read and list each `name=path` argument; prints `DENIED name` or `LEAKED name`.
const PROBE: &str = r#"
import os, sys
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    try:
        if os.path.isdir(path):
            print("LEAKED", name, os.listdir(path)[:3])
        else:
            with open(path, "rb") as f:
                print("LEAKED", name, f.read(80))
    except OSError as e:
        print("DENIED", name, e.errno)
"#;

/// `runyard up` on `data`, with the client's environment pointed at it once it has a token.
fn start_up(sb: &mut Sandbox, data: &Path) -> Proc {
    let (http, grpc) = (free_port(), free_port());
    let data_arg = data.display().to_string();
    let mut up = sb.spawn(
        "up",
        &[
            "up",
            "--data-dir",
            &data_arg,
            "--http",
            &addr(http),
            "--grpc",
            &addr(grpc),
        ],
    );
    let token = eventually(STARTUP, "the admin token", || {
        assert!(
            up.wait_exit(Duration::ZERO).is_none(),
            "runyard up exited:\n{}",
            up.stderr()
        );
        std::fs::read_to_string(data.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });
    sb.set_client_env("RUNYARD_CONTROLLER", &format!("http://{}", addr(http)));
    sb.set_client_env("RUNYARD_TOKEN", &token);
    up
}

/// A local directory runs as it is now: a git checkout with its uncommitted change and untracked
/// file (not its ignored one), and a plain directory; an MLflow entry point from the command line
/// with no MLflow installed anywhere on the client.
#[test]
fn a_local_directory_runs_as_it_is_with_an_entry_point() {
    let mut sb = Sandbox::new();
    let data = sb.path().join("data");
    let _up = start_up(&mut sb, &data);
    wait_connected(&mut sb, &[&host_name()]);
    let checkout = GitRepo::new(&[
        ("MLproject", "entry_points:\n  main:\n    parameters:\n      n: int\n    command: python show.py {n}\n"),
        ("show.py", "print('committed')\n"),
        (".gitignore", "secret.txt\n"),
    ])
    .expect("git fixture");
    let show = "import os, sys\nprint('changed', sys.argv[1:], sorted(f for f in os.listdir('.') if f.endswith('.txt')))\n";
    std::fs::write(checkout.path.join("show.py"), show).unwrap();
    std::fs::write(checkout.path.join("notes.txt"), "untracked").unwrap();
    std::fs::write(checkout.path.join("secret.txt"), "ignored").unwrap();
    let dir = checkout.path.display().to_string();
    let r = sb.run(&[
        "submit", "--repo", &dir, "-e", "main", "-P", "n=2", "--follow",
    ]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("changed ['2'] ['notes.txt']"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("snapshot snapshot:sha256:"),
        "{}",
        r.stderr
    );
    let id = r.stdout.lines().next().unwrap().trim().to_string();
    let job = sb.job(&id);
    assert!(
        job["spec"]["repo"]
            .as_str()
            .unwrap()
            .starts_with("snapshot:sha256:"),
        "{job}"
    );
    // The same tree again is the same snapshot.
    let again = sb.run(&["submit", "--repo", &dir, "-P", "n=3"]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let id2 = again.stdout.trim().to_string();
    assert_eq!(sb.job(&id2)["spec"]["repo"], job["spec"]["repo"]);

    // A plain directory, no git: every file.
    let plain = sb.path().join("plain");
    std::fs::create_dir_all(plain.join("pkg")).unwrap();
    std::fs::write(plain.join("run.py"), "import pkg.mod\n").unwrap();
    std::fs::write(plain.join("pkg/mod.py"), "print('plain dir')\n").unwrap();
    let plain_arg = plain.display().to_string();
    let r = sb.run(&[
        "submit", "--repo", &plain_arg, "--script", "run.py", "--follow",
    ]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("plain dir"), "{}", r.stdout);
    // A revision makes no sense for a directory.
    let r = sb.run(&[
        "submit",
        "--repo",
        &plain_arg,
        "--script",
        "run.py",
        "--revision",
        "main",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("leave --revision out"), "{}", r.stderr);
}

#[test]
fn up_keeps_its_secrets_from_its_jobs() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: jobs run as the agent's user, there is no isolation to test");
        return;
    }
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("probe.py", PROBE)]).expect("git fixture");
    let data = sb.path().join("data");
    let _up = start_up(&mut sb, &data);
    wait_connected(&mut sb, &[&host_name()]);
    let targets = [
        ("admin_token", data.join("admin.token")),
        ("agent_token", data.join("agent.token")),
        ("store", data.join("state.redb")),
        ("logs", data.join("logs")),
        ("data_dir", data.clone()),
        (
            "agent_credential",
            data.join("agent").join("agent.credential"),
        ),
        ("agent_dir", data.join("agent")),
        ("spools", data.join("agent").join("jobs").join("spool")),
    ];
    let args: Vec<String> = targets
        .iter()
        .map(|(n, p)| format!("{n}={}", p.display()))
        .collect();
    let url = repo.url();
    let mut argv = vec![
        "submit", "--repo", &url, "--script", "probe.py", "--follow", "--",
    ];
    argv.extend(args.iter().map(String::as_str));
    let r = sb.run(&argv);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!r.stdout.contains("LEAKED"), "{r}");
    for (name, _) in &targets {
        assert!(
            r.stdout.contains(&format!("DENIED {name} ")),
            "no denial of {name}: {r}"
        );
    }
    for secret in ["admin.token", "agent.token"] {
        let s = std::fs::read_to_string(data.join(secret)).expect(secret);
        assert!(!r.stdout.contains(s.trim()), "{secret} leaked");
    }
}

#[test]
fn the_old_host_less_git_token_is_refused_with_its_replacement() {
    let mut sb = Sandbox::new();
    sb.set_client_env("RUNYARD_GIT_TOKEN", "ghp_old");
    let dir = sb.path().join("agent").display().to_string();
    let r = sb.run(&[
        "agent",
        "--token",
        "ryj_x",
        "--controller",
        &format!("http://{}", addr(free_port())),
        "--data-dir",
        &dir,
    ]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("RUNYARD_GIT_TOKEN is no longer used"),
        "{r}"
    );
    assert!(r.stderr.contains("--git-credential HOST=FILE"), "{r}");
}

/// `runyard up --tls`: HTTPS and gRPC over TLS with the data dir's CA; the banner exports
/// `RUNYARD_CA`, and the CLI with it runs a job end to end.
#[test]
fn up_with_tls_serves_https_and_the_cli_trusts_its_ca() {
    let mut sb = Sandbox::new();
    let repo = GitRepo::new(&[("hello.py", HELLO)]).expect("git fixture");
    let data = sb.path().join("data");
    let (http, grpc) = (free_port(), free_port());
    let data_arg = data.display().to_string();
    let mut up = sb.spawn(
        "up",
        &[
            "up",
            "--tls",
            "--data-dir",
            &data_arg,
            "--http",
            &addr(http),
            "--grpc",
            &addr(grpc),
        ],
    );
    let banner = eventually(STARTUP, "the banner of runyard up --tls", || {
        assert!(up.wait_exit(Duration::ZERO).is_none(), "{}", up.stderr());
        let out = up.stdout();
        let done = out.lines().any(|l| l.starts_with("export RUNYARD_CA="));
        (done && out.lines().any(|l| l.starts_with("export RUNYARD_TOKEN="))).then_some(out)
    });
    let export = |key: &str| {
        banner
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {key}=")))
            .unwrap_or_else(|| panic!("no export of {key} in\n{banner}"))
            .to_string()
    };
    let controller = export("RUNYARD_CONTROLLER");
    assert_eq!(controller, format!("https://127.0.0.1:{http}"), "{banner}");
    let ca = export("RUNYARD_CA");
    assert!(std::path::Path::new(&ca).is_absolute(), "{banner}");
    assert_eq!(fingerprint(std::path::Path::new(&ca)), join_token(&data).0);
    sb.set_client_env("RUNYARD_CONTROLLER", &controller);
    sb.set_client_env("RUNYARD_TOKEN", &export("RUNYARD_TOKEN"));
    // Without the CA: refused, naming what to give.
    let r = sb.run(&["ls"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("--ca"), "{r}");
    sb.set_client_env("RUNYARD_CA", &ca);
    wait_connected(&mut sb, &[&host_name()]);
    let out = sb.ok(&[
        "submit",
        "--repo",
        &repo.url(),
        "--script",
        "hello.py",
        "--follow",
        "--",
        "over-tls",
    ]);
    assert_eq!(out.lines().nth(1), Some("arg: over-tls"), "{out}");
}
