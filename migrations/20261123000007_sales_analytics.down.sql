DROP INDEX IF EXISTS products_listed_idx;
DROP MATERIALIZED VIEW IF EXISTS category_daily_sales;
