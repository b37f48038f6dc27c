//! The job state machine: a pure reconcile `(intents with their placements, agents, now) ->
//! plan`, and the pure transitions that apply a planned action or an agent's status report to a
//! job's state (`JobState`: its intent and current placement). No I/O, no clock reads, no
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
//! These are the job's states (its intent's `status`). Each placement keeps its attempt's own
//! status: a placement ends `succeeded`, `failed`, `stopped` or `lost`, and a job placed again
//! starts a new placement (`Place`), so an attempt's record is never rewritten by the next one.
//!
//! Every action names the attempt it was planned for; applying it to a job that has moved on is a
//! no-op, so actions are idempotent and a stale plan can never undo newer state.

use std::collections::HashMap;
use std::time::Duration;

use runyard_model::job::MAX_LOST;
use runyard_model::{Desired, FailureKind, JobState, JobStatus, Placed, Placement, Timestamp};

use crate::scheduler::{self, Capacity};

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
    /// pending -> scheduled as attempt `attempt` on `agent` (a new placement), then tell the
    /// agent.
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

/// Plans the next actions. Pending jobs are placed oldest first. A job whose current placement
/// is not known yet (the view caught between two writes of one transaction) is left for the next
/// pass: it may hold resources that reconcile cannot see.
pub fn reconcile(
    jobs: &[&JobState],
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

    let complete: Vec<&JobState> = jobs
        .iter()
        .copied()
        .filter(|s| !s.is_incomplete())
        .collect();
    for s in &complete {
        let (job, Some(p)) = (&s.intent, s.current()) else {
            continue;
        };
        if job.status.is_on_agent() {
            if expired(&p.agent) {
                plan.push(Action::Lose {
                    job: job.id.clone(),
                    attempt: job.attempt,
                });
            } else if let Some(&i) = index.get(p.agent.as_str()) {
                fleet[i].hold(job.spec.compute, &p.gpus);
            }
        }
    }

    let mut pending: Vec<&JobState> = complete
        .iter()
        .copied()
        .filter(|s| s.intent.status == JobStatus::Pending)
        .collect();
    pending.sort_by(|a, b| {
        a.intent
            .created_at
            .cmp(&b.intent.created_at)
            .then_with(|| a.intent.id.cmp(&b.intent.id))
    });
    for s in &complete {
        let job = &s.intent;
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
    for s in pending {
        let job = &s.intent;
        if job.desired == Desired::Stop {
            continue;
        }
        match scheduler::place(job.spec.compute, &mut fleet) {
            scheduler::Placement::Placed { agent, gpus } => plan.push(Action::Place {
                job: job.id.clone(),
                attempt: job.attempt + 1,
                agent,
                gpus,
            }),
            scheduler::Placement::Wait(reason) => {
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
pub fn apply(state: &JobState, action: &Action, now: Timestamp) -> Option<JobState> {
    let job = &state.intent;
    let mut s = state.clone();
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
            if let Some(p) = s.placement.take() {
                s.earlier.push(Placed {
                    attempt: p.attempt,
                    agent: p.agent,
                });
            }
            s.placement = Some(Placement::new(&job.id, *attempt, agent, gpus.clone(), now));
            let i = &mut s.intent;
            i.status = JobStatus::Scheduled;
            i.attempt = *attempt;
            i.reason = None;
            i.failure = None;
            i.finished_at = None;
        }
        Action::Wait { reason, .. } => {
            if job.status != JobStatus::Pending {
                return None;
            }
            s.intent.reason = Some(reason.clone());
        }
        Action::Cancel { .. } => {
            if !matches!(job.status, JobStatus::Pending | JobStatus::Lost)
                || job.desired != Desired::Stop
            {
                return None;
            }
            s.intent.finish(
                JobStatus::Stopped,
                Some("stopped by user before it ran".into()),
                None,
                now,
            );
        }
        Action::Lose { attempt, .. } => {
            if !job.status.is_on_agent() || job.attempt != *attempt {
                return None;
            }
            let p = s.placement.as_mut()?;
            let agent = p.agent.clone();
            let lost = format!("agent {agent} lost (no heartbeat); attempt {attempt} abandoned");
            p.end(JobStatus::Lost, Some(lost.clone()), None, now);
            p.updated_at = now;
            if job.status == JobStatus::Stopping || job.desired == Desired::Stop {
                s.intent.finish(
                    JobStatus::Stopped,
                    Some(format!(
                        "stopped by user; agent {agent} was lost before confirming"
                    )),
                    None,
                    now,
                );
            } else {
                s.intent.status = JobStatus::Lost;
                s.intent.lost_count += 1;
                s.intent.reason = Some(lost);
            }
        }
        Action::Requeue { attempt, .. } => {
            if job.status != JobStatus::Lost || job.attempt != *attempt {
                return None;
            }
            if job.lost_count >= MAX_LOST {
                s.intent.finish(
                    JobStatus::Failed,
                    Some(format!("agent lost {} times; giving up", job.lost_count)),
                    Some(FailureKind::AgentLost),
                    now,
                );
            } else {
                s.intent.status = JobStatus::Pending;
                s.intent.reason = Some(format!(
                    "attempt {attempt} lost with its agent; placing attempt {}",
                    attempt + 1
                ));
            }
        }
    }
    s.intent.updated_at = now;
    Some(s)
}

/// A user asks to stop the job. Returns the new state, or an error message for a finished job.
pub fn request_stop(state: &JobState, now: Timestamp) -> Result<JobState, String> {
    let job = &state.intent;
    if job.status.is_terminal() {
        return Err(format!("job {} already {}", job.id, job.status));
    }
    let mut s = state.clone();
    s.intent.desired = Desired::Stop;
    match job.status {
        JobStatus::Pending | JobStatus::Lost => s.intent.finish(
            JobStatus::Stopped,
            Some("stopped by user before it ran".into()),
            None,
            now,
        ),
        _ => {
            s.intent.status = JobStatus::Stopping;
            s.intent.reason = Some("stopping at user's request".into());
            if let Some(p) = s.placement.as_mut() {
                p.status = JobStatus::Stopping;
                p.updated_at = now;
            }
        }
    }
    s.intent.updated_at = now;
    Ok(s)
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

/// Applies an agent's report of one attempt. Returns the new state (if it changed) and the reply.
pub fn on_status(
    state: &JobState,
    st: &AttemptStatus,
    agent: &str,
    now: Timestamp,
) -> (Option<JobState>, Reply) {
    let job = &state.intent;
    let current = state
        .current()
        .filter(|p| st.attempt == job.attempt && p.agent == agent && job.status.is_on_agent());
    if current.is_none() {
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
    let mut s = state.clone();
    let (i, p) = (&mut s.intent, s.placement.as_mut().expect("checked above"));
    if let Some(c) = &st.commit {
        p.commit = Some(c.clone());
    }
    if st.port.is_some() {
        p.port = st.port;
    }
    let reply = match st.state {
        AttemptState::Preparing | AttemptState::Running => {
            if job.status == JobStatus::Stopping {
                // Keep `stopping`; remind the agent.
                if s == *state {
                    return (None, Reply::Stop);
                }
                s.placement.as_mut().expect("checked above").updated_at = now;
                return (Some(s), Reply::Stop);
            }
            let status = if st.state == AttemptState::Running {
                JobStatus::Running
            } else {
                JobStatus::Preparing
            };
            if job.status == JobStatus::Running && status == JobStatus::Preparing {
                return (None, Reply::Nothing);
            }
            i.status = status;
            p.status = status;
            if status == JobStatus::Running && p.started_at.is_none() {
                p.started_at = Some(now);
            }
            Reply::Nothing
        }
        AttemptState::Succeeded => {
            p.exit_code = st.exit_code;
            p.end(JobStatus::Succeeded, None, None, now);
            i.finish(JobStatus::Succeeded, None, None, now);
            Reply::Release
        }
        AttemptState::Stopped => {
            p.exit_code = st.exit_code;
            let reason = if st.reason.is_empty() {
                "stopped by user".to_string()
            } else {
                st.reason.clone()
            };
            p.end(JobStatus::Stopped, Some(reason.clone()), None, now);
            i.finish(JobStatus::Stopped, Some(reason), None, now);
            Reply::Release
        }
        AttemptState::Failed => {
            p.exit_code = st.exit_code;
            let failure = st.failure.or(Some(FailureKind::Agent));
            p.end(JobStatus::Failed, Some(st.reason.clone()), failure, now);
            let retryable = matches!(
                st.failure,
                Some(FailureKind::Exit | FailureKind::Timeout | FailureKind::Oom)
            );
            if retryable {
                i.failures += 1;
            }
            if retryable && job.desired == Desired::Run && i.failures <= job.spec.retries {
                i.status = JobStatus::Pending;
                i.failure = st.failure;
                i.reason = Some(format!(
                    "attempt {} failed: {}; retry {} of {}",
                    st.attempt, st.reason, i.failures, job.spec.retries
                ));
            } else {
                i.finish(JobStatus::Failed, Some(st.reason.clone()), failure, now);
            }
            Reply::Release
        }
    };
    if s == *state {
        return (None, reply);
    }
    if s.intent != state.intent {
        s.intent.updated_at = now;
    }
    if s.placement != state.placement
        && let Some(p) = s.placement.as_mut()
    {
        p.updated_at = now;
    }
    (Some(s), reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::{Job, JobSpec};

    const TTL: Duration = Duration::from_secs(30);

    fn job(id: &str, compute: &str, created: u64) -> JobState {
        let spec = JobSpec::from_json(
            format!(r#"{{"repo":"file:///r","script":"t.py","compute":"{compute}","retries":1}}"#)
                .as_bytes(),
        )
        .unwrap();
        JobState::new(id.into(), spec, Timestamp(created))
    }

    /// A job whose attempt `attempt` is on `agent` in `status`.
    fn placed(id: &str, attempt: u32, agent: &str, status: JobStatus) -> JobState {
        let mut s = job(id, "cpu-small", 1);
        s.intent.status = status;
        s.intent.attempt = attempt;
        let mut p = Placement::new(id, attempt, agent, vec![], Timestamp(1));
        p.status = status;
        s.placement = Some(p);
        s
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

    fn run_plan(jobs: &mut [JobState], agents: &[AgentView], now: u64) -> Vec<Action> {
        let refs: Vec<&JobState> = jobs.iter().collect();
        let plan = reconcile(&refs, agents, Timestamp(now), TTL);
        for a in &plan {
            let j = jobs.iter_mut().find(|j| j.id() == a.job()).unwrap();
            if let Some(n) = apply(j, a, Timestamp(now)) {
                *j = n;
            }
        }
        plan
    }

    fn views(jobs: &[JobState]) -> Vec<Job> {
        jobs.iter().map(JobState::view).collect()
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
        let v = views(&jobs);
        assert_eq!(v[1].status, JobStatus::Scheduled);
        assert_eq!(v[1].attempt, 1);
        assert_eq!(v[0].status, JobStatus::Pending);
        assert!(v[0].reason.as_deref().unwrap().contains("cpu-small"));
        // The placement is its own record; the intent only names its number.
        let p = jobs[1].placement.as_ref().unwrap();
        assert_eq!(
            (p.attempt, p.agent.as_str(), p.status),
            (1, "x", JobStatus::Scheduled)
        );
        assert!(jobs[0].placement.is_none());
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
        let held: Vec<Vec<u32>> = views(&jobs).iter().map(|j| j.gpus.clone()).collect();
        assert_eq!(held, vec![vec![0], vec![1], vec![]]);
        // Next pass: c still waits, a and b keep their GPUs.
        run_plan(&mut jobs, &agents, 11);
        assert_eq!(jobs[2].intent.status, JobStatus::Pending);
        // a finishes: its GPU goes to c.
        let (j, _) = on_status(
            &jobs[0],
            &status(1, AttemptState::Succeeded),
            "x",
            Timestamp(12),
        );
        jobs[0] = j.unwrap();
        run_plan(&mut jobs, &agents, 13);
        assert_eq!(jobs[2].view().gpus, vec![0]);
    }

    #[test]
    fn a_job_whose_placement_is_not_known_yet_is_left_alone() {
        // The intent names attempt 1 on an agent, but its placement has not arrived: reconcile
        // must neither lose it (no agent known) nor give its resources away.
        let mut s = placed("a", 1, "x", JobStatus::Running);
        s.placement = None;
        let waiting = job("b", "cpu-small", 2);
        let jobs = [&s, &waiting];
        let plan = reconcile(&jobs, &[agent("x", 1, vec![])], Timestamp(100_000), TTL);
        assert_eq!(
            plan,
            vec![Action::Place {
                job: "b".into(),
                attempt: 1,
                agent: "x".into(),
                gpus: vec![]
            }]
        );
        assert!(s.is_incomplete());
    }

    #[test]
    fn silent_agent_loses_jobs_which_are_placed_again() {
        let mut jobs = vec![job("a", "cpu-small", 1)];
        let mut agents = vec![agent("x", 1, vec![]), agent("y", 1, vec![])];
        agents[1].connected = false;
        run_plan(&mut jobs, &agents, 1_000);
        assert_eq!(jobs[0].view().agent.as_deref(), Some("x"));
        agents[0].connected = false;
        agents[0].last_seen = Timestamp(1_000);
        run_plan(&mut jobs, &agents, 20_000);
        assert_eq!(
            jobs[0].intent.status,
            JobStatus::Scheduled,
            "within the ttl nothing changes"
        );
        agents[1].connected = true;
        run_plan(&mut jobs, &agents, 32_000);
        assert_eq!(jobs[0].intent.status, JobStatus::Lost);
        assert_eq!(
            jobs[0].placement.as_ref().unwrap().status,
            JobStatus::Lost,
            "the attempt itself is lost"
        );
        run_plan(&mut jobs, &agents, 33_000);
        assert_eq!(jobs[0].intent.status, JobStatus::Pending);
        assert_eq!(jobs[0].view().agent, None, "waiting for its next attempt");
        assert_eq!(jobs[0].placement.as_ref().unwrap().status, JobStatus::Lost);
        run_plan(&mut jobs, &agents, 34_000);
        let v = jobs[0].view();
        assert_eq!(
            (v.status, v.agent.as_deref(), v.attempt),
            (JobStatus::Scheduled, Some("y"), 2)
        );
        // Each attempt remembers its agent: late lines of attempt 1 are still x's.
        assert_eq!((v.placed_on(1), v.placed_on(2)), (Some("x"), Some("y")));
    }

    #[test]
    fn lost_too_often_fails() {
        let mut j = placed("a", 3, "x", JobStatus::Lost);
        j.intent.lost_count = MAX_LOST;
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
            (n.intent.status, n.intent.failure),
            (JobStatus::Failed, Some(FailureKind::AgentLost))
        );
    }

    #[test]
    fn stale_actions_are_no_ops() {
        let j = placed("a", 2, "x", JobStatus::Running);
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
        let j = placed("a", 2, "y", JobStatus::Running);
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
        let j = placed("a", 1, "x", JobStatus::Running);
        let fail = |attempt| AttemptStatus {
            exit_code: Some(3),
            reason: "script exited with code 3".into(),
            failure: Some(FailureKind::Exit),
            ..status(attempt, AttemptState::Failed)
        };
        let (n, reply) = on_status(&j, &fail(1), "x", Timestamp(5));
        let n = n.unwrap();
        assert_eq!(
            (n.intent.status, reply),
            (JobStatus::Pending, Reply::Release)
        );
        assert!(n.intent.reason.as_deref().unwrap().contains("retry 1 of 1"));
        // The attempt keeps its own outcome while the job waits for the next one.
        let p = n.placement.as_ref().unwrap();
        assert_eq!(
            (p.status, p.exit_code, p.failure, p.finished_at),
            (
                JobStatus::Failed,
                Some(3),
                Some(FailureKind::Exit),
                Some(Timestamp(5))
            )
        );
        let placed_again = apply(
            &n,
            &Action::Place {
                job: "a".into(),
                attempt: 2,
                agent: "x".into(),
                gpus: vec![],
            },
            Timestamp(6),
        )
        .unwrap();
        let (running, _) = on_status(
            &placed_again,
            &status(2, AttemptState::Running),
            "x",
            Timestamp(7),
        );
        let (n, _) = on_status(&running.unwrap(), &fail(2), "x", Timestamp(8));
        let n = n.unwrap().view();
        assert_eq!(
            (n.status, n.exit_code, n.failure),
            (JobStatus::Failed, Some(3), Some(FailureKind::Exit))
        );
        assert_eq!(n.placed_on(1), Some("x"));
    }

    #[test]
    fn env_failures_are_not_retried() {
        let j = placed("a", 1, "x", JobStatus::Preparing);
        let st = AttemptStatus {
            failure: Some(FailureKind::Env),
            reason: "no such package".into(),
            ..status(1, AttemptState::Failed)
        };
        assert_eq!(
            on_status(&j, &st, "x", Timestamp(5))
                .0
                .unwrap()
                .intent
                .status,
            JobStatus::Failed
        );
    }

    #[test]
    fn a_report_of_the_placement_alone_leaves_the_intent_as_it_was() {
        let j = placed("a", 1, "x", JobStatus::Running);
        let st = AttemptStatus {
            commit: Some("abc".into()),
            ..status(1, AttemptState::Running)
        };
        let (n, reply) = on_status(&j, &st, "x", Timestamp(5));
        let n = n.unwrap();
        assert_eq!(reply, Reply::Nothing);
        assert_eq!(n.intent, j.intent, "only the placement changed");
        assert_eq!(n.placement.as_ref().unwrap().commit.as_deref(), Some("abc"));
        assert_eq!(n.placement.as_ref().unwrap().updated_at, Timestamp(5));
    }

    #[test]
    fn stop_requests() {
        let j = job("a", "cpu-small", 1);
        let s = request_stop(&j, Timestamp(2)).unwrap();
        assert_eq!(s.intent.status, JobStatus::Stopped);
        assert!(request_stop(&s, Timestamp(3)).is_err());
        let r = placed("b", 1, "x", JobStatus::Running);
        let s = request_stop(&r, Timestamp(2)).unwrap();
        assert_eq!(s.intent.status, JobStatus::Stopping);
        // The agent still reports running: keep stopping, remind it.
        assert_eq!(
            on_status(&s, &status(1, AttemptState::Running), "x", Timestamp(3)).1,
            Reply::Stop
        );
        let (n, _) = on_status(&s, &status(1, AttemptState::Stopped), "x", Timestamp(4));
        let n = n.unwrap();
        assert_eq!(n.intent.status, JobStatus::Stopped);
        assert_eq!(n.placement.unwrap().status, JobStatus::Stopped);
    }

    #[test]
    fn stopping_job_with_lost_agent_is_stopped() {
        let mut j = placed("a", 1, "gone", JobStatus::Stopping);
        j.intent.desired = Desired::Stop;
        let mut jobs = vec![j];
        run_plan(&mut jobs, &[], 100_000);
        assert_eq!(jobs[0].intent.status, JobStatus::Stopped);
        assert_eq!(jobs[0].placement.as_ref().unwrap().status, JobStatus::Lost);
    }
}
