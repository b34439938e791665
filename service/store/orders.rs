//! SQL for `orders`, `order_items`, `inventory` reservations and
//! `idempotency_keys`.

use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::{ListOrder, push_list_predicates, raw_ids, rows_for_ids};

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

/// One line of [`place`]'s answer: what the statement found for it, and the
/// order it created, if it did (the same on every line).
#[derive(Debug, sqlx::FromRow)]
pub struct PlacedLine {
    pub user_live: bool,
    pub product_id: Id,
    /// `None`: no such product.
    pub sku: Option<String>,
    pub title: Option<String>,
    pub category: Option<String>,
    pub price_cents: Option<i64>,
    /// The stock, locked; `None` when it was not locked (the user or a
    /// product is missing) or the product has no inventory row.
    pub available: Option<i32>,
    pub order_id: Option<Id>,
    pub order_user_id: Option<Id>,
    pub order_number: Option<String>,
    pub status: Option<OrderStatus>,
    pub total_cents: Option<i64>,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    pub version: Option<i64>,
}

impl PlacedLine {
    /// The line's product, if it exists.
    pub fn product(&self) -> Option<ProductSummary> {
        Some(ProductSummary {
            id: self.product_id,
            sku: self.sku.clone()?,
            title: self.title.clone()?,
            category: self.category.clone()?,
            price_cents: self.price_cents?,
        })
    }

    /// The order the statement created, if it did.
    pub fn order(&self) -> Option<OrderHeader> {
        Some(OrderHeader {
            id: self.order_id?,
            order_number: self.order_number.clone()?,
            user_id: self.order_user_id?,
            status: self.status?,
            total_cents: self.total_cents?,
            created_at: self.created_at?,
            updated_at: self.updated_at?,
            version: self.version?,
        })
    }
}

/// Places an order in one statement (one round trip): locks the live user
/// (`FOR SHARE`, against a concurrent deletion), reads the products, locks
/// their inventory rows in product id order (the same order in every
/// transaction, so concurrent orders cannot deadlock), and only if the user
/// is live, every product exists and every line is in stock, takes the
/// stock and inserts the order and its items (in product id order). One
/// row per line, in product id order, says what was found and, on every
/// row, the order if it was created; when it was not, nothing was written.
///
/// The order of the steps is the data flow's, as it was in separate
/// statements: the inventory scan is gated by one-time filters on the user
/// and product CTEs (evaluated before it starts); the stock update by
/// `enough`, which reads the locked stock, so nothing is written before
/// every lock is held; the order insert by the stock update's rows, and the
/// items insert by the order's, so the rows (and their audit entries) are
/// written stock, order, items. The writes see
/// the locked rows' latest versions (READ COMMITTED follows the update
/// chain of a row it locked), and `inventory_quantity_check` stays the last
/// word on stock. `lines` must hold each product once.
pub async fn place(
    conn: &mut PgConnection,
    user_id: Id,
    lines: &[OrderLine],
) -> Result<Vec<PlacedLine>> {
    let products: Vec<i64> = lines.iter().map(|l| l.product_id.get()).collect();
    let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    let placed: Vec<PlacedLine> = sqlx::query_as(concat!(
        "WITH lines AS ( \
           SELECT product_id, quantity FROM unnest($2::bigint[], $3::int[]) AS l(product_id, quantity)), \
         live_user AS MATERIALIZED ( \
           SELECT id FROM users WHERE id = $1::bigint AND deleted_at IS NULL FOR SHARE), \
         found AS MATERIALIZED ( \
           SELECT id, sku, title, category, price FROM products WHERE id = ANY($2::bigint[])), \
         stock AS MATERIALIZED ( \
           SELECT product_id, quantity FROM inventory \
           WHERE product_id = ANY($2::bigint[]) \
             AND (SELECT count(*) FROM live_user) = 1 \
             AND (SELECT count(*) FROM found) = cardinality($2::bigint[]) \
           ORDER BY product_id FOR UPDATE), \
         enough AS MATERIALIZED ( \
           SELECT (SELECT count(*) FROM stock s JOIN lines l USING (product_id) \
                   WHERE s.quantity >= l.quantity) = cardinality($2::bigint[]) AS ok), \
         taken AS ( \
           UPDATE inventory i SET quantity = i.quantity - l.quantity, updated_at = now() \
           FROM lines l WHERE (SELECT ok FROM enough) AND i.product_id = l.product_id \
           RETURNING i.product_id), \
         new_order AS ( \
           INSERT INTO orders (user_id, total) \
           SELECT $1::bigint, sum(f.price * l.quantity) FROM lines l JOIN found f ON f.id = l.product_id \
           HAVING (SELECT count(*) FROM taken) = cardinality($2::bigint[]) \
           RETURNING ",
        order_columns!(),
        "), \
         new_items AS ( \
           INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
           SELECT o.id, l.product_id, l.quantity, f.price \
           FROM new_order o CROSS JOIN lines l JOIN found f ON f.id = l.product_id \
           ORDER BY l.product_id) \
         SELECT EXISTS (SELECT 1 FROM live_user) AS user_live, l.product_id, \
                f.sku, f.title, f.category, (f.price * 100)::bigint AS price_cents, \
                s.quantity AS available, \
                o.id AS order_id, o.user_id AS order_user_id, o.order_number, o.status, o.total_cents, \
                o.created_at, o.updated_at, o.version \
         FROM lines l \
         LEFT JOIN found f ON f.id = l.product_id \
         LEFT JOIN stock s ON s.product_id = l.product_id \
         LEFT JOIN new_order o ON true \
         ORDER BY l.product_id"
    ))
    .bind(user_id.get())
    .bind(products)
    .bind(quantities)
    .fetch_all(conn)
    .await?;
    Ok(placed)
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
    push_list_predicates(
        &mut q,
        ListOrder::NewestFirst,
        filter.status.map(|s| s.as_str()),
        filter.created_after,
        filter.created_before,
        after,
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
