//! Runyard's domain nouns. This crate does no I/O and depends on nothing else in the workspace.
//!
//! - `attempt`: an attempt's status as its agent reports it.
//! - `command`: what the controller tells an agent to do (assign, stop).
//! - `compute`: what a job asks for (`cpu-small`, `gpu`, `gpu:N`).
//! - `spec`: the job spec users submit, its parsing and validation.
//! - `job`: a job as the controller records it, and its lifecycle states.
//! - `report`: progress, metrics, checkpoints and environment reported by a running job.
//! - `agent`: what an agent offers and how the controller sees it.
//! - `time`: wall-clock timestamps as stored and shown (RFC 3339 in JSON).

pub mod agent;
pub mod attempt;
pub mod command;
pub mod compute;
pub mod job;
pub mod report;
pub mod spec;
pub mod time;

pub use agent::{AgentInfo, AgentRecord, GpuInfo};
pub use attempt::{AttemptState, AttemptStatus};
pub use command::AgentCommand;
pub use compute::Compute;
pub use job::{Desired, FailureKind, Job, JobStatus, Placed, is_job_id};
pub use report::{Best, Environment, MetricPoint, Progress, Report};
pub use spec::{JobSpec, ValidationError};
pub use time::Timestamp;
