//! The executor: owns the shared handles (jobs, agents, logs), runs the level-triggered reconcile
//! loop, and applies plans. Reconcile itself is pure (`reconcile.rs`); this is where its actions
//! meet the store and the agents.
//!
//! The loop wakes on any job or agent change (`kick`) and on a periodic resync, so a missed event
//! only delays work by one resync period. Every action is idempotent (`reconcile::apply` returns
//! `None` for a job that moved on), so running a pass twice is harmless.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runyard_model::{AgentCommand, Job, JobSpec, JobState, JobStatus, Timestamp};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::agents::Agents;
use crate::artifacts::ArtifactStore;
use crate::jobs::{Jobs, JobsError};
use crate::logs::LogStore;
use crate::reconcile::{self, Action};
use crate::reports::ReportFolder;
use crate::secrets::{SecretError, Secrets};
use crate::tunnel::Tunnels;

/// Why a submit failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The spec is refused (a secret names no controller-side secret).
    #[error(transparent)]
    Invalid(#[from] runyard_model::ValidationError),
    #[error(transparent)]
    Store(#[from] JobsError),
    /// The job's MLflow run could not be made.
    #[error(transparent)]
    Tracking(#[from] crate::mlflow::TrackingError),
}

impl From<SecretError> for SubmitError {
    fn from(e: SecretError) -> SubmitError {
        match e {
            SecretError::Spec(v) => SubmitError::Invalid(v),
            SecretError::Store(s) => SubmitError::Store(s.into()),
            other => SubmitError::Invalid(runyard_model::ValidationError::new(
                "secrets",
                other.to_string(),
            )),
        }
    }
}

/// The services, reaching replicas directly or through their agents' tunnels.
fn services(
    jobs: &Jobs,
    agents: &Agents,
    tunnels: &Tunnels,
    mode: crate::services::connect::PathMode,
) -> crate::services::Services {
    let through = crate::tunnel::ThroughAgents {
        tunnels: tunnels.clone(),
        agents: agents.clone(),
    };
    crate::services::Services::new(
        jobs.store(),
        crate::services::proxy::DataPlane::new(mode, Some(Arc::new(through))),
    )
}

/// A new job id: a ULID in lower case.
pub fn new_job_id() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}

/// Periodic resync of the reconcile loop.
pub const RESYNC: Duration = Duration::from_millis(1000);
/// First wait before a job whose action failed is tried again; doubles up to the cap.
pub const RETRY_MIN: Duration = Duration::from_millis(200);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Controller {
    pub jobs: Jobs,
    pub agents: Agents,
    pub logs: LogStore,
    /// Report lines (progress, metrics, checkpoints), stored like logs.
    pub reports: LogStore,
    /// Best checkpoints uploaded by agents.
    pub artifacts: Arc<dyn ArtifactStore>,
    pub agent_ttl: Duration,
    /// Folds report lines into jobs in batches; keeps metric history parsed.
    pub fold: ReportFolder,
    /// Controller-side secrets and each job's secret values.
    pub secrets: Secrets,
    /// Services: their records, the data plane, the autoscaler.
    pub services: crate::services::Services,
    /// Byte streams to attempts' ports, through their agents (`tunnel.rs`).
    pub tunnels: Tunnels,
    /// MLflow runs of tracked jobs.
    pub tracking: crate::mlflow::Tracking,
    /// Uploaded snapshots of local project directories (none: uploads are refused).
    pub snapshots: Option<crate::snapshots::Snapshots>,
    kick: Arc<Notify>,
    /// Jobs whose last action failed, and until when they are left alone.
    retry: Arc<Mutex<HashMap<String, Retry>>>,
}

/// One job's failed-action backoff (kube-runtime's error policy: requeue that object, keep
/// going with the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub failures: u32,
    pub until: Timestamp,
}

