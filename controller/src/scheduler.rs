//! Placement: a pure function from a job's compute and the fleet's free capacity to an agent
//! and GPU indices. No I/O, no clock.
//!
//! Invariant: a GPU index of an agent is in at most one placement at a time. Capacity is derived
//! from the jobs that hold resources (`JobStatus::is_on_agent`), so a GPU is free again only when
//! its agent confirms the attempt ended (or the agent is lost).
//!
//! Policy: `cpu-small` spreads (most free slots first) so one busy host does not queue work while
//! others idle; GPU jobs pack (fewest free GPUs that still fit) so large `gpu:N` jobs keep finding
//! whole machines. Ties go to the agent name, so placement is deterministic.

use std::collections::BTreeSet;

use runyard_model::Compute;

/// What one agent has left, as seen by one reconcile pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub agent: String,
    /// Only connected agents receive work.
    pub connected: bool,
    pub cpu_small_slots: u32,
    pub cpu_small_used: u32,
    /// GPU indices the agent offers.
    pub gpus: Vec<u32>,
    /// GPU indices held by attempts.
    pub gpus_used: BTreeSet<u32>,
}

impl Capacity {
    pub fn new(agent: impl Into<String>, cpu_small_slots: u32, gpus: Vec<u32>) -> Capacity {
        Capacity {
            agent: agent.into(),
            connected: true,
            cpu_small_slots,
            cpu_small_used: 0,
            gpus,
            gpus_used: BTreeSet::new(),
        }
    }

    fn free_slots(&self) -> u32 {
        self.cpu_small_slots.saturating_sub(self.cpu_small_used)
    }

    fn free_gpus(&self) -> impl Iterator<Item = u32> + '_ {
        self.gpus
            .iter()
            .copied()
            .filter(|g| !self.gpus_used.contains(g))
    }

    /// Records an attempt holding resources here.
    pub fn hold(&mut self, compute: Compute, gpus: &[u32]) {
        match compute {
            Compute::CpuSmall => self.cpu_small_used += 1,
            Compute::Gpu(_) => self.gpus_used.extend(gpus.iter().copied()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Placed {
        agent: String,
        gpus: Vec<u32>,
    },
    /// No agent fits now; the reason is shown to the user.
    Wait(String),
}

/// Chooses an agent for `compute` and takes the resources from `fleet`.
pub fn place(compute: Compute, fleet: &mut [Capacity]) -> Placement {
    let choice = match compute {
        Compute::CpuSmall => fleet
            .iter()
            .enumerate()
            .filter(|(_, c)| c.connected && c.free_slots() > 0)
            .max_by(|(_, a), (_, b)| {
                a.free_slots()
                    .cmp(&b.free_slots())
                    .then_with(|| b.agent.cmp(&a.agent))
            })
            .map(|(i, _)| i),
        Compute::Gpu(n) => fleet
            .iter()
            .enumerate()
            .filter(|(_, c)| c.connected && c.free_gpus().count() >= n as usize)
            .min_by(|(_, a), (_, b)| {
                a.free_gpus()
                    .count()
                    .cmp(&b.free_gpus().count())
                    .then_with(|| a.agent.cmp(&b.agent))
            })
            .map(|(i, _)| i),
    };
    match choice {
        Some(i) => {
            let cap = &mut fleet[i];
            let gpus: Vec<u32> = cap.free_gpus().take(compute.gpus() as usize).collect();
            cap.hold(compute, &gpus);
            Placement::Placed {
                agent: cap.agent.clone(),
                gpus,
            }
        }
        None => Placement::Wait(wait_reason(compute, fleet)),
    }
}

fn wait_reason(compute: Compute, fleet: &[Capacity]) -> String {
    let connected: Vec<&Capacity> = fleet.iter().filter(|c| c.connected).collect();
    if connected.is_empty() {
        return "waiting for an agent: none is connected".into();
    }
    match compute {
        Compute::CpuSmall => {
            if connected.iter().all(|c| c.cpu_small_slots == 0) {
                "waiting: no connected agent offers cpu-small".into()
            } else {
                let used: u32 = connected.iter().map(|c| c.cpu_small_used).sum();
                format!("waiting for a free cpu-small slot: all {used} in use")
            }
        }
        Compute::Gpu(n) => {
            let largest = connected.iter().map(|c| c.gpus.len()).max().unwrap_or(0);
            if largest < n as usize {
                format!(
                    "waiting for an agent with {n} GPU(s): the largest connected agent has {largest}"
                )
            } else {
                format!("waiting for {n} free GPU(s) on one agent: all busy")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(p: Placement) -> (String, Vec<u32>) {
        match p {
            Placement::Placed { agent, gpus } => (agent, gpus),
            Placement::Wait(r) => panic!("expected placement, got wait: {r}"),
        }
    }

    #[test]
    fn cpu_small_spreads_over_agents() {
        let mut fleet = vec![Capacity::new("a", 2, vec![]), Capacity::new("b", 2, vec![])];
        let first = placed(place(Compute::CpuSmall, &mut fleet)).0;
        let second = placed(place(Compute::CpuSmall, &mut fleet)).0;
        assert_ne!(first, second);
        placed(place(Compute::CpuSmall, &mut fleet));
        placed(place(Compute::CpuSmall, &mut fleet));
        let Placement::Wait(reason) = place(Compute::CpuSmall, &mut fleet) else {
            panic!("fleet is full")
        };
        assert!(reason.contains("all 4 in use"), "{reason}");
    }

    #[test]
    fn gpus_are_never_shared() {
        let mut fleet = vec![Capacity::new("a", 0, vec![0, 1])];
        let (_, g1) = placed(place(Compute::Gpu(1), &mut fleet));
        let (_, g2) = placed(place(Compute::Gpu(1), &mut fleet));
        assert_ne!(g1, g2);
        assert!(matches!(
            place(Compute::Gpu(1), &mut fleet),
            Placement::Wait(_)
        ));
    }

    #[test]
    fn gpu_jobs_pack_and_keep_big_hosts_free() {
        let mut fleet = vec![
            Capacity::new("big", 0, vec![0, 1, 2, 3]),
            Capacity::new("small", 0, vec![0]),
        ];
        assert_eq!(placed(place(Compute::Gpu(1), &mut fleet)).0, "small");
        let (agent, gpus) = placed(place(Compute::Gpu(4), &mut fleet));
        assert_eq!((agent.as_str(), gpus), ("big", vec![0, 1, 2, 3]));
    }

    #[test]
    fn gpu_n_needs_n_on_one_agent() {
        let mut fleet = vec![
            Capacity::new("a", 0, vec![0]),
            Capacity::new("b", 0, vec![0]),
        ];
        let Placement::Wait(reason) = place(Compute::Gpu(2), &mut fleet) else {
            panic!()
        };
        assert!(reason.contains("largest connected agent has 1"), "{reason}");
    }

    #[test]
    fn disconnected_agents_get_nothing() {
        let mut fleet = vec![Capacity {
            connected: false,
            ..Capacity::new("a", 4, vec![0])
        }];
        let Placement::Wait(reason) = place(Compute::CpuSmall, &mut fleet) else {
            panic!()
        };
        assert!(reason.contains("none is connected"));
    }

    #[test]
    fn held_gpus_are_skipped() {
        let mut cap = Capacity::new("a", 0, vec![0, 1, 2]);
        cap.hold(Compute::Gpu(1), &[1]);
        let mut fleet = vec![cap];
        assert_eq!(placed(place(Compute::Gpu(2), &mut fleet)).1, vec![0, 2]);
    }
}
