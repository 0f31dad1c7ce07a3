//! `POST /v1/images/generations` (openai-python's `images.generate`), with `stream: true`
//! sending each partial image (the sampler's intermediate x0 estimate) as it is made.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use utoipa::ToSchema;

use super::{parse_size, OpenAiError, OpenAiErrorBody};
use crate::api::generate::{body_bytes, run_sync, submit_options, validate_for};
use crate::api::jobs::channel_stream;
use crate::api::AppState;
use crate::engine::{GenerationRequest, JobEvent, JobState, Jobs, Submitted, Validated};
use crate::media::{self, OutputFormat};

/// openai-python's `ImageGenerateParams`, plus fewstep's `seed`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageGenerationRequest {
    #[schema(example = "a red circle")]
    pub prompt: String,
    /// A model id from `GET /v1/models`; the server's default when absent.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1, example = 1)]
    pub n: Option<u32>,
    /// `"WIDTHxHEIGHT"` (one of the model's sizes) or `"auto"`.
    #[serde(default)]
    #[schema(example = "32x32")]
    pub size: Option<String>,
    /// `b64_json` only: the server keeps no files to link to.
    #[serde(default)]
    pub response_format: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default)]
    pub output_format: Option<String>,
    /// 0-100; accepted for `jpeg` and `webp` (checked, not used: fewstep's encoders have one
    /// quality setting).
    #[serde(default)]
    pub output_compression: Option<u32>,
    /// `opaque` or `auto` (outputs are always opaque; `transparent` is refused).
    #[serde(default)]
    pub background: Option<String>,
    /// Student steps: `low` = the model's fewest allowed steps, `medium`/`standard`/`auto` =
    /// its default, `high`/`hd` = its most.
    #[serde(default)]
    pub quality: Option<String>,
    /// `auto` or `low` (accepted; there is no moderation model).
    #[serde(default)]
    pub moderation: Option<String>,
    /// An end-user id (accepted, not stored).
    #[serde(default)]
    pub user: Option<String>,
    /// Send Server-Sent Events: `image_generation.partial_image` then
    /// `image_generation.completed`.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Partial images to stream (0-3), spread over the denoising steps.
    #[serde(default)]
    pub partial_images: Option<u32>,
    /// fewstep: the seed of the first image (image `i` uses `seed + i`).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_u64, format = Int64)]
    pub seed: Option<u64>,
}

/// One image of `ImagesResponse.data`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiImage {
    pub b64_json: String,
}

/// openai-python's `ImagesResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<OpenAiImage>,
    pub output_format: String,
    pub size: String,
    pub quality: String,
    pub background: String,
}

/// What the request settles beyond the validated generation.
struct Look {
    size: String,
    quality: String,
    format: OutputFormat,
}

fn one_of(param: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), OpenAiError> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(OpenAiError::invalid(
            param,
            "invalid_value",
            format!("{param} must be one of {allowed:?}, got {v:?}"),
        )),
        _ => Ok(()),
    }
}

fn translate(
    state: &AppState,
    req: &ImageGenerationRequest,
) -> Result<(Validated, Look), OpenAiError> {
    match req.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(OpenAiError::invalid(
                "response_format",
                "unsupported_response_format",
                "response_format \"url\" is not supported: this server keeps no files to link to; use \"b64_json\"",
            ))
        }
        Some(other) => one_of("response_format", Some(other), &["b64_json"])?,
    }
    one_of("background", req.background.as_deref(), &["opaque", "auto"])?;
    one_of("moderation", req.moderation.as_deref(), &["auto", "low"])?;
    one_of(
        "quality",
        req.quality.as_deref(),
        &["auto", "low", "medium", "high", "standard", "hd"],
    )?;
    let format = match req.output_format.as_deref() {
        None | Some("png") => OutputFormat::Png,
        Some("jpeg") => OutputFormat::Jpeg,
        Some("webp") => OutputFormat::Webp,
        other => {
            one_of("output_format", other, &["png", "jpeg", "webp"])?;
            OutputFormat::Png
        }
    };
    if let Some(c) = req.output_compression {
        if c > 100 {
            return Err(OpenAiError::invalid(
                "output_compression",
                "invalid_value",
                format!("output_compression must be between 0 and 100, got {c}"),
            ));
        }
    }
    if let Some(p) = req.partial_images {
        if p > 3 {
            return Err(OpenAiError::invalid(
                "partial_images",
                "invalid_value",
                format!("partial_images must be between 0 and 3, got {p}"),
            ));
        }
    }
    let name = req.model.as_deref().unwrap_or(&state.default_model);
    let steps = state.engine.card(name).and_then(|card| {
        let s = &card.manifest.sampling;
        let steps = match req.quality.as_deref() {
            Some("low") => s.allowed_steps.iter().min().copied(),
            Some("high" | "hd") => s.allowed_steps.iter().max().copied(),
            _ => None,
        };
        steps.map(|v| v as u32)
    });
    let (width, height) = parse_size(req.size.as_deref())?;
    let v = validate_for(
        state,
        req.model.as_deref(),
        GenerationRequest {
            prompt: req.prompt.clone(),
            n: req.n,
            width,
            height,
            steps,
            seed: req.seed,
            output_format: Some(format),
            ..Default::default()
        },
    )?;
    let look = Look {
        size: format!("{}x{}", v.width, v.height),
        quality: req.quality.clone().unwrap_or_else(|| "auto".into()),
        format,
    };
    Ok((v, look))
}