impl Retry {
    /// The backoff after one more failure at `now`.
    pub fn next(previous: Option<Retry>, now: Timestamp) -> Retry {
        let failures = previous.map_or(0, |r| r.failures).saturating_add(1);
        let wait = RETRY_MIN
            .saturating_mul(1 << (failures - 1).min(16))
            .min(RETRY_MAX);
        Retry {
            failures,
            until: now.plus(wait),
        }
    }
}

impl Controller {
    pub fn new(
        jobs: Jobs,
        agents: Agents,
        logs: LogStore,
        reports: LogStore,
        artifacts: Arc<dyn ArtifactStore>,
        agent_ttl: Duration,
    ) -> Controller {
        let tunnels = Tunnels::default();
        Controller {
            secrets: Secrets::new(jobs.store()),
            services: services(&jobs, &agents, &tunnels, Default::default()),
            reports,
            artifacts,
            jobs,
            agents,
            logs,
            agent_ttl,
            fold: ReportFolder::default(),
            tunnels,
            tracking: crate::mlflow::Tracking::new(None, None),
            snapshots: None,
            kick: Arc::new(Notify::new()),
            retry: Arc::default(),
        }
    }

    /// Reaches service replicas only by `mode` (`--service-path`).
    pub fn with_service_path(mut self, mode: crate::services::connect::PathMode) -> Controller {
        self.services = services(&self.jobs, &self.agents, &self.tunnels, mode);
        self
    }

    /// Tracks jobs in MLflow as `tracking` says (`--mlflow-tracking-uri`, `--public-url`).
    pub fn with_tracking(mut self, tracking: crate::mlflow::Tracking) -> Controller {
        self.tracking = tracking;
        self
    }

    /// Keeps uploaded snapshots in `snapshots`.
    pub fn with_snapshots(mut self, snapshots: crate::snapshots::Snapshots) -> Controller {
        self.snapshots = Some(snapshots);
        self
    }

    /// Asks the loop for a pass soon.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Stores a new job owned by the token named `owner`. Its secret values are stored apart
    /// first (the spec keeps only their names).
    pub async fn submit(&self, spec: JobSpec, owner: &str) -> Result<Job, SubmitError> {
        self.submit_from(spec, owner, None).await
    }

    /// [`Controller::submit`], from a client that reached the controller at `origin`
    /// (`http://host:port`: where the job's page is, for its MLflow run's link).
    pub async fn submit_from(
        &self,
        spec: JobSpec,
        owner: &str,
        origin: Option<&str>,
    ) -> Result<Job, SubmitError> {
        let id = new_job_id();
        self.check_model_from(&spec).await?;
        self.check_snapshot(&spec).await?;
        // The run exists before the job does (MLflow's flow 1): the job's first attempt already
        // has its id. Nothing is stored when it cannot be made.
        let run = self.tracking.open_run(&id, &spec, owner, origin).await?;
        self.store_job(id, spec, owner, None, run).await
    }

    /// Stores job `id` (a new one, or a service's replica with its link), its secret values
    /// apart.
    pub async fn create_job(
        &self,
        id: String,
        spec: JobSpec,
        owner: &str,
        service: Option<runyard_model::ReplicaOf>,
    ) -> Result<Job, SubmitError> {
        self.check_model_from(&spec).await?;
        self.store_job(id, spec, owner, service, None).await
    }

    async fn store_job(
        &self,
        id: String,
        spec: JobSpec,
        owner: &str,
        service: Option<runyard_model::ReplicaOf>,
        mlflow: Option<runyard_model::MlflowRun>,
    ) -> Result<Job, SubmitError> {
        if let Some(sha) = runyard_model::spec::snapshot_of(&spec.repo) {
            // Before the job: a snapshot is never collected while a stored job names it.
            let key = crate::snapshots::ref_key(sha, &id);
            self.jobs
                .store()
                .put(&key, Vec::new(), crate::store::Precondition::Any)
                .await
                .map_err(JobsError::from)?;
        }
        let spec = self.secrets.take(&id, spec).await?;
        let mut state = JobState::new(id, spec, Timestamp::now());
        state.intent.owner = Some(owner.to_string());
        state.intent.service = service;
        state.intent.mlflow = mlflow;
        let id = state.intent.id.clone();
        let job = match self.jobs.create(state).await {
            Ok(job) => job,
            // The id is taken (a replica made again): its secret values are that job's.
            Err(e @ JobsError::Store(crate::store::StoreError::Conflict { .. })) => {
                return Err(e.into());
            }
            Err(e) => {
                if let Err(error) = self.secrets.forget(&id).await {
                    warn!(job = %id, %error, "cannot remove the secret values of a job that was not stored");
                }
                return Err(e.into());
            }
        };
        info!(job = %job.id, name = %job.name, compute = %job.spec.compute, %owner, "job submitted");
        self.kick();
        Ok(job)
    }

