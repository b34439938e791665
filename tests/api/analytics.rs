//! AnalyticsService.GetSearchInsights, and partition pruning of its queries.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Datelike as _, NaiveDate, Utc};
use datagate::{
    config::PartitionSettings, domain::partitions::Partitions, proto::v1 as pb, store::search,
};

use crate::support::{TestApp, api_test, violated_fields};

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

/// Monthly partitions of July to November 2026, besides the app's own.
async fn partitions_from_july(app: &TestApp) {
    let settings = PartitionSettings {
        months_ahead: 4,
        search_retention_months: 120,
        audit_retention_months: 120,
        interval: std::time::Duration::ZERO,
    };
    Partitions::new(app.db.clone(), settings)
        .ensure(NaiveDate::from_ymd_opt(2026, 7, 1).unwrap())
        .await
        .unwrap();
}

struct Logged {
    query: &'static str,
    user_id: Option<i64>,
    results: i32,
    page: i32,
    at: &'static str,
}

fn logged(query: &'static str, user_id: Option<i64>, results: i32, at: &'static str) -> Logged {
    Logged {
        query,
        user_id,
        results,
        page: 1,
        at,
    }
}

#[api_test]
async fn insights_count_first_page_searches_inside_the_window() {
    let app = TestApp::spawn().await;
    partitions_from_july(&app).await;
    let rows = [
        logged("lamp", Some(1), 5, "2026-09-01T00:00:00Z"),
        logged("lamp", Some(2), 3, "2026-09-10T08:00:00Z"),
        logged("lamp", None, 0, "2026-09-12T08:00:00Z"),
        logged("sofa", Some(1), 0, "2026-09-13T08:00:00Z"),
        logged("sofa", Some(1), 0, "2026-09-14T08:00:00Z"),
        logged("desk", Some(3), 2, "2026-09-30T23:59:59Z"),
        logged("zzz", None, 0, "2026-09-20T10:00:00Z"),
        // Asking for page two is not a new search.
        Logged {
            page: 2,
            ..logged("lamp", Some(1), 4, "2026-09-01T00:00:01Z")
        },
        // Outside [September, October).
        logged("lamp", Some(9), 0, "2026-10-01T00:00:00Z"),
        logged("chair", Some(9), 0, "2026-08-31T23:59:59Z"),
    ];
    for (i, row) in rows.iter().enumerate() {
        sqlx::query(
            "INSERT INTO product_searches \
               (user_id, query, results_count, processing_time_ms, page, searched_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(row.user_id)
        .bind(row.query)
        .bind(row.results)
        .bind(i as f32 + 1.0)
        .bind(row.page)
        .bind(at(row.at))
        .execute(&app.db)
        .await
        .unwrap();
    }

    let (start, end) = (at("2026-09-01T00:00:00Z"), at("2026-10-01T00:00:00Z"));
    let insights = app
        .analytics()
        .await
        .get_search_insights(pb::GetSearchInsightsRequest {
            start_time: Some(timestamp(start)),
            end_time: Some(timestamp(end)),
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();

    // The expected figures, computed from the rows.
    let counted: Vec<(usize, &Logged)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.page == 1 && (start..end).contains(&at(r.at)))
        .collect();
    let expect = |zero_only: bool| {
        let mut per_query: BTreeMap<&str, Vec<(usize, &Logged)>> = BTreeMap::new();
        for (i, r) in &counted {
            if !zero_only || r.results == 0 {
                per_query.entry(r.query).or_default().push((*i, *r));
            }
        }
        let mut stats: Vec<pb::QueryStats> = per_query
            .into_iter()
            .map(|(query, rs)| pb::QueryStats {
                query: query.into(),
                searches: rs.len() as i64,
                users: rs
                    .iter()
                    .filter_map(|(_, r)| r.user_id)
                    .collect::<HashSet<_>>()
                    .len() as i64,
                average_results: rs.iter().map(|(_, r)| f64::from(r.results)).sum::<f64>()
                    / rs.len() as f64,
                average_processing_ms: rs.iter().map(|(i, _)| *i as f64 + 1.0).sum::<f64>()
                    / rs.len() as f64,
            })
            .collect();
        // Most searched first, ties by query; the limit was 2.
        stats.sort_by(|a, b| b.searches.cmp(&a.searches).then(a.query.cmp(&b.query)));
        stats.truncate(2);
        stats
    };
    assert_eq!(insights.total_searches, counted.len() as i64);
    assert_eq!(
        insights.zero_result_searches,
        counted.iter().filter(|(_, r)| r.results == 0).count() as i64
    );
    let close = |a: &[pb::QueryStats], b: &[pb::QueryStats]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.query == y.query
                    && x.searches == y.searches
                    && x.users == y.users
                    && (x.average_results - y.average_results).abs() < 1e-9
                    && (x.average_processing_ms - y.average_processing_ms).abs() < 1e-6
            })
    };
    let top = expect(false);
    assert!(
        close(&insights.top_queries, &top),
        "{:?}\n!=\n{top:?}",
        insights.top_queries
    );
    let zero = expect(true);
    assert!(
        close(&insights.zero_result_queries, &zero),
        "{:?}\n!=\n{zero:?}",
        insights.zero_result_queries
    );
    // Spelled out, so that a mistake shared by the code and the expectation shows.
    let names = |s: &[pb::QueryStats]| s.iter().map(|q| q.query.clone()).collect::<Vec<_>>();
    assert_eq!(names(&insights.top_queries), ["lamp", "sofa"]);
    assert_eq!(names(&insights.zero_result_queries), ["sofa", "lamp"]);
    assert_eq!(insights.total_searches, 7);
}

