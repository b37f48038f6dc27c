//! The job table: the controller's view of the jobs in its store, kept by following the store's
//! watch. The store is the truth; this view only ever moves forward to newer versions of a key.
//!
//! Memory holds what the control loop needs and nothing that grows with history: every job's
//! id, status and version (an index for paging and filtering), the full record of every active
//! job, and a bounded set of recently finished ones. Older finished jobs are read from the store
//! when asked for (`fetch`, `page`).
//!
//! Invariants:
//! - An entry is only replaced by a higher version of its key (writes, watch events and
//!   re-reads all go through `Table::install`), so the view never runs backwards.
//! - This controller's writes go through one async writer lock, each a compare-and-swap on the
//!   version last seen. A conflict re-reads that job and applies the change again (bounded by
//!   `MAX_TRIES`). A write whose outcome is unknown (a timeout that may have committed) is
//!   settled by reading the key back: a committed write is never reported as failed, and a write
//!   that could not be settled marks the entry stale, so the next write re-reads it first
//!   instead of conflicting forever.
//! - Changes by any writer reach the view through the watch; a broken watch is re-established
//!   and followed by a fresh paged listing, so a missed change is repaired, not kept.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use runyard_model::{Job, JobStatus};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::store::{Precondition, Store, StoreError, Versioned, WatchEvent, WatchStream};

const PREFIX: &str = "jobs/";
/// Finished jobs whose full record stays in memory (the most recently changed ones).
pub const RECENT_FINISHED: usize = 1024;
/// Keys read per store call when listing.
const LIST_PAGE: usize = 1000;
/// Attempts of one update when its compare-and-swap keeps conflicting.
const MAX_TRIES: usize = 4;
/// Changes buffered per subscriber of [`Jobs::changes`] before it is told it fell behind.
const CHANGES_BUFFER: usize = 1024;
/// Wait between attempts to re-establish a broken watch.
const REWATCH_BACKOFF: Duration = Duration::from_millis(500);
const REWATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    table: Mutex<Table>,
    write: tokio::sync::Mutex<()>,
    /// Bumped after every change the view takes.
    changed: watch::Sender<u64>,
    /// Every change, for live views.
    changes: broadcast::Sender<Change>,
    /// The watch opened before the first listing, handed to `follow`.
    first_watch: Mutex<Option<WatchStream>>,
}

/// One change of the view.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A job was created or changed: its new record.
    Job(Arc<Job>),
    /// A job was deleted.
    Removed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    #[error("job record {key} is unreadable: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

/// What every job costs in memory: its id, status and version, plus its record while it is
/// active or recently finished.
struct Entry {
    status: JobStatus,
    version: u64,
    job: Option<Arc<Job>>,
    /// A write's outcome is unknown: read the key before writing it again.
    stale: bool,
}

#[derive(Default)]
struct Table {
    /// Every job by id; ids sort by creation time.
    index: BTreeMap<String, Entry>,
    /// Ids of the jobs that are not finished.
    active: BTreeSet<String>,
    /// Finished jobs whose record is kept, oldest first; may repeat an id.
    recent: VecDeque<String>,
}

/// Only what the index needs of a record.
#[derive(Deserialize)]
struct Head {
    id: String,
    status: JobStatus,
}

impl Table {
    /// Takes a version of a job when it is newer than the view's. Returns whether it did.
    fn install(&mut self, job: Arc<Job>, version: u64) -> bool {
        if let Some(e) = self.index.get_mut(&job.id) {
            if e.version > version {
                return false;
            }
            if e.version == version {
                // The same write seen again (our own, then through the watch, or re-read).
                e.stale = false;
                if e.job.is_none() {
                    let id = job.id.clone();
                    e.job = Some(job);
                    if e.status.is_terminal() {
                        self.remember(id);
                    }
                }
                return false;
            }
        }
        let id = job.id.clone();
        let finished = job.status.is_terminal();
        self.index.insert(
            id.clone(),
            Entry {
                status: job.status,
                version,
                job: Some(job),
                stale: false,
            },
        );
        if finished {
            self.active.remove(&id);
            self.remember(id);
        } else {
            self.active.insert(id);
        }
        true
    }

