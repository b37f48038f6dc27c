//! The HTTP API (JSON, bearer token) for the CLI, the web page and scripts.
//!
//! Errors map to responses in exactly one place (`ApiError`): `{"error": message, "field":
//! field-or-null}` with a 4xx for bad input, never internals; the detail of a 5xx is logged here.
//!
//! Live updates: `GET /api/v1/events` is a server-sent event stream (`job` events carrying the
//! job JSON whenever a job changes, `agents` events every few seconds; with `?job=ID` that job
//! only). It is cut, not ended, at shutdown so clients reconnect and re-read what they show.
//! The web page (`crate::ui`) is served from `/` without a token; it holds no data.
//!
//! Every route is declared once, with its `#[utoipa::path]` annotation, in `api_routes` or
//! `public_routes`: the router and the OpenAPI document (`GET /api/v1/openapi.json`, no token)
//! are built from the same list, so the document names exactly the routes served. Request and
//! response types are `runyard_api`'s. Every error body is JSON, also axum's own rejections,
//! 405s and 413s: `json_errors` rewrites any error response that is not JSON yet.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use runyard_api::openapi::{
    BadRequest, Guarded, OneJob, PayloadTooLarge, Public, Refusable, Secured, Storage,
};
use runyard_api::query::{DEFAULT_PAGE, JobPath, MAX_PAGE};
use runyard_api::{
    AgentList, AgentView, CreateToken, ErrorBody, EventsQuery, JobPage, JobRemoved, JobView,
    ListJobsQuery, LogsQuery, MetricsResponse, MetricsSvgQuery, PlacementList, PlacementView,
    SecretList, SecretView, SetSecret, TokenCreated, TokenList, TokenView, WhoAmI,
};
use runyard_model::report::MetricPoint;
use runyard_model::{Act, Caller, Job, JobSpec, JobStatus, ValidationError};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::{Access, AccessError};
use crate::executor::Controller;
use crate::jobs::JobsError;
use crate::secrets::SecretError;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;
/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";
/// Error bodies longer than this (from a rejection) are cut in `json_errors`.
const MAX_ERROR_TEXT: usize = 1024;
/// How often the event stream sends the agents (or a keep-alive with `?job=`).
const EVENTS_HEARTBEAT: Duration = Duration::from_secs(2);
/// Changes closer together than this go out in one batch of events.
const EVENTS_COALESCE: Duration = Duration::from_millis(150);

#[derive(Clone)]
pub struct ApiState {
    pub ctl: Controller,
    /// The API is served over TLS (for links built from a request's `Host`).
    pub tls: bool,
    /// Who may call: the admin token and the named tokens.
    pub access: Access,
    /// Ends long-lived responses (log follows) at shutdown.
    pub shutdown: CancellationToken,
}

mod services;
mod snapshots;

/// `scheme://host` of the controller as the client reached it (its `Host` header), when that
/// header is a plain host name or address with an optional port.
fn origin_of(headers: &axum::http::HeaderMap, tls: bool) -> Option<String> {
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let plain = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    plain.then(|| format!("{}://{host}", if tls { "https" } else { "http" }))
}

/// The routes that need the admin token.
fn api_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(services::serve, services::list_services))
        .routes(routes!(services::show_service, services::remove_service))
        .routes(routes!(services::scale_service))
        .routes(routes!(services::stop_service))
        .routes(routes!(services::service_history))
        .routes(routes!(submit, list))
        .routes(routes!(snapshots::upload_snapshot))
        .routes(routes!(show, delete))
        .routes(routes!(placements))
        .routes(routes!(stop))
        .routes(routes!(logs))
        .routes(routes!(metrics))
        .routes(routes!(metrics_svg))
        .routes(routes!(events))
        .routes(routes!(checkpoint))
        .routes(routes!(agents))
        .routes(routes!(remove_agent))
        .routes(routes!(whoami))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(list_secrets))
        .routes(routes!(set_secret, remove_secret))
}

/// The routes served without a token (besides the web page's static files).
fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
}

/// The OpenAPI 3.1 document of every route above.
pub fn openapi() -> utoipa::openapi::OpenApi {
    OpenApiRouter::with_openapi(runyard_api::openapi::ApiDoc::openapi())
        .merge(api_routes())
        .merge(public_routes())
        .into_openapi()
}

