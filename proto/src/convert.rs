//! Conversions between wire messages and domain nouns. Wire types stop here.

use std::time::Duration;

use runyard_model::{Compute, GpuInfo, JobSpec};

use crate::v1;

#[derive(Debug, thiserror::Error)]
#[error("invalid {field} in message: {message}")]
pub struct ConvertError {
    pub field: &'static str,
    pub message: String,
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
    fn bad_wire_spec_is_rejected() {
        let mut w = spec_to_wire(
            &JobSpec::from_json(br#"{"repo":"file:///tmp/r","script":"a.py"}"#).unwrap(),
        );
        w.script = "../../etc/x.py".into();
        assert!(spec_from_wire(w).is_err());
    }
}
