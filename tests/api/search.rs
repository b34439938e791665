//! SearchProducts: matching, filters, sorts, keyset paging, the cache, and
//! the search log.

use std::{collections::HashSet, time::Duration};

use datagate::proto::v1 as pb;
use pb::ProductSort as Sort;
use tonic::Code;

use crate::support::{CatalogClient, TestApp, api_test, violated_fields};

struct Spec {
    title: &'static str,
    description: &'static str,
    category: &'static str,
    price_cents: i64,
    rating: f64,
}

fn spec(title: &'static str, category: &'static str, price_cents: i64, rating: f64) -> Spec {
    Spec {
        title,
        description: "",
        category,
        price_cents,
        rating,
    }
}

async fn create(app: &TestApp, spec: &Spec) -> pb::Product {
    let sku = format!("S-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    app.catalog()
        .await
        .create_product(pb::CreateProductRequest {
            sku,
            title: spec.title.into(),
            description: spec.description.into(),
            category: spec.category.into(),
            price_cents: spec.price_cents,
            rating: spec.rating,
            inventory: 1,
            ..Default::default()
        })
        .await
        .expect("create product")
        .into_inner()
}

fn query(text: &str) -> pb::SearchProductsRequest {
    pb::SearchProductsRequest {
        query: text.into(),
        ..Default::default()
    }
}

async fn search(
    client: &mut CatalogClient,
    request: pb::SearchProductsRequest,
) -> pb::SearchProductsResponse {
    client
        .search_products(request)
        .await
        .expect("search")
        .into_inner()
}

fn ids(response: &pb::SearchProductsResponse) -> Vec<i64> {
    response.products.iter().map(|p| p.id).collect()
}

/// Every page of a search, walked with `page_size`; the ids in order.
async fn walk(
    client: &mut CatalogClient,
    mut request: pb::SearchProductsRequest,
    page_size: i32,
) -> Vec<i64> {
    request.page_size = page_size;
    let mut all = Vec::new();
    for _ in 0..100 {
        let page = search(client, request.clone()).await;
        assert!(page.products.len() <= page_size as usize);
        all.extend(ids(&page));
        if page.next_page_token.is_empty() {
            return all;
        }
        request.page_token = page.next_page_token;
    }
    panic!("paging did not end");
}

#[api_test]
async fn words_match_with_stemming_and_title_matches_rank_first() {
    let app = TestApp::spawn().await;
    let claw = create(&app, &spec("Claw Hammer", "tools", 2500, 4.5)).await;
    let sledge = create(&app, &spec("Sledge hammers, heavy", "tools", 9900, 3.0)).await;
    let kit = create(
        &app,
        &Spec {
            description: "Comes with a small hammer and screwdrivers",
            ..spec("Toolkit", "tools", 4900, 4.0)
        },
    )
    .await;
    let _saw = create(&app, &spec("Hand saw", "tools", 1500, 4.0)).await;
    let mut client = app.catalog().await;

    let found = search(&mut client, query("  HAMMER ")).await;
    assert!(!found.fuzzy);
    let found = ids(&found);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[..2].contains(&claw.id) && found[..2].contains(&sledge.id));
    assert_eq!(
        found[2], kit.id,
        "a description match ranks below title matches"
    );

    // Web-search syntax: a quoted phrase and an excluded word.
    let phrase = search(&mut client, query("\"claw hammer\"")).await;
    assert_eq!(ids(&phrase), [claw.id]);
    let excluded = search(&mut client, query("hammer -sledge -toolkit")).await;
    assert_eq!(ids(&excluded), [claw.id]);
}

#[api_test]
async fn filters_select_categories_inclusive_price_ranges_and_minimum_ratings() {
    let app = TestApp::spawn().await;
    let cheap = create(&app, &spec("Lamp small", "lighting", 1000, 3.5)).await;
    let mid = create(&app, &spec("Lamp desk", "lighting", 2000, 4.0)).await;
    let dear = create(&app, &spec("Lamp floor", "furniture", 3000, 4.8)).await;
    let mut client = app.catalog().await;
    let sorted = |mut v: Vec<i64>| {
        v.sort();
        v
    };

    let lighting = search(
        &mut client,
        pb::SearchProductsRequest {
            categories: vec!["lighting".into(), "lighting".into()],
            ..query("lamp")
        },
    )
    .await;
    assert_eq!(sorted(ids(&lighting)), sorted(vec![cheap.id, mid.id]));

    let priced = search(
        &mut client,
        pb::SearchProductsRequest {
            min_price_cents: Some(2000),
            max_price_cents: Some(3000),
            ..query("lamp")
        },
    )
    .await;
    assert_eq!(
        sorted(ids(&priced)),
        sorted(vec![mid.id, dear.id]),
        "bounds are inclusive"
    );

    let rated = search(
        &mut client,
        pb::SearchProductsRequest {
            min_rating: Some(4.0),
            categories: vec!["lighting".into(), "furniture".into()],
            max_price_cents: Some(2000),
            ..query("lamp")
        },
    )
    .await;
    assert_eq!(ids(&rated), [mid.id]);

    let none = search(
        &mut client,
        pb::SearchProductsRequest {
            categories: vec!["garden".into()],
            ..query("lamp")
        },
    )
    .await;
    assert!(none.products.is_empty() && none.next_page_token.is_empty());
}

