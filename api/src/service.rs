//! Services as the API shows them: the service with its replicas, its traffic and its last
//! scaling decision, built by the controller from the service record, the replicas' jobs and
//! the data plane's counters.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use runyard_model::service::Decision;
use runyard_model::{JobStatus, Timestamp};

/// One replica of a service.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplicaView {
    /// The replica's number, from 1, never reused.
    pub index: u32,
    /// Its job (`runyard logs JOB`).
    pub job: String,
    /// The service generation it runs (a rollout makes a new one).
    pub generation: u64,
    /// Its job's status; absent while the job is being made.
    pub status: Option<JobStatus>,
    pub agent: Option<String>,
    pub port: Option<u16>,
    /// Passes its readiness check.
    pub ready: bool,
    /// Out of rotation, finishing its requests.
    pub draining: bool,
    /// Stopped answering its check; being replaced.
    pub unhealthy: bool,
    pub in_flight: u64,
    /// Requests answered.
    pub served: u64,
    /// How the controller reaches it: `direct`, `tunnel`, or `unknown` before the first
    /// connection.
    pub path: Option<String>,
}

/// Recent traffic.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct TrafficView {
    /// Requests per second over the last 10 s.
    pub rate: f64,
    /// Latency percentiles of recent requests, in milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests queued at the proxy plus in flight: what the policy calls pending.
    pub pending: u64,
    /// Requests waiting for a replica or their batch.
    pub queued: u64,
    pub total: u64,
    pub failed: u64,
    /// The mean size of recent batches.
    pub mean_batch: Option<f64>,
}

/// A service.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ServiceView {
    pub name: String,
    /// `starting` (no replica ready yet), `ready`, `idle` (scaled to zero), `stopping`, `stopped`.
    pub status: String,
    /// Where it answers: `/s/NAME/` on this controller.
    pub url: String,
    /// The spec as submitted (the job's fields and the service's), secrets by name only.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub generation: u64,
    /// The replica count the autoscaler wants now.
    pub target: u32,
    pub min: u32,
    pub max: u32,
    pub public: bool,
    /// `run` or `stop`.
    pub desired: String,
    pub replicas: Vec<ReplicaView>,
    /// Replicas that ended, newest last (bounded).
    pub ended: Vec<ReplicaView>,
    pub traffic: TrafficView,
    /// The last change of the replica count, and why.
    pub decision: Option<Decision>,
    /// Why the custom policy was not used at its last call.
    pub policy_error: Option<String>,
    /// Why the service is as it is (e.g. a replica failing).
    pub reason: Option<String>,
    pub owner: Option<String>,
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    #[schema(value_type = String)]
    pub updated_at: Timestamp,
}

/// Every service.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    pub services: Vec<ServiceView>,
}

/// New replica bounds (either may be left out).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub min: Option<u32>,
    pub max: Option<u32>,
}

/// One point of a service's history (every 5 s, the last hour).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ServicePoint {
    #[schema(value_type = String)]
    pub at: Timestamp,
    /// Replicas made and not ended.
    pub replicas: u32,
    pub ready: u32,
    /// Requests per second.
    pub rate: f64,
    pub pending: u64,
}

/// A service's recent history.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ServiceHistory {
    pub points: Vec<ServicePoint>,
}
