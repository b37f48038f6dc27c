//! The data plane: a request to `/s/NAME/...` goes to one of the service's ready replicas
//! (fewest requests in flight), waits for one while there is none (cold start) or goes to the
//! cold-start proxy, and is retried on another replica when it could not reach the one picked.
//! Bodies, responses and upgrades (websockets) stream through; with `batching`, POSTs are
//! grouped into one JSON array per batch (`batch.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::connect::{Connector, PathMode, Tunneler};
use super::route::{InFlight, Routes, ServiceRoute};

/// Bodies up to this size are kept so that a request that could not reach its replica can be
/// sent to another; larger ones stream (and are not retried).
pub const RETRY_BODY_LIMIT: usize = 1 << 20;
/// Replicas one request tries before it fails.
pub const MAX_TRIES: usize = 3;
/// Longest body a batched request may have.
pub const MAX_BATCH_ITEM: usize = 16 << 20;

/// The proxy: routes, the connection pool and the cold-start client.
pub struct DataPlane {
    pub routes: Arc<Routes>,
    pub(super) client: Client<Connector, Body>,
    cold: reqwest::Client,
    pub(super) batchers: super::batch::Batchers,
}

impl DataPlane {
    pub fn new(mode: PathMode, tunneler: Option<Arc<dyn Tunneler>>) -> DataPlane {
        let routes = Arc::new(Routes::default());
        let connector = Connector {
            routes: routes.clone(),
            mode,
            tunneler,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        DataPlane {
            routes,
            client,
            cold: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("a plain HTTP client builds"),
            batchers: Default::default(),
        }
    }

    /// Answers one request to the service `route`; `path` is what follows `/s/NAME` (with the
    /// query), always starting with `/`.
    pub async fn forward(
        self: &Arc<Self>,
        route: Arc<ServiceRoute>,
        path: String,
        req: Request<Body>,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        // Before `Connection` goes with the other hop-by-hop headers.
        let upgrade = is_upgrade(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        let (batching, cold) = {
            let s = route.serving.read().unwrap();
            (s.batching, s.cold_start.clone())
        };
        if let Some(b) = batching
            && parts.method == axum::http::Method::POST
            && !upgrade
        {
            return super::batch::submit(self, &route, b, path, parts, body).await;
        }
        set_forwarded(&mut parts.headers, &route.name);
        let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        if upgrade {
            // Connection: upgrade goes through for websockets.
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // Safe to send again when the connection broke before any answer (RFC 9110 9.2.2).
        let idempotent = parts.method.is_idempotent();
        let mut body = match Replayable::of(body, &parts.headers).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let deadline = Instant::now() + cold.timeout;
        let mut tried = Vec::new();
        loop {
            let flight = match route.pick(1, &tried) {
                Some(f) => f,
                None if tried.is_empty() && cold.proxy.is_some() => {
                    let url = cold.proxy.as_deref().expect("checked");
                    return self.cold_proxy(&route, url, &path, parts, body).await;
                }
                None => match wait_for_replica(&route, 1, &tried, deadline).await {
                    Some(f) => f,
                    None => {
                        return unavailable(&route, &tried, cold.timeout);
                    }
                },
            };
            let ep = flight.endpoint.clone();
            let uri = format!("http://{}{}", ep.authority(), path);
            let mut req = Request::from_parts(parts.clone(), body.take());
            match uri.parse() {
                Ok(u) => *req.uri_mut() = u,
                Err(_) => return error(StatusCode::BAD_REQUEST, "the path is not a valid URI"),
            }
            match self.client.request(req).await {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        let replica = hyper::upgrade::on(&mut resp);
                        if let Some(client) = on_upgrade {
                            tokio::spawn(splice(client, replica, flight));
                        }
                        return resp.map(|_| Body::empty());
                    }
                    return resp.map(|b| Body::new(Counted { body: b, flight }));
                }
                Err(e)
                    if (e.is_connect() || (idempotent && is_connection_error(&e)))
                        && body.replayable()
                        && tried.len() + 1 < MAX_TRIES =>
                {
                    // It never reached the replica (no connection), or an idempotent request
                    // lost its connection before any answer (a replica that just died): out of
                    // rotation until its check passes again, and the request goes to another.
                    debug!(service = %route.name, replica = ep.index, error = %e, "replica unreachable; trying another");
                    route.unreachable(flight, &mut tried);
                }
                Err(e) => {
                    let mut flight = flight;
                    flight.failed = true;
                    warn!(service = %route.name, replica = ep.index, job = %ep.job, error = %e, "request to replica failed");
                    return error(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                            "replica {} of service `{}` failed the request: {}",
                            ep.index,
                            route.name,
                            source_chain(&e)
                        ),
                    );
                }
            }
        }
    }

