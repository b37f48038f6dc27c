//! The Runyard controller: keeps the list of jobs, places them on agents, and serves the HTTP API.
//!
//! - `store`: the narrow state-store interface, with an embedded (redb) and an etcd backend.
//! - `jobs`: the job table: a view that follows the store (watch), finished jobs by index only.
//! - `access`: who calls the user API: the admin token and named tokens with roles.
//! - `agents`: the registry of agents: enrolment, one live session each, message delivery.
//! - `artifacts`: the best checkpoint of each attempt, verified by size and sha256.
//! - `attach`: the session's decisions (re-registration, fencing, the terminal-status gate), pure.
//! - `logs`: per-attempt log files with sequence-numbered, idempotent appends.
//! - `reports`: report lines folded into jobs in batches; metric history parsed incrementally.
//! - `secrets`: controller-side secrets, and each job's secret values kept apart from it.
//! - `services`: servers run as autoscaled replicas, and the data plane in front of them.
//! - `scheduler`: pure placement of one job onto the fleet's free capacity.
//! - `reconcile`: the pure job state machine (plan, apply, agent reports).
//! - `executor`: the level-triggered loop that applies plans and talks to agents.
//! - `history`: deleting finished jobs with their files, and the retention task.
//! - `grpc`: the agent-facing `Session` stream: translator and trust boundary.
//! - `tunnel`: byte streams to attempts' ports, carried by their agents' connections.
//! - `http`: the user-facing JSON API.
//! - `tokens`: admin and agent join tokens in the data dir.
//! - `tls`: the CA and server certificate in the data dir (or an operator's), rustls configs.
//! - `tls_accept`: TLS handshakes on a listener, for the HTTP and gRPC servers.
//! - `ui`: the web page (embedded static files) and server-rendered metric plots.

use std::path::{Path, PathBuf};
use std::time::Duration;

use runyard_model::Timestamp;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span};

pub mod access;
pub mod agents;
pub mod artifacts;
pub mod attach;
pub mod executor;
pub mod grpc;
pub mod history;
pub mod http;
pub mod jobs;
pub mod leader;
pub mod logs;
pub mod mlflow;
pub mod reconcile;
pub mod reports;
pub mod scheduler;
pub mod secrets;
pub mod services;
pub mod snapshots;
pub mod store;
pub mod tls;
pub mod tls_accept;
pub mod tokens;
pub mod tunnel;
pub mod ui;

pub use executor::Controller;
pub use tls::TlsSetup;
pub use tokens::{Tokens, ensure_tokens};

/// Default HTTP API address.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7900";
/// Default agent gRPC address.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:7901";
/// An agent silent for this long is lost, and so are its jobs.
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(30);
/// Bytes an attempt's log file may reach before further lines are dropped.
pub const DEFAULT_MAX_LOG_SIZE: u64 = 1 << 30;
/// How long shutdown waits for connections to drain.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// Validated controller configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds the embedded store, logs and tokens.
    pub data_dir: PathBuf,
    /// `file:` (embedded, under the data dir) or `etcd://host:port[,host:port...]`.
    pub store: String,
    pub agent_ttl: Duration,
    /// Finished jobs older than this are deleted; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How often the retention task runs (`history::RETENTION_PERIOD`; tests shorten it).
    pub retention_period: Duration,
    /// Bytes an attempt's log file may reach; further lines are dropped (and counted).
    pub max_log_size: u64,
    /// TLS on both ports, or plain (the default here; `runyard controller` turns it on).
    pub tls: TlsSetup,
    /// How the data plane reaches service replicas.
    pub service_path: services::connect::PathMode,
    /// The MLflow tracking server of jobs whose spec names none (`--mlflow-tracking-uri`).
    pub mlflow_tracking_uri: Option<String>,
    /// Where users open the page (`--public-url`), for links to jobs; absent = the address the
    /// submitting client used.
    pub public_url: Option<String>,
    /// The largest snapshot of a local directory the controller takes (`--max-snapshot-size`).
    pub max_snapshot_size: u64,
}

