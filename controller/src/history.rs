//! Finished jobs leave: `Controller::delete` removes one with everything stored for it (its
//! record, every attempt's log and report lines, its checkpoints), and the retention task
//! deletes finished jobs older than the configured retention through the same path.
//!
//! Invariants: only a terminal job is deleted (an active one still has an agent writing its
//! lines); the record goes first, so a job is never shown without its files, and a failure to
//! remove files afterwards only leaves unreachable files (logged), never a broken job. A
//! retention pass deletes at most `RETENTION_BATCH` jobs, so one pass never holds the writer
//! lock for long; the next pass continues.

use std::time::Duration;

use runyard_model::{Job, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::executor::Controller;
use crate::jobs::{JobsError, Removed};

/// How often the retention task looks for expired jobs.
pub const RETENTION_PERIOD: Duration = Duration::from_secs(60);
/// At most this many jobs are deleted per retention pass.
pub const RETENTION_BATCH: usize = 100;

/// What `Controller::delete` did.
#[derive(Debug)]
pub enum Deleted {
    /// Deleted; this was its last state.
    Gone(Job),
    /// Not finished: stop it first.
    Active(Job),
    Unknown,
}

impl Controller {
    /// Deletes a finished job with its logs, reports and checkpoints.
    pub async fn delete(&self, id: &str) -> Result<Deleted, JobsError> {
        let job = match self.jobs.remove(id, |j| j.status.is_terminal()).await? {
            Removed::Gone(job) => job,
            Removed::Kept(job) => return Ok(Deleted::Active(job)),
            Removed::Unknown => return Ok(Deleted::Unknown),
        };
        let files = [
            ("logs", self.logs.remove(id).await),
            ("reports", self.reports.remove(id).await),
            (
                "checkpoints",
                self.artifacts
                    .remove(id)
                    .await
                    .map_err(std::io::Error::other),
            ),
        ];
        for (what, result) in files {
            if let Err(error) = result {
                warn!(job = %id, what, %error, "job deleted, but its files could not all be removed");
            }
        }
        info!(job = %id, status = %job.status, "job deleted");
        Ok(Deleted::Gone(job))
    }

    /// One retention pass: deletes up to `RETENTION_BATCH` jobs that finished before
    /// `now - retention`. Returns how many it deleted.
    pub async fn expire(&self, retention: Duration, now: Timestamp) -> Result<usize, JobsError> {
        let expired: Vec<String> = self
            .jobs
            .all()
            .into_iter()
            .filter(|j| {
                j.status.is_terminal()
                    && j.finished_at
                        .is_some_and(|f| now.saturating_since(f) > retention)
            })
            .take(RETENTION_BATCH)
            .map(|j| j.id)
            .collect();
        let mut deleted = 0;
        for id in &expired {
            if let Deleted::Gone(_) = self.delete(id).await? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Runs retention passes every `period` until cancelled.
    pub async fn run_retention(
        self,
        retention: Duration,
        period: Duration,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.expire(retention, Timestamp::now()).await {
                Ok(0) => {}
                Ok(deleted) => {
                    info!(deleted, retention = %humantime::format_duration(retention), "expired jobs deleted")
                }
                Err(error) => warn!(%error, "retention pass failed; retrying on the next one"),
            }
        }
    }
}
