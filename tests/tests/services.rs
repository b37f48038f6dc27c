//! Services: real replicas (Python processes) behind the controller's data plane, over real
//! gRPC and HTTP. Every load is bounded in count and time.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use runyard_tests::services::{SERVER_PY, load, ready, wait_service};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);

fn service(repo: &GitRepo, name: &str, extra: Value) -> Value {
    let mut s = json!({"name": name, "repo": repo.url(), "script": "server.py"});
    if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    s
}

async fn serve(c: &TestCluster, spec: &Value) -> anyhow::Result<Value> {
    let (status, body) = c.post("/api/v1/services", spec).await?;
    anyhow::ensure!(status == 201 || status == 200, "serve: {status}: {body}");
    Ok(body)
}

async fn call(c: &TestCluster, path: &str) -> anyhow::Result<(u16, Value)> {
    let r = c
        .client
        .get(format!("{}{path}", c.base_url()))
        .bearer_auth(&c.token)
        .send()
        .await?;
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_load_and_a_crashed_one_is_replaced_without_a_failed_request()
-> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(4))
        .start()
        .await?;
    serve(
        &c,
        &service(&repo, "echo", json!({"replicas": {"min": 2, "max": 2}})),
    )
    .await?;
    let v = wait_service(&c, "echo", LONG, "2 ready", |v| ready(v).len() == 2).await?;
    assert_eq!(v["status"], "ready", "{v}");

    // Balanced: both replicas answer; the path after the prefix is forwarded; the caller's
    // token is not.
    let mut jobs = BTreeSet::new();
    let mut pids = BTreeSet::new();
    let calls = (0..40).map(|i| {
        let c = &c;
        async move { call(c, &format!("/s/echo/hello?i={i}")).await }
    });
    for r in futures::future::join_all(calls).await {
        let (status, body) = r?;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["path"].as_str().unwrap().starts_with("/hello?i="),
            "{body}"
        );
        assert_eq!(body["prefix"], "/s/echo");
        assert_eq!(
            body["auth"],
            Value::Null,
            "the token must not reach the replica"
        );
        jobs.insert(body["job"].as_str().unwrap().to_string());
        pids.insert(body["pid"].as_i64().unwrap());
    }
    assert_eq!(jobs.len(), 2, "both replicas served: {jobs:?}");

    // Without a token: refused, and nothing reaches a replica.
    let r = c
        .client
        .get(format!("{}/s/echo/hello", c.base_url()))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .client
        .get(format!("{}/s/nope/hello", c.base_url()))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 404);

    // Kill one replica's process: requests keep succeeding on the other, and it is replaced.
    let victim = *pids.iter().next().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = tokio::time::Instant::now() + LONG;
    let mut answered = 0;
    loop {
        let (status, body) = call(&c, "/s/echo/after").await?;
        assert_eq!(status, 200, "a request after the crash failed: {body}");
        answered += 1;
        let v = c.get("/api/v1/services/echo").await?;
        let indices: Vec<u64> = ready(&v)
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        if indices.len() == 2 && indices.iter().any(|&i| i >= 3) {
            assert!(
                v["reason"].as_str().unwrap_or("").contains("failed"),
                "the crash is shown: {v}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not replaced: {v}");
    }
    assert!(answered > 0);
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_goes_through() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    serve(
        &c,
        &service(
            &repo,
            "up",
            json!({"replicas": {"min": 1, "max": 1}, "public": true}),
        ),
    )
    .await?;
    wait_service(&c, "up", LONG, "ready", |v| ready(v).len() == 1).await?;
    let mut s = tokio::net::TcpStream::connect(c.http_addr).await?;
    s.write_all(
        b"GET /s/up/upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut b).await? == 1, "closed in the head: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in ["hello", "through the proxy", "and back"] {
        s.write_all(msg.as_bytes()).await?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await??;
        assert_eq!(got, msg.as_bytes());
    }
    drop(s);
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_out_under_load_and_back_to_min_with_no_failed_request() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(4))
        .start()
        .await?;
    let fast = json!({"scale_out_interval": "1s", "scale_in_interval": "1s"});
    serve(
        &c,
        &service(
            &repo,
            "busy",
            json!({"replicas": {"min": 1, "max": 3}, "autoscale": fast}),
        ),
    )
    .await?;
    wait_service(&c, "busy", LONG, "1 ready", |v| ready(v).len() == 1).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let watch = async {
        // 24 clients on a 300 ms endpoint: 24 pending over 1 replica is 3 times the target of
        // 8 per replica, so the autoscaler goes to 3 (its max).
        let v = wait_service(&c, "busy", LONG, "scaled out to 3 ready", |v| {
            ready(v).len() == 3
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        v
    };
    let (result, scaled) = tokio::join!(
        load(&c, "/s/busy/slow?ms=300", 24, stop.clone(), LONG),
        watch
    );
    let scaled = scaled?;
    assert_eq!(scaled["target"], 3, "{scaled}");
    assert!(
        scaled["decision"]["why"]
            .as_str()
            .unwrap()
            .contains("pending"),
        "{scaled}"
    );
    assert_eq!(
        result.failed, 0,
        "no request fails while scaling out: {:?}",
        result.failures
    );
    assert!(result.ok > 0);
    // Idle: back to min, one step per interval, every extra replica drained and stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let idle = async {
        let v = wait_service(&c, "busy", LONG, "back to 1", |v| {
            v["target"] == 1 && v["replicas"].as_array().is_some_and(|r| r.len() == 1)
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        v
    };
    // A trickle of requests keeps going while it scales in: none may fail.
    let (trickle, v) = tokio::join!(load(&c, "/s/busy/slow?ms=20", 1, stop.clone(), LONG), idle);
    let v = v?;
    assert_eq!(
        trickle.failed, 0,
        "no request fails while scaling in: {:?}",
        trickle.failures
    );
    let ended: Vec<&Value> = v["ended"].as_array().unwrap().iter().collect();
    assert!(ended.len() >= 2, "{v}");
    for r in ended {
        assert_eq!(
            r["status"], "stopped",
            "a scaled-in replica is stopped, not failed: {v}"
        );
    }
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_gives_each_caller_its_own_answer() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let extra = json!({
        "replicas": {"min": 1, "max": 1},
        "batching": {"max_batch_size": 8, "timeout": "300ms"},
        "env": {"COST_MS": "50"}
    });
    serve(&c, &service(&repo, "batch", extra)).await?;
    wait_service(&c, "batch", LONG, "ready", |v| ready(v).len() == 1).await?;
    let calls = (0..32).map(|i| {
        let c = &c;
        async move {
            let r = c
                .client
                .post(format!("{}/s/batch/predict", c.base_url()))
                .bearer_auth(&c.token)
                .json(&json!({"i": i}))
                .send()
                .await?;
            let status = r.status().as_u16();
            let v: Value = r.json().await?;
            anyhow::Ok((i, status, v))
        }
    });
    let mut sizes = Vec::new();
    for r in futures::future::join_all(calls).await {
        let (i, status, v) = r?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["echo"],
            json!({"i": i}),
            "each caller gets its own answer"
        );
        sizes.push(v["batch"].as_u64().unwrap());
    }
    assert!(
        sizes.iter().any(|&s| s > 1),
        "batches of more than one: {sizes:?}"
    );
    assert!(
        sizes.iter().all(|&s| s <= 8),
        "never over max_batch_size: {sizes:?}"
    );
    let v = c.get("/api/v1/services/batch").await?;
    assert!(v["traffic"]["mean_batch"].as_f64().unwrap() > 1.0, "{v}");
    // A body that is not JSON is refused by the proxy, naming why.
    let r = c
        .client
        .post(format!("{}/s/batch/predict", c.base_url()))
        .bearer_auth(&c.token)
        .body("not json")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await?.contains("JSON"));
    c.shutdown().await
}

/// A tiny HTTP server that answers every request with `cold` (the cold-start proxy).
async fn cold_proxy() -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = br#"{"version": "cold"}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_waits_for_a_replica_or_goes_to_the_proxy_and_idles_back_to_zero()
-> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(4))
        .start()
        .await?;
    let fast = json!({"scale_out_interval": "1s", "scale_in_interval": "1s"});
    serve(
        &c,
        &service(
            &repo,
            "cold",
            json!({"replicas": {"min": 0, "max": 1}, "autoscale": fast}),
        ),
    )
    .await?;
    let v = c.get("/api/v1/services/cold").await?;
    assert_eq!(v["status"], "idle", "{v}");
    assert_eq!(v["replicas"], json!([]));
    // Wait mode: the first request starts a replica and gets its answer.
    let started = std::time::Instant::now();
    let (status, body) = call(&c, "/s/cold/first").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/first");
    eprintln!("cold start answered in {:?}", started.elapsed());
    // Idle again: back to zero replicas.
    let v = wait_service(&c, "cold", LONG, "idle", |v| v["status"] == "idle").await?;
    assert_eq!(v["ended"][0]["status"], "stopped", "{v}");

    // Proxy mode: answered by the cold-start proxy at once, by a replica once one is ready.
    let addr = cold_proxy().await?;
    let extra = json!({
        "replicas": {"min": 0, "max": 1}, "autoscale": fast,
        "cold_start": {"proxy": format!("http://{addr}")}
    });
    serve(&c, &service(&repo, "warm", extra)).await?;
    let r = c
        .client
        .get(format!("{}/s/warm/x", c.base_url()))
        .bearer_auth(&c.token)
        .send()
        .await?;
    assert_eq!(r.headers()["x-runyard-cold-start"], "proxy");
    assert_eq!(r.json::<Value>().await?["version"], "cold");
    wait_service(&c, "warm", LONG, "a replica ready", |v| ready(v).len() == 1).await?;
    let (status, body) = call(&c, "/s/warm/x").await?;
    assert_eq!(
        (status, body["version"].as_str()),
        (200, Some("1")),
        "{body}"
    );

    // A replica that never gets ready: the request gives up after cold_start.timeout, saying why.
    let extra = json!({
        "replicas": {"min": 1, "max": 1}, "health": "/missing",
        "cold_start": {"timeout": "1s"}
    });
    serve(&c, &service(&repo, "never", extra)).await?;
    let (status, body) = call(&c, "/s/never/x").await?;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no ready replica"),
        "{body}"
    );
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_brings_new_replicas_up_before_old_ones_drain_and_fails_no_request()
-> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(6))
        .start()
        .await?;
    let v1 = service(
        &repo,
        "roll",
        json!({"replicas": {"min": 2, "max": 2}, "env": {"VERSION": "1"}}),
    );
    serve(&c, &v1).await?;
    wait_service(&c, "roll", LONG, "2 ready", |v| ready(v).len() == 2).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let rollout = async {
        let mut v2 = v1.clone();
        v2["env"] = json!({"VERSION": "2"});
        let updated = serve(&c, &v2).await?;
        assert_eq!(updated["generation"], 2, "{updated}");
        let v = wait_service(&c, "roll", LONG, "rolled to generation 2", |v| {
            let live = v["replicas"].as_array().unwrap();
            live.len() == 2
                && live
                    .iter()
                    .all(|r| r["generation"] == 2 && r["ready"] == true)
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        v
    };
    let (result, v) = tokio::join!(
        load(&c, "/s/roll/slow?ms=50", 6, stop.clone(), LONG),
        rollout
    );
    let v = v?;
    assert_eq!(
        result.failed, 0,
        "no request fails in a rollout: {:?}",
        result.failures
    );
    assert_eq!(result.versions.first().map(String::as_str), Some("1"));
    assert_eq!(result.versions.last().map(String::as_str), Some("2"));
    for r in v["ended"].as_array().unwrap() {
        assert_eq!(r["generation"], 1);
        assert_eq!(
            r["status"], "stopped",
            "old replicas drained and stopped: {v}"
        );
    }
    // Serving the same spec again changes nothing.
    let mut v2 = v1.clone();
    v2["env"] = json!({"VERSION": "2"});
    assert_eq!(serve(&c, &v2).await?["generation"], 2);
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_service_specs_are_refused_naming_the_field() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder().start().await?;
    let cases = [
        (json!({"replicas": {"min": 3, "max": 2}}), "replicas.min"),
        (
            json!({"batching": {"max_batch_size": 0}}),
            "batching.max_batch_size",
        ),
        (
            json!({"autoscale": {"policy": "scaling"}}),
            "autoscale.policy",
        ),
        (
            json!({"autoscale": {"policy": "../up.py:scale"}}),
            "autoscale.policy",
        ),
        (json!({"replicas": {"max": 0}}), "replicas.max"),
        (json!({"timeout": "1h"}), "timeout"),
        (json!({"name": "Has Spaces"}), "name"),
        (
            json!({"cold_start": {"proxy": "file:///etc/passwd"}}),
            "cold_start.proxy",
        ),
        (
            json!({"replicas": {"min": 1, "surge": 2}}),
            "replicas.surge",
        ),
    ];
    for (extra, field) in cases {
        let (status, body) = c
            .post("/api/v1/services", &service(&repo, "bad", extra.clone()))
            .await?;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["field"], field, "{extra}: {body}");
    }
    assert_eq!(
        c.get("/api/v1/services").await?["services"],
        json!([]),
        "nothing stored"
    );
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_a_lost_agent_is_replaced_elsewhere() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let mut c = TestCluster::builder()
        .agent_ttl(Duration::from_secs(3))
        .agent(AgentSpec::new("a1"))
        .agent(AgentSpec::new("a2"))
        .start()
        .await?;
    serve(
        &c,
        &service(&repo, "lost", json!({"replicas": {"min": 1, "max": 1}})),
    )
    .await?;
    let v = wait_service(&c, "lost", LONG, "ready", |v| ready(v).len() == 1).await?;
    let first = ready(&v)[0]["agent"].as_str().unwrap().to_string();
    c.kill_agent(&first).await?;
    let v = wait_service(&c, "lost", LONG, "ready elsewhere", |v| {
        ready(v)
            .iter()
            .any(|r| r["agent"].as_str() != Some(first.as_str()))
    })
    .await?;
    let (status, body) = call(&c, "/s/lost/again").await?;
    assert_eq!(status, 200, "{body}");
    assert_ne!(ready(&v)[0]["agent"].as_str(), Some(first.as_str()));
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_policy_decides_and_a_failing_one_is_shown_while_the_default_applies()
-> anyhow::Result<()> {
    let repo = GitRepo::new(&[
        ("server.py", SERVER_PY),
        (
            "scaling.py",
            "import os\n\ndef scale(replicas, metrics):\n    assert 'pending_requests' in metrics and 'pending_works' in metrics\n    assert os.environ.get('POLICY_SEES') == 'the service env', 'runs in the service environment'\n    return 2\n",
        ),
        (
            "broken.py",
            "def scale(replicas, metrics):\n    raise ValueError('boom')\n",
        ),
        (
            "strange.py",
            "def scale(replicas, metrics):\n    return 'many'\n",
        ),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1").slots(4))
        .start()
        .await?;
    let auto = |policy: &str| json!({"scale_out_interval": "1s", "scale_in_interval": "1s", "policy": policy});
    let spec = |policy: &str| {
        service(
            &repo,
            "pol",
            json!({"replicas": {"min": 1, "max": 3}, "autoscale": auto(policy), "env": {"POLICY_SEES": "the service env"}}),
        )
    };
    serve(&c, &spec("scaling.py:scale")).await?;
    let v = wait_service(&c, "pol", LONG, "2 ready by the custom policy", |v| {
        ready(v).len() == 2
    })
    .await?;
    assert!(
        v["decision"]["why"]
            .as_str()
            .unwrap()
            .contains("custom (scaling.py:scale)"),
        "{v}"
    );
    assert_eq!(v["policy_error"], Value::Null);
    // A policy that raises: shown on the service; the default policy (idle: back to min) applies.
    serve(&c, &spec("broken.py:scale")).await?;
    let v = wait_service(&c, "pol", LONG, "the error shown and back to 1", |v| {
        v["policy_error"]
            .as_str()
            .is_some_and(|e| e.contains("ValueError: boom"))
            && v["target"] == 1
    })
    .await?;
    assert_eq!(v["generation"], 1, "a new policy is not a rollout: {v}");
    for (policy, shown) in [
        ("strange.py:scale", "not an int"),
        ("missing.py:scale", "autoscale.policy"),
        ("scaling.py:nope", "has no function `nope`"),
    ] {
        serve(&c, &spec(policy)).await?;
        wait_service(&c, "pol", LONG, shown, |v| {
            v["policy_error"]
                .as_str()
                .is_some_and(|e| e.contains(shown))
        })
        .await?;
    }
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_reached_through_their_agents_tunnels_when_told_to() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("server.py", SERVER_PY)])?;
    let c = TestCluster::builder()
        .controller_config(|cfg| {
            cfg.service_path = runyard_controller::services::connect::PathMode::Tunnel
        })
        .agent(AgentSpec::new("a1").slots(4))
        .start()
        .await?;
    let extra = json!({"replicas": {"min": 2, "max": 2}, "batching": {"max_batch_size": 4, "timeout": "20ms"}});
    serve(&c, &service(&repo, "far", extra)).await?;
    let v = wait_service(&c, "far", LONG, "2 ready", |v| ready(v).len() == 2).await?;
    for r in ready(&v) {
        assert_eq!(r["path"], "tunnel", "{v}");
    }
    // Plain requests, batches and an upgrade all go through the tunnels.
    let calls = (0..20).map(|i| {
        let c = &c;
        async move { call(c, &format!("/s/far/t?i={i}")).await }
    });
    for r in futures::future::join_all(calls).await {
        let (status, body) = r?;
        assert_eq!(status, 200, "{body}");
    }
    let r = c
        .client
        .post(format!("{}/s/far/predict", c.base_url()))
        .bearer_auth(&c.token)
        .json(&json!({"x": 1}))
        .send()
        .await?;
    assert_eq!(r.json::<Value>().await?["echo"], json!({"x": 1}));
    c.shutdown().await
}

/// Starts JupyterLab on `$PORT` under `/s/lab/`, no token of its own (Runyard's guards it).
const LAB_PY: &str = r#"import os, sys
from jupyterlab.labapp import main
sys.argv = ["jupyter-lab", "--ip=0.0.0.0", "--port=" + os.environ["PORT"], "--no-browser",
            "--ServerApp.base_url=/s/lab/", "--IdentityProvider.token=",
            "--ServerApp.disable_check_xsrf=True", "--ServerApp.root_dir=" + os.getcwd()]
sys.exit(main())
"#;

/// One websocket text frame from the client (masked, as clients must).
fn ws_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut f = vec![0x81u8];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one whole text message from the server (unmasked frames, continuations joined,
/// control frames skipped).
async fn ws_read(s: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut message = Vec::new();
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await?;
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await?;
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await?;
        if opcode >= 8 {
            anyhow::ensure!(opcode != 8, "the server closed the websocket");
            continue;
        }
        message.extend_from_slice(&payload);
        if fin {
            return Ok(String::from_utf8(message)?);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterlab_works_through_the_data_plane_kernel_websocket_included() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = GitRepo::new(&[("lab.py", LAB_PY)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let extra = json!({
        "script": "lab.py", "requirements": ["jupyterlab", "ipykernel"],
        "replicas": {"min": 1, "max": 1}, "strip_prefix": false, "health": "/s/lab/api"
    });
    serve(&c, &service(&repo, "lab", extra)).await?;
    wait_service(&c, "lab", Duration::from_secs(600), "ready", |v| {
        ready(v).len() == 1
    })
    .await?;
    // The lab's own page and API, under its base URL.
    let r = c.get_raw("/s/lab/lab").await?;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await?.contains("JupyterLab"));
    let (status, kernel) = c
        .post("/s/lab/api/kernels", &json!({"name": "python3"}))
        .await?;
    assert_eq!(status, 201, "{kernel}");
    let id = kernel["id"].as_str().unwrap().to_string();
    // The kernel's channels: a websocket through the proxy.
    let mut s = tokio::net::TcpStream::connect(c.http_addr).await?;
    let req = format!(
        "GET /s/lab/api/kernels/{id}/channels HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        c.http_addr, c.token
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(
            s.read(&mut b).await? == 1,
            "closed: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let mut head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        let mut rest = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut rest))
            .await
            .unwrap_or(Ok(0))
            .unwrap_or(0);
        head.push_str(&String::from_utf8_lossy(&rest[..n]));
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let execute = json!({
        "header": {"msg_id": "m1", "username": "t", "session": "s1", "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": "print(6 * 7)", "silent": false, "store_history": false, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
    });
    s.write_all(&ws_frame(&execute.to_string())).await?;
    let answer = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let m: Value = serde_json::from_str(&ws_read(&mut s).await?)?;
            if m["msg_type"] == "stream" && m["parent_header"]["msg_id"] == "m1" {
                return anyhow::Ok(m["content"]["text"].as_str().unwrap_or("").to_string());
            }
        }
    })
    .await??;
    assert_eq!(answer, "42\n");
    c.shutdown().await
}
