//! One attempt of a job as the API shows it (`GET /api/v1/jobs/{id}/placements`): where it ran
//! and how it ended. Built from the stored `runyard_model::Placement` by `From`, so the record
//! can change without changing the API.

use std::collections::BTreeMap;

use runyard_model::{Best, Environment, FailureKind, JobStatus, Placement, Progress, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One placement of a job on an agent (an attempt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementView {
    /// The attempt's number, from 1.
    pub attempt: u32,
    pub agent: String,
    /// GPU indices it held on the agent.
    pub gpus: Vec<u32>,
    /// The port the agent gave the attempt (`$PORT`) when its spec asks for one.
    #[serde(default)]
    #[schema(required)]
    pub port: Option<u16>,
    /// The attempt's own status: `scheduled`, `preparing`, `running`, `stopping`, then
    /// `succeeded`, `failed`, `stopped` or `lost`. A failed attempt with retries left leaves
    /// the job `pending` while this stays `failed`.
    pub status: JobStatus,
    /// The resolved revision.
    #[schema(required)]
    pub commit: Option<String>,
    #[schema(required)]
    pub exit_code: Option<i32>,
    /// Why the attempt ended as it did.
    #[schema(required)]
    pub reason: Option<String>,
    #[schema(required)]
    pub failure: Option<FailureKind>,
    pub scheduled_at: Timestamp,
    #[schema(required)]
    pub started_at: Option<Timestamp>,
    #[schema(required)]
    pub finished_at: Option<Timestamp>,
    pub updated_at: Timestamp,
    #[schema(required)]
    pub progress: Option<Progress>,
    /// Latest value of every metric the attempt reported.
    pub metrics: BTreeMap<String, f64>,
    #[schema(required)]
    pub best: Option<Best>,
    #[schema(required)]
    pub environment: Option<Environment>,
}

impl From<&Placement> for PlacementView {
    fn from(p: &Placement) -> PlacementView {
        PlacementView {
            attempt: p.attempt,
            agent: p.agent.clone(),
            gpus: p.gpus.clone(),
            port: p.port,
            status: p.status,
            commit: p.commit.clone(),
            exit_code: p.exit_code,
            reason: p.reason.clone(),
            failure: p.failure,
            scheduled_at: p.scheduled_at,
            started_at: p.started_at,
            finished_at: p.finished_at,
            updated_at: p.updated_at,
            progress: p.progress.clone(),
            metrics: p.metrics.clone(),
            best: p.best.clone(),
            environment: p.environment.clone(),
        }
    }
}

/// Every placement of a job, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementList {
    pub placements: Vec<PlacementView>,
}
