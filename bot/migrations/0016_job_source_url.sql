-- /imagine image: the attachment's address, stored with the job before the acknowledgement, so a bot
-- stopped while it fetched the picture fetches it again on its next start (bot.picture_jobs). NULL: none.
ALTER TABLE jobs ADD COLUMN source_url TEXT;
