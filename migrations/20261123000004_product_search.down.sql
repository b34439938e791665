ALTER TABLE product_searches DROP COLUMN IF EXISTS page;
DROP INDEX IF EXISTS products_title_trgm_idx;
DROP INDEX IF EXISTS products_search_idx;
ALTER TABLE products DROP COLUMN IF EXISTS search_vector;
DROP EXTENSION IF EXISTS pg_trgm;
