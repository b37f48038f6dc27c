//! Finished jobs leave: `Controller::delete` removes one with everything stored for it (its
//! record, every attempt's log and report lines, its checkpoints), and the retention task
//! deletes finished jobs older than the configured retention through the same path.
//!
//! Invariants: only a terminal job is deleted (an active one still has an agent writing its
//! lines); a terminal job stays terminal, so checking before removing is enough. The record goes
//! first, so a job is never shown without its files, and a failure to remove files afterwards
//! only leaves unreachable files (logged), never a broken job. A retention pass looks at no more
//! than `RETENTION_BATCH` finished jobs (records of old ones are read from the store), going on
//! from where the previous pass stopped and starting over at the end, so every finished job is
//! looked at within a bounded number of passes.

use std::time::Duration;

use runyard_model::{Job, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::executor::Controller;
use crate::jobs::JobsError;

/// How often the retention task looks for expired jobs.
pub const RETENTION_PERIOD: Duration = Duration::from_secs(60);
/// At most this many finished jobs are looked at (and deleted) per retention pass.
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
        let Some(job) = self.jobs.fetch(id).await? else {
            return Ok(Deleted::Unknown);
        };
        if !job.status.is_terminal() {
            return Ok(Deleted::Active(job));
        }
        let Some(job) = self.jobs.remove(id).await? else {
            return Ok(Deleted::Unknown);
        };
        let snapshot_ref = async {
            match runyard_model::spec::snapshot_of(&job.spec.repo) {
                Some(sha) => self
                    .jobs
                    .store()
                    .delete(&crate::snapshots::ref_key(sha, id))
                    .await
                    .map_err(std::io::Error::other),
                None => Ok(()),
            }
        };
        let files = [
            ("snapshot reference", snapshot_ref.await),
            (
                "secret values",
                self.secrets.forget(id).await.map_err(std::io::Error::other),
            ),
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

    /// One retention pass over up to `RETENTION_BATCH` finished jobs after `cursor`: deletes
    /// those that finished before `now - retention`. Returns how many it deleted and where the
    /// next pass goes on (`None`: from the start).
    pub async fn expire(
        &self,
        retention: Duration,
        now: Timestamp,
        cursor: Option<&str>,
    ) -> Result<(usize, Option<String>), JobsError> {
        let ids = self.jobs.finished_after(cursor, RETENTION_BATCH);
        let next = (ids.len() == RETENTION_BATCH)
            .then(|| ids.last().cloned())
            .flatten();
        let mut deleted = 0;
        for id in &ids {
            let expired = self.jobs.fetch(id).await?.is_some_and(|j| {
                j.status.is_terminal()
                    && j.finished_at
                        .is_some_and(|f| now.saturating_since(f) > retention)
            });
            if expired && matches!(self.delete(id).await?, Deleted::Gone(_)) {
                deleted += 1;
            }
        }
        Ok((deleted, next))
    }

    /// Removes unreferenced snapshots every `period` until cancelled (see `snapshots.rs`).
    pub async fn run_snapshot_collection(self, period: Duration, cancel: CancellationToken) {
        let Some(snapshots) = self.snapshots.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let store = self.jobs.store();
            if let Err(error) = snapshots
                .collect(store.as_ref(), crate::snapshots::GRACE)
                .await
            {
                warn!(%error, "snapshot collection failed; retrying on the next pass");
            }
        }
    }

    /// Runs retention passes every `period` until cancelled.
    pub async fn run_retention(
        self,
        retention: Duration,
        period: Duration,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(period);
        let mut cursor: Option<String> = None;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self
                .expire(retention, Timestamp::now(), cursor.as_deref())
                .await
            {
                Ok((deleted, next)) => {
                    if deleted > 0 {
                        info!(deleted, retention = %humantime::format_duration(retention), "expired jobs deleted");
                    }
                    cursor = next;
                }
                Err(error) => warn!(%error, "retention pass failed; retrying on the next one"),
            }
        }
    }
}
