//! The OpenAPI document's shared parts. The controller adds one path item per route from its
//! handlers' annotations (`#[utoipa::path]`), so the document and the router come from the same
//! code; this module holds what every route shares: the info block, the bearer scheme, the
//! schemas of the API types, and the reusable error responses.

use std::collections::BTreeMap;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, response::Response};
use utoipa::{IntoResponses, Modify, OpenApi, ToResponse};

use crate::error::ErrorBody;

/// The name of the security scheme every `/api/v1` route except the document requires.
pub const BEARER: &str = "bearer";

/// Info, components and the bearer scheme; the controller merges in the paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Runyard API",
        description = "Submit and watch Python jobs from git repositories. Every error body is \
                       `{\"error\": message, \"field\": field-or-null}`.",
        license(name = "Apache-2.0")
    ),
    components(
        schemas(
            ErrorBody,
            crate::job::JobView,
            crate::job::JobPage,
            crate::job::JobRemoved,
            crate::placement::PlacementList,
            crate::access::WhoAmI,
            crate::access::CreateToken,
            crate::access::TokenCreated,
            crate::access::TokenList,
            crate::access::SecretList,
            crate::access::SetSecret,
            crate::agent::AgentList,
            crate::metrics::MetricsResponse,
            runyard_model::JobSpec
        ),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            MethodNotAllowed,
            Conflict,
            PayloadTooLarge,
            Unavailable
        )
    ),
    modifiers(&BearerScheme)
)]
pub struct ApiDoc;

/// Adds the bearer token scheme (the controller's admin token).
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The controller's admin token (`<data dir>/admin.token`) or a named token \
                         (`runyard token create`); the CLI reads RUNYARD_TOKEN",
                    ))
                    .build(),
            ),
        );
    }
}

/// The error responses routes share, by status, as references to the components below.
fn refs(list: &[(&str, &str)]) -> BTreeMap<String, RefOr<Response>> {
    list.iter()
        .map(|(status, name)| {
            (
                status.to_string(),
                RefOr::Ref(Ref::from_response_name(*name)),
            )
        })
        .collect()
}

/// Every route: a wrong method (405).
pub struct Public;

impl IntoResponses for Public {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refs(&[("405", "MethodNotAllowed")])
    }
}

/// Routes that need the token: 401, and a wrong method (405).
pub struct Secured;

impl IntoResponses for Secured {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refs(&[("401", "Unauthorized"), ("405", "MethodNotAllowed")])
    }
}

/// Routes that change something: the caller's role may not allow it (403).
pub struct Guarded;

impl IntoResponses for Guarded {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refs(&[("403", "Forbidden")])
    }
}

/// Routes of one job (`{id}`, or `?job=`): a malformed parameter (400), no such job (404).
pub struct OneJob;

impl IntoResponses for OneJob {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refs(&[("400", "BadRequest"), ("404", "NotFound")])
    }
}

/// Routes whose job state may refuse the change (409).
pub struct Refusable;

impl IntoResponses for Refusable {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refs(&[("409", "Conflict")])
    }
}

/// Routes that write the store or read files: 503 when they cannot.
pub struct Storage;

impl IntoResponses for Storage {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refs(&[("503", "Unavailable")])
    }
}

/// 400: bad input; `field` names it.
#[derive(ToResponse)]
#[response(description = "Bad input: `field` names the parameter or spec field at fault")]
pub struct BadRequest(#[to_schema] pub ErrorBody);

/// 401: no token, or not the admin token.
#[derive(ToResponse)]
#[response(description = "Missing or invalid bearer token")]
pub struct Unauthorized(#[to_schema] pub ErrorBody);

/// 403: the caller's role does not allow it.
#[derive(ToResponse)]
#[response(description = "The token's role does not allow this (a viewer, or another user's job)")]
pub struct Forbidden(#[to_schema] pub ErrorBody);

/// 404: no such job (or nothing of it to show).
#[derive(ToResponse)]
#[response(description = "No such job, or nothing of it to show")]
pub struct NotFound(#[to_schema] pub ErrorBody);

/// 405: the path exists, the method does not.
#[derive(ToResponse)]
#[response(description = "The path exists, but not with this method")]
pub struct MethodNotAllowed(#[to_schema] pub ErrorBody);

/// 409: the job's state does not allow it.
#[derive(ToResponse)]
#[response(description = "The job's state does not allow this")]
pub struct Conflict(#[to_schema] pub ErrorBody);

/// 413: the request body is over the limit.
#[derive(ToResponse)]
#[response(description = "The request body is larger than 1 MiB")]
pub struct PayloadTooLarge(#[to_schema] pub ErrorBody);

/// 503: the store or a file could not be read; retry.
#[derive(ToResponse)]
#[response(description = "The job store or a file is unavailable; retry shortly")]
pub struct Unavailable(#[to_schema] pub ErrorBody);
