//! What a service needs done to its replicas, as a pure function of its record, what is known of
//! each replica (its job's status, readiness, drain, requests in flight) and nothing else: the
//! executor (`services/mod.rs`) applies the steps. Replicas are made before old ones go (a
//! rollout keeps as many ready replicas as the target), scale-in drains first, and a drained
//! replica is stopped only once its last request has finished.

use runyard_model::service::{ReplicaRef, Service};
use runyard_model::{Desired, JobStatus};

/// What is known of one replica of the record's live list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub replica: ReplicaRef,
    /// The job's status; `None` when its job is not stored (yet).
    pub status: Option<JobStatus>,
    /// Passes its readiness check now.
    pub ready: bool,
    /// Was ready, then stopped answering its check.
    pub unhealthy: bool,
    /// Taken out of rotation.
    pub draining: bool,
    /// Requests it is answering now.
    pub in_flight: usize,
}

impl Observed {
    fn leaving(&self) -> bool {
        self.draining || self.status == Some(JobStatus::Stopping)
    }
}

/// One step of a service's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Make a new replica of the current generation.
    Add,
    /// The record names a job not stored yet: create it.
    Create(ReplicaRef),
    /// Take the replica out of rotation; it finishes what it has.
    Drain(String),
    /// Stop the replica's job (SIGTERM, grace, SIGKILL).
    Stop(String),
    /// The replica's job ended: move it to the ended list (its status says why).
    Forget(String),
}

/// The steps that bring `service`'s replicas towards its target and generation.
pub fn plan(service: &Service, observed: &[Observed]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut live = Vec::new();
    for o in observed {
        match o.status {
            Some(s) if s.is_terminal() => steps.push(Step::Forget(o.replica.job.clone())),
            None => {
                steps.push(Step::Create(o.replica.clone()));
                live.push(o);
            }
            Some(_) => live.push(o),
        }
    }
    // Drained and idle: stop. Unhealthy: stop (it is replaced below).
    for o in &live {
        if o.status.is_some_and(|s| s != JobStatus::Stopping)
            && ((o.draining && o.in_flight == 0) || (o.unhealthy && !o.draining))
        {
            steps.push(Step::Stop(o.replica.job.clone()));
        }
    }
    let want = match service.desired {
        Desired::Run => service.target as usize,
        Desired::Stop => 0,
    };
    let staying = |o: &&&Observed| !o.leaving() && !o.unhealthy;
    let (current, old): (Vec<&Observed>, Vec<&Observed>) = live
        .iter()
        .filter(staying)
        .partition(|o| o.replica.generation == service.generation);
    if current.len() < want {
        steps.extend(std::iter::repeat_n(Step::Add, want - current.len()));
    }
    // Scale in: drop replicas that are not ready first, then the newest.
    let mut excess = by_leaving_order(current);
    excess.truncate(excess.len().saturating_sub(want));
    let ready_current = live
        .iter()
        .filter(staying)
        .filter(|o| o.replica.generation == service.generation && o.ready)
        .count();
    // A rollout: old replicas go as new ones become ready.
    let keep_old = want.saturating_sub(ready_current);
    let mut old = by_leaving_order(old);
    old.truncate(old.len().saturating_sub(keep_old));
    for o in excess.into_iter().chain(old) {
        steps.push(leave(o));
    }
    steps
}

/// The order replicas leave in: those not ready first, then the newest.
fn by_leaving_order(mut v: Vec<&Observed>) -> Vec<&Observed> {
    v.sort_by_key(|o| (o.ready, std::cmp::Reverse(o.replica.index)));
    v
}

