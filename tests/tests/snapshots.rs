//! Snapshots of local directories through the HTTP API: stored by content, checked before they
//! are kept (escapes, devices, the size limit), named by jobs that then run their files on an
//! agent that fetches them over gRPC; collected once no job names them.

use std::time::Duration;

use runyard_tests::cluster::{AgentSpec, TestCluster};
use serde_json::{Value, json};

fn archive(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// An archive whose one entry has this raw path (the builder itself refuses `..`).
fn raw(path: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

async fn upload(c: &TestCluster, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    let r = c
        .client
        .post(format!("{}/api/v1/snapshots", c.base_url()))
        .bearer_auth(&c.token)
        .header("content-type", "application/x-tar")
        .body(body)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_checked_stored_once_and_run() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .agent(AgentSpec::new("a1"))
        .controller_config(|config| config.max_snapshot_size = 64 << 10)
        .start()
        .await?;
    let project = archive(&[
        ("run.py", "import pkg.mod\n"),
        ("pkg/__init__.py", ""),
        ("pkg/mod.py", "print('from the snapshot')\n"),
    ]);
    let (status, first) = upload(&c, project.clone()).await?;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["files"], 3);
    let id = first["snapshot"].as_str().unwrap().to_string();
    assert_eq!(
        id,
        format!("snapshot:sha256:{}", first["sha256"].as_str().unwrap())
    );
    let (status, again) = upload(&c, project).await?;
    assert_eq!((status, &again["snapshot"]), (200, &first["snapshot"]));

    let job = c.submit(json!({"repo": id, "script": "run.py"})).await?;
    let done = c
        .wait_status(&job, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    let log = c.logs(&job).await?;
    assert_eq!(done["status"], "succeeded", "{done}\n{log}");
    assert!(log.contains("from the snapshot"), "{log}");
    assert_eq!(
        done["commit"], first["sha256"],
        "the snapshot is the job's commit"
    );

    // Refused, naming why, and nothing stored: escapes, devices, not a tar, too big.
    let mut device = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Block);
    h.set_size(0);
    device.append_data(&mut h, "disk", &[][..])?;
    for (body, why) in [
        (raw("../escape.py"), "without `..`"),
        (raw("/etc/cron.d/x"), "relative"),
        (device.into_inner()?, "only files, directories and symlinks"),
        (b"{\"not\": \"a tar\"}".to_vec(), "not a tar archive"),
    ] {
        let (status, body) = upload(&c, body).await?;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains(why), "{body}");
    }
    let big = archive(&[("data.bin", &"x".repeat(100 << 10))]);
    let (status, body) = upload(&c, big).await?;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("64KiB"), "{body}");

    // A job can only name a snapshot the controller has, and gives it no revision.
    let unknown = format!("snapshot:sha256:{}", "0".repeat(64));
    let (status, body) = c
        .post(
            "/api/v1/jobs",
            &json!({"repo": unknown, "script": "run.py"}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("upload it first"),
        "{body}"
    );
    let (status, body) = c
        .post(
            "/api/v1/jobs",
            &json!({"repo": id, "script": "run.py", "revision": "main"}),
        )
        .await?;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("revision")),
        "{body}"
    );

    // Unreferenced snapshots are collected (here with no grace); one a stored job names is
    // kept until that job is deleted.
    let (status, other) = upload(&c, archive(&[("other.py", "print(2)\n")])).await?;
    assert_eq!(status, 201, "{other}");
    let ctl = c.ctl();
    let snapshots = ctl
        .snapshots
        .clone()
        .expect("the controller keeps snapshots");
    let removed = snapshots
        .collect(ctl.jobs.store().as_ref(), Duration::ZERO)
        .await?;
    assert_eq!(removed, [other["sha256"].as_str().unwrap()]);
    assert!(snapshots.exists(first["sha256"].as_str().unwrap()).await);
    let (status, body) = c.delete(&format!("/api/v1/jobs/{job}")).await?;
    assert_eq!(status, 200, "{body}");
    let removed = snapshots
        .collect(ctl.jobs.store().as_ref(), Duration::ZERO)
        .await?;
    assert_eq!(removed, [first["sha256"].as_str().unwrap()]);
    let (status, body) = c
        .post("/api/v1/jobs", &json!({"repo": id, "script": "run.py"}))
        .await?;
    assert_eq!(status, 400, "gone: {body}");
    c.shutdown().await
}
