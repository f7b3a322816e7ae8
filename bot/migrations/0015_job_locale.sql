-- Issue 14 (languages): the catalog of the requester's Discord language ("ja", "zh_CN"), so messages
-- written without an interaction (progress edits, the result, a late delivery) use it. NULL: English.
ALTER TABLE jobs ADD COLUMN locale TEXT;
