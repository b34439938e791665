//! Generated data at scale (`datagate seed --products N ...`, and the
//! benchmarks): deterministic for a given seed, set-based SQL in chunks of
//! [`CHUNK`] rows (each chunk seeds PostgreSQL's generator from the seed, the
//! step and the chunk), with a progress bar per step.
//!
//! Shapes: skewed category popularity (the largest of 20 categories holds
//! about 22 %), log-normal prices, titles of brand, adjective, colour, one
//! of 240 nouns and a model number; creation times, orders and searches
//! spread over the last 24 months, so that many monthly partitions fill.
//! Orders are 80 % completed, with 1 to 5 lines drawn with a heavy skew
//! toward popular products; searches use the catalog's words, sometimes
//! misspelt, with category filters.
//!
//! Generated rows are not writes of any caller: the audit triggers are off
//! while they are inserted (in the inserting transaction only), and
//! secondary indexes of products are rebuilt once at the end.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use mongodb::bson::oid::ObjectId;
use sqlx::{Connection as _, PgPool, Postgres, Transaction};

use crate::documents::{
    mongo::{Mongo, PRICE_HISTORY},
    price_history::{Bucket, day_key},
};

/// Rows per generating statement.
pub const CHUNK: u64 = 100_000;

#[rustfmt::skip]
pub const CATEGORIES: [&str; 20] = [
    "electronics", "audio", "computers", "phones", "cameras", "home", "kitchen", "furniture", "lighting", "garden",
    "tools", "automotive", "sports", "outdoors", "toys", "books", "clothing", "shoes", "beauty", "health",
];
/// Twelve nouns per category, in category order.
#[rustfmt::skip]
pub const NOUNS: [&str; 240] = [
    "television", "projector", "router", "charger", "adapter", "battery", "drone", "console", "remote", "cable", "hub", "monitor",
    "headphones", "earbuds", "speaker", "soundbar", "amplifier", "turntable", "microphone", "receiver", "subwoofer", "radio", "headset", "mixer",
    "laptop", "keyboard", "mouse", "tablet", "printer", "scanner", "webcam", "desktop", "ssd", "motherboard", "processor", "dock",
    "smartphone", "case", "stylus", "smartwatch", "tracker", "powerbank", "mount", "holder", "screen", "sim", "wallet", "grip",
    "camera", "lens", "tripod", "flash", "camcorder", "gimbal", "filter", "strap", "bag", "memory", "viewfinder", "reflector",
    "blanket", "pillow", "curtain", "rug", "vase", "mirror", "clock", "frame", "candle", "basket", "towel", "duvet",
    "kettle", "toaster", "blender", "mixer", "pan", "knife", "grinder", "cooker", "oven", "fryer", "juicer", "scale",
    "chair", "table", "sofa", "desk", "bed", "shelf", "wardrobe", "stool", "bench", "cabinet", "dresser", "ottoman",
    "lamp", "bulb", "lantern", "chandelier", "spotlight", "strip", "sconce", "nightlight", "torch", "floodlight", "pendant", "dimmer",
    "hose", "shovel", "rake", "planter", "sprinkler", "mower", "trimmer", "wheelbarrow", "seeds", "fertilizer", "gloves", "shears",
    "hammer", "drill", "saw", "wrench", "screwdriver", "pliers", "sander", "toolbox", "level", "chisel", "clamp", "grinder",
    "tyre", "wiper", "jack", "dashcam", "seatcover", "mat", "polish", "jumpstarter", "compressor", "rack", "bulb", "horn",
    "ball", "racket", "bicycle", "helmet", "treadmill", "dumbbell", "yoga", "skates", "skateboard", "bat", "net", "bottle",
    "tent", "backpack", "sleepingbag", "stove", "compass", "hammock", "cooler", "binoculars", "kayak", "paddle", "axe", "headlamp",
    "puzzle", "doll", "blocks", "robot", "kite", "train", "boardgame", "plush", "slime", "scooter", "playhouse", "crayons",
    "novel", "cookbook", "atlas", "biography", "dictionary", "comic", "journal", "guide", "anthology", "textbook", "manual", "poetry",
    "jacket", "shirt", "jeans", "dress", "sweater", "hoodie", "scarf", "socks", "coat", "shorts", "skirt", "hat",
    "sneakers", "boots", "sandals", "loafers", "slippers", "heels", "trainers", "clogs", "flats", "oxfords", "espadrilles", "moccasins",
    "shampoo", "lotion", "perfume", "lipstick", "serum", "cleanser", "razor", "brush", "mascara", "sunscreen", "conditioner", "balm",
    "vitamins", "thermometer", "bandage", "massager", "inhaler", "humidifier", "scale", "monitor", "sanitizer", "toothbrush", "floss", "brace",
];
#[rustfmt::skip]
pub const BRANDS: [&str; 40] = [
    "acme", "zenith", "nordic", "apex", "lumen", "vertex", "orion", "pioneer", "summit", "atlas",
    "nova", "quantum", "harbor", "ember", "cobalt", "willow", "falcon", "granite", "meridian", "polar",
    "sierra", "tundra", "vortex", "aurora", "beacon", "cascade", "delta", "echo", "fjord", "glacier",
    "horizon", "indigo", "juniper", "kestrel", "lotus", "monarch", "nimbus", "onyx", "prism", "quasar",
];
#[rustfmt::skip]
pub const ADJECTIVES: [&str; 24] = [
    "wireless", "portable", "compact", "premium", "classic", "smart", "ergonomic", "durable", "lightweight", "professional",
    "deluxe", "rechargeable", "foldable", "waterproof", "vintage", "modern", "silent", "heavy", "mini", "ultra",
    "organic", "cordless", "digital", "adjustable",
];
#[rustfmt::skip]
pub const COLORS: [&str; 12] = [
    "black", "white", "silver", "red", "blue", "green", "grey", "gold", "pink", "orange",
    "brown", "navy",
];
#[rustfmt::skip]
pub const MATERIALS: [&str; 8] = [
    "aluminium", "steel", "oak", "bamboo", "cotton", "leather", "recycled plastic", "glass",
];

