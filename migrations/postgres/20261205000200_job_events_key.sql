-- Events are read by job, in id order, and never by id alone, so one index
-- on (job_id, id) serves as the primary key and the lookup index: one index
-- write fewer per event.
-- NOTE: building the new key blocks writes to job_events, so on a large
-- table this migration holds up claims and results until it is done.
ALTER TABLE job_events DROP CONSTRAINT job_events_pkey;
DROP INDEX job_events_job;
ALTER TABLE job_events ADD PRIMARY KEY (job_id, id);
