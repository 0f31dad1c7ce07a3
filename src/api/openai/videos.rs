//! OpenAI's asynchronous videos (openai-python's `videos.*`): create a job, poll it, download
//! the MP4 or a PNG thumbnail, list, delete. `seconds` maps to frames at `video_fps`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{parse_size, OpenAiError, OpenAiErrorBody};
use crate::api::caller::Caller;
use crate::api::error::{ApiError, ServeError};
use crate::api::generate::{submit_options, validate_for};
use crate::api::AppState;
use crate::engine::{GenerationRequest, JobError, JobState, JobView};
use crate::media::OutputFormat;

/// openai-python's `VideoCreateParams` (JSON or multipart form), plus fewstep's `seed`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoCreateRequest {
    #[schema(example = "a red circle moving right")]
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    /// Whole seconds, as a string: the model's frame count of `seconds x video_fps` frames,
    /// or of one more (a 4k+1 grid counts both ends: 81 frames at 16 fps are 5 s). The
    /// model's shortest video when absent.
    #[serde(default)]
    #[schema(example = "1")]
    pub seconds: Option<String>,
    /// `"WIDTHxHEIGHT"`.
    #[serde(default)]
    #[schema(example = "32x32")]
    pub size: Option<String>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_u64, format = Int64)]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VideoError {
    pub code: String,
    pub message: String,
}

/// openai-python's `Video`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Video {
    pub id: String,
    /// Always `video`.
    pub object: String,
    pub model: String,
    /// `queued`, `in_progress`, `completed` or `failed` (a cancelled video is `failed` with
    /// code `job_cancelled`).
    pub status: String,
    /// 0-100.
    pub progress: u8,
    pub created_at: u64,
    pub completed_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub error: Option<VideoError>,
    pub prompt: String,
    pub remixed_from_video_id: Option<String>,
    pub seconds: String,
    pub size: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VideoList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Video>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VideoDeleted {
    pub id: String,
    /// Always `video.deleted`.
    pub object: String,
    pub deleted: bool,
}

fn video(v: &JobView, fps: u32) -> Video {
    let status = match v.progress.state {
        JobState::Queued => "queued",
        JobState::InProgress => "in_progress",
        JobState::Completed => "completed",
        JobState::Failed | JobState::Cancelled => "failed",
    };
    let frames = v.request.frames as u32;
    Video {
        id: v.id.clone(),
        object: "video".into(),
        model: v.request.model.clone(),
        status: status.into(),
        progress: v.progress.percent,
        created_at: v.created,
        completed_at: v
            .finished
            .filter(|_| v.progress.state == JobState::Completed),
        expires_at: v.expires_at,
        error: v.error.as_ref().map(|e| {
            let api = ApiError::from(e.clone());
            VideoError {
                code: api.code.into(),
                message: api.detail,
            }
        }),
        prompt: v.request.prompt.clone(),
        remixed_from_video_id: None,
        seconds: if let Some(n) = whole_seconds(frames as usize, fps) {
            n.to_string()
        } else {
            format!("{:.3}", frames as f64 / fps as f64)
        },
        size: format!("{}x{}", v.request.width, v.request.height),
    }
}

/// The form or JSON body of `POST /v1/videos`.
async fn read_request(state: &AppState, req: Request) -> Result<VideoCreateRequest, OpenAiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let bad = |m: String| OpenAiError::invalid("body", "invalid_body", m);
    if !multipart {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| bad(e.body_text()))?;
        return serde_json::from_slice(&body).map_err(|e| {
            OpenAiError::invalid("body", "invalid_json", format!("invalid request body: {e}"))
        });
    }
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|e| bad(e.body_text()))?;
    let mut fields: HashMap<String, String> = HashMap::new();
    while let Some(field) = form.next_field().await.map_err(|e| bad(e.body_text()))? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "input_reference" {
            return Err(OpenAiError::invalid(
                "input_reference",
                "unsupported_parameter",
                "input_reference is not supported: the models are text-to-video only",
            ));
        }
        let text = field.text().await.map_err(|e| bad(e.body_text()))?;
        fields.insert(name, text);
    }
    // Through JSON, so the form gets the same field checks as a JSON body.
    let mut obj = serde_json::Map::new();
    for (k, v) in fields {
        let value = match k.as_str() {
            "seed" => v.parse::<u64>().map(serde_json::Value::from).map_err(|_| {
                OpenAiError::invalid("seed", "invalid_value", "seed must be an integer")
            })?,
            _ => serde_json::Value::from(v),
        };
        obj.insert(k, value);
    }
    serde_json::from_value(serde_json::Value::Object(obj))
        .map_err(|e| OpenAiError::invalid("body", "invalid_body", format!("invalid form: {e}")))
}

