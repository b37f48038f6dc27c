//! Command-line surface of `runyard`: clap derive types whose doc comments are the `--help`.
//!
//! Invariant: every flag can also come from a `RUNYARD_...` environment variable; parsing does
//! no I/O (defaults that need the environment, such as the data dir, are resolved by commands).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use runyard_model::JobStatus;

/// Default HTTP base URL of the controller for client commands.
pub const DEFAULT_CONTROLLER_URL: &str = "http://127.0.0.1:7900";
/// Default gRPC URL of the controller for agents (`runyard controller` serves TLS by default).
pub const DEFAULT_AGENT_CONTROLLER_URL: &str = "https://127.0.0.1:7901";
/// Default Python interpreter for jobs.
pub const DEFAULT_PYTHON: &str = "python3";
/// Default embedded store of the controller.
pub const DEFAULT_STORE: &str = "file:";
/// Default limit of one attempt's log file (`runyard_controller::DEFAULT_MAX_LOG_SIZE`).
pub const DEFAULT_MAX_LOG_SIZE: &str = "1GiB";

/// Runyard runs Python scripts from git repositories on CPU and GPU machines.
#[derive(Debug, Parser)]
#[command(name = "runyard", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a controller and one local agent in this process (try Runyard on one machine).
    Up(UpArgs),
    /// Run the controller: job store, scheduler, HTTP API and the agents' gRPC endpoint.
    Controller(ControllerArgs),
    /// Run an agent: it dials the controller and runs the jobs placed on this machine.
    Agent(AgentArgs),
    /// Submit a job; prints its id.
    Submit(SubmitArgs),
    /// List jobs, newest first.
    Ls(LsArgs),
    /// Show one job.
    Status(JobArgs),
    /// List a job's attempts: where each ran and how it ended.
    Attempts(JobArgs),
    /// Print a job's output.
    Logs(LogsArgs),
    /// Stop a job (SIGTERM, then SIGKILL after its stop grace).
    Stop(JobArgs),
    /// Delete finished jobs with their logs and checkpoints (stop a running one first).
    Rm(RmArgs),
    /// List the agents the controller knows.
    Agents(ClientArgs),
    /// Download a job's best checkpoint (verified against the controller's sha256).
    Download(DownloadArgs),
    /// Named API tokens with a role (admins only): create, ls, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Controller-side secrets that jobs name in `secrets` (set and rm: admins only).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Show who the token is: its name and role.
    Whoami(ClientArgs),
    /// Serve a model server (or any HTTP app) as autoscaled replicas at `/s/NAME/`: a new
    /// service, or a new spec for a running one (rolled out with no failed request).
    Serve(ServeArgs),
    /// List services.
    Services(ClientArgs),
    /// One service: status, logs, scale, stop, rm.
    #[command(subcommand)]
    Service(ServiceCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The job's flags (`-f service.yaml` holds the service's fields too).
    #[command(flatten)]
    pub job: SubmitArgs,
    /// Fewest replicas (0: scale to zero when idle).
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,
    /// Most replicas.
    #[arg(long, value_name = "N")]
    pub max: Option<u32>,
    /// Readiness path (default `/health`).
    #[arg(long, value_name = "PATH")]
    pub health: Option<String>,
    /// Batch POSTs into JSON arrays of up to N requests.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<u32>,
    /// How long a batch waits to fill (default `1s`).
    #[arg(long, value_name = "DURATION")]
    pub batch_timeout: Option<String>,
    /// Requests need no token.
    #[arg(long)]
    pub public: bool,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Replicas (agent, state, requests in flight), traffic, the last scaling decision.
    Status(ServiceNameArgs),
    /// A replica's output (the newest replica's by default).
    Logs(ServiceLogsArgs),
    /// New replica bounds.
    Scale(ServiceScaleArgs),
    /// Drain and stop every replica (serve again to start it).
    Stop(ServiceNameArgs),
    /// Remove a stopped service.
    Rm(ServiceNameArgs),
}

