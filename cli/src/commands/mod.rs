//! The subcommands, one module per group, and the one error type they share.
//!
//! - `serve`: `up` and `controller` (bind listeners, run until a signal).
//! - `agent`: `agent`, its `--compute` list and host facts.
//! - `submit`: flags and `-f` file to a job spec, submit, optionally follow.
//! - `jobs`: `ls`, `status`, `logs`, `stop`, `rm`, `agents`.
//! - `download`: `download` (the best checkpoint, verified, to a local file).
//! - `access`: `token create|ls|revoke`, `secret set|ls|rm` and `whoami`.
//!
//! Invariant: every command returns the process exit code or a `CommandError` whose message is
//! one line; `main` prints it as `error: <message>`.

use std::path::PathBuf;

use runyard_model::ValidationError;

use crate::args::{ClientArgs, Command};
use crate::client::{ApiClient, ClientError, resolve_token};
use runyard_controller::tls::{CA_CERT_FILE, TLS_DIR};

pub mod access;
pub mod agent;
pub mod download;
pub mod jobs;
pub mod serve;
pub mod services;
pub mod submit;

/// Data dir of `up` and `controller` under `$HOME`.
pub const DEFAULT_DATA_DIR_NAME: &str = ".runyard";

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The job spec is invalid (checked before any request).
    #[error("{0}")]
    Spec(ValidationError),
    #[error("cannot read job file {path}: {cause}")]
    ReadSpecFile { path: PathBuf, cause: String },
    #[error("job file {path}: {cause}")]
    ParseSpecFile { path: PathBuf, cause: String },
    #[error("--env `{0}`: expected KEY=VALUE")]
    EnvPair(String),
    #[error("-P `{0}`: expected NAME=VALUE")]
    ParamPair(String),
    #[error("cannot snapshot the local directory: {0}")]
    Snapshot(String),
    #[error("no data dir: give --data-dir or set RUNYARD_DATA_DIR (HOME is not set)")]
    NoDataDir,
    #[error("cannot listen on {addr} ({what}): {cause}")]
    Bind {
        addr: String,
        what: &'static str,
        cause: String,
    },
    #[error("--compute: {0}")]
    ComputeList(String),
    #[error("no agent token: give --token-file (or --token) with the controller's agent token")]
    NoAgentToken,
    #[error("cannot read the agent token file {path}: {cause}")]
    TokenFile { path: PathBuf, cause: String },
    #[error(
        "cannot use the CA file {path}: {cause} (give the controller's <data-dir>/tls/ca.crt with --ca or RUNYARD_CA)"
    )]
    CaFile { path: PathBuf, cause: String },
    #[error("cannot prepare the tokens in {path}: {cause}")]
    Tokens { path: PathBuf, cause: String },
    #[error("controller: {0}")]
    Controller(#[from] runyard_controller::ControllerError),
    #[error("agent: {0}")]
    Agent(#[from] runyard_agent::AgentError),
    #[error("the {0} task panicked")]
    Panicked(&'static str),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("writing to stdout failed: {0}")]
    Stdout(std::io::Error),
    #[error("the controller returned the cursor `{0}` twice; stopped paging")]
    CursorLoop(String),
    #[error("lost the log stream of job {id} and could not reconnect: {cause}")]
    LogStream { id: String, cause: String },
    #[error("{0} exists: pass --force to replace it, or -o to write elsewhere")]
    Exists(PathBuf),
    #[error("cannot save the checkpoint to {path}: {cause}")]
    Save { path: PathBuf, cause: String },
    #[error(
        "checksum mismatch: the controller announced sha256 {expected}, the bytes received hash to {actual}; nothing was saved"
    )]
    Checksum { expected: String, actual: String },
    #[error("the download ended after {received} of {expected} bytes; nothing was saved (retry)")]
    Truncated { expected: u64, received: u64 },
    /// Ctrl-C: the command cleaned up and stops with exit code 130, without a message.
    #[error("interrupted")]
    Interrupted,
}

impl CommandError {
    /// Stdout was closed by the reader (e.g. `| head`): not worth an error message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CommandError::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The user pressed Ctrl-C: exit like a process killed by SIGINT, with no message.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, CommandError::Interrupted)
    }
}

/// Runs one subcommand; returns the exit code.
pub async fn run(command: Command) -> Result<u8, CommandError> {
    match command {
        Command::Up(a) => serve::up(a).await,
        Command::Controller(a) => serve::controller(a).await,
        Command::Agent(a) => agent::agent(a).await,
        Command::Submit(a) => submit::submit(a).await,
        Command::Ls(a) => jobs::ls(a).await,
        Command::Status(a) => jobs::status(a).await,
        Command::Attempts(a) => jobs::attempts(a).await,
        Command::Logs(a) => jobs::logs(a).await,
        Command::Stop(a) => jobs::stop(a).await,
        Command::Rm(a) => jobs::rm(a).await,
        Command::Agents(a) => jobs::agents(a).await,
        Command::Download(a) => download::download(a).await,
        Command::Token(t) => access::token(t).await,
        Command::Secret(s) => access::secret(s).await,
        Command::Whoami(a) => access::whoami(a).await,
        Command::Serve(a) => services::serve(a).await,
        Command::Services(a) => services::list(a).await,
        Command::Service(c) => services::service(c).await,
    }
}

/// `up`, `controller` and `agent` serve until a signal; the rest are short-lived clients.
pub fn is_server(command: &Command) -> bool {
    matches!(
        command,
        Command::Up(_) | Command::Controller(_) | Command::Agent(_)
    )
}

/// `--data-dir` if given, else `$RUNYARD_DATA_DIR`, else `$HOME/.runyard`.
pub fn data_dir_or_default(given: Option<PathBuf>) -> Result<PathBuf, CommandError> {
    if let Some(d) = given {
        return Ok(d);
    }
    if let Some(d) = std::env::var_os("RUNYARD_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(DEFAULT_DATA_DIR_NAME))
        .ok_or(CommandError::NoDataDir)
}

/// The API client for `args`. Without a token, a controller on this machine is tried with the
/// admin token of the default data dir (never sent to another host); without `--ca`, it is
/// trusted with the default data dir's CA (`tls/ca.crt`) besides the system's roots.
pub fn client_for(args: &ClientArgs) -> Result<ApiClient, CommandError> {
    let local = reqwest::Url::parse(&args.controller)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| is_loopback_host(&h));
    let data_dir = if local {
        data_dir_or_default(None).ok()
    } else {
        None
    };
    let token = resolve_token(args.token.clone(), data_dir.as_deref());
    let ca_file = match &args.ca {
        Some(path) => Some(path.clone()),
        None => data_dir
            .map(|d| d.join(TLS_DIR).join(CA_CERT_FILE))
            .filter(|p| p.is_file()),
    };
    let ca = match &ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| CommandError::CaFile {
            path: path.clone(),
            cause: e.to_string(),
        })?),
        None => None,
    };
    ApiClient::with_ca(&args.controller, token, ca.as_deref()).map_err(|e| match (e, ca_file) {
        (ClientError::InvalidCa { cause }, Some(path)) => CommandError::CaFile { path, cause },
        (e, _) => e.into(),
    })
}

/// `localhost` or a loopback IP (IPv6 in URL brackets or not).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.3.2.1", "[::1]", "::1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "example.com",
            "10.0.0.1",
            "[2001:db8::1]",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
