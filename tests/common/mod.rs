//! Shared helpers for the integration tests: a models directory with test settings and a
//! real server on an ephemeral loopback port.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fewstep::config::ServerConfig;
use fewstep::server::{spawn, ServerHandle};

/// The committed student's `[architecture]`: what its weights, and the weights the reload
/// tests write, fit (the teacher's may differ, e.g. its `text_mix`).
pub fn student_architecture() -> toml::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes/manifest.toml");
    let manifest: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    manifest["architecture"].clone()
}

/// A temporary models directory holding `tiny-shapes`, built from the teacher's manifest (the
/// multi-step sampler with CFG, so the tests reach every parameter) with the student's
/// architecture, and edited by `edit` (no weights file, so the server runs seeded random
/// weights).
pub fn models_dir(tag: &str, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fewstep-test-{tag}-{}", std::process::id()));
    let model = dir.join("tiny-shapes");
    std::fs::create_dir_all(&model).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes-teacher");
    let mut manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(src.join("manifest.toml")).unwrap()).unwrap();
    manifest.insert("name".into(), "tiny-shapes".into());
    manifest.insert("weights".into(), "absent.safetensors".into());
    manifest.insert("architecture".into(), student_architecture());
    edit(&mut manifest);
    std::fs::write(
        model.join("manifest.toml"),
        toml::to_string(&manifest).unwrap(),
    )
    .unwrap();
    std::fs::copy(src.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    dir
}

/// Sets `[section] key = value` in a manifest table.
pub fn set(m: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    m.get_mut(section)
        .and_then(|s| s.as_table_mut())
        .unwrap()
        .insert(key.into(), value.into());
}

pub fn config(models_dir: &Path) -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".into(),
        models_dir: models_dir.to_path_buf(),
        allow_random_weights: true,
        models: vec!["tiny-shapes".into()],
        // Every test server logs, to its own SQLite file.
        store_url: Some(format!("sqlite://{}/log.db", models_dir.display())),
        ..ServerConfig::default()
    }
}

pub struct TestServer {
    pub handle: ServerHandle,
    pub base: String,
    pub client: reqwest::Client,
}

pub async fn start(config: ServerConfig) -> TestServer {
    let handle = spawn(config, std::future::pending()).await.unwrap();
    let base = format!("http://{}", handle.addr);
    TestServer {
        handle,
        base,
        client: reqwest::Client::new(),
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn generate(&self, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url("/generate"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `GET path`: the status and the JSON body (`Null` when the body is not JSON).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        Self::status_and_json(self.client.get(self.url(path))).await
    }

    /// `DELETE path`: the status and the JSON body (`Null` when the body is not JSON).
    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        Self::status_and_json(self.client.delete(self.url(path))).await
    }

    async fn status_and_json(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Sum of a Prometheus sample over all label sets whose text contains `labels`.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn decode_b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The real `fewstep serve` binary on an ephemeral port, logging to `store_url`.
pub struct BinServer {
    pub child: std::process::Child,
    pub addr: String,
    /// Its stderr lines, once it has exited.
    pub log: std::thread::JoinHandle<Vec<String>>,
}

pub fn spawn_binary_server(models_dir: &Path, store_url: &str) -> BinServer {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--allow-random-weights",
            "--models",
            "tiny-shapes",
            "--models-dir",
        ])
        .arg(models_dir)
        .env("RUST_LOG", "info")
        .env("FEWSTEP_STORE_URL", store_url)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(rest) = line
            .split("addr=")
            .nth(1)
            .filter(|_| line.contains("listening"))
        {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    BinServer { child, addr, log }
}
