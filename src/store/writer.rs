//! The bounded, asynchronous log writer: finished jobs (with their generations) are handed
//! over without waiting and written in the background. A full buffer or a failing database drops records (with a
//! warning and a metric); it never blocks or fails a generation.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::{LogEntry, Store};

/// Ids handed to the writer but not yet written, so that feedback arriving right after a
/// generation can wait for its row instead of getting a 404.
#[derive(Default)]
struct Pending {
    ids: Mutex<HashSet<String>>,
    written: Notify,
}

#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<LogEntry>,
    pending: Arc<Pending>,
    pub store: Store,
}

impl LogWriter {
    /// Starts the writer task with room for `capacity` unwritten records.
    pub fn spawn(store: Store, capacity: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<LogEntry>(capacity.max(1));
        let pending = Arc::new(Pending::default());
        let (task_store, task_pending) = (store.clone(), pending.clone());
        tokio::spawn(async move {
            while let Some(rec) = rx.recv().await {
                match task_store.insert_job(&rec).await {
                    Ok(()) => metrics::counter!("fewstep_log_written_total").increment(1),
                    Err(e) => {
                        metrics::counter!("fewstep_log_dropped_total", "reason" => "db_error")
                            .increment(1);
                        tracing::warn!(id = %rec.job.id, error = %e, "generation log write failed; record dropped");
                    }
                }
                task_pending
                    .ids
                    .lock()
                    .expect("pending lock poisoned")
                    .remove(&rec.job.id);
                task_pending.written.notify_waiters();
            }
        });
        Self { tx, pending, store }
    }

    /// Hands a record over without waiting; drops it (and says so) when the buffer is full.
    pub fn log(&self, rec: LogEntry) {
        let id = rec.job.id.clone();
        self.pending
            .ids
            .lock()
            .expect("pending lock poisoned")
            .insert(id.clone());
        if let Err(e) = self.tx.try_send(rec) {
            self.pending
                .ids
                .lock()
                .expect("pending lock poisoned")
                .remove(&id);
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "full",
                mpsc::error::TrySendError::Closed(_) => "closed",
            };
            metrics::counter!("fewstep_log_dropped_total", "reason" => reason).increment(1);
            tracing::warn!(%id, reason, "generation log record dropped");
        }
    }

    /// Waits (at most `limit`) until every record handed over has been written: a server
    /// stopping gracefully keeps what it logged. Returns whether everything was written.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.pending.written.notified();
            if self
                .pending
                .ids
                .lock()
                .expect("pending lock poisoned")
                .is_empty()
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits (at most `limit`) until `id` is no longer waiting to be written.
    pub async fn settle(&self, id: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.pending.written.notified();
            if !self
                .pending
                .ids
                .lock()
                .expect("pending lock poisoned")
                .contains(id)
            {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}
