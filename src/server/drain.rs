//! Draining: after the stop signal the listener stays open (so `/health` and `/ready` still
//! answer), accepted requests finish, and those still open at the drain deadline are
//! answered with 503 `draining` instead of having their connection cut.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use crate::api::error::ApiError;
use crate::engine::EngineError;

/// Requests in flight, and whether the drain deadline has passed.
#[derive(Clone)]
pub(super) struct Drain(Arc<Inner>);

struct Inner {
    in_flight: AtomicUsize,
    expired: watch::Sender<bool>,
}

/// Counts one request for as long as it lives.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drain {
    pub(super) fn new() -> Self {
        Self(Arc::new(Inner {
            in_flight: AtomicUsize::new(0),
            expired: watch::Sender::new(false),
        }))
    }

    fn enter(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.0.clone())
    }

    async fn until_idle(&self) {
        while self.0.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no request is in flight, or `deadline` passes; then every request still
    /// open is answered with 503. Returns whether everything finished in time.
    pub(super) async fn wait(&self, deadline: Duration) -> bool {
        let finished = tokio::time::timeout(deadline, self.until_idle())
            .await
            .is_ok();
        if !finished {
            self.0.expired.send_replace(true);
            // The open requests answer at once now; let them be counted out.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.until_idle()).await;
        }
        finished
    }
}

/// The outermost middleware: counts requests and answers 503 for those still open when the
/// drain deadline passes.
pub(super) async fn guard(State(drain): State<Drain>, req: Request, next: Next) -> Response {
    let _counted = drain.enter();
    let mut expired = drain.0.expired.subscribe();
    tokio::select! {
        biased;
        res = next.run(req) => res,
        _ = expired.wait_for(|e| *e) => ApiError::from(EngineError::Draining).into_response(),
    }
}
