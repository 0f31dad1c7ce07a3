//! The jobs API: `GET /jobs/{id}`, `GET /jobs/{id}/events` (Server-Sent Events) and
//! `DELETE /jobs/{id}` (cancel).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};

use super::caller::Caller;
use super::error::{ApiError, Problem};
use super::schema::JobStatus;
use super::AppState;
use crate::engine::{JobCell, JobError, JobEvent, JobState, JobView, Jobs};

/// A job's state, progress and (once completed) result. A finished job that this replica no
/// longer holds (another replica ran it, or it expired here after `job_ttl_s`) comes from the
/// generation log: without `expires_at`, and with its `result` only when the model keeps
/// media.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", operation_id = "get_job",
    params(("id" = String, Path, description = "The job (= generation) id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 404, description = "Unknown, or expired after `job_ttl_s` on a server without a log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The log store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub async fn job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let view = owned(&state.jobs, &caller, &id).await?;
    Ok(Json(JobStatus::from_view(&view)))
}

/// The job if `caller` may see it: another key's job is as unknown as a missing one.
pub async fn owned(jobs: &Jobs, caller: &Caller, id: &str) -> Result<JobView, JobError> {
    jobs.find(id)
        .await?
        .filter(|v| caller.may_see(v.owner.as_deref()))
        .ok_or_else(|| JobError::NotFound(id.to_string()))
}

/// Cancels a job: a queued one leaves the queue, a running one leaves its batch at the next
/// denoising step (the other rows of the batch go on unchanged).
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs", operation_id = "cancel_job",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "Cancelled", body = JobStatus),
        (status = 404, description = "Unknown or expired", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    owned(&state.jobs, &caller, &id).await?;
    let view = state.jobs.cancel(&id).await?;
    Ok(Json(JobStatus::from_view(&view)))
}

/// The job's events as Server-Sent Events: `queued` (with `position`), `progress` after each
/// denoising step (`step`, `steps`, `stage`, `percent`, `eta_s`), then one of `completed`
/// (the job with its result), `failed` or `cancelled`, and the stream ends. A job that only the
/// log knows (finished on another replica) gets its final event at once.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", operation_id = "job_events",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "An event stream", body = super::schema::SseEvent, content_type = "text/event-stream"),
        (status = 404, description = "Unknown or expired", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let view = owned(&state.jobs, &caller, &id).await?;
    let (tx, rx) = mpsc::channel(16);
    match state.jobs.get(&id) {
        Some(cell) => {
            tokio::spawn(forward(state.jobs.clone(), cell, tx));
        }
        None => {
            let _ = tx.send(final_event(&view)).await;
        }
    }
    Ok(Sse::new(channel_stream(rx)).keep_alive(KeepAlive::default()))
}

/// A stream of what arrives on `rx`, ending when the sender goes.
pub fn channel_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl Stream<Item = Result<T, Infallible>> {
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name))
}

/// The final event of a job: its name is the state, its data the job.
fn final_event(v: &JobView) -> Event {
    json_event(v.progress.state.as_str(), &JobStatus::from_view(v))
}

/// The final event of a job of this process (a bare one if it expired in between).
fn final_event_of(jobs: &Jobs, id: &str, state: JobState) -> Event {
    match jobs.view(id) {
        Some(v) => final_event(&v),
        None => Event::default().event(state.as_str()),
    }
}

/// Turns a job's events into SSE events until it finishes or the client goes.
async fn forward(jobs: Jobs, cell: Arc<JobCell>, tx: mpsc::Sender<Event>) {
    let (now, mut rx) = cell.subscribe();
    let first = match now.state {
        JobState::Queued => {
            let position = jobs.view(&cell.id).and_then(|v| v.progress.position);
            json_event("queued", &serde_json::json!({ "position": position }))
        }
        JobState::InProgress => json_event("progress", &now),
        done => {
            let _ = tx.send(final_event_of(&jobs, &cell.id, done)).await;
            return;
        }
    };
    if tx.send(first).await.is_err() {
        return;
    }
    loop {
        let event = match rx.recv().await {
            Ok(JobEvent::Queued { position }) => {
                json_event("queued", &serde_json::json!({ "position": position }))
            }
            Ok(JobEvent::Progress(p)) if !p.state.is_finished() => json_event("progress", &p),
            Ok(JobEvent::Progress(_)) | Ok(JobEvent::Partial { .. }) => continue,
            Ok(JobEvent::Finished(state)) => {
                let _ = tx.send(final_event_of(&jobs, &cell.id, state)).await;
                return;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}