    /// Records a finished job by its head only (its record stays in the store).
    fn install_head(&mut self, head: Head, version: u64) {
        if self
            .index
            .get(&head.id)
            .is_some_and(|e| e.version >= version)
        {
            return;
        }
        self.active.remove(&head.id);
        self.index.insert(
            head.id,
            Entry {
                status: head.status,
                version,
                job: None,
                stale: false,
            },
        );
    }

    fn remove(&mut self, id: &str) -> bool {
        self.active.remove(id);
        self.index.remove(id).is_some()
    }

    /// Keeps a finished job's record among the recent ones, dropping the oldest beyond the cap.
    fn remember(&mut self, id: String) {
        self.recent.push_back(id);
        while self.recent.len() > RECENT_FINISHED {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            if self.recent.contains(&old) {
                continue;
            }
            if let Some(e) = self.index.get_mut(&old)
                && e.status.is_terminal()
            {
                e.job = None;
            }
        }
    }

    fn cached(&self, id: &str) -> Option<(Arc<Job>, u64)> {
        let e = self.index.get(id)?;
        if e.stale {
            return None;
        }
        e.job.clone().map(|j| (j, e.version))
    }
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

fn decode(key: &str, value: &[u8]) -> Result<Job, JobsError> {
    serde_json::from_slice(value).map_err(|source| JobsError::Decode {
        key: key.to_string(),
        source,
    })
}

/// Reads every job record in pages: active ones whole, finished ones by their head only.
/// A record that cannot be read is logged and left out; it does not stop the others.
async fn list_all(store: &dyn Store) -> Result<Table, JobsError> {
    let mut table = Table::default();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_page(PREFIX, after.as_deref(), LIST_PAGE).await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (key, v) in page {
            if let Err(error) = install_listed(&mut table, &key, &v) {
                error!(%key, %error, "job record skipped: it cannot be read");
            }
        }
    }
    Ok(table)
}

fn install_listed(table: &mut Table, key: &str, v: &Versioned) -> Result<(), JobsError> {
    let head: Head = serde_json::from_slice(&v.value).map_err(|source| JobsError::Decode {
        key: key.to_string(),
        source,
    })?;
    if head.status.is_terminal() {
        table.install_head(head, v.version);
    } else {
        table.install(Arc::new(decode(key, &v.value)?), v.version);
    }
    Ok(())
}

/// What [`Jobs::update`] returns for one job.
pub type Updated<T> = Result<Option<(Job, T)>, JobsError>;

/// How a write whose outcome was unknown turned out.
enum Settled {
    Committed(u64),
    NotCommitted,
    Unknown,
}

impl Jobs {
    /// Opens the view: starts watching the store, then reads every job in pages. Call
    /// [`Jobs::follow`] to keep it current.
    pub async fn load(store: Arc<dyn Store>) -> Result<Jobs, JobsError> {
        // Watch first, then list: a change made during the listing arrives through the watch.
        let watch = store.watch(PREFIX);
        let table = list_all(&*store).await?;
        Ok(Jobs {
            inner: Arc::new(Inner {
                store,
                table: Mutex::new(table),
                write: tokio::sync::Mutex::new(()),
                changed: watch::channel(0).0,
                changes: broadcast::channel(CHANGES_BUFFER).0,
                first_watch: Mutex::new(Some(watch)),
            }),
        })
    }

