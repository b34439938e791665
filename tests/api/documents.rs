//! MongoDB-backed features: user profiles and price history (through the
//! outbox). MongoDB traffic is kept small: the test server is slow.

use std::time::Duration;

use datagate::proto::v1 as pb;
use mongodb::bson::{Document, doc};
use prost_types::Timestamp;
use tonic::Code;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt as _;

use crate::support::{TestApp, api_test, assert_error, health_of, mask, unique, violated_fields};

fn address(label: &str, primary: bool) -> pb::Address {
    pb::Address {
        label: label.into(),
        line1: "1 Main Street".into(),
        city: "Lisbon".into(),
        postal_code: "1100-148".into(),
        country: "pt".into(),
        primary,
        ..Default::default()
    }
}

async fn user(app: &TestApp) -> pb::User {
    let (email, username) = unique("profiled");
    app.create_user(&email, &username).await
}

#[api_test]
async fn profiles_start_empty_and_update_the_masked_fields_only() {
    let app = TestApp::spawn_with_mongo(|_| {}).await;
    let user = user(&app).await;
    let mut users = app.users().await;

    let empty = users
        .get_user_profile(pb::GetUserProfileRequest { user_id: user.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(empty.user_id, user.id);
    assert!(empty.update_time.is_none() && empty.addresses.is_empty());

    let updated = users
        .update_user_profile(pb::UpdateUserProfileRequest {
            user_id: user.id,
            profile: Some(pb::UserProfile {
                given_name: "Ada".into(),
                family_name: "ignored: not in the mask".into(),
                preferences: Some(pb::ProfilePreferences {
                    language: "pt-BR".into(),
                    currency: "eur".into(),
                    marketing_emails: true,
                }),
                addresses: vec![address("home", true), address("work", false)],
                ..Default::default()
            }),
            update_mask: mask(&["given_name", "preferences", "addresses"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.given_name, "Ada");
    assert_eq!(updated.family_name, "");
    assert_eq!(updated.preferences.as_ref().unwrap().currency, "EUR");
    assert_eq!(updated.addresses.len(), 2);
    assert_eq!(updated.addresses[0].country, "PT");
    assert!(updated.update_time.is_some());

    users
        .update_user_profile(pb::UpdateUserProfileRequest {
            user_id: user.id,
            profile: Some(pb::UserProfile {
                family_name: "Lovelace".into(),
                ..Default::default()
            }),
            update_mask: mask(&["family_name"]),
        })
        .await
        .unwrap();
    let read = users
        .get_user_profile(pb::GetUserProfileRequest { user_id: user.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (read.given_name.as_str(), read.family_name.as_str()),
        ("Ada", "Lovelace")
    );
    assert_eq!(read.addresses, updated.addresses, "untouched fields stay");
    assert_eq!(read.preferences, updated.preferences);
}

#[api_test]
async fn profile_addresses_need_exactly_one_primary_and_at_most_five() {
    let app = TestApp::spawn_with_mongo(|_| {}).await;
    let user = user(&app).await;
    let mut users = app.users().await;
    let update = |addresses: Vec<pb::Address>, paths: &[&str]| {
        let request = pb::UpdateUserProfileRequest {
            user_id: user.id,
            profile: Some(pb::UserProfile {
                addresses,
                ..Default::default()
            }),
            update_mask: mask(paths),
        };
        let mut users = users.clone();
        async move { users.update_user_profile(request).await }
    };

    let six: Vec<pb::Address> = (0..6).map(|i| address(&format!("a{i}"), i == 0)).collect();
    let mut five_with_bad_fields = six[..5].to_vec();
    five_with_bad_fields[1].country = "Portugal".into();
    five_with_bad_fields[2].city = String::new();
    // (case, addresses, update mask, violated fields)
    type Names = &'static [&'static str];
    let cases: [(&str, Vec<pb::Address>, Names, Names); 6] = [
        (
            "no primary",
            vec![address("a", false), address("b", false)],
            &["addresses"],
            &["profile.addresses"],
        ),
        (
            "two primaries",
            vec![address("a", true), address("b", true)],
            &["addresses"],
            &["profile.addresses"],
        ),
        ("six addresses", six, &["addresses"], &["profile.addresses"]),
        (
            "bad fields",
            five_with_bad_fields,
            &["addresses"],
            &["profile.addresses[1].country", "profile.addresses[2].city"],
        ),
        ("unknown path", vec![], &["nickname"], &["update_mask"]),
        ("no mask", vec![], &[], &["update_mask"]),
    ];
    for (case, addresses, paths, fields) in cases {
        let status = update(addresses, paths).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{case}");
    }
    // An empty list is allowed: it removes every address.
    update(vec![], &["addresses"]).await.unwrap();

    let unknown_user = users
        .get_user_profile(pb::GetUserProfileRequest { user_id: 987_654 })
        .await
        .unwrap_err();
    assert_error(&unknown_user, Code::NotFound, "USER_NOT_FOUND");
}

/// Polls until `check` holds, for changes applied by the outbox relay (the
/// test MongoDB is slow on a busy machine: a generous bound).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    crate::support::observe::wait_until(what, Duration::from_secs(30), async || check().await)
        .await;
}

#[api_test]
async fn deleting_a_user_deletes_the_profile() {
    let app = TestApp::spawn_with_mongo(|_| {}).await;
    let user = user(&app).await;
    let mut users = app.users().await;
    users
        .update_user_profile(pb::UpdateUserProfileRequest {
            user_id: user.id,
            profile: Some(pb::UserProfile {
                given_name: "Gone".into(),
                ..Default::default()
            }),
            update_mask: mask(&["given_name"]),
        })
        .await
        .unwrap();
    let profiles = app.mongo().await.collection::<Document>("user_profiles");
    assert!(
        profiles
            .find_one(doc! { "_id": user.id })
            .await
            .unwrap()
            .is_some()
    );

    users
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: 0,
        })
        .await
        .unwrap();
    eventually("the profile's removal", || {
        let profiles = profiles.clone();
        async move {
            profiles
                .find_one(doc! { "_id": user.id })
                .await
                .unwrap()
                .is_none()
        }
    })
    .await;
    let gone = users
        .get_user_profile(pb::GetUserProfileRequest { user_id: user.id })
        .await
        .unwrap_err();
    assert_error(&gone, Code::NotFound, "USER_NOT_FOUND");
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    })
}

