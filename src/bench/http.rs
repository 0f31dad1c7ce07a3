//! Server throughput: the bare engine (the model's batched generate, no HTTP) against the
//! real server on loopback at several client concurrencies (with the batching wait fixed and
//! adaptive), and synchronous requests against asynchronous jobs (`Prefer: respond-async`,
//! then the job's events), measured in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::manifest::LoadedModel;
use crate::pipeline::BatchSpec;

#[derive(Debug, Clone, Serialize)]
pub struct EngineRow {
    pub batch: usize,
    pub images_per_s: f64,
    pub batch_ms: f64,
}

/// How the load's clients ask for their images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// `POST /generate`, waiting for the result.
    Sync,
    /// `POST /generate` with `Prefer: respond-async` (202), then `GET /jobs/{id}/events`
    /// until the `completed` event, which carries the result.
    Async,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRow {
    pub mode: Mode,
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub images_per_s: f64,
    /// Throughput once every client has had its first answer and before the budget runs
    /// out (see [`steady_rate`]): what the bare engine's batch time is compared with.
    pub steady_images_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_batch: f64,
    /// Where a request's time went, on average (see [`Stages`]).
    pub stages: Stages,
}

/// Mean milliseconds per request: the client's round trip, and the parts of it the server
/// timed itself (`timings` in the answer). What the server did not time (`round_trip_ms -
/// server_ms`) is HTTP, JSON and the client; what it timed but no stage covers (`server_ms -
/// queue - device - encoding`) is the hand-offs between the request, the device thread and
/// the encoder.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stages {
    pub round_trip_ms: f64,
    pub server_ms: f64,
    pub queue_ms: f64,
    /// Text encoding, denoising and decoding: the batch's time on the device.
    pub device_ms: f64,
    /// This request's share of that time (`device_ms / batch_size`): summed over requests,
    /// every batch's device time counted once.
    pub device_share_ms: f64,
    pub encoding_ms: f64,
}

impl Stages {
    /// The server's own timings of one answer (`timings`, `batch_size`), with the client's
    /// round trip.
    fn of(answer: &Value, round_trip_ms: f64) -> Option<Self> {
        let ms = |k: &str| answer["timings"][k].as_f64();
        let device_ms = ms("text_encoding_ms")? + ms("denoising_ms")? + ms("decoding_ms")?;
        Some(Self {
            round_trip_ms,
            server_ms: ms("total_ms")?,
            queue_ms: ms("queue_ms")?,
            device_ms,
            device_share_ms: device_ms / answer["batch_size"].as_f64()?.max(1.0),
            encoding_ms: ms("encoding_ms")?,
        })
    }

    /// The mean of `all` (zeros when empty).
    fn mean(all: &[Stages]) -> Self {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Stages) -> f64| all.iter().map(f).sum::<f64>() / n;
        Self {
            round_trip_ms: sum(|s| s.round_trip_ms),
            server_ms: sum(|s| s.server_ms),
            queue_ms: sum(|s| s.queue_ms),
            device_ms: sum(|s| s.device_ms),
            device_share_ms: sum(|s| s.device_share_ms),
            encoding_ms: sum(|s| s.encoding_ms),
        }
    }

    /// The share of wall time the device was busy at `images_per_s`, from the server's own
    /// timings of the same requests. Unlike a ratio against the bare engine measured
    /// between rounds, it does not move when the machine's speed drifts between them.
    pub fn device_busy(&self, images_per_s: f64) -> f64 {
        images_per_s * self.device_share_ms / 1e3
    }

    /// Timed by the server but in no stage: the hand-offs.
    pub fn handoff_ms(&self) -> f64 {
        self.server_ms - self.queue_ms - self.device_ms - self.encoding_ms
    }

    /// Not timed by the server: HTTP, JSON and the client.
    pub fn outside_ms(&self) -> f64 {
        self.round_trip_ms - self.server_ms
    }
}