/// A ready replica drains; one that is not ready has nothing to finish.
fn leave(o: &Observed) -> Step {
    if o.ready && o.status.is_some() {
        Step::Drain(o.replica.job.clone())
    } else if o.status.is_some() {
        Step::Stop(o.replica.job.clone())
    } else {
        // Not even stored: forgetting it is enough (its job is never created).
        Step::Forget(o.replica.job.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::service::ServiceSpec;
    use runyard_model::{Timestamp, service::ReplicaRef};

    fn service(target: u32, generation: u64) -> Service {
        let spec = ServiceSpec::from_value(serde_json::json!({
            "name": "s", "repo": "https://example.com/r.git", "script": "serve.py",
            "replicas": {"min": 0, "max": 8}
        }))
        .unwrap();
        let mut s = Service::new(spec, None, Timestamp::from_millis(0));
        s.target = target;
        s.generation = generation;
        s
    }

    fn obs(index: u32, generation: u64, status: Option<JobStatus>, ready: bool) -> Observed {
        Observed {
            replica: ReplicaRef {
                index,
                job: format!("j{index}"),
                generation,
            },
            status,
            ready,
            unhealthy: false,
            draining: false,
            in_flight: 0,
        }
    }

    use JobStatus::*;

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            target: u32,
            generation: u64,
            observed: Vec<Observed>,
            want: Vec<Step>,
        }
        let drain = |o: Observed, in_flight: usize| Observed {
            draining: true,
            in_flight,
            ..o
        };
        let cases = vec![
            Case {
                name: "an empty service gets its target",
                target: 2,
                generation: 1,
                observed: vec![],
                want: vec![Step::Add, Step::Add],
            },
            Case {
                name: "a replica not stored yet is created and counts",
                target: 1,
                generation: 1,
                observed: vec![obs(1, 1, None, false)],
                want: vec![Step::Create(obs(1, 1, None, false).replica)],
            },
            Case {
                name: "an ended replica is forgotten and replaced",
                target: 1,
                generation: 1,
                observed: vec![obs(1, 1, Some(Failed), false)],
                want: vec![Step::Forget("j1".into()), Step::Add],
            },
            Case {
                name: "scale in drains the newest ready replica",
                target: 1,
                generation: 1,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    obs(2, 1, Some(Running), true),
                ],
                want: vec![Step::Drain("j2".into())],
            },
            Case {
                name: "scale in stops a replica that is not ready first",
                target: 1,
                generation: 1,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    obs(2, 1, Some(Preparing), false),
                ],
                want: vec![Step::Stop("j2".into())],
            },
            Case {
                name: "a draining replica with requests in flight waits",
                target: 1,
                generation: 1,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    drain(obs(2, 1, Some(Running), true), 3),
                ],
                want: vec![],
            },
            Case {
                name: "a drained, idle replica is stopped",
                target: 1,
                generation: 1,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    drain(obs(2, 1, Some(Running), true), 0),
                ],
                want: vec![Step::Stop("j2".into())],
            },
            Case {
                name: "a stopping replica is not stopped again and does not count",
                target: 1,
                generation: 1,
                observed: vec![obs(1, 1, Some(Stopping), false)],
                want: vec![Step::Add],
            },
            Case {
                name: "an unhealthy replica is stopped and replaced",
                target: 1,
                generation: 1,
                observed: vec![Observed {
                    unhealthy: true,
                    ..obs(1, 1, Some(Running), false)
                }],
                want: vec![Step::Stop("j1".into()), Step::Add],
            },
            Case {
                name: "a rollout starts new replicas and keeps the old ones serving",
                target: 2,
                generation: 2,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    obs(2, 1, Some(Running), true),
                ],
                want: vec![Step::Add, Step::Add],
            },
            Case {
                name: "an old replica drains for each new one ready",
                target: 2,
                generation: 2,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    obs(2, 1, Some(Running), true),
                    obs(3, 2, Some(Running), true),
                    obs(4, 2, Some(Preparing), false),
                ],
                want: vec![Step::Drain("j2".into())],
            },
            Case {
                name: "the rollout ends once the new generation is ready",
                target: 2,
                generation: 2,
                observed: vec![
                    obs(1, 1, Some(Running), true),
                    obs(3, 2, Some(Running), true),
                    obs(4, 2, Some(Running), true),
                ],
                want: vec![Step::Drain("j1".into())],
            },
            Case {
                name: "scale to zero drains the last one",
                target: 0,
                generation: 1,
                observed: vec![obs(1, 1, Some(Running), true)],
                want: vec![Step::Drain("j1".into())],
            },
        ];
        for c in cases {
            let s = service(c.target, c.generation);
            assert_eq!(plan(&s, &c.observed), c.want, "{}", c.name);
        }
    }

    #[test]
    fn a_stopped_service_drains_everything() {
        let mut s = service(2, 1);
        s.desired = Desired::Stop;
        let got = plan(
            &s,
            &[
                obs(1, 1, Some(Running), true),
                obs(2, 1, Some(Scheduled), false),
            ],
        );
        assert_eq!(got, vec![Step::Stop("j2".into()), Step::Drain("j1".into())]);
    }

    #[test]
    fn plans_are_idempotent_once_applied() {
        // At the target, all ready, nothing to do.
        let s = service(2, 1);
        let o = [
            obs(1, 1, Some(Running), true),
            obs(2, 1, Some(Running), true),
        ];
        assert!(plan(&s, &o).is_empty());
    }
}
