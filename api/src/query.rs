//! The query parameters of each route.
//!
//! Values are kept as sent (strings) and checked by the controller, which names the parameter in
//! a 400 (`limit: ...`), accepts the forms older clients send (`follow=1`), and knows the bounds
//! that depend on state (an attempt must exist). The documented types are what a value must
//! parse as. Clients build queries with the constructors; `None` parameters are left out, in
//! field order.

use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

/// Largest page of `GET /api/v1/jobs`.
pub const MAX_PAGE: u32 = 1000;
/// Page size when `limit` is absent.
pub const DEFAULT_PAGE: u32 = 50;

/// The `{id}` of the routes of one job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JobPath {
    /// Job id.
    pub id: String,
}

/// `GET /api/v1/jobs?limit=&cursor=&status=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListJobsQuery {
    /// Page size, 1 to 1000 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// The `next` of the previous page: list jobs older than this id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Only jobs in these statuses, comma-separated (`running,pending`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl ListJobsQuery {
    pub fn new(
        status: Option<runyard_model::JobStatus>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> ListJobsQuery {
        ListJobsQuery {
            limit: limit.map(|l| l.to_string()),
            cursor: cursor.map(str::to_string),
            status: status.map(|s| s.as_str().to_string()),
        }
    }
}

/// `GET /api/v1/jobs/{id}/logs?follow=&attempt=&offset=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the response open until the job is terminal and every line was sent.
    #[param(value_type = Option<bool>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow: Option<String>,
    /// This attempt's log only (1 to the job's current attempt); default: the current one,
    /// and with `follow` the next attempts too.
    #[param(value_type = Option<u32>, minimum = 1)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    /// Start at this byte of the attempt's log (only with `attempt`).
    #[param(value_type = Option<u64>, minimum = 0)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
}

impl LogsQuery {
    /// `follow` if asked; `from`: an attempt and a byte offset into its log.
    pub fn new(follow: bool, from: Option<(u32, u64)>) -> LogsQuery {
        LogsQuery {
            follow: follow.then(|| "true".to_string()),
            attempt: from.map(|(a, _)| a.to_string()),
            offset: from.map(|(_, o)| o.to_string()),
        }
    }
}

/// `GET /api/v1/jobs/{id}/metrics.svg?metric=&width=&height=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsSvgQuery {
    /// The metric to plot (required), as in `val_loss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Width in pixels.
    #[param(value_type = Option<u32>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<String>,
    /// Height in pixels.
    #[param(value_type = Option<u32>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<String>,
}

/// `GET /api/v1/events?job=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this job's events (sent once at the start, then on every change).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}
