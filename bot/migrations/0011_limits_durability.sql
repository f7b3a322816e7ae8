-- Issue 11 (limits hold under bursts, no acknowledged job is lost).
-- The limits check runs inside the insert's write transaction on every request: count a user's
-- active jobs from an index instead of scanning their whole history.
CREATE INDEX jobs_user_status ON jobs (user_id, status);
-- How many times an engine started a training run; a run that keeps crashing the engine is
-- stopped after the limit instead of being resubmitted forever.
ALTER TABLE training_runs ADD COLUMN starts INTEGER NOT NULL DEFAULT 0;