#[derive(Debug, Args)]
pub struct ServiceNameArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ServiceLogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service's name.
    pub name: String,
    /// Replica number (see `service status`); default: the newest live one.
    #[arg(long, value_name = "N")]
    pub replica: Option<u32>,
    /// Keep streaming until the replica ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct ServiceScaleArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service's name.
    pub name: String,
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,
    #[arg(long, value_name = "N")]
    pub max: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; prints it once (only its hash is kept).
    Create(TokenCreateArgs),
    /// List the named tokens (never the tokens themselves).
    Ls(ClientArgs),
    /// Revoke a token: refused from the next request on.
    Revoke(TokenNameArgs),
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set (or replace) a secret; the value is read from stdin (or --from-file), never from the
    /// command line.
    Set(SecretSetArgs),
    /// List the secrets' names (never their values).
    Ls(ClientArgs),
    /// Remove a secret (jobs submitted before keep their copy).
    Rm(TokenNameArgs),
}

#[derive(Debug, Args)]
pub struct SecretSetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The secret's name (1 to 64 of a-z, 0-9, `.`, `_`, `-`).
    pub name: String,
    /// Read the value from this file instead of stdin.
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The token's name (1 to 64 of a-z, 0-9, `.`, `_`, `-`); jobs it submits are owned by it.
    pub name: String,
    /// viewer (reads), user (also submits, stops and deletes its own jobs) or admin.
    #[arg(long, value_parser = parse_role, default_value = "user")]
    pub role: runyard_model::Role,
}

#[derive(Debug, Args)]
pub struct TokenNameArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The token's name.
    pub name: String,
}

/// Where the client commands find the controller.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// HTTP base URL of the controller.
    #[arg(long, env = "RUNYARD_CONTROLLER", default_value = DEFAULT_CONTROLLER_URL, value_name = "URL")]
    pub controller: String,
    /// Admin API token (printed by `runyard up`; stored in `<data-dir>/admin.token`). When unset,
    /// the token in the default data dir is used if there is one.
    #[arg(
        long,
        env = "RUNYARD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print the API's JSON instead of text.
    #[arg(long, env = "RUNYARD_JSON")]
    pub json: bool,
    /// CA certificate (PEM) to trust for an https:// controller, besides the system's roots:
    /// the controller's `<data-dir>/tls/ca.crt`. When unset and the controller is on this
    /// machine, the CA in the default data dir is trusted if there is one.
    #[arg(long, env = "RUNYARD_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory (store, logs, tokens; the agent uses `<DIR>/agent`). Default:
    /// `$HOME/.runyard`.
    #[arg(long, env = "RUNYARD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the web UI and HTTP API.
    #[arg(long, env = "RUNYARD_HTTP", default_value = runyard_controller::DEFAULT_HTTP_ADDR, value_name = "ADDR")]
    pub http: String,
    /// Address of the agents' gRPC endpoint.
    #[arg(long, env = "RUNYARD_GRPC", default_value = runyard_controller::DEFAULT_GRPC_ADDR, value_name = "ADDR")]
    pub grpc: String,
    /// Serve HTTPS and gRPC over TLS with the data dir's CA (as `runyard controller` does).
    /// Default: plain HTTP, meant for loopback addresses.
    #[arg(long, env = "RUNYARD_UP_TLS")]
    pub tls: bool,
    #[command(flatten)]
    pub history: HistoryArgs,
    #[command(flatten)]
    pub services: ServicesArgs,
    #[command(flatten)]
    pub mlflow: MlflowArgs,
    #[command(flatten)]
    pub isolation: IsolationArgs,
}

/// How the controller's data plane reaches service replicas (`up` and `controller`).
#[derive(Debug, Clone, Args)]
pub struct ServicesArgs {
    /// `auto`: a direct connection to the replica on its agent's address when it connects,
    /// else a tunnel through the agent's own connection to the controller; `direct` or `tunnel`:
    /// only that one (`tunnel` when agents sit where the controller cannot dial them).
    #[arg(
        long,
        env = "RUNYARD_SERVICE_PATH",
        default_value = "auto",
        value_name = "auto|direct|tunnel"
    )]
    pub service_path: runyard_controller::services::connect::PathMode,
}

impl ServicesArgs {
    pub fn apply(&self, config: &mut runyard_controller::Config) {
        config.service_path = self.service_path;
    }
}

/// MLflow tracking of jobs (`up` and `controller`).
#[derive(Debug, Clone, Args)]
pub struct MlflowArgs {
    /// The MLflow tracking server (http(s)://host:port) of MLflow project jobs (entry points)
    /// and of jobs whose `mlflow` block names no tracking_uri.
    #[arg(long, env = "RUNYARD_MLFLOW_TRACKING_URI", value_name = "URL", value_parser = tracking_uri)]
    pub mlflow_tracking_uri: Option<String>,
    /// The address users open the page at (https://runyard.example.com), for the links to jobs
    /// Runyard puts in MLflow runs; default: the address the submitting client used.
    #[arg(long, env = "RUNYARD_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
}

