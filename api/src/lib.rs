//! The HTTP API's types: what `/api/v1` accepts and returns, as the controller serves it and
//! every client (the CLI, tests) reads it. The OpenAPI document is generated from these types
//! (`openapi`), never written by hand.
//!
//! Invariant: an API type is separate from the record the controller stores (`runyard_model`);
//! each view is built by a `From<&Record>` conversion, so a stored record can change without
//! changing the API. The job spec is the exception on purpose: it *is* the submit request, and
//! `runyard_model::JobSpec` validation stays the one validator of every entry point.
//!
//! - `job`: `JobView` (a job as the API shows it), `JobPage` (one page of the job list) and
//!   `JobRemoved` (the `removed` event).
//! - `placement`: `PlacementView` (one attempt of a job) and `PlacementList`.
//! - `access`: `WhoAmI`, the named tokens (`CreateToken`, `TokenCreated`, `TokenList`) and
//!   the controller-side secrets' names (`SetSecret`, `SecretList`).
//! - `agent`: `AgentView` and `AgentList`.
//! - `service`: `ServiceView` (a service with its replicas, traffic and last scaling decision),
//!   `ServiceList`, `ScaleRequest`, `ServiceHistory`.
//! - `metrics`: the metric history of a job's current attempt.
//! - `error`: `ErrorBody`, the body of every error response.
//! - `query`: the query parameters of each route.
//! - `openapi`: the document's shared parts: components, the bearer scheme, reusable responses.

pub mod access;
pub mod agent;
pub mod error;
pub mod job;
pub mod metrics;
pub mod openapi;
pub mod placement;
pub mod query;
pub mod service;

pub use access::{
    CreateToken, SecretList, SecretView, SetSecret, TokenCreated, TokenList, TokenView, WhoAmI,
};
pub use agent::{AgentList, AgentView};
pub use error::ErrorBody;
pub use job::{JobPage, JobRemoved, JobView, MlflowView, SnapshotView};
pub use metrics::MetricsResponse;
pub use placement::{PlacementList, PlacementView};
pub use query::{EventsQuery, ListJobsQuery, LogsQuery, MetricsSvgQuery};
/// The body of `POST /api/v1/jobs`: the job spec, checked by its one validator.
pub use runyard_model::JobSpec as SubmitRequest;
pub use service::{
    ReplicaView, ScaleRequest, ServiceHistory, ServiceList, ServicePoint, ServiceView, TrafficView,
};
