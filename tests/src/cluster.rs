//! `TestCluster`: a real controller and agents in this process, over real gRPC and HTTP on
//! loopback, with a bounded shutdown. Agents may dial through a `Proxy` to simulate partitions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;

/// Free space the test agents require before a job starts.
pub const TEST_MIN_FREE: u64 = 256 << 20;

/// How an agent of the cluster is set up.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub name: String,
    pub cpu_small_slots: u32,
    /// Fake GPUs through a fake NVML library (real nvml-wrapper path); 0 = no NVML library.
    pub gpus: u32,
    /// Dial the controller through a cuttable proxy.
    pub via_proxy: bool,
    /// Free space below which the agent refuses to start jobs.
    pub min_free: u64,
    /// `--git-credential HOST=FILE` of the agent.
    pub git_credentials: Vec<runyard_agent::git_auth::HostCredential>,
}

impl AgentSpec {
    pub fn new(name: &str) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            cpu_small_slots: 4,
            gpus: 0,
            via_proxy: false,
            // Test jobs need little room; a CI disk near full should fail the test that fills it,
            // not every job of the suite (the agent's own default is 1 GiB).
            min_free: TEST_MIN_FREE,
            git_credentials: Vec::new(),
        }
    }

    /// Gives the agent a git credential (`HOST=FILE`).
    pub fn git_credential(mut self, host_eq_file: &str) -> AgentSpec {
        self.git_credentials
            .push(host_eq_file.parse().expect("a HOST=FILE credential"));
        self
    }

    pub fn slots(mut self, n: u32) -> AgentSpec {
        self.cpu_small_slots = n;
        self
    }

    pub fn gpus(mut self, n: u32) -> AgentSpec {
        self.gpus = n;
        self
    }

    pub fn via_proxy(mut self) -> AgentSpec {
        self.via_proxy = true;
        self
    }
}

/// Changes the controller's configuration before it starts.
type ConfigFn = Box<dyn FnOnce(&mut runyard_controller::Config) + Send>;

pub struct ClusterBuilder {
    agents: Vec<AgentSpec>,
    store: Option<String>,
    agent_ttl: Duration,
    configure: Option<ConfigFn>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            agents: vec![],
            store: None,
            agent_ttl: Duration::from_secs(3),
            configure: None,
        }
    }
}

impl ClusterBuilder {
    pub fn agent(mut self, a: AgentSpec) -> Self {
        self.agents.push(a);
        self
    }

    /// Store URL (default: the embedded file store in the controller's data dir).
    pub fn store(mut self, url: impl Into<String>) -> Self {
        self.store = Some(url.into());
        self
    }

    pub fn agent_ttl(mut self, ttl: Duration) -> Self {
        self.agent_ttl = ttl;
        self
    }

    /// Any other controller setting (retention, log size limit, ...).
    pub fn controller_config(
        mut self,
        f: impl FnOnce(&mut runyard_controller::Config) + Send + 'static,
    ) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    pub async fn start(self) -> anyhow::Result<TestCluster> {
        crate::init_tracing();
        let dir = crate::reachable_tempdir()?;
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        let mut config = runyard_controller::Config::new(dir.path().join("controller"));
        config.agent_ttl = self.agent_ttl;
        if let Some(s) = &self.store {
            config.store = s.clone();
        }
        if let Some(f) = self.configure {
            f(&mut config);
        }
        let tokens = runyard_controller::ensure_tokens(&config.data_dir)?;
        let mut cluster = TestCluster {
            dir,
            http_addr,
            grpc_addr,
            token: tokens.admin,
            agent_token: tokens.agent,
            config,
            controller: None,
            agents: BTreeMap::new(),
            proxies: BTreeMap::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
        };
        cluster.controller = Some(spawn_controller(cluster.config.clone(), http, grpc));
        cluster.wait_healthy().await?;
        for a in self.agents {
            cluster.add_agent(a).await?;
        }
        Ok(cluster)
    }
}

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// The controller's core, once built (controllers only).
    core: Arc<Mutex<Option<runyard_controller::Controller>>>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub token: String,
    pub agent_token: String,
    pub config: runyard_controller::Config,
    controller: Option<Running>,
    agents: BTreeMap<String, Running>,
    pub proxies: BTreeMap<String, Proxy>,
    pub client: reqwest::Client,
}

fn spawn_controller(
    config: runyard_controller::Config,
    http: TcpListener,
    grpc: TcpListener,
) -> Running {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let core = Arc::new(Mutex::new(None));
    let started = core.clone();
    let task = tokio::spawn(async move {
        runyard_controller::run_with(config, http, grpc, c, move |ctl| {
            *started.lock().unwrap() = Some(ctl.clone());
        })
        .await
        .map_err(anyhow::Error::from)
    });
    Running { cancel, task, core }
}

async fn stop(r: Running, what: &str) -> anyhow::Result<()> {
    r.cancel.cancel();
    match tokio::time::timeout(Duration::from_secs(20), r.task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => bail!("{what} panicked: {e}"),
        Err(_) => bail!("{what} did not stop within 20 s"),
    }
}