#[api_test]
async fn every_sort_orders_with_ties_broken_by_id_and_pages_neither_repeat_nor_skip() {
    let app = TestApp::spawn().await;
    // Many ties on every key: 3 prices, 2 ratings, identical titles.
    let mut products = Vec::new();
    for i in 0..23 {
        let price = [1500, 900, 1500][i % 3];
        let rating = [4.0, 2.5][i % 2];
        products.push(create(&app, &spec("Garden widget", "garden", price, rating)).await);
    }
    let mut client = app.catalog().await;
    let by = |key: &dyn Fn(&pb::Product) -> (i64, i64)| {
        let mut sorted: Vec<&pb::Product> = products.iter().collect();
        sorted.sort_by_key(|p| key(p));
        sorted.into_iter().map(|p| p.id).collect::<Vec<_>>()
    };
    let micros = |p: &pb::Product| {
        let t = p.create_time.as_ref().unwrap();
        t.seconds * 1_000_000 + i64::from(t.nanos / 1000)
    };
    let cases: Vec<(Sort, Vec<i64>)> = vec![
        (Sort::PriceAscending, by(&|p| (p.price_cents, p.id))),
        (Sort::PriceDescending, by(&|p| (-p.price_cents, -p.id))),
        (Sort::Newest, by(&|p| (-micros(p), -p.id))),
        (Sort::Rating, by(&|p| (-(p.rating * 100.0) as i64, -p.id))),
        // Equal titles rank equally: relevance falls back to the id.
        (Sort::Relevance, by(&|p| (0, -p.id))),
    ];
    for (sort, expected) in cases {
        for page_size in [4, 23, 50] {
            let walked = walk(
                &mut client,
                pb::SearchProductsRequest {
                    sort: sort.into(),
                    ..query("widget")
                },
                page_size,
            )
            .await;
            assert_eq!(walked, expected, "{sort:?} in pages of {page_size}");
            assert_eq!(walked.iter().collect::<HashSet<_>>().len(), 23);
        }
    }
}

#[api_test]
async fn misspelt_words_are_corrected_to_title_words_when_nothing_matches() {
    let app = TestApp::spawn().await;
    let mut headphones = Vec::new();
    for _ in 0..3 {
        headphones.push(create(&app, &spec("Wireless headphones", "audio", 5900, 4.1)).await);
    }
    let hose = create(&app, &spec("Garden hose", "garden", 2900, 4.1)).await;
    let mut client = app.catalog().await;

    let first = search(
        &mut client,
        pb::SearchProductsRequest {
            page_size: 2,
            ..query("wireles hedphones")
        },
    )
    .await;
    assert!(first.fuzzy, "{first:?}");
    assert_eq!(first.corrected_query, "wireless headphones");
    // Later pages continue the corrected search.
    let second = search(
        &mut client,
        pb::SearchProductsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..query("wireles hedphones")
        },
    )
    .await;
    assert_eq!(second.corrected_query, "wireless headphones");
    let mut found: Vec<i64> = ids(&first).into_iter().chain(ids(&second)).collect();
    found.sort();
    assert_eq!(found, headphones.iter().map(|p| p.id).collect::<Vec<_>>());

    let exact = search(&mut client, query("headphones")).await;
    assert!(!exact.fuzzy && exact.corrected_query.is_empty());
    let nothing = search(&mut client, query("xylophone")).await;
    assert!(nothing.products.is_empty() && !nothing.fuzzy);

    // Words of renamed titles are known too.
    client
        .update_product(pb::UpdateProductRequest {
            id: hose.id,
            version: hose.version,
            product: Some(pb::ProductPatch {
                title: "Sprinkler hose".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["title".into()],
            }),
        })
        .await
        .unwrap();
    let renamed = search(&mut client, query("sprinkller")).await;
    assert_eq!(renamed.corrected_query, "sprinkler");
    assert_eq!(ids(&renamed), [hose.id]);
}