pub fn router(state: ApiState) -> Router {
    let api = api_routes().route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let (routes, _) = OpenApiRouter::new()
        .merge(api)
        .merge(public_routes())
        .split_for_parts();
    let data_plane = services::data_plane_router(state.clone());
    routes
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", None) })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "method {} is not allowed on {}",
                    req.method(),
                    req.uri().path()
                ),
                None,
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(json_errors))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let path = req
                .extensions()
                .get::<MatchedPath>()
                .map_or(req.uri().path(), |p| p.as_str());
            tracing::debug_span!("http", method = %req.method(), path = %path)
        }))
        .with_state(state)
        .merge(data_plane)
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

    /// An extractor's rejection of `field`, as a 400 naming it.
    fn rejected(field: &str, why: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{field}: {why}"),
            Some(field),
        )
    }

    fn forbidden(why: String) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, why, None)
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

impl From<crate::executor::SubmitError> for ApiError {
    fn from(e: crate::executor::SubmitError) -> ApiError {
        match e {
            crate::executor::SubmitError::Invalid(v) => v.into(),
            crate::executor::SubmitError::Store(s) => s.into(),
            crate::executor::SubmitError::Tracking(crate::mlflow::TrackingError::Invalid(v)) => {
                v.into()
            }
            crate::executor::SubmitError::Tracking(e) => {
                ApiError::new(StatusCode::BAD_GATEWAY, e.to_string(), Some("mlflow"))
            }
        }
    }
}

impl From<SecretError> for ApiError {
    fn from(e: SecretError) -> ApiError {
        match e {
            SecretError::Store(s) => JobsError::from(s).into(),
            SecretError::Spec(v) => v.into(),
            SecretError::BadName(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, e.to_string(), Some("name"))
            }
            SecretError::BadValue => {
                ApiError::new(StatusCode::BAD_REQUEST, e.to_string(), Some("value"))
            }
            SecretError::Missing(_) => {
                tracing::error!(error = %e, "secret store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the secret store is unavailable; retry shortly",
                    None,
                )
            }
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> ApiError {
        match e {
            AccessError::Store(e) => JobsError::from(e).into(),
            AccessError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, e.to_string(), Some("name"))
            }
            AccessError::BadName(_) | AccessError::Reserved => {
                ApiError::new(StatusCode::BAD_REQUEST, e.to_string(), Some("name"))
            }
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> ApiError {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {} KiB", MAX_BODY / 1024)
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(status, msg, Some("body"))
    }
}

/// A JSON request body of type `T` (413 past `MAX_BODY`, 400 naming `body` when it does not
/// parse).
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    serde_json::from_slice(&body?).map_err(|e| ApiError::rejected("body", &e.to_string()))
}

/// May the caller do `act`? A 403 that says why when not.
fn allow(who: &Caller, act: Act<'_>) -> Result<(), ApiError> {
    who.may(act).map_err(ApiError::forbidden)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            field: self.field,
        };
        (self.status, Json(body)).into_response()
    }
}

/// Any error response that is not JSON yet (axum's rejections, a 405, a 413 from a body limit)
/// becomes `{"error": its text, "field": null}` with the same status.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), MAX_ERROR_TEXT).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    } else {
        text
    };
    let field = (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("body");
    ApiError::new(status, message, field).into_response()
}

/// `Query<T>` whose rejection is an `ApiError` naming the query.
struct ApiQuery<T>(T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::rejected("query", &e.body_text()))
    }
}

/// The `{id}` of a path, with a JSON rejection.
struct JobId(String);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| JobId(id))
            .map_err(|e| ApiError::rejected("id", &e.body_text()))
    }
}

/// The caller, as the auth middleware found it.
struct Who(Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Who)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing token", None))
    }
}

async fn auth(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented.map(|t| state.access.caller(t.trim())) {
        Some(Some(caller)) => {
            req.extensions_mut().insert(caller);
            Ok(next.run(req).await)
        }
        Some(None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid token: use the controller's admin token or a token made with `runyard token \
             create` (RUNYARD_TOKEN); a revoked token is refused",
            None,
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing token: send `Authorization: Bearer <token>` (the CLI reads RUNYARD_TOKEN)",
            None,
        )),
    }
}

/// `GET /healthz`: `ok` while the HTTP server runs.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses(
        (status = 200, description = "The server is up", body = String, content_type = "text/plain"),
        Public,
    )
)]
async fn healthz() -> &'static str {
    "ok"
}

