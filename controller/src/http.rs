//! The HTTP API (JSON, bearer token) for the CLI, the web page and scripts.
//!
//! Errors map to responses in exactly one place (`ApiError`): `{"error": message, "field":
//! field-or-null}` with a 4xx for bad input, never internals; the detail of a 5xx is logged here.
//!
//! Live updates: `GET /api/v1/events` is a server-sent event stream (`job` events carrying the
//! job JSON whenever a job changes, `agents` events every few seconds; with `?job=ID` that job
//! only). It is cut, not ended, at shutdown so clients reconnect and re-read what they show.
//! The web page (`crate::ui`) is served from `/` without a token; it holds no data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use runyard_model::report::MetricPoint;
use runyard_model::{Job, JobSpec, JobStatus, ValidationError};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::executor::Controller;
use crate::jobs::JobsError;
use crate::tokens::token_eq;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;
/// How often the event stream sends the agents (or a keep-alive with `?job=`).
const EVENTS_HEARTBEAT: Duration = Duration::from_secs(2);
/// Changes closer together than this go out in one batch of events.
const EVENTS_COALESCE: Duration = Duration::from_millis(150);

#[derive(Clone)]
pub struct ApiState {
    pub ctl: Controller,
    pub admin_token: String,
    /// Ends long-lived responses (log follows) at shutdown.
    pub shutdown: CancellationToken,
}

pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/jobs", post(submit).get(list))
        .route("/api/v1/jobs/{id}", get(show))
        .route("/api/v1/jobs/{id}/stop", post(stop))
        .route("/api/v1/jobs/{id}/logs", get(logs))
        .route("/api/v1/jobs/{id}/metrics", get(metrics))
        .route("/api/v1/jobs/{id}/metrics.svg", get(metrics_svg))
        .route("/api/v1/events", get(events))
        .route("/api/v1/jobs/{id}/checkpoint", get(checkpoint))
        .route("/api/v1/agents", get(agents))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(api)
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", None) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let path = req
                .extensions()
                .get::<MatchedPath>()
                .map_or(req.uri().path(), |p| p.as_str());
            tracing::debug_span!("http", method = %req.method(), path = %path)
        }))
        .with_state(state)
}

/// One error type for every handler.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: field.map(str::to_string),
        }
    }

    fn not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job with id `{id}`"),
            None,
        )
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> ApiError {
        tracing::error!(error = %e, "job store error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the job store is unavailable; retry shortly",
            None,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "field": self.field})),
        )
            .into_response()
    }
}

async fn auth(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if token_eq(t.trim(), &state.admin_token) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid token: use the controller's admin token (RUNYARD_TOKEN)",
            None,
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing token: send `Authorization: Bearer <token>` (the CLI reads RUNYARD_TOKEN)",
            None,
        )),
    }
}

async fn submit(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {} KiB", MAX_BODY / 1024)
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(status, msg, Some("body"))
    })?;
    let spec = JobSpec::from_json(&body)?;
    let job = state.ctl.submit(spec).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

async fn list(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("limit: `{l}` is not a number from 1 to {MAX_PAGE}"),
                    Some("limit"),
                ));
            }
        },
    };
    let status = match q.get("status").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let mut wanted = Vec::new();
            for part in s.split(',') {
                wanted.push(part.parse::<JobStatus>().map_err(|m| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("status: {m}"),
                        Some("status"),
                    )
                })?);
            }
            Some(wanted)
        }
    };
    let cursor = q
        .get("cursor")
        .filter(|c| !c.is_empty())
        .map(String::as_str);
    let (jobs, more) = state
        .ctl
        .jobs
        .page(cursor, limit, |s| {
            status.as_ref().is_none_or(|w| w.contains(&s))
        })
        .await?;
    let next = if more {
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok(Json(json!({"jobs": jobs, "next": next})))
}

async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    job_or_404(&state, &id).await.map(Json)
}

async fn stop(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    match state.ctl.stop(&id).await? {
        None => Err(ApiError::not_found(&id)),
        Some(Err(msg)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{msg}: nothing to stop"),
            None,
        )),
        Some(Ok(job)) => Ok(Json(job)),
    }
}

/// The metric history of the job's current attempt, for plots.
async fn metrics(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (attempt, series) = metric_series(&state, &id).await?;
    Ok(Json(json!({"attempt": attempt, "series": series})))
}

/// The current attempt's number and its metric history, read from its report stream.
async fn metric_series(
    state: &ApiState,
    id: &str,
) -> Result<(u32, std::collections::BTreeMap<String, Vec<MetricPoint>>), ApiError> {
    let job = job_or_404(state, id).await?;
    if job.attempt == 0 {
        return Ok((0, Default::default()));
    }
    let series = state
        .ctl
        .fold
        .series(&state.ctl.reports, id, job.attempt)
        .await
        .map_err(|e| {
            tracing::error!(job = %id, error = %e, "cannot read reports");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the job's reports; retry",
                None,
            )
        })?;
    Ok((job.attempt, Arc::unwrap_or_clone(series)))
}

