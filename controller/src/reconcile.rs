//! The job state machine: a pure reconcile `(snapshot, now) -> plan`, and the pure transitions
//! that apply a planned action or an agent's status report to a job. No I/O, no clock reads, no
//! randomness: the executor (`executor.rs`) persists results and talks to agents.
//!
//! ```text
//!  pending ──place──▶ scheduled ──agent──▶ preparing ──▶ running ──▶ succeeded | failed
//!     ▲                   │                    │            │
//!     │                   └────────────────────┴────────────┴─ agent silent > ttl ─▶ lost
//!     ├──────────────── lost (lost_count < MAX_LOST) ◀──────────────────────────────────┘
//!     └──────────────── failed by the script, retries left
//!  desired=stop: pending|lost ─▶ stopped;  on an agent ─▶ stopping ─agent─▶ stopped
//! ```
//! Every action names the attempt it was planned for; applying it to a job that has moved on is a
//! no-op, so actions are idempotent and a stale plan can never undo newer state.

use std::collections::HashMap;
use std::time::Duration;

use runyard_model::job::MAX_LOST;
use runyard_model::{Desired, FailureKind, Job, JobStatus, Timestamp};

use crate::scheduler::{self, Capacity, Placement};

/// An agent as reconcile sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentView {
    pub name: String,
    pub connected: bool,
    /// Last heartbeat (or, after a controller restart, the restart time at the earliest).
    pub last_seen: Timestamp,
    pub cpu_small_slots: u32,
    pub gpus: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// pending -> scheduled as attempt `attempt` on `agent`, then tell the agent.
    Place {
        job: String,
        attempt: u32,
        agent: String,
        gpus: Vec<u32>,
    },
    /// A pending job stays pending; say why.
    Wait { job: String, reason: String },
    /// desired = stop on a job that holds nothing: -> stopped.
    Cancel { job: String },
    /// The agent of `attempt` has been silent past the TTL: -> lost (or stopped, if stopping).
    Lose { job: String, attempt: u32 },
    /// A lost attempt goes back to pending, or fails when lost too often.
    Requeue { job: String, attempt: u32 },
}

impl Action {
    pub fn job(&self) -> &str {
        match self {
            Action::Place { job, .. }
            | Action::Wait { job, .. }
            | Action::Cancel { job }
            | Action::Lose { job, .. }
            | Action::Requeue { job, .. } => job,
        }
    }
}

/// Plans the next actions. Pending jobs are placed oldest first.
pub fn reconcile(
    jobs: &[&Job],
    agents: &[AgentView],
    now: Timestamp,
    agent_ttl: Duration,
) -> Vec<Action> {
    let mut plan = Vec::new();
    let expired = |name: &str| {
        agents
            .iter()
            .find(|a| a.name == name)
            .is_none_or(|a| !a.connected && now.saturating_since(a.last_seen) > agent_ttl)
    };

    let mut fleet: Vec<Capacity> = agents
        .iter()
        .map(|a| Capacity {
            connected: a.connected,
            ..Capacity::new(a.name.clone(), a.cpu_small_slots, a.gpus.clone())
        })
        .collect();
    let index: HashMap<&str, usize> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| (a.name.as_str(), i))
        .collect();

    for job in jobs {
        if job.status.is_on_agent() {
            let agent = job.agent.as_deref().unwrap_or("");
            if expired(agent) {
                plan.push(Action::Lose {
                    job: job.id.clone(),
                    attempt: job.attempt,
                });
            } else if let Some(&i) = index.get(agent) {
                fleet[i].hold(job.spec.compute, &job.gpus);
            }
        }
    }

    let mut pending: Vec<&&Job> = jobs
        .iter()
        .filter(|j| j.status == JobStatus::Pending)
        .collect();
    pending.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    for job in jobs {
        match (job.status, job.desired) {
            (JobStatus::Pending | JobStatus::Lost, Desired::Stop) => plan.push(Action::Cancel {
                job: job.id.clone(),
            }),
            (JobStatus::Lost, Desired::Run) => plan.push(Action::Requeue {
                job: job.id.clone(),
                attempt: job.attempt,
            }),
            _ => {}
        }
    }
    for job in pending {
        if job.desired == Desired::Stop {
            continue;
        }
        match scheduler::place(job.spec.compute, &mut fleet) {
            Placement::Placed { agent, gpus } => plan.push(Action::Place {
                job: job.id.clone(),
                attempt: job.attempt + 1,
                agent,
                gpus,
            }),
            Placement::Wait(reason) => {
                if job.reason.as_deref() != Some(reason.as_str()) {
                    plan.push(Action::Wait {
                        job: job.id.clone(),
                        reason,
                    });
                }
            }
        }
    }
    plan
}

