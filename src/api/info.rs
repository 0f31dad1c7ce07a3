//! Probes, metrics and the model list.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::error::{ApiError, Problem};
use super::schema::{ModelInfo, ModelList, Size, Status};
use super::AppState;
use crate::engine::ModelCard;

/// Liveness: the process is up.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = Status)))]
pub async fn health() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
    })
}

/// Readiness: models are loaded and the server is not draining.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "Loading or draining", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    if state.engine.is_ready() {
        Ok(Json(Status {
            status: "ready".into(),
        }))
    } else if state.engine.snapshot().draining {
        Err(crate::engine::EngineError::Draining.into())
    } else {
        Err(crate::engine::EngineError::NotReady.into())
    }
}

/// Prometheus metrics: requests by route and status, queue depth, batch sizes, stage
/// latencies, outputs generated.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub fn model_info(card: &ModelCard) -> ModelInfo {
    let m = &card.manifest;
    let mut kinds = vec!["image".to_string()];
    if m.serving.frames.iter().any(|&f| f > 1) {
        kinds.push("video".into());
    }
    ModelInfo {
        id: m.name.clone(),
        family: m.family().to_string(),
        description: m.description.clone(),
        kinds,
        sizes: m
            .serving
            .sizes
            .iter()
            .map(|[w, h]| Size {
                width: *w as u32,
                height: *h as u32,
            })
            .collect(),
        frames: m.serving.frames.iter().map(|&f| f as u32).collect(),
        sampler: format!("{:?}", m.sampling.sampler).to_lowercase(),
        default_steps: m.sampling.default_steps as u32,
        allowed_steps: m.sampling.allowed_steps.iter().map(|&s| s as u32).collect(),
        default_guidance: m.sampling.default_guidance,
        max_guidance: m.sampling.max_guidance,
        max_batch: m.serving.max_batch as u32,
        version: card.version.clone(),
        trained: card.trained,
    }
}

/// The models this server runs and what each can do.
#[utoipa::path(get, path = "/models", tag = "models",
    responses(
        (status = 200, description = "Loaded models", body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        default_model: state.default_model.clone(),
        models: state.engine.cards().iter().map(model_info).collect(),
    })
}
