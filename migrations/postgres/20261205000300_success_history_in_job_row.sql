-- Most jobs run once and succeed, and until now each such job wrote three
-- history rows besides its own: a `pending` or `waiting` event at dispatch,
-- and at the end an attempt row and a `succeeded` event. All three repeat
-- what the job row holds (created_at, the status, started_at and
-- finished_at), except who ran the last attempt and for how long. Those two
-- now stay in the job row, and the store reads the dispatch event, the
-- succeeded attempt and its event from there. A drain of no-op jobs then
-- inserts no row at all: two updates of the job row are all it writes.
--
-- Rows that earlier versions stored stay valid: the store adds a derived
-- event or attempt only where no stored row already says the same.
ALTER TABLE jobs
    ADD COLUMN attempt_owner       TEXT,    -- the daemon that ran a succeeded job's last attempt
    ADD COLUMN attempt_duration_us BIGINT;  -- how long that attempt ran
