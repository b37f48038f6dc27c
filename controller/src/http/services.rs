//! `/api/v1/services`: serve, list, show, scale, stop and remove services, and their history;
//! and `/s/NAME/...`, the data plane's entry (any method, a token unless the service is public).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use runyard_api::openapi::{BadRequest, Guarded, PayloadTooLarge, Refusable, Secured, Storage};
use runyard_api::{
    ReplicaView, ScaleRequest, ServiceHistory, ServiceList, ServicePoint, ServiceView, TrafficView,
};
use runyard_model::service::{ReplicaRef, Service, ServiceSpec};
use runyard_model::{Act, Desired};

use super::{ApiError, ApiState, Who, allow};
use crate::services::ServiceError;
use crate::services::route::ServiceRoute;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        match e {
            ServiceError::Invalid(v) => v.into(),
            ServiceError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string(), None),
            ServiceError::Refused(_) => ApiError::new(StatusCode::CONFLICT, e.to_string(), None),
            ServiceError::Store(_) | ServiceError::Corrupt(..) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None)
            }
        }
    }
}

/// The name in a service route's path.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct ServiceName {
    /// The service's name.
    #[allow(dead_code)]
    name: String,
}

/// Serve a service: a new one, or a new spec for a running one (a rollout when what the
/// replicas run changes: new replicas become ready before old ones drain).
#[utoipa::path(post, path = "/api/v1/services", tag = "services",
    request_body(content = Object, description = "A job's fields (repo, revision, script, args, requirements, env, secrets, compute, memory, stop_grace; name required) and the service's: health, health_interval, replicas {min, max}, autoscale {scale_out_interval, scale_in_interval, policy}, batching {max_batch_size, timeout}, cold_start {timeout, proxy}, public"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new service", body = ServiceView),
        (status = 200, description = "The updated service", body = ServiceView),
        (status = 400, response = BadRequest),
        (status = 413, response = PayloadTooLarge),
        Secured, Guarded, Refusable, Storage,
    )
)]
pub(super) async fn serve(
    State(state): State<ApiState>,
    Who(who): Who,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    allow(&who, Act::Submit)?;
    let spec = ServiceSpec::from_json(&body?)?;
    if let Some((existing, _)) = state.ctl.services.get(&spec.name).await? {
        allow(
            &who,
            Act::Change {
                owner: existing.owner.as_deref(),
            },
        )?;
    }
    let (service, created) = state
        .ctl
        .services
        .apply(&state.ctl, spec, &who.name)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state, &service))).into_response())
}

/// List services.
#[utoipa::path(get, path = "/api/v1/services", tag = "services",
    security(("bearer" = [])),
    responses((status = 200, description = "Every service", body = ServiceList), Secured, Storage)
)]
pub(super) async fn list_services(
    State(state): State<ApiState>,
) -> Result<Json<ServiceList>, ApiError> {
    let services = state.ctl.services.list().await?;
    Ok(Json(ServiceList {
        services: services.iter().map(|s| view(&state, s)).collect(),
    }))
}

/// One service: its replicas, traffic and last scaling decision.
#[utoipa::path(get, path = "/api/v1/services/{name}", tag = "services",
    params(ServiceName),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The service", body = ServiceView),
        (status = 404, description = "No such service", body = runyard_api::ErrorBody),
        Secured, Storage,
    )
)]
pub(super) async fn show_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let (s, _) = found(&state, &name).await?;
    Ok(Json(view(&state, &s)))
}

