//! What the controller keeps of jobs: deleting a finished job with its files, retention, and
//! the size limit of an attempt's log.

use std::time::{Duration, Instant};

use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn spec(repo: &GitRepo, script: &str) -> Value {
    json!({"repo": repo.url(), "script": script})
}

async fn delete(c: &TestCluster, id: &str) -> anyhow::Result<(u16, Value)> {
    c.delete(&format!("/api/v1/jobs/{id}")).await
}

/// Polls until `GET /api/v1/jobs/{id}` is a 404.
async fn wait_gone(c: &TestCluster, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = c.get_raw(&format!("/api/v1/jobs/{id}")).await?;
        if r.status().as_u16() == 404 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "job {id} still there after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_refuses_an_active_job_and_removes_a_finished_one_with_its_files()
-> anyhow::Result<()> {
    let repo = GitRepo::new(&[
        (
            "sleep.py",
            "import time\nprint('started', flush=True)\ntime.sleep(120)\n",
        ),
        ("hello.py", "print('hello')\n"),
    ])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let logs_dir = c.config.data_dir.join("logs");

    let running = c.submit(spec(&repo, "sleep.py")).await?;
    c.wait_status(&running, &["running"], LONG).await?;
    let (status, body) = delete(&c, &running).await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("stop it first"),
        "{body}"
    );
    assert_eq!(
        c.job(&running).await?["status"],
        "running",
        "nothing changed"
    );

    let done = c.submit(spec(&repo, "hello.py")).await?;
    c.wait_status(&done, &["succeeded"], LONG).await?;
    assert_eq!(c.logs(&done).await?, "hello\n");
    assert!(logs_dir.join(&done).exists());
    let (status, body) = delete(&c, &done).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["id"].as_str(), body["status"].as_str()),
        (Some(done.as_str()), Some("succeeded"))
    );
    assert!(!logs_dir.join(&done).exists(), "its log files are gone");
    assert_eq!(
        c.get_raw(&format!("/api/v1/jobs/{done}")).await?.status(),
        404
    );
    assert_eq!(
        c.get_raw(&format!("/api/v1/jobs/{done}/logs"))
            .await?
            .status(),
        404
    );
    let (status, body) = delete(&c, &done).await?;
    assert_eq!(status, 404, "{body}");
    let list = c.get("/api/v1/jobs").await?;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");

    // Stopped first, it can go.
    c.post(&format!("/api/v1/jobs/{running}/stop"), &json!({}))
        .await?;
    c.wait_status(&running, &["stopped"], LONG).await?;
    let (status, body) = delete(&c, &running).await?;
    assert_eq!(status, 200, "{body}");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_finished_jobs_only() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("hello.py", "print('hello')\n")])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .controller_config(|config| {
            config.retention = Some(Duration::from_secs(1));
            config.retention_period = Duration::from_millis(100);
        })
        .start()
        .await?;
    // Asks for a GPU no agent has: it stays pending, however old.
    let pending = c
        .submit(json!({"repo": repo.url(), "script": "hello.py", "compute": "gpu"}))
        .await?;
    let done = c.submit(spec(&repo, "hello.py")).await?;
    c.wait_status(&done, &["succeeded"], LONG).await?;
    wait_gone(&c, &done, LONG).await?;
    // The record goes first, then the files.
    let log_dir = c.config.data_dir.join("logs").join(&done);
    let deadline = Instant::now() + LONG;
    while log_dir.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} still there",
            log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.job(&pending).await?["status"], "pending");
    c.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_past_its_limit_keeps_its_start_and_says_how_many_lines_were_dropped()
-> anyhow::Result<()> {
    const LINES: usize = 2000;
    const LIMIT: u64 = 1000;
    let repo = GitRepo::new(&[(
        "chatty.py",
        &format!("for i in range({LINES}):\n    print(f'line {{i}}')\n"),
    )])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .controller_config(|config| config.max_log_size = LIMIT)
        .start()
        .await?;
    let id = c.submit(spec(&repo, "chatty.py")).await?;
    let job = c.wait_status(&id, &["succeeded", "failed"], LONG).await?;
    assert_eq!(job["status"], "succeeded", "{job}");

    let started = Instant::now();
    let text = c.logs(&id).await?;
    let followed = c
        .get_raw(&format!("/api/v1/jobs/{id}/logs?follow=true"))
        .await?
        .text()
        .await?;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "logs return promptly"
    );
    assert_eq!(text, followed);

    let lines: Vec<&str> = text.lines().collect();
    let (marker, kept) = lines.split_last().unwrap();
    let want: Vec<String> = (0..kept.len()).map(|i| format!("line {i}")).collect();
    assert_eq!(kept, want, "the first lines are kept, in order");
    let bytes: usize = kept.iter().map(|l| l.len() + 1).sum();
    assert!(
        bytes as u64 >= LIMIT && (bytes as u64) < LIMIT + 20,
        "{bytes} bytes kept"
    );
    let dropped = LINES - kept.len();
    assert_eq!(
        *marker,
        format!("[runyard] log limit 1000 B reached: {dropped} lines dropped")
    );
    assert_eq!(text.matches("[runyard] log limit").count(), 1);
    c.shutdown().await
}

/// An agent sending lines of a deleted job (it held them in its spool) gets them acknowledged,
/// so it frees its spool, and no file comes back for the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_of_a_deleted_job_are_acknowledged_and_not_kept() -> anyhow::Result<()> {
    use futures::StreamExt;
    use runyard_proto::v1::{self, agent_message, controller_message};
    let repo = GitRepo::new(&[("hello.py", "print('hello')\n")])?;
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .start()
        .await?;
    let id = c.submit(spec(&repo, "hello.py")).await?;
    c.wait_status(&id, &["succeeded"], LONG).await?;
    assert_eq!(delete(&c, &id).await?.0, 200);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc_addr))?
        .connect()
        .await?;
    let token = format!("Bearer {}", c.agent_token);
    let mut client = v1::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", token.parse().unwrap());
            // An agent enrols its name with a credential of its own.
            req.metadata_mut().insert(
                runyard_proto::CREDENTIAL_HEADER,
                "ryc_late".parse().unwrap(),
            );
            Ok(req)
        },
    );
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(v1::AgentMessage {
        msg: Some(agent_message::Msg::Register(v1::Register {
            name: "late".into(),
            ..Default::default()
        })),
    })?;
    tx.unbounded_send(v1::AgentMessage {
        msg: Some(agent_message::Msg::Logs(v1::LogChunk {
            job_id: id.clone(),
            attempt: 1,
            first_seq: 0,
            count: 2,
            data: "hello\nagain".into(),
            stream: v1::Stream::Log as i32,
        })),
    })?;
    let mut inbound = client.session(rx).await?.into_inner();
    let ack = tokio::time::timeout(LONG, async {
        while let Some(m) = inbound.next().await {
            if let Some(controller_message::Msg::LogAck(ack)) = m?.msg {
                return anyhow::Ok(ack);
            }
        }
        anyhow::bail!("session ended without an acknowledgement")
    })
    .await??;
    assert_eq!(
        (ack.job_id.as_str(), ack.attempt, ack.next_seq),
        (id.as_str(), 1, 2)
    );
    assert!(!c.config.data_dir.join("logs").join(&id).exists());
    drop(tx);
    c.shutdown().await
}