/// Applies a planned action to the job's current state. `None`: nothing to do (the job moved on).
pub fn apply(job: &Job, action: &Action, now: Timestamp) -> Option<Job> {
    let mut j = job.clone();
    match action {
        Action::Place {
            attempt,
            agent,
            gpus,
            ..
        } => {
            if job.status != JobStatus::Pending
                || job.desired != Desired::Run
                || *attempt != job.attempt + 1
            {
                return None;
            }
            j.status = JobStatus::Scheduled;
            j.attempt = *attempt;
            j.agent = Some(agent.clone());
            j.placements.push(runyard_model::Placed {
                attempt: *attempt,
                agent: agent.clone(),
            });
            j.gpus = gpus.clone();
            j.reason = None;
            j.failure = None;
            j.exit_code = None;
            j.scheduled_at = Some(now);
            j.started_at = None;
            j.finished_at = None;
            // A new attempt reports afresh.
            j.progress = None;
            j.metrics.clear();
            j.best = None;
            j.best_callback = None;
            j.environment = None;
            j.report_offset = 0;
        }
        Action::Wait { reason, .. } => {
            if job.status != JobStatus::Pending {
                return None;
            }
            j.reason = Some(reason.clone());
        }
        Action::Cancel { .. } => {
            if !matches!(job.status, JobStatus::Pending | JobStatus::Lost)
                || job.desired != Desired::Stop
            {
                return None;
            }
            finish(
                &mut j,
                JobStatus::Stopped,
                "stopped by user before it ran",
                None,
                now,
            );
        }
        Action::Lose { attempt, .. } => {
            if !job.status.is_on_agent() || job.attempt != *attempt {
                return None;
            }
            let agent = job.agent.clone().unwrap_or_default();
            if job.status == JobStatus::Stopping || job.desired == Desired::Stop {
                finish(
                    &mut j,
                    JobStatus::Stopped,
                    &format!("stopped by user; agent {agent} was lost before confirming"),
                    None,
                    now,
                );
            } else {
                j.status = JobStatus::Lost;
                j.lost_count += 1;
                j.reason = Some(format!(
                    "agent {agent} lost (no heartbeat); attempt {attempt} abandoned"
                ));
            }
        }
        Action::Requeue { attempt, .. } => {
            if job.status != JobStatus::Lost || job.attempt != *attempt {
                return None;
            }
            if job.lost_count >= MAX_LOST {
                finish(
                    &mut j,
                    JobStatus::Failed,
                    &format!("agent lost {} times; giving up", job.lost_count),
                    Some(FailureKind::AgentLost),
                    now,
                );
            } else {
                j.status = JobStatus::Pending;
                j.agent = None;
                j.gpus.clear();
                j.reason = Some(format!(
                    "attempt {attempt} lost with its agent; placing attempt {}",
                    attempt + 1
                ));
            }
        }
    }
    j.updated_at = now;
    Some(j)
}

fn finish(
    j: &mut Job,
    status: JobStatus,
    reason: &str,
    failure: Option<FailureKind>,
    now: Timestamp,
) {
    j.status = status;
    j.reason = Some(reason.to_string());
    j.failure = failure;
    j.finished_at = Some(now);
}

/// A user asks to stop the job. Returns the new job, or an error message for a finished job.
pub fn request_stop(job: &Job, now: Timestamp) -> Result<Job, String> {
    if job.status.is_terminal() {
        return Err(format!("job {} already {}", job.id, job.status));
    }
    let mut j = job.clone();
    j.desired = Desired::Stop;
    match job.status {
        JobStatus::Pending | JobStatus::Lost => finish(
            &mut j,
            JobStatus::Stopped,
            "stopped by user before it ran",
            None,
            now,
        ),
        _ => {
            j.status = JobStatus::Stopping;
            j.reason = Some("stopping at user's request".into());
        }
    }
    j.updated_at = now;
    Ok(j)
}

