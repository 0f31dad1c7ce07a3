//! Admin routes behind their own bearer token: hot reload of a model's weights and the queue
//! state. Disabled (404) unless `admin_token` is configured.

use std::path::PathBuf;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::AppState;
use crate::engine::EngineError;

/// What to load; without `checkpoint` the manifest's weights file is read again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// A safetensors weights file readable by the server (e.g. a `fewstep distill` export).
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReloadResponse {
    pub model: String,
    pub previous_version: String,
    /// Content hash of the weights now serving.
    pub model_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueState {
    pub queued_jobs: usize,
    pub capacity: usize,
    pub ready: bool,
    pub draining: bool,
}

/// Checks `Authorization: Bearer <admin_token>`; admin routes are off without a token.
pub async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(expected) = state.config.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "admin_disabled",
            "admin routes are disabled (set `admin_token`)",
        ));
    };
    let token = super::bearer_token(req.headers());
    match token {
        Some(t) if super::constant_time_eq(expected, t) => Ok(next.run(req).await),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "admin routes need `Authorization: Bearer <admin token>`",
        )),
    }
}

/// Load new weights for a model beside the serving copy, validate them (shapes, a smoke
/// generation) and swap them in between batches. On any error the old version keeps serving.
#[utoipa::path(
    post,
    path = "/admin/models/{id}/reload",
    tag = "admin",
    params(("id" = String, Path, description = "Model id")),
    request_body(content = ReloadRequest, description = "Optional; `{}` reloads the manifest's weights file"),
    responses(
        (status = 200, description = "Swapped; the new version serves the next batch", body = ReloadResponse),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model, or admin routes disabled", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The weights were refused (missing, corrupt, wrong shapes, failed smoke test)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []))
)]
pub async fn reload(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Option<Json<ReloadRequest>>,
) -> Result<Json<ReloadResponse>, ApiError> {
    let card = state.engine.card(&model).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!("no model named {model:?}"),
        )
    })?;
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let path = match req.checkpoint {
        Some(p) => PathBuf::from(p),
        None => card.manifest.weights_path(),
    };
    match state.engine.reload(&model, path.clone()).await {
        Ok(new) => {
            metrics::counter!("fewstep_reloads_total", "model" => model.clone(), "result" => "ok")
                .increment(1);
            tracing::info!(%model, from = %card.version, to = %new.version, path = %path.display(), "model reloaded");
            Ok(Json(ReloadResponse {
                model,
                previous_version: card.version,
                model_version: new.version,
            }))
        }
        Err(EngineError::Reload(msg)) => {
            metrics::counter!("fewstep_reloads_total", "model" => model.clone(), "result" => "refused")
                .increment(1);
            tracing::warn!(%model, path = %path.display(), error = %msg, "reload refused");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_refused",
                format!("{msg}; version {} keeps serving", card.version),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Queue depth and readiness.
#[utoipa::path(
    get,
    path = "/admin/queue",
    tag = "admin",
    responses(
        (status = 200, description = "Queue state", body = QueueState),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Admin routes disabled", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []))
)]
pub async fn queue(State(state): State<AppState>) -> Json<QueueState> {
    let s = state.engine.snapshot();
    Json(QueueState {
        queued_jobs: s.queued_jobs,
        capacity: s.capacity,
        ready: s.ready,
        draining: s.draining,
    })
}
