//! The HTTP API: routes, authentication, metrics middleware and the OpenAPI document.

pub mod admin;
pub mod caller;
pub mod error;
pub mod feedback;
pub mod generate;
pub mod info;
pub mod jobs;
pub mod openai;
pub mod openapi;
pub mod playground;
pub mod schema;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::ServerConfig;
use crate::engine::{Engine, Jobs};
use error::{ApiError, HttpError};

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
    /// Canary rollouts: start, compare, promote, roll back.
    pub rollout: crate::rollout::Controller,
}

/// The whole application: public probes and the playground page, then everything else behind
/// the API keys.
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
        .route_layer(middleware::from_fn(require_json))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let admin = Router::new()
        .route("/admin/models/{id}/reload", post(admin::reload))
        .route("/admin/models/{id}/rollout", get(admin::rollout))
        .route("/admin/models/{id}/promote", post(admin::promote))
        .route("/admin/models/{id}/rollback", post(admin::rollback))
        .route("/admin/queue", get(admin::queue))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .route_layer(middleware::from_fn(require_json))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ));
    Router::new()
        .route("/health", get(info::health))
        .route("/ready", get(info::ready))
        .route("/metrics", get(info::metrics))
        // The page is public; the API calls it makes send the key typed into it.
        .route("/", get(playground::index))
        .route("/playground", get(playground::index))
        .route("/playground/{file}", get(playground::asset))
        .merge(protected)
        .merge(admin)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_header_bytes,
        ))
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
        // The admin token opens the API too (and sees every key's work).
        Some(t)
            if state.config.api_keys.iter().any(|k| constant_time_eq(k, t))
                || state
                    .config
                    .admin_token
                    .as_deref()
                    .is_some_and(|a| constant_time_eq(a, t)) =>
        {
            return next.run(req).await
        }
        Some(_) => ApiError::from(HttpError::InvalidApiKey),
        None => ApiError::from(HttpError::MissingApiKey),
    };
    refuse(req.uri().path(), refusal)
}

/// An error answered before any handler: in OpenAI's shape under `/v1`, as problem+json
/// everywhere else.
fn refuse(path: &str, e: ApiError) -> Response {
    if path == "/v1" || path.starts_with("/v1/") {
        let unauthorized = e.status == axum::http::StatusCode::UNAUTHORIZED;
        let mut res = openai::OpenAiError::from(e).into_response();
        if unauthorized {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        res
    } else {
        e.into_response()
    }
}

/// The token of `Authorization: Bearer <token>`, if any; the scheme is case-insensitive
/// (RFC 7235).
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// JSON routes refuse a body of any other type (415), and a body with no type at all. A
/// request without a body passes: its route decides whether a body is required.
async fn require_json(req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let headers = req.headers();
    let form_ok = takes_forms(req.uri().path());
    let refused = match headers.get(header::CONTENT_TYPE) {
        Some(v) if is_json(v.to_str().unwrap_or_default()) => None,
        Some(v) if form_ok && is_form(v.to_str().unwrap_or_default()) => None,
        Some(v) => Some(format!("{v:?}")),
        None if has_body(headers) => Some("none".to_string()),
        None => None,
    };
    match refused {
        Some(got) => refuse(
            req.uri().path(),
            HttpError::UnsupportedMediaType(got).into(),
        ),
        None => next.run(req).await,
    }
}

/// OpenAI's `POST /v1/videos` takes JSON or a multipart form.
fn takes_forms(path: &str) -> bool {
    path == "/v1/videos"
}

fn is_form(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("multipart/form-data")
}

/// `application/json` or `application/<anything>+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

fn has_body(headers: &axum::http::HeaderMap) -> bool {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    length.is_some_and(|n| n > 0) || headers.contains_key(header::TRANSFER_ENCODING)
}

/// 431 as problem+json for a request line and headers over `max_header_bytes` (hyper's own
/// limit sits above it, so most oversized requests get here rather than an empty 431).
async fn limit_header_bytes(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.max_header_bytes;
    let line = req.method().as_str().len() + req.uri().to_string().len() + "HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + ": \r\n".len())
        .sum();
    if line + headers > limit {
        return refuse(
            req.uri().path(),
            HttpError::HeadersTooLarge { limit }.into(),
        );
    }
    next.run(req).await
}

async fn not_found(uri: Uri) -> Response {
    refuse(
        uri.path(),
        HttpError::NotFound(uri.path().to_string()).into(),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let e = HttpError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    };
    refuse(uri.path(), e.into())
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