/// Create images (OpenAI's `images.generate`).
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai", operation_id = "images_generate",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "The images as base64, or with `stream: true` an event stream of `image_generation.partial_image` and `image_generation.completed` events",
            content((ImagesResponse = "application/json"), (crate::api::schema::SseEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request (`error.param` names the field)", body = OpenAiErrorBody),
        (status = 429, description = "Queue full (the client raises `RateLimitError`)", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security((), ("bearer" = [])))]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let body = body_bytes(&state, body)?;
    let req: ImageGenerationRequest = serde_json::from_slice(&body).map_err(|e| {
        OpenAiError::invalid("body", "invalid_json", format!("invalid request body: {e}"))
    })?;
    let (v, look) = translate(&state, &req)?;
    let mut opts = submit_options(&state, &v, &headers);
    if req.stream.unwrap_or(false) {
        opts.partials = req.partial_images.unwrap_or(0) as usize;
        let submitted = state.jobs.submit(v, opts)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_events(state.jobs.clone(), submitted, look, tx));
        return Ok(Sse::new(channel_stream(rx))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (_, _, result) = run_sync(&state.jobs, v, opts).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(Json(ImagesResponse {
        created: crate::util::unix_ms() as u64 / 1000,
        data: result
            .encoded
            .iter()
            .map(|bytes| OpenAiImage {
                b64_json: b64.encode(bytes),
            })
            .collect(),
        output_format: look.format.name().into(),
        size: look.size,
        quality: look.quality,
        background: "opaque".into(),
    })
    .into_response())
}

fn image_event(kind: &str, look: &Look, b64_json: String, extra: serde_json::Value) -> Event {
    let mut data = serde_json::json!({
        "type": kind,
        "b64_json": b64_json,
        "created_at": crate::util::unix_ms() / 1000,
        "size": look.size,
        "quality": look.quality,
        "background": "opaque",
        "output_format": look.format.name(),
    });
    if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    Event::default()
        .event(kind)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(kind))
}

/// Relays a streaming job: partial images as they come, then every final image. A client
/// that hangs up cancels the job.
async fn stream_events(jobs: Jobs, submitted: Submitted, look: Look, tx: mpsc::Sender<Event>) {
    let Submitted { cell, mut events } = submitted;
    let b64 = base64::engine::general_purpose::STANDARD;
    let format = look.format;
    let usage = serde_json::json!({
        "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    });
    loop {
        let event = match events.recv().await {
            Ok(JobEvent::Partial { index, frames, .. }) => {
                let frames = Arc::clone(&frames);
                let encoded = tokio::task::spawn_blocking(move || {
                    frames
                        .iter()
                        .map(|f| media::encode(&f[..1], format, 1))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await;
                let Ok(Ok(images)) = encoded else { continue };
                for img in images {
                    let e = image_event(
                        "image_generation.partial_image",
                        &look,
                        b64.encode(img),
                        serde_json::json!({ "partial_image_index": index }),
                    );
                    if tx.send(e).await.is_err() {
                        let _ = jobs.stop(&cell.id, crate::engine::Stop::ClientGone);
                        return;
                    }
                }
                continue;
            }
            Ok(JobEvent::Finished(state)) => state,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                if tx.is_closed() {
                    let _ = jobs.stop(&cell.id, crate::engine::Stop::ClientGone);
                    return;
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match (event, jobs.wait(&cell.id).await) {
            (JobState::Completed, Ok(result)) => {
                for img in &result.encoded {
                    let e = image_event(
                        "image_generation.completed",
                        &look,
                        b64.encode(img),
                        serde_json::json!({ "usage": usage }),
                    );
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
            (_, Err(e)) => {
                let body = OpenAiError::from(e).body();
                let _ = tx
                    .send(
                        Event::default()
                            .event("error")
                            .json_data(body)
                            .unwrap_or_default(),
                    )
                    .await;
            }
            (_, Ok(_)) => {}
        }
        return;
    }
}
