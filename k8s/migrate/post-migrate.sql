-- Run after `datagate migrate up`, as the migration role (datagate_migrator).
-- Idempotent: the migration Job runs it after every migration, and
-- docker-compose.yml runs it in its `db-grants` service.
--
-- The service maintains some objects at run time, and PostgreSQL ties those
-- statements to ownership (k8s/README.md, "What datagate needs from
-- PostgreSQL"):
--   - partitioned tables (product_searches, audit_log): CREATE TABLE ...
--     PARTITION OF, ATTACH / DETACH PARTITION need the parent's owner, DROP
--     TABLE the partition's owner;
--   - materialized views (category_daily_sales, category_daily_listings):
--     REFRESH MATERIALIZED VIEW needs the owner (PostgreSQL 17 adds the
--     narrower MAINTAIN privilege).
-- The migrations create them as datagate_migrator. This hands every
-- partitioned table, every partition and every materialized view of the
-- schema to datagate_maintenance, whose member the service's role is; any
-- future migration that adds such an object is covered without editing this
-- file. Partitions that the service created (owned by datagate_app) are
-- handed over as well, so one role owns them all.
--
-- It also takes write access to sqlx's migration ledger away from the
-- service: default privileges granted it like any other table.
--
-- Without a datagate_maintenance role (a deployment that runs the service
-- with the migration role, as development setups do) it changes nothing.

\set ON_ERROR_STOP on

DO $$
DECLARE
    obj record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datagate_maintenance') THEN
        RAISE NOTICE 'no role datagate_maintenance: ownership left as it is';
        RETURN;
    END IF;
    FOR obj IN
        SELECT c.oid::regclass AS name, c.relkind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND (c.relkind IN ('p', 'm') OR (c.relkind = 'r' AND c.relispartition))
          AND c.relowner <> 'datagate_maintenance'::regrole
        ORDER BY c.relname
    LOOP
        IF obj.relkind = 'm' THEN
            EXECUTE format('ALTER MATERIALIZED VIEW %s OWNER TO datagate_maintenance', obj.name);
        ELSE
            EXECUTE format('ALTER TABLE %s OWNER TO datagate_maintenance', obj.name);
        END IF;
        RAISE NOTICE '% is now owned by datagate_maintenance', obj.name;
    END LOOP;

    IF to_regclass('public._sqlx_migrations') IS NOT NULL
       AND EXISTS (SELECT FROM pg_roles WHERE rolname = 'datagate_app') THEN
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public._sqlx_migrations FROM datagate_app;
    END IF;
END
$$;
