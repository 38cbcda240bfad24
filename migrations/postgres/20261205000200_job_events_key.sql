-- Events are read by job, in id order, and never by id alone, so one index
-- on (job_id, id) serves as the primary key and the lookup index: one index
-- write fewer per event.
ALTER TABLE job_events DROP CONSTRAINT job_events_pkey;
DROP INDEX job_events_job;
ALTER TABLE job_events ADD PRIMARY KEY (job_id, id);
