DROP TABLE IF EXISTS table_size_samples;
-- hypopg holds nothing (hypothetical indexes live in a session's memory).
-- pg_stat_statements is left: operators often install it themselves, and
-- its statistics are server-wide.
DROP EXTENSION IF EXISTS hypopg;
