//! `GET /api/v1/jobs/{id}/metrics`: the metric history of a job's current attempt, for plots.

use std::collections::BTreeMap;

use runyard_model::MetricPoint;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsResponse {
    /// The attempt the history belongs to (0 before the job was first placed).
    pub attempt: u32,
    /// Every reported metric's points, by metric name, in report order.
    pub series: BTreeMap<String, Vec<MetricPoint>>,
}
