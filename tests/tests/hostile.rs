//! A hostile agent: a fake agent with a valid credential speaks the real gRPC protocol to a real
//! controller and tries to write outside its data dir, to speak for another agent's jobs, to
//! take a name over, to confuse the sequence numbers and to break the session's order. Each
//! attempt is refused, and the test checks that nothing changed.

use std::path::Path;
use std::time::Duration;

use runyard_agent::dial::{self, Auth};
use runyard_proto::v1::{
    self, agent_message::Msg as Out, checkpoint_chunk::Part, controller_message::Msg as In,
};
use runyard_tests::cluster::{AgentSpec, TestCluster};
use runyard_tests::fixture::GitRepo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const LONG: Duration = Duration::from_secs(60);
/// A valid job id that no job has.
const UNKNOWN_JOB: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";

/// One session of a fake agent.
struct Fake {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::ControllerMessage>,
}

fn auth(name: &str, credential: &str, token: &str) -> Auth {
    Auth {
        token: token.into(),
        name: name.into(),
        credential: credential.into(),
        tls: None,
    }
}

fn url(c: &TestCluster) -> String {
    format!("http://{}", c.grpc_addr)
}

fn register(name: &str, attempts: Vec<v1::AttemptReport>) -> v1::AgentMessage {
    out(Out::Register(v1::Register {
        name: name.into(),
        cpu_small_slots: 1,
        cpus: 1,
        attempts,
        version: "hostile".into(),
        ..Default::default()
    }))
}

fn out(m: Out) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

fn lines(job: &str, attempt: u32, first_seq: u64, text: &[&str], stream: v1::Stream) -> Out {
    Out::Logs(v1::LogChunk {
        job_id: job.into(),
        attempt,
        first_seq,
        count: text.len() as u32,
        data: text.join("\n").into_bytes().into(),
        stream: stream as i32,
    })
}

fn status(job: &str, attempt: u32, state: v1::AttemptState) -> Out {
    Out::Status(v1::StatusUpdate {
        job_id: job.into(),
        attempt,
        state: state as i32,
        exit_code: Some(0),
        reason: "hostile".into(),
        ..Default::default()
    })
}

