//! A read replica (`database.read_url`): lag-tolerant reads go there, entity
//! reads and writes stay on the primary.
//!
//! A second database with the same schema stands in for the replica. It
//! holds different rows from the primary, so every answer shows which of the
//! two was read.

use chrono::Utc;
use datagate::{proto::v1 as pb, store::availability};
use sqlx::PgPool;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt as _;

use crate::support::{TestApp, TestDatabase, api_test, assert_error, health_of};

#[api_test]
async fn lag_tolerant_reads_use_the_read_replica_and_the_rest_the_primary() {
    let replica = TestDatabase::create().await;
    let app = TestApp::spawn_with(|s| s.database.read_url = replica.url.clone().into()).await;
    let replica_db = PgPool::connect(&replica.url).await.unwrap();

    // A product written through the API is on the primary only ...
    let product = app
        .catalog()
        .await
        .create_product(pb::CreateProductRequest {
            sku: "REPLICA-1".into(),
            title: "Replica lantern".into(),
            category: "lighting".into(),
            price_cents: 1_250,
            inventory: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // ... and GetProduct reads the primary.
    let read = app
        .catalog()
        .await
        .get_product(pb::GetProductRequest {
            id: product.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.title, "Replica lantern");

    // SearchProducts reads the replica, which has not seen the product.
    let search = |query: &str| pb::SearchProductsRequest {
        query: query.into(),
        ..Default::default()
    };
    let found = app
        .catalog()
        .await
        .search_products(search("lantern"))
        .await
        .unwrap()
        .into_inner();
    assert!(found.products.is_empty(), "{found:?}");

    // Once the replica has the row, the search finds it.
    sqlx::query(
        "INSERT INTO products (id, sku, title, category, price) OVERRIDING SYSTEM VALUE \
         VALUES ($1, 'REPLICA-1', 'Replica lantern', 'lighting', 12.50)",
    )
    .bind(product.id)
    .execute(&replica_db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO inventory (product_id, quantity) VALUES ($1, 5)")
        .bind(product.id)
        .execute(&replica_db)
        .await
        .unwrap();
    let found = app
        .catalog()
        .await
        .search_products(search("replica lantern"))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<i64> = found.products.iter().map(|p| p.id).collect();
    assert_eq!(ids, [product.id]);

    // GetSearchInsights reads the replica's search log, not the primary's
    // (where the service logged the two searches above).
    for _ in 0..3 {
        sqlx::query(
            "INSERT INTO product_searches (query, results_count, processing_time_ms, searched_at) \
             VALUES ('only on the replica', 0, 1.0, now() - interval '1 minute')",
        )
        .execute(&replica_db)
        .await
        .unwrap();
    }
    let now = Utc::now();
    let insights = app
        .analytics()
        .await
        .get_search_insights(pb::GetSearchInsightsRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: now.timestamp() - 3_600,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: now.timestamp() + 60,
                nanos: 0,
            }),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let queries: Vec<(&str, i64)> = insights
        .top_queries
        .iter()
        .map(|q| (q.query.as_str(), q.searches))
        .collect();
    assert_eq!(queries, [("only on the replica", 3)]);

    // GetCategoryMetrics reads the replica's views. RefreshAnalytics
    // refreshes the primary's (where the product is in "lighting"); the
    // replica's are refreshed by hand, standing in for replication, after
    // its copy of the product moved to a category only it knows.
    app.admin_as(&app.token)
        .await
        .refresh_analytics(pb::RefreshAnalyticsRequest {})
        .await
        .unwrap();
    sqlx::query("UPDATE products SET category = 'replica-only' WHERE id = $1")
        .bind(product.id)
        .execute(&replica_db)
        .await
        .unwrap();
    sqlx::query("REFRESH MATERIALIZED VIEW category_daily_listings")
        .execute(&replica_db)
        .await
        .unwrap();
    let metrics = app
        .analytics()
        .await
        .get_category_metrics(pb::GetCategoryMetricsRequest {
            window_days: 7,
            categories: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let categories: Vec<(&str, i64)> = metrics
        .categories
        .iter()
        .map(|c| (c.category.as_str(), c.products))
        .collect();
    assert_eq!(categories, [("replica-only", 1)]);

    // Both pools are observable (the metrics recorder is global to the
    // test process, and only this test configures a replica).
    let scraped = app.metrics().await;
    for pool in ["postgres", "postgres_replica"] {
        let series =
            |name, labels: &[(&str, &str)]| crate::support::observe::series(&scraped, name, labels);
        assert_eq!(
            series("connection_pool_max", &[("pool", pool)]),
            f64::from(app.settings.database.max_connections),
            "{scraped}"
        );
        let held = series(
            "connection_pool_connections",
            &[("pool", pool), ("state", "idle")],
        ) + series(
            "connection_pool_connections",
            &[("pool", pool), ("state", "in_use")],
        );
        assert!(held >= 1.0, "{pool} served reads: {scraped}");
    }
    assert_eq!(
        health_of(&app, "postgres_replica", ServingStatus::Serving).await,
        ServingStatus::Serving
    );
    replica_db.close().await;
}

#[api_test]
async fn an_unreachable_replica_fails_only_the_reads_it_serves_and_shows_in_health() {
    // Nothing listens on port 1.
    let replica_url = "postgres://postgres@127.0.0.1:1/datagate";
    let app = TestApp::spawn_with(|s| {
        s.database.read_url = replica_url.to_owned().into();
        // Also the primary's bound: wide enough for a busy machine.
        s.database.acquire_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    assert_eq!(
        health_of(&app, "postgres_replica", ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_of(&app, "", ServingStatus::Serving).await,
        ServingStatus::Serving,
        "readiness follows the primary"
    );

    let user = app.create_user("primary@example.com", "primary").await;
    app.users()
        .await
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .expect("entity reads use the primary");

    // The replica's reads go through a fail-fast gate of the replica's own
    // (one per host, port and database), which its readiness probe closed:
    // each is refused as the dependency's outage, with a retry delay ...
    for _ in 0..10 {
        let status = app
            .catalog()
            .await
            .search_products(pb::SearchProductsRequest {
                query: "lantern".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_error(&status, Code::Unavailable, "DEPENDENCY_UNAVAILABLE");
        assert_eq!(
            status.message(),
            "the database is unreachable; retry with backoff",
            "refused by the gate, not after a pool wait: {status:?}"
        );
        let details = status.get_error_details();
        assert_eq!(
            details.error_info().unwrap().metadata["dependency"],
            "postgres",
            "{status:?}"
        );
        assert!(
            details.retry_info().and_then(|r| r.retry_delay).is_some(),
            "{status:?}"
        );
    }
    let gate_of = |url: &str| availability::gate(&PgPool::connect_lazy(url).unwrap());
    assert!(
        !gate_of(replica_url).is_up(),
        "the replica's gate is closed"
    );
    assert!(
        availability::gate(&app.db).is_up(),
        "the primary's gate is not the replica's"
    );
    // ... while the primary's calls go on.
    app.users()
        .await
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .expect("entity reads use the primary, whose gate is open");
}

#[api_test]
async fn the_replicas_replication_lag_is_asked_of_it_at_each_scrape() {
    let replica = TestDatabase::create().await;
    let app = TestApp::spawn_with(|s| s.database.read_url = replica.url.clone().into()).await;
    // The stand-in replica is not in recovery: it is not behind.
    assert_eq!(
        crate::support::observe::sample(
            &app.metrics().await,
            "replication_lag_seconds",
            &[("pool", "postgres_replica")]
        ),
        Some(0.0)
    );
}
