//! One placement of a job on an agent: attempt `attempt`, with what the agent reported of it.
//! Stored at `placements/ID/ATTEMPT`; every attempt keeps its own record, so the history of a job
//! is its placements.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::{FailureKind, JobStatus, first_schema_version};
use crate::report::{Best, Environment, Progress};
use crate::time::Timestamp;

/// The layout of placement records this version writes.
pub const PLACEMENT_SCHEMA_VERSION: u32 = 1;

/// One attempt of a job on one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    /// The job's id.
    pub job: String,
    /// The attempt's number, from 1.
    pub attempt: u32,
    pub agent: String,
    /// GPU indices held on the agent.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// The attempt's status: `scheduled`, `preparing`, `running`, `stopping`, then one of
    /// `succeeded`, `failed`, `stopped`, `lost`. The job's status (in its intent) may differ:
    /// a failed attempt with retries left leaves the job `pending`.
    pub status: JobStatus,
    /// The resolved revision.
    pub commit: Option<String>,
    pub exit_code: Option<i32>,
    /// Why the attempt ended as it did.
    pub reason: Option<String>,
    pub failure: Option<FailureKind>,
    pub scheduled_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub updated_at: Timestamp,
    /// Training progress, when the script reports it.
    #[serde(default)]
    pub progress: Option<Progress>,
    /// Latest value of every reported metric.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The best checkpoint (first `ModelCheckpoint` with a monitor), uploaded at the end.
    #[serde(default)]
    pub best: Option<Best>,
    /// Which checkpoint callback `best` follows.
    #[serde(default)]
    pub best_callback: Option<u32>,
    /// The environment the attempt runs with (pinned packages, build time).
    #[serde(default)]
    pub environment: Option<Environment>,
    /// The MLflow project entry point the attempt runs: parameters with defaults filled, the
    /// environment file used, the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<crate::mlproject::ProjectRun>,
    /// Bytes of the attempt's report stream folded into `progress`, `metrics`, `best` and
    /// `environment` so far.
    #[serde(default)]
    pub report_offset: u64,
    /// The port the agent gave the attempt (`$PORT`), once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Placement {
    /// A new attempt, scheduled on `agent`.
    pub fn new(job: &str, attempt: u32, agent: &str, gpus: Vec<u32>, now: Timestamp) -> Placement {
        Placement {
            schema_version: PLACEMENT_SCHEMA_VERSION,
            job: job.to_string(),
            attempt,
            agent: agent.to_string(),
            gpus,
            status: JobStatus::Scheduled,
            commit: None,
            exit_code: None,
            reason: None,
            failure: None,
            scheduled_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            progress: None,
            metrics: BTreeMap::new(),
            best: None,
            best_callback: None,
            environment: None,
            project: None,
            report_offset: 0,
            port: None,
        }
    }

    /// The attempt is over: `status`, with why.
    pub fn end(
        &mut self,
        status: JobStatus,
        reason: Option<String>,
        failure: Option<FailureKind>,
        now: Timestamp,
    ) {
        self.status = status;
        self.reason = reason;
        self.failure = failure;
        self.finished_at = Some(now);
    }
}
