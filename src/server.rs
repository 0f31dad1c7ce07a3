//! Starting, running and gracefully stopping the HTTP server.

mod drain;
mod listen;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::api::{router, AppState};
use crate::config::ServerConfig;
use crate::engine::Engine;
use crate::manifest::{LoadedModel, Manifest, ManifestError};

/// The process-wide Prometheus recorder (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("fewstep_batch_size".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                )
                .and_then(|b| b.set_buckets(&latency))
                .expect("bucket lists are non-empty");
            match builder.install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder is already installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// Loads every configured model (random weights only where allowed and the file is missing),
/// in the configured order. Each entry is a name under `models_dir` or a manifest path.
pub fn load_models(config: &ServerConfig, device: &Device) -> anyhow::Result<Vec<LoadedModel>> {
    let mut out: Vec<LoadedModel> = Vec::new();
    for name in &config.models {
        let manifest = Manifest::find(&config.models_dir, name)?;
        if out.iter().any(|m| m.manifest.name == manifest.name) {
            anyhow::bail!("two configured models are named {:?}", manifest.name);
        }
        let model = match LoadedModel::load(&manifest, device) {
            Ok(m) => m,
            Err(ManifestError::MissingWeights { path }) if config.allow_random_weights => {
                tracing::warn!(model = %name, %path, "weights missing: serving RANDOM weights");
                LoadedModel::random(&manifest, 0, device)?
            }
            Err(e) => return Err(e).with_context(|| format!("loading model {name}")),
        };
        tracing::info!(model = %name, version = %model.version, trained = model.trained, "model loaded");
        out.push(model);
    }
    Ok(out)
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    /// Waits until the server stops (after its shutdown signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// Starts a graceful shutdown without waiting for it (see [`ServerHandle::wait`]).
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Graceful shutdown: stop admitting, finish what was accepted, return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.task.await?
    }
}

/// Binds, loads models and serves until `signal` resolves (or [`ServerHandle::shutdown`]).
pub async fn spawn(
    config: ServerConfig,
    signal: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<ServerHandle> {
    let device = config.device()?;
    let listener = TcpListener::bind(&config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr()?;
    let models = tokio::task::spawn_blocking({
        let config = config.clone();
        let device = device.clone();
        move || load_models(&config, &device)
    })
    .await??;
    let log = match &config.store_url {
        Some(url) => {
            let store = crate::store::Store::connect(url)
                .await
                .with_context(|| format!("opening the generation log {url}"))?;
            tracing::info!(url = %redact(url), "generation log open");
            Some(crate::store::LogWriter::spawn(store, config.log_buffer))
        }
        None => None,
    };
    // The first configured model, by its manifest name (the config may give a path).
    let default_model = models
        .first()
        .map(|m| m.manifest.name.clone())
        .context("no model configured")?;
    let engine = Engine::start(models, config.queue_capacity, device);
    engine.set_cost_budget(config.queue_cost_budget);
    engine.set_adaptive_wait(config.adaptive_wait);
    let jobs = crate::engine::Jobs::new(
        engine.clone(),
        crate::engine::JobsConfig::from_server(&config),
        log.clone(),
    );
    let shutdown_log = log.clone();
    let rollout =
        crate::rollout::Controller::new(engine.clone(), log.clone(), config.rollout.clone());
    let policy_task = rollout.spawn_policy();
    let state = AppState {
        rollout,
        log,
        jobs,
        engine: engine.clone(),
        default_model: default_model.clone(),
        config: Arc::new(config.clone()),
        metrics: metrics_handle(),
    };
    let drain = drain::Drain::new();
    let app = router(state).layer(axum::middleware::from_fn_with_state(
        drain.clone(),
        drain::guard,
    ));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (close_tx, close_rx) = watch::channel(false);
    let limits = listen::ConnLimits::from_config(&config);
    let timeout = Duration::from_secs(config.shutdown_timeout_s);
    let worker_engine = engine.clone();
    let task = tokio::spawn(async move {
        let serving = tokio::spawn(listen::serve(listener, app, limits, close_rx));
        tokio::select! {
            _ = signal => {},
            _ = stop_rx => {},
        }
        // The listener stays open while draining: probes answer, new work gets 503.
        tracing::info!("shutting down: draining accepted requests");
        // No rollout decisions while draining: the evidence stops growing.
        if let Some(t) = policy_task {
            t.abort();
        }
        worker_engine.start_draining();
        if !drain.wait(timeout).await {
            tracing::warn!("shutdown timeout reached; open requests were answered 503");
        }
        let _ = close_tx.send(true);
        serving.await?;
        let finished = tokio::task::spawn_blocking(move || worker_engine.shutdown(timeout)).await?;
        if !finished {
            tracing::warn!("device worker did not finish in time");
        }
        if let Some(log) = shutdown_log {
            // Jobs that just finished hand their records over as the worker stops.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !log.flush(timeout).await {
                tracing::warn!("generation log records still unwritten at exit");
            }
        }
        tracing::info!("server stopped");
        Ok(())
    });
    tracing::info!(%addr, "listening");
    Ok(ServerHandle {
        addr,
        engine,
        stop: Some(stop_tx),
        task,
    })
}

/// A store URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
