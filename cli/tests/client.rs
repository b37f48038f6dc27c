//! The built `runyard` binary against a mock controller API (axum on 127.0.0.1:0): what it
//! sends, what it prints, and how it fails.

use std::convert::Infallible;
use std::net::SocketAddr;
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