impl Config {
    pub fn new(data_dir: impl AsRef<Path>) -> Config {
        Config {
            data_dir: data_dir.as_ref().to_path_buf(),
            store: "file:".into(),
            agent_ttl: DEFAULT_AGENT_TTL,
            retention: None,
            retention_period: history::RETENTION_PERIOD,
            max_log_size: DEFAULT_MAX_LOG_SIZE,
            tls: TlsSetup::Plain,
            service_path: services::connect::PathMode::Auto,
            mlflow_tracking_uri: None,
            public_url: None,
            max_snapshot_size: snapshots::DEFAULT_MAX_SNAPSHOT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot prepare data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "controller data dir {0} is in use by another controller (`runyard up` or `runyard \
         controller`): stop it, or give this one its own --data-dir"
    )]
    InUse(PathBuf),
    #[error("cannot open the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot load jobs: {0}")]
    Jobs(#[from] jobs::JobsError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Loads or creates the TLS identity `config.tls` asks for and makes `agent.token` carry its CA
/// fingerprint; returns it with the join token agents must be given. Idempotent: `runyard up`
/// calls it for its banner before `run`, which calls it again.
pub async fn prepare_tls(
    config: &Config,
) -> Result<(Option<tls::ServerTls>, runyard_proto::JoinToken), ControllerError> {
    let (dir, setup) = (config.data_dir.clone(), config.tls.clone());
    let task = tokio::task::spawn_blocking(move || {
        let server = tls::prepare(&dir, &setup)?;
        let fingerprint = server.as_ref().and_then(|s| s.fingerprint);
        let token = tokens::publish_join_token(&dir, fingerprint).map_err(|source| {
            ControllerError::DataDir {
                path: dir.clone(),
                source,
            }
        })?;
        Ok::<_, ControllerError>((server, token))
    });
    task.await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Takes `<data_dir>/controller.lock` for this process (creating the dir, private, if it is
/// missing); refuses a data dir another controller holds. `up` and `controller` call it before
/// they print anything, so a second instance fails at once; `run` holds it for its lifetime.
pub fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, ControllerError> {
    use runyard_proto::datadir::{self, LockError};
    datadir::lock(data_dir, "controller.lock").map_err(|e| match e {
        LockError::InUse(dir) => ControllerError::InUse(dir),
        LockError::Io { path, source } => ControllerError::DataDir { path, source },
    })
}

/// Makes what the controller keeps in its data dir readable by it alone (directories 0700, the
/// embedded store 0600): under `runyard up` the dir is open to the local agent's jobs for
/// traversal (they pass through to `<data dir>/agent`), and must show them nothing else.
fn keep_private(data_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, mode) in [
        ("logs", 0o700),
        ("reports", 0o700),
        ("artifacts", 0o700),
        (store::DEFAULT_FILE_NAME, 0o600),
    ] {
        let path = data_dir.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Runs the controller on the given listeners until `cancel` fires.
pub async fn run(
    config: Config,
    http: TcpListener,
    grpc: TcpListener,
    cancel: CancellationToken,
) -> Result<(), ControllerError> {
    run_with(config, http, grpc, cancel, |_| {}).await
}

/// `run`, handing the controller's core to `started` once it is built, before the servers
/// start (tests drive the core through it, e.g. `tunnels`).
pub async fn run_with(
    config: Config,
    http: TcpListener,
    grpc: TcpListener,
    cancel: CancellationToken,
    started: impl FnOnce(&Controller),
) -> Result<(), ControllerError> {
    let data_err = |source| ControllerError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    // One controller per data dir, locked before anything else touches it. Held until `run`
    // returns.
    let _lock = lock_data_dir(&config.data_dir)?;
    let tokens = ensure_tokens(&config.data_dir).map_err(data_err)?;
    let (tls, _) = prepare_tls(&config).await?;
    let log_store = logs::LogStore::with_limit(config.data_dir.join("logs"), config.max_log_size)
        .map_err(data_err)?;
    let report_store = logs::LogStore::open(config.data_dir.join("reports")).map_err(data_err)?;
    let artifact_store = std::sync::Arc::new(
        artifacts::DirStore::open(config.data_dir.join("artifacts")).map_err(data_err)?,
    );
    let snapshot_store =
        snapshots::Snapshots::open(config.data_dir.join("snapshots"), config.max_snapshot_size)
            .map_err(data_err)?;
    let store = store::open(&config.store, &config.data_dir).await?;
    keep_private(&config.data_dir).map_err(data_err)?;
    let jobs = jobs::Jobs::load(store.clone()).await?;
    let agents = agents::Agents::load(store.clone(), Timestamp::now()).await?;
    let ctl = Controller::new(
        jobs,
        agents,
        log_store,
        report_store,
        artifact_store,
        config.agent_ttl,
    )
    .with_service_path(config.service_path)
    .with_snapshots(snapshot_store)
    .with_tracking(mlflow::Tracking::new(
        config.mlflow_tracking_uri.clone(),
        config.public_url.clone(),
    ));
    started(&ctl);
    info!(
        store = store.kind(),
        jobs = ctl.jobs.len(),
        http = %http.local_addr().map_err(ControllerError::Http)?,
        grpc = %grpc.local_addr().map_err(ControllerError::Http)?,
        tls = tls.is_some(),
        ca_fingerprint = tls.as_ref().and_then(|t| t.fingerprint).map(|f| f.to_string()),
        names = ?tls.as_ref().map(|t| &t.names),
        "controller started"
    );

    let tracker = TaskTracker::new();
    tracker.spawn(
        ctl.jobs
            .clone()
            .follow(cancel.child_token())
            .instrument(info_span!("job_watch")),
    );
    tracker.spawn(
        ctl.fold
            .clone()
            .run(ctl.jobs.clone(), ctl.reports.clone(), cancel.child_token())
            .instrument(info_span!("report_fold")),
    );
    tracker.spawn(
        ctl.clone()
            .run_loop(cancel.child_token())
            .instrument(info_span!("reconcile_loop")),
    );
    tracker.spawn(
        ctl.services
            .clone()
            .run(ctl.clone(), cancel.child_token())
            .instrument(info_span!("services")),
    );
    tracker
        .spawn(mlflow::follow(ctl.clone(), cancel.child_token()).instrument(info_span!("mlflow")));
    if let Some(retention) = config.retention {
        tracker.spawn(
            ctl.clone()
                .run_retention(retention, config.retention_period, cancel.child_token())
                .instrument(info_span!("retention")),
        );
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<runyard_proto::v1::agent_service_server::AgentServiceServer<grpc::AgentService>>().await;
    let agent_service =
        grpc::AgentService::new(ctl.clone(), tokens.agent.clone(), cancel.child_token());
    let sessions = agent_service.tasks();
    let grpc_cancel = cancel.child_token();
    let grpc_router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(
            runyard_proto::v1::agent_service_server::AgentServiceServer::new(agent_service)
                .max_decoding_message_size(16 << 20),
        );
    let grpc_task = match &tls {
        None => tracker.spawn(grpc_router.serve_with_incoming_shutdown(
            // Small messages (assignments, acks) must not wait for delayed ACKs.
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            grpc_cancel.cancelled_owned(),
        )),
        Some(tls) => {
            let incoming = tls_accept::TlsListener::spawn(
                grpc,
                tls.server_config(tls::ALPN_GRPC)?,
                tls_accept::PlainReply::Close,
                cancel.child_token(),
            )
            .map_err(ControllerError::Http)?;
            tracker.spawn(grpc_router.serve_with_incoming_shutdown(
                incoming.into_stream(),
                grpc_cancel.cancelled_owned(),
            ))
        }
    };
    let access = access::Access::load(store.clone(), tokens.admin.clone()).await?;
    let app = http::router(http::ApiState {
        ctl: ctl.clone(),
        tls: tls.is_some(),
        access,
        shutdown: cancel.child_token(),
    });
    let http_cancel = cancel.child_token();
    let http_task = match &tls {
        None => tracker.spawn(async move {
            use axum::serve::ListenerExt as _;
            // Without it, a response written in two parts (a replica's head, then its body,
            // through `/s/`) waits for the client's delayed ACK: 40 ms per request.
            let http = http.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(http, app)
                .with_graceful_shutdown(http_cancel.cancelled_owned())
                .await
        }),
        Some(tls) => {
            let listener = tls_accept::TlsListener::spawn(
                http,
                tls.server_config(tls::ALPN_HTTP)?,
                tls_accept::PlainReply::Http,
                cancel.child_token(),
            )
            .map_err(ControllerError::Http)?;
            tracker.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(http_cancel.cancelled_owned())
                    .await
            })
        }
    };
    if let Some(tls) = tls {
        tracker.spawn(
            renew_certificate(tls, cancel.child_token()).instrument(info_span!("tls_renew")),
        );
    }
    tracker.close();

    cancel.cancelled().await;
    info!("controller shutting down");
    // Followers of logs keep HTTP connections open: bound the drain.
    let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
        let grpc = grpc_task.await;
        let http = http_task.await;
        sessions.close();
        sessions.wait().await;
        (grpc, http)
    })
    .await;
    match drained {
        Ok((grpc, http)) => {
            if let Ok(Err(e)) = grpc {
                return Err(e.into());
            }
            if let Ok(Err(e)) = http {
                return Err(ControllerError::Http(e));
            }
        }
        Err(_) => tracing::warn!("connections did not drain in time; closing them"),
    }
    Ok(())
}

/// Re-issues the managed server certificate when it is due, every `tls::RENEW_CHECK_PERIOD`.
async fn renew_certificate(tls: tls::ServerTls, cancel: CancellationToken) {
    let tls = std::sync::Arc::new(tls);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tls::RENEW_CHECK_PERIOD) => {}
            _ = cancel.cancelled() => return,
        }
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.renew_if_due()).await {
            Ok(Ok(true)) => info!("serving the re-issued server certificate"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot re-issue the server certificate; will retry")
            }
            Err(_) => tracing::warn!("the certificate renewal panicked; will retry"),
        }
    }
}
