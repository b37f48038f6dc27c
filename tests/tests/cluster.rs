//! Cluster tests: a real controller and real agents over real gRPC and HTTP, real git
//! repositories, real Python processes and signals.

use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn spec(repo: &GitRepo, script: &str) -> Value {
    json!({"repo": repo.url(), "script": script})
}

fn numbered_lines(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect()
}

fn assert_complete(text: &str, n: u64) {
    let got = numbered_lines(text);
    let want: Vec<u64> = (0..n).collect();
    if got != want {
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "expected lines 0..{n} in order; got {} lines, first mismatch at {first_bad:?}",
            got.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_lines_arrive_complete_and_in_order() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "train.py",
        "for i in range(10000):\n    print(f'line {i}')\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let id = c.submit(spec(&repo, "train.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["commit"], repo.head()?.as_str());
    assert_eq!(job["agent"], "a1");
    let logs = c.logs(&id).await?;
    assert_complete(&logs, 10_000);
    assert_eq!(
        logs.lines().count(),
        10_000,
        "no extra lines: the log is exactly what the script printed"
    );
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn args_arrive_verbatim_and_env_is_set() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "show.py",
        "import json, os, sys\nprint(json.dumps({'args': sys.argv[1:], 'greeting': os.environ.get('GREETING'), 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), 'token': os.environ.get('RUNYARD_TOKEN')}))\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let args = vec![
        "--name",
        "two words",
        "it's \"quoted\"",
        "$HOME",
        "; rm -rf /",
        "",
        "ünïcode",
    ];
    let mut s = spec(&repo, "show.py");
    s["args"] = json!(args);
    s["env"] = json!({"GREETING": "hello world"});
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out: Value = serde_json::from_str(c.logs(&id).await?.trim())?;
    assert_eq!(out["args"], json!(args));
    assert_eq!(out["greeting"], "hello world");
    assert_eq!(out["cuda"], "", "a cpu-small job sees no GPU");
    assert_eq!(out["token"], Value::Null);
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_script_reports_exit_code_and_reason() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "fail.py",
        "import sys\nprint('about to fail')\nsys.exit(3)\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let mut s = spec(&repo, "fail.py");
    s["retries"] = json!(1);
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["failure"], "exit");
    assert_eq!(job["attempt"], 2, "one retry: {job}");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("exited with code 3"),
        "{job}"
    );
    assert_eq!(c.logs(&id).await?, "about to fail\n");
    // Each attempt is its own placement with its own outcome.
    let list = c.get(&format!("/api/v1/jobs/{id}/placements")).await?;
    let p = list["placements"].as_array().expect("placements");
    assert_eq!(p.len(), 2, "{list}");
    for (i, p) in p.iter().enumerate() {
        assert_eq!(
            (
                p["attempt"].as_u64(),
                p["agent"].as_str(),
                p["status"].as_str(),
                p["exit_code"].as_i64()
            ),
            (Some(i as u64 + 1), Some("a1"), Some("failed"), Some(3)),
            "{list}"
        );
    }
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_revision_and_missing_script_fail_with_reasons() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("ok.py", "print('ok')\n")])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let mut s = spec(&repo, "ok.py");
    s["revision"] = json!("no-such-branch");
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(
        (job["status"].as_str(), job["failure"].as_str()),
        (Some("failed"), Some("revision")),
        "{job}"
    );
    assert!(
        job["reason"].as_str().unwrap().contains("no-such-branch"),
        "{job}"
    );

    let id = c.submit(spec(&repo, "nope.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["failure"], "script", "{job}");
    assert!(job["reason"].as_str().unwrap().contains("nope.py"), "{job}");

    let mut s = spec(&repo, "ok.py");
    s["repo"] = json!("file:///nonexistent/repo.git");
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["failure"], "clone", "{job}");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_script_escaping_the_repo_is_refused() -> anyhow::Result<()> {
    let outside = tempfile::tempdir()?;
    let target = outside.path().join("evil.py");
    std::fs::write(&target, "print('escaped')\n")?;
    let repo = GitRepo::new(&[("ok.py", "print('ok')\n")])?;
    std::os::unix::fs::symlink(&target, repo.path.join("link.py"))?;
    repo.commit(&[], "add link")?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let id = c.submit(spec(&repo, "link.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["failure"], "script", "{job}");
    assert!(job["reason"].as_str().unwrap().contains("outside"), "{job}");
    assert_eq!(c.logs(&id).await?, "");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_leaves_no_process_behind() -> anyhow::Result<()> {
    // Ignores SIGTERM, starts a setsid grandchild that also ignores it, and records the pids.
    let script = r#"
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)"], start_new_session=True)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child.pid}\n")
print("ready", flush=True)
while True:
    time.sleep(1)
"#;
    let repo = GitRepo::new(&[("stubborn.py", script)])?;
    // The job runs under its own uid: it writes where the test lets it.
    let exchange = runyard_tests::exchange_dir()?;
    let pidfile = exchange.path().join("pids");
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let mut s = spec(&repo, "stubborn.py");
    s["args"] = json!([pidfile]);
    s["stop_grace"] = json!("1s");
    let id = c.submit(s).await?;
    c.wait_status(&id, &["running"], LONG).await?;
    let pids: Vec<u32> = runyard_tests::eventually(LONG, "pid file", || async {
        let t = std::fs::read_to_string(&pidfile).ok()?;
        let p: Vec<u32> = t
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        (p.len() == 2).then_some(p)
    })
    .await?;
    let t0 = std::time::Instant::now();
    let (status, body) = c
        .post(&format!("/api/v1/jobs/{id}/stop"), &json!({}))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "stopping");
    let job = c
        .wait_status(&id, &["stopped"], Duration::from_secs(20))
        .await?;
    let took = t0.elapsed();
    assert!(
        job["reason"].as_str().unwrap().contains("stopped by user"),
        "{job}"
    );
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived the stop"
        );
    }
    assert!(
        took < Duration::from_secs(4),
        "stop took {took:?}: grace 1 s + 1 s + reporting"
    );
    // Stopping a finished job is a conflict.
    let (status, body) = c
        .post(&format!("/api/v1/jobs/{id}/stop"), &json!({}))
        .await?;
    assert_eq!(status, 409, "{body}");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_agent_job_is_rerun_elsewhere() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "slow.py",
        "import os, time\nprint('attempt', os.environ['RUNYARD_ATTEMPT_NUMBER'], flush=True)\ntime.sleep(float(os.environ.get('SLEEP', '0')))\nprint('done')\n",
    )])?;
    let mut c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(1))
        .agent_ttl(Duration::from_secs(2))
        .start()
        .await?;
    let mut s = spec(&repo, "slow.py");
    s["env"] = json!({"SLEEP": "4"});
    let id = c.submit(s).await?;
    c.wait_status(&id, &["running"], LONG).await?;
    c.add_agent(AgentSpec::new("a2").slots(1)).await?;
    c.kill_agent("a1").await?;
    let lost = c
        .wait_status(
            &id,
            &["lost", "pending", "scheduled", "preparing", "running"],
            LONG,
        )
        .await?;
    let _ = lost;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["agent"], "a2");
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["lost_count"], 1);
    assert_eq!(c.logs(&id).await?, "attempt 2\ndone\n");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cut_keeps_the_job_and_every_line() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "ticker.py",
        "import time\nfor i in range(3000):\n    print(f'line {i}', flush=True)\n    if i % 100 == 0: time.sleep(0.05)\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").via_proxy())
        .agent_ttl(Duration::from_secs(10))
        .start()
        .await?;
    let id = c.submit(spec(&repo, "ticker.py")).await?;
    c.wait_status(&id, &["running"], LONG).await?;
    let proxy = &c.proxies["a1"];
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = c.job(&id).await?;
    assert_ne!(
        during["status"], "lost",
        "within the TTL the job is kept: {during}"
    );
    proxy.restore();
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "the same attempt kept running");
    assert_complete(&c.logs(&id).await?, 3000);
    c.shutdown().await
}

