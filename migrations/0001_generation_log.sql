-- The generation log and user feedback. Portable SQL: the same file runs on SQLite and
-- PostgreSQL (times are Unix milliseconds, lists are JSON text, media is base64 text).
CREATE TABLE generations (
    id TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    kind TEXT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    frames BIGINT NOT NULL,
    steps BIGINT NOT NULL,
    guidance DOUBLE PRECISION NOT NULL,
    seeds TEXT NOT NULL,
    batch_size BIGINT NOT NULL,
    timings TEXT NOT NULL,
    api_key_id TEXT
);
CREATE INDEX generations_created ON generations (created_ms);

CREATE TABLE outputs (
    generation_id TEXT NOT NULL REFERENCES generations (id),
    output_index BIGINT NOT NULL,
    media_type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (generation_id, output_index)
);

CREATE TABLE feedback (
    id TEXT PRIMARY KEY,
    generation_id TEXT NOT NULL REFERENCES generations (id),
    output_index BIGINT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    thumbs TEXT,
    comment TEXT,
    created_ms BIGINT NOT NULL
);
CREATE INDEX feedback_generation ON feedback (generation_id);
