//! `POST /generate`: parse, validate, submit to the job system; wait for the result (or,
//! with `Prefer: respond-async`, answer 202 with the job's `Location`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;

use super::error::{ApiError, HttpError, Problem, ServeError};
use super::schema::{
    GenerateRequest, GenerateResponse, GeneratedOutput, JobStatus, Media, StageTimings,
};
use super::AppState;
use crate::engine::{
    validate, EngineError, JobCell, JobResult, Jobs, Stop, Submit, Validated, ValidationError,
};
use crate::media::OutputFormat;

/// How the client wants the result.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wanted {
    Json,
    Raw(OutputFormat),
}

/// Picks JSON or a raw media type from `Accept` (highest q wins; ties keep header order).
fn negotiate(headers: &HeaderMap) -> Result<Wanted, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Wanted::Json);
    };
    let mut best: Option<(f32, Wanted)> = None;
    let mut any = false;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let mt = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if mt.is_empty() {
            continue;
        }
        any = true;
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|v| v.parse::<f32>().ok())
            .unwrap_or(1.0);
        let wanted = match mt.as_str() {
            "application/json" | "*/*" | "application/*" => Some(Wanted::Json),
            other => OutputFormat::from_media_type(other).map(Wanted::Raw),
        };
        if let Some(w) = wanted {
            if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, w));
            }
        }
    }
    match best {
        Some((_, w)) => Ok(w),
        None if !any => Ok(Wanted::Json),
        None => Err(ServeError::NotAcceptable {
            accept: accept.to_string(),
        }
        .into()),
    }
}

/// The body as bytes, with a clear error when it is too large or unreadable.
pub fn body_bytes(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HttpError::BodyTooLarge {
                limit: state.config.max_body_bytes,
            }
            .into()
        } else {
            ApiError::bad_request("invalid_body", e.body_text())
        }
    })
}

/// Looks the model up and validates `req` against it.
pub fn validate_for(
    state: &AppState,
    model: Option<&str>,
    req: crate::engine::GenerationRequest,
) -> Result<Validated, ValidationError> {
    let name = model.unwrap_or(&state.default_model);
    let card = state
        .engine
        .card(name)
        .ok_or_else(|| ValidationError::UnknownModel {
            name: name.to_string(),
        })?;
    validate(req, &card, &state.config)
}

/// The submission options of a request: who asked, and whether the log keeps the media.
pub fn submit_options(state: &AppState, v: &Validated, headers: &HeaderMap) -> Submit {
    Submit {
        partials: 0,
        owner: super::caller::Caller::of(&state.config, headers).owner,
        keep_media: state
            .engine
            .card(&v.model)
            .is_some_and(|c| c.manifest.serving.keep_media),
    }
}

/// Cancels a synchronous job whose client went away (axum drops the handler's future).
struct CancelOnDrop<'a> {
    jobs: &'a Jobs,
    cell: Arc<JobCell>,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed && !self.cell.snapshot().state.is_finished() {
            let _ = self.jobs.stop(&self.cell.id, Stop::ClientGone);
        }
    }
}

