//! `POST /api/v1/snapshots`: a local project directory, as a tar archive, for jobs to run
//! (`"repo": "snapshot:sha256:<hex>"`). Bodies up to the controller's `--max-snapshot-size`.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use runyard_api::SnapshotView;
use runyard_api::openapi::{BadRequest, Guarded, PayloadTooLarge, Secured};
use runyard_model::Act;

use super::{ApiError, ApiState, Who, allow};
use crate::snapshots::SnapshotError;

/// Upload a snapshot of a local project directory: a plain tar archive of its files (relative
/// paths, no `..`; files, directories, and symlinks that stay inside). Content-addressed: the
/// same archive again answers 200 with the same id.
#[utoipa::path(post, path = "/api/v1/snapshots", tag = "jobs",
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "A tar archive of the project's files"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored", body = SnapshotView),
        (status = 200, description = "Stored before", body = SnapshotView),
        (status = 400, response = BadRequest),
        (status = 413, response = PayloadTooLarge),
        Secured, Guarded,
    )
)]
pub(super) async fn upload_snapshot(
    State(state): State<ApiState>,
    Who(who): Who,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    allow(&who, Act::Submit)?;
    let Some(store) = state.ctl.snapshots.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this controller keeps no snapshots",
            None,
        ));
    };
    let limited = http_body_util::Limited::new(body, store.max as usize);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the snapshot is larger than the controller's limit of {}: run the project from its git repository, leave large files out (.gitignore), or raise --max-snapshot-size",
                    runyard_model::size::format(store.max)
                ),
                Some("body"),
            ));
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
                Some("body"),
            ));
        }
    };
    let stored = store.put(bytes).await.map_err(|e| match e {
        SnapshotError::Invalid(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, e.to_string(), Some("body"))
        }
        SnapshotError::Io(_) => {
            tracing::error!(error = %e, "cannot store a snapshot");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None)
        }
    })?;
    tracing::info!(snapshot = %stored.sha256, size = stored.size, files = stored.summary.files, owner = %who.name, created = stored.created, "snapshot uploaded");
    let status = if stored.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(SnapshotView {
            snapshot: runyard_proto::snapshot::id_of(&stored.sha256),
            sha256: stored.sha256,
            size: stored.size,
            files: stored.summary.files,
        }),
    ))
}
