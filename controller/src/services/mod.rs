//! Services: servers kept running as autoscaled replicas behind the controller.
//!
//! - `plan`: what a service needs done to its replicas (pure).
//! - `autoscale`: the default policy and when a new replica count applies (pure).
//! - `route`: the data plane's state (endpoints, readiness, drain, in-flight counts, stats).
//! - `proxy`: `/s/NAME/...` to a replica: balance, wait or cold-start proxy, retry, upgrades.
//! - `batch`: request batching.
//! - `connect`: how a replica is reached (direct, or a tunnel through its agent).
//! - `health`: readiness checks.
//! - `policy`: custom scaling policies, called in a replica's environment through its agent.
//!
//! The service record (`services/NAME`) is the intent; this loop follows the store (it reads
//! the records on every pass), keeps the data plane's endpoints in step with the replica jobs,
//! lets the autoscaler move the target, and applies the plan: new replicas are jobs made
//! through the same path as submitted ones.

pub mod autoscale;
pub mod batch;
pub mod connect;
pub mod health;
pub mod plan;
pub mod policy;
pub mod proxy;
pub mod route;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runyard_model::service::{Decision, ReplicaRef, Service, ServiceSpec};
use runyard_model::{Desired, Job, JobStatus, ReplicaOf, Timestamp};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::executor::{Controller, new_job_id};
use crate::store::{Precondition, Store, StoreError};
use autoscale::{LastMoves, Load};
use plan::{Observed, Step};
use proxy::DataPlane;
use route::{Endpoint, ServiceRoute};