impl TestCluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.base_url());
        crate::eventually(Duration::from_secs(20), "controller health", || async {
            self.client
                .get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        })
        .await
    }

    /// The configuration `add_agent` runs an agent with (dialing through a new proxy when the
    /// spec asks for one).
    pub async fn agent_config(
        &mut self,
        spec: &AgentSpec,
    ) -> anyhow::Result<runyard_agent::Config> {
        let target = if spec.via_proxy {
            let p = Proxy::start(self.grpc_addr).await?;
            let addr = p.addr;
            self.proxies.insert(spec.name.clone(), p);
            addr
        } else {
            self.grpc_addr
        };
        let nvml_library = if spec.gpus > 0 {
            Some(crate::fake_nvml::build_fake_nvml(spec.gpus)?)
        } else {
            None
        };
        Ok(runyard_agent::Config {
            controller: format!("http://{target}"),
            token: self.agent_token.clone(),
            ca: None,
            data_dir: self.agent_dir(&spec.name),
            name: spec.name.clone(),
            cpu_small_slots: spec.cpu_small_slots,
            offer_gpus: spec.gpus > 0,
            nvml_library,
            python: PathBuf::from("python3"),
            uv: None,
            // One warm cache for every test agent, so environments (Lightning: ~3 GB) are
            // downloaded once per machine, not once per test.
            uv_cache: Some(crate::shared_uv_cache()),
            // The shared cache is not one agent's to prune.
            cache_size: Some(u64::MAX),
            min_free: spec.min_free,
            isolation: Default::default(),
            git_credentials: spec.git_credentials.clone(),
        })
    }

    pub async fn add_agent(&mut self, spec: AgentSpec) -> anyhow::Result<()> {
        let config = self.agent_config(&spec).await?;
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            runyard_agent::run(config, c)
                .await
                .map_err(anyhow::Error::from)
        });
        self.agents.insert(
            spec.name.clone(),
            Running {
                cancel,
                task,
                core: Arc::default(),
            },
        );
        let name = spec.name.clone();
        crate::eventually(
            Duration::from_secs(20),
            &format!("agent {name} connected"),
            || async {
                let agents = self.get("/api/v1/agents").await.ok()?;
                agents["agents"]
                    .as_array()?
                    .iter()
                    .any(|a| a["name"] == name.as_str() && a["connected"] == true)
                    .then_some(())
            },
        )
        .await
    }

    /// The data dir of agent `name`.
    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("agents").join(name)
    }

    /// Stops an agent abruptly: its session drops and its jobs' processes are killed, as when
    /// its host dies. The controller only learns it from the silence.
    pub async fn kill_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let r = self
            .agents
            .remove(name)
            .with_context(|| format!("no agent {name}"))?;
        stop(r, &format!("agent {name}")).await
    }

    /// Stops the controller and starts it again on the same ports and data dir.
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.stop_controller().await?;
        self.start_controller().await
    }

    pub async fn stop_controller(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.controller.take() {
            stop(r, "controller").await?;
        }
        Ok(())
    }

    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        let http = bind_again(self.http_addr).await?;
        let grpc = bind_again(self.grpc_addr).await?;
        self.controller = Some(spawn_controller(self.config.clone(), http, grpc));
        self.wait_healthy().await
    }

    /// The running controller's core (jobs, agents, tunnels), to drive it directly.
    pub fn ctl(&self) -> runyard_controller::Controller {
        let running = self.controller.as_ref().expect("the controller is running");
        let core = running.core.lock().unwrap().clone();
        core.expect("the controller has started")
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            self.kill_agent(&n).await?;
        }
        self.stop_controller().await
    }

    // ---- HTTP API ----

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .client
            .get(format!("{}{path}", self.base_url()))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// POSTs a JSON body; returns status and parsed body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .post(format!("{}{path}", self.base_url()))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    /// DELETEs a path; returns status and parsed body.
    pub async fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .delete(format!("{}{path}", self.base_url()))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    pub async fn submit(&self, spec: Value) -> anyhow::Result<String> {
        let (status, body) = self.post("/api/v1/jobs", &spec).await?;
        if status != 201 {
            bail!("submit returned {status}: {body}");
        }
        Ok(body["id"].as_str().context("job id")?.to_string())
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<Value> {
        self.get(&format!("/api/v1/jobs/{id}")).await
    }

    /// Waits until the job's status is one of `statuses`.
    pub async fn wait_status(
        &self,
        id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Ok(j) = self.job(id).await {
                if statuses.contains(&j["status"].as_str().unwrap_or("")) {
                    return Ok(j);
                }
                last = j;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for job {id} to be {statuses:?}; last seen: {last}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A raw authenticated GET, for bodies that are not JSON.
    pub async fn get_raw(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .client
            .get(format!("{}{path}", self.base_url()))
            .bearer_auth(&self.token)
            .send()
            .await?)
    }

    /// The values of one metric's history, in order.
    pub async fn metric_values(&self, id: &str, name: &str) -> anyhow::Result<Vec<f64>> {
        let m = self.get(&format!("/api/v1/jobs/{id}/metrics")).await?;
        let points = m["series"][name].as_array().cloned().unwrap_or_default();
        Ok(points.iter().filter_map(|p| p["value"].as_f64()).collect())
    }

    /// The job's full log as the API serves it (not following).
    pub async fn logs(&self, id: &str) -> anyhow::Result<String> {
        let r = self
            .client
            .get(format!("{}/api/v1/jobs/{id}/logs", self.base_url()))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("logs: {}", r.status());
        }
        Ok(r.text().await?)
    }
}

/// Binds a listener on an address a previous listener just released.
async fn bind_again(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("bind {addr}")))
}