#[api_test]
async fn invalid_searches_are_refused_with_field_violations() {
    let app = TestApp::spawn().await;
    let client = app.catalog().await;
    let refused = |request: pb::SearchProductsRequest| {
        let mut client = client.clone();
        async move { client.search_products(request).await.unwrap_err() }
    };

    let cases: [(&str, pb::SearchProductsRequest, &[&str]); 4] = [
        ("blank query", query("   "), &["query"]),
        ("overlong query", query(&"a".repeat(201)), &["query"]),
        (
            "inverted price range",
            pb::SearchProductsRequest {
                min_price_cents: Some(5000),
                max_price_cents: Some(100),
                ..query("lamp")
            },
            &["max_price_cents"],
        ),
        (
            "everything wrong at once",
            pb::SearchProductsRequest {
                query: String::new(),
                categories: (0..21).map(|i| format!("c{i}")).collect(),
                min_price_cents: Some(-1),
                min_rating: Some(6.0),
                page_size: -1,
                user_id: -4,
                ..Default::default()
            },
            &[
                "categories",
                "min_price_cents",
                "min_rating",
                "page_size",
                "query",
                "user_id",
            ],
        ),
    ];
    for (case, request, fields) in cases {
        assert_eq!(violated_fields(&refused(request).await), fields, "{case}");
    }
    let unknown_sort = refused(pb::SearchProductsRequest {
        sort: 99,
        ..query("lamp")
    })
    .await;
    assert_eq!(violated_fields(&unknown_sort), ["sort"]);
    assert!(
        unknown_sort
            .message()
            .contains("PRODUCT_SORT_PRICE_ASCENDING")
    );

    // A page token only continues the search it came from.
    for i in 0..3 {
        create(
            &app,
            &spec(["Lamp a", "Lamp b", "Lamp c"][i], "lighting", 100, 1.0),
        )
        .await;
    }
    let first = search(
        &mut client.clone(),
        pb::SearchProductsRequest {
            page_size: 1,
            ..query("lamp")
        },
    )
    .await;
    let other_filters = refused(pb::SearchProductsRequest {
        page_size: 1,
        page_token: first.next_page_token.clone(),
        sort: Sort::PriceAscending.into(),
        ..query("lamp")
    })
    .await;
    assert_eq!(violated_fields(&other_filters), ["page_token"]);
    let forged = refused(pb::SearchProductsRequest {
        page_token: "bm90LWEtdG9rZW4".into(),
        ..query("lamp")
    })
    .await;
    assert_eq!(forged.code(), Code::InvalidArgument);
}

#[api_test]
async fn cached_pages_are_served_until_a_product_write_invalidates_them() {
    let app = TestApp::spawn().await;
    assert!(
        !app.settings.redis.url.expose_secret().is_empty(),
        "this test needs REDIS_URL (`make test` sets it)"
    );
    let drill = create(&app, &spec("Cordless drill", "tools", 8900, 4.2)).await;
    let mut client = app.catalog().await;
    assert_eq!(ids(&search(&mut client, query("drill")).await), [drill.id]);

    // A row written behind the service's back is not seen: the page is cached.
    sqlx::query(
        "WITH p AS (INSERT INTO products (sku, title, category, price) \
                    VALUES ('SNEAKY-1', 'Hammer drill', 'tools', 10) RETURNING id) \
         INSERT INTO inventory (product_id, quantity) SELECT id, 1 FROM p",
    )
    .execute(&app.db)
    .await
    .unwrap();
    assert_eq!(ids(&search(&mut client, query("drill")).await), [drill.id]);

    // Stock changes keep the page, and the page shows current stock.
    client
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: drill.id,
            delta: 5,
        })
        .await
        .unwrap();
    let page = search(&mut client, query("drill")).await;
    assert_eq!(ids(&page), [drill.id]);
    assert_eq!(page.products[0].inventory, 6);

    // A product write through the service makes every cached page stale.
    let driver = create(&app, &spec("Drill driver", "tools", 5900, 4.0)).await;
    let page = search(&mut client, query("drill")).await;
    assert_eq!(page.products.len(), 3, "{page:?}");
    assert!(ids(&page).contains(&driver.id));
}

use secrecy::ExposeSecret as _;

