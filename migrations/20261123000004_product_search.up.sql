-- Product search: full-text search over a generated tsvector, sorted
-- scans, and a vocabulary for typo correction with trigrams (pg_trgm is a
-- trusted extension: a database owner may create it without superuser
-- rights).
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

-- Sorted searches whose words match many products walk these in order and
-- stop after a page, instead of sorting every match (the planner chooses by
-- the words' frequency).
CREATE INDEX products_price_idx ON products (price, id);
CREATE INDEX products_rating_idx ON products (rating, id);
CREATE INDEX products_created_idx ON products (created_at, id);

-- Every word of every product title (lower case, 3 characters or more),
-- for correcting misspelt query words: a query none of whose words match is
-- searched again with each word replaced by its most similar title word
-- (trigram similarity over this small table, not over the titles). Words are
-- added by the triggers below and never removed: a word no title has any
-- more finds nothing, as it would if typed.
CREATE TABLE search_words (
    word TEXT PRIMARY KEY
);
CREATE INDEX search_words_trgm_idx ON search_words USING GIN (word gin_trgm_ops);

CREATE FUNCTION collect_title_words() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO search_words (word)
    SELECT DISTINCT w
    FROM changed_products, regexp_split_to_table(lower(title), '[^[:alnum:]]+') AS w
    WHERE char_length(w) >= 3
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER products_words_insert AFTER INSERT ON products
    REFERENCING NEW TABLE AS changed_products
    FOR EACH STATEMENT EXECUTE FUNCTION collect_title_words();
CREATE TRIGGER products_words_update AFTER UPDATE ON products
    REFERENCING NEW TABLE AS changed_products
    FOR EACH STATEMENT EXECUTE FUNCTION collect_title_words();

-- Which page of results a logged search asked for: insights count first
-- pages only (asking for page two is not a new search). Adding a column with
-- a constant default does not rewrite the partitions.
ALTER TABLE product_searches ADD COLUMN page INTEGER NOT NULL DEFAULT 1 CHECK (page >= 1);
