//! SQL for `orders`, `order_items`, `inventory` reservations and
//! `idempotency_keys`.

use std::collections::HashMap;

use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::{push_created_window, raw_ids, rows_for_ids};

use crate::{
    error::Result,
    model::{
        Id,
        orders::{
            OrderCursor, OrderFilter, OrderHeader, OrderItem, OrderLine, OrderStatus,
            ProductSummary,
        },
    },
};

macro_rules! order_columns {
    () => {
        "id, order_number, user_id, status, (total * 100)::bigint AS total_cents, \
         created_at, updated_at, version"
    };
}

// --- Creating and changing orders ---------------------------------------------

pub async fn product_summaries(
    conn: &mut PgConnection,
    product_ids: &[Id],
) -> Result<Vec<ProductSummary>> {
    let rows: Vec<(Id, String, String, String, i64)> = rows_for_ids(
        conn,
        "SELECT id, sku, title, category, (price * 100)::bigint FROM products WHERE id = ANY($1)",
        product_ids,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, sku, title, category, price_cents)| ProductSummary {
            id,
            sku,
            title,
            category,
            price_cents,
        })
        .collect())
}

/// Locks the inventory rows of the products in product id order (the same
/// order in every transaction, so concurrent orders cannot deadlock) and
/// returns their quantities.
pub async fn lock_inventory(
    conn: &mut PgConnection,
    product_ids: &[Id],
) -> Result<HashMap<Id, i32>> {
    let rows: Vec<(Id, i32)> = rows_for_ids(
        conn,
        "SELECT product_id, quantity FROM inventory WHERE product_id = ANY($1) \
         ORDER BY product_id FOR UPDATE",
        product_ids,
    )
    .await?;
    Ok(rows.into_iter().collect())
}

/// Decrements the stock of every line in one statement (rows already locked).
pub async fn take_inventory(conn: &mut PgConnection, lines: &[OrderLine]) -> Result<()> {
    let products: Vec<i64> = lines.iter().map(|l| l.product_id.get()).collect();
    let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        "UPDATE inventory i SET quantity = i.quantity - d.quantity, updated_at = now() \
         FROM unnest($1::bigint[], $2::int[]) AS d(product_id, quantity) \
         WHERE i.product_id = d.product_id",
    )
    .bind(products)
    .bind(quantities)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn insert_order(
    conn: &mut PgConnection,
    user_id: Id,
    total_cents: i64,
) -> Result<OrderHeader> {
    let order: OrderHeader = sqlx::query_as(concat!(
        "INSERT INTO orders (user_id, total) VALUES ($1, $2::bigint / 100.0) RETURNING ",
        order_columns!()
    ))
    .bind(user_id.get())
    .bind(total_cents)
    .fetch_one(conn)
    .await?;
    Ok(order)
}

