//! SQL for sales and catalog analytics (see the migration
//! `..._sales_analytics` for the materialized view).

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

use crate::domain::error::Result;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct CategoryMetrics {
    pub category: String,
    pub products: i64,
    pub average_price_cents: f64,
    pub median_price_cents: f64,
    pub average_rating: f64,
    pub orders: i64,
    pub units_sold: i64,
    pub revenue_cents: i64,
}

/// Per category: products listed since `listed_since`, and completed sales
/// on the days from `first_day` on; only `categories` unless empty.
pub async fn category_metrics(
    conn: &mut PgConnection,
    listed_since: DateTime<Utc>,
    first_day: NaiveDate,
    categories: &[String],
) -> Result<Vec<CategoryMetrics>> {
    Ok(sqlx::query_as(
        "WITH listed AS ( \
           SELECT category, count(*) AS products, \
                  avg(price * 100)::float8 AS average_price_cents, \
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY (price * 100)::float8) AS median_price_cents, \
                  avg(rating)::float8 AS average_rating \
           FROM products \
           WHERE created_at >= $1 AND (cardinality($3::text[]) = 0 OR category = ANY($3)) \
           GROUP BY category), \
         sold AS ( \
           SELECT category, sum(orders) AS orders, sum(units) AS units, sum(revenue) AS revenue \
           FROM category_daily_sales \
           WHERE day >= $2 AND (cardinality($3::text[]) = 0 OR category = ANY($3)) \
           GROUP BY category) \
         SELECT COALESCE(l.category, s.category) AS category, \
                COALESCE(l.products, 0) AS products, \
                COALESCE(l.average_price_cents, 0) AS average_price_cents, \
                COALESCE(l.median_price_cents, 0) AS median_price_cents, \
                COALESCE(l.average_rating, 0) AS average_rating, \
                COALESCE(s.orders, 0)::bigint AS orders, \
                COALESCE(s.units, 0)::bigint AS units_sold, \
                COALESCE(s.revenue * 100, 0)::bigint AS revenue_cents \
         FROM listed l FULL JOIN sold s ON s.category = l.category \
         ORDER BY 1",
    )
    .bind(listed_since)
    .bind(first_day)
    .bind(categories)
    .fetch_all(conn)
    .await?)
}

/// Revenue of completed orders per month from `first_month` to `last_month`
/// (first days of months), zero for months without sales.
pub async fn monthly_revenue(
    conn: &mut PgConnection,
    first_month: NaiveDate,
    last_month: NaiveDate,
    category: Option<&str>,
) -> Result<Vec<(NaiveDate, i64)>> {
    Ok(sqlx::query_as(
        "SELECT m::date, COALESCE(sum(s.revenue) * 100, 0)::bigint \
         FROM generate_series($1::date, $2::date, interval '1 month') AS m \
         LEFT JOIN category_daily_sales s \
           ON s.day >= m AND s.day < m + interval '1 month' AND ($3::text IS NULL OR s.category = $3) \
         GROUP BY m ORDER BY m",
    )
    .bind(first_month)
    .bind(last_month)
    .bind(category)
    .fetch_all(conn)
    .await?)
}

/// Refreshes the sales view unless another replica is refreshing it now
/// (then returns false).
pub async fn refresh(db: &PgPool) -> Result<bool> {
    let mut tx = db.begin().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('datagate.analytics'))")
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Ok(false);
    }
    sqlx::query("REFRESH MATERIALIZED VIEW CONCURRENTLY category_daily_sales")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct TopProduct {
    pub product_id: i64,
    pub title: String,
    pub category: String,
    pub units_sold: i64,
    pub revenue_cents: i64,
}

/// The best-selling products of `categories` by revenue of completed orders
/// since `since`, at most `limit`.
pub async fn top_products(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
    categories: &[String],
    limit: i64,
) -> Result<Vec<TopProduct>> {
    Ok(sqlx::query_as(
        "SELECT p.id AS product_id, p.title, p.category, \
                sum(oi.quantity)::bigint AS units_sold, \
                (sum(oi.subtotal) * 100)::bigint AS revenue_cents \
         FROM orders o \
         JOIN order_items oi ON oi.order_id = o.id \
         JOIN products p ON p.id = oi.product_id \
         WHERE o.status = 'completed' AND o.created_at >= $1 AND p.category = ANY($2) \
         GROUP BY p.id \
         ORDER BY revenue_cents DESC, p.id \
         LIMIT $3",
    )
    .bind(since)
    .bind(categories)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct SearchDemand {
    pub category: String,
    pub searches: i64,
    pub zero_result_searches: i64,
}

/// First-page searches since `since` filtered to each category.
pub async fn search_demand(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
    categories: &[String],
) -> Result<Vec<SearchDemand>> {
    Ok(sqlx::query_as(
        "SELECT c AS category, count(s.id) AS searches, \
                count(s.id) FILTER (WHERE s.results_count = 0) AS zero_result_searches \
         FROM unnest($2::text[]) AS c \
         LEFT JOIN product_searches s \
           ON s.searched_at >= $1 AND s.page = 1 AND s.filters -> 'categories' ? c \
         GROUP BY c ORDER BY c",
    )
    .bind(since)
    .bind(categories)
    .fetch_all(conn)
    .await?)
}