/// Every relation a JSON plan reads.
fn relations(plan: &serde_json::Value, found: &mut BTreeSet<String>) {
    match plan {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(name)) = map.get("Relation Name") {
                found.insert(name.clone());
            }
            map.values().for_each(|v| relations(v, found));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| relations(v, found)),
        _ => {}
    }
}

#[api_test]
async fn a_one_month_window_scans_only_that_months_partition() {
    let app = TestApp::spawn().await;
    partitions_from_july(&app).await;
    let (start, end) = (at("2026-09-01T00:00:00Z"), at("2026-10-01T00:00:00Z"));
    for sql in [
        search::TOP_QUERIES,
        search::ZERO_RESULT_QUERIES,
        search::SEARCH_TOTALS,
    ] {
        let explain = format!("EXPLAIN (FORMAT JSON) {sql}");
        let mut query = sqlx::query_scalar::<_, serde_json::Value>(&explain)
            .bind(start)
            .bind(end);
        if sql.contains("$3") {
            query = query.bind(10_i64);
        }
        let plan = query.fetch_one(&app.db).await.unwrap();
        let mut scanned = BTreeSet::new();
        relations(&plan, &mut scanned);
        assert_eq!(
            scanned,
            BTreeSet::from(["product_searches_p202609".to_owned()]),
            "{sql}\n{plan:#}"
        );
    }

    // A window across a month boundary reads both months, and only them.
    let plan = sqlx::query_scalar::<_, serde_json::Value>(&format!(
        "EXPLAIN (FORMAT JSON) {}",
        search::SEARCH_TOTALS
    ))
    .bind(at("2026-08-20T00:00:00Z"))
    .bind(at("2026-09-10T00:00:00Z"))
    .fetch_one(&app.db)
    .await
    .unwrap();
    let mut scanned = BTreeSet::new();
    relations(&plan, &mut scanned);
    assert_eq!(
        scanned,
        BTreeSet::from([
            "product_searches_p202608".to_owned(),
            "product_searches_p202609".to_owned()
        ])
    );
}

