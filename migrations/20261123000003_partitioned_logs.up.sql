-- High-volume, append-only logs, range-partitioned by month on their
-- timestamp. The service creates monthly partitions ahead of time and
-- retires old ones (service/store/partitions.rs); partitions are named
-- <table>_pYYYYMM. A DEFAULT partition catches rows outside every monthly
-- range and is watched: rows found there are reported and moved into their
-- month's partition when that partition is created.

CREATE TABLE product_searches (
    id                 BIGINT      GENERATED ALWAYS AS IDENTITY,
    user_id            BIGINT,
    -- The normalized query text.
    query              TEXT        NOT NULL,
    filters            JSONB       NOT NULL DEFAULT '{}',
    results_count      INTEGER     NOT NULL CHECK (results_count >= 0),
    processing_time_ms REAL        NOT NULL CHECK (processing_time_ms >= 0),
    searched_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The partition key is part of every unique constraint of a partitioned table.
    CONSTRAINT product_searches_pkey PRIMARY KEY (id, searched_at)
) PARTITION BY RANGE (searched_at);

-- A user's search history, newest first.
CREATE INDEX product_searches_user_idx ON product_searches (user_id, searched_at DESC);
-- Top and zero-result queries over a window.
CREATE INDEX product_searches_time_query_idx ON product_searches (searched_at, query);
CREATE INDEX product_searches_filters_idx ON product_searches USING GIN (filters);
CREATE TABLE product_searches_default PARTITION OF product_searches DEFAULT;

CREATE TABLE audit_log (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY,
    table_name TEXT        NOT NULL,
    record_id  BIGINT      NOT NULL,
    action     TEXT        NOT NULL CONSTRAINT audit_log_action_check
                           CHECK (action IN ('insert', 'update', 'delete')),
    -- The caller (token name) and request id of the change.
    actor      TEXT        NOT NULL,
    request_id TEXT,
    old_values JSONB,
    new_values JSONB,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT audit_log_pkey PRIMARY KEY (id, changed_at)
) PARTITION BY RANGE (changed_at);

-- A record's history, newest first.
CREATE INDEX audit_log_record_idx ON audit_log (table_name, record_id, changed_at DESC);
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