/// Completions per second between the `concurrency`-th completion and the last one of the
/// last full round (`done`: sorted completion times in seconds from the start).
///
/// A closed-loop run has a ramp (the first arrivals find no company and run alone) and a
/// drain (the last round is partial once the request budget is spent); neither is the
/// server's steady pace, which is what the bare engine's batch time measures.
pub fn steady_rate(done: &[f64], concurrency: usize, elapsed: f64) -> f64 {
    let (n, c) = (done.len(), concurrency.max(1));
    let rounds = n / c;
    let overall = n as f64 / elapsed;
    if rounds < 2 {
        return overall;
    }
    let span = done[rounds * c - 1] - done[c - 1];
    if span > 0.0 {
        ((rounds - 1) * c) as f64 / span
    } else {
        overall
    }
}

/// Outputs/s of `model.generate` at batch `batch`, each of `frames` frames (1: images),
/// median of `reps` after a warm-up.
pub fn engine_throughput(
    model: &LoadedModel,
    batch: usize,
    frames: usize,
    steps: usize,
    guidance: f32,
    reps: usize,
) -> candle_core::Result<EngineRow> {
    let [w, h] = model.manifest.serving.sizes[0];
    let spec = BatchSpec {
        prompts: vec!["a small red circle on the left".into(); batch],
        negative_prompts: vec![String::new(); batch],
        seeds: (0..batch as u64).collect(),
        frames,
        width: w,
        height: h,
    };
    let secs = super::model::median_secs(reps, || {
        model.generate(&spec, steps, guidance)?;
        Ok(())
    })?;
    Ok(EngineRow {
        batch,
        images_per_s: batch as f64 / secs,
        batch_ms: secs * 1e3,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One Server-Sent Events block as `(event, data)` (data `Null` when it is not JSON); `None`
/// without an `event:` line.
pub fn parse_event(block: &str) -> Option<(String, Value)> {
    let mut name = None;
    let mut data = String::new();
    for line in block.lines() {
        if let Some(n) = line.strip_prefix("event:") {
            name = Some(n.trim().to_string());
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.trim_start());
        }
    }
    Some((name?, serde_json::from_str(&data).unwrap_or(Value::Null)))
}

/// The last event of a Server-Sent Events body.
fn last_event(text: &str) -> Option<(String, Value)> {
    text.rsplit("\n\n").find_map(parse_event)
}

/// One generation as `mode` asks for it: its answer (`batch_size`, `timings`, ...), `None`
/// on any failure.
async fn one(client: &reqwest::Client, base_url: &str, body: &Value, mode: Mode) -> Option<Value> {
    let url = format!("{base_url}/generate");
    match mode {
        Mode::Sync => {
            let r = client.post(&url).json(body).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json::<Value>().await.ok()
        }
        Mode::Async => {
            let r = client
                .post(&url)
                .header("prefer", "respond-async")
                .json(body)
                .send()
                .await
                .ok()?;
            if r.status() != reqwest::StatusCode::ACCEPTED {
                return None;
            }
            let job = r.json::<Value>().await.ok()?;
            let events = client
                .get(format!("{base_url}/jobs/{}/events", job["id"].as_str()?))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            match last_event(&events)? {
                (name, mut data) if name == "completed" => Some(data["result"].take()),
                _ => None,
            }
        }
    }
}

/// `concurrency` clients, each sending `body` back to back as `mode` says, until `requests`
/// have been sent in all or `max_time` has passed (whichever comes first). Loopback targets
/// only.
pub async fn http_load(
    base_url: &str,
    body: Value,
    mode: Mode,
    concurrency: usize,
    requests: usize,
    max_time: Duration,
) -> HttpRow {
    let client = reqwest::Client::new();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (client, base, body, sent) = (
            client.clone(),
            base_url.to_string(),
            body.clone(),
            sent.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut done = Vec::new();
            let mut batches = Vec::new();
            let mut stages = Vec::new();
            let mut errors = 0;
            let mut seed = c as u64 * 1_000_000;
            loop {
                let i = sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= requests || start.elapsed() >= max_time {
                    break;
                }
                let mut b = body.clone();
                b["seed"] = seed.into();
                seed += 1;
                let t = Instant::now();
                match one(&client, &base, &b, mode).await {
                    Some(answer) if answer["batch_size"].is_number() => {
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        lat.push(ms);
                        done.push(start.elapsed().as_secs_f64());
                        batches.push(answer["batch_size"].as_f64().unwrap_or(0.0));
                        stages.extend(Stages::of(&answer, ms));
                    }
                    _ => errors += 1,
                }
            }
            (lat, done, batches, stages, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut done = Vec::new();
    let mut batches = Vec::new();
    let mut stages = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, d, b, s, e)) = t.await {
            lat.extend(l);
            done.extend(d);
            batches.extend(b);
            stages.extend(s);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    done.sort_by(|a, b| a.total_cmp(b));
    HttpRow {
        mode,
        concurrency,
        requests: lat.len(),
        errors,
        images_per_s: lat.len() as f64 / elapsed,
        steady_images_per_s: steady_rate(&done, concurrency, elapsed),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        mean_batch: batches.iter().sum::<f64>() / batches.len().max(1) as f64,
        stages: Stages::mean(&stages),
    }
}

/// Synchronous requests against asynchronous jobs at one concurrency: rounds alternate
/// between the two, and each side's throughput is the median of its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct SyncVsAsync {
    pub concurrency: usize,
    pub sync: HttpRow,
    pub r#async: HttpRow,
    /// Async images/s over sync images/s.
    pub ratio: f64,
}

/// Runs `rounds` alternating sync and async loads (after one warm-up of each) and keeps each
/// side's median round.
pub async fn sync_vs_async(
    base_url: &str,
    body: Value,
    concurrency: usize,
    requests: usize,
    max_time: Duration,
    rounds: usize,
) -> SyncVsAsync {
    let load = |mode, n| http_load(base_url, body.clone(), mode, concurrency, n, max_time);
    for mode in [Mode::Sync, Mode::Async] {
        load(mode, concurrency).await;
    }
    let (mut sync, mut asy) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        sync.push(load(Mode::Sync, requests).await);
        asy.push(load(Mode::Async, requests).await);
    }
    let (sync, asy) = (median_round(sync), median_round(asy));
    SyncVsAsync {
        concurrency,
        ratio: asy.images_per_s / sync.images_per_s,
        sync,
        r#async: asy,
    }
}

/// The server's throughput with freed memory pages kept against returned to the OS after
/// `delay_ms` (`crate::alloc`), and the process's RSS after each side's rounds once the
/// server sat idle past the delay.
#[derive(Debug, Clone, Serialize)]
pub struct KeepVsReturn {
    pub concurrency: usize,
    pub delay_ms: u64,
    pub keep: HttpRow,
    pub returned: HttpRow,
    /// Median RSS (MB) after idling, per side; `None` off Linux.
    pub rss_keep_mb: Option<f64>,
    pub rss_returned_mb: Option<f64>,
}

/// Runs `rounds` alternating loads with each policy (after one warm-up) and leaves pages
/// kept, the benchmark's default. The RSS is read after an idle pause longer than the delay
/// and one more request: mimalloc returns pages when a thread next allocates or frees, and an
/// idle server does neither.
pub async fn keep_vs_return(
    base_url: &str,
    body: Value,
    concurrency: usize,
    requests: usize,
    max_time: Duration,
    rounds: usize,
    delay_ms: u64,
) -> KeepVsReturn {
    use crate::alloc::{set_freed_pages, FreedPages};
    let load = |c, n| http_load(base_url, body.clone(), Mode::Sync, c, n, max_time);
    let idle = Duration::from_millis(delay_ms + 200);
    let side = |policy| {
        set_freed_pages(policy);
        async {
            let row = load(concurrency, requests).await;
            tokio::time::sleep(idle).await;
            load(1, 1).await;
            (row, rss_mb())
        }
    };
    let policies = [FreedPages::Keep, FreedPages::ReturnAfterMs(delay_ms)];
    for p in policies {
        side(p).await;
    }
    let (mut keep, mut ret) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        keep.push(side(policies[0]).await);
        ret.push(side(policies[1]).await);
    }
    set_freed_pages(FreedPages::Keep);
    let median_rss = |v: &[(HttpRow, Option<f64>)]| {
        let mut r: Vec<f64> = v.iter().filter_map(|x| x.1).collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied()
    };
    let (rss_keep_mb, rss_returned_mb) = (median_rss(&keep), median_rss(&ret));
    KeepVsReturn {
        concurrency,
        delay_ms,
        keep: median_round(keep.into_iter().map(|x| x.0).collect()),
        returned: median_round(ret.into_iter().map(|x| x.0).collect()),
        rss_keep_mb,
        rss_returned_mb,
    }
}

