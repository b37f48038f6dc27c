//! Training-run benchmark: environment build times (cold and warm uv cache, pip for contrast),
//! the environment phase of a resubmitted Lightning job through a real cluster, and the
//! overhead of the Lightning reporter on training wall time.
//!
//! `cargo bench -p runyard-tests --bench training [-- --quick]`. Needs network access to PyPI
//! for the cold runs; the Lightning runs use the shared test uv cache (warm after the tests).
//! The machine is shared and noisy: read ratios within one run, not absolute figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use runyard_agent::pyenv::EnvBuilder;
use runyard_tests::bench::stats::{Row, render};
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use runyard_tests::scripts::LIGHTNING_TRAIN;
use serde_json::json;

const SMALL: &[&str] = &["numpy", "requests"];

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}

async fn build_env(builder: &EnvBuilder, reqs: &[&str]) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let reqs: Vec<String> = reqs.iter().map(|s| s.to_string()).collect();
    let t = Instant::now();
    builder.prepare(dir.path(), &reqs, None).await?;
    Ok(t.elapsed())
}

fn uv_on_path() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("uv"))
        .find(|p| p.is_file())
}

/// A venv with lightning from the shared cache, for running the training script directly.
fn lightning_venv(dir: &Path) -> anyhow::Result<PathBuf> {
    let cache = runyard_tests::shared_uv_cache();
    let venv = dir.join("venv");
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("uv")
            .args(args)
            .env("UV_CACHE_DIR", &cache)
            .env("UV_PYTHON_DOWNLOADS", "never")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "uv {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(&["venv", "-q", "--python", "python3", venv.to_str().unwrap()])?;
    run(&[
        "pip",
        "install",
        "-q",
        "--python",
        venv.join("bin/python").to_str().unwrap(),
        "lightning",
    ])?;
    Ok(venv.join("bin/python"))
}

fn train_once(python: &Path, reporter: Option<&Path>, work: &Path) -> anyhow::Result<Duration> {
    let script = work.join("train.py");
    std::fs::write(&script, LIGHTNING_TRAIN)?;
    let out_dir = tempfile::tempdir_in(work)?;
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args([
            "--epochs",
            "3",
            "--samples",
            "20000",
            "--hidden",
            "64",
            "--batch",
            "64",
            "--step-sleep",
            "0",
            "--out",
        ])
        .arg(out_dir.path())
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONPATH");
    if let Some(r) = reporter {
        cmd.env("PYTHONPATH", r)
            .env("RUNYARD_REPORT_FILE", out_dir.path().join("report.jsonl"));
    }
    let t = Instant::now();
    let out = cmd.output()?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "training failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if reporter.is_some() {
        let report = std::fs::read_to_string(out_dir.path().join("report.jsonl"))?;
        anyhow::ensure!(
            report.contains("\"checkpoint\""),
            "the reporter reported no checkpoint"
        );
    }
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2 } else { 3 };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("training benchmark; load average at start: {}", load.trim());
    println!("(shared, noisy machine: compare ratios within this run)\n");
    let mut rows = Vec::new();
    let python = PathBuf::from("python3");
    anyhow::ensure!(
        uv_on_path().is_some(),
        "uv is not on PATH: run scripts/install-test-deps"
    );

    // Cold: a fresh cache each run (downloads everything); warm: one cache, warmed once.
    let mut cold = Vec::new();
    for _ in 0..n {
        let cache = tempfile::tempdir()?;
        cold.push(
            build_env(
                &EnvBuilder::new(python.clone(), None, cache.path().to_path_buf()),
                SMALL,
            )
            .await?,
        );
    }
    rows.push(Row::latency(
        "env numpy+requests, uv, cold cache",
        &cold,
        None,
    ));
    let warm_cache = tempfile::tempdir()?;
    let warm_builder = EnvBuilder::new(python.clone(), None, warm_cache.path().to_path_buf());
    build_env(&warm_builder, SMALL).await?;
    let mut warm = Vec::new();
    for _ in 0..n + 2 {
        warm.push(build_env(&warm_builder, SMALL).await?);
    }
    rows.push(Row::latency(
        "env numpy+requests, uv, warm cache",
        &warm,
        None,
    ));
    let pip = vec![build_env(&EnvBuilder::pip(python.clone()), SMALL).await?];
    rows.push(Row::latency("env numpy+requests, venv + pip", &pip, None));

    // The environment phase of a resubmitted Lightning job, through a real cluster.
    let repo = GitRepo::new(&[(
        "noop.py",
        "import lightning\nprint(lightning.__version__)\n",
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("bench"))
        .start()
        .await?;
    let mut phases = Vec::new();
    for i in 0..=n {
        let id = c
            .submit(json!({"repo": repo.url(), "script": "noop.py", "requirements": ["lightning"]}))
            .await?;
        let job = c
            .wait_status(&id, &["succeeded", "failed"], Duration::from_secs(900))
            .await?;
        anyhow::ensure!(job["status"] == "succeeded", "lightning job failed: {job}");
        let secs = job["environment"]["seconds"].as_f64().unwrap_or(f64::NAN);
        if i > 0 {
            // The first submit may warm the shared cache; the rest are resubmits.
            phases.push(Duration::from_secs_f64(secs));
        }
    }
    c.shutdown().await?;
    rows.push(Row::latency(
        "env phase, resubmitted lightning job (warm)",
        &phases,
        Some(Duration::from_secs(10)),
    ));

    // Reporter overhead: the same training with and without the reporter, interleaved.
    let work = tempfile::tempdir()?;
    let venv_python = lightning_venv(work.path())?;
    let reporter = runyard_agent::reporter::install(&work.path().join("reporter"))?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..n {
        without.push(train_once(&venv_python, None, work.path())?);
        with.push(train_once(&venv_python, Some(&reporter), work.path())?);
    }
    rows.push(Row::latency(
        "lightning 3 epochs, without reporter",
        &without,
        None,
    ));
    rows.push(Row::latency(
        "lightning 3 epochs, with reporter",
        &with,
        None,
    ));
    println!("{}", render(&rows));
    let ratio = median(&with).as_secs_f64() / median(&without).as_secs_f64();
    println!(
        "reporter overhead: {:+.1} % of training wall time (median with / median without = {ratio:.3})",
        (ratio - 1.0) * 100.0
    );
    println!(
        "warm vs cold uv: {:.1}x faster; uv warm vs pip: {:.1}x faster",
        median(&cold).as_secs_f64() / median(&warm).as_secs_f64(),
        median(&pip).as_secs_f64() / median(&warm).as_secs_f64()
    );
    Ok(())
}
