//! SQL for sales and catalog analytics (see the migration
//! `..._sales_analytics` for the materialized view).

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

use crate::{
    error::Result,
    model::analytics::{CategoryMetrics, SearchDemand, TopProduct},
};

#[derive(sqlx::FromRow)]
struct ListingDay {
    category: String,
    products: i64,
    price_cents_sum: i64,
    rating_sum: f64,
    prices_cents: Vec<i64>,
}

#[derive(sqlx::FromRow)]
struct SalesWindow {
    category: String,
    orders: i64,
    units: i64,
    revenue_cents: i64,
}

/// Per category: products listed on the days from `first_day` on, and
/// completed sales on those days; only `categories` unless empty. Both from
/// the pre-aggregated views; the median is selected from the days' sorted
/// price arrays.
pub async fn category_metrics(
    conn: &mut PgConnection,
    first_day: NaiveDate,
    categories: &[String],
) -> Result<Vec<CategoryMetrics>> {
    let listings: Vec<ListingDay> = sqlx::query_as(
        "SELECT category, products, price_cents_sum, rating_sum, prices_cents \
         FROM category_daily_listings \
         WHERE day >= $1 AND (cardinality($2::text[]) = 0 OR category = ANY($2))",
    )
    .bind(first_day)
    .bind(categories)
    .fetch_all(&mut *conn)
    .await?;
    let sales: Vec<SalesWindow> = sqlx::query_as(
        "SELECT category, sum(orders)::bigint AS orders, sum(units)::bigint AS units, \
                (sum(revenue) * 100)::bigint AS revenue_cents \
         FROM category_daily_sales \
         WHERE day >= $1 AND (cardinality($2::text[]) = 0 OR category = ANY($2)) \
         GROUP BY category",
    )
    .bind(first_day)
    .bind(categories)
    .fetch_all(&mut *conn)
    .await?;

    // Per category: product count, prices, sum of prices, sum of ratings.
    #[derive(Default)]
    struct Listed {
        products: i64,
        prices: Vec<i64>,
        price_sum: i64,
        rating_sum: f64,
    }
    let mut listed: std::collections::BTreeMap<String, Listed> = Default::default();
    for day in listings {
        let l = listed.entry(day.category).or_default();
        l.products += day.products;
        l.prices.extend(day.prices_cents);
        l.price_sum += day.price_cents_sum;
        l.rating_sum += day.rating_sum;
    }
    let empty = |category: String| CategoryMetrics {
        category,
        products: 0,
        average_price_cents: 0.0,
        median_price_cents: 0.0,
        average_rating: 0.0,
        orders: 0,
        units_sold: 0,
        revenue_cents: 0,
    };
    let mut result: Vec<CategoryMetrics> = listed
        .into_iter()
        .map(|(category, mut l)| {
            let n = l.products.max(1) as f64;
            CategoryMetrics {
                products: l.products,
                average_price_cents: l.price_sum as f64 / n,
                median_price_cents: median(&mut l.prices),
                average_rating: l.rating_sum / n,
                ..empty(category)
            }
        })
        .collect();
    for sold in sales {
        match result.iter_mut().find(|m| m.category == sold.category) {
            Some(m) => {
                m.orders = sold.orders;
                m.units_sold = sold.units;
                m.revenue_cents = sold.revenue_cents;
            }
            None => result.push(CategoryMetrics {
                orders: sold.orders,
                units_sold: sold.units,
                revenue_cents: sold.revenue_cents,
                ..empty(sold.category)
            }),
        }
    }
    result.sort_by(|a, b| a.category.cmp(&b.category));
    Ok(result)
}

/// The median (the mean of the middle two for an even count), by selection.
fn median(values: &mut [i64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let (_, upper, _) = values.select_nth_unstable(n / 2);
    let upper = *upper as f64;
    if n % 2 == 1 {
        return upper;
    }
    let lower = *values[..n / 2]
        .iter()
        .max()
        .expect("n is even and positive") as f64;
    (lower + upper) / 2.0
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

/// Refreshes the analytics views unless another replica is refreshing it now
/// (then returns false). Inside a call (AdminService.RefreshAnalytics) its
/// statements are bounded by the call's deadline; in the background they
/// have no limit (the serving pool's default, the longest call, may be
/// shorter than a refresh of a large view), set in the lock's statement.
pub async fn refresh(db: &PgPool) -> Result<bool> {
    let mut tx = super::postgres::begin(db).await?;
    let timeout = super::postgres::current_budget()?
        .map_or(0, super::postgres::millis)
        .to_string();
    let (locked, _): (bool, String) = sqlx::query_as(
        "SELECT pg_try_advisory_xact_lock(hashtext('datagate.analytics')), \
                set_config('statement_timeout', $1, true)",
    )
    .bind(timeout)
    .fetch_one(&mut *tx)
    .await?;
    if !locked {
        return Ok(false);
    }
    for view in ["category_daily_sales", "category_daily_listings"] {
        sqlx::query(&format!("REFRESH MATERIALIZED VIEW CONCURRENTLY {view}"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
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

#[cfg(test)]
mod tests {
    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(super::median(&mut [5, 1, 3]), 3.0);
        assert_eq!(super::median(&mut [4, 1, 3, 2]), 2.5);
        assert_eq!(super::median(&mut [7]), 7.0);
        assert_eq!(super::median(&mut []), 0.0);
    }
}