fn tracking_uri(s: &str) -> Result<String, String> {
    runyard_model::spec::validate_tracking_uri(s).map(|()| s.to_string())
}

impl MlflowArgs {
    pub fn apply(&self, config: &mut runyard_controller::Config) {
        config.mlflow_tracking_uri = self.mlflow_tracking_uri.clone();
        config.public_url = self.public_url.clone();
    }
}

/// What the controller keeps of finished jobs (`up` and `controller`).
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// Delete finished jobs, with their logs and checkpoints, this long after they ended (e.g.
    /// `30d`, `12h`). Default: keep them until deleted with `runyard rm`.
    #[arg(long, env = "RUNYARD_RETENTION", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub retention: Option<std::time::Duration>,
    /// Largest log of one attempt (e.g. `512MiB`, `1GiB`): further lines are dropped, and one
    /// line at the end of the log says how many.
    #[arg(long, env = "RUNYARD_MAX_LOG_SIZE", default_value = DEFAULT_MAX_LOG_SIZE, value_parser = parse_log_size, value_name = "SIZE")]
    pub max_log_size: u64,
    /// Largest snapshot of a local directory (`runyard submit --repo DIR`, `mlflow run DIR`)
    /// the controller takes.
    #[arg(long, env = "RUNYARD_MAX_SNAPSHOT_SIZE", default_value = "64MiB", value_parser = runyard_agent::cache::parse_size, value_name = "SIZE")]
    pub max_snapshot_size: u64,
}

