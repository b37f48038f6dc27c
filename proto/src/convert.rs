//! Conversions between wire messages and domain nouns. Wire types stop here.

use std::time::Duration;

use runyard_model::{AgentCommand, Compute, GpuInfo, JobSpec};

use crate::v1;

#[derive(Debug, thiserror::Error)]
#[error("invalid {field} in message: {message}")]
pub struct ConvertError {
    pub field: &'static str,
    pub message: String,
}

/// The wire message of a command to an agent.
pub fn command_to_wire(c: &AgentCommand) -> v1::ControllerMessage {
    use v1::controller_message::Msg;
    let msg = match c {
        AgentCommand::Assign {
            job_id,
            attempt,
            spec,
            gpus,
        } => Msg::Assign(v1::Assign {
            job_id: job_id.clone(),
            attempt: *attempt,
            spec: Some(spec_to_wire(spec)),
            gpus: gpus.clone(),
        }),
        AgentCommand::Stop {
            job_id,
            attempt,
            grace,
            reason,
        } => Msg::Stop(v1::Stop {
            job_id: job_id.clone(),
            attempt: *attempt,
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            reason: reason.clone(),
        }),
    };
    v1::ControllerMessage { msg: Some(msg) }
}

pub fn spec_to_wire(s: &JobSpec) -> v1::JobSpec {
    v1::JobSpec {
        name: s.name.clone(),
        repo: s.repo.clone(),
        revision: s.revision.clone(),
        script: s.script.clone(),
        args: s.args.clone(),
        requirements: s.requirements.clone(),
        requirements_file: s.requirements_file.clone().unwrap_or_default(),
        env: s.env.clone().into_iter().collect(),
        compute: s.compute.to_string(),
        timeout_ms: s.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
        stop_grace_ms: s.stop_grace.as_millis() as u64,
    }
}

/// Decodes and re-validates a spec: an agent never trusts the wire more than the API does.
pub fn spec_from_wire(w: v1::JobSpec) -> Result<JobSpec, ConvertError> {
    let compute: Compute = w.compute.parse().map_err(|m| ConvertError {
        field: "compute",
        message: m,
    })?;
    let spec = JobSpec {
        name: w.name,
        repo: w.repo,
        revision: w.revision,
        script: w.script,
        args: w.args,
        requirements: w.requirements,
        requirements_file: Some(w.requirements_file).filter(|f| !f.is_empty()),
        env: w.env.into_iter().collect(),
        compute,
        timeout: Some(Duration::from_millis(w.timeout_ms)).filter(|d| !d.is_zero()),
        retries: 0,
        stop_grace: Duration::from_millis(w.stop_grace_ms),
    };
    spec.validate().map_err(|e| ConvertError {
        field: "spec",
        message: e.to_string(),
    })
}

impl From<v1::Gpu> for GpuInfo {
    fn from(g: v1::Gpu) -> Self {
        GpuInfo {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            memory_total_bytes: g.memory_total_bytes,
            memory_used_bytes: g.memory_used_bytes,
            utilization_percent: g.utilization_percent,
        }
    }
}

impl From<&GpuInfo> for v1::Gpu {
    fn from(g: &GpuInfo) -> Self {
        v1::Gpu {
            index: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total_bytes: g.memory_total_bytes,
            memory_used_bytes: g.memory_used_bytes,
            utilization_percent: g.utilization_percent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips() {
        let spec = JobSpec::from_json(
            br#"{"repo":"file:///tmp/r","script":"a/b.py","args":["x y","'q'"],"env":{"A":"1"},
                "compute":"gpu:2","timeout":"1h","requirements":["numpy==2.0"],"stop_grace":"3s"}"#,
        )
        .unwrap();
        let back = spec_from_wire(spec_to_wire(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn commands_become_their_wire_messages() {
        use v1::controller_message::Msg;
        let spec = JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py","stop_grace":"3s"}"#)
            .unwrap();
        let mut job =
            runyard_model::Job::new("j".into(), spec.clone(), runyard_model::Timestamp(1));
        job.attempt = 2;
        job.gpus = vec![1, 3];
        match command_to_wire(&AgentCommand::assign(&job)).msg {
            Some(Msg::Assign(a)) => {
                assert_eq!((a.job_id.as_str(), a.attempt, a.gpus), ("j", 2, vec![1, 3]));
                assert_eq!(spec_from_wire(a.spec.unwrap()).unwrap(), spec);
            }
            other => panic!("{other:?}"),
        }
        job.desired = runyard_model::Desired::Stop;
        match command_to_wire(&AgentCommand::stop(&job)).msg {
            Some(Msg::Stop(s)) => {
                assert_eq!((s.attempt, s.grace_ms), (2, 3000));
                assert_eq!(s.reason, "stopped by user");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_wire_spec_is_rejected() {
        let mut w = spec_to_wire(
            &JobSpec::from_json(br#"{"repo":"file:///tmp/r","script":"a.py"}"#).unwrap(),
        );
        w.script = "../../etc/x.py".into();
        assert!(spec_from_wire(w).is_err());
    }
}