/// Key prefix of service records.
pub const PREFIX: &str = "services/";
/// The loop's periodic pass (it also wakes on any change).
pub const RESYNC: Duration = Duration::from_millis(500);
/// How often a service's history gets a point.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub fn service_key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// The id under which a service's secret values are kept (copied to each replica's job).
fn secrets_id(name: &str) -> String {
    format!("service-{name}")
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Invalid(#[from] runyard_model::ValidationError),
    #[error("no service named `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt service record `{0}`: {1}")]
    Corrupt(String, String),
}

/// The services: their records, the data plane, and the autoscaler's memory.
#[derive(Clone)]
pub struct Services {
    store: Arc<dyn Store>,
    pub plane: Arc<DataPlane>,
    kick: Arc<Notify>,
    moves: Arc<Mutex<HashMap<String, LastMoves>>>,
    policies: Arc<policy::Policies>,
}

impl Services {
    pub fn new(store: Arc<dyn Store>, plane: DataPlane) -> Services {
        Services {
            store,
            plane: Arc::new(plane),
            kick: Arc::new(Notify::new()),
            moves: Arc::default(),
            policies: Arc::default(),
        }
    }

    /// An agent's answer to a policy call.
    pub fn evaluated(&self, agent: &str, request_id: &str, result: Result<i64, String>) {
        self.policies.answer(agent, request_id, result);
        self.kick();
    }

    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// The record and its version.
    pub async fn get(&self, name: &str) -> Result<Option<(Service, u64)>, ServiceError> {
        let Some(v) = self.store.get(&service_key(name)).await? else {
            return Ok(None);
        };
        let s = serde_json::from_slice(&v.value)
            .map_err(|e| ServiceError::Corrupt(name.into(), e.to_string()))?;
        Ok(Some((s, v.version)))
    }

    /// Every service, by name.
    pub async fn list(&self) -> Result<Vec<Service>, ServiceError> {
        let mut out = Vec::new();
        for (key, v) in self.store.list(PREFIX).await? {
            match serde_json::from_slice::<Service>(&v.value) {
                Ok(s) => out.push(s),
                Err(e) => {
                    warn!(%key, error = %e, "skipping a service record this version cannot read")
                }
            }
        }
        Ok(out)
    }

    /// Changes a record with compare-and-swap, re-reading on a conflict. `change` returns
    /// `Ok(false)` for "nothing to write".
    async fn update(
        &self,
        name: &str,
        mut change: impl FnMut(&mut Service) -> Result<bool, ServiceError>,
    ) -> Result<Service, ServiceError> {
        loop {
            let (mut s, version) = self
                .get(name)
                .await?
                .ok_or_else(|| ServiceError::NotFound(name.into()))?;
            if !change(&mut s)? {
                return Ok(s);
            }
            let bytes = serde_json::to_vec(&s).expect("a service serializes");
            match self
                .store
                .put(&service_key(name), bytes, Precondition::Version(version))
                .await
            {
                Ok(_) => {
                    self.kick();
                    return Ok(s);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `runyard serve`: a new service, or a new spec for one (a rollout when what replicas run
    /// changes). Secret values are kept apart, as a job's.
    pub async fn apply(
        &self,
        ctl: &Controller,
        spec: ServiceSpec,
        owner: &str,
    ) -> Result<(Service, bool), ServiceError> {
        let name = spec.name.clone();
        if spec.job.mlflow.is_some() {
            return Err(ServiceError::Invalid(runyard_model::ValidationError::new(
                "mlflow",
                "a service's replicas are not MLflow runs: log from the server itself",
            )));
        }
        ctl.check_model_from(&spec.job).await.map_err(|e| match e {
            crate::executor::SubmitError::Invalid(v) => ServiceError::Invalid(v),
            other => ServiceError::Refused(other.to_string()),
        })?;
        let mut spec = spec;
        spec.job = ctl
            .secrets
            .take(&secrets_id(&name), spec.job)
            .await
            .map_err(|e| match crate::executor::SubmitError::from(e) {
                crate::executor::SubmitError::Invalid(v) => ServiceError::Invalid(v),
                other => ServiceError::Refused(other.to_string()),
            })?;
        let now = Timestamp::now();
        let fresh = Service::new(spec.clone(), Some(owner.to_string()), now);
        let bytes = serde_json::to_vec(&fresh).expect("a service serializes");
        match self
            .store
            .put(&service_key(&name), bytes, Precondition::Absent)
            .await
        {
            Ok(_) => {
                // Requests find the service at once (they wait for its first replica).
                self.plane.routes.upsert(&name, &fresh.spec.serving);
                info!(service = %name, %owner, "service created");
                self.kick();
                return Ok((fresh, true));
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let s = self
            .update(&name, |s| {
                s.respec(spec.clone(), now);
                s.reason = None;
                Ok(true)
            })
            .await?;
        info!(service = %name, generation = s.generation, "service updated");
        Ok((s, false))
    }

    /// `runyard service scale`: new bounds (the target moves inside them).
    pub async fn scale(
        &self,
        name: &str,
        min: Option<u32>,
        max: Option<u32>,
    ) -> Result<Service, ServiceError> {
        let now = Timestamp::now();
        self.update(name, |s| {
            let mut spec = s.spec.clone();
            let r = &mut spec.serving.replicas;
            r.min = min.unwrap_or(r.min);
            r.max = max.unwrap_or(r.max);
            let spec = spec.validate()?;
            let from = s.target;
            s.respec(spec, now);
            if s.target != from {
                s.decision = Some(Decision {
                    at: now,
                    from,
                    to: s.target,
                    why: format!(
                        "scaled by a user to [{}, {}]",
                        s.spec.serving.replicas.min, s.spec.serving.replicas.max
                    ),
                });
            }
            Ok(true)
        })
        .await
    }

    /// `runyard service stop`: drains and stops every replica; the record stays (serve again
    /// to start it).
    pub async fn stop(&self, name: &str) -> Result<Service, ServiceError> {
        let now = Timestamp::now();
        self.update(name, |s| {
            if s.desired == Desired::Stop {
                return Ok(false);
            }
            s.desired = Desired::Stop;
            s.updated_at = now;
            Ok(true)
        })
        .await
    }

    /// Deletes a stopped service with no replica left.
    pub async fn remove(&self, ctl: &Controller, name: &str) -> Result<(), ServiceError> {
        let (s, _) = self
            .get(name)
            .await?
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        if s.desired != Desired::Stop || !s.replicas.is_empty() {
            return Err(ServiceError::Refused(format!(
                "service `{name}` is not stopped: run `runyard service stop {name}` and wait until it has no replica"
            )));
        }
        self.store.delete(&service_key(name)).await?;
        if let Err(e) = ctl.secrets.forget(&secrets_id(name)).await {
            warn!(service = %name, error = %e, "cannot remove the service's secret values");
        }
        self.plane.routes.remove(name);
        self.policies.forget(name);
        Ok(())
    }

    /// The loop: one pass per change or `RESYNC`, until cancelled.
    pub async fn run(self, ctl: Controller, cancel: CancellationToken) {
        let mut jobs = ctl.jobs.subscribe();
        let mut last_sample = tokio::time::Instant::now();
        loop {
            let now = Timestamp::now();
            let sample = last_sample.elapsed() >= SAMPLE_EVERY;
            if sample {
                last_sample = tokio::time::Instant::now();
            }
            match self.list().await {
                Ok(services) => {
                    let names: HashSet<String> = services.iter().map(|s| s.name.clone()).collect();
                    for s in services {
                        if let Err(e) = self.pass(&ctl, s, now, sample).await {
                            warn!(error = %e, "service pass failed; will retry");
                        }
                    }
                    for gone in self.plane.routes.names() {
                        if !names.contains(&gone) {
                            self.plane.routes.remove(&gone);
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot list services; will retry"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.kick.notified() => {}
                _ = jobs.changed() => {}
                _ = self.plane.routes.changes.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    /// One service: endpoints in step with its jobs, the autoscaler, then the plan.
    async fn pass(
        &self,
        ctl: &Controller,
        service: Service,
        now: Timestamp,
        sample: bool,
    ) -> Result<(), ServiceError> {
        let route = self
            .plane
            .routes
            .upsert(&service.name, &service.spec.serving);
        let jobs: Vec<(ReplicaRef, Option<Job>)> = service
            .replicas
            .iter()
            .map(|r| (r.clone(), ctl.jobs.get(&r.job)))
            .collect();
        self.sync_endpoints(ctl, &route, &jobs);
        let endpoints = route.endpoints();
        let observed: Vec<Observed> = jobs
            .iter()
            .map(|(r, job)| {
                let ep = job.as_ref().and_then(|j| {
                    endpoints
                        .iter()
                        .find(|e| e.job == j.id && e.attempt == j.attempt)
                });
                Observed {
                    replica: r.clone(),
                    status: job.as_ref().map(|j| j.status),
                    ready: ep.is_some_and(|e| e.ready.load(Ordering::SeqCst)),
                    unhealthy: ep.is_some_and(|e| e.unhealthy.load(Ordering::SeqCst)),
                    draining: ep.is_some_and(|e| e.draining.load(Ordering::SeqCst)),
                    in_flight: ep.map_or(0, |e| e.in_flight.load(Ordering::SeqCst)),
                }
            })
            .collect();
        if sample {
            route.sample(now, service.replicas.len() as u32);
        }
        let service = if service.desired == Desired::Run {
            self.autoscale(ctl, &service, &route, &observed, now)
                .await?
        } else {
            service
        };
        for step in plan::plan(&service, &observed) {
            if let Err(e) = self.apply_step(ctl, &service, &route, &jobs, step).await {
                warn!(service = %service.name, error = %e, "service step failed; will retry");
            }
        }
        Ok(())
    }

    /// Endpoints for the replicas that run with a port; the others' endpoints go.
    fn sync_endpoints(
        &self,
        ctl: &Controller,
        route: &Arc<ServiceRoute>,
        jobs: &[(ReplicaRef, Option<Job>)],
    ) {
        let old = route.endpoints();
        let mut next = Vec::new();
        let mut changed = false;
        for (r, job) in jobs {
            let Some(job) = job else { continue };
            let Some(port) = job
                .port
                .filter(|_| job.status == JobStatus::Running || job.status == JobStatus::Stopping)
            else {
                continue;
            };
            let Some(agent) = job.agent.clone() else {
                continue;
            };
            if let Some(e) = old
                .iter()
                .find(|e| e.job == job.id && e.attempt == job.attempt)
            {
                next.push(e.clone());
                continue;
            }
            let ep = Arc::new(Endpoint::new(
                self.plane.routes.next_id(),
                &route.name,
                &job.id,
                job.attempt,
                r.index,
                r.generation,
                &agent,
                ctl.agents.address(&agent),
                port,
            ));
            self.plane.routes.add_endpoint(ep.clone());
            tokio::spawn(health::check(self.plane.clone(), route.clone(), ep.clone()));
            next.push(ep);
            changed = true;
        }
        for e in old.iter() {
            if !next.iter().any(|n| n.id == e.id) {
                self.plane.routes.forget_endpoint(e);
                changed = true;
            }
        }
        if changed {
            route.set_endpoints(next);
        }
    }

    /// Lets the policy move the target; returns the record as it is now.
    async fn autoscale(
        &self,
        ctl: &Controller,
        service: &Service,
        route: &Arc<ServiceRoute>,
        observed: &[Observed],
        now: Timestamp,
    ) -> Result<Service, ServiceError> {
        let current = |o: &&Observed| {
            o.replica.generation == service.generation
                && !o.draining
                && !o.unhealthy
                && o.status
                    .is_some_and(|s| !s.is_terminal() && s != JobStatus::Stopping)
        };
        let load = Load {
            replicas: observed.iter().filter(current).filter(|o| o.ready).count() as u32,
            pending_works: observed.iter().filter(current).filter(|o| !o.ready).count() as u32
                + observed.iter().filter(|o| o.status.is_none()).count() as u32,
            pending_requests: route.pending() + route.cold_demand.swap(0, Ordering::SeqCst),
        };
        let default = autoscale::default_policy(load, service.spec.target_per_replica());
        let (proposed, policy_name, policy_error) = match &service.spec.serving.autoscale.policy {
            None => (default, "default".to_string(), None),
            Some(p) => {
                self.call_policy(ctl, service, route, load, p);
                match self.policies.fresh(&service.name).map(|o| o.result) {
                    Some(Ok(v)) => (
                        u32::try_from(v.max(0)).unwrap_or(u32::MAX),
                        format!("custom ({p})"),
                        None,
                    ),
                    Some(Err(e)) => (default, "default".to_string(), Some(e)),
                    None => (default, "default".to_string(), service.policy_error.clone()),
                }
            }
        };
        let service = &if policy_error != service.policy_error {
            if let Some(e) = &policy_error {
                warn!(service = %service.name, error = %e, "the custom policy failed; the default applies");
            }
            self.update(&service.name, |s| {
                if s.policy_error == policy_error {
                    return Ok(false);
                }
                s.policy_error = policy_error.clone();
                Ok(true)
            })
            .await?
        } else {
            service.clone()
        };
        let last = self
            .moves
            .lock()
            .unwrap()
            .get(&service.name)
            .copied()
            .unwrap_or_default();
        let Some(to) = autoscale::decide(service, proposed, load, last, now) else {
            return Ok(service.clone());
        };
        let from = service.target;
        let why = autoscale::why(load, from, to, &policy_name);
        let updated = self
            .update(&service.name, |s| {
                if s.target != from || s.desired != Desired::Run {
                    return Ok(false);
                }
                s.target = to;
                s.decision = Some(Decision {
                    at: now,
                    from,
                    to,
                    why: why.clone(),
                });
                Ok(true)
            })
            .await?;
        let mut moves = self.moves.lock().unwrap();
        let m = moves.entry(service.name.clone()).or_default();
        if to > from {
            m.out = Some(now);
        } else {
            m.r#in = Some(now);
        }
        info!(service = %service.name, from, to, %why, "scaled");
        Ok(updated)
    }

    /// Calls the service's policy through the agent of its oldest ready replica (none ready:
    /// no call, the default policy applies).
    fn call_policy(
        &self,
        ctl: &Controller,
        service: &Service,
        route: &Arc<ServiceRoute>,
        load: Load,
        policy: &str,
    ) {
        let endpoints = route.endpoints();
        let Some(ep) = endpoints
            .iter()
            .filter(|e| e.generation == service.generation && e.in_rotation())
            .min_by_key(|e| e.index)
        else {
            return;
        };
        let (rate, p50, p99) = {
            let st = route.stats.lock().unwrap();
            let (p50, p99) = st.percentiles().unzip();
            (st.rate(), p50, p99)
        };
        let extra = serde_json::json!({
            "queued": route.queued.load(Ordering::SeqCst),
            "request_rate": rate,
            "p50_ms": p50,
            "p99_ms": p99,
            "target": service.target,
            "min": service.spec.serving.replicas.min,
            "max": service.spec.serving.replicas.max,
        });
        self.policies.maybe_call(
            &ctl.agents,
            &service.name,
            policy,
            &ep.agent,
            &ep.job,
            ep.attempt,
            load,
            extra,
        );
    }

    async fn apply_step(
        &self,
        ctl: &Controller,
        service: &Service,
        route: &Arc<ServiceRoute>,
        jobs: &[(ReplicaRef, Option<Job>)],
        step: Step,
    ) -> Result<(), ServiceError> {
        match step {
            Step::Add => {
                let job = new_job_id();
                let generation = service.generation;
                let mut added = None;
                self.update(&service.name, |s| {
                    if s.generation != generation {
                        return Ok(false);
                    }
                    let r = ReplicaRef {
                        index: s.next_index,
                        job: job.clone(),
                        generation,
                    };
                    s.next_index += 1;
                    s.replicas.push(r.clone());
                    added = Some(r);
                    Ok(true)
                })
                .await?;
                if let Some(r) = added {
                    self.create_replica(ctl, service, &r).await?;
                }
            }
            Step::Create(r) => self.create_replica(ctl, service, &r).await?,
            Step::Drain(job) => {
                if let Some(e) = route.endpoints().iter().find(|e| e.job == job) {
                    e.draining.store(true, Ordering::SeqCst);
                    info!(service = %service.name, replica = e.index, %job, "replica draining");
                    route.changed();
                }
            }
            Step::Stop(job) => {
                if let Some(Err(why)) = ctl
                    .stop(&job)
                    .await
                    .map_err(|e| ServiceError::Refused(e.to_string()))?
                {
                    tracing::debug!(%job, %why, "replica already ended");
                }
            }
            Step::Forget(job) => {
                let ended = jobs
                    .iter()
                    .find(|(r, _)| r.job == job)
                    .and_then(|(r, j)| j.as_ref().map(|j| (r.index, j.clone())));
                self.update(&service.name, |s| {
                    if !s.replicas.iter().any(|r| r.job == job) {
                        return Ok(false);
                    }
                    s.forget(&job);
                    if let Some((index, j)) = &ended
                        && j.status == JobStatus::Failed
                    {
                        s.reason = Some(format!(
                            "replica {index} failed: {}",
                            j.reason.clone().unwrap_or_else(|| "no reason given".into())
                        ));
                    }
                    Ok(true)
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn create_replica(
        &self,
        ctl: &Controller,
        service: &Service,
        r: &ReplicaRef,
    ) -> Result<(), ServiceError> {
        if ctl.jobs.get(&r.job).is_some() {
            return Ok(());
        }
        let (spec, of): (runyard_model::JobSpec, ReplicaOf) = service.replica_job(r.index);
        let spec = ctl
            .secrets
            .resolve(&secrets_id(&service.name), &spec)
            .await
            .map_err(|e| ServiceError::Refused(format!("secrets: {e}")))?;
        let owner = service.owner.clone().unwrap_or_else(|| "admin".into());
        match ctl.create_job(r.job.clone(), spec, &owner, Some(of)).await {
            Ok(job) => {
                info!(service = %service.name, replica = r.index, job = %job.id, generation = r.generation, "replica created");
                Ok(())
            }
            Err(crate::executor::SubmitError::Store(crate::jobs::JobsError::Store(
                StoreError::Conflict { .. },
            ))) => Ok(()),
            Err(e) => Err(ServiceError::Refused(e.to_string())),
        }
    }
}
