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
            EngineError::QueueFull { .. } => Self {
                retry_after_s: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", detail)
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
            EngineError::Cancelled => Self::new(StatusCode::CONFLICT, "job_cancelled", detail),
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
            JobError::Log(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the generation log is unavailable; try again later",
            ),
        }
    }
}
