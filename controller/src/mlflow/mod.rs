//! MLflow tracking for jobs (flow 1 of MLflow's project-backend design): the run exists before
//! the job is stored (made here, or named by `mlflow.run_id`), the job gets
//! `MLFLOW_TRACKING_URI`, `MLFLOW_RUN_ID` and `MLFLOW_EXPERIMENT_ID`, the parameters its entry
//! point ran with are logged once the agent reports them, and the run ends with the job:
//! FINISHED, FAILED or KILLED, always, whoever waits or not (`follow`, a loop that follows the
//! job table and retries what failed).
//!
//! Which jobs are tracked: those whose spec has an `mlflow` block, and MLflow project jobs
//! (entry points) when the controller has a default tracking URI (`--mlflow-tracking-uri`).
//! Plain script jobs without an `mlflow` block are left alone.

pub mod client;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use runyard_model::{Job, JobSpec, JobStatus, MlflowRun, ValidationError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use client::{Client, MlflowError};

/// How often the follower looks for runs to bring up to date, besides job changes.
const RESYNC: Duration = Duration::from_secs(2);
/// MLflow keeps parameter values up to this many characters.
const MAX_PARAM_VALUE: usize = 6000;
/// MLflow takes at most this many parameters per batch.
const BATCH: usize = 100;

#[derive(Clone)]
pub struct Tracking {
    /// `--mlflow-tracking-uri`.
    default_uri: Option<String>,
    /// Where users open the controller's page (`--public-url`), for the run's link to its job.
    public_url: Option<String>,
    client: Client,
}

/// Why a job's run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The spec asks for something that cannot be: no tracking URI, a run that does not exist.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The tracking server failed or could not be reached.
    #[error("{0}; the job was not submitted: retry when the tracking server is back")]
    Server(MlflowError),
}

impl Tracking {
    pub fn new(default_uri: Option<String>, public_url: Option<String>) -> Tracking {
        Tracking {
            default_uri,
            public_url,
            client: Client::from_env(),
        }
    }

    /// Where `spec` is tracked, if it is.
    pub fn uri_for(&self, spec: &JobSpec) -> Result<Option<String>, ValidationError> {
        match (&spec.mlflow, &self.default_uri) {
            (Some(m), default) => match m.tracking_uri.as_ref().or(default.as_ref()) {
                Some(uri) => Ok(Some(uri.clone())),
                None => Err(ValidationError::new(
                    "mlflow.tracking_uri",
                    "no tracking URI: give one, or start the controller with --mlflow-tracking-uri",
                )),
            },
            (None, Some(default)) if spec.entry_point.is_some() => Ok(Some(default.clone())),
            (None, _) => Ok(None),
        }
    }

