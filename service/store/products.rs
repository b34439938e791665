//! SQL for `products` and `inventory`. Prices are NUMERIC in the database and
//! integer cents everywhere else; the conversion happens in SQL.

use sqlx::PgConnection;

use super::{rows_for_ids, scalar_for_id};
use crate::{
    error::Result,
    model::{
        Id,
        catalog::{NewProduct, Product, ProductPatch},
    },
};

/// The columns of a [`Product`], from `products p` and `inventory i`.
macro_rules! product_columns {
    () => {
        "p.id, p.sku, p.title, p.description, p.category, \
         (p.price * 100)::bigint AS price_cents, p.rating::float8 AS rating, p.review_count, \
         i.quantity AS inventory, p.created_at, p.updated_at, p.version"
    };
}
pub(crate) use product_columns;

/// `SELECT <product columns> FROM products p JOIN inventory i ... <rest>`.
macro_rules! select_products {
    ($rest:literal) => {
        concat!(
            "SELECT ",
            product_columns!(),
            " FROM products p JOIN inventory i ON i.product_id = p.id ",
            $rest
        )
    };
}

/// Inserts the product and its inventory row in one statement.
pub async fn insert(conn: &mut PgConnection, new: &NewProduct) -> Result<Product> {
    let product: Product = sqlx::query_as(
        "WITH p AS ( \
           INSERT INTO products (sku, title, description, category, price, rating, review_count) \
           VALUES ($1, $2, $3, $4, $5::bigint / 100.0, $6, $7) RETURNING *), \
         i AS (INSERT INTO inventory (product_id, quantity) SELECT id, $8 FROM p RETURNING quantity) \
         SELECT p.id, p.sku, p.title, p.description, p.category, \
                (p.price * 100)::bigint AS price_cents, p.rating::float8 AS rating, p.review_count, \
                i.quantity AS inventory, p.created_at, p.updated_at, p.version \
         FROM p, i",
    )
    .bind(new.sku.as_str())
    .bind(new.title.as_str())
    .bind(new.description.as_str())
    .bind(new.category.as_str())
    .bind(new.price_cents)
    .bind(new.rating)
    .bind(new.review_count)
    .bind(new.inventory)
    .fetch_one(conn)
    .await?;
    Ok(product)
}

/// The products among `ids`, in no particular order.
pub async fn find_many(conn: &mut PgConnection, ids: &[Id]) -> Result<Vec<Product>> {
    rows_for_ids(conn, select_products!("WHERE p.id = ANY($1)"), ids).await
}

/// Applies the patch at `version`; the product and whether its price changed.
pub async fn update(
    conn: &mut PgConnection,
    id: Id,
    version: i64,
    patch: &ProductPatch,
) -> Result<Option<(Product, bool)>> {
    let updated: Option<bool> = sqlx::query_scalar(
        "WITH old AS (SELECT price FROM products WHERE id = $1 AND version = $2 FOR UPDATE) \
         UPDATE products p SET \
           title = COALESCE($3, p.title), \
           description = COALESCE($4, p.description), \
           category = COALESCE($5, p.category), \
           price = COALESCE($6::bigint / 100.0, p.price), \
           rating = COALESCE($7, p.rating), \
           review_count = COALESCE($8, p.review_count), \
           updated_at = now(), \
           version = p.version + 1 \
         FROM old WHERE p.id = $1 AND p.version = $2 RETURNING old.price <> p.price",
    )
    .bind(id.get())
    .bind(version)
    .bind(patch.title.as_ref().map(|t| t.as_str()))
    .bind(patch.description.as_ref().map(|t| t.as_str()))
    .bind(patch.category.as_ref().map(|t| t.as_str()))
    .bind(patch.price_cents)
    .bind(patch.rating)
    .bind(patch.review_count)
    .fetch_optional(&mut *conn)
    .await?;
    match updated {
        Some(price_changed) => Ok(find_many(conn, &[id])
            .await?
            .pop()
            .map(|p| (p, price_changed))),
        None => Ok(None),
    }
}

pub async fn current_version(conn: &mut PgConnection, id: Id) -> Result<Option<i64>> {
    scalar_for_id(conn, "SELECT version FROM products WHERE id = $1", id).await
}

/// The product's stock, its inventory row locked (`FOR UPDATE`) until the
/// transaction ends; `None` for an unknown product.
pub async fn lock_stock(conn: &mut PgConnection, id: Id) -> Result<Option<i32>> {
    const SQL: &str = "SELECT quantity FROM inventory WHERE product_id = $1 FOR UPDATE";
    scalar_for_id(conn, SQL, id).await
}

/// Adds `delta` to the product's stock; the new quantity. A result below
/// zero violates `inventory_quantity_check`.
pub async fn add_stock(conn: &mut PgConnection, id: Id, delta: i32) -> Result<i32> {
    Ok(sqlx::query_scalar(
        "UPDATE inventory SET quantity = quantity + $2, updated_at = now() \
         WHERE product_id = $1 RETURNING quantity",
    )
    .bind(id.get())
    .bind(delta)
    .fetch_one(conn)
    .await?)
}
