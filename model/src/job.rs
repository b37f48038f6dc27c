//! A job as the controller records it.
//!
//! ```text
//!  pending ──▶ scheduled ──▶ preparing ──▶ running ──▶ succeeded | failed
//!     ▲            │             │            │
//!     │            └─────────────┴────────────┴──▶ lost ──▶ pending (next attempt) | failed
//!     └───── failed, retries left (next attempt)
//!  desired = stop: pending ──▶ stopped;  scheduled|preparing|running ──▶ stopping ──▶ stopped
//! ```
//! Each placement is an *attempt* with a number; an agent holding an older attempt is told to
//! stop it (fencing).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::intent::{INTENT_SCHEMA_VERSION, Intent};
use crate::placement::{PLACEMENT_SCHEMA_VERSION, Placement};
use crate::report::{Best, Environment, Progress};
use crate::spec::JobSpec;
use crate::time::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Scheduled,
    Preparing,
    Running,
    Succeeded,
    Failed,
    Stopping,
    Stopped,
    Lost,
}

impl JobStatus {
    pub const ALL: [JobStatus; 9] = [
        JobStatus::Pending,
        JobStatus::Scheduled,
        JobStatus::Preparing,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Stopping,
        JobStatus::Stopped,
        JobStatus::Lost,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Stopped
        )
    }

    /// The attempt is placed on an agent and may hold resources there.
    pub fn is_on_agent(self) -> bool {
        matches!(
            self,
            JobStatus::Scheduled | JobStatus::Preparing | JobStatus::Running | JobStatus::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Scheduled => "scheduled",
            JobStatus::Preparing => "preparing",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Stopping => "stopping",
            JobStatus::Stopped => "stopped",
            JobStatus::Lost => "lost",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown status `{s}`: one of {}", all.join(", "))
            })
    }
}

/// What users want of the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    #[default]
    Run,
    Stop,
}

/// Why an attempt failed, as a machine-readable kind next to the human `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The repository could not be cloned or fetched.
    Clone,
    /// The revision does not exist in the repository.
    Revision,
    /// The script path is missing or escapes the repository.
    Script,
    /// The Python environment could not be built.
    Env,
    /// The script exited non-zero or was killed by a signal.
    Exit,
    /// The attempt ran past its timeout.
    Timeout,
    /// The agent running it was lost too many times.
    AgentLost,
    /// The agent could not start the process (or another agent-side error).
    Agent,
    /// The attempt used more memory than its spec's `memory` limit and was killed.
    Oom,
    /// An entry point's parameters do not fit what its `MLproject` declares (a wrong type, a
    /// required one missing, a path that is not there). Not retried.
    Params,
}

impl FailureKind {
    pub fn parse(s: &str) -> Option<FailureKind> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Clone => "clone",
            FailureKind::Revision => "revision",
            FailureKind::Script => "script",
            FailureKind::Env => "env",
            FailureKind::Exit => "exit",
            FailureKind::Timeout => "timeout",
            FailureKind::AgentLost => "agent_lost",
            FailureKind::Agent => "agent",
            FailureKind::Oom => "oom",
            FailureKind::Params => "params",
        }
    }
}

/// How many times a lost attempt is placed again before the job fails.
pub const MAX_LOST: u32 = 3;

/// The layout of job intents this version writes (see [`INTENT_SCHEMA_VERSION`]).
pub const JOB_SCHEMA_VERSION: u32 = INTENT_SCHEMA_VERSION;

/// The schema version of a stored record written before records carried one.
pub fn first_schema_version() -> u32 {
    1
}