#[api_test]
async fn insight_windows_must_be_given_ordered_and_at_most_a_year() {
    let app = TestApp::spawn().await;
    let mut client = app.analytics().await;
    let t = |s: &str| Some(timestamp(at(s)));
    let cases = [
        (None, None, 0, vec!["end_time", "start_time"]),
        (
            t("2026-09-02T00:00:00Z"),
            t("2026-09-01T00:00:00Z"),
            0,
            vec!["end_time"],
        ),
        (
            t("2026-09-01T00:00:00Z"),
            t("2026-09-01T00:00:00Z"),
            0,
            vec!["end_time"],
        ),
        (
            t("2025-01-01T00:00:00Z"),
            t("2026-09-01T00:00:00Z"),
            0,
            vec!["end_time"],
        ),
        (
            t("2026-09-01T00:00:00Z"),
            t("2026-09-02T00:00:00Z"),
            -1,
            vec!["limit"],
        ),
    ];
    for (start_time, end_time, limit, fields) in cases {
        let status = client
            .get_search_insights(pb::GetSearchInsightsRequest {
                start_time,
                end_time,
                limit,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), fields);
    }
}

/// A product listed (created) at `created_at`.
async fn listed(
    app: &TestApp,
    category: &str,
    price_cents: i64,
    rating: f64,
    created_at: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "WITH p AS (INSERT INTO products (sku, title, category, price, rating, created_at, updated_at) \
                    VALUES ($1, 'Item', $2, $3::bigint / 100.0, $4, $5, $5) RETURNING id) \
         INSERT INTO inventory (product_id, quantity) SELECT id, 100 FROM p RETURNING product_id",
    )
    .bind(format!("A-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]))
    .bind(category)
    .bind(price_cents)
    .bind(rating)
    .bind(created_at)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// An order of `lines` (product, quantity, unit price in cents) placed at `at`.
async fn ordered(
    app: &TestApp,
    user_id: i64,
    status: &str,
    at: DateTime<Utc>,
    lines: &[(i64, i32, i64)],
) {
    let total: i64 = lines.iter().map(|(_, q, p)| i64::from(*q) * p).sum();
    let order_id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (user_id, status, total, created_at, updated_at) \
         VALUES ($1, $2, $3::bigint / 100.0, $4, $4) RETURNING id",
    )
    .bind(user_id)
    .bind(status)
    .bind(total)
    .bind(at)
    .fetch_one(&app.db)
    .await
    .unwrap();
    for (product_id, quantity, unit_cents) in lines {
        sqlx::query(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
             VALUES ($1, $2, $3, $4::bigint / 100.0)",
        )
        .bind(order_id)
        .bind(product_id)
        .bind(quantity)
        .bind(unit_cents)
        .execute(&app.db)
        .await
        .unwrap();
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[api_test]
async fn category_metrics_and_the_revenue_trend_match_figures_computed_from_the_rows() {
    let app = TestApp::spawn().await;
    let now = Utc::now();
    let days = |n: i64| now - chrono::Duration::days(n);
    let (email, username) = crate::support::unique("analyst");
    let user = app.create_user(&email, &username).await;

    // (category, price cents, rating, listed days ago)
    let catalog = [
        ("tools", 1000, 4.0, 2),
        ("tools", 2000, 3.5, 3),
        ("tools", 3000, 5.0, 5),
        ("tools", 4550, 2.0, 29),
        ("tools", 8000, 1.0, 60), // listed before the 30-day window
        ("garden", 500, 4.5, 10),
        ("garden", 700, 3.0, 11),
    ];
    let mut ids = Vec::new();
    for (category, price, rating, ago) in catalog {
        ids.push(listed(&app, category, price, rating, days(ago)).await);
    }
    // (status, days ago, lines of (catalog index, quantity, unit cents))
    type Line = (usize, i32, i64);
    let orders: Vec<(&str, i64, Vec<Line>)> = vec![
        ("completed", 1, vec![(0, 2, 1000), (5, 1, 500)]),
        ("completed", 3, vec![(1, 1, 1900)]),
        ("completed", 20, vec![(4, 1, 8000), (6, 3, 700)]),
        ("pending", 1, vec![(2, 5, 3000)]),
        ("cancelled", 2, vec![(3, 1, 4550)]),
        ("completed", 45, vec![(0, 1, 1000)]),
        ("completed", 75, vec![(5, 4, 450)]),
    ];
    for (status, ago, lines) in &orders {
        let lines: Vec<(i64, i32, i64)> = lines.iter().map(|(i, q, p)| (ids[*i], *q, *p)).collect();
        ordered(&app, user.id, status, days(*ago), &lines).await;
    }

    // The sales view is as fresh as its last refresh: admins refresh it.
    let refused = app
        .admin_as(&app.reader_token)
        .await
        .refresh_analytics(pb::RefreshAnalyticsRequest {})
        .await
        .unwrap_err();
    crate::support::assert_error(
        &refused,
        tonic::Code::PermissionDenied,
        "ADMIN_ROLE_REQUIRED",
    );
    app.admin_as(&app.token)
        .await
        .refresh_analytics(pb::RefreshAnalyticsRequest {})
        .await
        .unwrap();

    let mut analytics = app.analytics().await;
    let metrics = analytics
        .get_category_metrics(pb::GetCategoryMetricsRequest {
            window_days: 30,
            categories: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .categories;

    // The same figures, from the rows above.
    let first_day = (now - chrono::Duration::days(29)).date_naive();
    let in_window = |ago: i64| days(ago).date_naive() >= first_day;
    let mut expected = Vec::new();
    for category in ["garden", "tools"] {
        let products: Vec<_> = catalog
            .iter()
            .filter(|(c, _, _, ago)| *c == category && in_window(*ago))
            .collect();
        let prices: Vec<f64> = products.iter().map(|(_, p, _, _)| *p as f64).collect();
        let sold: Vec<(i32, i64)> = orders
            .iter()
            .filter(|(status, ago, _)| *status == "completed" && in_window(*ago))
            .flat_map(|(_, _, lines)| lines.iter())
            .filter(|(i, _, _)| catalog[*i].0 == category)
            .map(|(_, q, p)| (*q, *p))
            .collect();
        let order_count = orders
            .iter()
            .filter(|(status, ago, lines)| {
                *status == "completed"
                    && in_window(*ago)
                    && lines.iter().any(|(i, _, _)| catalog[*i].0 == category)
            })
            .count();
        expected.push(pb::CategoryMetrics {
            category: category.into(),
            products: products.len() as i64,
            average_price_cents: prices.iter().sum::<f64>() / prices.len() as f64,
            median_price_cents: median(prices.clone()),
            average_rating: products.iter().map(|(_, _, r, _)| r).sum::<f64>()
                / products.len() as f64,
            orders: order_count as i64,
            units_sold: sold.iter().map(|(q, _)| i64::from(*q)).sum(),
            revenue_cents: sold.iter().map(|(q, p)| i64::from(*q) * p).sum(),
        });
    }
    assert_eq!(metrics.len(), expected.len(), "{metrics:?}");
    for (got, want) in metrics.iter().zip(&expected) {
        assert_eq!(
            (
                &got.category,
                got.products,
                got.orders,
                got.units_sold,
                got.revenue_cents
            ),
            (
                &want.category,
                want.products,
                want.orders,
                want.units_sold,
                want.revenue_cents
            )
        );
        for (g, w) in [
            (got.average_price_cents, want.average_price_cents),
            (got.median_price_cents, want.median_price_cents),
            (got.average_rating, want.average_rating),
        ] {
            assert!((g - w).abs() < 1e-6, "{got:?}\n!=\n{want:?}");
        }
    }
    // Spelled out once: the tools window holds 4 products, median 25.00.
    assert_eq!(expected[1].median_price_cents, 2500.0);

    let trend = analytics
        .get_revenue_trend(pb::GetRevenueTrendRequest {
            months: 4,
            category: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .months;
    let this_month = now.date_naive().with_day(1).unwrap();
    let months: Vec<NaiveDate> = (0..4)
        .rev()
        .map(|n| this_month - chrono::Months::new(n))
        .collect();
    let revenue_of = |month: NaiveDate| -> i64 {
        orders
            .iter()
            .filter(|(status, ago, _)| {
                let day = days(*ago).date_naive();
                *status == "completed" && day >= month && day < month + chrono::Months::new(1)
            })
            .flat_map(|(_, _, lines)| lines.iter())
            .map(|(_, q, p)| i64::from(*q) * p)
            .sum()
    };
    let got: Vec<(String, i64)> = trend
        .iter()
        .map(|m| (m.month.clone(), m.revenue_cents))
        .collect();
    let want: Vec<(String, i64)> = months
        .iter()
        .map(|m| (m.format("%Y-%m").to_string(), revenue_of(*m)))
        .collect();
    assert_eq!(got, want);
    for pair in trend.windows(2) {
        let (prev, this) = (pair[0].revenue_cents, pair[1].revenue_cents);
        let growth = (prev > 0).then(|| (this - prev) as f64 / prev as f64);
        assert_eq!(
            pair[1].growth_rate.map(|g| (g * 1e9).round()),
            growth.map(|g| (g * 1e9).round())
        );
    }
    assert_eq!(trend[0].growth_rate, None);
}

#[api_test]
async fn analytics_answers_are_cached_until_the_sales_view_is_refreshed() {
    let app = TestApp::spawn().await;
    assert!(
        !secrecy::ExposeSecret::expose_secret(&app.settings.redis.url).is_empty(),
        "this test needs REDIS_URL (`make test` sets it)"
    );
    let (email, username) = crate::support::unique("cached");
    let user = app.create_user(&email, &username).await;
    let product = listed(&app, "kitchen", 1000, 4.0, Utc::now()).await;
    ordered(
        &app,
        user.id,
        "completed",
        Utc::now(),
        &[(product, 1, 1000)],
    )
    .await;
    let mut admin = app.admin_as(&app.token).await;
    admin
        .refresh_analytics(pb::RefreshAnalyticsRequest {})
        .await
        .unwrap();
    let mut analytics = app.analytics().await;
    let revenue = |analytics: &mut crate::support::AnalyticsClient| {
        let mut analytics = analytics.clone();
        async move {
            analytics
                .get_revenue_trend(pb::GetRevenueTrendRequest {
                    months: 1,
                    category: "kitchen".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .months[0]
                .revenue_cents
        }
    };
    assert_eq!(revenue(&mut analytics).await, 1000);

    ordered(
        &app,
        user.id,
        "completed",
        Utc::now(),
        &[(product, 2, 1000)],
    )
    .await;
    // Refreshing the view directly, behind the service's back: the cached
    // answer stays.
    sqlx::query("REFRESH MATERIALIZED VIEW category_daily_sales")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(revenue(&mut analytics).await, 1000, "served from the cache");
    admin
        .refresh_analytics(pb::RefreshAnalyticsRequest {})
        .await
        .unwrap();
    assert_eq!(revenue(&mut analytics).await, 3000);
}

#[api_test]
async fn analytics_requests_are_validated() {
    let app = TestApp::spawn().await;
    let mut analytics = app.analytics().await;
    for (window_days, categories, field) in [
        (0, vec![], "window_days"),
        (366, vec![], "window_days"),
        (30, vec![String::new()], "categories"),
    ] {
        let status = analytics
            .get_category_metrics(pb::GetCategoryMetricsRequest {
                window_days,
                categories,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    for (months, field) in [(-1, "months"), (37, "months")] {
        let status = analytics
            .get_revenue_trend(pb::GetRevenueTrendRequest {
                months,
                category: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
}