    /// A spec that runs a snapshot needs it stored here.
    pub async fn check_snapshot(&self, spec: &JobSpec) -> Result<(), SubmitError> {
        let Some(sha) = runyard_model::spec::snapshot_of(&spec.repo) else {
            return Ok(());
        };
        let stored = match &self.snapshots {
            Some(s) => s.exists(sha).await,
            None => false,
        };
        if stored {
            Ok(())
        } else {
            Err(SubmitError::Invalid(runyard_model::ValidationError::new(
                "repo",
                format!(
                    "no snapshot {sha} on this controller: upload it first (POST /api/v1/snapshots; `runyard submit --repo DIR` does)"
                ),
            )))
        }
    }

    /// The job's best checkpoint: that of its latest attempt that has one.
    pub async fn checkpoint_of(
        &self,
        job: &Job,
    ) -> Result<
        Option<(
            crate::artifacts::ArtifactMeta,
            crate::artifacts::ArtifactReader,
        )>,
        crate::artifacts::ArtifactError,
    > {
        for attempt in (1..=job.attempt).rev() {
            if let Some(found) = self.artifacts.open(&job.id, attempt).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// `model_from` names a finished job with a checkpoint to serve or start from.
    pub async fn check_model_from(&self, spec: &JobSpec) -> Result<(), SubmitError> {
        let Some(from) = &spec.model_from else {
            return Ok(());
        };
        let bad =
            |m: String| SubmitError::Invalid(runyard_model::ValidationError::new("model_from", m));
        let Some(job) = self.jobs.fetch(from).await? else {
            return Err(bad(format!("no job with id `{from}`")));
        };
        if job.status != JobStatus::Succeeded {
            return Err(bad(format!(
                "job `{from}` is {}: only a succeeded job's checkpoint is used",
                job.status
            )));
        }
        match self.checkpoint_of(&job).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(bad(format!(
                "job `{from}` has no checkpoint (its script reported none, or the upload failed)"
            ))),
            Err(e) => Err(bad(format!("cannot read job `{from}`'s checkpoint: {e}"))),
        }
    }

    /// The assignment of the job's current attempt, with its secret values resolved (only here,
    /// on the way to the agent).
    pub async fn assignment(&self, job: &Job) -> Result<AgentCommand, SecretError> {
        let mut spec = self.secrets.resolve(&job.id, &job.spec).await?;
        if let Some(run) = &job.mlflow {
            spec.env.extend(crate::mlflow::job_env(run));
        }
        Ok(AgentCommand::assign(job, spec))
    }

    /// Stops a job. `Ok(None)`: unknown job; `Err(msg)` inside: the job is already finished.
    pub async fn stop(&self, id: &str) -> Result<Option<Result<Job, String>>, JobsError> {
        let mut refused = None;
        let updated = self
            .jobs
            .update(id, |j| match reconcile::request_stop(j, Timestamp::now()) {
                Ok(n) => Some((n, ())),
                Err(msg) => {
                    refused = Some(msg);
                    None
                }
            })
            .await?;
        if let Some(msg) = refused {
            return Ok(Some(Err(msg)));
        }
        let Some((job, ())) = updated else {
            return Ok(None);
        };
        info!(job = %job.id, status = %job.status, "stop requested");
        self.send_stop(&job);
        self.kick();
        Ok(Some(Ok(job)))
    }

    /// Tells the job's agent to stop its current attempt (idempotent on the agent).
    pub fn send_stop(&self, job: &Job) {
        if let Some(agent) = &job.agent
            && job.status == JobStatus::Stopping
        {
            self.agents.command(agent, &AgentCommand::stop(job));
        }
    }

    /// One reconcile pass: plan, apply, notify agents. An action that fails puts its job in
    /// backoff and the pass goes on with the others; returns how many actions failed.
    pub async fn reconcile_once(&self) -> usize {
        let jobs = self.jobs.active_states();
        let refs: Vec<&JobState> = jobs.iter().collect();
        let agents = self.agents.views();
        let now = Timestamp::now();
        let plan = reconcile::reconcile(&refs, &agents, now, self.agent_ttl);
        let mut failed = 0;
        let ready: Vec<Action> = {
            let retry = self.retry.lock().unwrap();
            plan.into_iter()
                .filter(|a| retry.get(a.job()).is_none_or(|r| r.until <= now))
                .collect()
        };
        let ids: Vec<String> = ready.iter().map(|a| a.job().to_string()).collect();
        // Reconcile plans at most one action per job.
        let by_id: HashMap<&str, &Action> = ready.iter().map(|a| (a.job(), a)).collect();
        let results = self
            .jobs
            .update_many(&ids, |j| {
                let action = by_id.get(j.id())?;
                reconcile::apply(j, action, now).map(|n| (n, ()))
            })
            .await;
        for (action, result) in ready.iter().zip(results) {
            let id = action.job();
            let applied = match result {
                Ok(applied) => {
                    self.retry.lock().unwrap().remove(id);
                    applied
                }
                Err(error) => {
                    failed += 1;
                    let mut retry = self.retry.lock().unwrap();
                    let next = Retry::next(retry.get(id).copied(), now);
                    retry.insert(id.to_string(), next);
                    warn!(job = %id, %error, failures = next.failures, "job action failed; retrying it later");
                    continue;
                }
            };
            let Some((job, ())) = applied else { continue };
            match action {
                Action::Place { agent, .. } => {
                    info!(job = %job.id, attempt = job.attempt, %agent, gpus = ?job.gpus, "job placed");
                    match self.assignment(&job).await {
                        Ok(cmd) => {
                            self.agents.command(agent, &cmd);
                        }
                        // The agent is told again when it next registers (it does not hold
                        // the attempt), so a passing store error heals.
                        Err(error) => {
                            error!(job = %job.id, %error, "cannot resolve the job's secrets; the assignment waits")
                        }
                    }
                }
                Action::Lose { .. } => {
                    warn!(job = %job.id, attempt = job.attempt, status = %job.status, reason = ?job.reason, "attempt lost")
                }
                Action::Requeue { .. } => {
                    info!(job = %job.id, status = %job.status, "lost attempt requeued")
                }
                Action::Cancel { .. } => info!(job = %job.id, "pending job stopped"),
                Action::Wait { reason, .. } => debug!(job = %job.id, %reason, "job waits"),
            }
        }
        // Forget the backoff of jobs that finished or went away.
        let mut retry = self.retry.lock().unwrap();
        if !retry.is_empty() {
            let active: std::collections::HashSet<&str> = jobs.iter().map(|j| j.id()).collect();
            retry.retain(|id, _| active.contains(id.as_str()));
        }
        drop(retry);
        failed
    }

    /// The backoff of a job whose last action failed.
    pub fn retry_of(&self, id: &str) -> Option<Retry> {
        self.retry.lock().unwrap().get(id).copied()
    }

    /// The level-triggered loop; returns when cancelled.
    pub async fn run_loop(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.kick.notified() => {}
                _ = tick.tick() => {}
            }
            let failed = self
                .reconcile_once()
                .instrument(info_span!("reconcile"))
                .await;
            if failed > 0 {
                debug!(failed, "reconcile pass done with failed actions");
            }
        }
    }
}