/// A job as a whole: its intent composed with its current placement ([`JobState::view`]). What
/// the controller reads and shows; what it stores are the parts ([`Intent`], [`Placement`]). Also
/// the layout of the flat records of schema version 1, which load through
/// [`JobState::from_legacy`]. Not the API's view of it (`runyard_api::JobView`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Layout version of the intent (of the record, for a version 1 record).
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub id: String,
    pub name: String,
    #[serde(deserialize_with = "crate::spec::known_fields")]
    pub spec: JobSpec,
    pub status: JobStatus,
    #[serde(default)]
    pub desired: Desired,
    /// The name of the token that submitted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Number of the current attempt; 0 until first placed.
    pub attempt: u32,
    /// Agent holding the current attempt.
    pub agent: Option<String>,
    /// GPU indices of the current attempt on its agent.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// The port the agent gave the current attempt (`$PORT`), once it runs.
    #[serde(default)]
    pub port: Option<u16>,
    /// The resolved revision.
    pub commit: Option<String>,
    pub exit_code: Option<i32>,
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
    /// When the current attempt was placed / started running / ended.
    pub scheduled_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// Training progress of the current attempt, when the script reports it.
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
    /// The environment the current attempt runs with (pinned packages, build time).
    #[serde(default)]
    pub environment: Option<Environment>,
    /// Bytes of the current attempt's report stream folded into `progress`, `metrics`, `best`
    /// and `environment` so far.
    #[serde(default)]
    pub report_offset: u64,
    /// Which agent each attempt was placed on, oldest first: lines of an older attempt that
    /// arrive late are accepted from its own agent only. Empty in records written before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<Placed>,
    /// The service this job is a replica of (never in a version 1 record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<crate::service::ReplicaOf>,
    /// The job's MLflow run (never in a version 1 record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<crate::intent::MlflowRun>,
    /// The MLflow project entry point the current attempt runs (never in a version 1 record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<crate::mlproject::ProjectRun>,
}

/// Which agent an attempt was placed on (see `Job::placed_on`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub attempt: u32,
    pub agent: String,
}

impl Job {
    /// A new job as submitted: an intent with no placement yet.
    pub fn new(id: String, spec: JobSpec, now: Timestamp) -> Job {
        JobState::new(id, spec, now).view()
    }

    /// The agent attempt `attempt` was placed on, if known: the current attempt's agent, or an
    /// older attempt's from `placements`.
    pub fn placed_on(&self, attempt: u32) -> Option<&str> {
        if attempt == 0 || attempt > self.attempt {
            return None;
        }
        if attempt == self.attempt
            && let Some(agent) = &self.agent
        {
            return Some(agent);
        }
        self.placements
            .iter()
            .rev()
            .find(|p| p.attempt == attempt)
            .map(|p| p.agent.as_str())
    }
}

/// One job as the controller keeps it: its intent, the placement of its latest attempt, and
/// which agents held the earlier attempts. The state machine (`reconcile`) reads and writes this;
/// the store keeps the intent and each placement under their own keys.
#[derive(Clone, Debug, PartialEq)]
pub struct JobState {
    pub intent: Intent,
    /// The placement of attempt `intent.attempt`, when there is one.
    pub placement: Option<Placement>,
    /// Earlier attempts' agents, oldest first.
    pub earlier: Vec<Placed>,
}

