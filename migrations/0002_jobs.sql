-- Job state, one row per finished job, so that any replica sharing this log can answer
-- `GET /jobs/{id}` (and `GET /v1/videos/{id}`) for a job another replica ran, or one that
-- left this replica's memory. Portable SQL, as 0001: the same file runs on SQLite and
-- PostgreSQL. `request`, `progress` and `error` are JSON text (the validated request, the
-- final progress, the engine error); a completed job's outputs are its `generations` row's.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT NOT NULL,
    request TEXT NOT NULL,
    progress TEXT NOT NULL,
    error TEXT,
    api_key_id TEXT
);
CREATE INDEX jobs_finished ON jobs (finished_ms);
