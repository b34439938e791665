//! `datagate seed` with sizes: deterministic for a seed, realistic shapes.

use datagate::generate::{self, Sizes};
use sqlx::PgPool;

use crate::support::{TestDatabase, api_test};

const SIZES: Sizes = Sizes {
    users: 300,
    products: 2_000,
    orders: 1_500,
    searches: 3_000,
    price_points: 0,
    seed: 7,
};

/// A digest of every generated row, timestamps left out (they are relative
/// to the time of the run).
async fn fingerprint(db: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT md5(concat_ws('|', \
           (SELECT string_agg(concat_ws(',', sku, title, category, price, rating, review_count), ';' ORDER BY id) FROM products), \
           (SELECT string_agg(concat_ws(',', username, status), ';' ORDER BY id) FROM users), \
           (SELECT string_agg(concat_ws(',', user_id, status, total), ';' ORDER BY id) FROM orders), \
           (SELECT string_agg(concat_ws(',', order_id, product_id, quantity, unit_price), ';' ORDER BY id) FROM order_items), \
           (SELECT string_agg(concat_ws(',', user_id, query, filters::text, results_count, page), ';' ORDER BY id) FROM product_searches)))",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

async fn seeded(sizes: Sizes) -> (TestDatabase, PgPool) {
    let database = TestDatabase::create().await;
    let db = PgPool::connect(&database.url).await.unwrap();
    generate::generate(&db, None, sizes).await.unwrap();
    (database, db)
}

#[api_test]
async fn the_same_seed_generates_the_same_rows_and_another_seed_others() {
    let ((_a, a), (_b, b), (_c, c)) = tokio::join!(
        seeded(SIZES),
        seeded(SIZES),
        seeded(Sizes { seed: 8, ..SIZES })
    );
    assert_eq!(fingerprint(&a).await, fingerprint(&b).await);
    assert_ne!(fingerprint(&a).await, fingerprint(&c).await);

    let counts: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM products), \
                (SELECT count(*) FROM orders), (SELECT count(*) FROM product_searches)",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert_eq!(counts, (300, 2_000, 1_500, 3_000));

    // Shapes: every order has 1 to 5 lines and its total is their sum;
    // most orders are completed; the largest category is far larger than the
    // smallest; searches fill many monthly partitions and none lands in
    // DEFAULT; generated rows wrote no audit rows.
    let (lines_ok, totals_ok): (bool, bool) = sqlx::query_as(
        "SELECT bool_and(n BETWEEN 1 AND 5), bool_and(o.total = s.total) \
         FROM orders o JOIN (SELECT order_id, count(*) AS n, sum(subtotal) AS total \
                             FROM order_items GROUP BY order_id) s ON s.order_id = o.id",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert!(lines_ok && totals_ok);
    let completed: f64 =
        sqlx::query_scalar("SELECT avg((status = 'completed')::int)::float8 FROM orders")
            .fetch_one(&a)
            .await
            .unwrap();
    assert!((0.7..0.9).contains(&completed), "{completed}");
    let (largest, smallest): (i64, i64) = sqlx::query_as(
        "SELECT max(n), min(n) FROM (SELECT count(*) AS n FROM products GROUP BY category) c",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert!(largest > 5 * smallest, "{largest} vs {smallest}");
    let (months, in_default): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(DISTINCT date_trunc('month', searched_at)) FROM product_searches), \
                (SELECT count(*) FROM product_searches_default)",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert!(months >= 20, "{months} months");
    assert_eq!(in_default, 0);
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&a)
        .await
        .unwrap();
    assert_eq!(audited, 0);

    // A second run refuses a database that holds data.
    assert!(generate::generate(&a, None, SIZES).await.is_err());
}

#[api_test]
async fn price_history_is_generated_as_full_buckets() {
    let database = TestDatabase::create().await;
    let mut settings =
        datagate::config::Settings::load_with_overrides(None, &[("database.url", &database.url)])
            .unwrap();
    let _mongo = crate::support::use_test_mongo(&mut settings);
    let mongo = datagate::documents::Mongo::connect(&settings.mongodb)
        .await
        .unwrap()
        .unwrap();
    let db = PgPool::connect(&database.url).await.unwrap();
    generate::generate(
        &db,
        Some(&mongo),
        Sizes {
            products: 50,
            price_points: 2_000,
            ..SIZES
        },
    )
    .await
    .unwrap();
    use futures_util::TryStreamExt as _;
    let buckets: Vec<datagate::documents::price_history::Bucket> = mongo
        .collection("price_history")
        .find(mongodb::bson::doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(buckets.iter().map(|b| b.count).sum::<i64>(), 2_000);
    for b in &buckets {
        assert_eq!(b.count as usize, b.seqs.len());
        assert_eq!(b.prices_cents.iter().sum::<i64>(), b.sum);
        assert_eq!(*b.prices_cents.iter().min().unwrap(), b.min);
        assert!(b.seqs.iter().all(|s| *s < 0), "generated seqs are negative");
    }
    // Popular products change price far more often.
    let mut per_product: std::collections::HashMap<i64, i64> = Default::default();
    for b in &buckets {
        *per_product.entry(b.product_id).or_default() += b.count;
    }
    let (most, least) = (
        per_product.values().max().unwrap(),
        per_product.values().min().unwrap(),
    );
    assert!(*most > 5 * *least, "{most} vs {least}");
}
