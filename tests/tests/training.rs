//! A real PyTorch Lightning training run through Runyard: environment from PyPI with uv (warm
//! shared cache), the reporter hooked in through Lightning's entry points with no change to the
//! script, progress, metric history, best checkpoint upload and download.

use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use runyard_tests::scripts::{LIGHTNING_SERVE, LIGHTNING_TRAIN};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lightning_run_reports_progress_metrics_and_best_checkpoint() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("train.py", LIGHTNING_TRAIN), ("serve.py", LIGHTNING_SERVE)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let spec = json!({"repo": repo.url(), "script": "train.py", "args": ["--epochs", "3", "--batch", "32", "--step-sleep", "0"], "requirements": ["lightning"]});
    let id = c.submit(spec.clone()).await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(900))
        .await?;
    let logs = c.logs(&id).await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{logs}");

    // Progress reached 100 %.
    assert_eq!(job["progress"]["fraction"], 1.0, "{job}");
    assert_eq!(job["progress"]["max_epochs"], 3);
    // One val_loss per epoch in the history.
    let metrics = c.get(&format!("/api/v1/jobs/{id}/metrics")).await?;
    let val = c.metric_values(&id, "val_loss").await?;
    assert_eq!(val.len(), 3, "{metrics}");
    let epochs: Vec<u64> = metrics["series"]["val_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [0, 1, 2]);
    // The best score is the minimum reported val_loss.
    let best = &job["best"];
    let min = val.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(best["monitor"], "val_loss");
    assert!(
        (best["score"].as_f64().unwrap() - min).abs() < 1e-6,
        "best {best} vs min {min}"
    );

    // The download is byte-identical to the file the trainer wrote.
    let r = c.get_raw(&format!("/api/v1/jobs/{id}/checkpoint")).await?;
    assert_eq!(r.status().as_u16(), 200);
    let body = r.bytes().await?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&body);
    let sum: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let printed = logs
        .lines()
        .find_map(|l| l.strip_prefix("best "))
        .expect("script printed its best checkpoint");
    assert!(
        printed.ends_with(&sum),
        "downloaded {sum}, trainer wrote {printed}"
    );
    assert_eq!(best["sha256"], sum.as_str());

    // It loads with torch.load in the job's environment, rebuilt from the recorded pins.
    let env = &job["environment"];
    assert_eq!(env["installer"], "uv");
    let pins: Vec<String> = env["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        pins.iter().any(|p| p.starts_with("lightning==")),
        "{pins:?}"
    );
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("best.ckpt");
    std::fs::write(&ckpt, &body)?;
    std::fs::write(dir.path().join("pins.txt"), pins.join("\n"))?;
    let venv = dir.path().join("venv");
    let uv = |args: &[&str]| {
        std::process::Command::new("uv")
            .args(args)
            .env("UV_CACHE_DIR", runyard_tests::shared_uv_cache())
            .env("UV_PYTHON_DOWNLOADS", "never")
            .output()
    };
    let out = uv(&["venv", "-q", "--python", "python3", venv.to_str().unwrap()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py = venv.join("bin/python");
    let pins_file = dir.path().join("pins.txt");
    let out = uv(&[
        "pip",
        "install",
        "-q",
        "--python",
        py.to_str().unwrap(),
        "-r",
        pins_file.to_str().unwrap(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(&py)
        .args(["-c", "import sys, torch; c = torch.load(sys.argv[1], weights_only=False); print(sorted(c['state_dict']))", ckpt.to_str().unwrap()])
        .output()?;
    assert!(
        out.status.success(),
        "torch.load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "['net.bias', 'net.weight']"
    );

    // The log keeps the script's output readable: Lightning's progress bar is coalesced.
    assert!(logs.len() < 64 * 1024, "log is {} bytes", logs.len());

    // Train, then serve the best model with one line: `model_from`.
    let svc = json!({
        "name": "model", "repo": repo.url(), "script": "serve.py", "requirements": ["lightning"],
        "model_from": id, "replicas": {"min": 1, "max": 1}, "health": "/model",
        "batching": {"max_batch_size": 4, "timeout": "50ms"}
    });
    let (status, body) = c.post("/api/v1/services", &svc).await?;
    assert_eq!(status, 201, "{body}");
    runyard_tests::services::wait_service(&c, "model", Duration::from_secs(300), "ready", |v| {
        runyard_tests::services::ready(v).len() == 1
    })
    .await?;
    let served = c.get("/s/model/model").await?;
    assert_eq!(
        served["sha256"],
        sum.as_str(),
        "the replica loaded the job's best checkpoint"
    );
    assert_eq!(served["keys"], json!(["net.bias", "net.weight"]));
    let r = c
        .client
        .post(format!("{}/s/model/predict", c.base_url()))
        .bearer_auth(&c.token)
        .json(&json!({"x": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.json::<serde_json::Value>().await?["y"].is_f64());
    // model_from must name a succeeded job with a checkpoint.
    let mut bad = svc.clone();
    bad["name"] = json!("nomodel");
    bad["model_from"] = json!("01aaaaaaaaaaaaaaaaaaaaaaaa");
    let (status, body) = c.post("/api/v1/services", &bad).await?;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("model_from")),
        "{body}"
    );
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_fit_still_reports_and_uploads_the_best_so_far() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("train.py", LIGHTNING_TRAIN)])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let spec = json!({"repo": repo.url(), "script": "train.py", "args": ["--epochs", "4", "--batch", "32", "--step-sleep", "0", "--crash-at", "2"], "requirements": ["lightning"]});
    let id = c.submit(spec).await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(900))
        .await?;
    let logs = c.logs(&id).await?;
    assert_eq!(
        (job["status"].as_str(), job["failure"].as_str()),
        (Some("failed"), Some("exit")),
        "{job}"
    );
    assert!(
        logs.contains("boom in epoch 2"),
        "the traceback is in the log"
    );
    let best = &job["best"];
    assert_eq!(best["monitor"], "val_loss", "{job}");
    assert!(
        best["epoch"].as_u64().unwrap() <= 1,
        "best so far is from epoch 0 or 1: {best}"
    );
    let metrics = c.get(&format!("/api/v1/jobs/{id}/metrics")).await?;
    let val = c.metric_values(&id, "val_loss").await?;
    assert_eq!(
        val.len(),
        2,
        "two epochs validated before the crash: {metrics}"
    );
    let min = val.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!((best["score"].as_f64().unwrap() - min).abs() < 1e-6);
    let r = c.get_raw(&format!("/api/v1/jobs/{id}/checkpoint")).await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.bytes().await?.len() as u64,
        best["size"].as_u64().unwrap()
    );
    c.shutdown().await
}