/// This process's resident set in MB (Linux `/proc/self/statm`).
fn rss_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the running system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as f64 / 1e6)
}

/// The round with the median throughput.
fn median_round(mut rows: Vec<HttpRow>) -> HttpRow {
    rows.sort_by(|a, b| a.images_per_s.total_cmp(&b.images_per_s));
    rows.swap_remove(rows.len() / 2)
}

/// The bare engine, measured between HTTP rounds on the blocking pool (the server is idle
/// then), so that both sides of a ratio see the same load on shared cores.
pub struct BareEngine {
    pub model: Arc<LoadedModel>,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    pub reps: usize,
}

impl BareEngine {
    async fn rate(&self, batch: usize) -> Option<EngineRow> {
        let (model, frames, steps, guidance, reps) = (
            self.model.clone(),
            self.frames,
            self.steps,
            self.guidance,
            self.reps,
        );
        tokio::task::spawn_blocking(move || {
            engine_throughput(&model, batch, frames, steps, guidance, reps).ok()
        })
        .await
        .ok()
        .flatten()
    }
}

/// Synchronous load at one concurrency with the batching wait fixed (always `max_wait_ms`)
/// and adaptive (only when company is expected), and the bare engine at a batch of the
/// concurrency, each the median of alternating rounds.
#[derive(Debug, Clone, Serialize)]
pub struct FixedVsAdaptive {
    pub concurrency: usize,
    pub fixed: HttpRow,
    pub adaptive: HttpRow,
    pub engine: Option<EngineRow>,
}