async fn set_price(app: &TestApp, product: &pb::Product, cents: i64) -> pb::Product {
    app.catalog()
        .await
        .update_product(pb::UpdateProductRequest {
            id: product.id,
            version: product.version,
            product: Some(pb::ProductPatch {
                price_cents: cents,
                ..Default::default()
            }),
            update_mask: mask(&["price_cents"]),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn history(
    app: &TestApp,
    product_id: i64,
    granularity: pb::PriceHistoryGranularity,
) -> Result<pb::GetPriceHistoryResponse, tonic::Status> {
    let now = chrono::Utc::now();
    app.catalog()
        .await
        .get_price_history(pb::GetPriceHistoryRequest {
            product_id,
            start_time: ts(now - chrono::Duration::days(1)),
            end_time: ts(now + chrono::Duration::days(1)),
            granularity: granularity.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[api_test]
async fn price_changes_are_measured_and_aggregated_per_day() {
    let app = TestApp::spawn_with_mongo(|_| {}).await;
    let product = app.create_product(1000, 1).await;
    let product = set_price(&app, &product, 1200).await;
    let product = set_price(&app, &product, 900).await;
    // A change that is not a price change measures nothing.
    app.catalog()
        .await
        .update_product(pb::UpdateProductRequest {
            id: product.id,
            version: product.version,
            product: Some(pb::ProductPatch {
                title: "Renamed".into(),
                ..Default::default()
            }),
            update_mask: mask(&["title"]),
        })
        .await
        .unwrap();

    // The relay applies the outbox within moments (up to 30 s: the test
    // MongoDB is slow on a busy machine).
    let mut measured = Vec::new();
    for _ in 0..300 {
        let h = history(&app, product.id, pb::PriceHistoryGranularity::Measurements)
            .await
            .unwrap();
        measured = h.measurements.iter().map(|m| m.price_cents).collect();
        if measured.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(measured, [1000, 1200, 900]);

    let daily = history(&app, product.id, pb::PriceHistoryGranularity::Daily)
        .await
        .unwrap();
    assert_eq!(daily.days.len(), 1);
    let day = &daily.days[0];
    assert_eq!(day.day, chrono::Utc::now().format("%Y-%m-%d").to_string());
    assert_eq!(
        (
            day.measurements,
            day.min_cents,
            day.max_cents,
            day.open_cents,
            day.close_cents
        ),
        (3, 900, 1200, 1000, 900)
    );
    assert!((day.average_cents - 3100.0 / 3.0).abs() < 1e-9);

    let unknown = history(&app, 999_999, pb::PriceHistoryGranularity::Daily)
        .await
        .unwrap_err();
    assert_error(&unknown, Code::NotFound, "PRODUCT_NOT_FOUND");

    let now = chrono::Utc::now();
    let mut catalog = app.catalog().await;
    for (start, end, granularity, fields) in [
        (None, ts(now), 0, vec!["start_time"]),
        (
            ts(now),
            ts(now - chrono::Duration::days(1)),
            0,
            vec!["end_time"],
        ),
        (
            ts(now - chrono::Duration::days(400)),
            ts(now),
            0,
            vec!["end_time"],
        ),
        (
            ts(now - chrono::Duration::days(1)),
            ts(now),
            9,
            vec!["granularity"],
        ),
    ] {
        let status = catalog
            .get_price_history(pb::GetPriceHistoryRequest {
                product_id: product.id,
                start_time: start,
                end_time: end,
                granularity,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), fields);
    }
}

#[api_test]
async fn a_full_bucket_overflows_into_a_new_one_for_the_same_day() {
    let app = TestApp::spawn_with_mongo(|s| s.mongodb.price_bucket_capacity = 3).await;
    let mut product = app.create_product(100, 1).await;
    for cents in [101, 102, 103, 104, 105, 106, 107] {
        product = set_price(&app, &product, cents).await;
    }
    let buckets = app.mongo().await.collection::<Document>("price_history");
    let mut counts: Vec<i64> = Vec::new();
    for _ in 0..300 {
        use futures_util::TryStreamExt as _;
        let docs: Vec<Document> = buckets
            .find(doc! { "product_id": product.id })
            .sort(doc! { "first_ms": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        // Whatever integer width the server keeps a counter in.
        counts = docs
            .iter()
            .map(|d| match d.get("count") {
                Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
                Some(mongodb::bson::Bson::Int64(n)) => *n,
                other => panic!("count is {other:?}"),
            })
            .collect();
        if counts.iter().sum::<i64>() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        counts,
        [3, 3, 2],
        "buckets of three, the last one partly filled"
    );

    let daily = history(&app, product.id, pb::PriceHistoryGranularity::Daily)
        .await
        .unwrap();
    let day = &daily.days[0];
    assert_eq!(daily.days.len(), 1, "the buckets of one day make one day");
    assert_eq!(
        (
            day.measurements,
            day.min_cents,
            day.max_cents,
            day.open_cents,
            day.close_cents
        ),
        (8, 100, 107, 100, 107)
    );
    let raw = history(&app, product.id, pb::PriceHistoryGranularity::Measurements)
        .await
        .unwrap();
    let prices: Vec<i64> = raw.measurements.iter().map(|m| m.price_cents).collect();
    assert_eq!(prices, (100..=107).collect::<Vec<_>>());
}

#[api_test]
async fn price_changes_wait_in_the_outbox_while_mongodb_is_unreachable() {
    // Nothing listens on port 9: every MongoDB operation fails fast.
    let app = TestApp::spawn_with(|s| {
        s.mongodb.url = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200"
            .to_owned()
            .into();
        s.mongodb.outbox_interval = Duration::from_millis(100);
    })
    .await;
    // Only this test makes the relay fail (the counter is process-wide).
    let failed_passes = app.metric("mongo_outbox_failures_total", &[]).await;
    let product = app.create_product(2500, 1).await;
    let unavailable = history(&app, product.id, pb::PriceHistoryGranularity::Measurements)
        .await
        .unwrap_err();
    assert_error(&unavailable, Code::Unavailable, "DEPENDENCY_UNAVAILABLE");
    // From then on the gate refuses at once (no server selection), naming
    // the dependency and when to retry.
    for _ in 0..3 {
        let refused = history(&app, product.id, pb::PriceHistoryGranularity::Measurements)
            .await
            .unwrap_err();
        assert_error(&refused, Code::Unavailable, "DEPENDENCY_UNAVAILABLE");
        assert_eq!(
            refused.message(),
            "the document store is unreachable; retry with backoff",
            "{refused:?}"
        );
        let details = refused.get_error_details();
        assert_eq!(
            details.error_info().unwrap().metadata["dependency"],
            "mongodb"
        );
        assert!(details.retry_info().and_then(|r| r.retry_delay).is_some());
    }
    // A relay pass claims the row, fails on MongoDB and keeps it (the pass
    // is too short to be seen holding the row: MongoDB's gate refuses it
    // at once).
    crate::support::observe::wait_until(
        "a relay pass fails on MongoDB",
        Duration::from_secs(10),
        async || app.metric("mongo_outbox_failures_total", &[]).await > failed_passes,
    )
    .await;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM mongo_outbox")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(waiting, 1, "the measurement is kept until MongoDB answers");
    assert_eq!(
        health_of(&app, "mongodb", ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_of(&app, "", ServingStatus::Serving).await,
        ServingStatus::Serving,
        "MongoDB down degrades the document features, not the service"
    );

    // A replica that reaches MongoDB applies it.
    let mut settings = app.settings.clone();
    let _mongo = crate::support::use_test_mongo(&mut settings);
    let replica = app.spawn_replica_with(settings).await;
    eventually("the outbox to drain", || {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM mongo_outbox")
                .fetch_one(&db)
                .await
                .unwrap()
                == 0
        }
    })
    .await;
    let measured = history(
        &replica,
        product.id,
        pb::PriceHistoryGranularity::Measurements,
    )
    .await
    .unwrap();
    assert_eq!(measured.measurements.len(), 1);
    assert_eq!(measured.measurements[0].price_cents, 2500);
}

#[api_test]
async fn without_mongodb_the_document_features_say_so() {
    let app = TestApp::spawn().await;
    let user = user(&app).await;
    let status = app
        .users()
        .await
        .get_user_profile(pb::GetUserProfileRequest { user_id: user.id })
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "MONGODB_NOT_CONFIGURED");
    let product = app.create_product(100, 1).await;
    let status = history(&app, product.id, pb::PriceHistoryGranularity::Daily)
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "MONGODB_NOT_CONFIGURED");
    let status = app
        .analytics()
        .await
        .start_market_analysis(pb::StartMarketAnalysisRequest {
            kind: pb::MarketAnalysisKind::Overview.into(),
            categories: vec!["tools".into()],
            window_days: 7,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "MONGODB_NOT_CONFIGURED");
}

#[api_test]
async fn the_mongodb_pool_is_exported_like_the_other_pools() {
    let app = TestApp::spawn_with_mongo(|_| {}).await;
    let user = user(&app).await;
    app.users()
        .await
        .get_user_profile(pb::GetUserProfileRequest { user_id: user.id })
        .await
        .unwrap();

    // Counted from the driver's connection events: the profile read opened
    // a connection and gave it back.
    let metrics = app.metrics().await;
    let of = |name: &str, labels: &[(&str, &str)]| {
        crate::support::observe::sample(&metrics, name, labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} absent from:\n{metrics}"))
    };
    let max = f64::from(app.settings.mongodb.max_pool_size);
    assert_eq!(of("connection_pool_max", &[("pool", "mongodb")]), max);
    let idle = of(
        "connection_pool_connections",
        &[("pool", "mongodb"), ("state", "idle")],
    );
    let in_use = of(
        "connection_pool_connections",
        &[("pool", "mongodb"), ("state", "in_use")],
    );
    assert!(idle + in_use >= 1.0, "idle {idle}, in use {in_use}");
    assert!(in_use <= max);
    assert_eq!(
        of("connection_pool_usage", &[("pool", "mongodb")]),
        in_use / max
    );
}