    /// Follows the store's watch until cancelled, taking every change into the view.
    pub async fn follow(self, cancel: CancellationToken) {
        let first = self.inner.first_watch.lock().unwrap().take();
        let mut watch = first.unwrap_or_else(|| self.inner.store.watch(PREFIX));
        let mut backoff = REWATCH_BACKOFF;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                e = watch.next() => e,
            };
            match event {
                Some(Ok(WatchEvent::Put { key, value })) => {
                    backoff = REWATCH_BACKOFF;
                    self.on_put(&key, value);
                }
                Some(Ok(WatchEvent::Delete { key })) => {
                    if let Some(id) = key.strip_prefix(PREFIX) {
                        self.forget(id);
                    }
                }
                broken => {
                    match broken {
                        Some(Err(error)) => warn!(%error, "job watch broke; listing again"),
                        _ => warn!("job watch ended; listing again"),
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(REWATCH_BACKOFF_MAX);
                    watch = self.inner.store.watch(PREFIX);
                    match self.relist().await {
                        Ok(n) => info!(jobs = n, "job view repaired after a broken watch"),
                        Err(error) => warn!(%error, "cannot list jobs; retrying"),
                    }
                }
            }
        }
    }

    fn on_put(&self, key: &str, value: Versioned) {
        match decode(key, &value.value) {
            Ok(job) => {
                self.publish(Arc::new(job), value.version);
            }
            Err(error) => error!(%key, %error, "job record skipped: it cannot be read"),
        }
    }

    /// Lists the store again and takes whatever the view missed.
    async fn relist(&self) -> Result<usize, JobsError> {
        let fresh = list_all(&*self.inner.store).await?;
        let missing: Vec<String> = {
            let table = self.inner.table.lock().unwrap();
            table
                .index
                .keys()
                .filter(|id| !fresh.index.contains_key(*id))
                .cloned()
                .collect()
        };
        let n = fresh.index.len();
        for (id, e) in fresh.index {
            match e.job {
                Some(job) => {
                    self.publish(job, e.version);
                }
                None => {
                    let mut table = self.inner.table.lock().unwrap();
                    table.install_head(
                        Head {
                            id,
                            status: e.status,
                        },
                        e.version,
                    );
                }
            }
        }
        // Gone from the listing: deleted, unless it was created after its page was read.
        for id in missing {
            if self.inner.store.get(&key(&id)).await?.is_none() {
                self.forget(&id);
            }
        }
        Ok(n)
    }

    /// Takes a version into the view and tells subscribers when it is new.
    fn publish(&self, job: Arc<Job>, version: u64) -> bool {
        let changed = self
            .inner
            .table
            .lock()
            .unwrap()
            .install(job.clone(), version);
        if changed {
            self.inner.changed.send_modify(|v| *v += 1);
            let _ = self.inner.changes.send(Change::Job(job));
        }
        changed
    }

    fn forget(&self, id: &str) {
        if self.inner.table.lock().unwrap().remove(id) {
            self.inner.changed.send_modify(|v| *v += 1);
            let _ = self.inner.changes.send(Change::Removed(id.to_string()));
        }
    }

    /// A job whose record is in memory: every active job and the recently finished ones. Use
    /// [`Jobs::fetch`] for any job.
    pub fn get(&self, id: &str) -> Option<Job> {
        let table = self.inner.table.lock().unwrap();
        table.index.get(id)?.job.as_deref().cloned()
    }

    /// Any job, read from the store when its record is not in memory.
    pub async fn fetch(&self, id: &str) -> Result<Option<Job>, JobsError> {
        if let Some(job) = self.get(id) {
            return Ok(Some(job));
        }
        if !self.inner.table.lock().unwrap().index.contains_key(id) {
            return Ok(None);
        }
        match self.inner.store.get(&key(id)).await? {
            Some(v) => Ok(Some(decode(&key(id), &v.value)?)),
            None => Ok(None),
        }
    }

    /// Every job that is not finished, in id order.
    pub fn active(&self) -> Vec<Job> {
        let table = self.inner.table.lock().unwrap();
        table
            .active
            .iter()
            .filter_map(|id| table.index.get(id)?.job.as_deref().cloned())
            .collect()
    }

    /// Ids of finished jobs after `after` in id (creation) order, at most `limit`: the
    /// retention task walks them a batch at a time.
    pub fn finished_after(&self, after: Option<&str>, limit: usize) -> Vec<String> {
        let table = self.inner.table.lock().unwrap();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        table
            .index
            .range::<str, (Bound<&str>, Bound<&str>)>((lower, Bound::Unbounded))
            .filter(|(_, e)| e.status.is_terminal())
            .take(limit)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many jobs the store holds.
    pub fn len(&self) -> usize {
        self.inner.table.lock().unwrap().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The jobs whose status passes `filter`, newest first, at most `limit`, starting strictly
    /// below `before` (an id cursor); and whether more follow.
    pub async fn page(
        &self,
        before: Option<&str>,
        limit: usize,
        filter: impl Fn(JobStatus) -> bool,
    ) -> Result<(Vec<Job>, bool), JobsError> {
        let (picked, more) = {
            let table = self.inner.table.lock().unwrap();
            let upper = before.map_or(Bound::Unbounded, Bound::Excluded);
            let mut picked: Vec<(String, Option<Arc<Job>>)> = Vec::new();
            let mut more = false;
            for (id, e) in table
                .index
                .range::<str, (Bound<&str>, Bound<&str>)>((Bound::Unbounded, upper))
                .rev()
            {
                if !filter(e.status) {
                    continue;
                }
                if picked.len() == limit {
                    more = true;
                    break;
                }
                picked.push((id.clone(), e.job.clone()));
            }
            (picked, more)
        };
        let mut out = Vec::with_capacity(picked.len());
        for (id, job) in picked {
            match job {
                Some(job) => out.push(Arc::unwrap_or_clone(job)),
                None => {
                    // Deleted meanwhile: leave it out.
                    if let Some(v) = self.inner.store.get(&key(&id)).await? {
                        out.push(decode(&key(&id), &v.value)?);
                    }
                }
            }
        }
        Ok((out, more))
    }

    /// Bumped after every change; for waiters that re-read what they show.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Every change from now on. A receiver that falls behind gets `Lagged` and should re-read.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// Stores a new job.
    pub async fn create(&self, job: Job) -> Result<Job, JobsError> {
        let _w = self.inner.write.lock().await;
        let value = serde_json::to_vec(&job).expect("a job always serializes");
        let version = match self
            .inner
            .store
            .put(&key(&job.id), value.clone(), Precondition::Absent)
            .await
        {
            Ok(v) => v,
            Err(e @ StoreError::Conflict { .. }) => return Err(e.into()),
            Err(error) => match self.settle(&job.id, &value).await {
                Settled::Committed(v) => v,
                Settled::NotCommitted | Settled::Unknown => return Err(error.into()),
            },
        };
        self.publish(Arc::new(job.clone()), version);
        Ok(job)
    }

    /// Applies `f` to the current job and stores the result if it returns one. Returns the stored
    /// job, or `None` when the job is unknown or `f` declined. On a conflict the job is read
    /// again and `f` applied to the fresh record, so `f` may run more than once.
    pub async fn update<T>(
        &self,
        id: &str,
        mut f: impl FnMut(&Job) -> Option<(Job, T)>,
    ) -> Result<Option<(Job, T)>, JobsError> {
        let _w = self.inner.write.lock().await;
        let mut tries = 0;
        loop {
            tries += 1;
            let Some((current, version)) = self.current(id).await? else {
                return Ok(None);
            };
            let Some((next, extra)) = f(&current) else {
                return Ok(None);
            };
            if next == *current {
                return Ok(Some((next, extra)));
            }
            let value = serde_json::to_vec(&next).expect("a job always serializes");
            let result = self
                .inner
                .store
                .put(&key(id), value.clone(), Precondition::Version(version))
                .await;
            let error = match result {
                Ok(v) => {
                    self.publish(Arc::new(next.clone()), v);
                    return Ok(Some((next, extra)));
                }
                Err(StoreError::Conflict { .. }) if tries < MAX_TRIES => {
                    warn!(job = %id, tries, "job changed meanwhile; reading it again");
                    self.mark_stale(id);
                    continue;
                }
                Err(e @ StoreError::Conflict { .. }) => {
                    self.mark_stale(id);
                    return Err(e.into());
                }
                Err(e) => e,
            };
            match self.settle(id, &value).await {
                Settled::Committed(v) => {
                    warn!(job = %id, %error, "job write reported an error but committed");
                    self.publish(Arc::new(next.clone()), v);
                    return Ok(Some((next, extra)));
                }
                Settled::NotCommitted | Settled::Unknown => return Err(error.into()),
            }
        }
    }

    /// Applies `f` to several jobs and stores the results in as few atomic store transactions as
    /// the store takes (`Store::max_batch` writes each): the reconcile loop's placements cost one
    /// durable write per batch, not per job. A job whose record is not in memory, or whose batch
    /// conflicted or failed, goes through [`Jobs::update`] alone, so each job's result is what
    /// `update` would have returned. Results come in the order of `ids`; each id at most once.
    pub async fn update_many<T>(
        &self,
        ids: &[String],
        f: impl Fn(&Job) -> Option<(Job, T)>,
    ) -> Vec<Updated<T>> {
        let mut results: Vec<Option<Updated<T>>> = (0..ids.len()).map(|_| None).collect();
        let mut alone = Vec::new();
        {
            let _w = self.inner.write.lock().await;
            let mut writes = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let cached = self.inner.table.lock().unwrap().cached(id);
                let Some((current, version)) = cached else {
                    alone.push(i);
                    continue;
                };
                match f(&current) {
                    None => results[i] = Some(Ok(None)),
                    Some((next, extra)) if next == *current => {
                        results[i] = Some(Ok(Some((next, extra))))
                    }
                    Some((next, extra)) => {
                        let value = serde_json::to_vec(&next).expect("a job always serializes");
                        writes.push((i, next, extra, value, version));
                    }
                }
            }
            let max = self.inner.store.max_batch().max(1);
            while !writes.is_empty() {
                let rest = writes.split_off(writes.len().min(max));
                let batch = std::mem::replace(&mut writes, rest);
                let puts = batch
                    .iter()
                    .map(|(_, next, _, value, version)| {
                        (
                            key(&next.id),
                            value.clone(),
                            Precondition::Version(*version),
                        )
                    })
                    .collect();
                match self.inner.store.put_all(puts).await {
                    Ok(versions) => {
                        for ((i, next, extra, _, _), v) in batch.into_iter().zip(versions) {
                            self.publish(Arc::new(next.clone()), v);
                            results[i] = Some(Ok(Some((next, extra))));
                        }
                    }
                    Err(StoreError::Conflict { .. }) => alone.extend(batch.iter().map(|w| w.0)),
                    Err(error) => {
                        warn!(%error, jobs = batch.len(), "batched job write failed; settling each job");
                        for (i, next, extra, value, _) in batch {
                            match self.settle(&next.id, &value).await {
                                Settled::Committed(v) => {
                                    self.publish(Arc::new(next.clone()), v);
                                    results[i] = Some(Ok(Some((next, extra))));
                                }
                                Settled::NotCommitted | Settled::Unknown => alone.push(i),
                            }
                        }
                    }
                }
            }
        }
        for i in alone {
            results[i] = Some(self.update(&ids[i], &f).await);
        }
        results
            .into_iter()
            .map(|r| r.expect("every job has a result"))
            .collect()
    }

    /// Deletes a job record. Returns the deleted job, or `None` if there was none.
    pub async fn remove(&self, id: &str) -> Result<Option<Job>, JobsError> {
        let _w = self.inner.write.lock().await;
        let Some(job) = self.fetch(id).await? else {
            return Ok(None);
        };
        self.inner.store.delete(&key(id)).await?;
        self.forget(id);
        Ok(Some(job))
    }

    /// The job as last written, reading it from the store when memory has no trustworthy copy.
    async fn current(&self, id: &str) -> Result<Option<(Arc<Job>, u64)>, JobsError> {
        let known = {
            let table = self.inner.table.lock().unwrap();
            if let Some(c) = table.cached(id) {
                return Ok(Some(c));
            }
            table.index.contains_key(id)
        };
        if !known {
            return Ok(None);
        }
        match self.inner.store.get(&key(id)).await? {
            Some(v) => {
                let job = Arc::new(decode(&key(id), &v.value)?);
                // Equal versions are one write, so this also clears `stale`.
                self.publish(job.clone(), v.version);
                Ok(Some((job, v.version)))
            }
            None => {
                self.forget(id);
                Ok(None)
            }
        }
    }

    fn mark_stale(&self, id: &str) {
        if let Some(e) = self.inner.table.lock().unwrap().index.get_mut(id) {
            e.stale = true;
        }
    }

    /// Reads a key back after a write whose outcome is unknown.
    async fn settle(&self, id: &str, wrote: &[u8]) -> Settled {
        match self.inner.store.get(&key(id)).await {
            Ok(Some(v)) if v.value == wrote => Settled::Committed(v.version),
            Ok(Some(v)) => {
                if let Ok(job) = decode(&key(id), &v.value) {
                    self.publish(Arc::new(job), v.version);
                }
                Settled::NotCommitted
            }
            Ok(None) => Settled::NotCommitted,
            Err(error) => {
                warn!(job = %id, %error, "cannot read a job back after a failed write; it is re-read before the next write");
                self.mark_stale(id);
                Settled::Unknown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::{JobSpec, Timestamp};

    fn job(id: &str, status: JobStatus) -> Arc<Job> {
        let spec = JobSpec::from_json(br#"{"repo":"file:///r","script":"t.py"}"#).unwrap();
        let mut j = Job::new(id.into(), spec, Timestamp(1));
        j.status = status;
        Arc::new(j)
    }

    #[test]
    fn install_only_moves_forward() {
        let mut t = Table::default();
        assert!(t.install(job("a", JobStatus::Running), 5));
        assert!(!t.install(job("a", JobStatus::Pending), 4));
        assert!(!t.install(job("a", JobStatus::Pending), 5));
        assert_eq!(t.index["a"].status, JobStatus::Running);
        assert!(t.install(job("a", JobStatus::Succeeded), 6));
        assert!(t.active.is_empty());
        assert_eq!(t.index["a"].status, JobStatus::Succeeded);
    }

    #[test]
    fn finished_records_beyond_the_cap_leave_memory() {
        let mut t = Table::default();
        let n = RECENT_FINISHED + 10;
        for i in 0..n {
            t.install(job(&format!("j{i:05}"), JobStatus::Succeeded), i as u64 + 1);
        }
        t.install(job("live", JobStatus::Running), 1_000_000);
        let kept = t.index.values().filter(|e| e.job.is_some()).count();
        assert_eq!(kept, RECENT_FINISHED + 1);
        assert!(t.index["j00000"].job.is_none());
        assert!(t.index[&format!("j{:05}", n - 1)].job.is_some());
        assert!(t.index["live"].job.is_some());
        assert_eq!(t.index.len(), n + 1);
        assert_eq!(t.active.len(), 1);
    }

    #[test]
    fn a_repeated_recent_id_keeps_its_record() {
        let mut t = Table::default();
        t.install(job("a", JobStatus::Succeeded), 1);
        for i in 0..RECENT_FINISHED - 1 {
            t.install(job(&format!("x{i:05}"), JobStatus::Failed), i as u64 + 10);
        }
        // "a" changes again while finished (a late report): it becomes recent again.
        t.install(job("a", JobStatus::Succeeded), 100_000);
        t.install(job("y", JobStatus::Failed), 100_001);
        assert!(t.index["a"].job.is_some());
        assert!(t.index["x00000"].job.is_none());
    }

    #[test]
    fn heads_do_not_replace_newer_entries() {
        let mut t = Table::default();
        t.install(job("a", JobStatus::Running), 7);
        t.install_head(
            Head {
                id: "a".into(),
                status: JobStatus::Succeeded,
            },
            6,
        );
        assert_eq!(t.index["a"].status, JobStatus::Running);
        assert!(t.active.contains("a"));
    }
}
