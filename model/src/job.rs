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
        }
    }
}

/// How many times a lost attempt is placed again before the job fails.
pub const MAX_LOST: u32 = 3;

/// The layout of job records this version writes. A record without the field is version 1; a
/// record from a newer version loads too (unknown fields are ignored), so a rollback keeps its
/// jobs.
pub const JOB_SCHEMA_VERSION: u32 = 1;

/// The schema version of a stored record written before records carried one.
pub fn first_schema_version() -> u32 {
    1
}

/// A job as the controller stores it. Not the API's view of it (`runyard_api::JobView`): this
/// record may change without changing the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Layout version of this record (`JOB_SCHEMA_VERSION` when written by this version).
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub id: String,
    pub name: String,
    #[serde(deserialize_with = "crate::spec::known_fields")]
    pub spec: JobSpec,
    pub status: JobStatus,
    #[serde(default)]
    pub desired: Desired,
    /// Number of the current attempt; 0 until first placed.
    pub attempt: u32,
    /// Agent holding the current attempt.
    pub agent: Option<String>,
    /// GPU indices of the current attempt on its agent.
    #[serde(default)]
    pub gpus: Vec<u32>,
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
}

/// One attempt's placement, kept for the trust boundary (see `Job::placed_on`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub attempt: u32,
    pub agent: String,
}

impl Job {
    pub fn new(id: String, spec: JobSpec, now: Timestamp) -> Job {
        Job {
            schema_version: JOB_SCHEMA_VERSION,
            id,
            name: spec.name.clone(),
            spec,
            status: JobStatus::Pending,
            desired: Desired::Run,
            attempt: 0,
            agent: None,
            gpus: Vec::new(),
            commit: None,
            exit_code: None,
            reason: None,
            failure: None,
            lost_count: 0,
            failures: 0,
            created_at: now,
            updated_at: now,
            scheduled_at: None,
            started_at: None,
            finished_at: None,
            progress: None,
            metrics: BTreeMap::new(),
            best: None,
            best_callback: None,
            environment: None,
            report_offset: 0,
            placements: Vec::new(),
        }
    }

    /// The agent attempt `attempt` was placed on, if the record knows it: the current attempt's
    /// agent, or an older attempt's from `placements`.
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
