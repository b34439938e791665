//! Market analyses: deduplication, workers with leases (racing claims, a
//! worker that dies mid-run), results, and the reads.

use std::time::Duration;

use datagate::{
    config::Settings,
    documents::{Mongo, market_analyses as store},
    domain::market_analyses::MarketAnalyses,
    model::paging::PageTokens,
    proto::v1 as pb,
};
use tonic::Code;

use crate::support::{TestApp, api_test, assert_error, violated_fields};

fn start(categories: &[&str], window_days: i32) -> pb::StartMarketAnalysisRequest {
    pb::StartMarketAnalysisRequest {
        kind: pb::MarketAnalysisKind::Overview.into(),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        window_days,
    }
}

/// The app's analyses, driven by hand: the app itself runs no workers.
async fn analyses(app: &TestApp) -> (MarketAnalyses, Mongo) {
    let settings: &Settings = &app.settings;
    let mongo = Mongo::connect(&settings.mongodb).await.unwrap().unwrap();
    let analyses = MarketAnalyses::new(
        app.db.clone(),
        Some(mongo.clone()),
        settings.analysis.clone(),
        PageTokens::new(&settings.pagination.token_secret),
    );
    (analyses, mongo)
}

async fn app_without_workers(lease: Duration) -> TestApp {
    TestApp::spawn_with_mongo(|s| {
        s.analysis.workers = 0;
        s.analysis.lease = lease;
    })
    .await
}

