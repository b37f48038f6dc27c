//! Request batching (the seed's `max_batch_size` and `timeout_batching`): POSTs to a batching
//! service wait up to `timeout` for others to the same path, then go to one replica as one POST
//! whose body is the JSON array of their bodies; the replica answers a JSON array of the same
//! length, and each element goes back to its own caller, in order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use runyard_model::service::Batching;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

use super::proxy::{DataPlane, MAX_BATCH_ITEM, error, source_chain, unavailable, wait_for_replica};
use super::route::ServiceRoute;

/// One caller's request waiting for its batch.
struct Item {
    path: String,
    body: Box<RawValue>,
    reply: oneshot::Sender<Response<Body>>,
    since: Instant,
}

/// Each service's batch queue (its collector task ends when the service's route goes).
#[derive(Default)]
pub struct Batchers(Mutex<HashMap<String, mpsc::UnboundedSender<Item>>>);

/// Queues one POST for its batch and waits for its own answer.
pub(super) async fn submit(
    plane: &Arc<DataPlane>,
    route: &Arc<ServiceRoute>,
    _batching: Batching,
    path: String,
    _parts: Parts,
    body: Body,
) -> Response<Body> {
    let bytes = match http_body_util::Limited::new(body, MAX_BATCH_ITEM)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            );
        }
    };
    let body: Box<RawValue> = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "service `{}` batches requests: the body must be one JSON value ({e})",
                    route.name
                ),
            );
        }
    };
    let (tx, rx) = oneshot::channel();
    route.queued.fetch_add(1, Ordering::SeqCst);
    let item = Item {
        path,
        body,
        reply: tx,
        since: Instant::now(),
    };
    let sent = {
        let mut map = plane.batchers.0.lock().unwrap();
        let queue = map.entry(route.name.clone()).or_insert_with(|| {
            let (qtx, qrx) = mpsc::unbounded_channel();
            tokio::spawn(collect(plane.clone(), route.clone(), qrx));
            qtx
        });
        match queue.send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(item)) => {
                // The collector ended (its route was replaced): start another.
                let (qtx, qrx) = mpsc::unbounded_channel();
                tokio::spawn(collect(plane.clone(), route.clone(), qrx));
                let r = qtx.send(item).map_err(|_| ());
                *queue = qtx;
                r
            }
        }
    };
    route.changed();
    if sent.is_err() {
        route.queued.fetch_sub(1, Ordering::SeqCst);
        return error(StatusCode::SERVICE_UNAVAILABLE, "the batch queue is closed");
    }
    rx.await
        .unwrap_or_else(|_| error(StatusCode::BAD_GATEWAY, "the batch was dropped"))
}

/// Collects batches: the first request waits at most `timeout` for up to `max_batch_size - 1`
/// others; each full or timed-out batch is sent by its own task, so collecting goes on.
async fn collect(
    plane: Arc<DataPlane>,
    route: Arc<ServiceRoute>,
    mut queue: mpsc::UnboundedReceiver<Item>,
) {
    let mut held: HashMap<String, Vec<Item>> = HashMap::new();
    loop {
        let Some(batching) = route.serving.read().unwrap().batching else {
            // Batching was turned off: what is queued goes one by one.
            for (_, items) in held.drain() {
                tokio::spawn(send(plane.clone(), route.clone(), items));
            }
            while let Ok(item) = queue.try_recv() {
                tokio::spawn(send(plane.clone(), route.clone(), vec![item]));
            }
            plane.batchers.0.lock().unwrap().remove(&route.name);
            return;
        };
        let max = batching.max_batch_size as usize;
        let oldest = held
            .values()
            .filter_map(|v| v.first().map(|i| i.since))
            .min();
        let next = tokio::select! {
            item = queue.recv() => item.map(Some),
            _ = async {
                match oldest {
                    Some(t) => tokio::time::sleep_until(t + batching.timeout).await,
                    None => std::future::pending().await,
                }
            } => Some(None),
        };
        match next {
            None => {
                for (_, items) in held.drain() {
                    tokio::spawn(send(plane.clone(), route.clone(), items));
                }
                return;
            }
            Some(Some(item)) => {
                let items = held.entry(item.path.clone()).or_default();
                items.push(item);
                if items.len() >= max {
                    let path = items[0].path.clone();
                    let full = held.remove(&path).unwrap_or_default();
                    tokio::spawn(send(plane.clone(), route.clone(), full));
                }
            }
            Some(None) => {
                let now = Instant::now();
                let due: Vec<String> = held
                    .iter()
                    .filter(|(_, v)| v.first().is_some_and(|i| i.since + batching.timeout <= now))
                    .map(|(k, _)| k.clone())
                    .collect();
                for path in due {
                    if let Some(items) = held.remove(&path) {
                        tokio::spawn(send(plane.clone(), route.clone(), items));
                    }
                }
            }
        }
    }
}

