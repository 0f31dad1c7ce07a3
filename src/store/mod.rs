//! The generation log and user feedback (sqlx): a SQLite file by default, PostgreSQL when the
//! URL says so, one code path through sqlx's `Any` driver and versioned migrations
//! (`migrations/`).

mod writer;

pub use writer::LogWriter;

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL {0:?} (use sqlite://PATH or postgres://...)")]
    Url(String),
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store: corrupt row: {0}")]
    Corrupt(String),
    #[error("cannot create the directory of {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
}

/// One logged request (one row per request; its outputs in `outputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub id: String,
    pub created_ms: i64,
    pub model: String,
    pub model_version: String,
    pub prompt: String,
    pub negative_prompt: String,
    /// `image` or `video`.
    pub kind: String,
    pub width: i64,
    pub height: i64,
    pub frames: i64,
    pub steps: i64,
    pub guidance: f64,
    pub seeds: Vec<u64>,
    pub batch_size: i64,
    /// Stage timings in milliseconds, by stage name.
    pub timings: serde_json::Value,
    pub api_key_id: Option<String>,
    /// Encoded outputs (media type, base64) when the model keeps media.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<StoredOutput>,
}

/// A finished job (completed, failed or cancelled), as any replica can read it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id; a completed job's generation has the same id.
    pub id: String,
    pub model: String,
    /// `completed`, `failed` or `cancelled`.
    pub state: String,
    pub created_ms: i64,
    pub finished_ms: i64,
    /// The validated request (JSON).
    pub request: serde_json::Value,
    /// The progress when it finished (JSON).
    pub progress: serde_json::Value,
    /// Why it failed or was cancelled (JSON).
    pub error: Option<serde_json::Value>,
    pub api_key_id: Option<String>,
}

/// What the log writer stores for one finished job: its state and, when it completed, its
/// generation, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub job: JobRecord,
    pub generation: Option<GenerationRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredOutput {
    pub index: i64,
    pub media_type: String,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    pub id: String,
    pub generation_id: String,
    pub output_index: i64,
    /// In `[0, 1]` (thumbs up = 1, down = 0).
    pub score: f64,
    pub thumbs: Option<String>,
    pub comment: Option<String>,
    pub created_ms: i64,
}

/// A logged prompt with its traffic and ratings (the input of `distill --from-log`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptStats {
    pub prompt: String,
    pub kind: String,
    pub generations: i64,
    pub ratings: i64,
    /// Mean rating; `None` when nobody rated it.
    pub mean_score: Option<f64>,
}

/// A rated output with its pixels, for fitting a reward head to user scores.
#[derive(Debug, Clone, PartialEq)]
pub struct RatedOutput {
    pub prompt: String,
    pub media_type: String,
    pub data: String,
    pub score: f64,
}

/// The users' ratings of one model version: how many, their sum and sum of squares (scores
/// in `[0, 1]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RatingStats {
    pub version: String,
    pub n: i64,
    pub sum: f64,
    pub sum_sq: f64,
}

/// One step of a canary rollout (`start`, `promote`, `rollback`, `superseded`), by the
/// policy or by hand, with the numbers it was decided on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutDecision {
    pub id: String,
    pub model: String,
    pub created_ms: i64,
    pub action: String,
    /// `policy` or `admin`.
    pub decided_by: String,
    pub stable_version: String,
    pub canary_version: String,
    pub share: f64,
    pub reason: String,
    pub stats: serde_json::Value,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

/// The versioned schema, embedded in the binary (files under `migrations/`, applied in order
/// and recorded in `_sqlx_migrations`).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "generation log",
        include_str!("../../migrations/0001_generation_log.sql"),
    ),
    (2, "jobs", include_str!("../../migrations/0002_jobs.sql")),
    (
        3,
        "rollout decisions",
        include_str!("../../migrations/0003_rollouts.sql"),
    ),
];

fn migrator() -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                sql.into(),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: migrations.into(),
        ..Migrator::DEFAULT
    }
}