impl Fake {
    /// Opens a session and waits for `Registered`.
    async fn open(
        c: &TestCluster,
        auth: &Auth,
        first: v1::AgentMessage,
    ) -> Result<Fake, tonic::Status> {
        let mut client = dial::connect(&url(c), auth)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        tx.send(first).await.unwrap();
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match tokio::time::timeout(LONG, inbound.message()).await {
            Ok(Ok(Some(v1::ControllerMessage {
                msg: Some(In::Registered(_)),
            }))) => Ok(Fake { tx, inbound }),
            Ok(Err(status)) => Err(status),
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    async fn send(&self, m: Out) {
        self.tx.send(out(m)).await.expect("session open");
    }

    /// Receives until `want` matches, returning every message before it.
    async fn until(&mut self, what: &str, want: impl Fn(&In) -> bool) -> Vec<In> {
        let mut before = Vec::new();
        loop {
            let m = tokio::time::timeout(LONG, self.inbound.message())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; got {before:?}"))
                .unwrap_or_else(|e| panic!("session broke waiting for {what}: {e}"))
                .unwrap_or_else(|| panic!("session ended waiting for {what}; got {before:?}"));
            let m = m.msg.expect("a message");
            if want(&m) {
                return before;
            }
            before.push(m);
        }
    }

    /// Sends a line of the fake agent's own attempt and waits for its ack. Messages of a
    /// session are handled in order, so everything sent before has been handled. Returns the
    /// controller's messages before the ack.
    async fn probe(&mut self, own: &str, seq: &mut u64) -> Vec<In> {
        self.send(lines(own, 1, *seq, &["probe"], v1::Stream::Log))
            .await;
        *seq += 1;
        let want = *seq;
        self.until(
            "the probe's ack",
            |m| matches!(m, In::LogAck(a) if a.job_id == own && a.next_seq == want),
        )
        .await
    }

    /// Waits until the controller ends this session.
    async fn ended(mut self) {
        let end = tokio::time::timeout(LONG, async {
            loop {
                match self.inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the controller did not end the session");
    }
}

fn acks_for(msgs: &[In], job: &str) -> usize {
    msgs.iter()
        .filter(|m| matches!(m, In::LogAck(a) if a.job_id == job))
        .count()
}

async fn agent_connected(c: &TestCluster, name: &str) -> anyhow::Result<bool> {
    let agents = c.get("/api/v1/agents").await?;
    Ok(agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == name && a["connected"] == true))
}

async fn checkpoint_status(c: &TestCluster, job: &str) -> anyhow::Result<u16> {
    Ok(c.get_raw(&format!("/api/v1/jobs/{job}/checkpoint"))
        .await?
        .status()
        .as_u16())
}

async fn upload(
    c: &TestCluster,
    auth: &Auth,
    job: &str,
    attempt: u32,
    body: &[u8],
) -> Result<v1::CheckpointReceipt, tonic::Status> {
    use sha2::Digest;
    let mut client = dial::connect(&url(c), auth)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let chunks = vec![
        v1::CheckpointChunk {
            part: Some(Part::Header(v1::CheckpointHeader {
                job_id: job.into(),
                attempt,
                file_name: "best.ckpt".into(),
                size: body.len() as u64,
            })),
        },
        v1::CheckpointChunk {
            part: Some(Part::Data(body.to_vec())),
        },
        v1::CheckpointChunk {
            part: Some(Part::Sha256(hex(&sha2::Sha256::digest(body)))),
        },
    ];
    client
        .upload_checkpoint(futures::stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[
        (
            "victim.py",
            "import time\nprint('victim line', flush=True)\ntime.sleep(120)\n",
        ),
        ("own.py", "print('never runs here')\n"),
    ])?;
    let mut c = TestCluster::builder().start().await?;
    let token = c.agent_token.clone();
    let me = auth("mallory", "ryc_mallory-own-credential", &token);

    // Mallory enrols and gets a job of its own (the only agent, one slot).
    let mut s = Fake::open(&c, &me, register("mallory", vec![])).await?;
    let own = c
        .submit(json!({"repo": repo.url(), "script": "own.py"}))
        .await?;
    s.until(
        "mallory's assignment",
        |m| matches!(m, In::Assign(a) if a.job_id == own),
    )
    .await;
    s.send(status(&own, 1, v1::AttemptState::Running)).await;
    let mut seq = 0;

    // An honest agent runs the victim's job.
    c.add_agent(AgentSpec::new("honest")).await?;
    let victim = c
        .submit(json!({"repo": repo.url(), "script": "victim.py"}))
        .await?;
    let before = c.wait_status(&victim, &["running"], LONG).await?;
    assert_eq!(before["agent"], "honest", "{before}");
    runyard_tests::eventually(LONG, "the victim's line", || async {
        (c.logs(&victim).await.ok()? == "victim line\n").then_some(())
    })
    .await?;
    let data_dir = c.config.data_dir.clone();
    let files_before = files_under(&data_dir);
    let outside = c.dir.path().join("outside");

    // 1. Path traversal and absolute job ids, in lines, report lines and statuses.
    let bad_ids = [
        "../../outside".to_string(),
        "../../../../../../../../tmp/runyard-hostile".to_string(),
        outside.display().to_string(),
        format!("{victim}/../../outside"),
        ".".to_string(),
        String::new(),
    ];
    for bad in &bad_ids {
        for stream in [v1::Stream::Log, v1::Stream::Report] {
            s.send(lines(
                bad,
                1,
                0,
                &["{\"metrics\": {\"stolen\": 1}}"],
                stream,
            ))
            .await;
        }
        s.send(status(bad, 1, v1::AttemptState::Succeeded)).await;
    }
    let got = s.probe(&own, &mut seq).await;
    for bad in &bad_ids {
        assert_eq!(acks_for(&got, bad), 0, "no ack for {bad:?}: {got:?}");
    }
    assert!(!outside.exists(), "nothing written outside the data dir");
    assert!(!Path::new("/tmp/runyard-hostile").exists());

    // 2. Lines, report lines and statuses for another agent's job, and for an unknown job.
    for (job, attempt) in [(&victim, 1), (&victim, 2), (&victim, 0)] {
        let chunks = [
            (1, "mallory was here", v1::Stream::Log),
            (0, "mallory was here", v1::Stream::Log),
            (0, "{\"metrics\": {\"stolen\": 1}}", v1::Stream::Report),
        ];
        for (first_seq, text, stream) in chunks {
            s.send(lines(job, attempt, first_seq, &[text], stream))
                .await;
        }
        for st in [
            v1::AttemptState::Succeeded,
            v1::AttemptState::Failed,
            v1::AttemptState::Stopped,
        ] {
            s.send(status(job, attempt, st)).await;
        }
    }
    s.send(lines(UNKNOWN_JOB, 1, 0, &["ghost"], v1::Stream::Log))
        .await;
    s.send(status(UNKNOWN_JOB, 1, v1::AttemptState::Running))
        .await;
    // An unknown job's end (with lines the controller never stored) is released, not awaited.
    let mut ended = status(UNKNOWN_JOB, 1, v1::AttemptState::Failed);
    if let Out::Status(st) = &mut ended {
        st.log_lines = 5;
    }
    s.send(ended).await;
    let got = s.probe(&own, &mut seq).await;
    let about_unknown: Vec<&In> = got
        .iter()
        .filter(|m| match m {
            In::Stop(x) => x.job_id == UNKNOWN_JOB,
            In::Release(x) => x.job_id == UNKNOWN_JOB,
            _ => false,
        })
        .collect();
    assert!(
        matches!(about_unknown[..], [In::Stop(_), In::Release(_)]),
        "stop it, then forget it: {got:?}"
    );
    assert_eq!(acks_for(&got, &victim), 0, "{got:?}");
    // Lines of an unknown job are acknowledged (the agent frees its spool) and dropped.
    assert!(!data_dir.join("logs").join(UNKNOWN_JOB).exists());
    assert!(
        !got.iter()
            .any(|m| matches!(m, In::Release(r) if r.job_id == victim)),
        "{got:?}"
    );

    // 3. A checkpoint for another agent's job, an unknown job, and bad ids; then without the
    // credential.
    for (job, attempt) in [
        (victim.as_str(), 1),
        (UNKNOWN_JOB, 1),
        ("../../outside", 1),
        (outside.to_str().unwrap(), 1),
    ] {
        let r = upload(&c, &me, job, attempt, b"poisoned").await;
        assert_eq!(
            r.as_ref().map_err(|e| e.code()).err(),
            Some(tonic::Code::PermissionDenied),
            "{job}: {r:?}"
        );
    }
    let join_only = auth("mallory", "", &token);
    let r = upload(&c, &join_only, &own, 1, b"x").await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unauthenticated);
    let forged = auth("honest", "ryc_guess", &token);
    let r = upload(&c, &forged, &victim, 1, b"x").await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(checkpoint_status(&c, &victim).await?, 404);
    assert_eq!(checkpoint_status(&c, UNKNOWN_JOB).await?, 404);
    // Mallory's own attempt may upload its own checkpoint.
    let receipt = upload(&c, &me, &own, 1, b"mine").await?;
    assert_eq!(receipt.size, 4);

    // 4. Nothing changed: the victim's status, log, metrics; no file anywhere new but
    // mallory's own.
    let after = c.job(&victim).await?;
    for field in [
        "status",
        "attempt",
        "agent",
        "reason",
        "metrics",
        "exit_code",
    ] {
        assert_eq!(after[field], before[field], "{field}: {after}");
    }
    assert_eq!(c.logs(&victim).await?, "victim line\n");
    assert_eq!(
        c.get_raw(&format!("/api/v1/jobs/{UNKNOWN_JOB}"))
            .await?
            .status(),
        404
    );
    let new_files: Vec<_> = files_under(&data_dir)
        .into_iter()
        .filter(|p| !files_before.contains(p))
        .filter(|p| !p.to_string_lossy().contains(&own))
        .filter(|p| {
            !p.starts_with(data_dir.join("store")) && p.extension() != Some("redb".as_ref())
        })
        .collect();
    assert!(new_files.is_empty(), "unexpected files: {new_files:?}");
    assert!(!outside.exists());

    // 5. Taking the honest agent's name over, with the join token and another credential or
    // none: refused with what to do; the honest agent and its job carry on.
    for credential in ["ryc_another-credential", ""] {
        let takeover = auth("honest", credential, &token);
        let refused = Fake::open(&c, &takeover, register("honest", vec![])).await;
        let status = refused.err().expect("refused");
        assert!(
            matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{status:?}"
        );
        assert!(status.message().contains("--name"), "{}", status.message());
    }
    // Without the join token, a name not enrolled cannot enrol.
    let stranger = auth("stranger", "ryc_x", "ryj_wrong");
    let err = Fake::open(&c, &stranger, register("stranger", vec![]))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(agent_connected(&c, "honest").await?);
    let j = c.job(&victim).await?;
    assert_eq!(
        (j["status"].clone(), j["attempt"].clone()),
        (json!("running"), json!(1))
    );

    // 6. Replayed and out-of-order sequence numbers on its own attempt.
    let start = seq;
    s.send(lines(&own, 1, start, &["a", "b"], v1::Stream::Log))
        .await;
    s.send(lines(&own, 1, start, &["a", "b"], v1::Stream::Log))
        .await; // replay
    s.send(lines(&own, 1, start + 5, &["far"], v1::Stream::Log))
        .await; // gap
    s.send(lines(&own, 1, start + 1, &["b", "c"], v1::Stream::Log))
        .await; // overlap
    seq = start + 3;
    s.probe(&own, &mut seq).await;
    let text = c.logs(&own).await?;
    let tail: Vec<&str> = text.lines().skip(start as usize).collect();
    assert_eq!(tail, ["a", "b", "c", "probe"], "{text}");

    // 7. A second session of mallory replaces the first (closed by the controller); the first
    // one's end leaves the second connected. Its Register lists the victim's attempt, which
    // changes nothing.
    let running = |job: &str| v1::StatusUpdate {
        job_id: job.into(),
        attempt: 1,
        state: v1::AttemptState::Running as i32,
        ..Default::default()
    };
    let claims = vec![
        v1::AttemptReport {
            job_id: own.clone(),
            attempt: 1,
            log_lines: seq,
            status: Some(running(&own)),
            report_lines: 0,
        },
        v1::AttemptReport {
            job_id: victim.clone(),
            attempt: 1,
            log_lines: 0,
            status: Some(v1::StatusUpdate {
                job_id: victim.clone(),
                attempt: 1,
                state: v1::AttemptState::Succeeded as i32,
                ..Default::default()
            }),
            report_lines: 0,
        },
    ];
    let mut s2 = Fake::open(&c, &me, register("mallory", claims)).await?;
    s.ended().await;
    s2.probe(&own, &mut seq).await;
    assert!(agent_connected(&c, "mallory").await?);
    let j = c.job(&victim).await?;
    assert_eq!(
        (j["status"].clone(), j["attempt"].clone()),
        (json!("running"), json!(1))
    );
    assert!(!matches!(
        c.job(&own).await?["status"].as_str(),
        Some("lost" | "pending")
    ));

    // 8. A Register that is not first ends the session and changes nothing; so does a session
    // that does not start with Register.
    s2.send(Out::Register(v1::Register {
        name: "honest".into(),
        ..Default::default()
    }))
    .await;
    s2.ended().await;
    let err = Fake::open(&c, &me, out(Out::Heartbeat(v1::Heartbeat::default())))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(agent_connected(&c, "honest").await?);
    assert_eq!(c.logs(&victim).await?, "victim line\n");
    assert_eq!(c.job(&victim).await?["status"], "running");

    // The join token is not a user credential.
    let r = c
        .client
        .get(format!("{}/api/v1/jobs", c.base_url()))
        .bearer_auth(&c.agent_token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    c.shutdown().await
}

/// Regression: two agents with one name (`runyard up` plus `runyard agent` on the same host)
/// used to replace each other's sessions; the first looked disconnected and its running job was
/// placed again while its process kept running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_name_is_refused() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[(
        "long.py",
        "import time\nprint('once', flush=True)\ntime.sleep(120)\n",
    )])?;
    let mut c = TestCluster::builder()
        .agent(AgentSpec::new("host"))
        .start()
        .await?;
    let id = c
        .submit(json!({"repo": repo.url(), "script": "long.py"}))
        .await?;
    c.wait_status(&id, &["running"], LONG).await?;
    // A second agent on the same data dir (`runyard agent` next to `runyard up`, both with the
    // defaults) stops at once, before it touches the first one's jobs.
    let same_dir = c.agent_config(&AgentSpec::new("host")).await?;
    let refused =
        tokio::time::timeout(LONG, runyard_agent::run(same_dir, Default::default())).await?;
    assert!(
        matches!(refused, Err(runyard_agent::AgentError::InUse(_))),
        "{refused:?}"
    );
    // A real second agent, same name, its own data dir (so its own credential).
    let dir = runyard_tests::reachable_tempdir()?;
    let config = runyard_agent::Config {
        data_dir: dir.path().join("agent"),
        ..c.agent_config(&AgentSpec::new("host").slots(1)).await?
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let second = tokio::spawn(runyard_agent::run(config, cancel.clone()));
    // Give the impostor several tries (its backoff starts at 250 ms) and check all along.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        assert!(agent_connected(&c, "host").await?, "the first agent stays");
        let j: Value = c.job(&id).await?;
        assert_eq!(
            (j["status"].as_str(), j["attempt"].as_u64()),
            (Some("running"), Some(1)),
            "{j}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.logs(&id).await?, "once\n", "ran once");
    cancel.cancel();
    second.await??;
    c.shutdown().await
}

/// A name whose agent is gone for good (its data dir lost) is freed by an admin, and only by an
/// admin: the join token cannot remove agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_removes_a_gone_agent_and_its_name_enrols_again() -> anyhow::Result<()> {
    let c = TestCluster::builder().start().await?;
    let token = c.agent_token.clone();
    let old = auth("box", "ryc_lost-with-its-disk", &token);
    let session = Fake::open(&c, &old, register("box", vec![])).await?;
    drop(session);
    let new = auth("box", "ryc_fresh-install", &token);
    let err = Fake::open(&c, &new, register("box", vec![]))
        .await
        .err()
        .expect("refused while enrolled");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let delete = |bearer: String| {
        c.client
            .delete(format!("{}/api/v1/agents/box", c.base_url()))
            .bearer_auth(bearer)
            .send()
    };
    assert_eq!(delete(c.agent_token.clone()).await?.status().as_u16(), 401);
    assert_eq!(delete(c.token.clone()).await?.status().as_u16(), 200);
    assert_eq!(delete(c.token.clone()).await?.status().as_u16(), 404);

    let _fresh = Fake::open(&c, &new, register("box", vec![])).await?;
    let err = Fake::open(&c, &old, register("box", vec![]))
        .await
        .err()
        .expect("the old credential no longer opens the name");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    c.shutdown().await
}

/// A snapshot goes only to the agent holding an attempt that runs it: an enrolled agent asking
/// for another agent's job's snapshot, or naming its own job with a snapshot that job does not
/// run, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_goes_only_to_the_agent_running_it() -> anyhow::Result<()> {
    let repo = GitRepo::new(&[("own.py", "print('never runs here')\n")])?;
    let mut c = TestCluster::builder().start().await?;
    let token = c.agent_token.clone();
    let me = auth("mallory", "ryc_mallory-own-credential", &token);
    let mut s = Fake::open(&c, &me, register("mallory", vec![])).await?;
    let own = c
        .submit(json!({"repo": repo.url(), "script": "own.py"}))
        .await?;
    s.until(
        "mallory's assignment",
        |m| matches!(m, In::Assign(a) if a.job_id == own),
    )
    .await;
    s.send(status(&own, 1, v1::AttemptState::Running)).await;

