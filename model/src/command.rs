//! What the controller tells an agent to do, as domain nouns; the session turns these into wire
//! messages (`runyard_proto::command_to_wire`), so the core never builds one.

use std::time::Duration;

use crate::job::{Desired, Job};
use crate::spec::JobSpec;

/// An order for one attempt on one agent. `Assign` and `Stop` are idempotent on the agent.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentCommand {
    /// Run attempt `attempt` of the job with these GPUs.
    Assign {
        job_id: String,
        attempt: u32,
        spec: Box<JobSpec>,
        gpus: Vec<u32>,
    },
    /// Stop the attempt: SIGTERM, `grace`, then SIGKILL.
    Stop {
        job_id: String,
        attempt: u32,
        grace: Duration,
        reason: String,
    },
    /// Call a service's scaling policy in the environment of its replica (this attempt).
    Evaluate {
        request_id: String,
        job_id: String,
        attempt: u32,
        policy: String,
        input: String,
    },
    /// Connect to the attempt's port (`$PORT`) on the agent's loopback and open the `Tunnel`
    /// call named `tunnel_id` back to the controller. Each id is one connection.
    OpenTunnel {
        tunnel_id: String,
        job_id: String,
        attempt: u32,
    },
}

impl AgentCommand {
    /// Run the job's current attempt with `spec` (the job's, with its secrets' values resolved).
    pub fn assign(job: &Job, spec: JobSpec) -> AgentCommand {
        AgentCommand::Assign {
            job_id: job.id.clone(),
            attempt: job.attempt,
            spec: Box::new(spec),
            gpus: job.gpus.clone(),
        }
    }

    /// Stop the job's current attempt, saying why.
    pub fn stop(job: &Job) -> AgentCommand {
        let reason = if job.desired == Desired::Stop {
            "stopped by user"
        } else {
            "attempt replaced"
        };
        AgentCommand::Stop {
            job_id: job.id.clone(),
            attempt: job.attempt,
            grace: job.spec.stop_grace,
            reason: reason.into(),
        }
    }
}