/// One metric of the current attempt plotted as SVG (`?metric=NAME[&width=W&height=H]`).
async fn metrics_svg(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let Some(metric) = q.get("metric").filter(|m| !m.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "metric: name the metric to plot, as in ?metric=val_loss",
            Some("metric"),
        ));
    };
    let dimension = |key: &str, default: u32, lo: u32, hi: u32| match q.get(key) {
        None => Ok(default),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(n),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{key}: `{v}` is not a number of pixels from {lo} to {hi}"),
                Some(key),
            )),
        },
    };
    let (min, max, default) = (
        crate::ui::chart::MIN_SIZE,
        crate::ui::chart::MAX_SIZE,
        crate::ui::chart::DEFAULT_SIZE,
    );
    let size = (
        dimension("width", default.0, min.0, max.0)?,
        dimension("height", default.1, min.1, max.1)?,
    );
    let (_, series) = metric_series(&state, &id).await?;
    let Some(points) = series.get(metric.as_str()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("metric: job `{id}` has reported no metric `{metric}` in this attempt"),
            Some("metric"),
        ));
    };
    let svg = crate::ui::chart::render(metric, points, size).map_err(|e| {
        tracing::error!(job = %id, metric = %metric, error = %e, "cannot draw metric plot");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot draw the plot",
            None,
        )
    })?;
    let mut resp = svg.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Opened on its own, the image may run nothing.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

/// The best checkpoint of the job's latest attempt that uploaded one, byte for byte.
async fn checkpoint(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = job_or_404(&state, &id).await?;
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::error!(job = %id, error = %e, "cannot open checkpoint");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot read the checkpoint; retry",
            None,
        )
    };
    let mut found = None;
    for attempt in (1..=job.attempt).rev() {
        if let Some(f) = state
            .ctl
            .artifacts
            .open(&id, attempt)
            .await
            .map_err(|e| unavailable(&e))?
        {
            found = Some(f);
            break;
        }
    }
    let Some((meta, file)) = found else {
        let why = match &job.best {
            Some(b) if b.upload_error.is_some() => format!(
                "job `{id}` has no checkpoint: its upload failed ({})",
                b.upload_error.as_deref().unwrap_or("")
            ),
            Some(_) if !job.status.is_terminal() => {
                format!("job `{id}` has no checkpoint yet: it is uploaded when the job ends")
            }
            _ => format!("job `{id}` has no checkpoint: the script reported none"),
        };
        return Err(ApiError::new(StatusCode::NOT_FOUND, why, None));
    };

    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20))
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    let disposition = format!(
        "attachment; filename=\"{}\"",
        meta.file_name.replace(['"', '\\'], "_")
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&meta.sha256) {
        h.insert("x-checksum-sha256", v);
    }
    Ok(resp)
}

async fn job_or_404(state: &ApiState, id: &str) -> Result<runyard_model::Job, ApiError> {
    state
        .ctl
        .jobs
        .fetch(id)
        .await?
        .ok_or_else(|| ApiError::not_found(id))
}

async fn agents(State(state): State<ApiState>) -> impl IntoResponse {
    Json(agents_json(&state.ctl))
}

/// Every agent with the jobs placed on it, as `/api/v1/agents` and `agents` events show them.
fn agents_json(ctl: &Controller) -> serde_json::Value {
    let jobs = ctl.jobs.active();
    let mut agents = ctl.agents.list();
    for a in &mut agents {
        a.jobs = jobs
            .iter()
            .filter(|j| j.status.is_on_agent() && j.agent.as_deref() == Some(a.name.as_str()))
            .map(|j| j.id.clone())
            .collect();
    }
    json!({"agents": agents})
}