/// The whole seconds a clip of `frames` lasts at `fps`: `n fps` frames, or `n fps + 1` (the
/// `4k+1` grids of video VAEs: Wan's 81 frames at 16 fps are its 5 s, both ends included).
fn whole_seconds(frames: usize, fps: u32) -> Option<usize> {
    let fps = fps as usize;
    if frames.is_multiple_of(fps) {
        Some(frames / fps)
    } else if frames > fps && (frames - 1).is_multiple_of(fps) {
        Some((frames - 1) / fps)
    } else {
        None
    }
}

/// Frames for `seconds` at `fps`: the model's video length that lasts that many seconds.
fn frames_for(seconds: Option<&str>, allowed: &[usize], fps: u32) -> Result<u32, OpenAiError> {
    let videos: Vec<usize> = allowed.iter().copied().filter(|&f| f > 1).collect();
    let choices: Vec<String> = videos
        .iter()
        .filter_map(|&f| whole_seconds(f, fps))
        .map(|n| n.to_string())
        .collect();
    let Some(s) = seconds else {
        return videos.first().map(|&f| f as u32).ok_or_else(|| {
            OpenAiError::invalid("model", "invalid_model", "this model makes no videos")
        });
    };
    let frames = s.trim().parse::<usize>().ok().and_then(|n| {
        videos
            .iter()
            .copied()
            .find(|&f| n > 0 && whole_seconds(f, fps) == Some(n))
            .map(|f| f as u32)
    });
    frames.ok_or_else(|| {
        OpenAiError::invalid(
            "seconds",
            "invalid_seconds",
            format!("seconds must be one of {choices:?} for this model (at {fps} fps), got {s:?}"),
        )
    })
}

