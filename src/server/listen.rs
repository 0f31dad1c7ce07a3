//! The accept loop: HTTP/1.1 connections with a header-read (and keep-alive idle) timeout,
//! a bound on open connections, and a graceful close when told to stop.
//!
//! `axum::serve` exposes none of hyper's connection settings, so connections are served
//! with hyper directly. HTTP/2 is not offered: hyper has no header-read or idle timeout for
//! it, so a prior-knowledge h2 client could hold a connection open forever.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::ServerConfig;

/// Most headers in one request. Above hyper's default of 100 so that our own size check
/// (which answers problem+json) sees such requests first.
const MAX_HEADERS: usize = 1000;

/// How long open connections get to finish their last response after the stop.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(super) struct ConnLimits {
    header_read_timeout: Duration,
    max_connections: usize,
    max_header_bytes: usize,
}

impl ConnLimits {
    pub(super) fn from_config(c: &ServerConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            max_connections: c.max_connections,
            max_header_bytes: c.max_header_bytes,
        }
    }

    fn builder(&self) -> http1::Builder {
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .keep_alive(true)
            .max_headers(MAX_HEADERS)
            // Room for headers somewhat over our limit, so the router answers them with a
            // problem (hyper's own 431 has an empty body).
            .max_buf_size((self.max_header_bytes * 4).max(64 * 1024));
        b
    }
}

/// Serves `app` on `listener` until `stop` turns true, then closes idle connections, lets
/// busy ones finish their response, and returns.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) {
    let builder = limits.builder();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        // Take a slot before accepting: at the limit, new connections wait in the backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let conn =
            builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(CLOSE_GRACE) => tracing::warn!("connections still open after the close grace"),
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
