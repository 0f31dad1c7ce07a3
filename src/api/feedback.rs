//! `POST /feedback` and `GET /generations/{id}`: what users thought of what they got, tied
//! to the logged generation (the input of `fewstep distill --from-log`).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::caller::Caller;
use super::error::{ApiError, Problem, ServeError};
use super::AppState;
use crate::store::{FeedbackRecord, LogWriter, StoreError};

/// Longest accepted feedback comment, in characters.
const MAX_COMMENT_CHARS: usize = 2000;
/// How long feedback waits for a just-finished generation's log row.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Thumbs {
    Up,
    Down,
}

/// A rating of one output of a generation: a `score` in [0, 1], `thumbs`, or both (the
/// score is then the rating and the thumbs are kept beside it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"generation_id": "gen_0123456789abcdef01234567", "output_index": 0, "score": 0.8}))]
pub struct FeedbackRequest {
    pub generation_id: String,
    /// Which output of the generation (default 0).
    pub output_index: Option<u32>,
    /// Rating in [0, 1], higher is better.
    pub score: Option<f64>,
    /// Thumbs up (= 1) or down (= 0).
    pub thumbs: Option<Thumbs>,
    /// Free text, at most 2000 characters.
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Feedback {
    pub id: String,
    pub generation_id: String,
    pub output_index: u32,
    pub score: f64,
    pub thumbs: Option<Thumbs>,
    pub comment: Option<String>,
    /// Unix milliseconds.
    pub created_ms: i64,
}

/// A logged generation, its parameters, and the feedback it received.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Generation {
    pub id: String,
    /// Unix milliseconds.
    pub created_ms: i64,
    pub model: String,
    pub model_version: String,
    pub prompt: String,
    pub negative_prompt: String,
    /// `image` or `video`.
    pub kind: String,
    pub width: u32,
    pub height: u32,
    pub num_frames: u32,
    pub steps: u32,
    pub guidance: f64,
    /// Seed of each output.
    pub seeds: Vec<u64>,
    pub batch_size: u32,
    /// Stage timings in milliseconds.
    #[schema(value_type = Object)]
    pub timings: serde_json::Value,
    /// Outputs whose media the server kept (media type per index).
    pub kept_outputs: Vec<u32>,
    pub feedback: Vec<Feedback>,
}

fn store_error(e: StoreError) -> ServeError {
    tracing::warn!(error = %e, "store unavailable");
    ServeError::StoreUnavailable
}

fn log(state: &AppState) -> Result<&LogWriter, ServeError> {
    state.log.as_ref().ok_or(ServeError::LogDisabled)
}

fn unknown_generation(id: &str) -> ServeError {
    ServeError::UnknownGeneration(id.to_string())
}

fn to_feedback(f: FeedbackRecord) -> Feedback {
    Feedback {
        id: f.id,
        generation_id: f.generation_id,
        output_index: f.output_index as u32,
        score: f.score,
        thumbs: match f.thumbs.as_deref() {
            Some("up") => Some(Thumbs::Up),
            Some("down") => Some(Thumbs::Down),
            _ => None,
        },
        comment: f.comment,
        created_ms: f.created_ms,
    }
}

/// Rate one output of a generation.
#[utoipa::path(
    post,
    path = "/feedback",
    tag = "feedback",
    request_body = FeedbackRequest,
    responses(
        (status = 201, description = "Recorded", body = Feedback),
        (status = 400, description = "Invalid feedback (see `code`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown generation, or no log on this server", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The log store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn feedback(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<FeedbackRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Feedback>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request("invalid_json", e.body_text()))?;
    // Both may come (the schema allows it): the score is the rating, the thumbs are kept.
    let score = match (req.score, req.thumbs) {
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_feedback",
                "send a score in [0, 1] or thumbs (up or down)",
            ))
        }
        (Some(s), _) if !(0.0..=1.0).contains(&s) => {
            return Err(ApiError::bad_request(
                "invalid_score",
                format!("score must be in [0, 1], got {s}"),
            ))
        }
        (Some(s), _) => s,
        (None, Some(Thumbs::Up)) => 1.0,
        (None, Some(Thumbs::Down)) => 0.0,
    };
    let comment = req
        .comment
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty());
    if comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
    {
        return Err(ApiError::bad_request(
            "comment_too_long",
            format!("comment exceeds {MAX_COMMENT_CHARS} characters"),
        ));
    }
    let log = log(&state)?;
    log.settle(&req.generation_id, SETTLE).await;
    let generation = log
        .store
        .generation(&req.generation_id)
        .await
        .map_err(store_error)?
        .filter(|g| caller.may_see(g.api_key_id.as_deref()))
        .ok_or_else(|| unknown_generation(&req.generation_id))?;
    let index = req.output_index.unwrap_or(0);
    if index as usize >= generation.seeds.len() {
        return Err(ApiError::bad_request(
            "invalid_output_index",
            format!(
                "generation {} has {} output(s); output_index {index} does not exist",
                generation.id,
                generation.seeds.len()
            ),
        ));
    }
    let record = FeedbackRecord {
        id: format!("fb_{:024x}", rand::rng().random::<u128>() >> 32),
        generation_id: generation.id,
        output_index: index as i64,
        score,
        thumbs: req.thumbs.map(|t| match t {
            Thumbs::Up => "up".to_string(),
            Thumbs::Down => "down".to_string(),
        }),
        comment,
        created_ms: crate::util::unix_ms(),
    };
    log.store
        .insert_feedback(&record)
        .await
        .map_err(store_error)?;
    metrics::counter!("fewstep_feedback_total").increment(1);
    Ok((StatusCode::CREATED, Json(to_feedback(record))))
}

/// A logged generation with its feedback.
#[utoipa::path(
    get,
    path = "/generations/{id}",
    tag = "feedback",
    params(("id" = String, Path, description = "Generation id from `POST /generate`")),
    responses(
        (status = 200, description = "The generation", body = Generation),
        (status = 401, description = "Missing or wrong API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown generation, or no log on this server", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The log store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn generation(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Generation>, ApiError> {
    let log = log(&state)?;
    log.settle(&id, SETTLE).await;
    let g = log
        .store
        .generation(&id)
        .await
        .map_err(store_error)?
        .filter(|g| caller.may_see(g.api_key_id.as_deref()))
        .ok_or_else(|| unknown_generation(&id))?;
    let feedback = log.store.feedback_for(&id).await.map_err(store_error)?;
    Ok(Json(Generation {
        kept_outputs: g.outputs.iter().map(|o| o.index as u32).collect(),
        id: g.id,
        created_ms: g.created_ms,
        model: g.model,
        model_version: g.model_version,
        prompt: g.prompt,
        negative_prompt: g.negative_prompt,
        kind: g.kind,
        width: g.width as u32,
        height: g.height as u32,
        num_frames: g.frames as u32,
        steps: g.steps as u32,
        guidance: g.guidance,
        seeds: g.seeds,
        batch_size: g.batch_size as u32,
        timings: g.timings,
        feedback: feedback.into_iter().map(to_feedback).collect(),
    }))
}
