-- Training runs started from Discord (bot/cogs/training.py, bot/training_store.py).
-- Adds what /train status, /train checkpoints and /adapter promote read back, and the
-- (attempt, seq) bookkeeping that makes engine events idempotent.

ALTER TABLE training_runs ADD COLUMN guild_id INTEGER;
ALTER TABLE training_runs ADD COLUMN trigger_word TEXT NOT NULL DEFAULT '';
ALTER TABLE training_runs ADD COLUMN dataset TEXT NOT NULL DEFAULT '';
ALTER TABLE training_runs ADD COLUMN run_dir TEXT NOT NULL DEFAULT '';
ALTER TABLE training_runs ADD COLUMN loss REAL;
ALTER TABLE training_runs ADD COLUMN last_seq INTEGER NOT NULL DEFAULT -1;
ALTER TABLE training_runs ADD COLUMN recommended_step INTEGER;
ALTER TABLE training_runs ADD COLUMN chosen_step INTEGER;
ALTER TABLE training_runs ADD COLUMN promoted_as TEXT;
CREATE INDEX training_runs_status ON training_runs (status, created_at);
