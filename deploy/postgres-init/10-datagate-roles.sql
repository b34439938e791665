-- datagate's PostgreSQL roles: a migration role that owns the schema, and a
-- least-privilege role for the running service.
--
--   datagate_migrator     LOGIN. Owns the database, schema `public` and every
--                         object the migrations create. Used only by
--                         `datagate migrate up` (and `datagate seed`).
--   datagate_app          LOGIN. The service. SELECT/INSERT/UPDATE/DELETE on
--                         tables, USAGE on sequences, EXECUTE on functions,
--                         granted by default privileges as the migrator
--                         creates them. Member of datagate_maintenance.
--   datagate_maintenance  NOLOGIN. Owns only what the service must maintain
--                         at run time, because PostgreSQL ties those statements
--                         to ownership (see k8s/README.md, "What datagate
--                         needs from PostgreSQL"):
--                           - the partitioned tables product_searches and
--                             audit_log with their partitions: the service
--                             runs CREATE TABLE ... PARTITION OF, ATTACH /
--                             DETACH PARTITION and DROP TABLE on them
--                             (service/store/partitions.rs);
--                           - the materialized views category_daily_sales and
--                             category_daily_listings: the service runs
--                             REFRESH MATERIALIZED VIEW CONCURRENTLY
--                             (service/store/analytics.rs).
--                         Those objects are handed to it after each
--                         migration by k8s/migrate/post-migrate.sql.
--
-- Run once per database, as a superuser (or a role with CREATEROLE that owns
-- the database), connected to the datagate database. Re-running it is safe.
--
--   docker compose: runs automatically on the first start of an empty
--   volume (mounted into /docker-entrypoint-initdb.d) with the DEV-ONLY
--   passwords below.
--
--   anywhere else: give real passwords, e.g.
--     psql -v ON_ERROR_STOP=1 -d datagate \
--          -v migrator_password="$MIGRATOR_PASSWORD" -v app_password="$APP_PASSWORD" \
--          -f deploy/postgres-init/10-datagate-roles.sql
--   (on an existing role the password is left as it is).

\set ON_ERROR_STOP on

\if :{?migrator_password}
\else
\set migrator_password 'dev-only-migrator-password'
\endif
\if :{?app_password}
\else
\set app_password 'dev-only-app-password'
\endif

SELECT format('CREATE ROLE datagate_migrator LOGIN PASSWORD %L', :'migrator_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datagate_migrator') \gexec
SELECT 'CREATE ROLE datagate_maintenance NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datagate_maintenance') \gexec
SELECT format('CREATE ROLE datagate_app LOGIN PASSWORD %L', :'app_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datagate_app') \gexec

-- The migrator owns the database and schema public, so it may create the
-- schema's objects and the trusted extension pg_trgm without superuser rights.
SELECT format('ALTER DATABASE %I OWNER TO datagate_migrator', current_database()) \gexec
ALTER SCHEMA public OWNER TO datagate_migrator;

-- Nobody else connects or creates objects here (PostgreSQL 14 and older grant
-- CREATE on public to everyone).
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The service connects. REFRESH MATERIALIZED VIEW CONCURRENTLY builds its
-- diff in a temporary table as the view's owner, so that owner needs TEMPORARY.
SELECT format('GRANT CONNECT ON DATABASE %I TO datagate_app', current_database()) \gexec
SELECT format('GRANT TEMPORARY ON DATABASE %I TO datagate_maintenance', current_database()) \gexec
GRANT USAGE ON SCHEMA public TO datagate_app, datagate_maintenance;

-- New monthly partitions are created in schema public (CREATE on the schema)
-- by the service, which acts through its membership in datagate_maintenance.
-- This is the one schema-wide right the service holds: it could also create
-- other tables in public. PostgreSQL has no narrower grant for "create
-- partitions of this table".
GRANT CREATE ON SCHEMA public TO datagate_maintenance;
GRANT datagate_maintenance TO datagate_app;

-- The migrator can act as the service's roles, so that later migrations can
-- alter the maintained tables and the partitions the service created, and
-- post-migrate.sql can hand objects to datagate_maintenance.
GRANT datagate_app TO datagate_migrator;

-- Everything the migrator creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE datagate_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO datagate_app;
ALTER DEFAULT PRIVILEGES FOR ROLE datagate_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO datagate_app;
ALTER DEFAULT PRIVILEGES FOR ROLE datagate_migrator IN SCHEMA public
    GRANT EXECUTE ON FUNCTIONS TO datagate_app;
-- A REFRESH runs the view's query with its owner's rights: the maintenance
-- role reads the tables the views aggregate (orders, order_items, products).
ALTER DEFAULT PRIVILEGES FOR ROLE datagate_migrator IN SCHEMA public
    GRANT SELECT ON TABLES TO datagate_maintenance;

-- What already exists (this script run on a database migrated before).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO datagate_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO datagate_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO datagate_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO datagate_maintenance;