/// Start a video job (OpenAI's `videos.create`).
#[utoipa::path(post, path = "/v1/videos", tag = "openai", operation_id = "videos_create",
    request_body(content(
        (VideoCreateRequest = "application/json"),
        (VideoCreateRequest = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "The queued video job", body = Video),
        (status = 400, description = "Invalid request", body = OpenAiErrorBody),
        (status = 429, description = "Queue full", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security((), ("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
) -> Result<Json<Video>, OpenAiError> {
    let body = read_request(&state, req).await?;
    let fps = state.config.video_fps;
    let name = body.model.as_deref().unwrap_or(&state.default_model);
    let allowed = state
        .engine
        .card(name)
        .map(|c| c.manifest.serving.frames.clone())
        .unwrap_or_default();
    let frames = if allowed.is_empty() {
        None // validation reports the unknown model
    } else {
        Some(frames_for(body.seconds.as_deref(), &allowed, fps)?)
    };
    let (width, height) = parse_size(body.size.as_deref())?;
    let v = validate_for(
        &state,
        body.model.as_deref(),
        GenerationRequest {
            prompt: body.prompt,
            num_frames: frames,
            width,
            height,
            seed: body.seed,
            output_format: Some(OutputFormat::Mp4),
            ..Default::default()
        },
    )?;
    let opts = submit_options(&state, &v, &headers);
    let id = state.jobs.submit(v, opts)?.cell.id.clone();
    let view = state.jobs.view(&id).ok_or(JobError::NotFound(id))?;
    Ok(Json(video(&view, fps)))
}

/// The video job, from this replica or the log.
async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<JobView, OpenAiError> {
    state
        .jobs
        .find(id)
        .await?
        .filter(|v| v.request.frames > 1 && caller.may_see(v.owner.as_deref()))
        .ok_or_else(|| OpenAiError::from(ApiError::from(ServeError::UnknownVideo(id.to_string()))))
}

/// A video job's status and integer progress (OpenAI's `videos.retrieve`).
#[utoipa::path(get, path = "/v1/videos/{id}", tag = "openai", operation_id = "videos_retrieve",
    params(("id" = String, Path, description = "The video id")),
    responses(
        (status = 200, description = "The video", body = Video),
        (status = 404, description = "Unknown, deleted or expired", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Video>, OpenAiError> {
    Ok(Json(video(
        &find(&state, &caller, &id).await?,
        state.config.video_fps,
    )))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many (default 20).
    pub limit: Option<usize>,
    /// `desc` (newest first, default) or `asc`.
    pub order: Option<String>,
    /// Start after this video id.
    pub after: Option<String>,
}

/// The kept video jobs (OpenAI's `videos.list`).
#[utoipa::path(get, path = "/v1/videos", tag = "openai", operation_id = "videos_list", params(ListQuery),
    responses(
        (status = 200, description = "Videos", body = VideoList),
        (status = 400, description = "A query parameter is not valid (`limit` is a count)", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<VideoList>, OpenAiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let fps = state.config.video_fps;
    let mut all: Vec<Video> = state
        .jobs
        .list()
        .iter()
        .filter(|v| v.request.frames > 1 && caller.may_see(v.owner.as_deref()))
        .map(|v| video(v, fps))
        .collect();
    if q.order.as_deref() == Some("asc") {
        all.reverse();
    }
    if let Some(after) = &q.after {
        if let Some(i) = all.iter().position(|v| &v.id == after) {
            all.drain(..=i);
        }
    }
    let limit = q.limit.unwrap_or(20).max(1);
    let has_more = all.len() > limit;
    all.truncate(limit);
    Ok(Json(VideoList {
        object: "list".into(),
        first_id: all.first().map(|v| v.id.clone()),
        last_id: all.last().map(|v| v.id.clone()),
        has_more,
        data: all,
    }))
}

/// Cancels the job if it is still running and forgets it (OpenAI's `videos.delete`).
#[utoipa::path(delete, path = "/v1/videos/{id}", tag = "openai", operation_id = "videos_delete",
    params(("id" = String, Path, description = "The video id")),
    responses(
        (status = 200, description = "Deleted", body = VideoDeleted),
        (status = 404, description = "Unknown or expired", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<VideoDeleted>, OpenAiError> {
    find(&state, &caller, &id).await?;
    state.jobs.remove(&id).await?;
    Ok(Json(VideoDeleted {
        id,
        object: "video.deleted".into(),
        deleted: true,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentQuery {
    /// `video` (MP4, default) or `thumbnail` (PNG of the first frame).
    pub variant: Option<String>,
}

/// The finished video's bytes (OpenAI's `videos.download_content`).
#[utoipa::path(get, path = "/v1/videos/{id}/content", tag = "openai", operation_id = "videos_download_content",
    params(("id" = String, Path, description = "The video id"), ContentQuery),
    responses(
        (status = 200, description = "The MP4 (H.264), or the PNG thumbnail",
            content((crate::api::schema::Media = "video/mp4"), (crate::api::schema::Media = "image/png"))),
        (status = 400, description = "Unknown variant", body = OpenAiErrorBody),
        (status = 404, description = "Unknown, deleted or expired", body = OpenAiErrorBody),
        (status = 409, description = "Not completed (yet)", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = [])))]
pub async fn content(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<Response, OpenAiError> {
    let view = find(&state, &caller, &id).await?;
    let Some(result) = view.result else {
        return Err(ApiError::from(ServeError::VideoNotReady {
            id,
            state: format!("{:?}", view.progress.state),
        })
        .into());
    };
    let (bytes, media_type) = match q.variant.as_deref() {
        None | Some("video") => (result.encoded.first(), "video/mp4"),
        Some("thumbnail") => (result.thumbnails.first(), "image/png"),
        Some(other) => {
            return Err(OpenAiError::invalid(
                "variant",
                "invalid_value",
                format!("variant must be \"video\" or \"thumbnail\", got {other:?}"),
            ))
        }
    };
    let mut res = bytes.cloned().unwrap_or_default().into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    Ok(res)
}