/// Remove a stopped service that has no replica left.
#[utoipa::path(delete, path = "/api/v1/services/{name}", tag = "services",
    params(ServiceName),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such service", body = runyard_api::ErrorBody),
        Secured, Guarded, Refusable, Storage,
    )
)]
pub(super) async fn remove_service(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (s, _) = found(&state, &name).await?;
    allow(
        &who,
        Act::Change {
            owner: s.owner.as_deref(),
        },
    )?;
    state.ctl.services.remove(&state.ctl, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// New replica bounds; the autoscaler works inside them.
#[utoipa::path(post, path = "/api/v1/services/{name}/scale", tag = "services",
    params(ServiceName),
    request_body = ScaleRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The service", body = ServiceView),
        (status = 400, response = BadRequest),
        (status = 404, description = "No such service", body = runyard_api::ErrorBody),
        (status = 413, response = PayloadTooLarge),
        Secured, Guarded, Storage,
    )
)]
pub(super) async fn scale_service(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ServiceView>, ApiError> {
    let req: ScaleRequest = super::json_body(body)?;
    let (s, _) = found(&state, &name).await?;
    allow(
        &who,
        Act::Change {
            owner: s.owner.as_deref(),
        },
    )?;
    let s = state.ctl.services.scale(&name, req.min, req.max).await?;
    Ok(Json(view(&state, &s)))
}

/// Stop a service: its replicas drain (finish what they have) and stop. Serve it again to
/// start it.
#[utoipa::path(post, path = "/api/v1/services/{name}/stop", tag = "services",
    params(ServiceName),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The service, stopping", body = ServiceView),
        (status = 404, description = "No such service", body = runyard_api::ErrorBody),
        Secured, Guarded, Storage,
    )
)]
pub(super) async fn stop_service(
    State(state): State<ApiState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let (s, _) = found(&state, &name).await?;
    allow(
        &who,
        Act::Change {
            owner: s.owner.as_deref(),
        },
    )?;
    let s = state.ctl.services.stop(&name).await?;
    Ok(Json(view(&state, &s)))
}

