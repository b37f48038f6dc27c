//! A real single-member etcd for tests: started from the installed `etcd` binary on free loopback
//! ports with a temp data dir. Invariants: [`EtcdServer::start`] returns only once the server
//! answers its health check; dropping the server kills it and deletes its data dir; a missing
//! binary is an error (tests that need etcd fail, they do not skip).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long etcd may take to become healthy (it usually needs under a second).
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Tries with fresh ports when another process takes a port between probe and bind.
const START_ATTEMPTS: usize = 3;

/// A running etcd; killed and its data deleted on drop.
pub struct EtcdServer {
    /// Client endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it is healthy.
    pub async fn start() -> anyhow::Result<EtcdServer> {
        let bin = find_etcd()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match start_once(&bin).await {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// Store URL for this server with the default key prefix.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }

    /// etcd's own log, for failure output.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` is deleted when the field drops, after the process is gone.
    }
}

/// The etcd binary: on PATH, else Debian's location.
fn find_etcd() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"));
    on_path
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|p| is_executable(p))
        .context("etcd not found: run scripts/install-test-deps")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_once(bin: &Path) -> anyhow::Result<EtcdServer> {
    let dir = tempfile::Builder::new()
        .prefix("runyard-etcd-")
        .tempdir()
        .context("create etcd temp dir")?;
    let client_port = free_port()?;
    let mut peer_port = free_port()?;
    while peer_port == client_port {
        peer_port = free_port()?;
    }
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).context("create etcd log")?;
    let child = Command::new(bin)
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=test={peer_url}"))
        .arg("--initial-cluster-state=new")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("clone etcd log")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let mut server = EtcdServer {
        endpoint: format!("127.0.0.1:{client_port}"),
        child,
        dir,
    };
    match wait_ready(&mut server, &client_url).await {
        Ok(()) => Ok(server),
        Err(e) => {
            let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(e.context(format!("etcd log tail:\n{}", tail.join("\n"))))
        }
    }
}

/// Polls `/health` until etcd reports healthy, the process exits, or the deadline passes.
async fn wait_ready(server: &mut EtcdServer, client_url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .no_proxy()
        .build()?;
    let health = format!("{client_url}/health");
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("etcd exited during start with {status}");
        }
        if let Ok(resp) = http.get(&health).send().await
            && let Ok(body) = resp.json::<serde_json::Value>().await
            && body["health"] == "true"
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("etcd not healthy within {READY_DEADLINE:?} at {health}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
