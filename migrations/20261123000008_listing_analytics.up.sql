-- The product side of GetCategoryMetrics, pre-aggregated like the sales:
-- per category and UTC day of listing (creation), the count, the sums of
-- prices and ratings, and every price in cents, sorted. A window's exact
-- median is then a selection over the window's arrays (a few hundred
-- thousand integers at most) instead of a sort of the products themselves.
-- Refreshed CONCURRENTLY together with category_daily_sales.
CREATE MATERIALIZED VIEW category_daily_listings AS
SELECT category,
       (created_at AT TIME ZONE 'UTC')::date           AS day,
       count(*)::bigint                                AS products,
       sum(price * 100)::bigint                        AS price_cents_sum,
       sum(rating)::float8                             AS rating_sum,
       array_agg((price * 100)::bigint ORDER BY price) AS prices_cents
FROM products
GROUP BY category, (created_at AT TIME ZONE 'UTC')::date;

CREATE UNIQUE INDEX category_daily_listings_key ON category_daily_listings (category, day);
CREATE INDEX category_daily_listings_day_idx ON category_daily_listings (day);

-- Replaced by the view.
DROP INDEX IF EXISTS products_listed_idx;
