//! Runyard's domain nouns. This crate does no I/O and depends on nothing else in the workspace.
//!
//! - `access`: roles, callers and named tokens of the user API.
//! - `attempt`: an attempt's status as its agent reports it.
//! - `command`: what the controller tells an agent to do (assign, stop).
//! - `compute`: what a job asks for (`cpu-small`, `gpu`, `gpu:N`).
//! - `spec`: the job spec users submit, its parsing and validation.
//! - `limits`: how big each field of a spec may be.
//! - `size`: byte sizes as users write them (`512MiB`, `8GiB`) and as they are shown.
//! - `intent`: what a user wants of a job (stored at `jobs/ID`).
//! - `placement`: one attempt of a job on an agent (stored at `placements/ID/N`).
//! - `job`: a job as a whole (intent + current placement), and its lifecycle states.
//! - `mlproject`: MLflow projects: the `MLproject` file, typed parameters, the argv of an
//!   entry point.
//! - `project_env`: a project's `python_env.yaml` or conda file as pip requirements.
//! - `report`: progress, metrics, checkpoints and environment reported by a running job.
//! - `service`: a server kept running as autoscaled replicas (stored at `services/NAME`).
//! - `agent`: what an agent offers and how the controller sees it.
//! - `time`: wall-clock timestamps as stored and shown (RFC 3339 in JSON).

pub mod access;
pub mod agent;
pub mod attempt;
pub mod command;
pub mod compute;
pub mod intent;
pub mod job;
pub mod limits;
pub mod mlproject;
pub mod placement;
pub mod project_env;
pub mod report;
pub mod service;
pub mod size;
pub mod spec;
pub mod time;

pub use access::{Act, Caller, Role, TokenRecord};
pub use agent::{AgentInfo, AgentRecord, GpuInfo};
pub use attempt::{AttemptState, AttemptStatus};
pub use command::AgentCommand;
pub use compute::Compute;
pub use intent::{Intent, MlflowRun};
pub use job::{Desired, FailureKind, Job, JobState, JobStatus, Placed, is_job_id};
pub use placement::Placement;
pub use report::{Best, Environment, MetricPoint, Progress, Report};
pub use service::{ReplicaOf, Service, ServiceSpec};
pub use spec::{JobSpec, ValidationError};
pub use time::Timestamp;
