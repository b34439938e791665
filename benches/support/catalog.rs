//! The benchmarks' catalog: one million products in the database
//! `datagate_bench`, made once by `datagate::generate` (seed 42; the shapes
//! are described there) and reused by later runs; `BENCH_REBUILD=1`
//! regenerates it.

use std::time::Instant;

use sqlx::{Connection as _, PgConnection, PgPool};

pub const PRODUCTS: i64 = 1_000_000;
pub const DATABASE: &str = "datagate_bench";

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
    datagate::generate::products(db, PRODUCTS as u64, 42).await?;
    for statement in ["VACUUM ANALYZE products", "VACUUM ANALYZE inventory"] {
        sqlx::query(statement).execute(db).await?;
    }
    println!("generated {PRODUCTS} products in {:.0?}", started.elapsed());
    Ok(())
}
