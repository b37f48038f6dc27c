//! The built `runyard` binary against a mock controller API (axum on 127.0.0.1:0): what it
//! sends, what it prints, and how it fails.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use runyard_model::{AgentInfo, Job, JobSpec, JobStatus, Timestamp};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;

/// Every test command must finish within this.
const DEADLINE: Duration = Duration::from_secs(30);

/// One request the mock received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    auth: Option<String>,
    body: Vec<u8>,
}

/// A mock controller serving `router` and recording every request.
struct Mock {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Mock {
    async fn start(router: Router) -> Mock {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let router = router.layer(middleware::from_fn(move |req: Request, next: Next| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20)
                    .await
                    .unwrap_or_default();
                log.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().map(str::to_string),
                    auth: parts
                        .headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    body: body.to_vec(),
                });
                next.run(Request::from_parts(parts, Body::from(body))).await
            }
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Mock {
            url: format!("http://{addr}"),
            seen,
            server,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn job(id: &str, status: JobStatus) -> Job {
    let spec = JobSpec::from_value(json!({
        "repo": "file:///srv/repo.git",
        "script": "train.py",
    }))
    .unwrap();
    let mut j = Job::new(id.into(), spec, Timestamp::now());
    j.status = status;
    if status != JobStatus::Pending {
        j.attempt = 1;
    }
    j
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The binary with a clean environment and an empty HOME.
fn runyard(home: &tempfile::TempDir, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runyard"));
    cmd.args(args)
        .env_clear()
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: Command) -> Output {
    tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("runyard did not finish in time")
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// stderr is exactly one `error: ...` line; returns it.
fn one_error_line(out: &Output) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
    assert!(
        err.starts_with("error: ") && err.ends_with('\n'),
        "stderr: {err:?}"
    );
    err.trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_sends_the_token_and_the_spec() {
    let router = Router::new().route(
        "/api/v1/jobs",
        post(|body: Bytes| async move {
            let spec = JobSpec::from_json(&body).unwrap();
            let mut j = job("01JOB", JobStatus::Pending);
            j.spec = spec;
            json_response(StatusCode::CREATED, serde_json::to_value(j).unwrap())
        }),
    );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let out = output(runyard(
        &home,
        &[
            "submit",
            "--controller",
            &mock.url,
            "--token",
            "rya_secret",
            "--repo",
            "file:///srv/repo.git",
            "--script",
            "train.py",
            "--env",
            "A=1",
            "--req",
            "numpy",
            "--compute",
            "gpu",
            "--timeout",
            "2h",
            "--",
            "--lr",
            "0.1 0.2",
            "it's",
        ],
    ))
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "01JOB\n");
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/api/v1/jobs");
    assert_eq!(seen[0].auth.as_deref(), Some("Bearer rya_secret"));
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        json!({
            "name": "train",
            "repo": "file:///srv/repo.git",
            "revision": "",
            "script": "train.py",
            "args": ["--lr", "0.1 0.2", "it's"],
            "requirements": ["numpy"],
            "env": {"A": "1"},
            "compute": "gpu",
            "timeout": "2h",
            "retries": 0,
            "stop_grace": "10s",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_error_is_one_line_with_the_api_message() {
    let router = Router::new().route(
        "/api/v1/jobs",
        post(|| async {
            json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "repo: cannot be cloned from here", "field": "repo"}),
            )
        }),
    );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let mut cmd = runyard(
        &home,
        &["submit", "--repo", "file:///srv/r.git", "--script", "a.py"],
    );
    cmd.env("RUNYARD_CONTROLLER", &mock.url)
        .env("RUNYARD_TOKEN", "t");
    let out = output(cmd).await;
    assert_eq!(
        one_error_line(&out),
        "error: repo: cannot be cloned from here"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_checks_fail_before_any_request() {
    let mock = Mock::start(Router::new()).await;
    let home = tempfile::tempdir().unwrap();
    let base = [
        "submit",
        "--controller",
        &mock.url,
        "--repo",
        "file:///srv/r.git",
        "--script",
        "a.py",
    ];
    let cases: [(&[&str], &str); 3] = [
        (
            &["--env", "NOEQUALS"],
            "error: --env `NOEQUALS`: expected KEY=VALUE",
        ),
        (
            &["--compute", "tpu"],
            "error: compute: unknown compute `tpu`: use `cpu-small`, `gpu` or `gpu:N`",
        ),
        (
            &["--retries", "many"],
            "error: invalid value 'many' for '--retries <N>': invalid digit found in string (see --help)",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = output(runyard(&home, &args)).await;
        assert_eq!(one_error_line(&out), expected);
    }
    assert!(mock.seen().is_empty(), "sent {:?}", mock.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_prints_the_api_json() {
    let j = job("01STATUS", JobStatus::Running);
    let body = serde_json::to_value(&j).unwrap();
    let reply = body.clone();
    let router = Router::new().route(
        "/api/v1/jobs/{id}",
        get(move || async move { json_response(StatusCode::OK, reply) }),
    );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let mut cmd = runyard(&home, &["status", "01STATUS", "--json"]);
    cmd.env("RUNYARD_CONTROLLER", &mock.url)
        .env("RUNYARD_TOKEN", "rya_env");
    let out = output(cmd).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, body);
    let seen = mock.seen();
    assert_eq!(seen[0].path, "/api/v1/jobs/01STATUS");
    assert_eq!(seen[0].auth.as_deref(), Some("Bearer rya_env"));

    // The text form names status and the job's fields.
    let mut cmd = runyard(&home, &["status", "01STATUS"]);
    cmd.env("RUNYARD_CONTROLLER", &mock.url);
    let out = output(cmd).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("status:") && l.ends_with(" running")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("repo:") && l.ends_with(" file:///srv/repo.git")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_prints_chunks_as_they_arrive() {
    let (tx, rx) = mpsc::channel::<&'static str>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let router = Router::new()
        .route(
            "/api/v1/jobs/{id}/logs",
            get(move || {
                let rx = rx.lock().unwrap().take().expect("one log request");
                async move {
                    let stream = futures::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|s| (Ok::<_, Infallible>(Bytes::from(s)), rx))
                    });
                    ([("content-type", "text/plain")], Body::from_stream(stream))
                }
            }),
        )
        .route(
            "/api/v1/jobs/{id}",
            get(|| async {
                json_response(
                    StatusCode::OK,
                    serde_json::to_value(job("01LOGS", JobStatus::Succeeded)).unwrap(),
                )
            }),
        );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let mut cmd = runyard(
        &home,
        &[
            "logs",
            "-f",
            "01LOGS",
            "--controller",
            &mock.url,
            "--token",
            "t",
        ],
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();

    tx.send("epoch 1 loss 0.5\n").await.unwrap();
    // The first chunk shows while the stream is still open.
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"epoch 1 loss 0.5\n") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "stdout closed early: {:?}", text(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("first chunk not printed while streaming");
    tx.send("epoch 2 \"loss\" 0.25\n").await.unwrap();
    drop(tx);
    tokio::time::timeout(DEADLINE, stdout.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert_eq!(text(&got), "epoch 1 loss 0.5\nepoch 2 \"loss\" 0.25\n");
    let seen = mock.seen();
    assert_eq!(seen[0].path, "/api/v1/jobs/01LOGS", "looks up the attempt");
    assert_eq!(seen[1].path, "/api/v1/jobs/01LOGS/logs");
    assert_eq!(
        seen[1].query.as_deref(),
        Some("follow=true&attempt=1&offset=0")
    );
    assert_eq!(
        seen[2].path, "/api/v1/jobs/01LOGS",
        "checks the job is terminal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_exits_with_the_scripts_code() {
    let mut failed = job("01FAIL", JobStatus::Failed);
    failed.exit_code = Some(3);
    failed.reason = Some("script exited 3".into());
    let failed = serde_json::to_value(failed).unwrap();
    let router = Router::new()
        .route(
            "/api/v1/jobs",
            post(|| async {
                json_response(
                    StatusCode::CREATED,
                    serde_json::to_value(job("01FAIL", JobStatus::Pending)).unwrap(),
                )
            }),
        )
        .route(
            "/api/v1/jobs/{id}/logs",
            get(|| async { "Traceback\nboom\n" }),
        )
        .route(
            "/api/v1/jobs/{id}",
            get(move || async move { json_response(StatusCode::OK, failed) }),
        );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let out = output(runyard(
        &home,
        &[
            "submit",
            "--controller",
            &mock.url,
            "--repo",
            "file:///srv/r.git",
            "--script",
            "a.py",
            "--follow",
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "01FAIL\nTraceback\nboom\n");
    assert_eq!(text(&out.stderr), "job 01FAIL failed: script exited 3\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_all_follows_the_cursor() {
    let router = Router::new().route(
        "/api/v1/jobs",
        get(
            |axum::extract::RawQuery(q): axum::extract::RawQuery| async move {
                let q = q.unwrap_or_default();
                let (jobs, next) = if q.contains("cursor=c1") {
                    (vec![job("01OLDER", JobStatus::Running)], Value::Null)
                } else {
                    (vec![job("01NEWER", JobStatus::Running)], json!("c1"))
                };
                json_response(StatusCode::OK, json!({"jobs": jobs, "next": next}))
            },
        ),
    );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let args = [
        "ls",
        "--controller",
        &mock.url,
        "--status",
        "running",
        "--limit",
        "1",
    ];
    let mut all = args.to_vec();
    all.push("--all");
    let out = output(runyard(&home, &all)).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("ID "), "{stdout}");
    assert!(lines[0].ends_with("AGE"), "{stdout}");
    assert!(
        lines[1].starts_with("01NEWER  train  running  cpu-small  -"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("01OLDER  train  running  cpu-small  -"),
        "{stdout}"
    );
    let queries: Vec<String> = mock.seen().iter().filter_map(|s| s.query.clone()).collect();
    assert_eq!(
        queries,
        ["limit=1&status=running", "limit=1&cursor=c1&status=running"]
    );

    // Without --all: the first page, and a hint on stderr.
    let out = output(runyard(&home, &args)).await;
    assert_eq!(text(&out.stdout).lines().count(), 2);
    assert!(text(&out.stderr).contains("--all"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_table_and_token_from_the_data_dir() {
    let agent = AgentInfo {
        name: "gpu-box".into(),
        connected: true,
        cpu_small_slots: 4,
        gpus: vec![],
        cpus: 8,
        memory_bytes: 1 << 34,
        version: "0.1.0".into(),
        last_seen: Timestamp::now(),
        jobs: vec!["01A".into(), "01B".into()],
    };
    let body = json!({"agents": [agent]});
    let router = Router::new().route(
        "/api/v1/agents",
        get(move || async move { json_response(StatusCode::OK, body) }),
    );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".runyard")).unwrap();
    std::fs::write(home.path().join(".runyard/admin.token"), "rya_fromfile\n").unwrap();
    let out = output(runyard(&home, &["agents", "--controller", &mock.url])).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "NAME     CONNECTED  CPU-SMALL  GPUS  JOBS  LAST SEEN"
    );
    assert!(
        lines[1].starts_with("gpu-box  yes        4          0     2     "),
        "{stdout}"
    );
    assert_eq!(mock.seen()[0].auth.as_deref(), Some("Bearer rya_fromfile"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_conflict_and_unauthorized_are_one_line() {
    let router = Router::new()
        .route(
            "/api/v1/jobs/{id}/stop",
            post(|| async {
                json_response(
                    StatusCode::CONFLICT,
                    json!({"error": "job 01DONE already finished (succeeded)", "field": null}),
                )
            }),
        )
        .route(
            "/api/v1/agents",
            get(|| async {
                json_response(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "missing or wrong token", "field": null}),
                )
            }),
        );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let out = output(runyard(
        &home,
        &["stop", "01DONE", "--controller", &mock.url],
    ))
    .await;
    assert_eq!(
        one_error_line(&out),
        "error: job 01DONE already finished (succeeded)"
    );
    let out = output(runyard(&home, &["agents", "--controller", &mock.url])).await;
    let line = one_error_line(&out);
    assert!(line.starts_with("error: missing or wrong token (no token given): pass the admin token with --token or RUNYARD_TOKEN"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_names_the_url_and_the_fix() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let home = tempfile::tempdir().unwrap();
    for args in [
        vec!["ls"],
        vec!["logs", "-f", "01X"],
        vec!["submit", "--repo", "file:///r", "--script", "a.py"],
    ] {
        let mut cmd = runyard(&home, &args);
        cmd.env("RUNYARD_CONTROLLER", &url);
        let out = output(cmd).await;
        let line = one_error_line(&out);
        assert!(
            line.starts_with(&format!(
                "error: cannot connect to the controller at {url}/ ("
            )),
            "{line}"
        );
        assert!(line.contains("refused"), "{line}");
        assert!(line.contains("runyard up"), "{line}");
        assert!(line.contains("RUNYARD_CONTROLLER"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_resumes_without_duplicates_after_a_cut() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let log_calls = Arc::new(AtomicUsize::new(0));
    let job_calls = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route(
            "/api/v1/jobs/{id}/logs",
            get(
                move |axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>| {
                    let n = log_calls.fetch_add(1, Ordering::SeqCst);
                    let offset: usize = q["offset"].parse().unwrap();
                    async move {
                        let full = "a\nb\nc\nd\n";
                        let chunks: Vec<Result<Bytes, std::io::Error>> = match n {
                            // Cut mid-stream: the body ends with an error (connection reset).
                            0 => vec![
                                Ok(Bytes::from("a\nb")),
                                Ok(Bytes::from("\n")),
                                Err(std::io::Error::other("cut")),
                            ],
                            // Ends cleanly while the job still runs.
                            1 => vec![Ok(Bytes::from(&full[offset..6]))],
                            _ => vec![Ok(Bytes::from(&full[offset..]))],
                        };
                        // Let the first chunks go out before the cut.
                        let paced =
                            futures::StreamExt::then(futures::stream::iter(chunks), |c| async {
                                if c.is_err() {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                c
                            });
                        Body::from_stream(paced)
                    }
                },
            ),
        )
        .route(
            "/api/v1/jobs/{id}",
            get(move || {
                let n = job_calls.fetch_add(1, Ordering::SeqCst);
                let status = if n < 2 {
                    JobStatus::Running
                } else {
                    JobStatus::Succeeded
                };
                async move {
                    json_response(
                        StatusCode::OK,
                        serde_json::to_value(job("01CUT", status)).unwrap(),
                    )
                }
            }),
        );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let out = output(runyard(
        &home,
        &["logs", "-f", "01CUT", "--controller", &mock.url],
    ))
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a\nb\nc\nd\n");
    let requests: Vec<String> = mock
        .seen()
        .iter()
        .map(|s| format!("{}?{}", s.path, s.query.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        requests,
        [
            "/api/v1/jobs/01CUT?",
            "/api/v1/jobs/01CUT/logs?follow=true&attempt=1&offset=0",
            "/api/v1/jobs/01CUT/logs?follow=true&attempt=1&offset=4",
            "/api/v1/jobs/01CUT?",
            "/api/v1/jobs/01CUT/logs?follow=true&attempt=1&offset=6",
            "/api/v1/jobs/01CUT?",
        ]
    );
}

/// A job that reported training progress, metrics, a best checkpoint and its environment.
fn training_job(id: &str, status: JobStatus) -> Job {
    let mut j = job(id, status);
    j.progress = Some(runyard_model::Progress {
        epoch: 2,
        max_epochs: Some(3),
        step: 40,
        max_steps: Some(60),
        fraction: 40.0 / 60.0,
    });
    j.metrics.insert("val_loss".into(), 0.41);
    j.metrics.insert("acc".into(), 0.875);
    j.best = Some(runyard_model::Best {
        monitor: Some("val_loss".into()),
        mode: Some("min".into()),
        score: Some(0.41),
        path: "/agent/jobs/x/checkpoints/epoch=2-step=40.ckpt".into(),
        size: Some(2048),
        sha256: Some("9f86d081884c7d65".into()),
        epoch: Some(2),
        step: Some(40),
        upload_error: None,
    });
    j.environment = Some(runyard_model::Environment {
        installer: "uv".into(),
        packages: vec![
            "numpy==2.1.0".into(),
            "torch==2.5.0".into(),
            "six==1.16.0".into(),
        ],
        seconds: 2.04,
    });
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_progress_metrics_best_and_environment() {
    let mut failed_upload = training_job("01UP", JobStatus::Succeeded);
    failed_upload.best.as_mut().unwrap().upload_error = Some("checkpoint file is gone".into());
    let reply = serde_json::to_value(training_job("01TRAIN", JobStatus::Running)).unwrap();
    let failed_upload = serde_json::to_value(failed_upload).unwrap();
    let router = Router::new()
        .route(
            "/api/v1/jobs/01TRAIN",
            get(move || async move { json_response(StatusCode::OK, reply) }),
        )
        .route(
            "/api/v1/jobs/01UP",
            get(move || async move { json_response(StatusCode::OK, failed_upload) }),
        )
        .route(
            "/api/v1/jobs/01PLAIN",
            get(|| async {
                json_response(
                    StatusCode::OK,
                    serde_json::to_value(job("01PLAIN", JobStatus::Running)).unwrap(),
                )
            }),
        );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let status = |id: &'static str| {
        let out = output(runyard(&home, &["status", id, "--controller", &mock.url]));
        async move {
            let out = out.await;
            assert!(out.status.success(), "stderr: {}", text(&out.stderr));
            text(&out.stdout)
        }
    };
    let stdout = status("01TRAIN").await;
    for line in [
        "progress:          epoch 2/3, step 40/60, 67%",
        "metrics:           acc=0.875 val_loss=0.41",
        "best:              val_loss=0.41 (min), epoch 2, step 40",
        "checkpoint:        epoch=2-step=40.ckpt, 2.0 KiB (2048 bytes), sha256 9f86d081884c7d65",
        "environment:       uv, 3 packages, built in 2.0s",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in\n{stdout}"
        );
    }
    let stdout = status("01UP").await;
    assert!(
        stdout.lines().any(|l| l
            == "checkpoint:        epoch=2-step=40.ckpt: upload failed: checkpoint file is gone"),
        "{stdout}"
    );
    // A job that reported nothing has none of these lines.
    let stdout = status("01PLAIN").await;
    for key in [
        "progress:",
        "metrics:",
        "best:",
        "checkpoint:",
        "environment:",
    ] {
        assert!(!stdout.contains(key), "{key} in\n{stdout}");
    }
}

/// Serves `body` as job 01CKPT's checkpoint in small chunks, announcing `sha256`.
fn checkpoint_router(body: Vec<u8>, sha256: String) -> Router {
    Router::new()
        .route(
            "/api/v1/jobs/01CKPT/checkpoint",
            get(move || {
                let body = body.clone();
                let sha256 = sha256.clone();
                async move {
                    let len = body.len();
                    let chunks: Vec<Result<Bytes, Infallible>> = body
                        .chunks(64 * 1024)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    (
                        [
                            ("content-type", "application/octet-stream".to_string()),
                            ("content-length", len.to_string()),
                            (
                                "content-disposition",
                                r#"attachment; filename="epoch=2-step=40.ckpt""#.to_string(),
                            ),
                            ("x-checksum-sha256", sha256),
                        ],
                        Body::from_stream(futures::stream::iter(chunks)),
                    )
                }
            }),
        )
        .route(
            "/api/v1/jobs/{id}/checkpoint",
            get(|| async {
                json_response(
                    StatusCode::NOT_FOUND,
                    json!({"error": "job `01NONE` has no checkpoint: the script reported none", "field": null}),
                )
            }),
        )
}

/// This process's umask (children inherit it), from `/proc/self/status`.
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("no Umask line");
    u32::from_str_radix(value.trim(), 8).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Names of the files in `dir`, sorted.
fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_streams_the_checkpoint_byte_for_byte() {
    // 1 MiB + a bit of non-repeating bytes, sent in 64 KiB chunks.
    let body: Vec<u8> = (0..(1u32 << 20) + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mock = Mock::start(checkpoint_router(body.clone(), sha256_hex(&body))).await;
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();

    // Default: the checkpoint's own name, in the current directory.
    let mut cmd = runyard(&home, &["download", "01CKPT", "--controller", &mock.url]);
    cmd.current_dir(cwd.path());
    let out = output(cmd).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "saved epoch=2-step=40.ckpt, 1.0 MiB (1060921 bytes)\n"
    );
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
    let path = cwd.path().join("epoch=2-step=40.ckpt");
    let saved = std::fs::read(&path).unwrap();
    assert!(saved == body, "the saved bytes differ from the served ones");
    // An ordinary file's mode: the umask decides, not a temp file's 0600.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask(), "mode {mode:o}");
    assert_eq!(files_in(cwd.path()), ["epoch=2-step=40.ckpt"]);

    // -o FILE and --json.
    let target = cwd.path().join("sub");
    std::fs::create_dir(&target).unwrap();
    let file = target.join("model.ckpt");
    let out = output(runyard(
        &home,
        &[
            "download",
            "01CKPT",
            "--controller",
            &mock.url,
            "-o",
            file.to_str().unwrap(),
            "--json",
        ],
    ))
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed,
        json!({"path": file.to_str().unwrap(), "size": body.len(), "sha256": sha256_hex(&body)})
    );
    assert!(std::fs::read(&file).unwrap() == body);
    // -o DIR: the checkpoint's name inside it.
    let out = output(runyard(
        &home,
        &[
            "download",
            "01CKPT",
            "--controller",
            &mock.url,
            "-o",
            target.to_str().unwrap(),
        ],
    ))
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(files_in(&target), ["epoch=2-step=40.ckpt", "model.ckpt"]);
    let seen = mock.seen();
    assert!(
        seen.iter()
            .all(|s| s.method == "GET" && s.path == "/api/v1/jobs/01CKPT/checkpoint"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_refuses_a_checksum_mismatch_and_leaves_no_file() {
    let body = b"these bytes were corrupted on the way".to_vec();
    let mock = Mock::start(checkpoint_router(body, sha256_hex(b"the original bytes"))).await;
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = runyard(&home, &["download", "01CKPT", "--controller", &mock.url]);
    cmd.current_dir(cwd.path());
    let out = output(cmd).await;
    let line = one_error_line(&out);
    assert!(
        line.starts_with(&format!(
            "error: checksum mismatch: the controller announced sha256 {}",
            sha256_hex(b"the original bytes")
        )),
        "{line}"
    );
    assert!(line.ends_with("nothing was saved"), "{line}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        files_in(cwd.path()),
        Vec::<String>::new(),
        "no file, no temp file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_without_a_checkpoint_is_the_api_reason() {
    let mock = Mock::start(checkpoint_router(vec![], String::new())).await;
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = runyard(&home, &["download", "01NONE", "--controller", &mock.url]);
    cmd.current_dir(cwd.path());
    let out = output(cmd).await;
    assert_eq!(
        one_error_line(&out),
        "error: job `01NONE` has no checkpoint: the script reported none"
    );
    assert_eq!(files_in(cwd.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_never_overwrites_without_force() {
    let body = b"new checkpoint".to_vec();
    let mock = Mock::start(checkpoint_router(body.clone(), sha256_hex(&body))).await;
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let existing = cwd.path().join("epoch=2-step=40.ckpt");
    std::fs::write(&existing, "precious").unwrap();
    let mut cmd = runyard(&home, &["download", "01CKPT", "--controller", &mock.url]);
    cmd.current_dir(cwd.path());
    let out = output(cmd).await;
    assert_eq!(
        one_error_line(&out),
        "error: epoch=2-step=40.ckpt exists: pass --force to replace it, or -o to write elsewhere"
    );
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "precious");
    assert_eq!(files_in(cwd.path()), ["epoch=2-step=40.ckpt"]);

    let mut cmd = runyard(
        &home,
        &["download", "01CKPT", "--controller", &mock.url, "--force"],
    );
    cmd.current_dir(cwd.path());
    let out = output(cmd).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(std::fs::read(&existing).unwrap(), body);
    assert_eq!(files_in(cwd.path()), ["epoch=2-step=40.ckpt"]);
}

/// Job 01BAR: its log in two parts 1.5 s apart (time for a progress poll), and a job that
/// reports progress and metrics.
fn progress_router() -> Router {
    use futures::StreamExt;
    let reply = serde_json::to_value(training_job("01BAR", JobStatus::Succeeded)).unwrap();
    Router::new()
        .route(
            "/api/v1/jobs/01BAR/logs",
            get(|| async {
                let parts = futures::stream::iter(["epoch 1 loss 0.5\n", "epoch 2 loss 0.25\n"])
                    .enumerate()
                    .then(|(i, part)| async move {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                        }
                        Ok::<_, Infallible>(Bytes::from(part))
                    });
                Body::from_stream(parts)
            }),
        )
        .route(
            "/api/v1/jobs/01BAR",
            get(move || async move { json_response(StatusCode::OK, reply) }),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_logs_have_no_progress_bar_and_no_polling() {
    let mock = Mock::start(progress_router()).await;
    let home = tempfile::tempdir().unwrap();
    let out = output(runyard(
        &home,
        &["logs", "-f", "01BAR", "--controller", &mock.url],
    ))
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "epoch 1 loss 0.5\nepoch 2 loss 0.25\n");
    assert!(out.stderr.is_empty(), "stderr: {:?}", text(&out.stderr));
    let paths: Vec<String> = mock.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/jobs/01BAR",
            "/api/v1/jobs/01BAR/logs",
            "/api/v1/jobs/01BAR"
        ]
    );
}

/// A pseudo-terminal `columns` wide: (controller side, terminal side).
fn pty(columns: u16) -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut controller, mut terminal) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors through valid pointers and reads `size`; the name
    // and termios pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [controller, terminal] {
        // SAFETY: fcntl on descriptors we own. Close-on-exec keeps them out of the children
        // other tests start meanwhile (ours gets the terminal through dup2, which clears it).
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(rc, 0, "fcntl: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(controller),
            std::os::fd::OwnedFd::from_raw_fd(terminal),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_a_progress_bar_stays_below_the_log() {
    let mock = Mock::start(progress_router()).await;
    let home = tempfile::tempdir().unwrap();
    let (mut screen, terminal) = pty(60);
    let mut cmd = runyard(&home, &["logs", "-f", "01BAR", "--controller", &mock.url]);
    cmd.stdout(Stdio::from(terminal.try_clone().unwrap()))
        .stderr(Stdio::from(terminal));
    let mut child = cmd.spawn().unwrap();
    // Our copies of the terminal side close with `cmd`: the screen then ends with the child.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child (the last holder of the terminal side) is gone.
        while let Ok(n) = screen.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("runyard did not finish in time")
        .unwrap();
    let seen = tokio::time::timeout(DEADLINE, tokio::task::spawn_blocking(move || reader.join()))
        .await
        .expect("the terminal did not close")
        .unwrap()
        .unwrap();
    assert!(status.success());
    let screen = text(&seen);
    const CLEAR: &str = "\r\x1b[2K";
    // 59 of 60 columns: the metric is cut, never wrapped.
    let bar = "[#############.......] 67% epoch 2/3 step 40/60 val_loss=0.";
    assert!(screen.contains(&format!("{CLEAR}{bar}")), "{screen:?}");
    assert!(!screen.contains("val_loss=0.41"), "{screen:?}");
    // The bar is cleared before the log line, the line is written, the bar comes back.
    assert!(
        screen.contains(&format!("{bar}{CLEAR}epoch 2 loss 0.25\r\n{CLEAR}{bar}")),
        "{screen:?}"
    );
    // At the end the bar is gone and the log is intact.
    assert!(screen.ends_with(&format!("{bar}{CLEAR}")), "{screen:?}");
    let plain = screen.replace(CLEAR, "\n").replace(bar, "");
    let log: Vec<&str> = plain
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(log, ["epoch 1 loss 0.5", "epoch 2 loss 0.25"], "{screen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_reports_each_id_and_fails_if_any_failed() {
    use axum::extract::Path;
    let deleted = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = deleted.clone();
    let router = Router::new().route(
        "/api/v1/jobs/{id}",
        axum::routing::delete(move |Path(id): Path<String>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(id.clone());
                match id.as_str() {
                    "01RUN" => json_response(
                        StatusCode::CONFLICT,
                        json!({"error": "job `01RUN` is running: stop it first (`runyard stop 01RUN`), then delete it", "field": null}),
                    ),
                    "01NOPE" => json_response(
                        StatusCode::NOT_FOUND,
                        json!({"error": "no job with id `01NOPE`", "field": null}),
                    ),
                    _ => json_response(
                        StatusCode::OK,
                        serde_json::to_value(job(&id, JobStatus::Succeeded)).unwrap(),
                    ),
                }
            }
        }),
    );
    let mock = Mock::start(router).await;
    let home = tempfile::tempdir().unwrap();
    let out = output(runyard(
        &home,
        &[
            "rm",
            "01A",
            "01RUN",
            "01NOPE",
            "01B",
            "--controller",
            &mock.url,
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "one failed: exit 1");
    assert_eq!(text(&out.stdout), "01A deleted\n01B deleted\n");
    let stderr = text(&out.stderr);
    let errors: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        errors,
        [
            "error: 01RUN: job `01RUN` is running: stop it first (`runyard stop 01RUN`), then delete it",
            "error: 01NOPE: no job with id `01NOPE`",
        ]
    );
    assert_eq!(*deleted.lock().unwrap(), ["01A", "01RUN", "01NOPE", "01B"]);

    let out = output(runyard(&home, &["rm", "01A", "--controller", &mock.url])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}
