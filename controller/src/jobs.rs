//! The job table: every job in memory for reads, written through to the store.
//!
//! Invariant: the store is the truth and the cache mirrors it. All writes go through one async
//! writer lock, each as a compare-and-swap on the version last read, so the cache can never run
//! ahead of the store nor two writers interleave on one job. Reads take a std mutex briefly and
//! never wait on I/O.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use runyard_model::Job;
use tokio::sync::watch;

use crate::store::{Precondition, Store, StoreError};

const PREFIX: &str = "jobs/";

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    cache: Mutex<BTreeMap<String, (Job, u64)>>,
    write: tokio::sync::Mutex<()>,
    /// Bumped after every committed change.
    changed: watch::Sender<u64>,
}

/// What `Jobs::remove` did.
#[derive(Debug)]
pub enum Removed {
    /// The job was removed from the store and the cache; this was its last state.
    Gone(Job),
    /// `only_if` declined: the job stays as it is.
    Kept(Job),
    /// No such job.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    #[error("job {0} changed in the store while being removed; retry")]
    Changed(String),
    #[error("job record {key} is unreadable: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

impl Jobs {
    /// Loads every job from the store.
    pub async fn load(store: Arc<dyn Store>) -> Result<Jobs, JobsError> {
        let mut cache = BTreeMap::new();
        for (key, v) in store.list(PREFIX).await? {
            let job: Job =
                serde_json::from_slice(&v.value).map_err(|source| JobsError::Decode {
                    key: key.clone(),
                    source,
                })?;
            cache.insert(job.id.clone(), (job, v.version));
        }
        Ok(Jobs {
            inner: Arc::new(Inner {
                store,
                cache: Mutex::new(cache),
                write: tokio::sync::Mutex::new(()),
                changed: watch::channel(0).0,
            }),
        })
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.inner
            .cache
            .lock()
            .unwrap()
            .get(id)
            .map(|(j, _)| j.clone())
    }

    /// All jobs, in id order (ids sort by creation time).
    pub fn all(&self) -> Vec<Job> {
        self.inner
            .cache
            .lock()
            .unwrap()
            .values()
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// Applies `f` to the jobs matching `filter` and returns what it maps, newest first, at most
    /// `limit`, starting strictly below `before` (an id cursor).
    pub fn page(
        &self,
        before: Option<&str>,
        limit: usize,
        filter: impl Fn(&Job) -> bool,
    ) -> (Vec<Job>, bool) {
        let cache = self.inner.cache.lock().unwrap();
        let range = match before {
            Some(c) => cache
                .range::<str, (Bound<&str>, Bound<&str>)>((Bound::Unbounded, Bound::Excluded(c))),
            None => {
                cache.range::<str, (Bound<&str>, Bound<&str>)>((Bound::Unbounded, Bound::Unbounded))
            }
        };
        let mut out = Vec::new();
        let mut more = false;
        for (_, (j, _)) in range.rev() {
            if !filter(j) {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(j.clone());
        }
        (out, more)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Stores a new job.
    pub async fn create(&self, job: Job) -> Result<Job, JobsError> {
        let _w = self.inner.write.lock().await;
        let value = serde_json::to_vec(&job).expect("a job always serializes");
        let version = self
            .inner
            .store
            .put(&key(&job.id), value, Precondition::Absent)
            .await?;
        self.inner
            .cache
            .lock()
            .unwrap()
            .insert(job.id.clone(), (job.clone(), version));
        self.inner.changed.send_modify(|v| *v += 1);
        Ok(job)
    }

    /// Applies `f` to the current job and stores the result if it returns one. Returns the stored
    /// job, or `None` when the job is unknown or `f` declined.
    pub async fn update<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Job) -> Option<(Job, T)>,
    ) -> Result<Option<(Job, T)>, JobsError> {
        let _w = self.inner.write.lock().await;
        let Some((current, version)) = self.inner.cache.lock().unwrap().get(id).cloned() else {
            return Ok(None);
        };
        let Some((next, extra)) = f(&current) else {
            return Ok(None);
        };
        if next == current {
            return Ok(Some((next, extra)));
        }
        let value = serde_json::to_vec(&next).expect("a job always serializes");
        let new_version = self
            .inner
            .store
            .put(&key(id), value, Precondition::Version(version))
            .await?;
        self.inner
            .cache
            .lock()
            .unwrap()
            .insert(id.to_string(), (next.clone(), new_version));
        self.inner.changed.send_modify(|v| *v += 1);
        Ok(Some((next, extra)))
    }
}

impl Jobs {
    /// Removes the job if `only_if` accepts its current state. Under the writer lock, so no
    /// update interleaves; the store's version is compared with the cached one first (the store
    /// has no conditional delete), so a record another writer changed is kept.
    pub async fn remove(
        &self,
        id: &str,
        only_if: impl FnOnce(&Job) -> bool,
    ) -> Result<Removed, JobsError> {
        let _w = self.inner.write.lock().await;
        let Some((current, version)) = self.inner.cache.lock().unwrap().get(id).cloned() else {
            return Ok(Removed::Unknown);
        };
        if !only_if(&current) {
            return Ok(Removed::Kept(current));
        }
        let stored = self.inner.store.get(&key(id)).await?;
        if stored.is_some_and(|v| v.version != version) {
            return Err(JobsError::Changed(id.to_string()));
        }
        self.inner.store.delete(&key(id)).await?;
        self.inner.cache.lock().unwrap().remove(id);
        self.inner.changed.send_modify(|v| *v += 1);
        Ok(Removed::Gone(current))
    }
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}
