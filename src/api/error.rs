//! API errors as RFC 9457 `application/problem+json` with a stable machine-readable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::{EngineError, JobError, ValidationError};

/// Problem details. `code` is stable across releases; match on it, not on `detail`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:fewstep:error:invalid_steps",
    "title": "Bad Request",
    "status": 400,
    "code": "invalid_steps",
    "detail": "steps must be one of [1, 2, 3, 4] for model tiny-shapes, got 7"
}))]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub code: String,
    pub detail: String,
}

/// An error the API returns; `retry_after_s` adds a `Retry-After` header.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:fewstep:error:{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            code: self.code.to_string(),
            detail: self.detail.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after_s {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let detail = e.to_string();
        match e {
            EngineError::QueueFull { retry_after_s, .. } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", detail)
            },
            EngineError::CostBudgetFull { retry_after_s, .. } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", detail)
            },
            EngineError::RateLimited { retry_after_s } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail)
            },
            EngineError::TooManyInFlight { retry_after_s, .. } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_in_flight", detail)
            },
            EngineError::NotReady => Self {
                retry_after_s: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", detail)
            },
            EngineError::Draining => Self::new(StatusCode::SERVICE_UNAVAILABLE, "draining", detail),
            EngineError::UnknownModel(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_model", detail)
            }
            EngineError::DeadlineExceeded => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", detail)
            }
            EngineError::Generation(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "generation_failed",
                detail,
            ),
            EngineError::Reload(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "reload_refused", detail)
            }
            EngineError::ModelMismatch(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "model_mismatch", detail)
            }
            EngineError::Device(_) => Self {
                retry_after_s: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "device_error", detail)
            },
            EngineError::Cancelled => Self::new(StatusCode::CONFLICT, "job_cancelled", detail),
            EngineError::NoCanary(_) => Self::new(StatusCode::CONFLICT, "no_canary", detail),
        }
    }
}

/// Every validation failure is the client's: a 400 with the rule's code.
impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::bad_request(e.code(), e.to_string())
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let detail = e.to_string();
        match e {
            JobError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "job_not_found", detail),
            JobError::Finished { .. } => Self::new(StatusCode::CONFLICT, "job_finished", detail),
            JobError::Log(_) => ServeError::StoreUnavailable.into(),
        }
    }
}

impl From<crate::rollout::RolloutError> for ApiError {
    fn from(e: crate::rollout::RolloutError) -> Self {
        use crate::rollout::RolloutError;
        match e {
            RolloutError::InvalidShare(share) => ServeError::InvalidCanaryShare(share).into(),
            RolloutError::Engine(e) => e.into(),
            RolloutError::Store(e) => {
                tracing::warn!(error = %e, "rollout: the generation log failed");
                ServeError::StoreUnavailable.into()
            }
        }
    }
}

/// Errors of the HTTP layer itself (routing, headers, bodies), before any handler's rules.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpError {
    #[error("no route for {0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request line and headers exceed {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("expected `Content-Type: application/json`, got {0}")]
    UnsupportedMediaType(String),
    #[error("invalid request body: {0}")]
    InvalidJson(String),
    #[error("the body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("send `Authorization: Bearer <key>`")]
    MissingApiKey,
    #[error("the API key is not valid")]
    InvalidApiKey,
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> Self {
        let detail = e.to_string();
        let (status, code) = match e {
            HttpError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            HttpError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            HttpError::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            HttpError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            HttpError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            HttpError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            HttpError::MissingApiKey => (StatusCode::UNAUTHORIZED, "missing_api_key"),
            HttpError::InvalidApiKey => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
        };
        Self::new(status, code, detail)
    }
}

/// What a handler cannot serve once the request itself is valid: something missing or
/// switched off, or a representation it cannot produce.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    #[error("no model named {0:?}")]
    UnknownModel(String),
    #[error("no logged generation {0:?}")]
    UnknownGeneration(String),
    #[error("no video {0:?} (unknown, deleted, or expired)")]
    UnknownVideo(String),
    #[error("video {id} is {state}, not completed")]
    VideoNotReady { id: String, state: String },
    #[error("cannot produce any of {accept:?}; use application/json or an image type")]
    NotAcceptable { accept: String },
    #[error("raw media responses hold one output; ask for application/json when n > 1")]
    RawNeedsOneOutput,
    #[error("{media_type} cannot hold a video")]
    NotAnimated { media_type: &'static str },
    #[error("this server keeps no generation log (set `store_url`)")]
    LogDisabled,
    #[error("the generation log is unavailable; try again later")]
    StoreUnavailable,
    #[error("admin routes are disabled (set `admin_token`)")]
    AdminDisabled,
    #[error("admin routes need `Authorization: Bearer <admin token>`")]
    InvalidAdminToken,
    #[error("canary must be a share of traffic in (0, 1], got {0}")]
    InvalidCanaryShare(f64),
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let detail = e.to_string();
        let (status, code) = match e {
            ServeError::UnknownModel(_) => (StatusCode::NOT_FOUND, "unknown_model"),
            ServeError::UnknownGeneration(_) => (StatusCode::NOT_FOUND, "unknown_generation"),
            ServeError::UnknownVideo(_) => (StatusCode::NOT_FOUND, "video_not_found"),
            ServeError::VideoNotReady { .. } => (StatusCode::CONFLICT, "video_not_ready"),
            ServeError::NotAcceptable { .. }
            | ServeError::RawNeedsOneOutput
            | ServeError::NotAnimated { .. } => (StatusCode::NOT_ACCEPTABLE, "not_acceptable"),
            ServeError::LogDisabled => (StatusCode::NOT_FOUND, "log_disabled"),
            ServeError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ServeError::AdminDisabled => (StatusCode::NOT_FOUND, "admin_disabled"),
            ServeError::InvalidAdminToken => (StatusCode::UNAUTHORIZED, "invalid_admin_token"),
            ServeError::InvalidCanaryShare(_) => (StatusCode::BAD_REQUEST, "invalid_canary"),
        };
        Self::new(status, code, detail)
    }
}

impl From<crate::manifest::identity::CheckpointError> for ApiError {
    fn from(e: crate::manifest::identity::CheckpointError) -> Self {
        use crate::manifest::identity::CheckpointError;
        let code = match e {
            CheckpointError::Unavailable(_) => "checkpoint_unavailable",
            CheckpointError::TooLarge { .. } => "checkpoint_too_large",
        };
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, e.to_string())
    }
}
