//! Readiness checks: each replica's `health` path, through the same connections as requests
//! (so a replica is ready only when the controller can reach it). Checked every 100 ms until
//! it answers 200, then every `health_interval`; a ready replica that fails three checks in a
//! row is taken out of rotation for good (the services loop replaces it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tracing::{info, warn};

use super::proxy::DataPlane;
use super::route::{Endpoint, ServiceRoute};

/// How often a replica that is not ready yet is checked.
pub const STARTING_INTERVAL: Duration = Duration::from_millis(100);
/// How long one check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed checks in a row that take a ready replica out for good.
pub const FAILURES_TO_REPLACE: u32 = 3;

/// Checks `ep` until its endpoint is forgotten (`ep.cancel`).
pub async fn check(plane: Arc<DataPlane>, route: Arc<ServiceRoute>, ep: Arc<Endpoint>) {
    let mut failures = 0;
    loop {
        let (path, interval) = {
            let s = route.serving.read().unwrap();
            (s.health.clone(), s.health_interval)
        };
        let ok = tokio::select! {
            ok = probe(&plane, &ep, &path) => ok,
            _ = ep.cancel.cancelled() => return,
        };
        let ready = ep.ready.load(Ordering::SeqCst);
        match ok {
            Ok(()) => {
                failures = 0;
                if !ready && !ep.unhealthy.load(Ordering::SeqCst) {
                    ep.ready.store(true, Ordering::SeqCst);
                    info!(service = %route.name, replica = ep.index, job = %ep.job, path = ?ep.path(), "replica ready");
                    route.changed();
                }
            }
            // A draining replica is on its way out: no replacement, no warning.
            Err(why) if ready && !ep.draining.load(Ordering::SeqCst) => {
                failures += 1;
                if failures >= FAILURES_TO_REPLACE {
                    warn!(service = %route.name, replica = ep.index, job = %ep.job, %why, "replica stopped answering its health check; replacing it");
                    ep.ready.store(false, Ordering::SeqCst);
                    ep.unhealthy.store(true, Ordering::SeqCst);
                    route.changed();
                }
            }
            Err(_) => {}
        }
        let wait = if ep.ready.load(Ordering::SeqCst) {
            interval
        } else {
            STARTING_INTERVAL
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ep.cancel.cancelled() => return,
        }
    }
}

async fn probe(plane: &DataPlane, ep: &Endpoint, path: &str) -> Result<(), String> {
    let req = Request::get(format!("http://{}{}", ep.authority(), path))
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(CHECK_TIMEOUT, plane.client.request(req))
        .await
        .map_err(|_| format!("no answer in {CHECK_TIMEOUT:?}"))?
        .map_err(|e| super::proxy::source_chain(&e))?;
    let status = resp.status();
    let _ = tokio::time::timeout(CHECK_TIMEOUT, resp.into_body().collect()).await;
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}