async fn controller_restart_mid_job(store: Option<String>) -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "ticker.py",
        "import time\nfor i in range(2000):\n    print(f'line {i}', flush=True)\n    if i % 100 == 0: time.sleep(0.1)\n",
    )])?;
    let mut b = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .agent_ttl(Duration::from_secs(10));
    if let Some(s) = store {
        b = b.store(s);
    }
    let mut c = b.start().await?;
    let id = c.submit(spec(&repo, "ticker.py")).await?;
    let done_before = c.submit(spec(&repo, "ticker.py")).await?;
    c.wait_status(&id, &["running"], LONG).await?;

    // Follow the log across the restart: the follower reconnects and resumes by offset.
    let follower = {
        let client = c.client.clone();
        let base = c.base_url();
        let token = c.token.clone();
        let id = id.clone();
        tokio::spawn(async move { follow_with_resume(&client, &base, &token, &id).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.restart_controller().await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 1,
        "the job kept running through the restart: {job}"
    );
    assert_complete(&c.logs(&id).await?, 2000);
    let followed = tokio::time::timeout(LONG, follower).await???;
    assert_complete(&followed, 2000);
    // The other job is still known and finishes too.
    let other = c
        .wait_status(&done_before, &["succeeded", "failed"], LONG)
        .await?;
    assert_eq!(other["status"], "succeeded");
    c.shutdown().await
}

/// Follows a job's log with `attempt` + `offset` resumption, as the CLI does.
async fn follow_with_resume(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
) -> anyhow::Result<String> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "follow did not finish"
        );
        let url = format!(
            "{base}/api/v1/jobs/{id}/logs?follow=true&attempt=1&offset={}",
            out.len()
        );
        let resp = match client.get(&url).bearer_auth(token).send().await {
            Ok(r) if r.status().is_success() => r,
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut clean_end = true;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => {
                    clean_end = false;
                    break;
                }
            }
        }
        if clean_end {
            return Ok(String::from_utf8(out)?);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_loses_nothing_file_store() -> anyhow::Result<()> {
    controller_restart_mid_job(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_loses_nothing_etcd_store() -> anyhow::Result<()> {
    let etcd = runyard_tests::etcd::EtcdServer::start().await?;
    controller_restart_mid_job(Some(format!("etcd://{}", etcd.endpoint))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_are_assigned_exclusively() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "gpu.py",
        "import os, time\nprint(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\ntime.sleep(float(os.environ.get('SLEEP', '0')))\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("g2").gpus(2).slots(0))
        .agent_ttl(Duration::from_secs(10))
        .start()
        .await?;
    let agents = c.get("/api/v1/agents").await?;
    let g = &agents["agents"][0]["gpus"];
    assert_eq!(g.as_array().unwrap().len(), 2, "{agents}");
    assert!(g[0]["name"].as_str().unwrap().contains("Fake"), "{agents}");

    let mut s = spec(&repo, "gpu.py");
    s["compute"] = json!("gpu:2");
    let id = c.submit(s).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["gpus"], json!([0, 1]));
    assert_eq!(c.logs(&id).await?, "0,1\n");

    // Three gpu:1 jobs on two GPUs: never two on one GPU at once.
    let mut ids = vec![];
    for _ in 0..3 {
        let mut s = spec(&repo, "gpu.py");
        s["compute"] = json!("gpu");
        s["env"] = json!({"SLEEP": "1.5"});
        ids.push(c.submit(s).await?);
    }
    let mut seen_third_waiting = false;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let mut held: Vec<u64> = vec![];
        let mut done = 0;
        for id in &ids {
            let j = c.job(id).await?;
            let st = j["status"].as_str().unwrap().to_string();
            if ["scheduled", "preparing", "running", "stopping"].contains(&st.as_str()) {
                held.extend(
                    j["gpus"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|g| g.as_u64().unwrap()),
                );
            }
            if st == "pending" && j["reason"].as_str().unwrap_or("").contains("GPU") {
                seen_third_waiting = true;
            }
            if st == "succeeded" {
                done += 1;
            }
        }
        let mut dedup = held.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), held.len(), "a GPU held by two jobs: {held:?}");
        if done == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gpu jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_third_waiting,
        "the third job should have waited for a GPU"
    );
    // A job asking for more GPUs than any agent has waits with a reason.
    let mut s = spec(&repo, "gpu.py");
    s["compute"] = json!("gpu:4");
    let id = c.submit(s).await?;
    let job = runyard_tests::eventually(LONG, "wait reason", || async {
        let j = c.job(&id).await.ok()?;
        j["reason"]
            .as_str()
            .is_some_and(|r| r.contains("largest connected agent has 2"))
            .then_some(j)
    })
    .await?;
    assert_eq!(job["status"], "pending");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_are_installed() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[
        (
            "use_six.py",
            "import six, idna\nprint('six', six.__version__)\n",
        ),
        ("requirements.txt", "idna\n"),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let mut s = spec(&repo, "use_six.py");
    s["requirements"] = json!(["six==1.16.0"]);
    s["requirements_file"] = json!("requirements.txt");
    let id = c.submit(s).await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(180))
        .await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let logs = c.logs(&id).await?;
    let (ours, script): (Vec<&str>, Vec<&str>) =
        logs.lines().partition(|l| l.starts_with("[runyard] "));
    assert_eq!(script, ["six 1.16.0"], "{logs}");
    assert!(
        ours.iter().any(|l| l.contains("environment ready")),
        "the env phase is in the log: {logs}"
    );
    assert!(logs.find("environment ready").unwrap() < logs.find("six 1.16.0").unwrap());
    let env = &job["environment"];
    assert_eq!(env["installer"], "uv", "{job}");
    let packages: Vec<&str> = env["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        packages.contains(&"six==1.16.0"),
        "the pinned set is recorded: {packages:?}"
    );
    assert!(
        packages.iter().any(|p| p.starts_with("idna==")),
        "{packages:?}"
    );

    let mut s = spec(&repo, "use_six.py");
    s["requirements"] = json!(["runyard-no-such-package-xyz==1.0"]);
    let id = c.submit(s).await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(180))
        .await?;
    assert_eq!(job["failure"], "env", "{job}");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("runyard-no-such-package-xyz"),
        "{job}"
    );
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_job_can_be_stopped_and_listing_pages() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("ok.py", "print('ok')\n")])?;
    // No agent: jobs wait, with a reason.
    let c = TestCluster::builder().start().await?;
    let mut ids = vec![];
    for i in 0..5 {
        let mut s = spec(&repo, "ok.py");
        s["name"] = json!(format!("job-{i}"));
        ids.push(c.submit(s).await?);
    }
    let j = runyard_tests::eventually(LONG, "wait reason", || async {
        let j = c.job(&ids[0]).await.ok()?;
        j["reason"]
            .as_str()
            .is_some_and(|r| r.contains("none is connected"))
            .then_some(j)
    })
    .await?;
    assert_eq!(j["status"], "pending");
    let page1 = c.get("/api/v1/jobs?limit=2").await?;
    let names: Vec<&str> = page1["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["job-4", "job-3"], "newest first");
    let next = page1["next"].as_str().unwrap();
    let page2 = c
        .get(&format!("/api/v1/jobs?limit=2&cursor={next}"))
        .await?;
    assert_eq!(page2["jobs"][0]["name"], "job-2");
    let (status, body) = c
        .post(&format!("/api/v1/jobs/{}/stop", ids[0]), &json!({}))
        .await?;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("stopped")),
        "{body}"
    );
    let stopped = c.get("/api/v1/jobs?status=stopped").await?;
    assert_eq!(stopped["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(stopped["next"], Value::Null);
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_progress_metrics_and_best_checkpoint() -> anyhow::Result<()> {
    let script = r#"
import hashlib, json, os
f = open(os.environ["RUNYARD_REPORT_FILE"], "a")
def rep(**o):
    f.write(json.dumps(o) + "\n"); f.flush()
rep(type="started", max_epochs=3)
losses = [0.9, 0.5, 0.7]
os.makedirs("ckpt", exist_ok=True)
for e, l in enumerate(losses):
    rep(type="metrics", epoch=e, step=(e + 1) * 10, values={"val_loss": l, "lr": 0.1})
    rep(type="progress", epoch=e + 1, step=(e + 1) * 10, max_epochs=3)
    path = f"ckpt/epoch{e}.ckpt"
    with open(path, "wb") as c:
        c.write(os.urandom(300000) + bytes([e]))
    if l == min(losses[: e + 1]):
        rep(type="checkpoint", callback=0, monitor="val_loss", mode="min", score=l, path=os.path.abspath(path), epoch=e, step=(e + 1) * 10)
print(hashlib.sha256(open("ckpt/epoch1.ckpt", "rb").read()).hexdigest())
"#;
    let repo = GitRepo::new(&[("train.py", script)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let id = c.submit(spec(&repo, "train.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["fraction"], 1.0, "{job}");
    assert_eq!(job["progress"]["epoch"], 3);
    assert_eq!(job["metrics"]["val_loss"], 0.7);
    assert_eq!(job["environment"]["installer"], "system", "{job}");
    let best = &job["best"];
    assert_eq!(
        (best["monitor"].as_str(), best["score"].as_f64()),
        (Some("val_loss"), Some(0.5)),
        "{job}"
    );
    assert!(best["path"].as_str().unwrap().ends_with("ckpt/epoch1.ckpt"));
    assert_eq!(best["size"], 300001);

    let metrics = c.get(&format!("/api/v1/jobs/{id}/metrics")).await?;
    let vals = c.metric_values(&id, "val_loss").await?;
    assert_eq!(vals, vec![0.9, 0.5, 0.7]);
    assert_eq!(metrics["series"]["val_loss"][1]["step"], 20);

    let r = c.get_raw(&format!("/api/v1/jobs/{id}/checkpoint")).await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"epoch1.ckpt\""
    );
    let body = r.bytes().await?;
    assert_eq!(body.len(), 300001);
    let printed = c.logs(&id).await?;
    let sum = {
        use std::fmt::Write;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&body);
        digest.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    assert_eq!(
        printed.trim(),
        sum,
        "the download is byte-identical to the agent's file"
    );
    assert_eq!(best["sha256"], sum.as_str());

    // A job that reported no checkpoint has none to download.
    let repo2 = GitRepo::new(&[("plain.py", "print('no checkpoint')\n")])?;
    let id2 = c.submit(spec(&repo2, "plain.py")).await?;
    c.wait_status(&id2, &["succeeded"], LONG).await?;
    let r = c.get_raw(&format!("/api/v1/jobs/{id2}/checkpoint")).await?;
    assert_eq!(r.status().as_u16(), 404);
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_build_the_same_environment_safely() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "use.py",
        "import six, idna\nprint(six.__version__, idna.__name__)\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(4))
        .start()
        .await?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let mut s = spec(&repo, "use.py");
        s["requirements"] = json!(["six==1.16.0", "idna"]);
        ids.push(c.submit(s).await?);
    }
    for id in &ids {
        let job = c
            .wait_status(id, &["succeeded", "failed"], Duration::from_secs(180))
            .await?;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert!(c.logs(id).await?.ends_with("1.16.0 idna\n"));
    }
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_job_not_the_agent() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("ok.py", "print('ok')\n")])?;
    let mut full = AgentSpec::new("full");
    full.min_free = u64::MAX; // no file system has that much free: the disk counts as full
    let mut c = TestCluster::builder().agent(full).start().await?;
    let id = c.submit(spec(&repo, "ok.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["failure"], "agent", "{job}");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("disk full on agent full"),
        "{job}"
    );
    // The agent is still there and connected; a healthy agent runs the next job.
    let agents = c.get("/api/v1/agents").await?;
    assert_eq!(agents["agents"][0]["connected"], true, "{agents}");
    c.add_agent(AgentSpec::new("roomy")).await?;
    c.kill_agent("full").await?;
    let id = c.submit(spec(&repo, "ok.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(
        (job["status"].as_str(), job["agent"].as_str()),
        (Some("succeeded"), Some("roomy")),
        "{job}"
    );
    c.shutdown().await
}

/// Job starts do not walk the agent's caches: a run of jobs costs at most one sweep (in the
/// background, coalesced), not one per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_starts_do_not_sweep_the_caches() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let repo = GitRepo::new(&[("hi.py", "print('hi')\n")])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    // The sweep the agent makes when it starts.
    runyard_tests::eventually(LONG, "the start-up sweep", || async {
        (runyard_agent::cache::SWEEPS.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await?;
    let before = runyard_agent::cache::SWEEPS.load(Ordering::Relaxed);
    for _ in 0..8 {
        let id = c
            .submit(json!({"repo": repo.url(), "script": "hi.py"}))
            .await?;
        let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let sweeps = runyard_agent::cache::SWEEPS.load(Ordering::Relaxed) - before;
    assert!(sweeps <= 1, "{sweeps} sweeps for 8 job starts");
    c.shutdown().await
}
