-- Times are microseconds since the Unix epoch, UTC.

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    plugin           TEXT    NOT NULL,
    method           TEXT    NOT NULL,
    params           TEXT    NOT NULL,  -- JSON
    priority         INTEGER NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    status           TEXT    NOT NULL CHECK (status IN ('waiting', 'pending', 'running', 'succeeded', 'failed', 'cancelled')),
    run_at           INTEGER NOT NULL,
    delay_us         INTEGER NOT NULL DEFAULT 0,  -- a chained job's delay, counted from its release
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    output           TEXT,              -- JSON
    last_error       TEXT,
    progress         REAL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    parent_id        INTEGER REFERENCES jobs (id)
);

-- Claims walk this index in order and stop after the batch; an idle daemon
-- finds the next due time with one seek per priority.
CREATE INDEX jobs_due ON jobs (priority, run_at, id) WHERE status = 'pending';
-- Lists by status, and the running jobs that lease renewal and rescue read.
-- Every index whose condition names status costs each claim and each result
-- a write, so there is no separate index of leases.
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_children ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_plugin_method ON jobs (plugin, method, id);

-- One row per run that ended, however it ended.
CREATE TABLE job_attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    duration_us INTEGER,
    error       TEXT,  -- NULL when the run succeeded
    owner       TEXT,
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;

-- One row per change of status.
CREATE TABLE job_events (
    id      INTEGER PRIMARY KEY,
    job_id  INTEGER NOT NULL REFERENCES jobs (id),
    status  TEXT    NOT NULL,
    at      INTEGER NOT NULL,
    message TEXT
);
CREATE INDEX job_events_job ON job_events (job_id, id);