/// The document, rendered once.
static OPENAPI_JSON: LazyLock<String> = LazyLock::new(|| {
    openapi()
        .to_json()
        .expect("the OpenAPI document always serializes")
});

/// `GET /api/v1/openapi.json`: this API's OpenAPI 3.1 document (no token needed).
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        Public,
    )
)]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON.as_str(),
    )
        .into_response()
}

/// Submit a job. The body is the job spec; every field error names the field.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs",
    request_body = runyard_api::SubmitRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The job, pending", body = JobView),
        (status = 400, response = BadRequest),
        (status = 413, response = PayloadTooLarge),
        Secured, Storage,
    )
)]
async fn submit(
    State(state): State<ApiState>,
    Who(who): Who,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    allow(&who, Act::Submit)?;
    let spec = JobSpec::from_json(&body?)?;
    let origin = origin_of(&headers, state.tls);
    let job = state
        .ctl
        .submit_from(spec, &who.name, origin.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(JobView::from(&job))))
}

/// List jobs, newest first, one page at a time.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    params(ListJobsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of jobs", body = JobPage),
        (status = 400, response = BadRequest),
        Secured,
    )
)]
async fn list(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ListJobsQuery>,
) -> Result<Json<JobPage>, ApiError> {
    let limit = match &q.limit {
        None => DEFAULT_PAGE as usize,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE as usize).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("limit: `{l}` is not a number from 1 to {MAX_PAGE}"),
                    Some("limit"),
                ));
            }
        },
    };
    let status = match q.status.as_ref().filter(|s| !s.is_empty()) {
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
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
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
    Ok(Json(JobPage {
        jobs: jobs.iter().map(JobView::from).collect(),
        next,
    }))
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(JobPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The job", body = JobView),
        Secured, OneJob,
    )
)]
async fn show(State(state): State<ApiState>, JobId(id): JobId) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::from(&job_or_404(&state, &id).await?)))
}

/// Every placement of a job (its attempts), oldest first: where each ran and how it ended.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/placements", tag = "jobs",
    params(JobPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The job's placements", body = PlacementList),
        Secured, OneJob,
    )
)]
async fn placements(
    State(state): State<ApiState>,
    JobId(id): JobId,
) -> Result<Json<PlacementList>, ApiError> {
    let list = state
        .ctl
        .jobs
        .placements(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    Ok(Json(PlacementList {
        placements: list.iter().map(PlacementView::from).collect(),
    }))
}

/// Delete a finished job with its logs, reports and checkpoints; returns its last state. A job
/// that is not finished is refused (409): stop it first.
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(JobPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The job as it was when deleted", body = JobView),
        Secured, Guarded, OneJob, Refusable, Storage,
    )
)]
async fn delete(
    State(state): State<ApiState>,
    Who(who): Who,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    use crate::history::Deleted;
    let job = job_or_404(&state, &id).await?;
    allow(
        &who,
        Act::Change {
            owner: job.owner.as_deref(),
        },
    )?;
    match state.ctl.delete(&id).await? {
        Deleted::Gone(job) => Ok(Json(JobView::from(&job))),
        Deleted::Active(job) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job `{id}` is {}: stop it first (`runyard stop {id}`), then delete it",
                job.status
            ),
            None,
        )),
        Deleted::Unknown => Err(ApiError::not_found(&id)),
    }
}

/// Stop a job: SIGTERM, then SIGKILL after its stop grace.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/stop", tag = "jobs",
    params(JobPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The job, stopping or stopped", body = JobView),
        Secured, Guarded, OneJob, Refusable, Storage,
    )
)]
async fn stop(
    State(state): State<ApiState>,
    Who(who): Who,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    let job = job_or_404(&state, &id).await?;
    allow(
        &who,
        Act::Change {
            owner: job.owner.as_deref(),
        },
    )?;
    match state.ctl.stop(&id).await? {
        None => Err(ApiError::not_found(&id)),
        Some(Err(msg)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{msg}: nothing to stop"),
            None,
        )),
        Some(Ok(job)) => Ok(Json(JobView::from(&job))),
    }
}