/// The search log's rows, oldest first.
async fn logged(app: &TestApp) -> Vec<(Option<i64>, String, serde_json::Value, i32, i32)> {
    sqlx::query_as(
        "SELECT user_id, query, filters, results_count, page FROM product_searches ORDER BY id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

async fn wait_for_log(
    app: &TestApp,
    rows: usize,
) -> Vec<(Option<i64>, String, serde_json::Value, i32, i32)> {
    for _ in 0..200 {
        let found = logged(app).await;
        if found.len() >= rows {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the search log never reached {rows} rows: {:?}",
        logged(app).await
    );
}

#[api_test]
async fn every_search_is_logged_with_its_filters_results_and_page() {
    let app =
        TestApp::spawn_with(|s| s.search_log.flush_interval = Duration::from_millis(50)).await;
    for title in ["Lamp one", "Lamp two", "Lamp three"] {
        create(&app, &spec(title, "lighting", 1000, 4.0)).await;
    }
    let (email, username) = crate::support::unique("searcher");
    let user = app.create_user(&email, &username).await;
    let mut client = app.catalog().await;
    let lamps = pb::SearchProductsRequest {
        page_size: 2,
        user_id: user.id,
        categories: vec!["lighting".into()],
        sort: Sort::PriceAscending.into(),
        ..query("  Lamp ")
    };
    let first = search(&mut client, lamps.clone()).await;
    search(
        &mut client,
        pb::SearchProductsRequest {
            page_token: first.next_page_token,
            ..lamps
        },
    )
    .await;
    search(&mut client, query("unobtainium")).await;

    let rows = wait_for_log(&app, 3).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let (user_id, text, filters, results, page) = &rows[0];
    assert_eq!(
        (*user_id, text.as_str(), *results, *page),
        (Some(user.id), "lamp", 2, 1)
    );
    assert_eq!(filters["categories"], serde_json::json!(["lighting"]));
    assert_eq!(filters["sort"], "price_ascending");
    assert_eq!(
        (rows[1].3, rows[1].4),
        (1, 2),
        "the second page, with the last product"
    );
    assert_eq!(
        (rows[2].0, rows[2].1.as_str(), rows[2].3),
        (None, "unobtainium", 0)
    );
    let processing: Vec<f32> =
        sqlx::query_scalar("SELECT processing_time_ms FROM product_searches")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert!(processing.iter().all(|ms| *ms > 0.0), "{processing:?}");
}

#[api_test]
async fn graceful_shutdown_writes_every_buffered_search() {
    // Nothing would be written before shutdown: one batch, flushed hourly.
    let mut app = TestApp::spawn_with(|s| {
        s.search_log.flush_interval = Duration::from_secs(3600);
        s.search_log.batch_size = 1000;
    })
    .await;
    create(&app, &spec("Kettle", "kitchen", 3000, 4.0)).await;
    let mut client = app.catalog().await;
    for _ in 0..7 {
        search(&mut client, query("kettle")).await;
    }
    assert!(logged(&app).await.is_empty(), "written before shutdown");
    drop(client);

    app.trigger_shutdown();
    app.take_server().await.unwrap().unwrap();
    assert_eq!(logged(&app).await.len(), 7);
}

#[api_test]
async fn a_full_buffer_drops_and_counts_searches_and_never_blocks_the_caller() {
    let app = TestApp::spawn_with(|s| {
        s.search_log.buffer = 2;
        s.search_log.batch_size = 1;
        s.search_log.flush_interval = Duration::from_millis(10);
    })
    .await;
    create(&app, &spec("Teapot", "kitchen", 3000, 4.0)).await;
    let mut client = app.catalog().await;
    let dropped = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("search_log_dropped_total{reason=\"buffer_full\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let dropped_before = dropped(&app.metrics().await);

    // The writer blocks on the table lock; searches must still be answered.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE product_searches IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    for _ in 0..10 {
        let page = tokio::time::timeout(
            Duration::from_secs(10),
            search(&mut client, query("teapot")),
        )
        .await
        .expect("a search waited for the search log");
        assert_eq!(page.products.len(), 1);
    }
    lock.rollback().await.unwrap();

    let dropped_now = dropped(&app.metrics().await) - dropped_before;
    assert!(dropped_now >= 1, "nothing was dropped");
    let written = wait_for_log(&app, (10 - dropped_now) as usize).await.len() as u64;
    // The writer is first in, first out: once a later search is written,
    // everything kept before it is too.
    search(&mut client, query("teapot later")).await;
    let rows = wait_for_log(&app, written as usize + 1).await;
    assert_eq!(rows.last().unwrap().1, "teapot later", "{rows:?}");
    assert_eq!(
        rows.iter().filter(|r| r.1 == "teapot").count() as u64,
        written,
        "more rows than kept"
    );
    assert_eq!(written + dropped_now, 10);
}