/// The last hour of a service: replicas, ready replicas, request rate, pending (every 5 s).
#[utoipa::path(get, path = "/api/v1/services/{name}/history", tag = "services",
    params(ServiceName),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The service's history", body = ServiceHistory),
        (status = 404, description = "No such service", body = runyard_api::ErrorBody),
        Secured, Storage,
    )
)]
pub(super) async fn service_history(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceHistory>, ApiError> {
    found(&state, &name).await?;
    let points = state
        .ctl
        .services
        .plane
        .routes
        .get(&name)
        .map(|r| {
            r.history
                .lock()
                .unwrap()
                .iter()
                .map(|p| ServicePoint {
                    at: p.at,
                    replicas: p.replicas,
                    ready: p.ready,
                    rate: p.rate,
                    pending: p.pending,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(ServiceHistory { points }))
}

async fn found(state: &ApiState, name: &str) -> Result<(Service, u64), ApiError> {
    state.ctl.services.get(name).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no service named `{name}` (see `runyard services`)"),
            None,
        )
    })
}

/// The API's view of a service.
pub fn view(state: &ApiState, s: &Service) -> ServiceView {
    let route = state.ctl.services.plane.routes.get(&s.name);
    let replica = |r: &ReplicaRef| replica_view(state, route.as_deref(), r);
    let replicas: Vec<ReplicaView> = s.replicas.iter().map(replica).collect();
    let ready = replicas.iter().filter(|r| r.ready && !r.draining).count();
    let status = match (s.desired, s.replicas.is_empty(), ready) {
        (Desired::Stop, true, _) => "stopped",
        (Desired::Stop, false, _) => "stopping",
        (Desired::Run, true, _) if s.target == 0 => "idle",
        (Desired::Run, _, 0) => "starting",
        (Desired::Run, _, _) => "ready",
    };
    let traffic = route.as_ref().map_or_else(TrafficView::default, |r| {
        let st = r.stats.lock().unwrap();
        let (p50, p99) = st.percentiles().unzip();
        TrafficView {
            rate: st.rate(),
            p50_ms: p50,
            p99_ms: p99,
            pending: r.pending(),
            queued: r.queued.load(Ordering::SeqCst),
            total: st.total,
            failed: st.failed,
            mean_batch: st.mean_batch(),
        }
    });
    let mut spec = s.spec.to_value();
    if let Some(o) = spec.as_object_mut() {
        o.remove("port");
    }
    ServiceView {
        name: s.name.clone(),
        status: status.into(),
        url: format!("/s/{}/", s.name),
        spec,
        generation: s.generation,
        target: s.target,
        min: s.spec.serving.replicas.min,
        max: s.spec.serving.replicas.max,
        public: s.spec.serving.public,
        desired: match s.desired {
            Desired::Run => "run".into(),
            Desired::Stop => "stop".into(),
        },
        replicas,
        ended: s.ended.iter().map(replica).collect(),
        traffic,
        decision: s.decision.clone(),
        policy_error: s.policy_error.clone(),
        reason: s.reason.clone(),
        owner: s.owner.clone(),
        created_at: s.created_at,
        updated_at: s.updated_at,
    }
}

fn replica_view(state: &ApiState, route: Option<&ServiceRoute>, r: &ReplicaRef) -> ReplicaView {
    let job = state.ctl.jobs.get(&r.job);
    let ep = route.and_then(|route| {
        route
            .endpoints()
            .iter()
            .find(|e| e.job == r.job && job.as_ref().is_some_and(|j| j.attempt == e.attempt))
            .cloned()
    });
    ReplicaView {
        index: r.index,
        job: r.job.clone(),
        generation: r.generation,
        status: job.as_ref().map(|j| j.status),
        agent: job.as_ref().and_then(|j| j.agent.clone()),
        port: job.as_ref().and_then(|j| j.port),
        ready: ep.as_ref().is_some_and(|e| e.ready.load(Ordering::SeqCst)),
        draining: ep
            .as_ref()
            .is_some_and(|e| e.draining.load(Ordering::SeqCst)),
        unhealthy: ep
            .as_ref()
            .is_some_and(|e| e.unhealthy.load(Ordering::SeqCst)),
        in_flight: ep
            .as_ref()
            .map_or(0, |e| e.in_flight.load(Ordering::SeqCst) as u64),
        served: ep.as_ref().map_or(0, |e| e.served.load(Ordering::Relaxed)),
        path: ep.as_ref().map(|e| {
            serde_json::to_value(e.path())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }),
    }
}

/// The data plane's entry: `/s/NAME` and `/s/NAME/...`.
pub(super) async fn data_plane(State(state): State<ApiState>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/s/").unwrap_or("");
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n.to_string(), format!("/{t}")),
        None => (rest.to_string(), "/".to_string()),
    };
    let Some(route) = state.ctl.services.plane.routes.get(&name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no service named `{name}` (see `runyard services`)"),
            None,
        )
        .into_response();
    };
    let (public, strip) = {
        let s = route.serving.read().unwrap();
        (s.public, s.strip_prefix)
    };
    let tail = if strip { tail } else { path.clone() };
    let mut req = req;
    if !public {
        let token = presented_token(req.headers());
        match token.as_deref().map(|t| state.access.caller(t)) {
            Some(Some(_)) => {}
            Some(None) => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("invalid token for service `{name}`: any valid Runyard token opens it (or serve it with `public: true`)"),
                    None,
                )
                .into_response();
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("service `{name}` needs a token: send `Authorization: Bearer <token>` (or serve it with `public: true`)"),
                    None,
                )
                .into_response();
            }
        }
        // The token is Runyard's, not the replica's.
        strip_token(req.headers_mut());
    }
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let plane = state.ctl.services.plane.clone();
    plane.forward(route, format!("{tail}{query}"), req).await
}

/// The cookie the web page sets so that a browser opens `/s/NAME/` with the user's token.
pub const TOKEN_COOKIE: &str = "runyard_token";

fn presented_token(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == TOKEN_COOKIE)
        .map(|(_, v)| v.to_string())
}

fn strip_token(headers: &mut axum::http::HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.starts_with(&format!("{TOKEN_COOKIE}=")) && !c.is_empty())
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(v) = cookies.join("; ").parse()
    {
        headers.insert(header::COOKIE, v);
    }
}

/// The data plane's router (outside the API's body limit, error rewriting and tracing).
pub fn data_plane_router(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route("/s/{*rest}", axum::routing::any(data_plane))
        .with_state(state)
}
