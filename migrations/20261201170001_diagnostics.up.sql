-- Diagnostics (AdminService): the extensions they read, and the table-size
-- samples their growth is computed from.
--
-- The extensions are created where the server has them and this user may
-- (pg_stat_statements must also be in shared_preload_libraries to answer);
-- where not, a NOTICE, and the RPCs that need one answer
-- FAILED_PRECONDITION EXTENSION_MISSING: the service starts without them.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements') THEN
    CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
  ELSE
    RAISE NOTICE 'pg_stat_statements is not available on this server: slow statements are not reported';
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'not allowed to create pg_stat_statements: slow statements are not reported';
END
$$;

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg') THEN
    CREATE EXTENSION IF NOT EXISTS hypopg;
  ELSE
    RAISE NOTICE 'hypopg is not available on this server: no index advice';
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'not allowed to create hypopg: no index advice';
END
$$;

-- One row per table (or partition, or partitioned table) per sampling
-- round: its total size then.
CREATE TABLE table_size_samples (
    table_name text NOT NULL,
    sampled_at timestamptz NOT NULL,
    total_bytes bigint NOT NULL,
    PRIMARY KEY (table_name, sampled_at)
);
CREATE INDEX table_size_samples_sampled_at_idx ON table_size_samples (sampled_at);
