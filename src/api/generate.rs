//! `POST /generate`: validate, queue on the engine, encode the media off the device thread.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use rand::Rng;
use tokio::sync::oneshot;

use super::error::{ApiError, Problem};
use super::schema::{GenerateRequest, GenerateResponse, GeneratedOutput, StageTimings};
use super::AppState;
use crate::engine::{BucketKey, Engine, EngineError, Job, JobOutput, ModelCard};
use crate::media::{self, OutputFormat};

/// Largest seed handed out at random: 2^53, so JavaScript clients can echo it back exactly.
const MAX_RANDOM_SEED: u64 = 1 << 53;

/// A request that passed validation, with every default filled in.
#[derive(Debug, Clone)]
pub struct Validated {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub n: usize,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub format: OutputFormat,
    pub timeout: Duration,
}

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
        None => Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            format!("cannot produce any of {accept:?}; use application/json or an image type"),
        )),
    }
}

/// Checks every field against the server limits and the model's capabilities.
pub fn validate(
    req: GenerateRequest,
    card: &ModelCard,
    cfg: &crate::config::ServerConfig,
) -> Result<Validated, ApiError> {
    let m = &card.manifest;
    let prompt = req.prompt.trim().to_string();
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "empty_prompt",
            "prompt must not be empty",
        ));
    }
    let chars = prompt.chars().count();
    if chars > cfg.max_prompt_chars {
        return Err(ApiError::bad_request(
            "prompt_too_long",
            format!(
                "prompt has {chars} characters; the limit is {}",
                cfg.max_prompt_chars
            ),
        ));
    }
    let negative_prompt = req.negative_prompt.unwrap_or_default().trim().to_string();
    if negative_prompt.chars().count() > cfg.max_prompt_chars {
        return Err(ApiError::bad_request(
            "negative_prompt_too_long",
            format!(
                "negative_prompt exceeds {} characters",
                cfg.max_prompt_chars
            ),
        ));
    }
    let max_n = cfg.max_n.min(m.serving.max_batch);
    let n = req.n.unwrap_or(1) as usize;
    if n == 0 || n > max_n {
        return Err(ApiError::bad_request(
            "invalid_n",
            format!("n must be between 1 and {max_n}, got {n}"),
        ));
    }
    let [dw, dh] = m.serving.sizes[0];
    let width = req.width.map_or(dw, |v| v as usize);
    let height = req.height.map_or(dh, |v| v as usize);
    if !m.serving.sizes.contains(&[width, height]) {
        return Err(ApiError::bad_request(
            "invalid_size",
            format!(
                "{width}x{height} is not a size of model {}; allowed: {}",
                m.name,
                m.serving
                    .sizes
                    .iter()
                    .map(|[w, h]| format!("{w}x{h}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let frames = req.num_frames.unwrap_or(1) as usize;
    if !m.serving.frames.contains(&frames) {
        return Err(ApiError::bad_request(
            "invalid_frames",
            format!(
                "num_frames must be one of {:?} for model {}, got {frames}",
                m.serving.frames, m.name
            ),
        ));
    }
    let steps = req.steps.map_or(m.sampling.default_steps, |v| v as usize);
    if !m.sampling.allowed_steps.contains(&steps) {
        return Err(ApiError::bad_request(
            "invalid_steps",
            format!(
                "steps must be one of {:?} for model {}, got {steps}",
                m.sampling.allowed_steps, m.name
            ),
        ));
    }
    let guidance = req.guidance.unwrap_or(m.sampling.default_guidance);
    if !guidance.is_finite() || guidance < 0.0 || guidance > m.sampling.max_guidance {
        return Err(ApiError::bad_request(
            "invalid_guidance",
            format!(
                "guidance must be between 0 and {} for model {}, got {guidance}",
                m.sampling.max_guidance, m.name
            ),
        ));
    }
    let format = req.output_format.unwrap_or(if frames > 1 {
        OutputFormat::Gif
    } else {
        OutputFormat::Png
    });
    if frames > 1 && !format.is_animated() {
        return Err(ApiError::bad_request(
            "invalid_output_format",
            format!("{} cannot hold a video; use gif or apng", format.name()),
        ));
    }
    let max_timeout = cfg.request_timeout_ms;
    let timeout_ms = req.timeout_ms.unwrap_or(max_timeout);
    if timeout_ms == 0 || timeout_ms > max_timeout {
        return Err(ApiError::bad_request(
            "invalid_timeout",
            format!("timeout_ms must be between 1 and {max_timeout}, got {timeout_ms}"),
        ));
    }
    let seed = req
        .seed
        .unwrap_or_else(|| rand::rng().random_range(0..MAX_RANDOM_SEED));
    Ok(Validated {
        model: m.name.clone(),
        prompt,
        negative_prompt,
        n,
        width,
        height,
        frames,
        steps,
        guidance,
        seed,
        format,
        timeout: Duration::from_millis(timeout_ms),
    })
}

fn new_id() -> String {
    let v: u128 = rand::rng().random();
    format!("gen_{:024x}", v >> 32)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Queues one validated request and waits for its outputs (or its deadline). Returns the
/// generation id with the outputs.
pub async fn run_job(engine: &Engine, v: &Validated) -> Result<(String, JobOutput), ApiError> {
    let id = new_id();
    let (reply, rx) = oneshot::channel();
    let now = Instant::now();
    let job = Job {
        id: id.clone(),
        key: BucketKey {
            model: v.model.clone(),
            width: v.width,
            height: v.height,
            frames: v.frames,
            steps: v.steps,
            guidance_bits: v.guidance.to_bits(),
        },
        prompt: v.prompt.clone(),
        negative_prompt: v.negative_prompt.clone(),
        seeds: (0..v.n as u64).map(|i| v.seed.wrapping_add(i)).collect(),
        enqueued: now,
        deadline: now + v.timeout,
        reply,
    };
    engine.submit(job)?;
    // If the client disconnects, axum drops this future and with it `rx`: the worker sees the
    // closed channel and skips the job.
    match tokio::time::timeout(v.timeout, rx).await {
        Ok(Ok(result)) => Ok((id, result?)),
        Ok(Err(_)) => Err(EngineError::Draining.into()),
        Err(_) => Err(EngineError::DeadlineExceeded.into()),
    }
}

/// The log row of a finished request (never holds the API key itself, only a hash prefix).
fn log_record(
    id: &str,
    v: &Validated,
    out: &JobOutput,
    headers: &HeaderMap,
    total_s: f64,
    encoding_s: f64,
    kept: Option<&Vec<Vec<u8>>>,
) -> crate::store::GenerationRecord {
    let b64 = base64::engine::general_purpose::STANDARD;
    let api_key_id = super::bearer_token(headers)
        .map(|k| crate::util::sha256_hex(k.as_bytes())[..12].to_string());
    crate::store::GenerationRecord {
        id: id.to_string(),
        created_ms: crate::util::unix_ms(),
        model: v.model.clone(),
        model_version: out.model_version.clone(),
        prompt: v.prompt.clone(),
        negative_prompt: v.negative_prompt.clone(),
        kind: if v.frames > 1 { "video" } else { "image" }.into(),
        width: v.width as i64,
        height: v.height as i64,
        frames: v.frames as i64,
        steps: v.steps as i64,
        guidance: v.guidance as f64,
        seeds: (0..v.n as u64).map(|i| v.seed.wrapping_add(i)).collect(),
        batch_size: out.batch_size as i64,
        timings: serde_json::json!({
            "queue_ms": out.queue_s * 1e3,
            "text_encoding_ms": out.text_s * 1e3,
            "denoising_ms": out.denoise_s * 1e3,
            "decoding_ms": out.decode_s * 1e3,
            "encoding_ms": encoding_s * 1e3,
            "total_ms": total_s * 1e3,
        }),
        api_key_id,
        outputs: kept
            .map(|enc| {
                enc.iter()
                    .enumerate()
                    .map(|(i, bytes)| crate::store::StoredOutput {
                        index: i as i64,
                        media_type: v.format.media_type().to_string(),
                        data: b64.encode(bytes),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Generate images or videos.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "generation",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated media as base64 JSON; raw bytes (image/png, image/jpeg, image/webp, image/gif, image/apng) when `Accept` asks for one and n = 1", body = GenerateResponse),
        (status = 400, description = "Invalid request (see `code`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong API key", body = Problem, content_type = "application/problem+json"),
        (status = 406, description = "The `Accept` header names nothing the server can produce", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Queue full; retry after `Retry-After` seconds", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not ready or shutting down", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The request's deadline passed", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {} bytes", state.config.max_body_bytes),
            )
        } else {
            ApiError::bad_request("invalid_body", e.body_text())
        }
    })?;
    let req: GenerateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))?;
    let wanted = negotiate(&headers)?;
    let model_name = req
        .model
        .clone()
        .unwrap_or_else(|| state.default_model.clone());
    let card = state.engine.card(&model_name).ok_or_else(|| {
        ApiError::bad_request(
            "unknown_model",
            format!("no model named {model_name:?}; see GET /v1/models"),
        )
    })?;
    let mut v = validate(req, &card, &state.config)?;
    if let Wanted::Raw(fmt) = wanted {
        if v.n != 1 {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "not_acceptable",
                "raw media responses hold one output; ask for application/json when n > 1",
            ));
        }
        if v.frames > 1 && !fmt.is_animated() {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "not_acceptable",
                format!("{} cannot hold a video", fmt.media_type()),
            ));
        }
        v.format = fmt;
    }

    let (id, out) = run_job(&state.engine, &v).await?;

    let enc_start = Instant::now();
    let fps = state.config.video_fps;
    let format = v.format;
    let frames_out = out.outputs.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        frames_out
            .iter()
            .map(|f| media::encode(f, format, fps))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding_failed",
            e.to_string(),
        )
    })?
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding_failed",
            e.to_string(),
        )
    })?;
    let encoding_s = enc_start.elapsed().as_secs_f64();
    metrics::histogram!("fewstep_stage_seconds", "stage" => "encoding").record(encoding_s);
    metrics::histogram!("fewstep_stage_seconds", "stage" => "queue").record(out.queue_s);
    let kind = if v.frames > 1 { "video" } else { "image" };
    metrics::counter!("fewstep_outputs_generated_total", "kind" => kind).increment(v.n as u64);
    let total_s = start.elapsed().as_secs_f64();
    metrics::histogram!("fewstep_stage_seconds", "stage" => "total").record(total_s);
    tracing::info!(
        id = %id, model = %v.model, n = v.n, frames = v.frames, steps = v.steps,
        batch = out.batch_size, total_ms = total_s * 1e3, "generated"
    );

    if let Some(log) = &state.log {
        let keep = card.manifest.serving.keep_media;
        log.log(log_record(
            &id,
            &v,
            &out,
            &headers,
            total_s,
            encoding_s,
            keep.then_some(&encoded),
        ));
    }

    if let Wanted::Raw(fmt) = wanted {
        let mut res = encoded
            .into_iter()
            .next()
            .unwrap_or_default()
            .into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(fmt.media_type()),
        );
        for (k, val) in [
            ("x-generation-id", id.clone()),
            ("x-model-version", out.model_version.clone()),
            ("x-seed", v.seed.to_string()),
            ("x-batch-size", out.batch_size.to_string()),
        ] {
            if let Ok(val) = HeaderValue::from_str(&val) {
                h.insert(k, val);
            }
        }
        return Ok(res);
    }

    let b64 = base64::engine::general_purpose::STANDARD;
    let outputs = encoded
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| GeneratedOutput {
            index: i as u32,
            seed: v.seed.wrapping_add(i as u64),
            media_type: v.format.media_type().to_string(),
            data: b64.encode(bytes),
            width: v.width as u32,
            height: v.height as u32,
            num_frames: v.frames as u32,
        })
        .collect();
    let body = GenerateResponse {
        id: id.clone(),
        model: v.model,
        model_version: out.model_version,
        created: unix_now(),
        steps: v.steps as u32,
        guidance: v.guidance,
        batch_size: out.batch_size as u32,
        outputs,
        timings: StageTimings {
            queue_ms: out.queue_s * 1e3,
            text_encoding_ms: out.text_s * 1e3,
            denoising_ms: out.denoise_s * 1e3,
            decoding_ms: out.decode_s * 1e3,
            encoding_ms: encoding_s * 1e3,
            total_ms: total_s * 1e3,
        },
    };
    let mut res = Json(body).into_response();
    if let Ok(val) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-generation-id", val);
    }
    Ok(res)
}
