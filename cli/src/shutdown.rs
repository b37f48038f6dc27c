//! Process-wide shutdown for the server commands: SIGINT or SIGTERM cancels the root
//! `CancellationToken`; a second signal exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit status after a forced (second-signal) exit: 128 + SIGINT, as shells report it.
const FORCED_EXIT_CODE: i32 = 130;

/// Installs the handlers and returns the root token they cancel.
pub fn root_token() -> std::io::Result<CancellationToken> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let root = CancellationToken::new();
    let token = root.clone();
    // Detached on purpose: it lives as long as the process and its only failure mode is exit.
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        info!("shutting down; a second signal exits at once");
        token.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        warn!("second signal; exiting now");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_signal_cancels_the_root_token() {
        let root = root_token().unwrap();
        assert!(!root.is_cancelled());
        // Only one signal: a second one would end the test process, by design.
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), root.cancelled())
            .await
            .expect("SIGTERM did not cancel the root token");
    }
}
