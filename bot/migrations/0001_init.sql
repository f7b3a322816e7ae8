-- Arcae bot memory, version 1. Applied in one transaction by bot/db.py.

CREATE TABLE users (
    user_id     INTEGER PRIMARY KEY,
    fast        INTEGER,            -- NULL = configured default
    aspect      TEXT,
    negative    TEXT,
    style       TEXT,
    updated_at  REAL NOT NULL
);

CREATE TABLE jobs (
    job_id            TEXT PRIMARY KEY,
    user_id           INTEGER NOT NULL,
    guild_id          INTEGER,
    channel_id        INTEGER NOT NULL,
    kind              TEXT NOT NULL DEFAULT 'txt2img' CHECK (kind IN ('txt2img', 'variation', 'upscale')),
    status            TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'canceled')),
    params_json       TEXT NOT NULL,  -- protocol.GenerationParams as asked
    source_image      TEXT,           -- img2img: file name in the outputs directory
    parent_job_id     TEXT,
    resolved_json     TEXT,           -- protocol.ResolvedParams: exactly what ran
    nsfw_channel      INTEGER NOT NULL DEFAULT 0,
    attempt           INTEGER NOT NULL DEFAULT 1,
    last_seq          INTEGER NOT NULL DEFAULT -1,
    error             TEXT,
    interaction_id    INTEGER,
    interaction_token TEXT,
    application_id    INTEGER,
    attachment_limit  INTEGER,        -- the interaction's upload limit in bytes
    message_id        INTEGER,        -- the message that shows this job to the user
    created_at        REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    delivered_at      REAL,
    elapsed_s         REAL
);
CREATE INDEX jobs_status ON jobs (status);
CREATE INDEX jobs_user ON jobs (user_id, created_at);

CREATE TABLE images (
    job_id              TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    idx                 INTEGER NOT NULL,
    path                TEXT NOT NULL,
    seed                INTEGER NOT NULL,
    width               INTEGER NOT NULL,
    height              INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    rating              TEXT,
    gallery_channel_id  INTEGER,
    gallery_message_id  INTEGER,
    stars               INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX images_seed ON images (seed);
CREATE INDEX images_gallery ON images (gallery_message_id);

CREATE TABLE stars (
    gallery_message_id INTEGER NOT NULL,
    user_id            INTEGER NOT NULL,
    PRIMARY KEY (gallery_message_id, user_id)
);

CREATE TABLE adapters (
    name            TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    triggers_json   TEXT NOT NULL DEFAULT '[]',
    default_weight  REAL NOT NULL DEFAULT 1.0,
    description     TEXT NOT NULL DEFAULT '',
    sha256          TEXT NOT NULL DEFAULT '',
    updated_at      REAL NOT NULL
);

CREATE TABLE training_runs (
    run_id        TEXT PRIMARY KEY,
    adapter_name  TEXT NOT NULL,
    kind          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'canceled')),
    options_json  TEXT NOT NULL DEFAULT '{}',
    created_by    INTEGER NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 1,
    progress_step INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    result_json   TEXT,
    error         TEXT,
    channel_id    INTEGER,
    created_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL
);

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    user_id     INTEGER NOT NULL,
    guild_id    INTEGER,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL DEFAULT '',
    detail_json TEXT NOT NULL DEFAULT '{}'
);