    /// Sends a request to the cold-start proxy while no replica is ready. It counts as pending,
    /// so a service scaled to zero gets a replica.
    async fn cold_proxy(
        &self,
        route: &Arc<ServiceRoute>,
        base: &str,
        path: &str,
        parts: axum::http::request::Parts,
        body: Replayable,
    ) -> Response<Body> {
        route.queued.fetch_add(1, Ordering::SeqCst);
        route.cold_demand.fetch_add(1, Ordering::SeqCst);
        route.changed();
        let _queued = Queued(route.clone(), 1);
        let url = format!("{}{}", base.trim_end_matches('/'), path);
        let mut req = self.cold.request(parts.method.clone(), &url);
        for (k, v) in parts.headers.iter() {
            if k != header::HOST {
                req = req.header(k, v);
            }
        }
        let req = match body {
            Replayable::Bytes(b) => req.body(b),
            Replayable::Stream(b) => req.body(reqwest::Body::wrap_stream(b.into_data_stream())),
            Replayable::Taken => req,
        };
        match req.send().await {
            Ok(resp) => {
                let mut out = Response::builder().status(resp.status().as_u16());
                for (k, v) in resp.headers() {
                    if !is_hop_by_hop(k) {
                        out = out.header(k.as_str(), v.as_bytes());
                    }
                }
                out.header("x-runyard-cold-start", "proxy")
                    .body(Body::from_stream(resp.bytes_stream()))
                    .unwrap_or_else(|_| error(StatusCode::BAD_GATEWAY, "bad cold-start answer"))
            }
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "service `{}` has no ready replica and its cold-start proxy failed: {}",
                    route.name,
                    source_chain(&e)
                ),
            ),
        }
    }
}

/// Counts `n` requests as queued on the route until dropped.
pub(super) struct Queued(pub Arc<ServiceRoute>, pub u64);

impl Queued {
    /// No longer queued (now in flight).
    pub(super) fn release(&mut self) {
        self.0.queued.fetch_sub(self.1, Ordering::SeqCst);
        self.1 = 0;
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(self.1, Ordering::SeqCst);
    }
}

/// Waits (counted as queued) until a replica can take `count` requests, or the deadline.
pub(super) async fn wait_for_replica(
    route: &Arc<ServiceRoute>,
    count: usize,
    exclude: &[u64],
    deadline: Instant,
) -> Option<InFlight> {
    route.queued.fetch_add(count as u64, Ordering::SeqCst);
    let _queued = Queued(route.clone(), count as u64);
    let mut changes = route.subscribe();
    route.changed();
    loop {
        if let Some(f) = route.pick(count, exclude) {
            return Some(f);
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return None },
            _ = tokio::time::sleep_until(deadline) => return route.pick(count, exclude),
        }
    }
}

/// The 503 of a request that found no replica in time.
pub(super) fn unavailable(route: &ServiceRoute, tried: &[u64], waited: Duration) -> Response<Body> {
    let why = if tried.is_empty() {
        format!(
            "service `{}` has no ready replica: waited {} (cold_start.timeout); see `runyard service status {}`",
            route.name,
            runyard_model::spec::format_duration(waited),
            route.name
        )
    } else {
        format!(
            "service `{}`: no replica could be reached ({} tried); see `runyard service status {}`",
            route.name,
            tried.len(),
            route.name
        )
    };
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A JSON error body, like the API's.
pub(super) fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a static response builds")
}

pub(super) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Joins the client's upgraded connection to the replica's (websockets).
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    replica: hyper::upgrade::OnUpgrade,
    flight: InFlight,
) {
    match tokio::try_join!(client, replica) {
        Ok((c, r)) => {
            let (mut c, mut r) = (TokioIo::new(c), TokioIo::new(r));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut r).await {
                debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => debug!(error = %e, "upgrade failed"),
    }
    drop(flight);
}

/// A request body kept for another try, or streamed once.
pub(super) enum Replayable {
    Bytes(Bytes),
    Stream(Body),
    Taken,
}

impl Replayable {
    /// Keeps small bodies (by `content-length`, or none at all); streams the others.
    pub(super) async fn of(body: Body, headers: &HeaderMap) -> Result<Replayable, Response<Body>> {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let chunked = headers.contains_key(header::TRANSFER_ENCODING);
        let small = match length {
            Some(n) => n <= RETRY_BODY_LIMIT,
            None => !chunked,
        };
        if !small {
            return Ok(Replayable::Stream(body));
        }
        match http_body_util::Limited::new(body, RETRY_BODY_LIMIT)
            .collect()
            .await
        {
            Ok(c) => Ok(Replayable::Bytes(c.to_bytes())),
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            )),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Replayable::Bytes(_))
    }

    fn take(&mut self) -> Body {
        match self {
            Replayable::Bytes(b) => Body::from(b.clone()),
            Replayable::Stream(_) => match std::mem::replace(self, Replayable::Taken) {
                Replayable::Stream(b) => b,
                _ => unreachable!("matched above"),
            },
            Replayable::Taken => Body::empty(),
        }
    }
}

/// A replica's response body, counting its request in flight until the last byte.
struct Counted {
    body: hyper::body::Incoming,
    flight: InFlight,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let p = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &p {
            self.flight.failed = true;
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The request's connection failed before any answer came (reset, closed): hyper's own
/// errors under the client's, not a protocol or body error.
fn is_connection_error(e: &hyper_util::client::legacy::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            return h.is_closed()
                || h.is_canceled()
                || h.is_incomplete_message()
                || std::error::Error::source(h)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some();
        }
        cur = c.source();
    }
    false
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Drops the headers that belong to one connection (and those the `Connection` header names).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| n != header::UPGRADE)
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        if n != "transfer-encoding" {
            headers.remove(n);
        }
    }
}

/// Tells the replica where the request came through.
fn set_forwarded(headers: &mut HeaderMap, service: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("/s/{service}")) {
        headers.insert("x-forwarded-prefix", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_do_not_pass_and_upgrades_are_seen() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
        assert!(h.get(header::UPGRADE).is_some());
    }
}
