CREATE INDEX IF NOT EXISTS products_listed_idx ON products (created_at) INCLUDE (category, price, rating);
DROP MATERIALIZED VIEW IF EXISTS category_daily_listings;
