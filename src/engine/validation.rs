//! Request validation, shared by every front end (native HTTP, OpenAI-compatible, CLI): one
//! request type in, one validated type out, and typed errors with a stable `code()`. How an
//! error maps to an HTTP status is the API's business (`api/error.rs`), not this module's.

use std::time::Duration;

use rand::Rng;

use super::ModelCard;
use crate::config::ServerConfig;
use crate::media::OutputFormat;

/// Largest seed a request may name (the spec's int64), so no output's seed wraps.
pub const MAX_SEED: u64 = i64::MAX as u64;

/// Largest seed handed out at random: 2^53, so JavaScript clients can echo it back exactly.
const MAX_RANDOM_SEED: u64 = 1 << 53;

/// What a front end asks for; `None` takes the model's or the server's default.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: Option<u32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub num_frames: Option<u32>,
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    pub output_format: Option<OutputFormat>,
    pub timeout_ms: Option<u64>,
}

/// A request that passed validation, with every default filled in and its seeds drawn. It is
/// logged with its job (JSON), so another replica can show the job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// The seed of each output: `seed + i`.
    pub seeds: Vec<u64>,
    pub format: OutputFormat,
    pub timeout: Duration,
}

impl Validated {
    /// The seed of the first output.
    pub fn seed(&self) -> u64 {
        self.seeds[0]
    }

    /// What it costs the queue (see [`super::work_cost`]); equals its job's cost.
    pub fn cost(&self) -> u64 {
        super::work_cost(self.width, self.height, self.frames, self.steps, self.n)
    }

    pub fn kind(&self) -> &'static str {
        if self.frames > 1 {
            "video"
        } else {
            "image"
        }
    }
}

/// Why a request was refused. Each variant carries the value and the limit it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("no model named {name:?}; see GET /models")]
    UnknownModel { name: String },
    #[error("prompt must not be empty")]
    EmptyPrompt,
    #[error("prompt has {chars} characters; the limit is {limit}")]
    PromptTooLong { chars: usize, limit: usize },
    #[error("negative_prompt has {chars} characters; the limit is {limit}")]
    NegativePromptTooLong { chars: usize, limit: usize },
    #[error("n must be between 1 and {max}, got {n}")]
    InvalidN { n: usize, max: usize },
    #[error("{width}x{height} is not a size of model {model}; allowed: {allowed}")]
    InvalidSize {
        width: usize,
        height: usize,
        model: String,
        allowed: String,
    },
    #[error("num_frames must be one of {allowed:?} for model {model}, got {frames}")]
    InvalidFrames {
        frames: usize,
        allowed: Vec<usize>,
        model: String,
    },
    #[error("steps must be one of {allowed:?} for model {model}, got {steps}")]
    InvalidSteps {
        steps: usize,
        allowed: Vec<usize>,
        model: String,
    },
    #[error("guidance must be between 0 and {max} for model {model}, got {guidance}")]
    InvalidGuidance {
        guidance: f32,
        max: f32,
        model: String,
    },
    #[error("{format} cannot hold a video; use gif, apng or mp4")]
    NotAnimated { format: &'static str },
    #[error("seed must be between 0 and {max} (seed + n - 1 included), got {seed}")]
    InvalidSeed { seed: u64, max: u64 },
    #[error("timeout_ms must be between 1 and {max}, got {timeout_ms}")]
    InvalidTimeout { timeout_ms: u64, max: u64 },
    #[error(
        "timeout_ms must be at least {least} for model {model} (its batching wait of \
         {max_wait_ms} ms plus {min_run_ms} ms to run), got {timeout_ms}"
    )]
    TimeoutBelowBatchingWait {
        timeout_ms: u64,
        least: u64,
        max_wait_ms: u64,
        min_run_ms: u64,
        model: String,
    },
}

impl ValidationError {
    /// Stable across releases; clients match on it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownModel { .. } => "unknown_model",
            Self::EmptyPrompt => "empty_prompt",
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::NegativePromptTooLong { .. } => "negative_prompt_too_long",
            Self::InvalidN { .. } => "invalid_n",
            Self::InvalidSize { .. } => "invalid_size",
            Self::InvalidFrames { .. } => "invalid_frames",
            Self::InvalidSteps { .. } => "invalid_steps",
            Self::InvalidGuidance { .. } => "invalid_guidance",
            Self::NotAnimated { .. } => "invalid_output_format",
            Self::InvalidSeed { .. } => "invalid_seed",
            Self::InvalidTimeout { .. } | Self::TimeoutBelowBatchingWait { .. } => {
                "invalid_timeout"
            }
        }
    }

    /// The request field at fault (OpenAI's `param`).
    pub fn param(&self) -> Option<&'static str> {
        Some(match self {
            Self::UnknownModel { .. } => "model",
            Self::EmptyPrompt | Self::PromptTooLong { .. } => "prompt",
            Self::NegativePromptTooLong { .. } => "negative_prompt",
            Self::InvalidN { .. } => "n",
            Self::InvalidSize { .. } => "size",
            Self::InvalidFrames { .. } => "num_frames",
            Self::InvalidSteps { .. } => "steps",
            Self::InvalidGuidance { .. } => "guidance",
            Self::NotAnimated { .. } => "output_format",
            Self::InvalidSeed { .. } => "seed",
            Self::InvalidTimeout { .. } | Self::TimeoutBelowBatchingWait { .. } => "timeout_ms",
        })
    }
}

