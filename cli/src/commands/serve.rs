//! `runyard up` and `runyard controller`: bind the listeners here (so tests and `up` can use port
//! 0 and print the real address), then run until SIGINT/SIGTERM.
//!
//! TLS: `controller` serves TLS by default (the data dir's CA, or `--tls-cert/--tls-key`) and
//! plain only with `--no-tls`, which it warns about; `up` is plain on loopback unless `--tls`,
//! and its banner says which.
//!
//! `up` shutdown order: the agent stops first (its jobs end while the controller can still record
//! them), then the controller. If either stops by itself, the other is stopped too and the first
//! one's error is returned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use runyard_controller::tokens::{ADMIN_TOKEN_FILE, AGENT_TOKEN_FILE};
use runyard_controller::{TlsSetup, Tokens};

use super::{CommandError, agent, data_dir_or_default};
use crate::args::{ControllerArgs, UpArgs};
use crate::shutdown;

/// Runs a controller and one local agent in this process.
pub async fn up(args: UpArgs) -> Result<u8, CommandError> {
    // Before anything a user may interrupt (the banner invites it).
    let root = shutdown::root_token().map_err(CommandError::Signals)?;
    let data_dir = data_dir_or_default(args.data_dir)?;
    let existed = data_dir.exists();
    refuse_if_in_use(&data_dir)?;
    let tokens = tokens(&data_dir).await?;
    // The local agent's jobs pass through to `<data dir>/agent`: traverse only, no listing; the
    // controller keeps its own entries private (tokens 0600, logs and store 0700/0600). A data
    // dir made here, or one an earlier version made (ours, exactly 0700), becomes 0711; any
    // other existing directory keeps its mode (a shared 1777 one is traversable already).
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&data_dir).map_err(|e| CommandError::Tokens {
            path: data_dir.clone(),
            cause: e.to_string(),
        })?;
        let ours_private =
            meta.mode() & 0o7777 == 0o700 && meta.uid() == nix::unistd::Uid::effective().as_raw();
        if !existed || ours_private {
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o711)).map_err(
                |e| CommandError::Tokens {
                    path: data_dir.clone(),
                    cause: format!("cannot make the data dir traversable (0711): {e}"),
                },
            )?;
        }
    }
    let http = bind(&args.http, "HTTP API; choose another with --http").await?;
    let grpc = bind(&args.grpc, "agent gRPC; choose another with --grpc").await?;
    let mut config = runyard_controller::Config::new(&data_dir);
    config.store = crate::args::DEFAULT_STORE.to_string();
    config.tls = if args.tls {
        TlsSetup::Managed {
            advertise: runyard_controller::tls::default_names(),
        }
    } else {
        TlsSetup::Plain
    };
    args.history.apply(&mut config);
    args.services.apply(&mut config);
    args.mlflow.apply(&mut config);
    let (server_tls, join_token) = runyard_controller::prepare_tls(&config).await?;
    let tls = server_tls.is_some();
    let http_url = url_of(&http, tls)?;
    let grpc_url = url_of(&grpc, tls)?;
    let mut agent_config =
        agent::local_config(grpc_url.clone(), join_token.to_string(), &data_dir).await;
    args.isolation.apply(&mut agent_config);
    let security = match &server_tls {
        Some(t) => format!(
            "\x20 TLS:         CA {} (fingerprint {})\n",
            t.ca_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            t.fingerprint.map(|f| f.to_string()).unwrap_or_default()
        ),
        None if is_loopback(&http) && is_loopback(&grpc) => {
            "\x20 TLS:         off: plain HTTP on loopback (`runyard up --tls` for HTTPS)\n".into()
        }
        None => "\x20 TLS:         off: plain HTTP on a network address: tokens and job data \
                 travel unencrypted; use --tls\n"
            .into(),
    };
    let ca_export = match server_tls.as_ref().and_then(|t| t.ca_file.as_deref()) {
        // Absolute: the line is pasted into shells in other directories.
        Some(ca) => format!(
            "export RUNYARD_CA={}\n",
            std::fs::canonicalize(ca)
                .unwrap_or(ca.to_path_buf())
                .display()
        ),
        None => String::new(),
    };
    let banner = format!(
        "Runyard is up: controller and local agent `{agent}`.\n\
         \x20 web UI, API: {http_url}\n\
         \x20 admin token: {admin}\n\
         \x20 data dir:    {dir}\n\
         {security}\
         Point the CLI at it from any shell:\n\
         export RUNYARD_CONTROLLER={http_url}\n\
         {ca_export}\
         export RUNYARD_TOKEN={admin}\n",
        agent = agent_config.name,
        admin = tokens.admin,
        dir = data_dir.display(),
    );
    crate::output::write_stdout(banner.as_bytes()).map_err(CommandError::Stdout)?;

    info!(http = %http_url, grpc = %grpc_url, tls, data_dir = %data_dir.display(), "controller starting");
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
    refuse_if_in_use(&data_dir)?;
    tokens(&data_dir).await?;
    let http = bind(&args.http, "HTTP API; choose another with --http").await?;
    let grpc = bind(&args.grpc, "agent gRPC; choose another with --grpc").await?;
    let mut config = runyard_controller::Config::new(&data_dir);
    config.store = args.store;
    if let Some(ttl) = args.agent_ttl {
        config.agent_ttl = ttl;
    }
    config.tls = match (args.no_tls, args.tls_cert, args.tls_key) {
        (true, _, _) => TlsSetup::Plain,
        (false, Some(cert), Some(key)) => TlsSetup::Provided { cert, key },
        _ if !args.advertise.is_empty() => TlsSetup::Managed {
            advertise: args.advertise,
        },
        _ => TlsSetup::Managed {
            advertise: runyard_controller::tls::default_names(),
        },
    };
    args.history.apply(&mut config);
    args.services.apply(&mut config);
    args.mlflow.apply(&mut config);
    let (server_tls, join_token) = runyard_controller::prepare_tls(&config).await?;
    let tls = server_tls.is_some();
    if !tls {
        warn!(
            "TLS is off (--no-tls): serving plain HTTP and gRPC; the admin token, agent tokens \
             and job data travel unencrypted. Use it only behind a TLS proxy or on a trusted network"
        );
    }
    info!(
        http = %url_of(&http, tls)?,
        grpc = %url_of(&grpc, tls)?,
        store = %config.store,
        retention = ?config.retention,
        max_log_size = config.max_log_size,
        data_dir = %data_dir.display(),
        tls,
        ca_file = server_tls.as_ref().and_then(|t| t.ca_file.as_deref()).map(|p| p.display().to_string()),
        ca_fingerprint = join_token.ca.map(|f| f.to_string()),
        names = ?server_tls.as_ref().map(|t| &t.names),
        admin_token_file = %data_dir.join(ADMIN_TOKEN_FILE).display(),
        agent_token_file = %data_dir.join(AGENT_TOKEN_FILE).display(),
        "controller starting"
    );
    runyard_controller::run(config, http, grpc, root).await?;
    info!("controller stopped");
    Ok(0)
}

/// Fails at once, before any file is written or anything printed, when another controller holds
/// the data dir (`run` takes the lock for good; this only looks).
fn refuse_if_in_use(data_dir: &Path) -> Result<(), CommandError> {
    runyard_controller::lock_data_dir(data_dir)?;
    Ok(())
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

/// Whether the listener is bound to a loopback address.
fn is_loopback(listener: &TcpListener) -> bool {
    listener.local_addr().is_ok_and(|a| a.ip().is_loopback())
}

/// `http://` (or `https://`) URL a local client can dial: a wildcard bind is reached through
/// loopback.
fn url_of(listener: &TcpListener, tls: bool) -> Result<String, CommandError> {
    let addr = listener.local_addr().map_err(|e| CommandError::Bind {
        addr: "(bound)".into(),
        what: "local address",
        cause: e.to_string(),
    })?;
    let url = dial_url(addr);
    Ok(if tls {
        url.replacen("http://", "https://", 1)
    } else {
        url
    })
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
