//! The data plane's state: each service's replicas as endpoints (address, readiness, drain,
//! requests in flight) and its counters. The proxy picks from it, health checks and the
//! services loop write it. Nothing here is stored: it is rebuilt from the jobs after a restart.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use runyard_model::Timestamp;
use runyard_model::service::Serving;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How a replica is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// Not known yet: try direct, then the tunnel.
    Unknown = 0,
    /// A TCP connection to the agent's address.
    Direct = 1,
    /// Through the agent's own connection to the controller.
    Tunnel = 2,
}

impl Path {
    fn from_u8(v: u8) -> Path {
        match v {
            1 => Path::Direct,
            2 => Path::Tunnel,
            _ => Path::Unknown,
        }
    }
}

/// One replica as the proxy sees it.
#[derive(Debug)]
pub struct Endpoint {
    /// Unique in this process: the connection pool's key.
    pub id: u64,
    pub service: String,
    pub job: String,
    pub attempt: u32,
    pub index: u32,
    pub generation: u64,
    pub agent: String,
    /// The agent's address (its session's), for the direct path.
    pub host: Option<IpAddr>,
    pub port: u16,
    pub ready: AtomicBool,
    /// Was ready, then failed its checks: out of rotation, to be replaced.
    pub unhealthy: AtomicBool,
    pub draining: AtomicBool,
    pub in_flight: AtomicUsize,
    pub served: AtomicU64,
    path: AtomicU8,
    /// Ends the endpoint's health checks.
    pub cancel: CancellationToken,
}

impl Endpoint {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        service: &str,
        job: &str,
        attempt: u32,
        index: u32,
        generation: u64,
        agent: &str,
        host: Option<IpAddr>,
        port: u16,
    ) -> Endpoint {
        Endpoint {
            id,
            service: service.into(),
            job: job.into(),
            attempt,
            index,
            generation,
            agent: agent.into(),
            host,
            port,
            ready: AtomicBool::new(false),
            unhealthy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            path: AtomicU8::new(Path::Unknown as u8),
            cancel: CancellationToken::new(),
        }
    }

    /// May get new requests.
    pub fn in_rotation(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
            && !self.unhealthy.load(Ordering::SeqCst)
    }

    pub fn path(&self) -> Path {
        Path::from_u8(self.path.load(Ordering::Relaxed))
    }

    pub fn set_path(&self, p: Path) {
        self.path.store(p as u8, Ordering::Relaxed);
    }

    /// The authority the connection pool keys this replica's connections by.
    pub fn authority(&self) -> String {
        format!("e{}.replica", self.id)
    }
}

/// A request counted against an endpoint until dropped (the response's last byte).
pub struct InFlight {
    pub endpoint: Arc<Endpoint>,
    route: Arc<ServiceRoute>,
    started: Instant,
    count: usize,
    pub failed: bool,
    /// Counted in the service's statistics when it ends.
    record: bool,
}

impl InFlight {
    /// Gives the requests back without counting them (they never reached the replica).
    pub fn abandon(mut self) {
        self.record = false;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint
            .in_flight
            .fetch_sub(self.count, Ordering::SeqCst);
        // A drained replica may now be idle: let the services loop stop it.
        if self.endpoint.draining.load(Ordering::SeqCst) {
            self.route.changed();
        }
        if !self.record {
            return;
        }
        self.endpoint
            .served
            .fetch_add(self.count as u64, Ordering::Relaxed);
        self.route
            .stats
            .lock()
            .unwrap()
            .record(self.started.elapsed(), self.count, self.failed);
    }
}

/// Counters of one service's requests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Recent latencies in microseconds (a ring), for p50/p99.
    latencies: VecDeque<u32>,
    /// (second since the process started, requests, failed) per second, recent first last.
    per_second: VecDeque<(u64, u64, u64)>,
    pub total: u64,
    pub failed: u64,
    /// Sizes of recent batches.
    batches: VecDeque<u32>,
}

const LATENCY_SAMPLES: usize = 4096;
const RATE_WINDOW_SECS: u64 = 10;
const BATCH_SAMPLES: usize = 256;

