//! The attempts this agent holds: running, or finished and not yet released by the controller.
//!
//! Each attempt has its log and report spools, its latest status (with a version so sessions know what they
//! have sent), and a stop channel to its runner. A change to any attempt wakes the session pump.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runyard_model::AttemptStatus;
use runyard_proto::v1;
use tokio::sync::{Notify, watch};

use crate::spool::Spool;

/// A stop request: grace period and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopRequest {
    pub grace: Duration,
    pub reason: String,
}

pub type Key = (String, u32);

pub struct Attempt {
    pub job_id: String,
    pub attempt: u32,
    /// What the script printed.
    pub spool: Spool,
    /// Report lines (progress, metrics, checkpoints, environment) as JSON.
    pub reports: Spool,
    status: Mutex<(AttemptStatus, u64)>,
    pub stop: watch::Sender<Option<StopRequest>>,
    /// GPU indices the attempt holds.
    pub gpus: Vec<u32>,
    /// The port given to the attempt (`$PORT`), once chosen; tunnels connect only to it.
    pub port: std::sync::OnceLock<u16>,
    /// How its process was started (interpreter, directory, environment, user), once it was:
    /// a service's scaling policy runs the same way.
    pub runtime: std::sync::OnceLock<crate::process::ProcessSpec>,
}

impl Attempt {
    /// The spool of a stream.
    pub fn stream(&self, stream: v1::Stream) -> &Spool {
        match stream {
            v1::Stream::Log => &self.spool,
            v1::Stream::Report => &self.reports,
        }
    }

    /// Every line of both streams has been acknowledged.
    pub fn all_acked(&self) -> bool {
        self.spool.acked() >= self.spool.lines() && self.reports.acked() >= self.reports.lines()
    }

    pub fn status(&self) -> (AttemptStatus, u64) {
        self.status.lock().unwrap().clone()
    }

    pub fn is_terminal(&self) -> bool {
        self.status.lock().unwrap().0.state.is_terminal()
    }
}

#[derive(Clone, Default)]
pub struct Attempts {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    map: Mutex<BTreeMap<Key, Arc<Attempt>>>,
    changed: Notify,
}

impl Attempts {
    /// Adds an attempt unless it is already held; returns it if new.
    pub fn insert(
        &self,
        job_id: &str,
        attempt: u32,
        spool: Spool,
        reports: Spool,
        gpus: Vec<u32>,
    ) -> Option<Arc<Attempt>> {
        let mut map = self.inner.map.lock().unwrap();
        let key = (job_id.to_string(), attempt);
        if map.contains_key(&key) {
            return None;
        }
        let status = AttemptStatus::preparing(attempt);
        let a = Arc::new(Attempt {
            job_id: job_id.to_string(),
            attempt,
            spool,
            reports,
            status: Mutex::new((status, 1)),
            stop: watch::channel(None).0,
            gpus,
            port: std::sync::OnceLock::new(),
            runtime: std::sync::OnceLock::new(),
        });
        map.insert(key, a.clone());
        drop(map);
        self.inner.changed.notify_waiters();
        Some(a)
    }

    pub fn get(&self, job_id: &str, attempt: u32) -> Option<Arc<Attempt>> {
        self.inner
            .map
            .lock()
            .unwrap()
            .get(&(job_id.to_string(), attempt))
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Attempt>> {
        self.inner.map.lock().unwrap().values().cloned().collect()
    }

    /// Updates an attempt's status and wakes the pump.
    pub fn set_status(&self, a: &Attempt, f: impl FnOnce(&mut AttemptStatus)) {
        {
            let mut s = a.status.lock().unwrap();
            f(&mut s.0);
            s.1 += 1;
        }
        self.inner.changed.notify_waiters();
    }

    /// Logs were appended or acknowledged somewhere.
    pub fn wake(&self) {
        self.inner.changed.notify_waiters();
    }

    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.changed.notified()
    }

    /// Forgets a finished attempt released by the controller.
    pub fn release(&self, job_id: &str, attempt: u32) -> bool {
        let mut map = self.inner.map.lock().unwrap();
        let key = (job_id.to_string(), attempt);
        match map.get(&key) {
            Some(a) if a.is_terminal() => {
                a.spool.remove();
                a.reports.remove();
                map.remove(&key);
                true
            }
            _ => false,
        }
    }

    /// GPU indices held by attempts that have not finished.
    pub fn gpus_in_use(&self) -> Vec<u32> {
        self.inner
            .map
            .lock()
            .unwrap()
            .values()
            .filter(|a| !a.is_terminal())
            .flat_map(|a| a.gpus.clone())
            .collect()
    }
}