#[api_test]
async fn identical_requests_share_one_analysis_and_others_start_their_own() {
    let app = app_without_workers(Duration::from_secs(30)).await;
    let mut client = app.analytics().await;
    let first = client
        .start_market_analysis(start(&["tools", "garden"], 30))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.status(), pb::MarketAnalysisStatus::Pending);
    assert_eq!(first.categories, ["garden", "tools"], "normalized");
    let again = client
        .start_market_analysis(start(&["garden", "tools"], 30))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, first.id);
    let other = client
        .start_market_analysis(start(&["garden", "tools"], 31))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.id, first.id);
    // Another caller asking the same gets an analysis of its own.
    let admins = app
        .analytics_as(&app.token)
        .await
        .start_market_analysis(start(&["tools", "garden"], 30))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(admins.id, first.id);

    let invalid = client
        .start_market_analysis(pb::StartMarketAnalysisRequest {
            kind: 0,
            categories: vec![],
            window_days: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&invalid),
        ["categories", "kind", "window_days"]
    );
    let unknown = client
        .get_market_analysis(pb::GetMarketAnalysisRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_error(&unknown, Code::NotFound, "MARKET_ANALYSIS_NOT_FOUND");
    let malformed = client
        .get_market_analysis(pb::GetMarketAnalysisRequest {
            id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&malformed), ["id"]);
    let bad_status = client
        .list_market_analyses(pb::ListMarketAnalysesRequest {
            status: 42,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad_status), ["status"]);
    // Analyses belong to their caller.
    let foreign = app
        .analytics_as(&app.token)
        .await
        .get_market_analysis(pb::GetMarketAnalysisRequest {
            id: first.id.clone(),
        })
        .await;
    assert!(foreign.is_ok(), "admins read every analysis");

    let listed = client
        .list_market_analyses(pb::ListMarketAnalysesRequest {
            status: pb::MarketAnalysisStatus::Pending.into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.analyses.len(), 1);
    assert_eq!(listed.analyses[0].id, other.id, "newest first");
    let rest = client
        .list_market_analyses(pb::ListMarketAnalysesRequest {
            status: pb::MarketAnalysisStatus::Pending.into(),
            page_size: 1,
            page_token: listed.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.analyses
            .iter()
            .map(|a| a.id.clone())
            .collect::<Vec<_>>(),
        [first.id]
    );
    assert!(rest.next_page_token.is_empty());
}

#[api_test]
async fn two_workers_racing_claim_an_analysis_once() {
    let app = app_without_workers(Duration::from_secs(30)).await;
    app.analytics()
        .await
        .start_market_analysis(start(&["tools"], 7))
        .await
        .unwrap();
    let (_, mongo) = analyses(&app).await;
    let now = chrono::Utc::now().timestamp_millis();
    let (a, b) = tokio::join!(
        store::claim(&mongo, "worker-a", now, 30_000),
        store::claim(&mongo, "worker-b", now, 30_000)
    );
    let claimed: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(claimed.len(), 1, "exactly one worker holds it");
    assert_eq!(claimed[0].attempts, 1);
}

#[api_test]
async fn a_worker_that_dies_mid_run_is_replaced_once_its_lease_expires() {
    // Long leases: the test expires the dead worker's by hand, and the live
    // worker's renewals cannot fall behind on a busy machine.
    let app = app_without_workers(Duration::from_secs(30)).await;
    let (email, username) = crate::support::unique("market");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(1500, 10).await;
    let order = app.create_order(user.id, product.id, 2).await;
    let mut orders = app.orders().await;
    for status in [pb::OrderStatus::Processing, pb::OrderStatus::Completed] {
        orders
            .update_order_status(pb::UpdateOrderStatusRequest {
                id: order.id,
                status: status.into(),
                version: 0,
            })
            .await
            .unwrap();
    }
    let started = app
        .analytics()
        .await
        .start_market_analysis(start(&["tools"], 7))
        .await
        .unwrap()
        .into_inner();

    // A worker claims it and dies: it never renews or finishes.
    let (analyses, mongo) = analyses(&app).await;
    let now = chrono::Utc::now().timestamp_millis();
    let dead = store::claim(&mongo, "dead-worker", now, 30_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.id, started.id);
    assert!(
        !analyses.run_once("alive-worker").await.unwrap(),
        "leased: nothing to claim"
    );

    // Its lease runs out (its end moves to the past instead of the test
    // waiting for it).
    let expired = app
        .mongo()
        .await
        .collection::<mongodb::bson::Document>("market_analyses")
        .update_one(
            mongodb::bson::doc! { "_id": &started.id, "lease_owner": "dead-worker" },
            mongodb::bson::doc! { "$set": { "lease_expires_ms": now - 1 } },
        )
        .await
        .unwrap();
    assert_eq!(expired.matched_count, 1);
    assert!(
        analyses.run_once("alive-worker").await.unwrap(),
        "the expired lease is taken over"
    );
    // The dead worker's late result is refused.
    assert!(
        !store::finish(&mongo, &started.id, "dead-worker", now, Err("late".into()))
            .await
            .unwrap()
    );

    let done = app
        .analytics()
        .await
        .get_market_analysis(pb::GetMarketAnalysisRequest {
            id: started.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        done.status(),
        pb::MarketAnalysisStatus::Completed,
        "{done:?}"
    );
    assert_eq!(done.attempts, 2);
    assert!(done.error.is_empty());
    let results = done.results.unwrap();
    assert_eq!(results.top_products.len(), 1);
    assert_eq!(results.top_products[0].product_id, product.id);
    assert_eq!(results.top_products[0].units_sold, 2);
    assert_eq!(results.top_products[0].revenue_cents, 3000);
    assert!(done.timings_ms.contains_key("top_products"));
    assert!(
        !analyses.run_once("alive-worker").await.unwrap(),
        "completed once: nothing left"
    );
}

#[api_test]
async fn the_service_workers_complete_a_full_analysis() {
    let app =
        TestApp::spawn_with_mongo(|s| s.analysis.poll_interval = Duration::from_millis(200)).await;
    let mut client = app.analytics().await;
    let started = client
        .start_market_analysis(pb::StartMarketAnalysisRequest {
            kind: pb::MarketAnalysisKind::Full.into(),
            categories: vec!["tools".into()],
            window_days: 30,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    crate::support::observe::wait_until(
        "the analysis completes",
        Duration::from_secs(30),
        async || {
            let a = client
                .get_market_analysis(pb::GetMarketAnalysisRequest {
                    id: started.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let completed = a.status() == pb::MarketAnalysisStatus::Completed;
            last = Some(a);
            completed
        },
    )
    .await;
    let done = last.unwrap();
    let mut keys: Vec<&String> = done.timings_ms.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "category_metrics",
            "price_trends",
            "search_demand",
            "top_products"
        ]
    );
    let results = done.results.unwrap();
    assert_eq!(results.search_demand.len(), 1);
    assert_eq!(results.search_demand[0].category, "tools");
    // The date the retention's TTL index expires it by.
    let stored = app
        .mongo()
        .await
        .collection::<mongodb::bson::Document>(store::MARKET_ANALYSES)
        .find_one(mongodb::bson::doc! { "_id": &started.id })
        .await
        .unwrap()
        .unwrap();
    let finished_ms = stored.get_i64("finished_ms").unwrap();
    match stored.get("finished_at") {
        Some(mongodb::bson::Bson::DateTime(at)) => assert_eq!(at.timestamp_millis(), finished_ms),
        // The test server (nx-27017) hands dates back as text.
        Some(mongodb::bson::Bson::String(at)) => assert_eq!(
            at,
            &chrono::DateTime::from_timestamp_millis(finished_ms)
                .unwrap()
                .format("%Y-%m-%d %H:%M:%S%.6f")
                .to_string()
        ),
        other => panic!("finished_at is {other:?} in {stored}"),
    }
}

#[api_test]
async fn market_analyses_has_an_index_per_query_and_a_ttl_for_finished_ones_created_idempotently() {
    let retention = Duration::from_secs(2 * 86_400);
    let app = TestApp::spawn_with_mongo(|s| {
        s.analysis.workers = 0;
        s.analysis.retention = retention;
    })
    .await;
    let (_, mongo) = analyses(&app).await;
    // As at start-up (where it runs in the background), twice: the second
    // finds every index in place.
    mongo.ensure_indexes(retention).await.unwrap();
    mongo.ensure_indexes(retention).await.unwrap();

    use futures_util::TryStreamExt as _;
    let listed: Vec<mongodb::IndexModel> = app
        .mongo()
        .await
        .collection::<mongodb::bson::Document>(store::MARKET_ANALYSES)
        .list_indexes()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let indexes: Vec<(String, mongodb::bson::Document, Option<u64>)> = listed
        .into_iter()
        .map(|index| {
            let options = index.options.unwrap_or_default();
            (
                options.name.unwrap_or_default(),
                index.keys,
                options.expire_after.map(|d| d.as_secs()),
            )
        })
        .collect();
    // The declaration: one index per query, and the TTL.
    let declared: Vec<(String, mongodb::bson::Document, Option<u64>)> = store::indexes(retention)
        .into_iter()
        .map(|index| {
            let options = index.options.unwrap_or_default();
            (
                options.name.unwrap_or_default(),
                index.keys,
                options.expire_after.map(|d| d.as_secs()),
            )
        })
        .collect();
    use mongodb::bson::doc;
    assert_eq!(
        declared,
        [
            // The claim: pending, or running with an expired lease, oldest first.
            (
                "claim".to_owned(),
                doc! { "status": 1, "created_ms": 1 },
                None
            ),
            // A caller's list, newest first, by (created_ms, _id) ...
            (
                "list_by_caller".to_owned(),
                doc! { "caller": 1, "created_ms": -1 },
                None
            ),
            // ... and of one status.
            (
                "list_by_caller_and_status".to_owned(),
                doc! { "caller": 1, "status": 1, "created_ms": -1 },
                None
            ),
            // Deduplication: the newest analysis with the same parameters.
            (
                "dedupe".to_owned(),
                doc! { "params_hash": 1, "created_ms": -1 },
                None
            ),
            // Finished analyses expire after the retention.
            (
                "finished_at_ttl".to_owned(),
                doc! { "finished_at": 1 },
                Some(retention.as_secs())
            ),
        ]
    );
    // What the server holds: each declared index (and `_id_`), by its key
    // fields and TTL. The test server (nx-27017) keeps neither the names
    // nor the directions, so those are not compared here.
    let fields = |keys: &mongodb::bson::Document| -> Vec<String> { keys.keys().cloned().collect() };
    let mut held: Vec<(Vec<String>, Option<u64>)> = indexes
        .iter()
        .filter(|(name, _, _)| name != "_id_")
        .map(|(_, keys, ttl)| (fields(keys), *ttl))
        .collect();
    let mut wanted: Vec<(Vec<String>, Option<u64>)> = declared
        .iter()
        .map(|(_, keys, ttl)| (fields(keys), *ttl))
        .collect();
    held.sort();
    wanted.sort();
    assert_eq!(held, wanted, "{indexes:?}");
}
