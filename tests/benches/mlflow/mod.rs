//! The `mlflow` mode: one MLflow project (a scikit-learn ElasticNet on synthetic data, with a
//! `python_env.yaml`), run to FINISHED both ways in one run, interleaved per round:
//!
//! - `mlflow run GIT_URL -e main -P alpha=... --env-manager uv` against a real `mlflow server`
//!   (its uv environment warm after the warm-up round): the command's wall time, which ends when
//!   its run is FINISHED;
//! - Runyard: `POST /api/v1/jobs` with the entry point to an in-process `TestCluster` with one
//!   warm agent (mirror and uv cache), tracked in the same server: from the POST until the job is
//!   `succeeded` and its run `FINISHED`.
//!
//! Target: Runyard at most half of MLflow's time.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use runyard_tests::bench::stats::{Row, Verdict, percentile};
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use runyard_tests::mlflow::{MLFLOW_SKINNY, MlflowServer, client_python};
use serde_json::json;

const RATIO_TARGET: f64 = 0.5;
const RUN_DEADLINE: Duration = Duration::from_secs(600);

const MLPROJECT: &str = r#"
name: elasticnet
python_env: python_env.yaml
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
      l1_ratio: {type: float, default: 0.1}
    command: "python train.py --alpha {alpha} --l1-ratio {l1_ratio}"
"#;

const TRAIN_PY: &str = r#"
import argparse
import mlflow
import numpy as np
import pandas as pd
from sklearn.linear_model import ElasticNet
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import train_test_split

p = argparse.ArgumentParser()
p.add_argument("--alpha", type=float)
p.add_argument("--l1-ratio", type=float)
a = p.parse_args()
rng = np.random.default_rng(0)
X = pd.DataFrame(rng.normal(size=(2000, 11)), columns=[f"f{i}" for i in range(11)])
y = X.to_numpy() @ rng.normal(size=11) + rng.normal(scale=0.5, size=2000)
Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0)
with mlflow.start_run():
    mlflow.log_param("alpha", a.alpha)
    mlflow.log_param("l1_ratio", a.l1_ratio)
    m = ElasticNet(alpha=a.alpha, l1_ratio=a.l1_ratio, random_state=42).fit(Xtr, ytr)
    rmse = mean_squared_error(yte, m.predict(Xte)) ** 0.5
    mlflow.log_metric("rmse", rmse)
    print("rmse", rmse)
"#;

pub async fn run(quick: bool, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let rounds = if quick { 2 } else { 5 };
    let py = client_python().await?;
    let server = MlflowServer::start(&py).await?;
    let env_file = format!(
        "python: \"3.11\"\ndependencies:\n  - scikit-learn\n  - pandas\n  - \"{MLFLOW_SKINNY}\"\n"
    );
    let repo = GitRepo::new(&[
        ("MLproject", MLPROJECT),
        ("python_env.yaml", &env_file),
        ("train.py", TRAIN_PY),
    ])?;
    let url = server.url.clone();
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .controller_config(move |config| config.mlflow_tracking_uri = Some(url))
        .start()
        .await?;
    let mut mlflow_times = Vec::new();
    let mut runyard_times = Vec::new();
    let mut phases: [Vec<Duration>; 3] = Default::default();
    // Round 0 warms both: MLflow's uv environment, the agent's mirror and uv cache.
    for round in 0..=rounds {
        let alpha = format!("0.{}", round + 1);
        let t = mlflow_run(&py, &server, &repo.url(), &alpha).await?;
        let (r, parts) = runyard_run(&c, &server, &repo.url(), &alpha).await?;
        if round > 0 {
            mlflow_times.push(t);
            runyard_times.push(r);
            for (all, part) in phases.iter_mut().zip(parts) {
                all.push(part);
            }
        }
    }
    rows.push(Row::latency(
        "mlflow: `mlflow run --env-manager uv` (warm) to FINISHED",
        &mlflow_times,
        None,
    ));
    rows.push(Row::latency(
        "mlflow: Runyard submit to FINISHED (warm agent)",
        &runyard_times,
        None,
    ));
    for (name, samples) in [
        "mlflow: Runyard, submit to running (checkout, environment)",
        "mlflow: Runyard, running to succeeded (the script, its imports)",
        "mlflow: Runyard, succeeded to the run FINISHED",
    ]
    .iter()
    .zip(&phases)
    {
        rows.push(Row::latency(name, samples, None));
    }
    let ratios: Vec<f64> = mlflow_times
        .iter()
        .zip(&runyard_times)
        .map(|(m, r)| r.as_secs_f64() / m.as_secs_f64())
        .collect();
    let median = percentile(&ratios, 50.0).unwrap_or(f64::MAX);
    let at = |p: f64| format!("{:.2}", percentile(&ratios, p).unwrap_or(f64::NAN));
    rows.push(Row {
        metric: "mlflow: Runyard / mlflow run, per round".into(),
        samples: ratios.len(),
        median: format!("{median:.2}"),
        p99: "-".into(),
        range: format!("{} .. {}", at(0.0), at(100.0)),
        target: format!("≤ {RATIO_TARGET}"),
        verdict: if median <= RATIO_TARGET {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    });
    notes.push(format!(
        "mlflow: {rounds} rounds after a warm-up, interleaved; the same ElasticNet project, tracked in one mlflow server"
    ));
    c.shutdown().await
}

async fn mlflow_run(
    py: &std::path::Path,
    server: &MlflowServer,
    url: &str,
    alpha: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = tokio::time::timeout(
        RUN_DEADLINE,
        tokio::process::Command::new(py)
            .args(["-m", "mlflow", "run", url, "-e", "main", "-P"])
            .arg(format!("alpha={alpha}"))
            .args(["--env-manager", "uv", "--experiment-name", "bench-mlflow"])
            .env("MLFLOW_TRACKING_URI", &server.url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("mlflow run took too long")??;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "mlflow run failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(took)
}

async fn runyard_run(
    c: &TestCluster,
    server: &MlflowServer,
    url: &str,
    alpha: &str,
) -> anyhow::Result<(Duration, [Duration; 3])> {
    let started = Instant::now();
    let id = c
        .submit(json!({"repo": url, "parameters": {"alpha": alpha}, "mlflow": {"experiment_name": "bench-runyard"}}))
        .await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed"], RUN_DEADLINE)
        .await?;
    if job["status"] != "succeeded" {
        bail!("the Runyard job failed: {job}\n{}", c.logs(&id).await?);
    }
    let succeeded = started.elapsed();
    let run = job["mlflow"]["run_id"].as_str().context("no run")?;
    server.wait_run(run, "FINISHED", RUN_DEADLINE).await?;
    let total = started.elapsed();
    let stamp = |k: &str| -> anyhow::Result<Duration> {
        let v: runyard_model::Timestamp =
            serde_json::from_value(job[k].clone()).with_context(|| format!("no {k} in {job}"))?;
        Ok(Duration::from_millis(v.0))
    };
    let (created, started_at, finished) = (
        stamp("created_at")?,
        stamp("started_at")?,
        stamp("finished_at")?,
    );
    Ok((
        total,
        [
            started_at.saturating_sub(created),
            finished.saturating_sub(started_at),
            total.saturating_sub(succeeded),
        ],
    ))
}