/// The metric history of the job's current attempt, for plots.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/metrics", tag = "jobs",
    params(JobPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The current attempt's metric history", body = MetricsResponse),
        Secured, OneJob, Storage,
    )
)]
async fn metrics(
    State(state): State<ApiState>,
    JobId(id): JobId,
) -> Result<Json<MetricsResponse>, ApiError> {
    let (attempt, series) = metric_series(&state, &id).await?;
    Ok(Json(MetricsResponse { attempt, series }))
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
#[utoipa::path(get, path = "/api/v1/jobs/{id}/metrics.svg", tag = "jobs",
    params(JobPath, MetricsSvgQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The plot", body = String, content_type = "image/svg+xml"),
        (status = 500, description = "The plot could not be drawn", body = ErrorBody),
        Secured, OneJob, Storage,
    )
)]
async fn metrics_svg(
    State(state): State<ApiState>,
    JobId(id): JobId,
    ApiQuery(q): ApiQuery<MetricsSvgQuery>,
) -> Result<Response, ApiError> {
    let Some(metric) = q.metric.as_ref().filter(|m| !m.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "metric: name the metric to plot, as in ?metric=val_loss",
            Some("metric"),
        ));
    };
    let dimension = |key: &str, value: &Option<String>, default: u32, lo: u32, hi: u32| match value
    {
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
        dimension("width", &q.width, default.0, min.0, max.0)?,
        dimension("height", &q.height, default.1, min.1, max.1)?,
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

/// The best checkpoint of the job's latest attempt that uploaded one, byte for byte; its sha256
/// is in `x-checksum-sha256`.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/checkpoint", tag = "jobs",
    params(JobPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The checkpoint file", body = Vec<u8>, content_type = "application/octet-stream",
            headers(("x-checksum-sha256" = String, description = "sha256 of the file, hex"))),
        Secured, OneJob, Storage,
    )
)]
async fn checkpoint(State(state): State<ApiState>, JobId(id): JobId) -> Result<Response, ApiError> {
    let job = job_or_404(&state, &id).await?;
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::error!(job = %id, error = %e, "cannot open checkpoint");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot read the checkpoint; retry",
            None,
        )
    };
    let found = state
        .ctl
        .checkpoint_of(&job)
        .await
        .map_err(|e| unavailable(&e))?;
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

/// Every agent the controller knows, with the jobs placed on it.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The agents", body = AgentList),
        Secured,
    )
)]
async fn agents(State(state): State<ApiState>) -> Json<AgentList> {
    Json(agent_list(&state.ctl))
}

/// Forget a gone agent and its enrolment, so its name can be enrolled again (see README
/// "Agents: identity"). Its jobs are lost after the TTL like those of any silent agent.
#[utoipa::path(delete, path = "/api/v1/agents/{name}", tag = "agents",
    params(("name" = String, Path, description = "The agent's name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"removed\": name}`", body = serde_json::Value),
        (status = 404, description = "No agent with that name", body = runyard_api::ErrorBody),
        Secured, Guarded, Storage,
    )
)]
async fn remove_agent(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&who, Act::Administer)?;
    match state.ctl.agents.remove(&name).await {
        Ok(true) => {
            tracing::warn!(agent = %name, "agent removed by an admin");
            state.ctl.kick();
            Ok(Json(serde_json::json!({"removed": name})))
        }
        Ok(false) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no agent named `{name}`"),
            None,
        )),
        Err(e) => Err(JobsError::from(e).into()),
    }
}

/// Who the token is: its name and role (the web page shows it and hides what the role may not
/// do).
#[utoipa::path(get, path = "/api/v1/whoami", tag = "access",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = WhoAmI),
        Secured,
    )
)]
async fn whoami(Who(who): Who) -> Json<WhoAmI> {
    Json(WhoAmI::from(&who))
}

/// Make a named token with a role (admins only). The token is in this answer and never again.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "access",
    request_body = CreateToken,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The token, shown once", body = TokenCreated),
        (status = 400, response = BadRequest),
        (status = 409, response = runyard_api::openapi::Conflict),
        (status = 413, response = PayloadTooLarge),
        Secured, Guarded, Storage,
    )
)]
async fn create_token(
    State(state): State<ApiState>,
    Who(who): Who,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    allow(&who, Act::Administer)?;
    let req: CreateToken = json_body(body)?;
    let (record, token) = state.access.create(&req.name, req.role, &who).await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            view: TokenView::from(&record),
            token,
        }),
    ))
}