pub async fn insert_items(
    conn: &mut PgConnection,
    order_id: Id,
    items: &[OrderItem],
) -> Result<()> {
    let products: Vec<i64> = items.iter().map(|i| i.product_id.get()).collect();
    let quantities: Vec<i32> = items.iter().map(|i| i.quantity).collect();
    let prices: Vec<i64> = items.iter().map(|i| i.unit_price_cents).collect();
    sqlx::query(
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
         SELECT $1, d.product_id, d.quantity, d.price / 100.0 \
         FROM unnest($2::bigint[], $3::int[], $4::bigint[]) AS d(product_id, quantity, price)",
    )
    .bind(order_id.get())
    .bind(products)
    .bind(quantities)
    .bind(prices)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks an order; its status and version.
pub async fn lock_order(
    conn: &mut PgConnection,
    order_id: Id,
) -> Result<Option<(OrderStatus, i64)>> {
    Ok(
        sqlx::query_as("SELECT status, version FROM orders WHERE id = $1 FOR UPDATE")
            .bind(order_id.get())
            .fetch_optional(conn)
            .await?,
    )
}

/// Puts a cancelled order's items back in stock, locking inventory rows in
/// product id order first, as `lock_inventory` does; the products restocked.
pub async fn return_inventory(conn: &mut PgConnection, order_id: Id) -> Result<Vec<Id>> {
    sqlx::query(
        "SELECT 1 FROM inventory WHERE product_id IN \
           (SELECT product_id FROM order_items WHERE order_id = $1) \
         ORDER BY product_id FOR UPDATE",
    )
    .bind(order_id.get())
    .execute(&mut *conn)
    .await?;
    Ok(sqlx::query_scalar(
        "UPDATE inventory i SET quantity = i.quantity + oi.quantity, updated_at = now() \
         FROM order_items oi WHERE oi.order_id = $1 AND i.product_id = oi.product_id \
         RETURNING i.product_id",
    )
    .bind(order_id.get())
    .fetch_all(conn)
    .await?)
}

pub async fn set_status(
    conn: &mut PgConnection,
    order_id: Id,
    status: OrderStatus,
) -> Result<OrderHeader> {
    let order: OrderHeader = sqlx::query_as(concat!(
        "UPDATE orders SET status = $2, updated_at = now(), version = version + 1 \
         WHERE id = $1 RETURNING ",
        order_columns!()
    ))
    .bind(order_id.get())
    .bind(status.as_str())
    .fetch_one(conn)
    .await?;
    Ok(order)
}

// --- Reading orders -----------------------------------------------------------

/// The orders among `ids`, in no particular order.
pub async fn find_many(conn: &mut PgConnection, order_ids: &[Id]) -> Result<Vec<OrderHeader>> {
    rows_for_ids(
        conn,
        concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE id = ANY($1)"
        ),
        order_ids,
    )
    .await
}

/// Orders matching `filter`, newest first, after the keyset position `after`.
pub async fn list(
    conn: &mut PgConnection,
    filter: &OrderFilter,
    after: Option<OrderCursor>,
    limit: i64,
) -> Result<Vec<OrderHeader>> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE TRUE"
    ));
    if let Some(user) = filter.user_id {
        q.push(" AND user_id = ").push_bind(user.get());
    }
    if let Some(status) = filter.status {
        q.push(" AND status = ").push_bind(status.as_str());
    }
    push_created_window(
        &mut q,
        filter.created_after,
        filter.created_before,
        after,
        true,
    )?;
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit);
    Ok(q.build_query_as().fetch_all(conn).await?)
}

/// The `per_user` most recent orders of each user, in one query: a LATERAL
/// join walks `orders_user_recent_idx` once per user.
pub async fn recent_for_users(
    conn: &mut PgConnection,
    user_ids: &[Id],
    per_user: u32,
) -> Result<Vec<OrderHeader>> {
    let orders: Vec<OrderHeader> = sqlx::query_as(concat!(
        "SELECT o.* FROM unnest($1::bigint[]) AS u(id) \
         CROSS JOIN LATERAL ( \
           SELECT ",
        order_columns!(),
        " FROM orders WHERE user_id = u.id \
           ORDER BY created_at DESC, id DESC LIMIT $2) o"
    ))
    .bind(raw_ids(user_ids))
    .bind(i64::from(per_user))
    .fetch_all(conn)
    .await?;
    Ok(orders)
}

/// The items of the orders, each with its order id, in insertion order.
pub async fn items_for_orders(
    conn: &mut PgConnection,
    order_ids: &[Id],
) -> Result<Vec<(Id, OrderItem)>> {
    let rows: Vec<(Id, Id, i32, i64, i64)> = rows_for_ids(
        conn,
        "SELECT order_id, product_id, quantity, (unit_price * 100)::bigint, (subtotal * 100)::bigint \
         FROM order_items WHERE order_id = ANY($1) ORDER BY order_id, id",
        order_ids,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(order_id, product_id, quantity, unit_price_cents, subtotal_cents)| {
                let item = OrderItem {
                    product_id,
                    quantity,
                    unit_price_cents,
                    subtotal_cents,
                    product: None,
                };
                (order_id, item)
            },
        )
        .collect())
}
