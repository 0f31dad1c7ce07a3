//! Server configuration: built-in defaults, then a TOML file, then `FEWSTEP_*` environment
//! variables, then command-line flags, each layer overriding the one before.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `HOST:PORT` to listen on; port 0 picks a free port (logged at start).
    pub addr: String,
    /// Directory holding `<model>/manifest.toml` (or `<model>.toml`).
    pub models_dir: PathBuf,
    /// Models to load: names under `models_dir` or manifest paths (`*.toml`); the first is
    /// the default for requests that name none.
    pub models: Vec<String>,
    /// Serve random weights when a model's weights file is missing (tests, development).
    pub allow_random_weights: bool,
    /// Jobs that may wait in the queue before new requests get 429.
    pub queue_capacity: usize,
    /// Default and largest per-request deadline.
    pub request_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    /// Most outputs one request may ask for (also bounded by the model's max batch).
    pub max_n: usize,
    /// Bearer keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Bearer token for `/admin/*`; unset = admin routes disabled.
    pub admin_token: Option<String>,
    /// How long a graceful shutdown may take to finish accepted requests.
    pub shutdown_timeout_s: u64,
    /// Frames per second of returned animations.
    pub video_fps: u32,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    pub device: String,
    /// Generation log: `sqlite://PATH` (created on first start) or `postgres://...`; unset
    /// keeps no log (and `/feedback` answers 404).
    pub store_url: Option<String>,
    /// Log records that may wait for the database before new ones are dropped.
    pub log_buffer: usize,
    /// How long a finished job's result stays available (`GET /jobs/{id}`, `/v1/videos`).
    pub job_ttl_s: u64,
    /// Most bytes of finished results kept; the oldest expire first beyond it.
    pub job_results_bytes: usize,
    /// How long a client may take to send a request's headers, and how long a keep-alive
    /// connection may sit idle between requests (hyper runs one timer for both); then the
    /// connection is closed.
    pub header_read_timeout_ms: u64,
    /// Open connections served at once; further ones wait in the listen backlog until one
    /// closes.
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes; larger requests get 431.
    pub max_header_bytes: usize,
    /// Directories (besides `models_dir`, which is always allowed) whose files an admin
    /// reload may load, checked after resolving symlinks.
    pub reload_dirs: Vec<PathBuf>,
    /// The least time a batch takes on top of a model's `max_wait_ms`: a request's
    /// `timeout_ms` below their sum is refused rather than left to time out.
    pub min_run_ms: u64,
    /// Most summed work queued at once, in pixels x frames x steps x n (so a queue of large
    /// video jobs is bounded by what they cost, not by how many they are).
    pub queue_cost_budget: u64,
    /// Per API key: requests per second on average (0 = no limit), and the burst above it.
    pub key_rate_per_s: f64,
    pub key_burst: u32,
    /// Per API key: jobs queued or running at once (0 = no limit).
    pub key_max_in_flight: usize,
    /// Wait a model's `max_wait_ms` for company only when recent arrivals of that shape
    /// overlapped other jobs (a lone closed-loop client then runs at once), and only until
    /// the queue holds the rows of the last batch of that shape plus those queued while it
    /// ran; `false` always waits for `max_batch` rows or `max_wait_ms`.
    pub adaptive_wait: bool,
    /// `fewstep serve` returns memory pages to the OS once they stayed free this long, so
    /// that RSS follows the working set rather than the highest peak so far; -1 keeps every
    /// freed page (a little faster, RSS = the largest burst ever served).
    pub return_free_memory_ms: i64,
    /// When a canary is promoted or rolled back by itself (`[rollout]`).
    pub rollout: crate::rollout::RolloutPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            models_dir: PathBuf::from("models"),
            models: vec!["tiny-shapes".into(), "tiny-shapes-teacher".into()],
            allow_random_weights: false,
            queue_capacity: 256,
            request_timeout_ms: 120_000,
            max_body_bytes: 64 * 1024,
            max_prompt_chars: 500,
            max_n: 8,
            api_keys: Vec::new(),
            admin_token: None,
            shutdown_timeout_s: 30,
            video_fps: 8,
            device: "cpu".into(),
            store_url: Some("sqlite://data/fewstep.db".into()),
            log_buffer: 1024,
            job_ttl_s: 600,
            job_results_bytes: 256 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            reload_dirs: vec![PathBuf::from("runs")],
            min_run_ms: 10,
            queue_cost_budget: 1 << 30,
            key_rate_per_s: 0.0,
            key_burst: 10,
            key_max_in_flight: 0,
            adaptive_wait: true,
            return_free_memory_ms: 1000,
            rollout: crate::rollout::RolloutPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl ServerConfig {
    /// Layers the optional TOML `file`, `FEWSTEP_*` variables (lists as `[a, b]`) and the
    /// flags in `overrides` (a serialized map of only the flags the user gave).
    pub fn load(file: Option<&Path>, overrides: serde_json::Value) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError(format!(
                    "config file {} not found",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig
            .merge(Env::prefixed("FEWSTEP_"))
            .merge(Serialized::defaults(overrides));
        let cfg: ServerConfig = fig.extract().map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(ConfigError("at least one model must be configured".into()));
        }
        if self.queue_capacity == 0 || self.max_n == 0 || self.max_prompt_chars == 0 {
            return Err(ConfigError(
                "queue_capacity, max_n and max_prompt_chars must be positive".into(),
            ));
        }
        if self.job_ttl_s == 0 {
            return Err(ConfigError("job_ttl_s must be positive".into()));
        }
        if self.header_read_timeout_ms == 0 || self.max_connections == 0 {
            return Err(ConfigError(
                "header_read_timeout_ms and max_connections must be positive".into(),
            ));
        }
        if self.max_header_bytes < 1024 {
            return Err(ConfigError("max_header_bytes must be at least 1024".into()));
        }
        if self.queue_cost_budget == 0
            || !self.key_rate_per_s.is_finite()
            || self.key_rate_per_s < 0.0
        {
            return Err(ConfigError(
                "queue_cost_budget must be positive and key_rate_per_s at least 0".into(),
            ));
        }
        if self.video_fps == 0 {
            return Err(ConfigError("video_fps must be positive".into()));
        }
        self.rollout.validate().map_err(ConfigError)?;
        self.device()?;
        Ok(())
    }

    /// The configured device (fails for CUDA when the build has no CUDA support).
    pub fn device(&self) -> Result<candle_core::Device, ConfigError> {
        parse_device(&self.device)
    }
}