/// Runs `rounds` alternating loads with `engine`'s wait fixed, then adaptive, then the bare
/// engine (after one warm-up), and leaves the engine adaptive.
#[allow(clippy::too_many_arguments)]
pub async fn fixed_vs_adaptive(
    engine: &crate::engine::Engine,
    bare: &BareEngine,
    base_url: &str,
    body: Value,
    concurrency: usize,
    requests: usize,
    max_time: Duration,
    rounds: usize,
) -> FixedVsAdaptive {
    let load = |n| http_load(base_url, body.clone(), Mode::Sync, concurrency, n, max_time);
    load(concurrency).await;
    let (mut fixed, mut adaptive, mut bare_rows) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        engine.set_adaptive_wait(false);
        fixed.push(load(requests).await);
        engine.set_adaptive_wait(true);
        adaptive.push(load(requests).await);
        bare_rows.extend(bare.rate(concurrency).await);
    }
    bare_rows.sort_by(|a, b| a.images_per_s.total_cmp(&b.images_per_s));
    FixedVsAdaptive {
        concurrency,
        fixed: median_round(fixed),
        adaptive: median_round(adaptive),
        engine: bare_rows.get(bare_rows.len() / 2).cloned(),
    }
}

/// Synchronous load at one concurrency with no canary, with a canary taking all traffic
/// (same batches; routing, per-version counters and the reward proxy on top), and with a
/// canary taking half (which also splits the batches in two), each the median of
/// alternating rounds.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryOverhead {
    pub concurrency: usize,
    pub plain: HttpRow,
    pub canary_all: HttpRow,
    pub canary_half: HttpRow,
}