impl HistoryArgs {
    /// Sets these limits on a controller configuration.
    pub fn apply(&self, config: &mut runyard_controller::Config) {
        config.retention = self.retention;
        config.max_log_size = self.max_log_size;
        config.max_snapshot_size = self.max_snapshot_size;
    }
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Data directory (embedded store, logs, artifacts, tokens). Default: `$HOME/.runyard`.
    #[arg(long, env = "RUNYARD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Job store: `file:` (embedded, in the data dir) or `etcd://host:port[,host:port...]`.
    #[arg(long, env = "RUNYARD_STORE", default_value = DEFAULT_STORE, value_name = "URL")]
    pub store: String,
    /// Address of the web UI and HTTP API.
    #[arg(long, env = "RUNYARD_HTTP", default_value = runyard_controller::DEFAULT_HTTP_ADDR, value_name = "ADDR")]
    pub http: String,
    /// Address of the agents' gRPC endpoint.
    #[arg(long, env = "RUNYARD_GRPC", default_value = runyard_controller::DEFAULT_GRPC_ADDR, value_name = "ADDR")]
    pub grpc: String,
    /// An agent silent for this long is lost, and so are its jobs (e.g. `30s`, `2m`).
    #[arg(long, env = "RUNYARD_AGENT_TTL", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub agent_ttl: Option<std::time::Duration>,
    /// Names the server certificate is issued for, comma-separated: DNS names and IP addresses
    /// agents and users dial. `localhost`, `127.0.0.1` and `::1` are always added. Default: the
    /// host name and the addresses of its interfaces.
    #[arg(
        long,
        env = "RUNYARD_ADVERTISE",
        value_delimiter = ',',
        value_name = "NAMES",
        conflicts_with_all = ["tls_cert", "no_tls"]
    )]
    pub advertise: Vec<String>,
    /// Serve with this certificate chain (PEM: the server's certificate first, then its
    /// issuers) instead of the data dir's CA. With an issuer in the file, the join token pins
    /// the last one.
    #[arg(
        long,
        env = "RUNYARD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "no_tls"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "RUNYARD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP and gRPC: tokens and job data travel unencrypted. Only behind a
    /// TLS-terminating proxy or on a trusted network.
    #[arg(long, env = "RUNYARD_NO_TLS")]
    pub no_tls: bool,
    #[command(flatten)]
    pub history: HistoryArgs,
    #[command(flatten)]
    pub services: ServicesArgs,
    #[command(flatten)]
    pub mlflow: MlflowArgs,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// gRPC URL of the controller.
    #[arg(long, env = "RUNYARD_AGENT_CONTROLLER", default_value = DEFAULT_AGENT_CONTROLLER_URL, value_name = "URL")]
    pub controller: String,
    /// File holding the controller's agent join token (`<controller data dir>/agent.token`).
    #[arg(
        long,
        env = "RUNYARD_AGENT_TOKEN_FILE",
        value_name = "FILE",
        required_unless_present = "token",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// The agent join token itself, instead of --token-file.
    #[arg(
        long,
        env = "RUNYARD_AGENT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) for an https:// controller whose join token carries no CA
    /// fingerprint (default: the system's roots). A token that carries one (`RY1...::...`)
    /// pins that CA and needs no file.
    #[arg(long, env = "RUNYARD_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Data directory (git mirrors, Python env cache, job trees, log spools, and
    /// `agent.credential`, this agent's identity). One agent per data dir. Default:
    /// `$HOME/.runyard/agent`.
    #[arg(long, env = "RUNYARD_AGENT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Agent name, stable across restarts. The first connect enrols it with this agent's
    /// credential; another agent cannot use it afterwards. Default: the host name.
    #[arg(long, env = "RUNYARD_AGENT_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// What this agent offers, comma-separated: `cpu-small[:N]` (N concurrent small CPU jobs,
    /// default the number of CPUs) and `gpu` (the GPUs NVML finds). Default:
    /// `cpu-small:<CPUs>,gpu`; a list without `gpu` offers no GPUs.
    #[arg(long, env = "RUNYARD_AGENT_COMPUTE", value_name = "LIST")]
    pub compute: Option<String>,
    /// Load NVML from this library instead of the system's `libnvidia-ml.so.1`.
    #[arg(long, env = "RUNYARD_NVML_LIBRARY", value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// Python interpreter used to build job environments.
    #[arg(long, env = "RUNYARD_PYTHON", default_value = DEFAULT_PYTHON, value_name = "PATH")]
    pub python: PathBuf,
    /// uv binary; default: `uv` on PATH, else one installed into the data dir, else pip.
    #[arg(long, env = "RUNYARD_UV", value_name = "PATH")]
    pub uv: Option<PathBuf>,
    /// uv's shared package cache; default: `<data dir>/uv-cache`. Keep it on the same file
    /// system as the data dir so job environments are hardlinked from it.
    #[arg(long, env = "RUNYARD_UV_CACHE", value_name = "DIR")]
    pub uv_cache: Option<PathBuf>,
    /// Limit on the agent's caches (git mirrors, uv cache), e.g. `50GiB`, `500MB`; default: 80 %
    /// of the space they can use on the data dir's file system at start.
    #[arg(long, env = "RUNYARD_CACHE_SIZE", value_name = "SIZE", value_parser = runyard_agent::cache::parse_size)]
    pub cache_size: Option<u64>,
    /// Jobs fail with "disk full" while the data dir's file system has less free space.
    #[arg(long, env = "RUNYARD_MIN_FREE", value_name = "SIZE", default_value = "1GiB", value_parser = runyard_agent::cache::parse_size)]
    pub min_free: u64,
    #[command(flatten)]
    pub isolation: IsolationArgs,
}

/// Who jobs run as, and the git credentials their checkouts use (`agent`; `up` takes the same).
#[derive(Debug, Clone, Args)]
pub struct IsolationArgs {
    /// Run every job as this user (its uid and primary group; the agent must be root). Jobs then
    /// share one uid and can reach each other's files. Default, as root: each attempt gets its
    /// own uid from --job-uids, with the group of the `runyard-job` user (created if missing);
    /// not root: jobs run as the agent's user, without isolation.
    #[arg(long, env = "RUNYARD_RUN_AS", value_name = "USER")]
    pub run_as: Option<String>,
    /// The uids jobs get, one per running attempt (agent running as root, no --run-as):
    /// FIRST-LAST, none of them a real user's.
    #[arg(long, env = "RUNYARD_JOB_UIDS", value_name = "FIRST-LAST", default_value = DEFAULT_JOB_UIDS, value_parser = parse_uid_range)]
    pub job_uids: runyard_agent::identity::UidRange,
    /// A git credential, sent only to HOST and only over https (a token file) or ssh (a private
    /// key file): `HOST=FILE` or `HOST:PORT=FILE`, repeatable. The file must be readable by the
    /// agent alone (mode 0600).
    #[arg(long = "git-credential", value_name = "HOST=FILE", value_parser = parse_git_credential)]
    pub git_credentials: Vec<runyard_agent::git_auth::HostCredential>,
    /// More git credentials, comma-separated `HOST=FILE` (added to --git-credential).
    #[arg(long = "git-credentials", env = "RUNYARD_GIT_CREDENTIALS", value_name = "LIST", hide = true, value_parser = parse_git_credential_list)]
    pub git_credential_list: Option<Vec<runyard_agent::git_auth::HostCredential>>,
}

