//! `runyard up` and `runyard controller`: bind the listeners here (so tests and `up` can use port
//! 0 and print the real address), then run until SIGINT/SIGTERM.
//!
//! `up` shutdown order: the agent stops first (its jobs end while the controller can still record
//! them), then the controller. If either stops by itself, the other is stopped too and the first
//! one's error is returned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use runyard_controller::Tokens;
use runyard_controller::tokens::{ADMIN_TOKEN_FILE, AGENT_TOKEN_FILE};

use super::{CommandError, agent, data_dir_or_default};
use crate::args::{ControllerArgs, UpArgs};
use crate::shutdown;

/// Runs a controller and one local agent in this process.
pub async fn up(args: UpArgs) -> Result<u8, CommandError> {
    // Before anything a user may interrupt (the banner invites it).
    let root = shutdown::root_token().map_err(CommandError::Signals)?;
    let data_dir = data_dir_or_default(args.data_dir)?;
    let tokens = tokens(&data_dir).await?;
    // The local agent's jobs pass through to `<data dir>/agent`: traverse only, no listing; the
    // controller keeps its own entries private (tokens 0600, logs and store 0700/0600).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o711)).map_err(
            |e| CommandError::Tokens {
                path: data_dir.clone(),
                cause: format!("cannot make the data dir traversable (0711): {e}"),
            },
        )?;
    }
    let http = bind(&args.http, "HTTP API; choose another with --http").await?;
    let grpc = bind(&args.grpc, "agent gRPC; choose another with --grpc").await?;
    let http_url = url_of(&http)?;
    let grpc_url = url_of(&grpc)?;
    let mut agent_config =
        agent::local_config(grpc_url.clone(), tokens.agent.clone(), &data_dir).await;
    args.isolation.apply(&mut agent_config);
    let banner = format!(
        "Runyard is up: controller and local agent `{agent}`.\n\
         \x20 web UI, API: {http_url}\n\
         \x20 admin token: {admin}\n\
         \x20 data dir:    {dir}\n\
         Point the CLI at it from any shell:\n\
         export RUNYARD_CONTROLLER={http_url}\n\
         export RUNYARD_TOKEN={admin}\n",
        agent = agent_config.name,
        admin = tokens.admin,
        dir = data_dir.display(),
    );
    crate::output::write_stdout(banner.as_bytes()).map_err(CommandError::Stdout)?;

    let mut config = runyard_controller::Config::new(&data_dir);
    config.store = crate::args::DEFAULT_STORE.to_string();
    args.history.apply(&mut config);
    info!(http = %http_url, grpc = %grpc_url, data_dir = %data_dir.display(), "controller starting");
    let controller_cancel = CancellationToken::new();
    let agent_cancel = root.child_token();
    let mut controller = tokio::spawn(runyard_controller::run(
        config,
        http,
        grpc,
        controller_cancel.clone(),
    ));
    let mut agent = tokio::spawn(runyard_agent::run(agent_config, agent_cancel.clone()));

    let outcome = tokio::select! {
        r = &mut controller => {
            agent_cancel.cancel();
            let a = agent.await;
            joined("controller", r).and(joined("agent", a))
        }
        r = &mut agent => {
            controller_cancel.cancel();
            let c = controller.await;
            joined("agent", r).and(joined("controller", c))
        }
        _ = root.cancelled() => {
            // The agent's token is a child of root: it is stopping already.
            let a = agent.await;
            controller_cancel.cancel();
            let c = controller.await;
            joined("agent", a).and(joined("controller", c))
        }
    };
    outcome?;
    info!("runyard stopped");
    Ok(0)
}

/// Runs the controller alone.
pub async fn controller(args: ControllerArgs) -> Result<u8, CommandError> {
    let root = shutdown::root_token().map_err(CommandError::Signals)?;
    let data_dir = data_dir_or_default(args.data_dir)?;
    tokens(&data_dir).await?;
    let http = bind(&args.http, "HTTP API; choose another with --http").await?;
    let grpc = bind(&args.grpc, "agent gRPC; choose another with --grpc").await?;
    let mut config = runyard_controller::Config::new(&data_dir);
    config.store = args.store;
    if let Some(ttl) = args.agent_ttl {
        config.agent_ttl = ttl;
    }
    args.history.apply(&mut config);
    info!(
        http = %url_of(&http)?,
        grpc = %url_of(&grpc)?,
        store = %config.store,
        retention = ?config.retention,
        max_log_size = config.max_log_size,
        data_dir = %data_dir.display(),
        admin_token_file = %data_dir.join(ADMIN_TOKEN_FILE).display(),
        agent_token_file = %data_dir.join(AGENT_TOKEN_FILE).display(),
        "controller starting"
    );
    runyard_controller::run(config, http, grpc, root).await?;
    info!("controller stopped");
    Ok(0)
}

/// Reads or creates the tokens (file writes and fsync: off the async threads).
async fn tokens(data_dir: &Path) -> Result<Tokens, CommandError> {
    let dir = data_dir.to_path_buf();
    let err = |cause: String| CommandError::Tokens {
        path: data_dir.to_path_buf(),
        cause,
    };
    tokio::task::spawn_blocking(move || runyard_controller::ensure_tokens(&dir))
        .await
        .map_err(|_| CommandError::Panicked("token setup"))?
        .map_err(|e| err(e.to_string()))
}

async fn bind(addr: &str, what: &'static str) -> Result<TcpListener, CommandError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CommandError::Bind {
            addr: addr.to_string(),
            what,
            cause: if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("{e}; is another runyard running?")
            } else {
                e.to_string()
            },
        })
}

/// `http://` URL a local client can dial: a wildcard bind is reached through loopback.
fn url_of(listener: &TcpListener) -> Result<String, CommandError> {
    let addr = listener.local_addr().map_err(|e| CommandError::Bind {
        addr: "(bound)".into(),
        what: "local address",
        cause: e.to_string(),
    })?;
    Ok(dial_url(addr))
}

fn dial_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

fn joined<E>(
    what: &'static str,
    r: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), CommandError>
where
    CommandError: From<E>,
{
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(CommandError::Panicked(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_are_dialled_on_loopback() {
        assert_eq!(
            dial_url("0.0.0.0:7900".parse().unwrap()),
            "http://127.0.0.1:7900"
        );
        assert_eq!(dial_url("[::]:7901".parse().unwrap()), "http://[::1]:7901");
        assert_eq!(
            dial_url("10.1.2.3:80".parse().unwrap()),
            "http://10.1.2.3:80"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr, "HTTP API; choose another with --http")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("cannot listen on {addr} (HTTP API")),
            "{e}"
        );
        assert!(e.contains("another runyard"), "{e}");
    }
}