impl Store {
    /// Connects (creating a SQLite file and its directory on first use) and migrates.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let url = if let Some(path) = url.strip_prefix("sqlite://") {
            let file = path.split('?').next().unwrap_or_default();
            if file.is_empty() {
                return Err(StoreError::Url(url.to_string()));
            }
            if file != ":memory:" {
                if let Some(dir) = Path::new(file)
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                        path: file.to_string(),
                        source,
                    })?;
                }
            }
            if path.contains("mode=") {
                url.to_string()
            } else {
                format!(
                    "{url}{}mode=rwc",
                    if path.contains('?') { "&" } else { "?" }
                )
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.to_string()
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if url.starts_with("sqlite") { 1 } else { 8 })
            .acquire_timeout(Duration::from_secs(3))
            .connect(&url)
            .await?;
        migrator().run(&pool).await?;
        Ok(Self { pool })
    }

    /// Writes a generation and its kept outputs in one transaction.
    pub async fn insert_generation(&self, g: &GenerationRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_generation_in(&mut tx, g).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes a finished job and, when it completed, its generation, in one transaction.
    pub async fn insert_job(&self, e: &LogEntry) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(g) = &e.generation {
            insert_generation_in(&mut tx, g).await?;
        }
        let j = &e.job;
        sqlx::query(
            "INSERT INTO jobs (id, model, state, created_ms, finished_ms, request, progress, \
             error, api_key_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&j.id)
        .bind(&j.model)
        .bind(&j.state)
        .bind(j.created_ms)
        .bind(j.finished_ms)
        .bind(j.request.to_string())
        .bind(j.progress.to_string())
        .bind(j.error.as_ref().map(|e| e.to_string()))
        .bind(j.api_key_id.clone())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets a finished job; false when there was none.
    pub async fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// A finished job, or `None`.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let Some(row) = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let json = |col: &str| -> Result<serde_json::Value, StoreError> {
            let text: String = row.try_get(col)?;
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("jobs.{col}: {e}")))
        };
        let error: Option<String> = row.try_get("error")?;
        Ok(Some(JobRecord {
            id: row.try_get("id")?,
            model: row.try_get("model")?,
            state: row.try_get("state")?,
            created_ms: row.try_get("created_ms")?,
            finished_ms: row.try_get("finished_ms")?,
            request: json("request")?,
            progress: json("progress")?,
            error: error
                .map(|e| serde_json::from_str(&e))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("jobs.error: {e}")))?,
            api_key_id: row.try_get("api_key_id")?,
        }))
    }

    fn generation_from(row: &AnyRow) -> Result<GenerationRecord, StoreError> {
        let seeds: String = row.try_get("seeds")?;
        let timings: String = row.try_get("timings")?;
        Ok(GenerationRecord {
            id: row.try_get("id")?,
            created_ms: row.try_get("created_ms")?,
            model: row.try_get("model")?,
            model_version: row.try_get("model_version")?,
            prompt: row.try_get("prompt")?,
            negative_prompt: row.try_get("negative_prompt")?,
            kind: row.try_get("kind")?,
            width: row.try_get("width")?,
            height: row.try_get("height")?,
            frames: row.try_get("frames")?,
            steps: row.try_get("steps")?,
            guidance: row.try_get("guidance")?,
            seeds: serde_json::from_str(&seeds).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            batch_size: row.try_get("batch_size")?,
            timings: serde_json::from_str(&timings)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            api_key_id: row.try_get("api_key_id")?,
            outputs: Vec::new(),
        })
    }

    /// A generation with its kept outputs, or `None`.
    pub async fn generation(&self, id: &str) -> Result<Option<GenerationRecord>, StoreError> {
        let Some(row) = sqlx::query("SELECT * FROM generations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut g = Self::generation_from(&row)?;
        let rows = sqlx::query(
            "SELECT output_index, media_type, data FROM outputs WHERE generation_id = $1 \
             ORDER BY output_index",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        for r in rows {
            g.outputs.push(StoredOutput {
                index: r.try_get("output_index")?,
                media_type: r.try_get("media_type")?,
                data: r.try_get("data")?,
            });
        }
        Ok(Some(g))
    }

    pub async fn insert_feedback(&self, f: &FeedbackRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO feedback (id, generation_id, output_index, score, thumbs, comment, \
             created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&f.id)
        .bind(&f.generation_id)
        .bind(f.output_index)
        .bind(f.score)
        .bind(f.thumbs.clone())
        .bind(f.comment.clone())
        .bind(f.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn feedback_for(
        &self,
        generation_id: &str,
    ) -> Result<Vec<FeedbackRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM feedback WHERE generation_id = $1 ORDER BY created_ms, id")
                .bind(generation_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(FeedbackRecord {
                    id: r.try_get("id")?,
                    generation_id: r.try_get("generation_id")?,
                    output_index: r.try_get("output_index")?,
                    score: r.try_get("score")?,
                    thumbs: r.try_get("thumbs")?,
                    comment: r.try_get("comment")?,
                    created_ms: r.try_get("created_ms")?,
                })
            })
            .collect()
    }

    /// Every prompt logged since `since_ms` (for `model` when given), with its traffic and
    /// mean rating.
    pub async fn prompt_stats(
        &self,
        since_ms: i64,
        model: Option<&str>,
    ) -> Result<Vec<PromptStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.prompt AS prompt, g.kind AS kind, COUNT(DISTINCT g.id) AS generations, \
             COUNT(f.id) AS ratings, AVG(f.score) AS mean_score \
             FROM generations g LEFT JOIN feedback f ON f.generation_id = g.id \
             WHERE g.created_ms >= $1 AND ($2 = '' OR g.model = $2) \
             GROUP BY g.prompt, g.kind ORDER BY g.prompt, g.kind",
        )
        .bind(since_ms)
        .bind(model.unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PromptStats {
                    prompt: r.try_get("prompt")?,
                    kind: r.try_get("kind")?,
                    generations: r.try_get("generations")?,
                    ratings: r.try_get("ratings")?,
                    mean_score: r.try_get("mean_score")?,
                })
            })
            .collect()
    }

    /// Rated outputs whose pixels were kept, since `since_ms`.
    pub async fn rated_outputs(&self, since_ms: i64) -> Result<Vec<RatedOutput>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.prompt AS prompt, o.media_type AS media_type, o.data AS data, \
             f.score AS score FROM feedback f \
             JOIN generations g ON g.id = f.generation_id \
             JOIN outputs o ON o.generation_id = f.generation_id \
             AND o.output_index = f.output_index \
             WHERE g.created_ms >= $1 ORDER BY f.created_ms, f.id",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RatedOutput {
                    prompt: r.try_get("prompt")?,
                    media_type: r.try_get("media_type")?,
                    data: r.try_get("data")?,
                    score: r.try_get("score")?,
                })
            })
            .collect()
    }

    /// The ratings of each version of `model` among generations made since `since_ms`.
    pub async fn rating_stats(
        &self,
        model: &str,
        since_ms: i64,
    ) -> Result<Vec<RatingStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.model_version AS version, COUNT(f.id) AS n, SUM(f.score) AS total, \
             SUM(f.score * f.score) AS total_sq FROM feedback f \
             JOIN generations g ON g.id = f.generation_id \
             WHERE g.model = $1 AND g.created_ms >= $2 \
             GROUP BY g.model_version ORDER BY g.model_version",
        )
        .bind(model)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RatingStats {
                    version: r.try_get("version")?,
                    n: r.try_get("n")?,
                    sum: r.try_get::<Option<f64>, _>("total")?.unwrap_or(0.0),
                    sum_sq: r.try_get::<Option<f64>, _>("total_sq")?.unwrap_or(0.0),
                })
            })
            .collect()
    }

    pub async fn insert_rollout_decision(&self, d: &RolloutDecision) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rollout_decisions (id, model, created_ms, action, decided_by, \
             stable_version, canary_version, share, reason, stats) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&d.id)
        .bind(&d.model)
        .bind(d.created_ms)
        .bind(&d.action)
        .bind(&d.decided_by)
        .bind(&d.stable_version)
        .bind(&d.canary_version)
        .bind(d.share)
        .bind(&d.reason)
        .bind(d.stats.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest `limit` rollout decisions of `model`, newest first.
    pub async fn rollout_decisions(
        &self,
        model: &str,
        limit: i64,
    ) -> Result<Vec<RolloutDecision>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM rollout_decisions WHERE model = $1 \
             ORDER BY created_ms DESC, id DESC LIMIT $2",
        )
        .bind(model)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let stats: String = r.try_get("stats")?;
                Ok(RolloutDecision {
                    id: r.try_get("id")?,
                    model: r.try_get("model")?,
                    created_ms: r.try_get("created_ms")?,
                    action: r.try_get("action")?,
                    decided_by: r.try_get("decided_by")?,
                    stable_version: r.try_get("stable_version")?,
                    canary_version: r.try_get("canary_version")?,
                    share: r.try_get("share")?,
                    reason: r.try_get("reason")?,
                    stats: serde_json::from_str(&stats).map_err(|e| {
                        StoreError::Corrupt(format!("rollout_decisions.stats: {e}"))
                    })?,
                })
            })
            .collect()
    }

    /// Runs raw SQL (tests use it to break and repair the schema under a live server).
    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }
}

/// Inserts a generation and its kept outputs inside the caller's transaction.
async fn insert_generation_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    g: &GenerationRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO generations (id, created_ms, model, model_version, prompt, \
         negative_prompt, kind, width, height, frames, steps, guidance, seeds, batch_size, \
         timings, api_key_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         $13, $14, $15, $16)",
    )
    .bind(&g.id)
    .bind(g.created_ms)
    .bind(&g.model)
    .bind(&g.model_version)
    .bind(&g.prompt)
    .bind(&g.negative_prompt)
    .bind(&g.kind)
    .bind(g.width)
    .bind(g.height)
    .bind(g.frames)
    .bind(g.steps)
    .bind(g.guidance)
    .bind(serde_json::to_string(&g.seeds).unwrap_or_default())
    .bind(g.batch_size)
    .bind(g.timings.to_string())
    .bind(g.api_key_id.clone())
    .execute(&mut **tx)
    .await?;
    for o in &g.outputs {
        sqlx::query(
            "INSERT INTO outputs (generation_id, output_index, media_type, data) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&g.id)
        .bind(o.index)
        .bind(&o.media_type)
        .bind(&o.data)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
