//! Orders: creation against inventory, the status lifecycle, and the reads
//! that assemble users, orders, items and products through request-scoped
//! loaders (one query per level, whatever the page size).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

use super::{
    audit::Actor,
    catalog::{insufficient_inventory, products_not_found},
    error::{Detail, Error, Result},
    paging::{Page, PageRequest, PageSize, PageTokens},
    users::{Id, User, UserFilter, Users, user_not_found},
};
use crate::{
    cache::{Cache, Entity},
    loaders::Loaders,
    store,
};

/// The most lines one order may have.
pub const MAX_LINES: usize = 50;
/// The most units of one product in one order.
pub const MAX_QUANTITY: i32 = 1000;
/// Users per ListUsersWithOrders page: default and maximum.
pub const USERS_PAGE_DEFAULT: i32 = 20;
pub const USERS_PAGE_MAX: u32 = 100;
/// Recent orders per user: default and maximum.
pub const ORDERS_PER_USER_DEFAULT: u32 = 5;
pub const ORDERS_PER_USER_MAX: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Processing,
    Completed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn from_db(s: &str) -> anyhow::Result<Self> {
        match s {
            "pending" => Ok(Self::Pending),
            "processing" => Ok(Self::Processing),
            "completed" => Ok(Self::Completed),
            "cancelled" => Ok(Self::Cancelled),
            other => anyhow::bail!("unknown order status {other:?} in the database"),
        }
    }

    /// pending → processing → completed; pending | processing → cancelled.
    pub fn can_become(self, to: Self) -> bool {
        use OrderStatus::*;
        matches!(
            (self, to),
            (Pending, Processing) | (Processing, Completed) | (Pending | Processing, Cancelled)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductSummary {
    pub id: Id,
    pub sku: String,
    pub title: String,
    pub category: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: Id,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub subtotal_cents: i64,
    pub product: Option<ProductSummary>,
}

/// An order without its items, as stored in `orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderHeader {
    pub id: Id,
    pub order_number: String,
    pub user_id: Id,
    pub status: OrderStatus,
    pub total_cents: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub header: OrderHeader,
    pub items: Vec<OrderItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderLine {
    pub product_id: Id,
    pub quantity: i32,
}

/// An idempotency key: 1 to 128 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey(String);

impl RequestKey {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 128 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be 1 to 128 visible ASCII characters".into());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated order request: 1 to 50 lines, each product once, 1 to 1000 units.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub user_id: Id,
    pub lines: Vec<OrderLine>,
    pub request_key: Option<RequestKey>,
}

impl NewOrder {
    /// The canonical payload digest that an idempotency key is bound to.
    pub fn fingerprint(&self) -> String {
        let mut lines = self.lines.clone();
        lines.sort_by_key(|l| l.product_id);
        let canonical = lines
            .iter()
            .map(|l| format!("{}x{}", l.product_id, l.quantity))
            .collect::<Vec<_>>()
            .join(",");
        hex::encode(Sha256::digest(format!(
            "user={};lines={canonical}",
            self.user_id
        )))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub user_id: Option<Id>,
    pub status: Option<OrderStatus>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

impl OrderFilter {
    fn canonical(&self) -> String {
        format!(
            "user={};status={};after={};before={}",
            self.user_id.map_or(String::new(), |u| u.to_string()),
            self.status.map_or("any", OrderStatus::as_str),
            self.created_after.map_or(String::new(), |t| t.to_rfc3339()),
            self.created_before
                .map_or(String::new(), |t| t.to_rfc3339()),
        )
    }
}

/// Keyset position in newest-first order listings: (created_at µs, id).
pub type OrderCursor = (i64, i64);

#[derive(Debug, Clone)]
pub struct UserWithOrders {
    pub user: User,
    pub recent_orders: Vec<Order>,
}

pub fn order_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new("ORDER_NOT_FOUND", format!("order {id} does not exist")).with("order_id", id),
    )
}

#[derive(Clone)]
pub struct Orders {
    db: PgPool,
    pages: PageTokens,
    users: Users,
    cache: Cache,
}

impl Orders {
    pub fn new(db: PgPool, pages: PageTokens, users: Users, cache: Cache) -> Self {
        Self {
            db,
            pages,
            users,
            cache,
        }
    }

    fn loaders(&self, orders_per_user: u32) -> Loaders {
        Loaders::new(self.db.clone(), self.cache.clone(), orders_per_user)
    }

    /// Creates the order in one transaction. With a request key, the key's
    /// row is inserted first: a concurrent call with the same key waits on
    /// it, and then reads the response this call stores before committing.
    /// Inventory rows are locked in product id order, so concurrent orders
    /// never deadlock.
    #[tracing::instrument(skip_all, fields(user_id = %new.user_id, lines = new.lines.len()), err(Debug))]
    pub async fn create(&self, actor: &Actor, new: NewOrder) -> Result<Order> {
        let caller = actor.caller();
        let fingerprint = new.fingerprint();
        let mut tx = store::audit::begin(&self.db, actor).await?;
        if let Some(key) = &new.request_key
            && !store::orders::claim_request_key(&mut tx, caller, key.as_str(), &fingerprint)
                .await?
        {
            let (stored_fingerprint, response) =
                store::orders::stored_response(&mut tx, caller, key.as_str()).await?;
            if stored_fingerprint != fingerprint {
                return Err(Error::FailedPrecondition(
                    Detail::new(
                        "IDEMPOTENCY_KEY_REUSED",
                        "this request_id was already used for a different order; use a new request_id for a new order",
                    )
                    .with("request_id", key.as_str()),
                ));
            }
            let order: Order = serde_json::from_value(response)
                .map_err(|e| anyhow::anyhow!("stored idempotent response is unreadable: {e}"))?;
            tracing::info!(order_id = %order.header.id, "replayed an idempotent create");
            return Ok(order);
        }

        if !store::teams::lock_live_user(&mut tx, new.user_id).await? {
            return Err(user_not_found(new.user_id));
        }
        let product_ids: Vec<Id> = new.lines.iter().map(|l| l.product_id).collect();
        let products = store::orders::product_summaries(&mut tx, &product_ids).await?;
        let by_id: HashMap<Id, &ProductSummary> = products.iter().map(|p| (p.id, p)).collect();
        let missing: Vec<Id> = product_ids
            .iter()
            .copied()
            .filter(|id| !by_id.contains_key(id))
            .collect();
        if !missing.is_empty() {
            return Err(products_not_found(&missing, ""));
        }

        let stock = store::orders::lock_inventory(&mut tx, &product_ids).await?;
        let mut lines = new.lines.clone();
        lines.sort_by_key(|l| l.product_id);
        for line in &lines {
            let available = stock.get(&line.product_id).copied().unwrap_or(0);
            if available < line.quantity {
                return Err(insufficient_inventory(
                    line.product_id,
                    available.into(),
                    line.quantity.into(),
                ));
            }
        }
        store::orders::take_inventory(&mut tx, &lines).await?;

        let mut items = Vec::with_capacity(lines.len());
        let mut total: i64 = 0;
        for line in &lines {
            let product = by_id[&line.product_id];
            let subtotal = product
                .price_cents
                .checked_mul(line.quantity.into())
                .ok_or_else(|| anyhow::anyhow!("order subtotal overflows"))?;
            total = total
                .checked_add(subtotal)
                .ok_or_else(|| anyhow::anyhow!("order total overflows"))?;
            items.push(OrderItem {
                product_id: line.product_id,
                quantity: line.quantity,
                unit_price_cents: product.price_cents,
                subtotal_cents: subtotal,
                product: Some(product.clone()),
            });
        }
        let header = store::orders::insert_order(&mut tx, new.user_id, total).await?;
        store::orders::insert_items(&mut tx, header.id, &items).await?;
        let order = Order { header, items };
        if let Some(key) = &new.request_key {
            let response = serde_json::to_value(&order)
                .map_err(|e| anyhow::anyhow!("serializing the order: {e}"))?;
            store::orders::store_response(&mut tx, caller, key.as_str(), &response).await?;
        }
        tx.commit().await?;
        // The new id may be cached as "not found"; the stock changed.
        let mut changed = vec![(Entity::Order, order.header.id.get())];
        changed.extend(lines.iter().map(|l| (Entity::Product, l.product_id.get())));
        self.cache.invalidate(&changed).await;
        tracing::info!(order_id = %order.header.id, total_cents = total, "order created");
        Ok(order)
    }

    #[tracing::instrument(skip_all, fields(order_id = %id), err(Debug))]
    /// The order and its items come from the cache; the product summaries
    /// from the product cache, so a price change invalidates only products.
    pub async fn get(&self, id: Id) -> Result<Order> {
        let loaders = self.loaders(ORDERS_PER_USER_DEFAULT);
        let order = self
            .cache
            .get_or_load(Entity::Order, id.get(), || async {
                let mut conn = self.db.acquire().await?;
                let Some(header) = store::orders::find(&mut conn, id).await? else {
                    return Ok(None);
                };
                drop(conn);
                Ok(attach_items(&loaders, vec![header]).await?.pop())
            })
            .await?
            .ok_or_else(|| order_not_found(id))?;
        Ok(attach_products(&loaders, vec![order]).await?.remove(0))
    }

    #[tracing::instrument(skip_all, fields(page_size = page.size.get()), err(Debug))]
    pub async fn list(&self, filter: OrderFilter, page: PageRequest) -> Result<Page<Order>> {
        let query = filter.canonical();
        let after: Option<OrderCursor> = page
            .token
            .as_deref()
            .map(|t| self.pages.decode("orders", &query, t))
            .transpose()?;
        let mut conn = self.db.acquire().await?;
        let headers =
            store::orders::list(&mut conn, &filter, after, page.size.fetch_limit()).await?;
        drop(conn);
        let headers = Page::from_overfetch(headers, page.size, |last| {
            let cursor: OrderCursor = (last.created_at.timestamp_micros(), last.id.get());
            self.pages.encode("orders", &query, &cursor)
        });
        let loaders = self.loaders(ORDERS_PER_USER_DEFAULT);
        Ok(Page {
            items: hydrate(&loaders, headers.items).await?,
            next_page_token: headers.next_page_token,
        })
    }

    /// Moves an order along its lifecycle; cancelling returns the stock.
    #[tracing::instrument(skip_all, fields(order_id = %id, to = to.as_str()), err(Debug))]
    pub async fn update_status(
        &self,
        actor: &Actor,
        id: Id,
        to: OrderStatus,
        version: Option<i64>,
    ) -> Result<Order> {
        let mut tx = store::audit::begin(&self.db, actor).await?;
        let (from, current_version) = store::orders::lock_order(&mut tx, id)
            .await?
            .ok_or_else(|| order_not_found(id))?;
        if let Some(expected) = version
            && expected != current_version
        {
            return Err(Error::Aborted(
                Detail::new(
                    "VERSION_CONFLICT",
                    format!("order {id} is at version {current_version}, not {expected}: read it again and retry"),
                )
                .with("order_id", id)
                .with("current_version", current_version),
            ));
        }
        if !from.can_become(to) {
            return Err(Error::FailedPrecondition(
                Detail::new(
                    "ORDER_STATE_CONFLICT",
                    format!(
                        "order {id} is {}; it cannot become {} (pending → processing → completed, pending or processing → cancelled)",
                        from.as_str(),
                        to.as_str()
                    ),
                )
                .with("order_id", id)
                .with("from", from.as_str())
                .with("to", to.as_str()),
            ));
        }
        if to == OrderStatus::Cancelled {
            store::orders::return_inventory(&mut tx, id).await?;
        }
        let header = store::orders::set_status(&mut tx, id, to).await?;
        tx.commit().await?;
        tracing::info!(from = from.as_str(), "order status changed");
        let order = hydrate(&self.loaders(ORDERS_PER_USER_DEFAULT), vec![header])
            .await?
            .remove(0);
        let mut changed = vec![(Entity::Order, id.get())];
        if to == OrderStatus::Cancelled {
            changed.extend(
                order
                    .items
                    .iter()
                    .map(|i| (Entity::Product, i.product_id.get())),
            );
        }
        self.cache.invalidate(&changed).await;
        Ok(order)
    }

    /// A page of users, each with their most recent orders, items and
    /// products: the page query plus one batched query per level.
    #[tracing::instrument(skip_all, fields(page_size = page.size.get(), orders_per_user), err(Debug))]
    pub async fn list_users_with_orders(
        &self,
        page: PageRequest,
        orders_per_user: u32,
    ) -> Result<Page<UserWithOrders>> {
        let users = self
            .users
            .list_scoped("users_with_orders", UserFilter::default(), page)
            .await?;
        let loaders = self.loaders(orders_per_user);
        let user_ids: Vec<Id> = users.items.iter().map(|u| u.id).collect();
        let recent = loaders.recent_orders.load_many(&user_ids).await?;
        let headers: Vec<OrderHeader> = user_ids
            .iter()
            .flat_map(|id| recent.get(id).cloned().unwrap_or_default())
            .collect();
        let mut orders = hydrate(&loaders, headers).await?.into_iter().peekable();
        let mut items = Vec::with_capacity(users.items.len());
        for user in users.items {
            let mut recent_orders = Vec::new();
            while let Some(order) = orders.next_if(|o| o.header.user_id == user.id) {
                recent_orders.push(order);
            }
            items.push(UserWithOrders {
                user,
                recent_orders,
            });
        }
        Ok(Page {
            items,
            next_page_token: users.next_page_token,
        })
    }
}

/// Attaches items and product summaries to orders: two batched loads for any
/// number of orders. Keeps the order of `headers`.
pub async fn hydrate(loaders: &Loaders, headers: Vec<OrderHeader>) -> Result<Vec<Order>> {
    let orders = attach_items(loaders, headers).await?;
    attach_products(loaders, orders).await
}

/// Orders with their items (without product summaries): one batched load.
async fn attach_items(loaders: &Loaders, headers: Vec<OrderHeader>) -> Result<Vec<Order>> {
    let order_ids: Vec<Id> = headers.iter().map(|h| h.id).collect();
    let mut items = loaders.items.load_many(&order_ids).await?;
    Ok(headers
        .into_iter()
        .map(|header| Order {
            items: items.remove(&header.id).unwrap_or_default(),
            header,
        })
        .collect())
}

/// Fills in the product summaries of the items: one batched load.
async fn attach_products(loaders: &Loaders, mut orders: Vec<Order>) -> Result<Vec<Order>> {
    let product_ids: Vec<Id> = orders
        .iter()
        .flat_map(|o| &o.items)
        .map(|i| i.product_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let products = loaders.products.load_many(&product_ids).await?;
    for item in orders.iter_mut().flat_map(|o| &mut o.items) {
        item.product = products.get(&item.product_id).cloned().flatten();
    }
    Ok(orders)
}

/// Parses the users page size of ListUsersWithOrders (0 → 20, at most 100).
pub fn users_page_size(raw: i32) -> Result<PageSize, String> {
    let raw = if raw == 0 { USERS_PAGE_DEFAULT } else { raw };
    PageSize::parse(raw).map(|s| s.capped(USERS_PAGE_MAX))
}

/// Parses orders per user (0 → 5, at most 20, negative is invalid).
pub fn orders_per_user(raw: i32) -> Result<u32, String> {
    match raw {
        n if n < 0 => Err(format!("must be between 0 and {ORDERS_PER_USER_MAX}")),
        0 => Ok(ORDERS_PER_USER_DEFAULT),
        n => Ok((n as u32).min(ORDERS_PER_USER_MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions_are_allowed() {
        use OrderStatus::*;
        let all = [Pending, Processing, Completed, Cancelled];
        let allowed: Vec<(OrderStatus, OrderStatus)> = all
            .iter()
            .flat_map(|f| all.iter().map(move |t| (*f, *t)))
            .filter(|(f, t)| f.can_become(*t))
            .collect();
        assert_eq!(
            allowed,
            [
                (Pending, Processing),
                (Pending, Cancelled),
                (Processing, Completed),
                (Processing, Cancelled)
            ]
        );
    }

    #[test]
    fn the_fingerprint_ignores_line_order_but_not_content() {
        let id = |n| Id::parse(n).unwrap();
        let order = |lines: Vec<(i64, i32)>| NewOrder {
            user_id: id(1),
            lines: lines
                .into_iter()
                .map(|(p, q)| OrderLine {
                    product_id: id(p),
                    quantity: q,
                })
                .collect(),
            request_key: None,
        };
        assert_eq!(
            order(vec![(1, 2), (3, 4)]).fingerprint(),
            order(vec![(3, 4), (1, 2)]).fingerprint()
        );
        assert_ne!(
            order(vec![(1, 2), (3, 4)]).fingerprint(),
            order(vec![(1, 2), (3, 5)]).fingerprint()
        );
    }

    #[test]
    fn an_order_survives_the_idempotency_store_round_trip() {
        let order = Order {
            header: OrderHeader {
                id: Id::parse(7).unwrap(),
                order_number: "ORD-0000000007".into(),
                user_id: Id::parse(3).unwrap(),
                status: OrderStatus::Pending,
                total_cents: 1234,
                created_at: Utc::now(),
                updated_at: Utc::now(),
                version: 1,
            },
            items: vec![],
        };
        let back: Order = serde_json::from_value(serde_json::to_value(&order).unwrap()).unwrap();
        assert_eq!(back, order);
    }
}
