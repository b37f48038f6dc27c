//! Report lines (progress, metrics, checkpoints, environment) turned into what users read.
//!
//! - Folding: a job's summary (`progress`, `metrics`, `best`, `environment`) is folded from its
//!   report stream in batches. Storing report lines only marks the job; the folder reads the
//!   bytes after the job's `report_offset` and applies them with one write per job per tick
//!   (`FOLD_EVERY`), instead of one write per chunk. The offset is part of the job record, so
//!   lines stored but not yet folded when the controller stops are folded after it starts (every
//!   active job is marked at start). A terminal status is applied only after `flush`, so a
//!   finished job's summary holds every report line it sent.
//! - Metric history: each attempt's series are parsed once, as their lines are first read, and
//!   extended with new bytes only; at most `SERIES_CACHED` attempts stay in memory.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runyard_model::Timestamp;
use runyard_model::report::{self, MetricPoint, Report};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::jobs::{Jobs, JobsError};
use crate::logs::LogStore;

/// How often marked jobs are folded.
pub const FOLD_EVERY: Duration = Duration::from_millis(250);
/// Attempts whose metric series stay parsed in memory.
pub const SERIES_CACHED: usize = 64;
/// Bytes read from a report stream per call.
const READ_CHUNK: usize = 4 << 20;

pub type Series = BTreeMap<String, Vec<MetricPoint>>;
/// An attempt's parsed series: job, attempt, bytes read, series.
type Cached = (String, u32, u64, Arc<Series>);

#[derive(Clone, Default)]
pub struct ReportFolder {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Jobs with report lines not folded yet.
    marked: Mutex<HashSet<String>>,
    wake: Notify,
    /// Parsed metric history per (job, attempt), with the byte offset read so far; most
    /// recently used last.
    series: Mutex<VecDeque<Cached>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error("cannot read report lines: {0}")]
    Read(#[from] std::io::Error),
}

impl ReportFolder {
    /// The job has new report lines to fold.
    pub fn mark(&self, job: &str) {
        self.inner.marked.lock().unwrap().insert(job.to_string());
        self.inner.wake.notify_one();
    }

    /// Folds marked jobs every `FOLD_EVERY` until cancelled; a job that fails stays marked.
    pub async fn run(self, jobs: Jobs, lines: LogStore, cancel: CancellationToken) {
        for job in jobs.active() {
            self.mark(&job.id);
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.inner.wake.notified() => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(FOLD_EVERY) => {}
            }
            let marked: Vec<String> = self.inner.marked.lock().unwrap().drain().collect();
            for id in marked {
                if let Err(error) = self.flush(&jobs, &lines, &id).await {
                    warn!(job = %id, %error, "cannot fold report lines; retrying");
                    self.mark(&id);
                }
            }
        }
    }

    /// Folds every stored report line of the job's current attempt into its record now.
    pub async fn flush(&self, jobs: &Jobs, lines: &LogStore, id: &str) -> Result<(), FoldError> {
        let Some(job) = jobs.get(id) else {
            return Ok(());
        };
        if job.attempt == 0 {
            return Ok(());
        }
        let (attempt, from) = (job.attempt, job.report_offset);
        let mut reports = Vec::new();
        let mut offset = from;
        loop {
            let (bytes, next) = lines.read_from(id, attempt, offset, READ_CHUNK).await?;
            if bytes.is_empty() {
                break;
            }
            offset = next;
            reports.extend(
                String::from_utf8_lossy(&bytes)
                    .lines()
                    .filter_map(Report::parse),
            );
        }
        if offset == from {
            return Ok(());
        }
        jobs.update(id, |s| {
            // Another fold got here first, or a new attempt started: nothing to do.
            let p = s.current()?;
            if p.attempt != attempt || p.report_offset != from {
                return None;
            }
            let mut n = s.clone();
            let p = n.placement.as_mut()?;
            for r in &reports {
                report::apply(p, r);
            }
            p.report_offset = offset;
            p.updated_at = Timestamp::now();
            Some((n, ()))
        })
        .await?;
        Ok(())
    }

    /// The metric history of one attempt, read from its report stream: only the bytes added
    /// since the last call are parsed.
    pub async fn series(
        &self,
        lines: &LogStore,
        job: &str,
        attempt: u32,
    ) -> std::io::Result<Arc<Series>> {
        let cached = {
            let mut cache = self.inner.series.lock().unwrap();
            cache
                .iter()
                .position(|(j, a, _, _)| j == job && *a == attempt)
                .and_then(|i| cache.remove(i))
        };
        let (mut offset, mut series) = match cached {
            Some((_, _, offset, s)) => (offset, s),
            None => (0, Arc::new(Series::new())),
        };
        loop {
            let (bytes, next) = lines.read_from(job, attempt, offset, READ_CHUNK).await?;
            if bytes.is_empty() {
                break;
            }
            offset = next;
            let text = String::from_utf8_lossy(&bytes);
            let s = Arc::make_mut(&mut series);
            for (name, points) in report::series(text.lines()) {
                s.entry(name).or_default().extend(points);
            }
        }
        let mut cache = self.inner.series.lock().unwrap();
        cache.retain(|(j, a, _, _)| !(j == job && *a == attempt));
        cache.push_back((job.to_string(), attempt, offset, series.clone()));
        while cache.len() > SERIES_CACHED {
            cache.pop_front();
        }
        Ok(series)
    }

    /// Forgets what is kept of a job (it was deleted).
    pub fn forget(&self, job: &str) {
        self.inner.marked.lock().unwrap().remove(job);
        self.inner.series.lock().unwrap().retain(|(j, ..)| j != job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn series_are_extended_with_new_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let folder = ReportFolder::default();
        let line = |step: u64, v: f64| {
            format!(r#"{{"type":"metrics","step":{step},"values":{{"loss":{v}}}}}"#)
        };
        const JOB: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";
        store
            .append(
                JOB,
                1,
                0,
                2,
                format!("{}\n{}", line(1, 0.5), line(2, 0.4)).into(),
            )
            .await
            .unwrap();
        let s = folder.series(&store, JOB, 1).await.unwrap();
        assert_eq!(s["loss"].len(), 2);
        store
            .append(JOB, 1, 2, 1, line(3, 0.3).into())
            .await
            .unwrap();
        let s = folder.series(&store, JOB, 1).await.unwrap();
        let steps: Vec<Option<u64>> = s["loss"].iter().map(|p| p.step).collect();
        assert_eq!(steps, [Some(1), Some(2), Some(3)]);
        // The cached state read up to the end: nothing is parsed twice.
        let cache = folder.inner.series.lock().unwrap();
        assert_eq!(cache.len(), 1);
        assert!(cache[0].2 > 0);
    }
}