/// How much to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sizes {
    pub users: u64,
    pub products: u64,
    pub orders: u64,
    pub searches: u64,
    /// Price measurements in MongoDB (needs products and a document store).
    pub price_points: u64,
    pub seed: u64,
}

fn bar(step: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(step.to_owned());
    bar
}

/// PostgreSQL's generator seeded from the seed, the step and the chunk, so
/// that every chunk is reproducible on its own.
async fn seed_chunk(
    tx: &mut Transaction<'_, Postgres>,
    seed: u64,
    step: u64,
    chunk: u64,
) -> anyhow::Result<()> {
    let mixed = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(chunk.wrapping_mul(0x94D0_49BB_1331_11EB));
    let fraction = (mixed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    sqlx::query("SELECT setseed($1)")
        .bind(fraction)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Generates `sizes` into an empty database (migrated), and price history
/// into `mongo`. Refuses a database that already holds products or orders.
pub async fn generate(db: &PgPool, mongo: Option<&Mongo>, sizes: Sizes) -> anyhow::Result<()> {
    let (products, orders): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM orders)")
            .fetch_one(db)
            .await?;
    anyhow::ensure!(
        products == 0 && orders == 0,
        "the database already holds {products} products and {orders} orders; seed an empty one"
    );
    if sizes.products > 0 {
        self::products(db, sizes.products, sizes.seed).await?;
    }
    if sizes.users > 0 {
        self::users(db, sizes.users, sizes.seed).await?;
    }
    if sizes.orders > 0 {
        anyhow::ensure!(
            sizes.users > 0 && sizes.products > 0,
            "orders need users and products"
        );
        self::orders(db, sizes.orders, sizes.seed).await?;
    }
    if sizes.searches > 0 {
        self::searches(db, sizes.searches, sizes.seed).await?;
    }
    if sizes.price_points > 0 {
        let mongo = mongo.ok_or_else(|| {
            anyhow::anyhow!("price history needs a document store: set DATAGATE__MONGODB__URL")
        })?;
        self::price_history(db, mongo, sizes.price_points, sizes.seed).await?;
    }
    for statement in [
        "ANALYZE",
        "REFRESH MATERIALIZED VIEW category_daily_sales",
        "REFRESH MATERIALIZED VIEW category_daily_listings",
    ] {
        sqlx::query(statement).execute(db).await?;
    }
    Ok(())
}

/// Turns the audit trigger of each table (`<table>_audit`) off or on, in
/// this transaction only: generated rows are no caller's writes.
async fn audit_triggers(
    tx: &mut Transaction<'_, Postgres>,
    tables: &[&str],
    on: bool,
) -> anyhow::Result<()> {
    let action = if on { "ENABLE" } else { "DISABLE" };
    for table in tables {
        sqlx::query(&format!(
            "ALTER TABLE {table} {action} TRIGGER {table}_audit"
        ))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Runs `chunk_sql` (binding the first and last row number of the chunk,
/// then `binds`) for every chunk of `total`, in one transaction.
async fn chunked(
    tx: &mut Transaction<'_, Postgres>,
    step: &str,
    step_id: u64,
    seed: u64,
    total: u64,
    chunk_sql: &str,
    bind: impl Fn(
        sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
) -> anyhow::Result<()> {
    let progress = bar(step, total);
    let mut done = 0;
    let mut chunk = 0;
    while done < total {
        let n = CHUNK.min(total - done);
        seed_chunk(tx, seed, step_id, chunk).await?;
        let query = sqlx::query(chunk_sql)
            .bind((done + 1) as i64)
            .bind((done + n) as i64);
        bind(query).execute(&mut **tx).await?;
        done += n;
        chunk += 1;
        progress.set_position(done);
    }
    progress.finish();
    Ok(())
}

/// `total` products and their inventory.
pub async fn products(db: &PgPool, total: u64, seed: u64) -> anyhow::Result<()> {
    let mut conn = db.acquire().await?;
    let mut tx = conn.begin().await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes WHERE tablename = 'products' \
         AND indexname NOT IN ('products_pkey', 'products_sku_key')",
    )
    .fetch_all(&mut *tx)
    .await?;
    for statement in [
        "SET LOCAL maintenance_work_mem = '512MB'",
        "SET LOCAL max_parallel_workers_per_gather = 0",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    audit_triggers(&mut tx, &["products", "inventory"], false).await?;
    for (name, _) in &indexes {
        sqlx::query(&format!("DROP INDEX {name}"))
            .execute(&mut *tx)
            .await?;
    }
    chunked(&mut tx, "products", 1, seed, total, PRODUCTS_SQL, |q| {
        q.bind(&CATEGORIES[..])
            .bind(&NOUNS[..])
            .bind(&BRANDS[..])
            .bind(&ADJECTIVES[..])
            .bind(&COLORS[..])
            .bind(&MATERIALS[..])
    })
    .await?;
    sqlx::query("INSERT INTO inventory (product_id, quantity) SELECT id, floor(random() * 500)::int FROM products")
        .execute(&mut *tx)
        .await?;
    let progress = bar("indexes", indexes.len() as u64);
    for (_, definition) in &indexes {
        sqlx::query(definition).execute(&mut *tx).await?;
        progress.inc(1);
    }
    progress.finish();
    audit_triggers(&mut tx, &["products", "inventory"], true).await?;
    tx.commit().await?;
    Ok(())
}

/// Products $1..=$2 of the generation.
const PRODUCTS_SQL: &str = "INSERT INTO products (sku, title, description, category, price, rating, review_count, created_at, updated_at) \
     SELECT 'GEN-' || g, \
            initcap(brand) || ' ' || adjective || ' ' || color || ' ' || noun || ' ' || model, \
            'A ' || adjective || ' ' || noun || ' made of ' || material || '. Model ' || model || ' by ' || initcap(brand) || '.', \
            ($3::text[])[category + 1], \
            round(least(greatest(exp(ln(25) + 0.9 * sqrt(-2 * ln(1 - u1)) * cos(2 * pi() * u2)), 1), 99999)::numeric, 2), \
            round((1 + 4 * power(random(), 0.35))::numeric, 1), \
            floor(power(random(), 3) * 5000)::int, \
            created, created \
     FROM ( \
       SELECT g, c.category, \
              ($4::text[])[c.category * 12 + 1 + floor(12 * power(random(), 1.5))::int] AS noun, \
              ($5::text[])[1 + floor(40 * power(random(), 1.3))::int] AS brand, \
              ($6::text[])[1 + floor(24 * random())::int] AS adjective, \
              ($7::text[])[1 + floor(12 * random())::int] AS color, \
              ($8::text[])[1 + floor(8 * random())::int] AS material, \
              upper(chr(65 + floor(26 * random())::int)) || (100 + floor(900 * random())::int) AS model, \
              random() AS u1, random() AS u2, \
              now() - random() * interval '730 days' AS created \
       FROM generate_series($1::bigint, $2::bigint) g, \
            LATERAL (SELECT floor(20 * power(random(), 2))::int + (g * 0)::int AS category) c \
     ) src";

/// `total` users.
pub async fn users(db: &PgPool, total: u64, seed: u64) -> anyhow::Result<()> {
    let mut conn = db.acquire().await?;
    let mut tx = conn.begin().await?;
    audit_triggers(&mut tx, &["users"], false).await?;
    chunked(
        &mut tx,
        "users",
        2,
        seed,
        total,
        "INSERT INTO users (email, username, display_name, status, created_at, updated_at) \
         SELECT 'user' || g || '@example.com', 'user_' || g, 'User ' || g, \
                CASE WHEN random() < 0.95 THEN 'active' ELSE 'inactive' END, t, t \
         FROM (SELECT g, now() - random() * interval '730 days' AS t \
               FROM generate_series($1::bigint, $2::bigint) g) s",
        |q| q,
    )
    .await?;
    audit_triggers(&mut tx, &["users"], true).await?;
    tx.commit().await?;
    Ok(())
}

/// `total` orders with their lines, over the existing users and products.
pub async fn orders(db: &PgPool, total: u64, seed: u64) -> anyhow::Result<()> {
    let mut conn = db.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL max_parallel_workers_per_gather = 0")
        .execute(&mut *tx)
        .await?;
    audit_triggers(&mut tx, &["orders", "order_items"], false).await?;
    let (first_user, users, first_product, products): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT min(id) FROM users), (SELECT count(*) FROM users), \
                (SELECT min(id) FROM products), (SELECT count(*) FROM products)",
    )
    .fetch_one(&mut *tx)
    .await?;
    // Each chunk inserts its orders, then their lines (1 to 5 distinct
    // products, popular ones far more often); totals are the lines' sum.
    chunked(
        &mut tx,
        "orders",
        3,
        seed,
        total,
        "WITH o AS ( \
           INSERT INTO orders (user_id, status, total, created_at, updated_at) \
           SELECT $3 + floor(random() * $4)::bigint, \
                  CASE WHEN r < 0.80 THEN 'completed' WHEN r < 0.85 THEN 'pending' \
                       WHEN r < 0.90 THEN 'processing' ELSE 'cancelled' END, \
                  0, t, t \
           FROM (SELECT random() AS r, now() - random() * interval '730 days' AS t \
                 FROM generate_series($1::bigint, $2::bigint)) s \
           RETURNING id), \
         lines AS ( \
           SELECT DISTINCT o.id AS order_id, \
                  $5 + floor($6 * power(random(), 3))::bigint + 0 * n AS product_id \
           FROM o, generate_series(1, 1 + floor(random() * 5)::int + (0 * o.id)::int) n) \
         INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
         SELECT l.order_id, p.id, 1 + floor(random() * 3)::int, p.price \
         FROM lines l JOIN products p ON p.id = l.product_id",
        |q| {
            q.bind(first_user)
                .bind(users as f64)
                .bind(first_product)
                .bind(products as f64)
        },
    )
    .await?;
    sqlx::query(
        "UPDATE orders o SET total = s.total \
         FROM (SELECT order_id, sum(subtotal) AS total FROM order_items GROUP BY order_id) s \
         WHERE o.id = s.order_id",
    )
    .execute(&mut *tx)
    .await?;
    audit_triggers(&mut tx, &["orders", "order_items"], true).await?;
    tx.commit().await?;
    Ok(())
}

/// `total` search log rows, with the partitions they need.
pub async fn searches(db: &PgPool, total: u64, seed: u64) -> anyhow::Result<()> {
    // Partitions for the 24 months searched (and the usual months ahead).
    let start = chrono::Utc::now().date_naive() - chrono::Months::new(24);
    crate::store::partitions::ensure(db, start, 27).await?;
    let mut conn = db.acquire().await?;
    let mut tx = conn.begin().await?;
    let (first_user, users): (Option<i64>, i64) =
        sqlx::query_as("SELECT min(id), count(*) FROM users")
            .fetch_one(&mut *tx)
            .await?;
    chunked(
        &mut tx,
        "searches",
        4,
        seed,
        total,
        "INSERT INTO product_searches \
           (user_id, query, filters, results_count, processing_time_ms, page, searched_at) \
         SELECT CASE WHEN $5 > 0 AND random() < 0.7 THEN $4 + floor(random() * $5)::bigint END, \
                CASE WHEN random() < 0.05 THEN left(noun, length(noun) / 2) || substr(noun, length(noun) / 2 + 2) \
                     WHEN random() < 0.3 THEN brand || ' ' || noun ELSE noun END, \
                CASE WHEN random() < 0.3 THEN jsonb_build_object('sort', 'relevance', 'categories', jsonb_build_array(category)) \
                     ELSE jsonb_build_object('sort', 'relevance') END, \
                CASE WHEN random() < 0.08 THEN 0 ELSE 1 + floor(random() * 20)::int END, \
                (2 + 40 * power(random(), 3))::real, \
                CASE WHEN random() < 0.1 THEN 2 ELSE 1 END, \
                now() - random() * interval '720 days' \
         FROM ( \
           SELECT g, ($3::text[])[c + 1] AS category, \
                  ($6::text[])[c * 12 + 1 + floor(12 * power(random(), 1.5))::int] AS noun, \
                  ($7::text[])[1 + floor(40 * power(random(), 1.3))::int] AS brand \
           FROM generate_series($1::bigint, $2::bigint) g, \
                LATERAL (SELECT floor(20 * power(random(), 2))::int + (g * 0)::int AS c) cc \
         ) s",
        |q| {
            q.bind(&CATEGORIES[..])
                .bind(first_user.unwrap_or(0))
                .bind(users as f64)
                .bind(&NOUNS[..])
                .bind(&BRANDS[..])
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Measurements per generated price-history bucket (the service's default
/// capacity).
const BUCKET_CAPACITY: usize = 200;

/// `total` price measurements in MongoDB: a random walk of each product's
/// price over the last 24 months, popular (low-id) products changing far
/// more often. Written as whole buckets with `insert_many`. Generated
/// measurements carry negative sequence numbers, so they never collide with
/// the outbox ids of measurements the service records.
pub async fn price_history(
    db: &PgPool,
    mongo: &Mongo,
    total: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let products: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, (price * 100)::bigint FROM products ORDER BY id")
            .fetch_all(db)
            .await?;
    anyhow::ensure!(!products.is_empty(), "price history needs products");
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let now = chrono::Utc::now();
    let span_ms = chrono::Duration::days(730).num_milliseconds() as f64;
    // (seq, at ms, price) of each (product, day).
    type Point = (i64, i64, i64);
    let mut days: BTreeMap<(i64, String), Vec<Point>> = BTreeMap::new();
    let mut prices: std::collections::HashMap<i64, i64> = products.iter().copied().collect();
    let progress = bar("prices", total);
    for n in 0..total {
        let index = ((products.len() as f64) * next().powi(3)) as usize;
        let product = products[index.min(products.len() - 1)].0;
        let at = now - chrono::Duration::milliseconds((next() * span_ms) as i64);
        let price = prices.entry(product).or_insert(100);
        *price = ((*price as f64) * (0.9 + 0.2 * next())).round().max(1.0) as i64;
        days.entry((product, day_key(at.date_naive())))
            .or_default()
            .push((-(n as i64) - 1, at.timestamp_millis(), *price));
        if n % 10_000 == 0 {
            progress.set_position(n);
        }
    }
    let mut buckets = Vec::new();
    for ((product_id, day), mut measurements) in days {
        measurements.sort_by_key(|(seq, at, _)| (*at, *seq));
        for chunk in measurements.chunks(BUCKET_CAPACITY) {
            let prices: Vec<i64> = chunk.iter().map(|m| m.2).collect();
            buckets.push(Bucket {
                id: ObjectId::new(),
                product_id,
                day: day.clone(),
                count: chunk.len() as i64,
                min: *prices.iter().min().expect("a chunk is never empty"),
                max: *prices.iter().max().expect("a chunk is never empty"),
                sum: prices.iter().sum(),
                first_ms: chunk.first().expect("a chunk is never empty").1,
                last_ms: chunk.last().expect("a chunk is never empty").1,
                seqs: chunk.iter().map(|m| m.0).collect(),
                at_ms: chunk.iter().map(|m| m.1).collect(),
                prices_cents: prices,
            });
        }
    }
    let collection = mongo.collection::<Bucket>(PRICE_HISTORY);
    for batch in buckets.chunks(500) {
        mongo
            .run("insert_many", PRICE_HISTORY, collection.insert_many(batch))
            .await?;
    }
    progress.finish();
    Ok(())
}
