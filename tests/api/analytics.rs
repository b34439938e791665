//! AnalyticsService.GetSearchInsights, and partition pruning of its queries.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use datagate::{
    config::PartitionSettings, domain::partitions::Partitions, proto::v1 as pb, store::search,
};

use crate::helpers::{TestApp, violated_fields};

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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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
