//! A synthetic fleet and backlog for the placement benchmark: half the agents are CPU hosts with
//! 8 `cpu-small` slots, half are GPU hosts with 8 GPUs (and 8 `cpu-small` slots, as every agent
//! offers them by default); jobs cycle through a fixed mix of computes. Deterministic, so runs
//! compare.

use runyard_controller::reconcile::AgentView;
use runyard_controller::scheduler::Capacity;
use runyard_model::{Compute, JobSpec, JobState, Timestamp};

/// Slots of every agent, and GPUs of a GPU host.
pub const PER_AGENT: u32 = 8;

/// The compute of job `i`: 7 in 10 `cpu-small`, 2 in 10 `gpu`, 1 in 10 `gpu:4`.
pub fn compute_of(i: usize) -> Compute {
    match i % 10 {
        0..=6 => Compute::CpuSmall,
        7 | 8 => Compute::Gpu(1),
        _ => Compute::Gpu(4),
    }
}

/// `n` connected agents; odd-numbered ones are GPU hosts.
pub fn agents(n: usize) -> Vec<AgentView> {
    (0..n)
        .map(|i| AgentView {
            name: format!("agent-{i:05}"),
            connected: true,
            last_seen: Timestamp(0),
            cpu_small_slots: PER_AGENT,
            gpus: if i % 2 == 1 {
                (0..PER_AGENT).collect()
            } else {
                Vec::new()
            },
        })
        .collect()
}

/// The scheduler's view of the same agents, all free.
pub fn capacities(agents: &[AgentView]) -> Vec<Capacity> {
    agents
        .iter()
        .map(|a| Capacity::new(a.name.clone(), a.cpu_small_slots, a.gpus.clone()))
        .collect()
}

/// `n` pending jobs, created one millisecond apart, computes by [`compute_of`].
pub fn pending_jobs(n: usize) -> Vec<JobState> {
    (0..n)
        .map(|i| {
            let body = format!(
                r#"{{"repo":"file:///bench/repo","script":"train.py","compute":"{}"}}"#,
                compute_of(i)
            );
            let spec = JobSpec::from_json(body.as_bytes()).expect("the bench spec is valid");
            JobState::new(format!("job-{i:06}"), spec, Timestamp(1_000 + i as u64))
        })
        .collect()
}

/// How many of the first `n` jobs can be placed on `agents` agents at most (the fleet's capacity
/// per compute kind); the benchmark checks the scheduler reaches it.
pub fn placeable(n_agents: usize, n_jobs: usize) -> usize {
    let gpu_hosts = n_agents / 2;
    let cpu_jobs = (0..n_jobs)
        .filter(|i| compute_of(*i) == Compute::CpuSmall)
        .count();
    let cpu_placed = cpu_jobs.min(n_agents * PER_AGENT as usize);
    // GPU jobs arrive interleaved (gpu, gpu, gpu:4 per ten): with packing, whole hosts fill up.
    let mut free = vec![PER_AGENT; gpu_hosts];
    let mut gpu_placed = 0;
    for i in 0..n_jobs {
        if let Compute::Gpu(g) = compute_of(i) {
            // Fewest free GPUs that still fit, ties to the lowest index (the agent name order).
            let best = (0..free.len())
                .filter(|h| free[*h] >= g)
                .min_by_key(|h| (free[*h], *h));
            if let Some(h) = best {
                free[h] -= g;
                gpu_placed += 1;
            }
        }
    }
    cpu_placed + gpu_placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_controller::scheduler::{Placement, place};

    #[test]
    fn fleet_and_backlog_have_the_announced_mix() {
        let a = agents(10);
        assert_eq!(a.iter().filter(|a| a.gpus.len() == 8).count(), 5);
        assert!(a.iter().all(|a| a.cpu_small_slots == 8));
        let jobs = pending_jobs(100);
        let gpu4 = jobs
            .iter()
            .filter(|j| j.intent.spec.compute == Compute::Gpu(4))
            .count();
        assert_eq!(gpu4, 10);
        assert!(
            jobs.windows(2)
                .all(|w| w[0].intent.created_at < w[1].intent.created_at)
        );
    }

    #[test]
    fn placeable_matches_the_scheduler() {
        let a = agents(20);
        let jobs = pending_jobs(400);
        let mut fleet = capacities(&a);
        let placed = jobs
            .iter()
            .filter(|j| {
                matches!(
                    place(j.intent.spec.compute, &mut fleet),
                    Placement::Placed { .. }
                )
            })
            .count();
        assert_eq!(placed, placeable(20, 400));
        assert!(placed < 400, "the backlog must overflow the fleet");
    }
}