pub use runyard_model::{AttemptState, AttemptStatus};

/// How to answer the agent after its report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Nothing,
    /// The attempt is over for the controller: the agent may forget it.
    Release,
    /// The attempt must not run (replaced, or the job is finished or being stopped).
    Stop,
}

/// Applies an agent's report. Returns the new job (if it changed) and the reply.
pub fn on_status(
    job: &Job,
    st: &AttemptStatus,
    agent: &str,
    now: Timestamp,
) -> (Option<Job>, Reply) {
    let current = st.attempt == job.attempt
        && job.agent.as_deref() == Some(agent)
        && job.status.is_on_agent();
    if !current {
        // A stale attempt (fencing): stop it if it still runs, else let the agent forget it.
        return (
            None,
            if st.state.is_terminal() {
                Reply::Release
            } else {
                Reply::Stop
            },
        );
    }
    let mut j = job.clone();
    if let Some(c) = &st.commit {
        j.commit = Some(c.clone());
    }
    let reply = match st.state {
        AttemptState::Preparing | AttemptState::Running => {
            if job.status == JobStatus::Stopping {
                // Keep `stopping`; remind the agent.
                j.commit = st.commit.clone().or(j.commit);
                if j == *job {
                    return (None, Reply::Stop);
                }
                j.updated_at = now;
                return (Some(j), Reply::Stop);
            }
            let status = if st.state == AttemptState::Running {
                JobStatus::Running
            } else {
                JobStatus::Preparing
            };
            if job.status == JobStatus::Running && status == JobStatus::Preparing {
                return (None, Reply::Nothing);
            }
            j.status = status;
            if status == JobStatus::Running && j.started_at.is_none() {
                j.started_at = Some(now);
            }
            Reply::Nothing
        }
        AttemptState::Succeeded => {
            j.exit_code = st.exit_code;
            finish(&mut j, JobStatus::Succeeded, "", None, now);
            j.reason = None;
            Reply::Release
        }
        AttemptState::Stopped => {
            j.exit_code = st.exit_code;
            let reason = if st.reason.is_empty() {
                "stopped by user".to_string()
            } else {
                st.reason.clone()
            };
            finish(&mut j, JobStatus::Stopped, &reason, None, now);
            Reply::Release
        }
        AttemptState::Failed => {
            j.exit_code = st.exit_code;
            let retryable = matches!(st.failure, Some(FailureKind::Exit | FailureKind::Timeout));
            if retryable {
                j.failures += 1;
            }
            if retryable && job.desired == Desired::Run && j.failures <= job.spec.retries {
                j.status = JobStatus::Pending;
                j.agent = None;
                j.gpus.clear();
                j.failure = st.failure;
                j.reason = Some(format!(
                    "attempt {} failed: {}; retry {} of {}",
                    st.attempt, st.reason, j.failures, job.spec.retries
                ));
            } else {
                finish(
                    &mut j,
                    JobStatus::Failed,
                    &st.reason,
                    st.failure.or(Some(FailureKind::Agent)),
                    now,
                );
            }
            Reply::Release
        }
    };
    if j == *job {
        return (None, reply);
    }
    j.updated_at = now;
    (Some(j), reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::JobSpec;

    const TTL: Duration = Duration::from_secs(30);

    fn job(id: &str, compute: &str, created: u64) -> Job {
        let spec = JobSpec::from_json(
            format!(r#"{{"repo":"file:///r","script":"t.py","compute":"{compute}","retries":1}}"#)
                .as_bytes(),
        )
        .unwrap();
        Job::new(id.into(), spec, Timestamp(created))
    }

    fn agent(name: &str, slots: u32, gpus: Vec<u32>) -> AgentView {
        AgentView {
            name: name.into(),
            connected: true,
            last_seen: Timestamp(0),
            cpu_small_slots: slots,
            gpus,
        }
    }

    fn run_plan(jobs: &mut [Job], agents: &[AgentView], now: u64) -> Vec<Action> {
        let refs: Vec<&Job> = jobs.iter().collect();
        let plan = reconcile(&refs, agents, Timestamp(now), TTL);
        for a in &plan {
            let j = jobs.iter_mut().find(|j| j.id == a.job()).unwrap();
            if let Some(n) = apply(j, a, Timestamp(now)) {
                *j = n;
            }
        }
        plan
    }

    fn status(attempt: u32, state: AttemptState) -> AttemptStatus {
        AttemptStatus {
            state,
            ..AttemptStatus::preparing(attempt)
        }
    }

    #[test]
    fn oldest_pending_job_is_placed_first() {
        let mut jobs = vec![job("b", "cpu-small", 2), job("a", "cpu-small", 1)];
        run_plan(&mut jobs, &[agent("x", 1, vec![])], 10);
        assert_eq!(jobs[1].status, JobStatus::Scheduled);
        assert_eq!(jobs[1].attempt, 1);
        assert_eq!(jobs[0].status, JobStatus::Pending);
        assert!(jobs[0].reason.as_deref().unwrap().contains("cpu-small"));
    }

    #[test]
    fn wait_reason_is_written_once() {
        let mut jobs = vec![job("a", "gpu:2", 1)];
        let p1 = run_plan(&mut jobs, &[agent("x", 1, vec![0])], 10);
        assert_eq!(p1.len(), 1);
        let p2 = run_plan(&mut jobs, &[agent("x", 1, vec![0])], 11);
        assert!(p2.is_empty(), "{p2:?}");
    }

    #[test]
    fn running_jobs_hold_their_gpus() {
        let mut jobs = vec![job("a", "gpu", 1), job("b", "gpu", 2), job("c", "gpu", 3)];
        let agents = [agent("x", 0, vec![0, 1])];
        run_plan(&mut jobs, &agents, 10);
        let held: Vec<Vec<u32>> = jobs.iter().map(|j| j.gpus.clone()).collect();
        assert_eq!(held, vec![vec![0], vec![1], vec![]]);
        // Next pass: c still waits, a and b keep their GPUs.
        run_plan(&mut jobs, &agents, 11);
        assert_eq!(jobs[2].status, JobStatus::Pending);
        // a finishes: its GPU goes to c.
        let (j, _) = on_status(
            &jobs[0],
            &status(1, AttemptState::Succeeded),
            "x",
            Timestamp(12),
        );
        jobs[0] = j.unwrap();
        run_plan(&mut jobs, &agents, 13);
        assert_eq!(jobs[2].gpus, vec![0]);
    }

    #[test]
    fn silent_agent_loses_jobs_which_are_placed_again() {
        let mut jobs = vec![job("a", "cpu-small", 1)];
        let mut agents = vec![agent("x", 1, vec![]), agent("y", 1, vec![])];
        agents[1].connected = false;
        run_plan(&mut jobs, &agents, 1_000);
        assert_eq!(jobs[0].agent.as_deref(), Some("x"));
        agents[0].connected = false;
        agents[0].last_seen = Timestamp(1_000);
        run_plan(&mut jobs, &agents, 20_000);
        assert_eq!(
            jobs[0].status,
            JobStatus::Scheduled,
            "within the ttl nothing changes"
        );
        agents[1].connected = true;
        run_plan(&mut jobs, &agents, 32_000);
        assert_eq!(jobs[0].status, JobStatus::Lost);
        run_plan(&mut jobs, &agents, 33_000);
        assert_eq!(jobs[0].status, JobStatus::Pending);
        run_plan(&mut jobs, &agents, 34_000);
        assert_eq!(
            (jobs[0].status, jobs[0].agent.as_deref(), jobs[0].attempt),
            (JobStatus::Scheduled, Some("y"), 2)
        );
        // Each attempt remembers its agent: late lines of attempt 1 are still x's.
        assert_eq!(
            (jobs[0].placed_on(1), jobs[0].placed_on(2)),
            (Some("x"), Some("y"))
        );
    }

    #[test]
    fn lost_too_often_fails() {
        let mut j = job("a", "cpu-small", 1);
        j.status = JobStatus::Lost;
        j.lost_count = MAX_LOST;
        j.attempt = 3;
        let n = apply(
            &j,
            &Action::Requeue {
                job: "a".into(),
                attempt: 3,
            },
            Timestamp(5),
        )
        .unwrap();
        assert_eq!(
            (n.status, n.failure),
            (JobStatus::Failed, Some(FailureKind::AgentLost))
        );
    }

    #[test]
    fn stale_actions_are_no_ops() {
        let mut j = job("a", "cpu-small", 1);
        j.status = JobStatus::Running;
        j.attempt = 2;
        j.agent = Some("x".into());
        assert!(
            apply(
                &j,
                &Action::Lose {
                    job: "a".into(),
                    attempt: 1
                },
                Timestamp(5)
            )
            .is_none()
        );
        assert!(
            apply(
                &j,
                &Action::Place {
                    job: "a".into(),
                    attempt: 3,
                    agent: "x".into(),
                    gpus: vec![]
                },
                Timestamp(5)
            )
            .is_none()
        );
    }

    #[test]
    fn stale_attempt_reports_are_fenced() {
        let mut j = job("a", "cpu-small", 1);
        j.status = JobStatus::Running;
        j.attempt = 2;
        j.agent = Some("y".into());
        assert_eq!(
            on_status(&j, &status(1, AttemptState::Running), "x", Timestamp(5)),
            (None, Reply::Stop)
        );
        assert_eq!(
            on_status(&j, &status(1, AttemptState::Failed), "x", Timestamp(5)),
            (None, Reply::Release)
        );
        assert_eq!(
            on_status(&j, &status(2, AttemptState::Running), "x", Timestamp(5)),
            (None, Reply::Stop)
        );
    }

    #[test]
    fn script_failures_retry_then_fail() {
        let mut j = job("a", "cpu-small", 1);
        j.status = JobStatus::Running;
        j.attempt = 1;
        j.agent = Some("x".into());
        let fail = |attempt| AttemptStatus {
            exit_code: Some(3),
            reason: "script exited with code 3".into(),
            failure: Some(FailureKind::Exit),
            ..status(attempt, AttemptState::Failed)
        };
        let (n, reply) = on_status(&j, &fail(1), "x", Timestamp(5));
        let n = n.unwrap();
        assert_eq!((n.status, reply), (JobStatus::Pending, Reply::Release));
        assert!(n.reason.as_deref().unwrap().contains("retry 1 of 1"));
        let mut j2 = n;
        j2.status = JobStatus::Running;
        j2.attempt = 2;
        j2.agent = Some("x".into());
        let (n, _) = on_status(&j2, &fail(2), "x", Timestamp(6));
        let n = n.unwrap();
        assert_eq!(
            (n.status, n.exit_code, n.failure),
            (JobStatus::Failed, Some(3), Some(FailureKind::Exit))
        );
    }

    #[test]
    fn env_failures_are_not_retried() {
        let mut j = job("a", "cpu-small", 1);
        j.status = JobStatus::Preparing;
        j.attempt = 1;
        j.agent = Some("x".into());
        let st = AttemptStatus {
            failure: Some(FailureKind::Env),
            reason: "no such package".into(),
            ..status(1, AttemptState::Failed)
        };
        assert_eq!(
            on_status(&j, &st, "x", Timestamp(5)).0.unwrap().status,
            JobStatus::Failed
        );
    }

    #[test]
    fn stop_requests() {
        let j = job("a", "cpu-small", 1);
        let s = request_stop(&j, Timestamp(2)).unwrap();
        assert_eq!(s.status, JobStatus::Stopped);
        assert!(request_stop(&s, Timestamp(3)).is_err());
        let mut r = job("b", "cpu-small", 1);
        r.status = JobStatus::Running;
        r.attempt = 1;
        r.agent = Some("x".into());
        let s = request_stop(&r, Timestamp(2)).unwrap();
        assert_eq!(s.status, JobStatus::Stopping);
        // The agent still reports running: keep stopping, remind it.
        assert_eq!(
            on_status(&s, &status(1, AttemptState::Running), "x", Timestamp(3)).1,
            Reply::Stop
        );
        let (n, _) = on_status(&s, &status(1, AttemptState::Stopped), "x", Timestamp(4));
        assert_eq!(n.unwrap().status, JobStatus::Stopped);
    }

    #[test]
    fn stopping_job_with_lost_agent_is_stopped() {
        let mut j = job("a", "cpu-small", 1);
        j.status = JobStatus::Stopping;
        j.desired = Desired::Stop;
        j.attempt = 1;
        j.agent = Some("gone".into());
        let mut jobs = vec![j];
        run_plan(&mut jobs, &[], 100_000);
        assert_eq!(jobs[0].status, JobStatus::Stopped);
    }
}