    // The victim's private project, as a snapshot run on an honest agent.
    let mut b = tar::Builder::new(Vec::new());
    let secret = b"print('the victim keeps this to itself')\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(secret.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "victim.py", &secret[..])?;
    let archive = b.into_inner()?;
    let uploaded = c
        .client
        .post(format!("{}/api/v1/snapshots", c.base_url()))
        .bearer_auth(&c.token)
        .body(archive)
        .send()
        .await?;
    assert_eq!(uploaded.status(), 201);
    let snap: serde_json::Value = uploaded.json().await?;
    let sha = snap["sha256"].as_str().unwrap().to_string();
    c.add_agent(AgentSpec::new("honest")).await?;
    let victim = c
        .submit(json!({"repo": snap["snapshot"], "script": "victim.py"}))
        .await?;
    let done = c.wait_status(&victim, &["succeeded"], LONG).await?;
    assert_eq!(done["agent"], "honest", "{done}");

    let mut client = dial::connect(&url(&c), &me).await?;
    for (job, attempt, sha) in [
        (victim.as_str(), 1, sha.as_str()),
        (own.as_str(), 1, sha.as_str()),
        (own.as_str(), 1, "../../admin.token"),
        (UNKNOWN_JOB, 1, sha.as_str()),
    ] {
        let got = client
            .download_snapshot(v1::SnapshotRequest {
                job_id: job.into(),
                attempt,
                sha256: sha.into(),
            })
            .await;
        let status = got
            .err()
            .unwrap_or_else(|| panic!("{job}/{attempt}/{sha} was served"));
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{job}: {status}"
        );
    }
    c.shutdown().await
}
