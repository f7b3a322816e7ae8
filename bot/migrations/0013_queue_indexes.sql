-- Issue 15: the queries that run on every start and every request read an index, not the history.
-- undelivered() runs at every bot start and after every reconnect: a partial index holds only
-- finished jobs not yet shown (a handful), in the order they are delivered, so it stays tiny at
-- millions of delivered jobs.
CREATE INDEX jobs_undelivered ON jobs (finished_at)
    WHERE status IN ('completed', 'failed') AND delivered_at IS NULL;
-- count_active_in(guild) runs inside every request's insert transaction: a partial index over
-- active jobs only, so the count never walks a server's history. (count_active(user) already
-- reads the covering jobs_user_status index from 0011.)
CREATE INDEX jobs_active_guild ON jobs (guild_id) WHERE status IN ('pending', 'running');