    /// Makes sure the run of job `id` exists: the one `mlflow.run_id` names (tagged as this
    /// job's), or a new one in the experiment asked for, with MLflow's project tags.
    /// `origin`: the scheme and host the submit came to, for the link when no `--public-url`.
    pub async fn open_run(
        &self,
        id: &str,
        spec: &JobSpec,
        owner: &str,
        origin: Option<&str>,
    ) -> Result<Option<MlflowRun>, TrackingError> {
        let Some(uri) = self.uri_for(spec)? else {
            return Ok(None);
        };
        let m = spec.mlflow.clone().unwrap_or_default();
        let link = self
            .public_url
            .as_deref()
            .or(origin)
            .map(|base| format!("{}/#/runs/{id}", base.trim_end_matches('/')));
        let mut tags = vec![("runyard.job_id".to_string(), id.to_string())];
        if let Some(link) = &link {
            tags.push(("runyard.job_url".into(), link.clone()));
        }
        let info = match &m.run_id {
            Some(run_id) => {
                let info = self.client.get_run(&uri, run_id).await.map_err(|e| {
                    if e.is_missing() {
                        TrackingError::Invalid(ValidationError::new(
                            "mlflow.run_id",
                            format!("no run {run_id} at {uri}"),
                        ))
                    } else {
                        TrackingError::Server(e)
                    }
                })?;
                self.client
                    .log_batch(&uri, run_id, &[], &tags)
                    .await
                    .map_err(TrackingError::Server)?;
                info
            }
            None => {
                let experiment = match (&m.experiment_id, &m.experiment_name) {
                    (Some(id), _) => id.clone(),
                    (None, Some(name)) => self
                        .client
                        .experiment_named(&uri, name)
                        .await
                        .map_err(TrackingError::Server)?,
                    (None, None) => "0".to_string(),
                };
                tags.extend(project_tags(spec, owner));
                let now = runyard_model::Timestamp::now();
                self.client
                    .create_run(&uri, &experiment, &spec.name, now.0, &tags)
                    .await
                    .map_err(|e| match e {
                        MlflowError::Api { ref code, .. } if code == "RESOURCE_DOES_NOT_EXIST" => {
                            TrackingError::Invalid(ValidationError::new(
                                "mlflow.experiment_id",
                                format!("no experiment {experiment} at {uri}"),
                            ))
                        }
                        e => TrackingError::Server(e),
                    })?
            }
        };
        info!(job = %id, run = %info.run_id, experiment = %info.experiment_id, %uri, "MLflow run ready");
        Ok(Some(MlflowRun {
            tracking_uri: uri,
            run_id: info.run_id,
            experiment_id: info.experiment_id,
            params_of: 0,
            ended: false,
        }))
    }

    /// What the run needs next for `job`, done: its parameters once its attempt reported them,
    /// its end once the job is over. Returns the run as it now is (unchanged if nothing was due).
    pub async fn bring_up_to_date(&self, job: &Job) -> Result<MlflowRun, MlflowError> {
        let mut run = job.mlflow.clone().expect("a tracked job");
        if let Some(project) = job.project.as_ref().filter(|_| run.params_of < job.attempt) {
            let params: Vec<(String, String)> = project
                .parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.chars().take(MAX_PARAM_VALUE).collect()))
                .collect();
            let mut tags = vec![("mlflow.project.env".to_string(), project.env.clone())];
            if runyard_model::spec::snapshot_of(&job.spec.repo).is_some() {
                // A local directory's snapshot: its id is not a git commit (the client tags the
                // checkout's HEAD itself).
                tags.push(("runyard.snapshot".into(), job.spec.repo.clone()));
            } else if let Some(commit) = &job.commit {
                tags.push(("mlflow.source.git.commit".into(), commit.clone()));
            }
            for (i, chunk) in params.chunks(BATCH).enumerate() {
                let tags = if i == 0 { &tags[..] } else { &[] };
                self.client
                    .log_batch(&run.tracking_uri, &run.run_id, chunk, tags)
                    .await?;
            }
            if params.is_empty() {
                self.client
                    .log_batch(&run.tracking_uri, &run.run_id, &[], &tags)
                    .await?;
            }
            run.params_of = job.attempt;
        }
        if let Some(status) = ended_as(job.status).filter(|_| !run.ended) {
            let at = job
                .finished_at
                .unwrap_or_else(runyard_model::Timestamp::now);
            self.client
                .end_run(&run.tracking_uri, &run.run_id, status, at.0)
                .await?;
            info!(job = %job.id, run = %run.run_id, status, "MLflow run ended");
            run.ended = true;
        }
        Ok(run)
    }
}

/// The environment variables a tracked job gets.
pub fn job_env(run: &MlflowRun) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("MLFLOW_TRACKING_URI".to_string(), run.tracking_uri.clone()),
        ("MLFLOW_RUN_ID".to_string(), run.run_id.clone()),
        (
            "MLFLOW_EXPERIMENT_ID".to_string(),
            run.experiment_id.clone(),
        ),
    ])
}

/// The status an MLflow run ends with when its job ends so.
pub fn ended_as(status: JobStatus) -> Option<&'static str> {
    match status {
        JobStatus::Succeeded => Some("FINISHED"),
        JobStatus::Failed => Some("FAILED"),
        JobStatus::Stopped => Some("KILLED"),
        _ => None,
    }
}

