-- Analytics over orders and products.
--
-- category_daily_sales: revenue, orders and units of completed orders per
-- product category and UTC day. Refreshed CONCURRENTLY (readers are never
-- blocked; the unique index makes that possible) by the service on a
-- schedule and by AdminService.RefreshAnalytics. GetRevenueTrend and the
-- sales part of GetCategoryMetrics read it, so they are as fresh as the last
-- refresh.
CREATE MATERIALIZED VIEW category_daily_sales AS
SELECT p.category,
       (o.created_at AT TIME ZONE 'UTC')::date AS day,
       count(DISTINCT o.id)::bigint            AS orders,
       sum(oi.quantity)::bigint                AS units,
       sum(oi.subtotal)                        AS revenue
FROM orders o
JOIN order_items oi ON oi.order_id = o.id
JOIN products p ON p.id = oi.product_id
WHERE o.status = 'completed'
GROUP BY p.category, (o.created_at AT TIME ZONE 'UTC')::date;

CREATE UNIQUE INDEX category_daily_sales_key ON category_daily_sales (category, day);
CREATE INDEX category_daily_sales_day_idx ON category_daily_sales (day);

-- The product side of GetCategoryMetrics (products listed in a window, their
-- prices and ratings) from the index alone.
CREATE INDEX products_listed_idx ON products (created_at) INCLUDE (category, price, rating);
