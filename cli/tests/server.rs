//! The built `runyard up` binary: what it prints, and a clean exit on SIGINT.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Every step must finish within this.
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_how_to_use_it_and_stops_on_sigint() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_runyard"))
        .args(["up", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .env_clear()
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let last = line.starts_with("export RUNYARD_TOKEN=");
            printed.push(line);
            if last {
                break;
            }
        }
    })
    .await
    .expect("banner not printed");

    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin = admin.trim();
    let controller = printed
        .iter()
        .find_map(|l| l.strip_prefix("export RUNYARD_CONTROLLER="))
        .unwrap_or_else(|| panic!("no controller export in {printed:#?}"));
    let port: u16 = controller
        .strip_prefix("http://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad URL {controller}"));
    assert_ne!(port, 0, "the bound port is printed, not the requested one");
    assert_eq!(
        printed.last().unwrap(),
        &format!("export RUNYARD_TOKEN={admin}")
    );
    assert!(
        printed
            .iter()
            .any(|l| l.trim() == format!("web UI, API: {controller}")),
        "{printed:#?}"
    );
    assert!(
        printed
            .iter()
            .any(|l| l.contains("TLS:") && l.contains("plain HTTP on loopback")),
        "the banner says it serves plain HTTP on loopback: {printed:#?}"
    );
    assert!(
        data.join("agent.token").is_file(),
        "the agent join token is created"
    );

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("runyard up did not stop after SIGINT")
        .unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        e.read_to_string(&mut stderr).await.unwrap();
    }
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
}
