//! MLflow projects on Runyard: native entry points (typed parameters, command templates run
//! without a shell, python_env and conda environments through uv), and MLflow tracking with a
//! real `mlflow server` on SQLite plus the `mlflow run --backend runyard` plugin.

use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(300);

/// Prints its argv as JSON, and proves its environment has `six` when asked to.
const SHOW_PY: &str = r#"
import json, os, sys
if os.environ.get("NEED_SIX"):
    import six
    print("six", six.__version__)
print("ARGV " + json.dumps(sys.argv[1:]))
if os.environ.get("READ_FIRST"):
    print("CONTENT " + open(sys.argv[1]).read())
"#;

/// Serves `body` to every GET on a loopback port (a remote file for a `path` parameter).
async fn serve_file(body: &'static str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

const MLPROJECT: &str = r#"
name: demo
python_env: python_env.yaml
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
      n: int
      name: {type: string, default: "plain"}
    command: "python show.py --alpha {alpha} --n {n} --name {name}"
  data:
    parameters:
      file: path
    command: "python show.py {file}"
  shell:
    command: "python show.py && rm -rf /"
"#;

const PYTHON_ENV: &str =
    "python: \"3\"\nbuild_dependencies: [pip]\ndependencies:\n  - -r requirements.txt\n";

fn argv_of(log: &str) -> Value {
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("ARGV "))
        .unwrap_or_else(|| panic!("no ARGV line in the log:\n{log}"));
    serde_json::from_str(line).unwrap()
}

