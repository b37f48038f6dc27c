//! Conversions between wire messages and domain nouns. Wire types stop here.

use std::time::Duration;

use runyard_model::spec::SecretSource;
use runyard_model::{
    AgentCommand, AttemptState, AttemptStatus, Compute, FailureKind, GpuInfo, JobSpec,
};

use crate::v1;

#[derive(Debug, thiserror::Error)]
#[error("invalid {field} in message: {message}")]
pub struct ConvertError {
    pub field: &'static str,
    pub message: String,
}

/// The wire status of an attempt of job `job_id`.
pub fn status_to_wire(job_id: &str, s: &AttemptStatus) -> v1::StatusUpdate {
    let state = match s.state {
        AttemptState::Preparing => v1::AttemptState::Preparing,
        AttemptState::Running => v1::AttemptState::Running,
        AttemptState::Succeeded => v1::AttemptState::Succeeded,
        AttemptState::Failed => v1::AttemptState::Failed,
        AttemptState::Stopped => v1::AttemptState::Stopped,
    };
    v1::StatusUpdate {
        job_id: job_id.to_string(),
        attempt: s.attempt,
        state: state as i32,
        exit_code: s.exit_code,
        reason: s.reason.clone(),
        commit: s.commit.clone().unwrap_or_default(),
        log_lines: s.log_lines,
        failure: s
            .failure
            .map(|f| f.as_str().to_string())
            .unwrap_or_default(),
        report_lines: s.report_lines,
        port: s.port.map_or(0, u32::from),
    }
}

/// An attempt's status from the wire; `None` for a state this version does not know.
pub fn status_from_wire(w: &v1::StatusUpdate) -> Option<AttemptStatus> {
    let state = match v1::AttemptState::try_from(w.state).ok()? {
        v1::AttemptState::Preparing => AttemptState::Preparing,
        v1::AttemptState::Running => AttemptState::Running,
        v1::AttemptState::Succeeded => AttemptState::Succeeded,
        v1::AttemptState::Failed => AttemptState::Failed,
        v1::AttemptState::Stopped => AttemptState::Stopped,
        v1::AttemptState::Unspecified => return None,
    };
    Some(AttemptStatus {
        attempt: w.attempt,
        state,
        exit_code: w.exit_code,
        reason: w.reason.clone(),
        commit: Some(w.commit.clone()).filter(|c| !c.is_empty()),
        failure: FailureKind::parse(&w.failure),
        log_lines: w.log_lines,
        report_lines: w.report_lines,
        port: u16::try_from(w.port).ok().filter(|&p| p != 0),
    })
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
        AgentCommand::Evaluate {
            request_id,
            job_id,
            attempt,
            policy,
            input,
        } => Msg::Evaluate(v1::Evaluate {
            request_id: request_id.clone(),
            job_id: job_id.clone(),
            attempt: *attempt,
            policy: policy.clone(),
            input_json: input.clone(),
        }),
        AgentCommand::OpenTunnel {
            tunnel_id,
            job_id,
            attempt,
        } => Msg::OpenTunnel(v1::OpenTunnel {
            tunnel_id: tunnel_id.clone(),
            job_id: job_id.clone(),
            attempt: *attempt,
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
        // Only resolved values travel; the controller resolves every secret before it assigns.
        secrets: s
            .secrets
            .iter()
            .filter_map(|(k, v)| match v {
                SecretSource::Value(v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect(),
        memory_bytes: s.memory.unwrap_or(0),
        port: s.port,
        model_from: s.model_from.clone().unwrap_or_default(),
        entry_point: s.entry_point.clone().unwrap_or_default(),
        parameters: s.parameters.clone().into_iter().collect(),
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
        secrets: w
            .secrets
            .into_iter()
            .map(|(k, v)| (k, SecretSource::Value(v)))
            .collect(),
        memory: Some(w.memory_bytes).filter(|&m| m != 0),
        port: w.port,
        model_from: Some(w.model_from).filter(|m| !m.is_empty()),
        entry_point: Some(w.entry_point).filter(|e| !e.is_empty()),
        parameters: w.parameters.into_iter().collect(),
        // The controller resolves the tracking into the job's environment before it assigns.
        mlflow: None,
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
                "compute":"gpu:2","timeout":"1h","requirements":["numpy==2.0"],"stop_grace":"3s",
                "memory":"8GiB"}"#,
        )
        .unwrap();
        let back = spec_from_wire(spec_to_wire(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn statuses_round_trip() {
        let s = AttemptStatus {
            attempt: 3,
            state: AttemptState::Failed,
            exit_code: Some(2),
            reason: "script exited with code 2".into(),
            commit: Some("abc".into()),
            failure: Some(FailureKind::Exit),
            log_lines: 10,
            report_lines: 4,
            port: Some(8123),
        };
        let w = status_to_wire("j", &s);
        assert_eq!(w.job_id, "j");
        assert_eq!(status_from_wire(&w), Some(s));
        let fresh = AttemptStatus::preparing(1);
        assert_eq!(status_from_wire(&status_to_wire("j", &fresh)), Some(fresh));
        let unknown = v1::StatusUpdate {
            state: 99,
            ..Default::default()
        };
        assert_eq!(status_from_wire(&unknown), None);
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
        match command_to_wire(&AgentCommand::assign(&job, job.spec.clone())).msg {
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
        let open = AgentCommand::OpenTunnel {
            tunnel_id: "t1".into(),
            job_id: "j".into(),
            attempt: 2,
        };
        match command_to_wire(&open).msg {
            Some(Msg::OpenTunnel(o)) => {
                assert_eq!(
                    (o.tunnel_id.as_str(), o.job_id.as_str(), o.attempt),
                    ("t1", "j", 2)
                )
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