/// Runs `rounds` alternating loads without and with a canary of `weights` on `model`.
#[allow(clippy::too_many_arguments)]
pub async fn canary_overhead(
    engine: &crate::engine::Engine,
    model: &str,
    weights: &std::path::Path,
    base_url: &str,
    body: Value,
    concurrency: usize,
    requests: usize,
    max_time: Duration,
    rounds: usize,
) -> Result<CanaryOverhead, crate::engine::EngineError> {
    let load = |n| http_load(base_url, body.clone(), Mode::Sync, concurrency, n, max_time);
    load(concurrency).await;
    let (mut plain, mut all, mut half) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        plain.push(load(requests).await);
        for (share, rows) in [(1.0, &mut all), (0.5, &mut half)] {
            engine
                .reload(model, weights.to_path_buf(), Some(share))
                .await?;
            rows.push(load(requests).await);
            engine.rollback(model).await?;
        }
    }
    Ok(CanaryOverhead {
        concurrency,
        plain: median_round(plain),
        canary_all: median_round(all),
        canary_half: median_round(half),
    })
}

/// Copies a safetensors file with the lowest bit of its first tensor byte flipped: another
/// version to the server (versions hash the file), with the same compute and, to rounding,
/// the same outputs; the identity in the header is kept.
pub fn distinct_weights_copy(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let mut bytes = std::fs::read(from)?;
    let header = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| std::io::Error::other("not a safetensors file"))?;
    let first = bytes
        .get_mut(8 + header)
        .ok_or_else(|| std::io::Error::other("a safetensors file without tensor data"))?;
    *first ^= 1;
    std::fs::write(to, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_event_of_a_stream_is_found() {
        let text = "event: queued\ndata: {\"position\":1}\n\nevent: completed\ndata: {\"result\":{\"batch_size\":3}}\n\n";
        let (name, data) = last_event(text).unwrap();
        assert_eq!(name, "completed");
        assert_eq!(data["result"]["batch_size"], 3);
        assert!(last_event("").is_none());
    }

    #[test]
    fn a_request_splits_into_the_server_stages_and_the_rest() {
        let answer = serde_json::json!({"batch_size": 2, "timings": {"queue_ms": 1.0,
            "text_encoding_ms": 0.5, "denoising_ms": 10.0, "decoding_ms": 0.5,
            "encoding_ms": 0.25, "total_ms": 12.5}});
        let s = Stages::of(&answer, 14.0).unwrap();
        assert_eq!(s.device_ms, 11.0);
        assert_eq!(s.device_share_ms, 5.5);
        assert_eq!(s.handoff_ms(), 0.25);
        assert_eq!(s.outside_ms(), 1.5);
        // 100 images/s at 5.5 ms of device each: busy 55% of the time.
        assert!((s.device_busy(100.0) - 0.55).abs() < 1e-12);
        // An answer without timings gives no stages; the mean of none is zeros.
        assert!(Stages::of(&Value::Null, 14.0).is_none());
        let two = Stages::mean(&[
            s,
            Stages {
                round_trip_ms: 16.0,
                ..s
            },
        ]);
        assert_eq!(two.round_trip_ms, 15.0);
        assert_eq!(Stages::mean(&[]).server_ms, 0.0);
    }

    #[test]
    fn the_steady_rate_leaves_out_the_ramp_and_the_drain() {
        // Two clients: a slow first round (one ran alone), then a pair every second, then a
        // lone last request.
        let done = [0.9, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0];
        assert_eq!(steady_rate(&done, 2, 4.0), 2.0);
        // Under two full rounds there is no steady part: the overall rate.
        assert_eq!(steady_rate(&done[..3], 2, 2.0), 1.5);
        assert_eq!(steady_rate(&[], 4, 1.0), 0.0);
    }
}
