//! An agent as the API shows it (`GET /api/v1/agents`, `agents` events).

use runyard_model::{AgentInfo, GpuInfo, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What an agent offers, whether it is connected, and the jobs placed on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub name: String,
    /// Connected now (a live session).
    pub connected: bool,
    pub cpu_small_slots: u32,
    pub gpus: Vec<GpuInfo>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub version: String,
    pub last_seen: Timestamp,
    /// Ids of the jobs placed on it.
    #[serde(default)]
    pub jobs: Vec<String>,
}

impl From<&AgentInfo> for AgentView {
    fn from(a: &AgentInfo) -> AgentView {
        AgentView {
            name: a.name.clone(),
            connected: a.connected,
            cpu_small_slots: a.cpu_small_slots,
            gpus: a.gpus.clone(),
            cpus: a.cpus,
            memory_bytes: a.memory_bytes,
            version: a.version.clone(),
            last_seen: a.last_seen,
            jobs: a.jobs.clone(),
        }
    }
}

/// `GET /api/v1/agents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}