/// Every named token (admins only), without the tokens.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "access",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The named tokens", body = TokenList),
        Secured, Guarded,
    )
)]
async fn list_tokens(
    State(state): State<ApiState>,
    Who(who): Who,
) -> Result<Json<TokenList>, ApiError> {
    allow(&who, Act::Administer)?;
    Ok(Json(TokenList {
        tokens: state.access.list().iter().map(TokenView::from).collect(),
    }))
}

/// Revoke a named token (admins only): refused from the next request on.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", tag = "access",
    params(("name" = String, Path, description = "The token's name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The revoked token", body = TokenView),
        (status = 404, description = "No token with that name", body = runyard_api::ErrorBody),
        Secured, Guarded, Storage,
    )
)]
async fn revoke_token(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    allow(&who, Act::Administer)?;
    match state.access.revoke(&name, &who).await? {
        Some(record) => Ok(Json(TokenView::from(&record))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no token named `{name}`"),
            None,
        )),
    }
}

/// The controller-side secrets' names (never their values).
#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The secrets' names", body = SecretList),
        Secured, Storage,
    )
)]
async fn list_secrets(State(state): State<ApiState>) -> Result<Json<SecretList>, ApiError> {
    let secrets = state.ctl.secrets.list().await?;
    Ok(Json(SecretList {
        secrets: secrets
            .iter()
            .map(|s| SecretView {
                name: s.name.clone(),
                updated_at: s.updated_at,
                updated_by: s.updated_by.clone(),
            })
            .collect(),
    }))
}

/// Set (or replace) a controller-side secret (admins only). Jobs name it in their spec's
/// `secrets` as `{"secret": NAME}` and get its value as it is when they are submitted.
#[utoipa::path(put, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name")),
    request_body = SetSecret,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The secret, without its value", body = SecretView),
        (status = 400, response = BadRequest),
        (status = 413, response = PayloadTooLarge),
        Secured, Guarded, Storage,
    )
)]
async fn set_secret(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SecretView>, ApiError> {
    allow(&who, Act::Administer)?;
    let req: SetSecret = json_body(body)?;
    let record = state.ctl.secrets.set(&name, &req.value, &who.name).await?;
    tracing::info!(secret = %name, by = %who.name, "secret set");
    Ok(Json(SecretView {
        name: record.name,
        updated_at: record.updated_at,
        updated_by: record.updated_by,
    }))
}

/// Remove a controller-side secret (admins only). Jobs submitted before keep their copy.
#[utoipa::path(delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"removed\": name}`", body = serde_json::Value),
        (status = 404, description = "No secret with that name", body = runyard_api::ErrorBody),
        Secured, Guarded, Storage,
    )
)]
async fn remove_secret(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&who, Act::Administer)?;
    if !state.ctl.secrets.remove(&name).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no secret named `{name}`"),
            None,
        ));
    }
    tracing::info!(secret = %name, by = %who.name, "secret removed");
    Ok(Json(serde_json::json!({"removed": name})))
}