impl IsolationArgs {
    /// Sets these on an agent configuration.
    pub fn apply(&self, config: &mut runyard_agent::Config) {
        config.isolation = runyard_agent::identity::IsolationConfig {
            run_as: self.run_as.clone(),
            job_uids: self.job_uids,
        };
        config.git_credentials = self.git_credentials.clone();
        config
            .git_credentials
            .extend(self.git_credential_list.iter().flatten().cloned());
    }
}

/// `--job-uids` default, as written.
const DEFAULT_JOB_UIDS: &str = "1879048192-1879113727";

fn parse_uid_range(s: &str) -> Result<runyard_agent::identity::UidRange, String> {
    s.parse()
}

fn parse_git_credential(s: &str) -> Result<runyard_agent::git_auth::HostCredential, String> {
    s.parse()
}

fn parse_git_credential_list(
    s: &str,
) -> Result<Vec<runyard_agent::git_auth::HostCredential>, String> {
    runyard_agent::git_auth::parse_list(s)
}

/// `runyard submit`. Flags override the fields of the `-f` file: scalar fields and lists are
/// replaced, `--env` entries are added to (or replace keys of) the file's `env`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Job spec file (YAML, or JSON if it ends in `.json`) with the API's field names. Flags
    /// given replace its fields (lists too); `--env` adds to its `env`.
    #[arg(
        short = 'f',
        long = "file",
        env = "RUNYARD_SUBMIT_FILE",
        value_name = "FILE"
    )]
    pub file: Option<PathBuf>,
    /// Git repository: https://, ssh://, git@host:path, git:// or file:// URL.
    #[arg(long, env = "RUNYARD_SUBMIT_REPO", value_name = "URL")]
    pub repo: Option<String>,
    /// Branch, tag or commit (default: the repository's default branch).
    #[arg(long, env = "RUNYARD_SUBMIT_REVISION", value_name = "REV")]
    pub revision: Option<String>,
    /// Path of the Python script inside the repository.
    #[arg(long, env = "RUNYARD_SUBMIT_SCRIPT", value_name = "PATH")]
    pub script: Option<String>,
    /// An entry point of the repository's MLproject (or a .py/.sh file run as one) instead of
    /// a script; without --script and --entry-point, `main`.
    #[arg(
        short = 'e',
        long,
        env = "RUNYARD_SUBMIT_ENTRY_POINT",
        value_name = "NAME"
    )]
    pub entry_point: Option<String>,
    /// An entry point's parameter, NAME=VALUE (repeatable), checked against the MLproject.
    #[arg(
        short = 'P',
        long = "param",
        value_name = "NAME=VALUE",
        allow_hyphen_values = true
    )]
    pub params: Vec<String>,
    /// Log the job into an MLflow run on this tracking server (http(s)://...); the controller's
    /// --mlflow-tracking-uri is the default.
    #[arg(long, env = "MLFLOW_TRACKING_URI", value_name = "URL")]
    pub mlflow_tracking_uri: Option<String>,
    /// The MLflow experiment of the run, by name (made if missing).
    #[arg(long, env = "MLFLOW_EXPERIMENT_NAME", value_name = "NAME")]
    pub experiment_name: Option<String>,
    /// The MLflow experiment of the run, by id.
    #[arg(long, env = "MLFLOW_EXPERIMENT_ID", value_name = "ID")]
    pub experiment_id: Option<String>,
    /// Log into this existing MLflow run instead of a new one.
    #[arg(long = "mlflow-run-id", value_name = "ID")]
    pub mlflow_run_id: Option<String>,
    /// A pip requirement, e.g. `numpy>=2` (repeatable).
    // Hyphen values (here and in the durations) reach the spec check, which explains them.
    #[arg(
        long = "req",
        env = "RUNYARD_SUBMIT_REQ",
        value_name = "SPEC",
        allow_hyphen_values = true
    )]
    pub requirements: Vec<String>,
    /// A requirements file inside the repository.
    #[arg(long, env = "RUNYARD_SUBMIT_REQUIREMENTS_FILE", value_name = "PATH")]
    pub requirements_file: Option<String>,
    /// An environment variable for the script, KEY=VALUE (repeatable).
    #[arg(long = "env", env = "RUNYARD_SUBMIT_ENV", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// A secret environment variable from a controller-side secret, KEY=SECRET (repeatable;
    /// `runyard secret set SECRET` first). Values themselves go in `-f job.yaml`, never on a
    /// command line.
    #[arg(long = "secret", value_name = "KEY=SECRET")]
    pub secrets: Vec<String>,
    /// Compute: `cpu-small`, `gpu` or `gpu:N`.
    #[arg(long, env = "RUNYARD_SUBMIT_COMPUTE", value_name = "COMPUTE")]
    pub compute: Option<String>,
    /// Display name (default: the script's file stem).
    #[arg(long, env = "RUNYARD_SUBMIT_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// How many times a failing script is run again.
    #[arg(long, env = "RUNYARD_SUBMIT_RETRIES", value_name = "N")]
    pub retries: Option<u32>,
    /// Wall-clock limit of one attempt, e.g. `2h` or `90m` (default: none).
    #[arg(
        long,
        env = "RUNYARD_SUBMIT_TIMEOUT",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub timeout: Option<String>,
    /// Grace between SIGTERM and SIGKILL when the job is stopped, e.g. `10s`.
    #[arg(
        long,
        env = "RUNYARD_SUBMIT_STOP_GRACE",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub stop_grace: Option<String>,
    /// Memory limit of one attempt (`512MiB`, `8GiB`, or bytes): over it the job fails with
    /// `oom`.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Then stream the logs until the job ends (with a progress bar on a terminal, as `logs
    /// -f`); exit 0 if it succeeded, the script's exit code if it failed with one, 1 otherwise.
    #[arg(long, env = "RUNYARD_SUBMIT_FOLLOW")]
    pub follow: bool,
    /// Arguments for the script, after `--`, passed verbatim (never through a shell).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only jobs in this status.
    #[arg(long, env = "RUNYARD_LS_STATUS", value_parser = parse_status, value_name = "STATUS")]
    pub status: Option<JobStatus>,
    /// At most this many jobs (per page with --all).
    #[arg(long, env = "RUNYARD_LS_LIMIT", value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub limit: Option<u32>,
    /// Fetch every page, not only the first.
    #[arg(long, env = "RUNYARD_LS_ALL")]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Job id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Ids of the jobs to delete.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Job id.
    pub id: String,
    /// Keep streaming until the job ends. On a terminal, a progress bar stays below the log
    /// while the job reports training progress (stderr only; piped output is the plain log).
    #[arg(short = 'f', long, env = "RUNYARD_LOGS_FOLLOW")]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Job id.
    pub id: String,
    /// Write the checkpoint to FILE (or into FILE if it is a directory). Default: the
    /// checkpoint's own file name, in the current directory.
    #[arg(
        short = 'o',
        long,
        env = "RUNYARD_DOWNLOAD_OUTPUT",
        value_name = "FILE"
    )]
    pub output: Option<PathBuf>,
    /// Replace FILE if it exists (by default an existing file is never touched).
    #[arg(long, env = "RUNYARD_DOWNLOAD_FORCE")]
    pub force: bool,
}