/// The job failed with `kind`, and its reason says `words`.
fn failed_with(job: &Value, kind: &str, words: &str) {
    assert_eq!(job["failure"], kind, "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(words), "{words:?} not in the reason: {job}");
}

async fn run(c: &TestCluster, spec: Value) -> anyhow::Result<(Value, String)> {
    let id = c.submit(spec).await?;
    let job = c
        .wait_status(&id, &["succeeded", "failed", "stopped"], LIMIT)
        .await?;
    let log = c.logs(&id).await?;
    Ok((job, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_points_run_with_checked_parameters_and_their_environment() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[
        ("MLproject", MLPROJECT),
        ("python_env.yaml", PYTHON_ENV),
        ("requirements.txt", "six==1.16.0\n"),
        ("show.py", SHOW_PY),
        ("inputs/data.csv", "a,b\n"),
        ("tool.sh", "echo \"ARGV [\\\"$1\\\", \\\"$2\\\"]\"\n"),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;

    // main, no script: the values, defaults filled in, quoted into the template and split back
    // without a shell; an undeclared parameter is appended; the python_env's requirements are in.
    let (job, log) = run(
        &c,
        json!({"repo": repo.url(), "parameters": {"n": 3, "name": "it's $HOME; x", "extra": "e f"}, "env": {"NEED_SIX": "1"}}),
    )
    .await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert_eq!(job["spec"]["entry_point"], "main");
    assert_eq!(
        argv_of(&log),
        json!([
            "--alpha",
            "0.5",
            "--n",
            "3",
            "--name",
            "it's $HOME; x",
            "--extra",
            "e f"
        ])
    );
    assert!(log.contains("six 1.16.0"), "{log}");
    let project = &job["project"];
    assert_eq!(project["entry_point"], "main");
    assert_eq!(project["env"], "python_env");
    assert_eq!(project["parameters"]["alpha"], "0.5", "{project}");
    assert_eq!(project["parameters"]["extra"], "e f");

    // A wrong type fails the job as `params`, naming the parameter, before anything runs, and
    // is not retried.
    let (job, log) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "main", "parameters": {"n": "three"}, "retries": 2}),
    )
    .await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["failure"], "params", "{job}");
    assert_eq!(job["attempt"], 1, "not retried: {job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("`n`") && reason.contains("not an int"),
        "{reason}"
    );
    assert!(!log.contains("ARGV"), "the script did not run: {log}");

    // A required parameter left out is named too.
    let (job, _) = run(&c, json!({"repo": repo.url()})).await?;
    failed_with(&job, "params", "required");

    // A path parameter is found in the checkout and passed as an absolute path; one that is not
    // there (a file on the submitting machine) is refused with why.
    let (job, log) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "data", "parameters": {"file": "inputs/data.csv"}}),
    )
    .await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    let file = argv_of(&log)[0].as_str().unwrap().to_string();
    assert!(
        file.starts_with('/') && file.ends_with("/src/inputs/data.csv"),
        "{file}"
    );
    let (job, _) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "data", "parameters": {"file": "/home/me/train.csv"}}),
    )
    .await?;
    failed_with(&job, "params", "not on the machine it was submitted from");
    // An http(s) URL is fetched into the attempt's directory first, as MLflow does; other
    // schemes are refused with what works.
    let port = serve_file("remote,rows\n").await?;
    let (job, log) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "data", "parameters": {"file": format!("http://127.0.0.1:{port}/d/remote.csv")}, "env": {"READ_FIRST": "1"}}),
    )
    .await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    let file = argv_of(&log)[0].as_str().unwrap().to_string();
    assert!(file.ends_with("/params/file/remote.csv"), "{file}");
    assert!(log.contains("CONTENT remote,rows"), "{log}");
    let (job, _) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "data", "parameters": {"file": "s3://bucket/train.csv"}}),
    )
    .await?;
    failed_with(&job, "params", "http(s) URLs only");

    // A command that needs a shell is refused, not run by one.
    let (job, _) = run(&c, json!({"repo": repo.url(), "entry_point": "shell"})).await?;
    failed_with(&job, "script", "`&&` needs a shell");

    // Entry points that are files: every parameter as --name value.
    let (job, log) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "show.py", "parameters": {"lr": "0.1"}}),
    )
    .await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert_eq!(argv_of(&log), json!(["--lr", "0.1"]));
    let (job, log) = run(
        &c,
        json!({"repo": repo.url(), "entry_point": "tool.sh", "parameters": {"k": "v"}}),
    )
    .await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert_eq!(argv_of(&log), json!(["--k", "v"]));

    // An unknown entry point names the ones there are.
    let (job, _) = run(&c, json!({"repo": repo.url(), "entry_point": "nope"})).await?;
    failed_with(&job, "script", "data, main, shell");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conda_python_and_docker_environments() -> anyhow::Result<()> {
    let conda = GitRepo::new(&[
        (
            "MLproject",
            "conda_env: env.yaml\nentry_points:\n  main:\n    command: python show.py\n",
        ),
        (
            "env.yaml",
            "name: t\nchannels: [conda-forge]\ndependencies:\n  - python=3\n  - pip\n  - six=1.16\n  - pip:\n    - packaging\n",
        ),
        ("show.py", SHOW_PY),
    ])?;
    let unmapped = GitRepo::new(&[
        (
            "conda.yaml",
            "dependencies: [six, cudatoolkit=11.8, libgcc-ng]\n",
        ),
        ("show.py", SHOW_PY),
    ])?;
    let old_python = GitRepo::new(&[
        ("python_env.yaml", "python: \"2.7\"\ndependencies: [six]\n"),
        ("show.py", SHOW_PY),
    ])?;
    let docker = GitRepo::new(&[
        (
            "MLproject",
            "docker_env: {image: pytorch/pytorch}\nentry_points:\n  main:\n    command: python show.py\n",
        ),
        ("show.py", SHOW_PY),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;

    // The conda file's packages come from PyPI through uv (`six=1.16` as `six==1.16.*`).
    let (job, log) = run(&c, json!({"repo": conda.url(), "env": {"NEED_SIX": "1"}})).await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert!(log.contains("six 1.16"), "{log}");
    assert_eq!(job["project"]["env"], "conda");
    let packages = job["environment"]["packages"].to_string();
    assert!(packages.contains("packaging=="), "{packages}");

    // Found without an MLproject (conda.yaml at the top), run as a file entry point; what has no
    // PyPI counterpart is listed.
    let (job, _) = run(
        &c,
        json!({"repo": unmapped.url(), "entry_point": "show.py"}),
    )
    .await?;
    assert_eq!(job["failure"], "env", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.contains("cudatoolkit=11.8, libgcc-ng"), "{reason}");

    let (job, _) = run(
        &c,
        json!({"repo": old_python.url(), "entry_point": "show.py"}),
    )
    .await?;
    assert_eq!(job["failure"], "env", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("needs Python 2.7") && reason.contains("agent a1 has 3."),
        "{reason}"
    );

    let (job, _) = run(&c, json!({"repo": docker.url()})).await?;
    failed_with(&job, "env", "does not run containers");
    c.shutdown().await
}

const TRACKED_MLPROJECT: &str = r#"
name: tracked
python_env: python_env.yaml
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
      l1_ratio: {type: float, default: 0.1}
      fail: {type: int, default: 0}
      sleep: {type: float, default: 0}
    command: "python train.py --alpha {alpha} --l1-ratio {l1_ratio} --fail {fail} --sleep {sleep}"
"#;

/// Logs a metric into the run Runyard made, through MLflow's own client.
const TRAIN_PY: &str = r#"
import argparse, os, sys, time
import mlflow
p = argparse.ArgumentParser()
p.add_argument("--alpha", type=float)
p.add_argument("--l1-ratio", type=float)
p.add_argument("--fail", type=int)
p.add_argument("--sleep", type=float)
a = p.parse_args()
print("run", os.environ["MLFLOW_RUN_ID"], "experiment", os.environ["MLFLOW_EXPERIMENT_ID"], flush=True)
with mlflow.start_run():
    mlflow.log_metric("rmse", 1.0 - a.alpha)
time.sleep(a.sleep)
print("trained", flush=True)
sys.exit(3 if a.fail else 0)
"#;

/// The `run ID` line the script prints.
fn run_id_in(log: &str) -> String {
    log.lines()
        .find_map(|l| l.strip_prefix("run "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no run line in:\n{log}"))
        .to_string()
}

async fn python(
    py: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(py);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(tokio::time::timeout(LIMIT, cmd.output()).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_runs_and_the_mlflow_backend_plugin() -> anyhow::Result<()> {
    use runyard_tests::mlflow::{MLFLOW_SKINNY, MlflowServer, client_python, pairs};
    let py = client_python().await?;
    let server = MlflowServer::start(&py).await?;
    let repo = GitRepo::new(&[
        ("MLproject", TRACKED_MLPROJECT),
        (
            "python_env.yaml",
            &format!("python: \"3\"\ndependencies: [\"{MLFLOW_SKINNY}\"]\n"),
        ),
        ("train.py", TRAIN_PY),
    ])?;
    let url = server.url.clone();
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .controller_config(move |config| config.mlflow_tracking_uri = Some(url))
        .start()
        .await?;

    // Native: the run exists as soon as the job does, gets MLflow's project tags, the entry
    // point's parameters (defaults included), the script's metric, and ends FINISHED.
    let id = c
        .submit(json!({"repo": repo.url(), "parameters": {"alpha": 0.75}, "mlflow": {"experiment_name": "native"}}))
        .await?;
    let job = c.job(&id).await?;
    let run_id = job["mlflow"]["run_id"]
        .as_str()
        .expect("a run at submit")
        .to_string();
    assert!(
        job["mlflow"]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/runs/{run_id}")),
        "{job}"
    );
    let job = c.wait_status(&id, &["succeeded", "failed"], LIMIT).await?;
    let log = c.logs(&id).await?;
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert_eq!(
        run_id_in(&log),
        run_id,
        "the script logged into Runyard's run"
    );
    let run = server.wait_run(&run_id, "FINISHED", LIMIT).await?;
    let params = pairs(&run, "params");
    assert_eq!(
        params.get("alpha").map(String::as_str),
        Some("0.75"),
        "{run}"
    );
    assert_eq!(
        params.get("l1_ratio").map(String::as_str),
        Some("0.1"),
        "{run}"
    );
    let tags = pairs(&run, "tags");
    for (k, v) in [
        ("mlflow.source.type", "PROJECT"),
        ("mlflow.project.backend", "runyard"),
        ("mlflow.project.entryPoint", "main"),
        ("mlflow.project.env", "python_env"),
        ("mlflow.user", "admin"),
        ("runyard.job_id", id.as_str()),
        ("mlflow.source.git.commit", job["commit"].as_str().unwrap()),
    ] {
        assert_eq!(tags.get(k).map(String::as_str), Some(v), "tag {k}: {run}");
    }
    assert!(
        tags["runyard.job_url"].ends_with(&format!("/#/runs/{id}")),
        "{run}"
    );
    let rmse = &run["data"]["metrics"][0];
    assert_eq!(
        (rmse["key"].as_str(), rmse["value"].as_f64()),
        (Some("rmse"), Some(0.25)),
        "{run}"
    );

    // A failing script leaves the run FAILED, even though the script's own `with` ended it.
    let id = c
        .submit(json!({"repo": repo.url(), "parameters": {"fail": 1}}))
        .await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LIMIT).await?;
    assert_eq!(
        (job["status"].as_str(), job["exit_code"].as_i64()),
        (Some("failed"), Some(3)),
        "{job}"
    );
    server
        .wait_run(job["mlflow"]["run_id"].as_str().unwrap(), "FAILED", LIMIT)
        .await?;

    // `mlflow run --backend runyard`, following: the log on the terminal, the exit code of the job.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("runyard.json");
    std::fs::write(&config, json!({"follow": true}).to_string())?;
    let base = c.base_url();
    let env = [
        ("MLFLOW_TRACKING_URI", server.url.as_str()),
        ("RUNYARD_CONTROLLER", base.as_str()),
        ("RUNYARD_TOKEN", c.token.as_str()),
    ];
    let url = repo.url();
    let config_arg = config.display().to_string();
    let mlflow_run = |extra: &'static [&'static str], cfg: String| {
        let url = url.clone();
        let py = py.clone();
        async move {
            let mut args = vec![
                "-m",
                "mlflow",
                "run",
                url.as_str(),
                "-e",
                "main",
                "--backend",
                "runyard",
                "--backend-config",
                cfg.as_str(),
                "--experiment-name",
                "cli",
            ];
            args.extend_from_slice(extra);
            python(&py, &env, &args).await
        }
    };
    let out = mlflow_run(&["-P", "alpha=0.5"], config_arg.clone()).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("trained"),
        "the job's log is streamed: {stdout}\n{stderr}"
    );
    let run = server
        .wait_run(&run_id_in(&stdout), "FINISHED", LIMIT)
        .await?;
    assert_eq!(
        pairs(&run, "params").get("alpha").map(String::as_str),
        Some("0.5"),
        "{run}"
    );
    assert_eq!(
        pairs(&run, "tags")
            .get("mlflow.project.backend")
            .map(String::as_str),
        Some("runyard")
    );

    let out = mlflow_run(&["-P", "fail=1"], config_arg.clone()).await?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    server
        .wait_run(&run_id_in(&stdout), "FAILED", LIMIT)
        .await?;

    // A local checkout runs as it is, uncommitted change included (`mlflow run DIR`).
    let checkout = GitRepo::new(&[
        ("MLproject", TRACKED_MLPROJECT),
        (
            "python_env.yaml",
            &format!("python: \"3\"\ndependencies: [\"{MLFLOW_SKINNY}\"]\n"),
        ),
        ("train.py", TRAIN_PY),
    ])?;
    std::fs::write(
        checkout.path.join("train.py"),
        TRAIN_PY.replace("print(\"trained\"", "print(\"trained with a local change\""),
    )?;
    let local = checkout.path.display().to_string();
    let out = python(
        &py,
        &env,
        &[
            "-m",
            "mlflow",
            "run",
            &local,
            "-e",
            "main",
            "--backend",
            "runyard",
            "--backend-config",
            &config_arg,
        ],
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("trained with a local change"), "{stdout}");
    let run = server
        .wait_run(&run_id_in(&stdout), "FINISHED", LIMIT)
        .await?;
    let tags = pairs(&run, "tags");
    assert!(
        tags["runyard.snapshot"].starts_with("snapshot:sha256:"),
        "{run}"
    );
    assert_eq!(
        tags.get("runyard.snapshot.dirty").map(String::as_str),
        Some("true"),
        "{run}"
    );
    assert_eq!(
        tags.get("mlflow.source.git.commit"),
        Some(&checkout.head()?),
        "{run}"
    );

    // Without follow it returns once submitted (MLflow runs plugins asynchronously); the run
    // still ends when the job does, with nobody waiting.
    let out = mlflow_run(&[], json!({}).to_string()).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let job_id = stderr
        .split_whitespace()
        .find(|w| runyard_model::is_job_id(w.trim_matches(|c: char| !c.is_ascii_alphanumeric())))
        .map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .unwrap_or_else(|| panic!("no job id printed: {stderr}"));
    let job = c
        .wait_status(&job_id, &["succeeded", "failed"], LIMIT)
        .await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    server
        .wait_run(job["mlflow"]["run_id"].as_str().unwrap(), "FINISHED", LIMIT)
        .await?;

    // mlflow.projects.run: cancel() stops the job and leaves the run KILLED; a parameter of the
    // wrong type fails before the script runs; synchronous=True waits for success.
    let driver = format!(
        r#"
import json, time, mlflow
cfg = {{"controller": {base:?}, "token": {token:?}}}
uri = {url:?}
r = mlflow.projects.run(uri, entry_point="main", parameters={{"sleep": "120"}}, backend="runyard", backend_config=dict(cfg), synchronous=False)
deadline = time.monotonic() + 240
while r.get_status() != "RUNNING" and time.monotonic() < deadline:
    time.sleep(0.1)
r.cancel()
print("CANCELLED " + json.dumps({{"run_id": r.run_id, "job_id": r.job_id, "status": r.get_status()}}))
r = mlflow.projects.run(uri, entry_point="main", parameters={{"alpha": "lots"}}, backend="runyard", backend_config=dict(cfg), synchronous=False)
print("WRONG " + json.dumps({{"run_id": r.run_id, "job_id": r.job_id, "ok": r.wait()}}))
r = mlflow.projects.run(uri, entry_point="main", parameters={{"alpha": "0.25"}}, backend="runyard", backend_config=dict(cfg), synchronous=True)
print("SYNC " + json.dumps({{"run_id": r.run_id, "job_id": r.job_id}}))
"#,
        token = c.token,
        url = repo.url(),
    );
    let out = python(&py, &env, &["-c", &driver]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |tag: &str| -> Value {
        let l = stdout
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} in {stdout}"));
        serde_json::from_str(l).unwrap()
    };
    let cancelled = line("CANCELLED ");
    assert_eq!(cancelled["status"], "KILLED", "{cancelled}");
    let job = c.job(cancelled["job_id"].as_str().unwrap()).await?;
    assert_eq!(job["status"], "stopped", "{job}");
    server
        .wait_run(cancelled["run_id"].as_str().unwrap(), "KILLED", LIMIT)
        .await?;
    let wrong = line("WRONG ");
    assert_eq!(wrong["ok"], false);
    let job = c.job(wrong["job_id"].as_str().unwrap()).await?;
    assert_eq!(job["failure"], "params", "{job}");
    assert!(
        !c.logs(wrong["job_id"].as_str().unwrap())
            .await?
            .contains("run "),
        "the script never ran"
    );
    server
        .wait_run(wrong["run_id"].as_str().unwrap(), "FAILED", LIMIT)
        .await?;
    let sync = line("SYNC ");
    server
        .wait_run(sync["run_id"].as_str().unwrap(), "FINISHED", LIMIT)
        .await?;

    // The plugin's own tests, against the same tracking server.
    let out = python(
        &py,
        &[("MLFLOW_TEST_TRACKING_URI", server.url.as_str())],
        &[
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../python/mlflow-runyard/tests"
            ),
        ],
    )
    .await?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.shutdown().await
}