fn process_second() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl Stats {
    pub fn record(&mut self, latency: Duration, count: usize, failed: bool) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        for _ in 0..count.min(LATENCY_SAMPLES) {
            if self.latencies.len() == LATENCY_SAMPLES {
                self.latencies.pop_front();
            }
            self.latencies.push_back(us);
        }
        let now = process_second();
        match self.per_second.back_mut() {
            Some((s, n, f)) if *s == now => {
                *n += count as u64;
                *f += u64::from(failed) * count as u64;
            }
            _ => self
                .per_second
                .push_back((now, count as u64, u64::from(failed) * count as u64)),
        }
        while self
            .per_second
            .front()
            .is_some_and(|(s, _, _)| s + RATE_WINDOW_SECS < now)
        {
            self.per_second.pop_front();
        }
        self.total += count as u64;
        if failed {
            self.failed += count as u64;
        }
    }

    pub fn record_batch(&mut self, size: usize) {
        if self.batches.len() == BATCH_SAMPLES {
            self.batches.pop_front();
        }
        self.batches.push_back(size as u32);
    }

    /// Requests per second over the last complete seconds of the window.
    pub fn rate(&self) -> f64 {
        let now = process_second();
        let n: u64 = self
            .per_second
            .iter()
            .filter(|(s, _, _)| *s < now && s + RATE_WINDOW_SECS >= now)
            .map(|(_, n, _)| n)
            .sum();
        n as f64 / RATE_WINDOW_SECS as f64
    }

    /// (p50, p99) of recent latencies, in milliseconds.
    pub fn percentiles(&self) -> Option<(f64, f64)> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut v: Vec<u32> = self.latencies.iter().copied().collect();
        v.sort_unstable();
        let at = |q: f64| f64::from(v[((v.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        Some((at(0.5), at(0.99)))
    }

    /// The mean size of recent batches.
    pub fn mean_batch(&self) -> Option<f64> {
        (!self.batches.is_empty()).then(|| {
            self.batches.iter().map(|&b| f64::from(b)).sum::<f64>() / self.batches.len() as f64
        })
    }
}

/// A point of a service's history (for the page's plot).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    pub at: Timestamp,
    pub replicas: u32,
    pub ready: u32,
    pub rate: f64,
    pub pending: u64,
}

/// Points kept per service (an hour at one per 5 s).
pub const HISTORY_POINTS: usize = 720;

/// One service's routing table.
pub struct ServiceRoute {
    pub name: String,
    pub serving: RwLock<Serving>,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// Bumped whenever an endpoint joins, leaves, gets ready or goes idle.
    version: watch::Sender<u64>,
    /// Requests waiting for a replica (cold start) or for their batch.
    pub queued: AtomicU64,
    /// Requests answered by the cold-start proxy since the services loop last looked: demand
    /// that must start a replica even when each request was over before the loop ran.
    pub cold_demand: AtomicU64,
    pub stats: Mutex<Stats>,
    pub history: Mutex<VecDeque<Sample>>,
    next: AtomicUsize,
    /// Wakes the services loop.
    loop_wake: Arc<tokio::sync::Notify>,
}

impl ServiceRoute {
    pub fn new(name: &str, serving: Serving, loop_wake: Arc<tokio::sync::Notify>) -> ServiceRoute {
        ServiceRoute {
            name: name.into(),
            serving: RwLock::new(serving),
            endpoints: RwLock::new(Arc::new(Vec::new())),
            version: watch::channel(0).0,
            queued: AtomicU64::new(0),
            cold_demand: AtomicU64::new(0),
            stats: Mutex::default(),
            history: Mutex::default(),
            next: AtomicUsize::new(0),
            loop_wake,
        }
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().unwrap().clone()
    }

    pub fn set_endpoints(&self, v: Vec<Arc<Endpoint>>) {
        *self.endpoints.write().unwrap() = Arc::new(v);
        self.changed();
    }

    /// Wakes requests waiting for a replica and the services loop.
    pub fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
        self.loop_wake.notify_one();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Requests queued or in flight: what the policy calls pending.
    pub fn pending(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
            + self
                .endpoints()
                .iter()
                .map(|e| e.in_flight.load(Ordering::SeqCst) as u64)
                .sum::<u64>()
    }

    /// Takes the in-rotation replica with the fewest requests in flight (ties in turn), for
    /// `count` requests, skipping `exclude`. The count is taken before the replica's state is
    /// checked again, so a replica drained meanwhile is never given a request it would not
    /// count.
    pub fn pick(self: &Arc<Self>, count: usize, exclude: &[u64]) -> Option<InFlight> {
        let endpoints = self.endpoints();
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        loop {
            let best = (0..n)
                .map(|i| &endpoints[(start + i) % n])
                .filter(|e| e.in_rotation() && !exclude.contains(&e.id))
                .min_by_key(|e| e.in_flight.load(Ordering::Relaxed))?;
            best.in_flight.fetch_add(count, Ordering::SeqCst);
            if best.in_rotation() {
                return Some(InFlight {
                    endpoint: best.clone(),
                    route: self.clone(),
                    started: Instant::now(),
                    count,
                    failed: false,
                    record: true,
                });
            }
            best.in_flight.fetch_sub(count, Ordering::SeqCst);
        }
    }

    /// The replica `flight` went to could not be reached: out of rotation until its check
    /// passes again, and noted in `tried` so that the request goes to another (uncounted).
    pub fn unreachable(&self, flight: InFlight, tried: &mut Vec<u64>) {
        flight.endpoint.ready.store(false, Ordering::SeqCst);
        self.changed();
        tried.push(flight.endpoint.id);
        flight.abandon();
    }

    /// Ready replicas in rotation.
    pub fn ready(&self) -> usize {
        self.endpoints().iter().filter(|e| e.in_rotation()).count()
    }

    pub fn sample(&self, at: Timestamp, replicas: u32) {
        let s = Sample {
            at,
            replicas,
            ready: self.ready() as u32,
            rate: self.stats.lock().unwrap().rate(),
            pending: self.pending(),
        };
        let mut h = self.history.lock().unwrap();
        if h.len() == HISTORY_POINTS {
            h.pop_front();
        }
        h.push_back(s);
    }
}

/// Every service's routing table, and every endpoint by id (for the connector).
#[derive(Default)]
pub struct Routes {
    services: RwLock<HashMap<String, Arc<ServiceRoute>>>,
    endpoints: RwLock<HashMap<u64, Arc<Endpoint>>>,
    next_id: AtomicU64,
    /// Notified when any route changes (the services loop waits on it).
    pub changes: Arc<tokio::sync::Notify>,
}

impl Routes {
    pub fn get(&self, name: &str) -> Option<Arc<ServiceRoute>> {
        self.services.read().unwrap().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.services.read().unwrap().keys().cloned().collect()
    }

    /// The service's route, made (with `serving`) if new, its settings updated if not.
    pub fn upsert(&self, name: &str, serving: &Serving) -> Arc<ServiceRoute> {
        if let Some(r) = self.get(name) {
            if *r.serving.read().unwrap() != *serving {
                *r.serving.write().unwrap() = serving.clone();
            }
            return r;
        }
        self.services
            .write()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ServiceRoute::new(
                    name,
                    serving.clone(),
                    self.changes.clone(),
                ))
            })
            .clone()
    }

    /// Drops a service's route, ending its endpoints' checks; waiting requests see no route.
    pub fn remove(&self, name: &str) {
        if let Some(r) = self.services.write().unwrap().remove(name) {
            for e in r.endpoints().iter() {
                self.forget_endpoint(e);
            }
            r.changed();
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn add_endpoint(&self, e: Arc<Endpoint>) {
        self.endpoints.write().unwrap().insert(e.id, e);
    }

    pub fn forget_endpoint(&self, e: &Endpoint) {
        e.cancel.cancel();
        self.endpoints.write().unwrap().remove(&e.id);
    }

    pub fn endpoint(&self, id: u64) -> Option<Arc<Endpoint>> {
        self.endpoints.read().unwrap().get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(n: usize) -> (Arc<ServiceRoute>, Vec<Arc<Endpoint>>) {
        let serving: Serving = serde_json::from_value(serde_json::json!({})).unwrap();
        let r = Arc::new(ServiceRoute::new("s", serving, Default::default()));
        let eps: Vec<Arc<Endpoint>> = (0..n as u64)
            .map(|i| {
                let e = Arc::new(Endpoint::new(i, "s", "j", 1, i as u32, 1, "a", None, 1));
                e.ready.store(true, Ordering::SeqCst);
                e
            })
            .collect();
        r.set_endpoints(eps.clone());
        (r, eps)
    }

    #[test]
    fn least_outstanding_and_never_a_replica_out_of_rotation() {
        let (r, eps) = route(3);
        let a = r.pick(1, &[]).unwrap();
        let b = r.pick(1, &[]).unwrap();
        let c = r.pick(1, &[]).unwrap();
        // Three requests, three replicas: one each.
        let mut ids = vec![a.endpoint.id, b.endpoint.id, c.endpoint.id];
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2]);
        drop(b);
        let d = r.pick(1, &[]).unwrap();
        assert_eq!(d.endpoint.in_flight.load(Ordering::SeqCst), 1);
        eps[0].draining.store(true, Ordering::SeqCst);
        eps[1].ready.store(false, Ordering::SeqCst);
        eps[2].unhealthy.store(true, Ordering::SeqCst);
        assert!(r.pick(1, &[]).is_none());
        eps[1].ready.store(true, Ordering::SeqCst);
        assert_eq!(r.pick(1, &[]).unwrap().endpoint.id, 1);
        assert!(r.pick(1, &[1]).is_none());
    }

    #[test]
    fn in_flight_counts_until_dropped_and_pending_sums_them() {
        let (r, eps) = route(2);
        let batch = r.pick(8, &[]).unwrap();
        r.queued.store(3, Ordering::SeqCst);
        assert_eq!(r.pending(), 11);
        drop(batch);
        assert_eq!(r.pending(), 3);
        assert_eq!(
            eps.iter()
                .map(|e| e.served.load(Ordering::SeqCst))
                .sum::<u64>(),
            8
        );
        let stats = r.stats.lock().unwrap();
        assert_eq!(stats.total, 8);
        assert!(stats.percentiles().is_some());
    }
}
