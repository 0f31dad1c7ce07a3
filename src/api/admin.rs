//! Admin routes behind their own bearer token: hot reload of a model's weights and the queue
//! state. Disabled (404) unless `admin_token` is configured.

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, HttpError, Problem, ServeError};
use super::AppState;
use crate::engine::EngineError;

/// What to load; without `checkpoint` the manifest's weights file is read again. A
/// checkpoint must lie under `models_dir` or one of `reload_dirs` (after resolving symlinks)
/// and be at most a few times the size of the serving weights.
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
        return Err(ServeError::AdminDisabled.into());
    };
    let token = super::bearer_token(req.headers());
    match token {
        Some(t) if super::constant_time_eq(expected, t) => Ok(next.run(req).await),
        _ => Err(ServeError::InvalidAdminToken.into()),
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
        (status = 400, description = "The body is not a valid reload request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model, or admin routes disabled", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The weights were refused: `checkpoint_unavailable` (not found or not allowed), `checkpoint_too_large`, `model_mismatch` (another model's weights), `reload_refused` (corrupt, wrong tensors, failed smoke test)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []))
)]
pub async fn reload(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReloadResponse>, ApiError> {
    let card = state
        .engine
        .card(&model)
        .ok_or_else(|| ServeError::UnknownModel(model.clone()))?;
    let body = body.map_err(|_| HttpError::BodyTooLarge {
        limit: state.config.max_body_bytes,
    })?;
    let req: ReloadRequest = if body.is_empty() {
        ReloadRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| HttpError::InvalidJson(e.to_string()))?
    };
    let path = match req.checkpoint {
        Some(p) => {
            let allowed: Vec<PathBuf> = std::iter::once(state.config.models_dir.clone())
                .chain(state.config.reload_dirs.iter().cloned())
                .collect();
            crate::manifest::identity::resolve_checkpoint(
                std::path::Path::new(&p),
                &allowed,
                card.weights_bytes,
            )?
        }
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
        Err(e @ (EngineError::Reload(_) | EngineError::ModelMismatch(_))) => {
            metrics::counter!("fewstep_reloads_total", "model" => model.clone(), "result" => "refused")
                .increment(1);
            tracing::warn!(%model, path = %path.display(), error = %e, "reload refused");
            let mut err = ApiError::from(e);
            err.detail = format!("{}; version {} keeps serving", err.detail, card.version);
            Err(err)
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
