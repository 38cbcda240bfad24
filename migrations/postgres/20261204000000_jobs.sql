-- Times come from the database clock (now(), the start of the transaction),
-- so daemons whose clocks disagree never run a job early.

CREATE TABLE jobs (
    id               BIGSERIAL PRIMARY KEY,
    plugin           TEXT        NOT NULL,
    method           TEXT        NOT NULL,
    params           TEXT        NOT NULL,  -- JSON
    priority         SMALLINT    NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    status           TEXT        NOT NULL CHECK (status IN ('waiting', 'pending', 'running', 'succeeded', 'failed', 'cancelled')),
    run_at           TIMESTAMPTZ NOT NULL,
    delay_us         BIGINT      NOT NULL DEFAULT 0,  -- a chained job's delay, counted from its release
    attempts         INTEGER     NOT NULL DEFAULT 0,
    max_attempts     INTEGER     NOT NULL CHECK (max_attempts >= 1),
    output           TEXT,                 -- JSON
    last_error       TEXT,
    progress         DOUBLE PRECISION,
    created_at       TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL,
    lease_owner      TEXT,
    lease_expires_at TIMESTAMPTZ,
    parent_id        BIGINT REFERENCES jobs (id)
);

-- Claims walk this index in order and stop after the batch.
CREATE INDEX jobs_due ON jobs (priority, run_at, id) WHERE status = 'pending';
-- Lists by status, and the running jobs that lease renewal and rescue read.
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_children ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_plugin_method ON jobs (plugin, method, id);

-- One row per run that ended, however it ended.
CREATE TABLE job_attempts (
    job_id      BIGINT      NOT NULL REFERENCES jobs (id),
    attempt     INTEGER     NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    duration_us BIGINT,
    error       TEXT,  -- NULL when the run succeeded
    owner       TEXT,
    PRIMARY KEY (job_id, attempt)
);

-- One row per change of status.
CREATE TABLE job_events (
    id      BIGSERIAL   PRIMARY KEY,
    job_id  BIGINT      NOT NULL REFERENCES jobs (id),
    status  TEXT        NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    message TEXT
);
CREATE INDEX job_events_job ON job_events (job_id, id);