/// Checks every field against the server limits and the model's capabilities, fills in the
/// defaults and draws the seeds (once, here, for every front end).
pub fn validate(
    req: GenerationRequest,
    card: &ModelCard,
    cfg: &ServerConfig,
) -> Result<Validated, ValidationError> {
    let m = &card.manifest;
    let prompt = req.prompt.trim().to_string();
    if prompt.is_empty() {
        return Err(ValidationError::EmptyPrompt);
    }
    let limit = cfg.max_prompt_chars;
    let chars = prompt.chars().count();
    if chars > limit {
        return Err(ValidationError::PromptTooLong { chars, limit });
    }
    let negative_prompt = req.negative_prompt.unwrap_or_default().trim().to_string();
    let chars = negative_prompt.chars().count();
    if chars > limit {
        return Err(ValidationError::NegativePromptTooLong { chars, limit });
    }
    let max = cfg.max_n.min(m.serving.max_batch);
    let n = req.n.unwrap_or(1) as usize;
    if n == 0 || n > max {
        return Err(ValidationError::InvalidN { n, max });
    }
    let [dw, dh] = m.serving.sizes[0];
    let width = req.width.map_or(dw, |v| v as usize);
    let height = req.height.map_or(dh, |v| v as usize);
    if !m.serving.sizes.contains(&[width, height]) {
        return Err(ValidationError::InvalidSize {
            width,
            height,
            model: m.name.clone(),
            allowed: m
                .serving
                .sizes
                .iter()
                .map(|[w, h]| format!("{w}x{h}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let frames = req.num_frames.unwrap_or(1) as usize;
    if !m.serving.frames.contains(&frames) {
        return Err(ValidationError::InvalidFrames {
            frames,
            allowed: m.serving.frames.clone(),
            model: m.name.clone(),
        });
    }
    let steps = req.steps.map_or(m.sampling.default_steps, |v| v as usize);
    if !m.sampling.allowed_steps.contains(&steps) {
        return Err(ValidationError::InvalidSteps {
            steps,
            allowed: m.sampling.allowed_steps.clone(),
            model: m.name.clone(),
        });
    }
    let guidance = req.guidance.unwrap_or(m.sampling.default_guidance);
    if !guidance.is_finite() || guidance < 0.0 || guidance > m.sampling.max_guidance {
        return Err(ValidationError::InvalidGuidance {
            guidance,
            max: m.sampling.max_guidance,
            model: m.name.clone(),
        });
    }
    let format = req.output_format.unwrap_or(if frames > 1 {
        OutputFormat::Gif
    } else {
        OutputFormat::Png
    });
    if frames > 1 && !format.is_animated() {
        return Err(ValidationError::NotAnimated {
            format: format.name(),
        });
    }
    let max = cfg.request_timeout_ms;
    let timeout_ms = req.timeout_ms.unwrap_or(max);
    if timeout_ms == 0 || timeout_ms > max {
        return Err(ValidationError::InvalidTimeout { timeout_ms, max });
    }
    // Below the batching wait plus the least run time, a request could only time out.
    let max_wait_ms = m.serving.max_wait_ms;
    let least = max_wait_ms.saturating_add(cfg.min_run_ms);
    if timeout_ms < least {
        return Err(ValidationError::TimeoutBelowBatchingWait {
            timeout_ms,
            least,
            max_wait_ms,
            min_run_ms: cfg.min_run_ms,
            model: m.name.clone(),
        });
    }
    let seed = req
        .seed
        .unwrap_or_else(|| rand::rng().random_range(0..MAX_RANDOM_SEED));
    if seed > MAX_SEED - (n as u64 - 1) {
        return Err(ValidationError::InvalidSeed {
            seed,
            max: MAX_SEED,
        });
    }
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
        seeds: (0..n as u64).map(|i| seed + i).collect(),
        format,
        timeout: Duration::from_millis(timeout_ms),
    })
}
