-- Issue 14 (per-image actions): how far an img2img job moves from its source (a subtle or a
-- strong variation). NULL: the engine's configured strength for the job's mode.
ALTER TABLE jobs ADD COLUMN strength REAL;
