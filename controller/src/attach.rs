//! What the controller decides when an agent registers again or reports on an attempt, as pure
//! functions over job records, the agent's name and what it said: no I/O, no clock. The gRPC
//! session (`grpc.rs`) checks who is speaking, reads the records and line counts, calls these,
//! and turns their answers into messages and writes.
//!
//! ```text
//!  register(held attempts) ─▶ each held one placed here ──▶ resume its streams, apply its status
//!                             │                           └▶ no status yet and not current: fence
//!                             └ every attempt expected here but not held ─▶ scheduled: resend
//!                                                                          otherwise:  lose
//!  terminal status ─▶ every log and report line stored? ─ no ─▶ wait (the agent resends)
//!                                                       └ yes ─▶ reconcile::on_status
//! ```

use std::collections::HashSet;

use runyard_model::{Job, JobStatus};

use crate::reconcile::{Action, Reply};

/// The attempt is the job's current one on `agent` and still meant to run there.
pub fn is_current(job: &Job, agent: &str, attempt: u32) -> bool {
    job.attempt == attempt
        && job.agent.as_deref() == Some(agent)
        && job.status.is_on_agent()
        && job.status != JobStatus::Stopping
}

/// What to do about an attempt expected on the agent that it did not list when it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The assignment never reached the agent: send it again.
    Resend(String),
    /// The agent came back without a started attempt (it restarted): the attempt is lost.
    Lose(Action),
}

/// The attempts `jobs` expect on `agent` that are not in `held` (job id, attempt).
pub fn missing(jobs: &[Job], agent: &str, held: &HashSet<(String, u32)>) -> Vec<Missing> {
    jobs.iter()
        .filter(|j| {
            j.agent.as_deref() == Some(agent)
                && j.status.is_on_agent()
                && !held.contains(&(j.id.clone(), j.attempt))
        })
        .map(|j| {
            if j.status == JobStatus::Scheduled {
                Missing::Resend(j.id.clone())
            } else {
                Missing::Lose(Action::Lose {
                    job: j.id.clone(),
                    attempt: j.attempt,
                })
            }
        })
        .collect()
}

/// Line counts of an attempt's two streams: (log, report).
pub type Lines = (u64, u64);

/// A terminal status is applied only once every line the agent counted is stored, so a job's
/// logs and summary are complete before it shows as finished.
pub fn lines_complete(stored: Lines, counted: Lines) -> bool {
    stored.0 >= counted.0 && stored.1 >= counted.1
}

/// The answer to a status about a job the controller does not have: an attempt that ended is
/// forgotten, one that still runs is stopped.
pub fn unknown_job_reply(terminal: bool) -> Reply {
    if terminal {
        Reply::Release
    } else {
        Reply::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::{JobSpec, Timestamp};

    fn job(id: &str, status: JobStatus, agent: Option<&str>, attempt: u32) -> Job {
        let spec = JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py"}"#).unwrap();
        let mut j = Job::new(id.into(), spec, Timestamp(1));
        j.status = status;
        j.agent = agent.map(str::to_string);
        j.attempt = attempt;
        j
    }

    #[test]
    fn current_attempts() {
        use JobStatus::*;
        let cases = [
            (Running, Some("a"), 2, "a", 2, true),
            (Preparing, Some("a"), 2, "a", 2, true),
            (Scheduled, Some("a"), 2, "a", 2, true),
            (Stopping, Some("a"), 2, "a", 2, false),
            (Running, Some("a"), 2, "a", 1, false),
            (Running, Some("a"), 2, "b", 2, false),
            (Pending, None, 2, "a", 2, false),
            (Succeeded, Some("a"), 2, "a", 2, false),
            (Lost, Some("a"), 2, "a", 2, false),
        ];
        for (status, on, attempt, agent, asked, want) in cases {
            let j = job("j", status, on, attempt);
            assert_eq!(
                is_current(&j, agent, asked),
                want,
                "{status} on {on:?} attempt {attempt}, asked by {agent} about {asked}"
            );
        }
    }

    #[test]
    fn attempts_missing_from_a_registration() {
        let jobs = [
            job("sched", JobStatus::Scheduled, Some("a"), 1),
            job("run", JobStatus::Running, Some("a"), 3),
            job("stopping", JobStatus::Stopping, Some("a"), 1),
            job("held", JobStatus::Running, Some("a"), 2),
            job("other", JobStatus::Running, Some("b"), 1),
            job("pending", JobStatus::Pending, None, 0),
            job("done", JobStatus::Succeeded, Some("a"), 1),
        ];
        let held = HashSet::from([("held".to_string(), 2), ("run".to_string(), 2)]);
        let got = missing(&jobs, "a", &held);
        assert_eq!(
            got,
            [
                Missing::Resend("sched".into()),
                // Holding an older attempt is not holding the current one.
                Missing::Lose(Action::Lose {
                    job: "run".into(),
                    attempt: 3
                }),
                Missing::Lose(Action::Lose {
                    job: "stopping".into(),
                    attempt: 1
                }),
            ]
        );
        assert!(missing(&jobs, "c", &held).is_empty());
    }

    #[test]
    fn terminal_gate() {
        let cases = [
            ((10, 2), (10, 2), true),
            ((11, 2), (10, 2), true),
            ((9, 2), (10, 2), false),
            ((10, 1), (10, 2), false),
            ((0, 0), (0, 0), true),
        ];
        for (stored, counted, want) in cases {
            assert_eq!(
                lines_complete(stored, counted),
                want,
                "{stored:?} {counted:?}"
            );
        }
        assert_eq!(unknown_job_reply(true), Reply::Release);
        assert_eq!(unknown_job_reply(false), Reply::Stop);
    }
}
