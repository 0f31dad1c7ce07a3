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
use crate::rollout::{DecidedBy, DecisionView, RolloutReport};

/// What to load; without `checkpoint` the manifest's weights file is read again. A
/// checkpoint must lie under `models_dir` or one of `reload_dirs` (after resolving symlinks)
/// and be at most a few times the size of the serving weights.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// A safetensors weights file readable by the server (e.g. a `fewstep distill` export).
    pub checkpoint: Option<String>,
    /// Serve the new weights as a canary to this share of new generations, in `(0, 1]`,
    /// beside the current version, until promoted or rolled back (by hand or by the
    /// `[rollout]` policy). Without it the new weights take all traffic at once.
    #[schema(maximum = 1.0, exclusive_minimum = 0.0)]
    pub canary: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReloadResponse {
    pub model: String,
    pub previous_version: String,
    /// Content hash of the loaded weights (the canary's, when `canary_share` is set).
    pub model_version: String,
    /// The canary's share of new generations; absent when the weights took all traffic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_share: Option<f64>,
}

/// A rollout that ended: the version now serving all traffic and the logged decision.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutEndResponse {
    pub model: String,
    /// The version serving all traffic now.
    pub model_version: String,
    pub decision: DecisionView,
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
        (status = 200, description = "Swapped (or, with `canary`, serving that share beside the current version) from the next batch", body = ReloadResponse),
        (status = 400, description = "The body is not a valid reload request (`invalid_json`, `invalid_canary`)", body = Problem, content_type = "application/problem+json"),
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
    match state.rollout.load(&model, path.clone(), req.canary).await {
        Ok(new) => {
            metrics::counter!("fewstep_reloads_total", "model" => model.clone(), "result" => "ok")
                .increment(1);
            let (version, share) = match &new.canary {
                Some(c) => (c.version.clone(), Some(c.share)),
                None => (new.version.clone(), None),
            };
            tracing::info!(%model, from = %card.version, to = %version, canary = ?share, path = %path.display(), "model reloaded");
            Ok(Json(ReloadResponse {
                model,
                previous_version: card.version,
                model_version: version,
                canary_share: share,
            }))
        }
        Err(crate::rollout::RolloutError::Engine(
            e @ (EngineError::Reload(_) | EngineError::ModelMismatch(_)),
        )) => {
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

/// Both versions of a model's rollout side by side (requests, device errors, users' mean
/// rating with its interval, the reward proxy), what the policy would decide now, and the
/// recent decisions. Without a canary only the serving version is shown.
#[utoipa::path(
    get,
    path = "/admin/models/{id}/rollout",
    tag = "admin",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The rollout", body = RolloutReport),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model, or admin routes disabled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The generation log is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []))
)]
pub async fn rollout(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<RolloutReport>, ApiError> {
    Ok(Json(state.rollout.report(&model).await?))
}

/// Makes the canary the only version of the model.
#[utoipa::path(
    post,
    path = "/admin/models/{id}/promote",
    tag = "admin",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "Promoted; the canary serves all traffic", body = RolloutEndResponse),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model, or admin routes disabled", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No canary is serving (`no_canary`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The generation log is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []))
)]
pub async fn promote(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<RolloutEndResponse>, ApiError> {
    end_rollout(state, model, true).await
}

/// Drops the canary; the previous version serves all traffic again.
#[utoipa::path(
    post,
    path = "/admin/models/{id}/rollback",
    tag = "admin",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "Rolled back", body = RolloutEndResponse),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown model, or admin routes disabled", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No canary is serving (`no_canary`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The generation log is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []))
)]
pub async fn rollback(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<RolloutEndResponse>, ApiError> {
    end_rollout(state, model, false).await
}

async fn end_rollout(
    state: AppState,
    model: String,
    promote: bool,
) -> Result<Json<RolloutEndResponse>, ApiError> {
    let reason = format!(
        "{} by an admin",
        if promote { "promoted" } else { "rolled back" }
    );
    let (end, decision) = state
        .rollout
        .end(&model, promote, DecidedBy::Admin, reason)
        .await?;
    Ok(Json(RolloutEndResponse {
        model,
        model_version: end.card.version,
        decision,
    }))
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
