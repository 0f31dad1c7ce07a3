//! The HTTP API: routes, authentication, metrics middleware and the OpenAPI document.

pub mod admin;
pub mod error;
pub mod feedback;
pub mod generate;
pub mod info;
pub mod jobs;
pub mod openai;
pub mod openapi;
pub mod schema;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::ServerConfig;
use crate::engine::{Engine, Jobs};
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    /// The job system every route submits to.
    pub jobs: Jobs,
    pub config: Arc<ServerConfig>,
    pub default_model: String,
    pub metrics: PrometheusHandle,
    /// The generation log (`None` when `store_url` is unset).
    pub log: Option<crate::store::LogWriter>,
}

/// The whole application: public probes, then everything else behind the API keys.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/generate", post(generate::generate))
        .route("/jobs/{id}", get(jobs::job).delete(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/models", get(info::models))
        .route("/v1/models", get(openai::models::list))
        .route("/v1/models/{id}", get(openai::models::retrieve))
        .route("/v1/images/generations", post(openai::images::generate))
        .route(
            "/v1/videos",
            post(openai::videos::create).get(openai::videos::list),
        )
        .route(
            "/v1/videos/{id}",
            get(openai::videos::retrieve).delete(openai::videos::delete),
        )
        .route("/v1/videos/{id}/content", get(openai::videos::content))
        .route("/feedback", post(feedback::feedback))
        .route("/generations/{id}", get(feedback::generation))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::ApiDoc::openapi()))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let admin = Router::new()
        .route("/admin/models/{id}/reload", post(admin::reload))
        .route("/admin/queue", get(admin::queue))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ));
    Router::new()
        .route("/health", get(info::health))
        .route("/ready", get(info::ready))
        .route("/metrics", get(info::metrics))
        .merge(protected)
        .merge(admin)
        .layer(middleware::from_fn(record_metrics))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Bearer-key check for everything but the probes; a no-op when no keys are configured.
/// Refusals under `/v1` take OpenAI's error shape.
async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.config.api_keys.is_empty() {
        return next.run(req).await;
    }
    let refusal = match bearer_token(req.headers()) {
        Some(t) if state.config.api_keys.iter().any(|k| constant_time_eq(k, t)) => {
            return next.run(req).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "the API key is not valid",
        ),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send `Authorization: Bearer <key>`",
        ),
    };
    if req.uri().path().starts_with("/v1/") {
        let mut res = openai::OpenAiError::from(refusal).into_response();
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        res
    } else {
        refusal.into_response()
    }
}

/// The token of `Authorization: Bearer <token>`, if any.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts requests by route and status and records their latency.
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!("fewstep_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("fewstep_http_request_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    res
}