/// Sends one batch to one replica and gives each caller its element of the answer.
async fn send(plane: Arc<DataPlane>, route: Arc<ServiceRoute>, items: Vec<Item>) {
    let n = items.len();
    // Queued until a replica takes the batch.
    let mut queued = super::proxy::Queued(route.clone(), n as u64);
    let timeout = route.serving.read().unwrap().cold_start.timeout;
    let deadline = items.first().map_or_else(Instant::now, |i| i.since) + timeout;
    let mut tried = Vec::new();
    let mut payload =
        Vec::with_capacity(2 + items.iter().map(|i| i.body.get().len() + 1).sum::<usize>());
    payload.push(b'[');
    for (k, i) in items.iter().enumerate() {
        if k > 0 {
            payload.push(b',');
        }
        payload.extend_from_slice(i.body.get().as_bytes());
    }
    payload.push(b']');
    let payload = Bytes::from(payload);
    let path = items[0].path.clone();
    let outcome: Result<Vec<Response<Body>>, Response<Body>> = loop {
        let flight = match route.pick(n, &tried) {
            Some(f) => f,
            None => {
                // Counted once as queued already (by the callers); wait without counting again.
                match wait_for_replica(&route, 0, &tried, deadline).await {
                    Some(f) => {
                        drop(f);
                        continue;
                    }
                    None => break Err(unavailable(&route, &tried, timeout)),
                }
            }
        };
        if tried.is_empty() {
            route.stats.lock().unwrap().record_batch(n);
        }
        let ep = flight.endpoint.clone();
        let mut req = Request::post(format!("http://{}{}", ep.authority(), path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(payload.clone()))
            .expect("a batch request builds");
        req.headers_mut()
            .insert("x-runyard-batch-size", HeaderValue::from(n));
        queued.release();
        match plane.client.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map(|c| c.to_bytes());
                let mut flight = flight;
                let result = match bytes {
                    Err(e) => Err(error(
                        StatusCode::BAD_GATEWAY,
                        &format!("replica {} of `{}` broke off its answer: {e}", ep.index, route.name),
                    )),
                    Ok(b) if !status.is_success() => Err(Response::builder()
                        .status(status)
                        .body(Body::from(b))
                        .expect("a response builds")),
                    Ok(b) => split(&b, n).map_err(|why| {
                        error(
                            StatusCode::BAD_GATEWAY,
                            &format!(
                                "replica {} of `{}` answered a batch of {n} with {why}: a batching server answers a JSON array of the same length",
                                ep.index, route.name
                            ),
                        )
                    }),
                };
                flight.failed = result.is_err();
                break result;
            }
            // Not sent (no connection): another replica; a batch is not idempotent.
            Err(e) if e.is_connect() && tried.len() + 1 < super::proxy::MAX_TRIES => {
                route.unreachable(flight, &mut tried);
            }
            Err(e) => {
                let mut flight = flight;
                flight.failed = true;
                warn!(service = %route.name, replica = ep.index, error = %e, "batch to replica failed");
                break Err(error(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "replica {} of service `{}` failed the batch: {}",
                        ep.index,
                        route.name,
                        source_chain(&e)
                    ),
                ));
            }
        }
    };
    drop(queued);
    match outcome {
        Ok(answers) => {
            for (item, answer) in items.into_iter().zip(answers) {
                let _ = item.reply.send(answer);
            }
        }
        Err(resp) => {
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            for item in items {
                let r = Response::from_parts(parts.clone(), Body::from(bytes.clone()));
                let _ = item.reply.send(r);
            }
        }
    }
}

/// A batch answer, one response per element.
fn split(bytes: &[u8], n: usize) -> Result<Vec<Response<Body>>, String> {
    let answers: Vec<Box<RawValue>> = serde_json::from_slice(bytes)
        .map_err(|e| format!("something that is not a JSON array ({e})"))?;
    if answers.len() != n {
        return Err(format!("{} elements", answers.len()));
    }
    Ok(answers
        .into_iter()
        .map(|a| {
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(a.get().to_string()))
                .expect("a response builds")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_split_in_order_and_bad_ones_are_named() {
        let r = split(br#"[{"y":1}, 2, "three"]"#, 3).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(split(b"[1,2]", 3).unwrap_err(), "2 elements");
        assert!(split(b"{}", 1).unwrap_err().contains("not a JSON array"));
    }
}