/// The tags MLflow's own project runs carry (`mlflow/utils/mlflow_tags.py`).
fn project_tags(spec: &JobSpec, owner: &str) -> Vec<(String, String)> {
    let mut tags = vec![
        ("mlflow.user".to_string(), owner.to_string()),
        ("mlflow.source.name".into(), spec.repo.clone()),
        ("mlflow.source.type".into(), "PROJECT".into()),
        ("mlflow.source.git.repoURL".into(), spec.repo.clone()),
        ("mlflow.project.backend".into(), "runyard".into()),
        ("mlflow.runName".into(), spec.name.clone()),
    ];
    if let Some(entry) = &spec.entry_point {
        tags.push(("mlflow.project.entryPoint".into(), entry.clone()));
    } else {
        tags.push(("mlflow.project.entryPoint".into(), spec.script.clone()));
    }
    let is_commit =
        spec.revision.len() == 40 && spec.revision.chars().all(|c| c.is_ascii_hexdigit());
    if !spec.revision.is_empty() && !is_commit {
        tags.push(("mlflow.source.git.branch".into(), spec.revision.clone()));
    }
    tags
}

/// Whether `job`'s run has something to be brought up to date.
fn due(job: &Job) -> bool {
    job.mlflow.as_ref().is_some_and(|r| {
        (job.project.is_some() && r.params_of < job.attempt)
            || (job.status.is_terminal() && !r.ended)
    })
}

/// Brings every tracked job's run up to date: the jobs the table's change feed shows due, all of
/// them at start and whenever the feed lagged; what failed is tried again every [`RESYNC`].
pub async fn follow(ctl: crate::executor::Controller, cancel: CancellationToken) {
    let mut changes = ctl.jobs.changes();
    let mut pending: BTreeSet<String> = everything_due(&ctl);
    loop {
        let mut left = BTreeSet::new();
        for id in std::mem::take(&mut pending) {
            let Some(job) = ctl.jobs.get(&id) else {
                continue;
            };
            if due(&job) && !bring(&ctl, &job).await {
                left.insert(id);
            }
        }
        pending = left;
        let retry = tokio::time::sleep(RESYNC);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut retry, if !pending.is_empty() => break,
                change = changes.recv() => match change {
                    Ok(crate::jobs::Change::Job(job)) if due(&job) => {
                        pending.insert(job.id.clone());
                        break;
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        pending.extend(everything_due(&ctl));
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// Every job in the table whose run is due (a walk of the table: at start and after a lag).
fn everything_due(ctl: &crate::executor::Controller) -> BTreeSet<String> {
    let mut ids: Vec<String> = ctl.jobs.active().into_iter().map(|j| j.id).collect();
    ids.extend(ctl.jobs.finished_after(None, usize::MAX));
    ids.into_iter()
        .filter(|id| ctl.jobs.get(id).is_some_and(|j| due(&j)))
        .collect()
}

/// One job's run brought up to date and recorded; false when it is to be tried again.
async fn bring(ctl: &crate::executor::Controller, job: &Job) -> bool {
    let run = match ctl.tracking.bring_up_to_date(job).await {
        Ok(run) => run,
        Err(error) => {
            warn!(job = %job.id, %error, "MLflow run not brought up to date; trying again");
            return false;
        }
    };
    if Some(&run) == job.mlflow.as_ref() {
        return true;
    }
    let stored = ctl
        .jobs
        .update(&job.id, |state| {
            let mut next = state.clone();
            let now = next.intent.mlflow.as_mut()?;
            now.params_of = now.params_of.max(run.params_of);
            now.ended |= run.ended;
            Some((next, ()))
        })
        .await;
    match stored {
        Ok(_) => true,
        Err(error) => {
            warn!(job = %job.id, %error, "cannot record the MLflow run's progress; trying again");
            false
        }
    }
}
