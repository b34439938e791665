-- Product search: full-text search over a generated tsvector, and
-- typo-tolerant title matching with trigrams (pg_trgm is a trusted
-- extension: a database owner may create it without superuser rights).
--
-- Weights: the title counts most (A), then the category (B), then the
-- description (C); ts_rank uses them for relevance. The column is STORED, so
-- adding it rewrites the table once; searches never compute it.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

ALTER TABLE products ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english', title), 'A')
    || setweight(to_tsvector('english', category), 'B')
    || setweight(to_tsvector('english', description), 'C')
) STORED;

CREATE INDEX products_search_idx ON products USING GIN (search_vector);
-- Only searched when no word of a query matches (see service/store/search.rs).
CREATE INDEX products_title_trgm_idx ON products USING GIN (title gin_trgm_ops);

-- Which page of results a logged search asked for: insights count first
-- pages only (asking for page two is not a new search). Adding a column with
-- a constant default does not rewrite the partitions.
ALTER TABLE product_searches ADD COLUMN page INTEGER NOT NULL DEFAULT 1 CHECK (page >= 1);
