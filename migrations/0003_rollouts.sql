-- Canary rollouts: every start, promotion and rollback, by the policy or by hand, with the
-- numbers it was decided on. Portable SQL, as 0001: the same file runs on SQLite and
-- PostgreSQL. `stats` is JSON text (both versions' requests, errors, ratings and reward).
CREATE TABLE rollout_decisions (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    action TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    stable_version TEXT NOT NULL,
    canary_version TEXT NOT NULL,
    share DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    stats TEXT NOT NULL
);
CREATE INDEX rollout_decisions_model ON rollout_decisions (model, created_ms);