/// Every agent with the jobs placed on it, as `/api/v1/agents` and `agents` events show them.
fn agent_list(ctl: &Controller) -> AgentList {
    let jobs = ctl.jobs.active();
    let mut agents = ctl.agents.list();
    for a in &mut agents {
        a.jobs = jobs
            .iter()
            .filter(|j| j.status.is_on_agent() && j.agent.as_deref() == Some(a.name.as_str()))
            .map(|j| j.id.clone())
            .collect();
    }
    AgentList {
        agents: agents.iter().map(AgentView::from).collect(),
    }
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
#[utoipa::path(get, path = "/api/v1/events", tag = "jobs",
    params(EventsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Server-sent events: `job` (data: a JobView), `removed` \
            (data: a JobRemoved) and `agents` (data: an AgentList)", body = String,
            content_type = "text/event-stream"),
        Secured, OneJob,
    )
)]
async fn events(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let only = q.job.filter(|j| !j.is_empty());
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
            yield Ok::<_, std::io::Error>(sse_event("job", &JobView::from(job)));
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
                        yield Ok(sse_event("agents", &agent_list(&ctl)));
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
                    yield Ok(sse_event("job", &JobView::from(&job)));
                }
            }
            for (id, job) in batch {
                match job {
                    Some(job) => yield Ok(sse_event("job", &JobView::from(&*job))),
                    None => yield Ok(sse_event("removed", &JobRemoved { id })),
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
#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs", tag = "jobs",
    params(JobPath, LogsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The log lines; the attempt is in `x-runyard-attempt`",
            body = String, content_type = "text/plain",
            headers(("x-runyard-attempt" = u32, description = "The attempt whose log this is"))),
        Secured, OneJob,
    )
)]
async fn logs(
    State(state): State<ApiState>,
    JobId(id): JobId,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let job = job_or_404(&state, &id).await?;
    let follow = match q.follow.as_deref() {
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
    let fixed_attempt = match &q.attempt {
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
    let start_offset = match &q.offset {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Every route of the API, as `METHOD path`.
    const ROUTES: [&str; 30] = [
        "DELETE /api/v1/agents/{name}",
        "DELETE /api/v1/jobs/{id}",
        "DELETE /api/v1/secrets/{name}",
        "DELETE /api/v1/services/{name}",
        "DELETE /api/v1/tokens/{name}",
        "GET /api/v1/agents",
        "GET /api/v1/events",
        "GET /api/v1/jobs",
        "GET /api/v1/jobs/{id}",
        "GET /api/v1/jobs/{id}/checkpoint",
        "GET /api/v1/jobs/{id}/logs",
        "GET /api/v1/jobs/{id}/metrics",
        "GET /api/v1/jobs/{id}/metrics.svg",
        "GET /api/v1/jobs/{id}/placements",
        "GET /api/v1/openapi.json",
        "GET /api/v1/secrets",
        "GET /api/v1/services",
        "GET /api/v1/services/{name}",
        "GET /api/v1/services/{name}/history",
        "GET /api/v1/tokens",
        "GET /api/v1/whoami",
        "GET /healthz",
        "POST /api/v1/jobs",
        "POST /api/v1/jobs/{id}/stop",
        "POST /api/v1/services",
        "POST /api/v1/services/{name}/scale",
        "POST /api/v1/services/{name}/stop",
        "POST /api/v1/snapshots",
        "POST /api/v1/tokens",
        "PUT /api/v1/secrets/{name}",
    ];

    fn documented() -> Vec<String> {
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut routes = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                routes.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        routes.sort();
        routes
    }

    async fn state(dir: &std::path::Path) -> ApiState {
        let store = crate::store::open("file:", dir).await.unwrap();
        let ctl = Controller::new(
            crate::jobs::Jobs::load(store.clone()).await.unwrap(),
            crate::agents::Agents::load(store, runyard_model::Timestamp::now())
                .await
                .unwrap(),
            crate::logs::LogStore::open(dir.join("logs")).unwrap(),
            crate::logs::LogStore::open(dir.join("reports")).unwrap(),
            std::sync::Arc::new(crate::artifacts::DirStore::open(dir.join("artifacts")).unwrap()),
            Duration::from_secs(30),
        );
        let access = crate::access::Access::load(
            crate::store::open("file:", &dir.join("access"))
                .await
                .unwrap(),
            "rya_test".into(),
        )
        .await
        .unwrap();
        ApiState {
            ctl,
            tls: false,
            access,
            shutdown: CancellationToken::new(),
        }
    }

    async fn send(router: &Router, method: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    #[test]
    fn the_document_lists_exactly_the_routes() {
        assert_eq!(documented(), ROUTES);
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }

    /// The router serves every documented route (a token is asked for, or it answers), and
    /// nothing else under `/api/`: an unknown path is a JSON 404, a wrong method a JSON 405.
    #[tokio::test]
    async fn the_router_serves_exactly_the_documented_routes() {
        let dir = tempfile::tempdir().unwrap();
        let router = router(state(dir.path()).await);
        for route in ROUTES {
            let (method, path) = route.split_once(' ').unwrap();
            let path = path.replace("{id}", "nope");
            let (status, body) = send(&router, method, &path).await;
            let public = path == "/healthz" || path == OPENAPI_PATH;
            let want = if public {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(status, want, "{route}: {body}");
            let (status, body) = send(&router, "PATCH", &path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{route}");
            assert!(body["error"].as_str().unwrap().contains("PATCH"), "{body}");
            assert!(body["field"].is_null(), "{body}");
        }
        let (status, body) = send(&router, "GET", "/api/v1/nothing").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no such endpoint");
    }
}
