//! What an agent offers, as the controller records and shows it.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
