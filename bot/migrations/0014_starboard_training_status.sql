-- Issue 14: the gallery starboard and the live training status message.

-- A gallery post promoted by its stars ([gallery] promote_at): the highlight message posted in
-- [gallery] promote_to (message_id), or the post pinned in the gallery channel (pinned = 1).
-- Demotion deletes the highlight (or unpins) and the row.
CREATE TABLE gallery_highlights (
    gallery_message_id INTEGER PRIMARY KEY,
    channel_id         INTEGER NOT NULL,
    message_id         INTEGER,
    pinned             INTEGER NOT NULL DEFAULT 0,
    promoted_at        REAL NOT NULL
);

-- The one channel message per training run that edits itself (bot/training_live.py); kept here
-- so that it keeps updating after a bot restart. status_final_at: the final edit (checkpoint
-- table, promote button) was made.
ALTER TABLE training_runs ADD COLUMN status_channel_id INTEGER;
ALTER TABLE training_runs ADD COLUMN status_message_id INTEGER;
ALTER TABLE training_runs ADD COLUMN status_final_at REAL;