/// Submits `v` and waits for its result, or its deadline. Hanging up cancels the job.
pub async fn run_sync(
    jobs: &Jobs,
    v: Validated,
    opts: Submit,
) -> Result<(String, Validated, Arc<JobResult>), ApiError> {
    let timeout = v.timeout;
    let cell = jobs.submit(v.clone(), opts)?.cell;
    let mut guard = CancelOnDrop {
        jobs,
        cell,
        armed: true,
    };
    let id = guard.cell.id.clone();
    match tokio::time::timeout(timeout, jobs.wait(&id)).await {
        Ok(result) => Ok((id, v, result?)),
        Err(_) => {
            // The worker expires the job at the same deadline.
            guard.armed = false;
            Err(EngineError::DeadlineExceeded.into())
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The JSON body of a finished generation (`POST /generate`, `GET /jobs/{id}`).
pub fn response_body(id: &str, v: &Validated, r: &JobResult) -> GenerateResponse {
    let b64 = base64::engine::general_purpose::STANDARD;
    let out = &r.output;
    GenerateResponse {
        id: id.to_string(),
        model: v.model.clone(),
        model_version: out.model_version.clone(),
        created: unix_now(),
        steps: v.steps as u32,
        guidance: v.guidance,
        batch_size: out.batch_size as u32,
        outputs: r
            .encoded
            .iter()
            .enumerate()
            .map(|(i, bytes)| GeneratedOutput {
                index: i as u32,
                seed: v.seeds[i],
                media_type: v.format.media_type().to_string(),
                data: b64.encode(bytes),
                width: v.width as u32,
                height: v.height as u32,
                num_frames: v.frames as u32,
            })
            .collect(),
        timings: StageTimings {
            queue_ms: out.queue_s * 1e3,
            text_encoding_ms: out.text_s * 1e3,
            denoising_ms: out.denoise_s * 1e3,
            decoding_ms: out.decode_s * 1e3,
            encoding_ms: r.encoding_s * 1e3,
            total_ms: r.total_s * 1e3,
        },
    }
}

/// Whether the client asked for an asynchronous answer (RFC 7240 `Prefer: respond-async`).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// Generate images or videos.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "generation",
    request_body = GenerateRequest,
    params(
        ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 at once and run the job in the background"),
    ),
    responses(
        (status = 200, description = "Generated media as base64 JSON; the raw bytes of the single output when `Accept` names a media type and n = 1",
            content(
                (GenerateResponse = "application/json"),
                (Media = "image/png"),
                (Media = "image/jpeg"),
                (Media = "image/webp"),
                (Media = "image/gif"),
                (Media = "image/apng"),
                (Media = "video/mp4"),
            ),
            headers(
                ("x-generation-id" = String, description = "The generation's id (for `/feedback`, `/generations/{id}` and `/jobs/{id}`)"),
                ("x-seed" = u64, description = "Raw responses: the output's seed"),
                ("x-model-version" = String, description = "Raw responses: the weights' content hash"),
            )),
        (status = 202, description = "Accepted (`Prefer: respond-async`): follow `Location`", body = JobStatus,
            headers(
                ("Location" = String, description = "`/jobs/{id}`"),
                ("x-generation-id" = String, description = "The job's id"),
            )),
        (status = 400, description = "Invalid request (see `code`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong API key", body = Problem, content_type = "application/problem+json"),
        (status = 406, description = "The `Accept` header names nothing the server can produce", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job was cancelled (`DELETE /jobs/{id}`) before it finished", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`queue_full` (the queue's count or work budget, pixels x frames x steps x n), `rate_limited` or `too_many_in_flight` (this API key's limits); retry after `Retry-After` seconds, from the measured drain rate", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying (1-60)"))),
        (status = 503, description = "`not_ready`, `draining` (shutting down), or `device_error` (the device failed on this request even alone)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying, when given"))),
        (status = 504, description = "The request's deadline passed", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, body)?;
    let req: GenerateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))?;
    let wanted = negotiate(&headers)?;
    let model = req.model.clone();
    let mut v = validate_for(&state, model.as_deref(), req.into())?;
    if let Wanted::Raw(fmt) = wanted {
        if v.n != 1 {
            return Err(ServeError::RawNeedsOneOutput.into());
        }
        if v.frames > 1 && !fmt.is_animated() {
            return Err(ServeError::NotAnimated {
                media_type: fmt.media_type(),
            }
            .into());
        }
        v.format = fmt;
    }
    let opts = submit_options(&state, &v, &headers);

    if prefers_async(&headers) {
        let cell = state.jobs.submit(v, opts)?.cell;
        let view = state
            .jobs
            .view(&cell.id)
            .ok_or_else(|| crate::engine::JobError::NotFound(cell.id.clone()))?;
        let mut res = (StatusCode::ACCEPTED, Json(JobStatus::from_view(&view))).into_response();
        let h = res.headers_mut();
        if let Ok(loc) = HeaderValue::from_str(&format!("/jobs/{}", cell.id)) {
            h.insert(header::LOCATION, loc);
        }
        h.insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
        if let Ok(val) = HeaderValue::from_str(&cell.id) {
            h.insert("x-generation-id", val);
        }
        return Ok(res);
    }

    let (id, v, result) = run_sync(&state.jobs, v, opts).await?;
    tracing::info!(
        id = %id, model = %v.model, n = v.n, frames = v.frames, steps = v.steps,
        batch = result.output.batch_size, total_ms = result.total_s * 1e3, "generated"
    );
    if let Wanted::Raw(fmt) = wanted {
        let mut res = result
            .encoded
            .first()
            .cloned()
            .unwrap_or_default()
            .into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(fmt.media_type()),
        );
        for (k, val) in [
            ("x-generation-id", id.clone()),
            ("x-model-version", result.output.model_version.clone()),
            ("x-seed", v.seed().to_string()),
            ("x-batch-size", result.output.batch_size.to_string()),
        ] {
            if let Ok(val) = HeaderValue::from_str(&val) {
                h.insert(k, val);
            }
        }
        return Ok(res);
    }
    let mut res = Json(response_body(&id, &v, &result)).into_response();
    if let Ok(val) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-generation-id", val);
    }
    Ok(res)
}