fn parse_role(s: &str) -> Result<runyard_model::Role, String> {
    s.parse()
}

fn parse_status(s: &str) -> Result<JobStatus, String> {
    s.parse()
}

fn parse_log_size(s: &str) -> Result<u64, String> {
    match runyard_agent::cache::parse_size(s)? {
        0 => Err("must be positive".into()),
        n => Ok(n),
    }
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = runyard_model::spec::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_needs_a_token_source() {
        assert!(Cli::try_parse_from(["runyard", "agent"]).is_err());
        assert!(Cli::try_parse_from(["runyard", "agent", "--token", "t"]).is_ok());
        assert!(
            Cli::try_parse_from(["runyard", "agent", "--token", "t", "--token-file", "f"]).is_err()
        );
    }

    #[test]
    fn ls_checks_status_and_limit() {
        let Command::Ls(ls) =
            Cli::try_parse_from(["runyard", "ls", "--status", "running", "--limit", "5"])
                .unwrap()
                .command
        else {
            panic!("not ls");
        };
        assert_eq!(ls.status, Some(JobStatus::Running));
        assert_eq!(ls.limit, Some(5));
        assert!(Cli::try_parse_from(["runyard", "ls", "--status", "done"]).is_err());
        assert!(Cli::try_parse_from(["runyard", "ls", "--limit", "0"]).is_err());
    }

    #[test]
    fn isolation_flags_parse_and_bad_ones_are_refused() {
        let Command::Agent(a) = Cli::try_parse_from([
            "runyard",
            "agent",
            "--token",
            "t",
            "--run-as",
            "nobody",
            "--job-uids",
            "200000-200099",
            "--git-credential",
            "github.com=/etc/runyard/gh.token",
            "--git-credential",
            "git.internal:8443=/etc/runyard/key",
        ])
        .unwrap()
        .command
        else {
            panic!("not agent");
        };
        let mut config = crate::commands::agent::test_config();
        a.isolation.apply(&mut config);
        assert_eq!(config.isolation.run_as.as_deref(), Some("nobody"));
        assert_eq!(config.isolation.job_uids.to_string(), "200000-200099");
        let hosts: Vec<_> = config
            .git_credentials
            .iter()
            .map(|c| (c.host.as_str(), c.port))
            .collect();
        assert_eq!(hosts, [("github.com", None), ("git.internal", Some(8443))]);
        let Command::Up(u) = Cli::try_parse_from(["runyard", "up"]).unwrap().command else {
            panic!("not up");
        };
        assert_eq!(
            u.isolation.job_uids,
            runyard_agent::identity::DEFAULT_JOB_UIDS,
            "the default range, as documented"
        );
        for bad in [
            ["--job-uids", "5-1"],
            ["--job-uids", "0-100"],
            ["--git-credential", "github.com"],
            ["--git-credential", "https://github.com=/t"],
        ] {
            let mut argv = vec!["runyard", "agent", "--token", "t"];
            argv.extend(bad);
            assert!(Cli::try_parse_from(&argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn download_takes_an_output_and_force() {
        let Command::Download(d) =
            Cli::try_parse_from(["runyard", "download", "01J", "-o", "out.ckpt", "--force"])
                .unwrap()
                .command
        else {
            panic!("not download");
        };
        assert_eq!(
            (d.id.as_str(), d.output, d.force),
            ("01J", Some(PathBuf::from("out.ckpt")), true)
        );
        assert!(Cli::try_parse_from(["runyard", "download"]).is_err());
    }

    #[test]
    fn retention_and_log_size_are_human() {
        for cmd in ["controller", "up"] {
            let cli = Cli::try_parse_from([
                "runyard",
                cmd,
                "--retention",
                "30d",
                "--max-log-size",
                "512MiB",
            ])
            .unwrap();
            let h = match cli.command {
                Command::Controller(c) => c.history,
                Command::Up(u) => u.history,
                _ => panic!("not {cmd}"),
            };
            assert_eq!(
                h.retention,
                Some(std::time::Duration::from_secs(30 * 86400))
            );
            assert_eq!(h.max_log_size, 512 << 20);
        }
        let Command::Controller(c) = Cli::try_parse_from(["runyard", "controller"])
            .unwrap()
            .command
        else {
            panic!("not controller");
        };
        assert_eq!(c.history.retention, None, "kept forever by default");
        assert_eq!(
            c.history.max_log_size,
            runyard_controller::DEFAULT_MAX_LOG_SIZE
        );
        assert!(Cli::try_parse_from(["runyard", "up", "--max-log-size", "0"]).is_err());
        assert!(Cli::try_parse_from(["runyard", "up", "--retention", "0s"]).is_err());
        assert!(
            Cli::try_parse_from(["runyard", "rm"]).is_err(),
            "rm needs an id"
        );
    }

    #[test]
    fn agent_ttl_is_a_human_duration() {
        let Command::Controller(c) =
            Cli::try_parse_from(["runyard", "controller", "--agent-ttl", "2m"])
                .unwrap()
                .command
        else {
            panic!("not controller");
        };
        assert_eq!(c.agent_ttl, Some(std::time::Duration::from_secs(120)));
        assert!(Cli::try_parse_from(["runyard", "controller", "--agent-ttl", "0s"]).is_err());
        assert!(Cli::try_parse_from(["runyard", "controller", "--agent-ttl", "soon"]).is_err());
    }
}