impl JobState {
    pub fn new(id: String, spec: JobSpec, now: Timestamp) -> JobState {
        JobState {
            intent: Intent::new(id, spec, now),
            placement: None,
            earlier: Vec::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.intent.id
    }

    /// The placement of the current attempt, or `None` when the intent names one that is not
    /// known (yet): a view caught between two watch events.
    pub fn current(&self) -> Option<&Placement> {
        self.placement
            .as_ref()
            .filter(|p| p.attempt == self.intent.attempt && p.job == self.intent.id)
    }

    /// Whether the intent names an attempt whose placement is missing from this state.
    pub fn is_incomplete(&self) -> bool {
        self.intent.attempt > 0 && self.current().is_none()
    }

    /// The job as a whole: the intent's status, reason and counters; the current placement's
    /// agent, GPUs, timings, exit and reports. A job waiting for its next attempt shows no agent.
    pub fn view(&self) -> Job {
        let i = &self.intent;
        let p = self.current();
        let on_agent = p.filter(|_| i.status != JobStatus::Pending);
        let mut placements = self.earlier.clone();
        if let Some(p) = p {
            placements.push(Placed {
                attempt: p.attempt,
                agent: p.agent.clone(),
            });
        }
        Job {
            schema_version: i.schema_version,
            id: i.id.clone(),
            name: i.name.clone(),
            spec: i.spec.clone(),
            status: i.status,
            desired: i.desired,
            owner: i.owner.clone(),
            attempt: i.attempt,
            agent: on_agent.map(|p| p.agent.clone()),
            gpus: on_agent.map(|p| p.gpus.clone()).unwrap_or_default(),
            port: on_agent.and_then(|p| p.port),
            commit: p.and_then(|p| p.commit.clone()),
            exit_code: p.and_then(|p| p.exit_code),
            reason: i.reason.clone(),
            failure: i.failure,
            lost_count: i.lost_count,
            failures: i.failures,
            created_at: i.created_at,
            updated_at: p.map_or(i.updated_at, |p| p.updated_at.max(i.updated_at)),
            scheduled_at: p.map(|p| p.scheduled_at),
            started_at: p.and_then(|p| p.started_at),
            finished_at: i.finished_at,
            progress: p.and_then(|p| p.progress.clone()),
            metrics: p.map(|p| p.metrics.clone()).unwrap_or_default(),
            best: p.and_then(|p| p.best.clone()),
            best_callback: p.and_then(|p| p.best_callback),
            environment: p.and_then(|p| p.environment.clone()),
            report_offset: p.map_or(0, |p| p.report_offset),
            placements,
            service: i.service.clone(),
            mlflow: i.mlflow.clone(),
            project: p.and_then(|p| p.project.clone()),
        }
    }

    /// Splits a flat job record of schema version 1 into its intent and current placement.
    pub fn from_legacy(job: Job) -> JobState {
        let placement = job.placements.last().filter(|_| job.attempt > 0);
        let agent = job.agent.clone().or_else(|| {
            placement
                .filter(|p| p.attempt == job.attempt)
                .map(|p| p.agent.clone())
        });
        let placement = agent.map(|agent| {
            // The attempt's own status: the job's, unless the job already moved past it.
            let status = match job.status {
                JobStatus::Pending if job.failure.is_some() => JobStatus::Failed,
                JobStatus::Pending => JobStatus::Lost,
                s => s,
            };
            let attempt_over = status.is_terminal() || status == JobStatus::Lost;
            Placement {
                schema_version: PLACEMENT_SCHEMA_VERSION,
                job: job.id.clone(),
                attempt: job.attempt,
                agent,
                gpus: job.gpus.clone(),
                status,
                commit: job.commit.clone(),
                exit_code: job.exit_code,
                reason: job.reason.clone().filter(|_| attempt_over),
                failure: job.failure.filter(|_| attempt_over),
                scheduled_at: job.scheduled_at.unwrap_or(job.created_at),
                started_at: job.started_at,
                finished_at: job.finished_at,
                updated_at: job.updated_at,
                progress: job.progress.clone(),
                metrics: job.metrics.clone(),
                best: job.best.clone(),
                best_callback: job.best_callback,
                environment: job.environment.clone(),
                project: None,
                report_offset: job.report_offset,
                port: job.port,
            }
        });
        let earlier = job
            .placements
            .iter()
            .filter(|p| p.attempt < job.attempt)
            .cloned()
            .collect();
        JobState {
            intent: Intent {
                schema_version: INTENT_SCHEMA_VERSION,
                id: job.id,
                name: job.name,
                spec: job.spec,
                status: job.status,
                desired: job.desired,
                owner: job.owner.clone(),
                attempt: job.attempt,
                reason: job.reason,
                failure: job.failure,
                lost_count: job.lost_count,
                failures: job.failures,
                created_at: job.created_at,
                updated_at: job.updated_at,
                finished_at: job.finished_at,
                service: None,
                mlflow: None,
            },
            placement,
            earlier,
        }
    }
}

/// Whether `id` has the form of a job id as the controller makes them: a ULID in lower case (26
/// characters of Crockford's base32). Ids from peers are checked with this before they name a
/// file.
pub fn is_job_id(id: &str) -> bool {
    const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    id.len() == 26 && id.as_bytes()[0] <= b'7' && id.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod trust_tests {
    use super::*;

    #[test]
    fn each_attempt_is_placed_on_its_own_agent() {
        let spec = crate::JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py"}"#).unwrap();
        let mut j = Job::new("01hzx3k8m9q2r4s5t6v7w8x9yz".into(), spec, Timestamp(0));
        assert_eq!(j.placed_on(0), None);
        assert_eq!(j.placed_on(1), None, "not placed yet");
        for (attempt, agent) in [(1, "a"), (2, "b")] {
            j.attempt = attempt;
            j.agent = Some(agent.into());
            j.placements.push(Placed {
                attempt,
                agent: agent.into(),
            });
        }
        // Late lines of the lost attempt 1 come from `a`; attempt 2 is `b`'s.
        assert_eq!(j.placed_on(1), Some("a"));
        assert_eq!(j.placed_on(2), Some("b"));
        assert_eq!(j.placed_on(3), None);
        // Requeued (no agent now): the history still knows.
        j.agent = None;
        assert_eq!(j.placed_on(2), Some("b"));
        // A record written before the history: only the current attempt is known.
        j.placements.clear();
        j.agent = Some("b".into());
        assert_eq!((j.placed_on(1), j.placed_on(2)), (None, Some("b")));
        // Old records load.
        let mut old = serde_json::to_value(&j).unwrap();
        old.as_object_mut().unwrap().remove("placements");
        let back: Job = serde_json::from_value(old).unwrap();
        assert!(back.placements.is_empty());
    }

    #[test]
    fn job_ids_are_lower_case_ulids() {
        assert!(is_job_id("01hzx3k8m9q2r4s5t6v7w8x9yz"));
        for bad in [
            "",
            "j",
            "../../../../tmp/x",
            "/tmp/01hzx3k8m9q2r4s5t6v7w8x9y",
            "01HZX3K8M9Q2R4S5T6V7W8X9YZ",
            "01hzx3k8m9q2r4s5t6v7w8x9y/",
            "81hzx3k8m9q2r4s5t6v7w8x9yz",
            "01hzx3k8m9q2r4s5t6v7w8x9yzz",
            "01hzx3k8m9q2r4s5t6v7w8x9.z",
        ] {
            assert!(!is_job_id(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> serde_json::Value {
        let spec = JobSpec::from_json(br#"{"repo": "https://h/a/b.git", "script": "t.py"}"#)
            .expect("valid spec");
        serde_json::to_value(Job::new("01j".into(), spec, Timestamp(1))).unwrap()
    }

    #[test]
    fn a_record_without_schema_version_is_version_1() {
        let mut v = stored();
        v.as_object_mut().unwrap().remove("schema_version");
        let job: Job = serde_json::from_value(v).expect("an old record loads (upgrade)");
        assert_eq!(job.schema_version, 1);
    }

    #[test]
    fn a_newer_record_with_unknown_fields_loads() {
        let mut v = stored();
        v["schema_version"] = 7.into();
        v["intent"] = serde_json::json!({"kind": "sweep", "trials": 3});
        v["placement"] = "somewhere".into();
        v["spec"]["priority"] = 5.into();
        let job: Job = serde_json::from_value(v).expect("a newer record loads (rollback)");
        assert_eq!((job.schema_version, job.id.as_str()), (7, "01j"));
    }
}