/// `cpu`, `cuda` or `cuda:N` as a device (fails for CUDA when the build has no CUDA support).
pub fn parse_device(name: &str) -> Result<candle_core::Device, ConfigError> {
    let d = name.trim().to_ascii_lowercase();
    let ordinal = match d.as_str() {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                ConfigError(format!("unknown device {other:?}; use cpu, cuda or cuda:N"))
            })?,
    };
    candle_core::Device::new_cuda(ordinal).map_err(|e| ConfigError(format!("device {d}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    // figment::Jail's closures return figment::Error, which is large by design.
    #[test]
    #[allow(clippy::result_large_err)]
    fn file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "addr = \"0.0.0.0:1\"\nmax_n = 3\nqueue_capacity = 5",
            )?;
            jail.set_env("FEWSTEP_MAX_N", "4");
            jail.set_env("FEWSTEP_API_KEYS", "[k1, k2]");
            let cfg = ServerConfig::load(
                Some(Path::new("f.toml")),
                serde_json::json!({"queue_capacity": 9}),
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(cfg.addr, "0.0.0.0:1");
            assert_eq!(cfg.max_n, 4);
            assert_eq!(cfg.queue_capacity, 9);
            assert_eq!(cfg.api_keys, vec!["k1", "k2"]);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn unknown_keys_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", "adr = \"x\"")?;
            assert!(ServerConfig::load(Some(Path::new("f.toml")), serde_json::json!({})).is_err());
            jail.create_file("g.toml", "max_n = 0")?;
            assert!(ServerConfig::load(Some(Path::new("g.toml")), serde_json::json!({})).is_err());
            Ok(())
        });
    }
}
