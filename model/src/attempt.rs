//! What an agent says about one attempt it runs: the state the agent keeps for it and sends,
//! and what the controller's state machine reads (`reconcile::on_status`).
//!
//! ```text
//!  preparing ──▶ running ──▶ succeeded | failed | stopped
//!      └─────────────────────▶ failed | stopped
//! ```

use crate::job::FailureKind;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttemptState {
    #[default]
    Preparing,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

impl AttemptState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            AttemptState::Succeeded | AttemptState::Failed | AttemptState::Stopped
        )
    }
}

/// An attempt's status as its agent reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttemptStatus {
    pub attempt: u32,
    pub state: AttemptState,
    /// Set once the process has exited.
    pub exit_code: Option<i32>,
    /// Why it failed or stopped.
    pub reason: String,
    /// The resolved commit, once known.
    pub commit: Option<String>,
    pub failure: Option<FailureKind>,
    /// Lines of the attempt's log and report streams; on a terminal state, the controller shows
    /// the end only once it has stored this many.
    pub log_lines: u64,
    pub report_lines: u64,
    /// The port the agent gave the attempt (`$PORT`), when its spec asks for one.
    pub port: Option<u16>,
}

impl AttemptStatus {
    /// A new attempt, preparing.
    pub fn preparing(attempt: u32) -> AttemptStatus {
        AttemptStatus {
            attempt,
            ..AttemptStatus::default()
        }
    }
}
