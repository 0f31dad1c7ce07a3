//! Request and response bodies, documented for the OpenAPI spec.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::jobs::JobView;
use crate::engine::{GenerationRequest, JobState, Stage};
use crate::media::OutputFormat;

/// Raw media bytes (an image or a video file).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Media(pub Vec<u8>);

/// A Server-Sent Events body: as text (what an HTTP client reads), or one parsed event (its
/// name in `event`, its JSON payload as text in `data`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum SseEvent {
    Text(String),
    Event(ParsedSseEvent),
}

/// One parsed Server-Sent Event.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ParsedSseEvent {
    /// The event's name, e.g. `progress` or `completed`.
    pub event: Option<String>,
    /// The event's JSON payload.
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
}

/// A text-to-image (`num_frames` 1) or text-to-video (`num_frames` > 1) request.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "a small red circle on the left", "n": 2, "seed": 7}))]
pub struct GenerateRequest {
    /// What to draw.
    #[schema(example = "a red circle")]
    pub prompt: String,
    /// The unconditional branch of classifier-free guidance (only used when guidance > 1).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Model id from `GET /models`; the server's default when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// Number of outputs; output `i` uses seed `seed + i`.
    #[serde(default)]
    #[schema(minimum = 1, example = 1)]
    pub n: Option<u32>,
    /// One of the model's `sizes` (`GET /models`).
    #[serde(default)]
    #[schema(minimum = 1, example = 32)]
    pub width: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 1, example = 32)]
    pub height: Option<u32>,
    /// 1 for an image; more for a video (one of the model's `frames`).
    #[serde(default)]
    #[schema(minimum = 1, example = 1)]
    pub num_frames: Option<u32>,
    /// Network evaluations; one of the model's `allowed_steps` (`GET /models`): the limits
    /// are per model, so a value the schema allows can still be `invalid_steps`.
    #[serde(default)]
    #[schema(minimum = 1, example = 4)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; 1 disables CFG.
    #[serde(default)]
    pub guidance: Option<f32>,
    /// Seed of the first output, 0 to 2^63-1 (output `i` uses `seed + i`, which must stay
    /// in that range); random (below 2^53) when absent. The same seed gives the same image
    /// whatever else shares the batch (up to a rare one-level rounding difference).
    #[serde(default)]
    #[schema(example = 42, minimum = 0, maximum = 9223372036854775807_u64, format = Int64)]
    pub seed: Option<u64>,
    /// Media format: `png` (default for images), `jpeg`, `webp`; `gif` (default for
    /// videos) or `apng`.
    #[serde(default)]
    pub output_format: Option<OutputFormat>,
    /// Give up (504) if the request has not finished within this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl From<GenerateRequest> for GenerationRequest {
    fn from(r: GenerateRequest) -> Self {
        Self {
            prompt: r.prompt,
            negative_prompt: r.negative_prompt,
            n: r.n,
            width: r.width,
            height: r.height,
            num_frames: r.num_frames,
            steps: r.steps,
            guidance: r.guidance,
            seed: r.seed,
            output_format: r.output_format,
            timeout_ms: r.timeout_ms,
        }
    }
}

/// One generated image or video.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GeneratedOutput {
    pub index: u32,
    pub seed: u64,
    #[schema(example = "image/png")]
    pub media_type: String,
    /// Base64 (standard alphabet, padded) of the encoded media.
    pub data: String,
    pub width: u32,
    pub height: u32,
    pub num_frames: u32,
}

/// Wall-clock time of each stage, in milliseconds. Text encoding, denoising and decoding are
/// those of the whole batch the request ran in.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StageTimings {
    pub queue_ms: f64,
    pub text_encoding_ms: f64,
    pub denoising_ms: f64,
    pub decoding_ms: f64,
    pub encoding_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// Generation id (also in the `x-generation-id` header).
    pub id: String,
    pub model: String,
    /// Content hash of the weights that produced the outputs.
    pub model_version: String,
    /// Unix seconds.
    pub created: u64,
    pub steps: u32,
    pub guidance: f32,
    /// Rows in the lock-step batch the request ran in.
    pub batch_size: u32,
    pub outputs: Vec<GeneratedOutput>,
    pub timings: StageTimings,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

/// What a model can do.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelInfo {
    #[schema(example = "tiny-shapes")]
    pub id: String,
    pub family: String,
    pub description: String,
    /// `image`, and `video` when frames > 1 are allowed.
    pub kinds: Vec<String>,
    pub sizes: Vec<Size>,
    pub frames: Vec<u32>,
    /// `student` (few-step, re-noising), `ancestral` (Turbo models), or a multi-step
    /// teacher's `euler` or `unipc`.
    pub sampler: String,
    pub default_steps: u32,
    pub allowed_steps: Vec<u32>,
    pub default_guidance: f32,
    pub max_guidance: f32,
    pub max_batch: u32,
    /// Content hash of the weights being served.
    pub version: String,
    /// False while the model serves random weights.
    pub trained: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub default_model: String,
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Status {
    #[schema(example = "ok")]
    pub status: String,
}

/// An error as a job reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobFailure {
    pub code: String,
    pub message: String,
}

/// A job: its state, progress and, once completed, its result.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobStatus {
    #[schema(example = "gen_5f0c6a0d2b1e4c7a9d3e8f10")]
    pub id: String,
    pub state: JobState,
    pub model: String,
    /// `image` or `video`.
    pub kind: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<u64>,
    /// Unix seconds after which this server forgets the finished job (absent when the job
    /// comes from the generation log, which keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// 1-based place in the queue while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Denoising steps done, of `steps`.
    pub step: usize,
    pub steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// 0-100, never decreasing; 100 once completed.
    pub progress: u8,
    /// Seconds left, from the measured step times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// The outputs, once completed (the body `POST /generate` answers). From the generation
    /// log, only when the model keeps media (`keep_media`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<GenerateResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobFailure>,
}

impl JobStatus {
    pub fn from_view(v: &JobView) -> Self {
        let p = &v.progress;
        Self {
            id: v.id.clone(),
            state: p.state,
            model: v.request.model.clone(),
            kind: v.request.kind().to_string(),
            created: v.created,
            finished: v.finished,
            expires_at: v.expires_at,
            position: p.position,
            step: p.step,
            steps: p.steps,
            stage: p.stage,
            progress: p.percent,
            eta_s: p.eta_s,
            result: v
                .result
                .as_ref()
                .map(|r| super::generate::response_body(&v.id, &v.request, r)),
            error: v.error.as_ref().map(|e| {
                let api = super::error::ApiError::from(e.clone());
                JobFailure {
                    code: api.code.to_string(),
                    message: api.detail,
                }
            }),
        }
    }
}
