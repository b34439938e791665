//! The benchmarks' catalog: one million generated products in the database
//! `datagate_bench`, generated once with set-based SQL (deterministic:
//! fixed random seed) and reused by later runs; `BENCH_REBUILD=1`
//! regenerates it. Shapes: skewed category popularity, log-normal prices,
//! titles of brand, adjective, colour, noun and model number, creation times
//! over two years.

use std::time::Instant;

use sqlx::{Connection as _, PgConnection, PgPool};

pub const PRODUCTS: i64 = 1_000_000;
pub const DATABASE: &str = "datagate_bench";

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

/// The bench database with its million products, generated if missing.
pub async fn prepare(admin_url: &str, url: &str) -> anyhow::Result<PgPool> {
    let rebuild = std::env::var_os("BENCH_REBUILD").is_some();
    let mut admin = PgConnection::connect(admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut admin)
            .await?;
    if exists && rebuild {
        sqlx::query(&format!(r#"DROP DATABASE "{DATABASE}" WITH (FORCE)"#))
            .execute(&mut admin)
            .await?;
    }
    if !exists || rebuild {
        sqlx::query(&format!(r#"CREATE DATABASE "{DATABASE}""#))
            .execute(&mut admin)
            .await?;
    }
    let db = PgPool::connect(url).await?;
    datagate::store::postgres::migrate_up(&db).await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&db)
        .await?;
    if count == PRODUCTS {
        println!("using the {PRODUCTS} products in {DATABASE} (BENCH_REBUILD=1 regenerates them)");
        return Ok(db);
    }
    anyhow::ensure!(
        count == 0,
        "{DATABASE} holds {count} products; run with BENCH_REBUILD=1"
    );
    generate(&db).await?;
    Ok(db)
}

async fn generate(db: &PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut conn = db.acquire().await?;
    // One transaction: generated rows skip the audit triggers (they are not
    // writes of any caller), and the search and sort indexes are built once
    // at the end instead of row by row.
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
        "ALTER TABLE products DISABLE TRIGGER products_audit",
        "ALTER TABLE inventory DISABLE TRIGGER inventory_audit",
        "SELECT setseed(0.42)",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    for (name, _) in &indexes {
        sqlx::query(&format!("DROP INDEX {name}"))
            .execute(&mut *tx)
            .await?;
    }
    println!("generating {PRODUCTS} products...");
    sqlx::query(
        "INSERT INTO products (sku, title, description, category, price, rating, review_count, created_at, updated_at) \
         SELECT 'BENCH-' || g, \
                initcap(brand) || ' ' || adjective || ' ' || color || ' ' || noun || ' ' || model, \
                'A ' || adjective || ' ' || noun || ' made of ' || material || '. Model ' || model || ' by ' || initcap(brand) || '.', \
                ($1::text[])[category + 1], \
                round(least(greatest(exp(ln(25) + 0.9 * sqrt(-2 * ln(1 - u1)) * cos(2 * pi() * u2)), 1), 99999)::numeric, 2), \
                round((1 + 4 * power(random(), 0.35))::numeric, 1), \
                floor(power(random(), 3) * 5000)::int, \
                created, created \
         FROM ( \
           SELECT g, c.category, \
                  ($2::text[])[c.category * 12 + 1 + floor(12 * power(random(), 1.5))::int] AS noun, \
                  ($3::text[])[1 + floor(40 * power(random(), 1.3))::int] AS brand, \
                  ($4::text[])[1 + floor(24 * random())::int] AS adjective, \
                  ($5::text[])[1 + floor(12 * random())::int] AS color, \
                  ($6::text[])[1 + floor(8 * random())::int] AS material, \
                  upper(chr(65 + floor(26 * random())::int)) || (100 + floor(900 * random())::int) AS model, \
                  random() AS u1, random() AS u2, \
                  now() - random() * interval '730 days' AS created \
           FROM generate_series(1, $7::int) g, \
                LATERAL (SELECT floor(20 * power(random(), 2))::int + g * 0 AS category) c \
         ) src",
    )
    .bind(&CATEGORIES[..])
    .bind(&NOUNS[..])
    .bind(&BRANDS[..])
    .bind(&ADJECTIVES[..])
    .bind(&COLORS[..])
    .bind(&MATERIALS[..])
    .bind(PRODUCTS as i32)
    .execute(&mut *tx)
    .await?;
    println!("  products: {:.0?}", started.elapsed());
    sqlx::query("INSERT INTO inventory (product_id, quantity) SELECT id, floor(random() * 500)::int FROM products")
        .execute(&mut *tx)
        .await?;
    println!("  inventory: {:.0?}", started.elapsed());
    for (_, definition) in &indexes {
        sqlx::query(definition).execute(&mut *tx).await?;
    }
    println!("  indexes: {:.0?}", started.elapsed());
    for statement in [
        "ALTER TABLE products ENABLE TRIGGER products_audit",
        "ALTER TABLE inventory ENABLE TRIGGER inventory_audit",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    sqlx::query("VACUUM ANALYZE products")
        .execute(&mut *conn)
        .await?;
    sqlx::query("VACUUM ANALYZE inventory")
        .execute(&mut *conn)
        .await?;
    println!("generated in {:.0?}", started.elapsed());
    Ok(())
}
