//! A job's intent: what the user asked for and where the job stands as a whole. Stored at
//! `jobs/ID`, apart from its placements (`placement.rs`), as Nomad keeps a job apart from its
//! allocations: a report or a status of one attempt rewrites the placement, not the spec.

use serde::{Deserialize, Serialize};

use crate::job::{Desired, FailureKind, JobStatus, first_schema_version};
use crate::spec::JobSpec;
use crate::time::Timestamp;

/// The layout of intent records this version writes. Version 1 records are the flat job records
/// of earlier versions (intent and current placement in one); they load through
/// [`crate::JobState::from_legacy`]. Field names are those of version 1, so a rollback reads an
/// intent as a job that has not reported yet.
pub const INTENT_SCHEMA_VERSION: u32 = 2;

/// What the user wants of one job, and the job's state as a whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// Layout version (`INTENT_SCHEMA_VERSION` when written by this version).
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub id: String,
    pub name: String,
    #[serde(deserialize_with = "crate::spec::known_fields")]
    pub spec: JobSpec,
    /// The job's status. While an attempt is on an agent it follows that placement's status.
    pub status: JobStatus,
    #[serde(default)]
    pub desired: Desired,
    /// The name of the token that submitted it (`None`: submitted before owners were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Number of the latest placement; 0 until first placed.
    pub attempt: u32,
    /// Why the job is in its state: a failure, a stop, or why it still waits.
    pub reason: Option<String>,
    pub failure: Option<FailureKind>,
    /// Attempts lost with their agent so far.
    #[serde(default)]
    pub lost_count: u32,
    /// Script failures so far (compared with `spec.retries`).
    #[serde(default)]
    pub failures: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When the job finished (succeeded, failed for good, or stopped).
    pub finished_at: Option<Timestamp>,
    /// The service this job is a replica of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<crate::service::ReplicaOf>,
    /// The MLflow run the job logs into, once made (before the job is placed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<MlflowRun>,
}

/// A job's MLflow run, and how far Runyard has brought it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlflowRun {
    pub tracking_uri: String,
    pub run_id: String,
    pub experiment_id: String,
    /// The attempt whose parameters were logged to the run (0: none yet).
    #[serde(default)]
    pub params_of: u32,
    /// The run was ended with the job's outcome.
    #[serde(default)]
    pub ended: bool,
}

impl Intent {
    pub fn new(id: String, spec: JobSpec, now: Timestamp) -> Intent {
        Intent {
            schema_version: INTENT_SCHEMA_VERSION,
            id,
            name: spec.name.clone(),
            spec,
            status: JobStatus::Pending,
            desired: Desired::Run,
            owner: None,
            attempt: 0,
            reason: None,
            failure: None,
            lost_count: 0,
            failures: 0,
            created_at: now,
            updated_at: now,
            finished_at: None,
            service: None,
            mlflow: None,
        }
    }

    /// The job is over: `status`, with why.
    pub fn finish(
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
