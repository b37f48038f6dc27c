//! What an agent offers, as the controller records and shows it.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub utilization_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    /// Connected now (a live session).
    pub connected: bool,
    pub cpu_small_slots: u32,
    pub gpus: Vec<GpuInfo>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub version: String,
    pub last_seen: Timestamp,
    /// Jobs placed on it (`job_id` values).
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// The layout of agent records this version writes (see `job::JOB_SCHEMA_VERSION`).
pub const AGENT_SCHEMA_VERSION: u32 = 1;

/// An agent as the controller stores it: its info plus the record's layout version. A record
/// without the version is version 1; unknown fields (from a newer version) are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    #[serde(default = "crate::job::first_schema_version")]
    pub schema_version: u32,
    #[serde(flatten)]
    pub info: AgentInfo,
}

impl AgentRecord {
    pub fn new(info: AgentInfo) -> AgentRecord {
        AgentRecord {
            schema_version: AGENT_SCHEMA_VERSION,
            info,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> serde_json::Value {
        serde_json::to_value(AgentRecord::new(AgentInfo {
            name: "a".into(),
            connected: false,
            cpu_small_slots: 2,
            gpus: vec![],
            cpus: 4,
            memory_bytes: 1 << 30,
            version: "0.1.0".into(),
            last_seen: Timestamp(1),
            jobs: vec![],
        }))
        .unwrap()
    }

    #[test]
    fn a_record_without_schema_version_is_version_1() {
        let mut v = stored();
        assert_eq!(v["schema_version"], 1);
        v.as_object_mut().unwrap().remove("schema_version");
        let r: AgentRecord = serde_json::from_value(v).expect("an old record loads (upgrade)");
        assert_eq!((r.schema_version, r.info.name.as_str()), (1, "a"));
    }

    #[test]
    fn a_newer_record_with_unknown_fields_loads() {
        let mut v = stored();
        v["schema_version"] = 3.into();
        v["zone"] = "eu-1".into();
        let r: AgentRecord = serde_json::from_value(v).expect("a newer record loads (rollback)");
        assert_eq!((r.schema_version, r.info.cpus), (3, 4));
    }
}