/// One server-sent event; `data` is compact JSON, so it holds no newline.
fn sse_event(kind: &str, data: &impl serde::Serialize) -> Bytes {
    let data = serde_json::to_string(data).expect("API values always serialize");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// Adds a change to a batch of events: the latest change of each job, in order of last change.
fn fold_change(
    batch: &mut Vec<(String, Option<std::sync::Arc<Job>>)>,
    change: crate::jobs::Change,
    only: Option<&str>,
) {
    let (id, job) = match change {
        crate::jobs::Change::Job(j) => (j.id.clone(), Some(j)),
        crate::jobs::Change::Removed(id) => (id, None),
    };
    if only.is_some_and(|o| o != id) {
        return;
    }
    batch.retain(|(i, _)| *i != id);
    batch.push((id, job));
}

/// Server-sent events: `job` whenever a job changes (every job, or only `?job=ID`, which is also
/// sent once at the start), `removed` (`{"id"}`) when a job is deleted, `agents` every
/// `EVENTS_HEARTBEAT` (a comment instead with `?job=`). Only changes travel: the stream follows
/// the job table's change feed, coalesced over `EVENTS_COALESCE`; a client that falls behind is
/// sent every active job again (and, with `?job=`, that job).
async fn events(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let only = q.get("job").filter(|j| !j.is_empty()).cloned();
    let first = match &only {
        Some(id) => Some(job_or_404(&state, id).await?),
        None => None,
    };
    let ctl = state.ctl.clone();
    let shutdown = state.shutdown.clone();
    let stream = async_stream::stream! {
        use tokio::sync::broadcast::error::RecvError;
        let mut changes = ctl.jobs.changes();
        let mut heartbeat = tokio::time::interval(EVENTS_HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(job) = &first {
            yield Ok::<_, std::io::Error>(sse_event("job", job));
        }
        loop {
            // Changes by job id, the latest of each; `None`: removed.
            let mut batch: Vec<(String, Option<std::sync::Arc<Job>>)> = Vec::new();
            let mut resync = false;
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(c) => {
                        let deadline = tokio::time::Instant::now() + EVENTS_COALESCE;
                        let mut next = Some(c);
                        loop {
                            if let Some(c) = next.take() {
                                fold_change(&mut batch, c, only.as_deref());
                            }
                            match tokio::time::timeout_at(deadline, changes.recv()).await {
                                Ok(Ok(c)) => next = Some(c),
                                Ok(Err(RecvError::Lagged(_))) => { resync = true; break; }
                                Ok(Err(RecvError::Closed)) => return,
                                Err(_) => break,
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => resync = true,
                    Err(RecvError::Closed) => return,
                },
                _ = heartbeat.tick() => {
                    if only.is_some() {
                        yield Ok(Bytes::from_static(b": keep-alive\n\n"));
                    } else {
                        yield Ok(sse_event("agents", &agents_json(&ctl)));
                    }
                }
                _ = shutdown.cancelled() => {
                    yield Err(std::io::Error::other("controller shutting down"));
                    return;
                }
            }
            if resync {
                batch.clear();
                let jobs = match &only {
                    Some(id) => match ctl.jobs.fetch(id).await {
                        Ok(j) => j.into_iter().collect(),
                        Err(_) => Vec::new(),
                    },
                    None => ctl.jobs.active(),
                };
                for job in jobs {
                    yield Ok(sse_event("job", &job));
                }
            }
            for (id, job) in batch {
                match job {
                    Some(job) => yield Ok(sse_event("job", &*job)),
                    None => yield Ok(sse_event("removed", &json!({"id": id}))),
                }
            }
        }
    };
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// Plain text, exactly the script's lines. With `follow=true` the body streams until the job is
/// terminal and every line of it has been sent.
async fn logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let job = job_or_404(&state, &id).await?;
    let follow = match q.get("follow").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("follow: `{other}` is not true or false"),
                Some("follow"),
            ));
        }
    };
    let fixed_attempt = match q.get("attempt") {
        None => None,
        Some(a) => match a.parse::<u32>() {
            Ok(n) if n >= 1 && n <= job.attempt => Some(n),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "attempt: `{a}` is not an attempt of this job (1 to {})",
                        job.attempt
                    ),
                    Some("attempt"),
                ));
            }
        },
    };
    let start_offset = match q.get("offset") {
        None => 0,
        Some(o) => match (o.parse::<u64>(), fixed_attempt) {
            (Ok(n), Some(_)) => n,
            (Ok(_), None) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "offset: only valid together with attempt",
                    Some("offset"),
                ));
            }
            (Err(_), _) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("offset: `{o}` is not a byte offset"),
                    Some("offset"),
                ));
            }
        },
    };
    let ctl = state.ctl.clone();
    let shutdown = state.shutdown.clone();
    let first_attempt = fixed_attempt.unwrap_or(job.attempt);
    let stream = async_stream::stream! {
        let mut log_rx = ctl.logs.subscribe(&id);
        let mut job_rx = ctl.jobs.subscribe();
        let mut attempt = first_attempt;
        let mut offset = start_offset;
        while let Ok(Some(job)) = ctl.jobs.fetch(&id).await {
            // Read the state before the lines: a terminal state is only visible once every
            // line is persisted, so lines read after seeing it are complete.
            let over = job.status.is_terminal() || job.attempt != attempt;
            loop {
                match ctl.logs.read_from(&id, attempt, offset, 4 << 20).await {
                    Ok((bytes, next)) if !bytes.is_empty() => {
                        offset = next;
                        yield Ok::<_, std::io::Error>(Bytes::from(bytes));
                    }
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(job = %id, %error, "cannot read log");
                        yield Err(error);
                        return;
                    }
                }
            }
            if !follow {
                break;
            }
            if job.attempt != attempt && fixed_attempt.is_none() {
                // The job moved on to a new attempt: continue with its log.
                attempt = job.attempt;
                offset = 0;
                continue;
            }
            if over {
                break;
            }
            tokio::select! {
                _ = log_rx.changed() => {}
                _ = job_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.cancelled() => {
                    // Cut the response (no final chunk) so clients know to reconnect.
                    yield Err(std::io::Error::other("controller shutting down"));
                    return;
                }
            }
        }
    };
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp.headers_mut()
        .insert("x-runyard-attempt", HeaderValue::from(first_attempt));
    Ok(resp)
}
