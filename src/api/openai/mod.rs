//! The OpenAI-compatible front end under `/v1`, shaped after openai-python's types so the
//! official client works with only `base_url` changed. It translates to the same validated
//! request and job system as the native API; errors take OpenAI's `{error: {...}}` shape.

pub mod images;
pub mod models;
pub mod videos;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// The same stable code as the native API's problem `code`.
    pub code: Option<String>,
}

/// An error on a `/v1` route: the native error (status, code, `Retry-After`) in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct OpenAiError {
    pub api: ApiError,
    pub param: Option<String>,
}

impl OpenAiError {
    pub fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            api: ApiError::bad_request(code, message),
            param: Some(param.to_string()),
        }
    }

    pub fn body(&self) -> OpenAiErrorBody {
        let kind = match self.api.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.api.detail.clone(),
                kind: kind.to_string(),
                param: self.param.clone(),
                code: Some(self.api.code.to_string()),
            },
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(api: ApiError) -> Self {
        Self { api, param: None }
    }
}

impl From<crate::engine::EngineError> for OpenAiError {
    fn from(e: crate::engine::EngineError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::engine::JobError> for OpenAiError {
    fn from(e: crate::engine::JobError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::engine::ValidationError> for OpenAiError {
    fn from(e: crate::engine::ValidationError) -> Self {
        let param = e.param().map(str::to_string);
        Self {
            api: e.into(),
            param,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut res = (self.api.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.api.retry_after_s {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

/// Parses OpenAI's `"WxH"` (or `"auto"`: the model's default size).
pub fn parse_size(size: Option<&str>) -> Result<(Option<u32>, Option<u32>), OpenAiError> {
    let bad = |s: &str| {
        OpenAiError::invalid(
            "size",
            "invalid_size",
            format!("size must be \"WIDTHxHEIGHT\" or \"auto\", got {s:?}"),
        )
    };
    match size.map(str::trim) {
        None | Some("auto") => Ok((None, None)),
        Some(s) => {
            let (w, h) = s.split_once('x').ok_or_else(|| bad(s))?;
            let w = w.parse::<u32>().map_err(|_| bad(s))?;
            let h = h.parse::<u32>().map_err(|_| bad(s))?;
            Ok((Some(w), Some(h)))
        }
    }
}
