//! A job as the API shows it (`GET /api/v1/jobs/{id}`, the list, `job` events), and one page of
//! the job list.
//!
//! `JobView` has today's JSON field for field; it is built from the stored `runyard_model::Job`
//! by `From<&Job>`, so the stored record (its `schema_version`, future fields) can change without
//! changing what clients see.

use std::collections::BTreeMap;

use runyard_model::{
    Best, Desired, Environment, FailureKind, Job, JobSpec, JobStatus, Progress, Timestamp,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A job: its spec, where it stands, and what its current attempt reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// ULID, lowercase; ids sort by creation time.
    pub id: String,
    pub name: String,
    /// The spec as submitted, normalized.
    #[serde(deserialize_with = "runyard_model::spec::known_fields")]
    pub spec: JobSpec,
    pub status: JobStatus,
    /// What users want of the job.
    #[serde(default)]
    pub desired: Desired,
    /// The name of the token that submitted it; null for jobs submitted before owners were
    /// kept.
    #[serde(default)]
    #[schema(required)]
    pub owner: Option<String>,
    /// Number of the current attempt; 0 until first placed.
    pub attempt: u32,
    /// Agent holding the current attempt.
    #[schema(required)]
    pub agent: Option<String>,
    /// GPU indices of the current attempt on its agent.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// The port the agent gave the current attempt (`$PORT`) when its spec asks for one, once
    /// it runs.
    #[serde(default)]
    #[schema(required)]
    pub port: Option<u16>,
    /// The resolved revision.
    #[schema(required)]
    pub commit: Option<String>,
    #[schema(required)]
    pub exit_code: Option<i32>,
    /// Why the job is in its state: a failure, a stop, or why it still waits.
    #[schema(required)]
    pub reason: Option<String>,
    #[schema(required)]
    pub failure: Option<FailureKind>,
    /// Attempts lost with their agent so far.
    #[serde(default)]
    pub lost_count: u32,
    /// Script failures so far (compared with `spec.retries`).
    #[serde(default)]
    pub failures: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When the current attempt was placed / started running / ended.
    #[schema(required)]
    pub scheduled_at: Option<Timestamp>,
    #[schema(required)]
    pub started_at: Option<Timestamp>,
    #[schema(required)]
    pub finished_at: Option<Timestamp>,
    /// Training progress of the current attempt, when the script reports it.
    #[serde(default)]
    #[schema(required)]
    pub progress: Option<Progress>,
    /// Latest value of every reported metric.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The best checkpoint, uploaded when the job ends.
    #[serde(default)]
    #[schema(required)]
    pub best: Option<Best>,
    /// Which checkpoint callback `best` follows.
    #[serde(default)]
    #[schema(required)]
    pub best_callback: Option<u32>,
    /// The environment the current attempt runs with (pinned packages, build time).
    #[serde(default)]
    #[schema(required)]
    pub environment: Option<Environment>,
    /// The job's MLflow run, when it is tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<MlflowView>,
    /// The MLflow project entry point the current attempt runs: its parameters (defaults
    /// filled), environment file and command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<runyard_model::mlproject::ProjectRun>,
}

/// A job's MLflow run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MlflowView {
    pub tracking_uri: String,
    pub run_id: String,
    pub experiment_id: String,
    /// The run's page on the tracking server.
    pub url: String,
    /// The run was ended with the job's outcome (FINISHED, FAILED or KILLED).
    pub ended: bool,
}

impl From<&runyard_model::MlflowRun> for MlflowView {
    fn from(r: &runyard_model::MlflowRun) -> MlflowView {
        MlflowView {
            tracking_uri: r.tracking_uri.clone(),
            run_id: r.run_id.clone(),
            experiment_id: r.experiment_id.clone(),
            url: format!(
                "{}/#/experiments/{}/runs/{}",
                r.tracking_uri.trim_end_matches('/'),
                r.experiment_id,
                r.run_id
            ),
            ended: r.ended,
        }
    }
}

impl From<&Job> for JobView {
    fn from(j: &Job) -> JobView {
        JobView {
            id: j.id.clone(),
            name: j.name.clone(),
            spec: j.spec.clone(),
            status: j.status,
            desired: j.desired,
            owner: j.owner.clone(),
            attempt: j.attempt,
            agent: j.agent.clone(),
            gpus: j.gpus.clone(),
            port: j.port,
            commit: j.commit.clone(),
            exit_code: j.exit_code,
            reason: j.reason.clone(),
            failure: j.failure,
            lost_count: j.lost_count,
            failures: j.failures,
            created_at: j.created_at,
            updated_at: j.updated_at,
            scheduled_at: j.scheduled_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            progress: j.progress.clone(),
            metrics: j.metrics.clone(),
            best: j.best.clone(),
            best_callback: j.best_callback,
            environment: j.environment.clone(),
            mlflow: j.mlflow.as_ref().map(MlflowView::from),
            project: j.project.clone(),
        }
    }
}

/// One page of `GET /api/v1/jobs`, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[serde(default)]
    #[schema(required)]
    pub next: Option<String>,
}

/// The data of a `removed` event: a job was deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobRemoved {
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The view shows exactly the stored record's fields as they were before the record gained
    /// its bookkeeping (`schema_version`, `report_offset`): the API did not change when the
    /// record did.
    #[test]
    fn the_view_is_the_record_without_its_bookkeeping() {
        let spec = JobSpec::from_json(br#"{"repo": "https://h/a/b.git", "script": "t.py"}"#)
            .expect("valid spec");
        let mut job = Job::new("01j".into(), spec, Timestamp(5));
        job.owner = Some("alice".into());
        let mut record = serde_json::to_value(&job).unwrap();
        for internal in ["schema_version", "report_offset"] {
            record.as_object_mut().unwrap().remove(internal);
        }
        assert_eq!(serde_json::to_value(JobView::from(&job)).unwrap(), record);
    }
}

/// A stored snapshot of a local project directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotView {
    /// What a spec's `repo` names it by: `snapshot:sha256:<hex>`.
    pub snapshot: String,
    pub sha256: String,
    /// Bytes of the archive.
    pub size: u64,
    /// Files in it.
    pub files: u64,
}
