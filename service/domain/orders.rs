//! Orders: parsing an order request, creation against inventory, the
//! status lifecycle, and the reads that assemble users, orders, items and
//! products through request-scoped loaders (one query per level, whatever
//! the page size). Types are in `model::orders`; SQL in `store::orders`.

use std::collections::{HashMap, HashSet};

use super::{
    catalog::{insufficient_inventory, products_not_found},
    idempotency::{Claim, Idempotency},
    users::{Users, user_not_found},
    write::Writes,
};
use crate::{
    cache::Entity,
    error::{Detail, Error, Result, Violations, reason},
    loaders::{Loaders, OrderHeaders, PointReads},
    model::{
        Id,
        audit::Actor,
        idempotency::RequestKey,
        orders::{
            MAX_LINES, MAX_QUANTITY, NewOrder, ORDERS_PER_USER_DEFAULT, ORDERS_PER_USER_MAX, Order,
            OrderCursor, OrderFilter, OrderHeader, OrderItem, OrderLine, OrderStatus,
            USERS_PAGE_DEFAULT, USERS_PAGE_MAX, UserWithOrders,
        },
        paging::{Page, PageRequest, PageSize, PageTokens},
        users::UserFilter,
    },
    retry, store,
};

/// One line of an order request as sent: a product id and a quantity.
#[derive(Debug, Clone, Copy)]
pub struct RawLine {
    pub product_id: i64,
    pub quantity: i32,
}

/// Parses an order request: a valid user id, 1 to [`MAX_LINES`] lines, each
/// product once, 1 to [`MAX_QUANTITY`] units a line, and an optional request
/// id (empty means none). Every violation is reported at once.
pub fn parse_new_order(user_id: i64, lines: &[RawLine], request_id: &str) -> Result<NewOrder> {
    let mut v = Violations::default();
    let user_id = v.check("user_id", Id::parse(user_id));
    if lines.is_empty() {
        v.add("items", "must hold at least one line");
    } else if lines.len() > MAX_LINES {
        v.add("items", format!("must hold at most {MAX_LINES} lines"));
    }
    let mut seen = HashSet::new();
    let mut parsed = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let field = format!("items[{i}].product_id");
        let product_id = v.check(&field, Id::parse(line.product_id));
        if !(1..=MAX_QUANTITY).contains(&line.quantity) {
            v.add(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            );
        }
        if let Some(product_id) = product_id {
            if !seen.insert(product_id) {
                v.add(
                    field,
                    "appears in more than one line; put the whole quantity on one line",
                );
            }
            parsed.push(OrderLine {
                product_id,
                quantity: line.quantity,
            });
        }
    }
    let request_key = if request_id.is_empty() {
        None
    } else {
        v.check("request_id", RequestKey::parse(request_id))
    };
    v.into_result()?;
    let user_id = user_id.ok_or_else(|| anyhow::anyhow!("user_id missing without a violation"))?;
    Ok(NewOrder {
        user_id,
        lines: parsed,
        request_key,
    })
}

pub fn order_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new(
            reason::ORDER_NOT_FOUND,
            format!("order {id} does not exist"),
        )
        .with("order_id", id),
    )
}

#[derive(Clone)]
pub struct Orders {
    writes: Writes,
    pages: PageTokens,
    users: Users,
    /// GetOrder's reads of the order's row, batched across calls.
    reads: PointReads<OrderHeaders>,
}

impl Orders {
    /// Orders on `writes`' pool and cache.
    pub fn new(writes: &Writes, pages: PageTokens, users: Users) -> Self {
        Self {
            writes: writes.clone(),
            pages,
            users,
            reads: PointReads::new(writes.db().clone()),
        }
    }

    fn loaders(&self, orders_per_user: u32) -> Loaders {
        Loaders::new(
            self.writes.db().clone(),
            self.writes.cache().clone(),
            orders_per_user,
        )
    }

    /// Creates the order in one transaction. With a request key, the key is
    /// claimed first (see [`Idempotency`]): a retry replays the first
    /// response. Inventory rows are locked in product id order, so concurrent
    /// orders never deadlock.
    #[tracing::instrument(skip_all, fields(user_id = %new.user_id, lines = new.lines.len()), err(level = "info", Debug))]
    pub async fn create(&self, actor: &Actor, new: NewOrder) -> Result<Order> {
        let idempotency = new
            .request_key
            .as_ref()
            .map(|key| Idempotency::new(actor.caller(), key, new.fingerprint()));
        retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            if let Some(idempotency) = &idempotency
                && let Claim::Replay(order) = idempotency.claim::<Order>(&mut tx).await?
            {
                tracing::info!(order_id = %order.header.id, "replayed an idempotent create");
                return Ok(order);
            }

            // Lines in product id order: the order of the inventory locks
            // and of the items.
            let mut lines = new.lines.clone();
            lines.sort_by_key(|l| l.product_id);
            let placed = store::orders::place(&mut tx, new.user_id, &lines).await?;
            let Some(header) = placed.first().and_then(|line| line.order()) else {
                return Err(why_not_placed(&new, &placed));
            };
            let mut items = Vec::with_capacity(placed.len());
            for (line, found) in lines.iter().zip(&placed) {
                let product = found
                    .product()
                    .filter(|p| p.id == line.product_id)
                    .ok_or_else(|| anyhow::anyhow!("an order was placed without its product"))?;
                let subtotal = product
                    .price_cents
                    .checked_mul(line.quantity.into())
                    .ok_or_else(|| anyhow::anyhow!("order subtotal overflows"))?;
                items.push(OrderItem {
                    product_id: line.product_id,
                    quantity: line.quantity,
                    unit_price_cents: product.price_cents,
                    subtotal_cents: subtotal,
                    product: Some(product),
                });
            }
            let total = header.total_cents;
            let order = Order { header, items };
            if let Some(idempotency) = &idempotency {
                idempotency.save(&mut tx, &order).await?;
            }
            // The new id may be cached as "not found"; the stock changed.
            tx.touches(Entity::Order, order.header.id);
            for line in &lines {
                tx.touches(Entity::Product, line.product_id);
            }
            tx.commit().await?;
            tracing::info!(order_id = %order.header.id, total_cents = total, "order created");
            Ok(order)
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id), err(level = "info", Debug))]
    /// The order and its items come from the cache; the product summaries
    /// from the product cache, so a price change invalidates only products.
    pub async fn get(&self, id: Id) -> Result<Order> {
        let loaders = self.loaders(ORDERS_PER_USER_DEFAULT);
        let order = self
            .writes
            .cache()
            .get_or_load(Entity::Order, id.get(), || async {
                let Some(header) = self.reads.load(id).await? else {
                    return Ok(None);
                };
                Ok(attach_items(&loaders, vec![header]).await?.pop())
            })
            .await?
            .ok_or_else(|| order_not_found(id))?;
        Ok(attach_products(&loaders, vec![order]).await?.remove(0))
    }

    #[tracing::instrument(skip_all, fields(page_size = page.size.get()), err(level = "info", Debug))]
    pub async fn list(&self, filter: OrderFilter, page: PageRequest) -> Result<Page<Order>> {
        let query = filter.canonical();
        let listing = self.pages.listing("orders", &query);
        let after: Option<OrderCursor> = listing.after(&page)?;
        let headers = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(self.writes.db()).await?;
            store::orders::list(&mut conn, &filter, after, page.size.fetch_limit()).await
        })
        .await?;
        let headers = listing.page(headers, page.size, |last| -> OrderCursor {
            (last.created_at.timestamp_micros(), last.id.get())
        });
        let loaders = self.loaders(ORDERS_PER_USER_DEFAULT);
        Ok(Page {
            items: hydrate(&loaders, headers.items).await?,
            next_page_token: headers.next_page_token,
        })
    }

    /// Moves an order along its lifecycle; cancelling returns the stock.
    #[tracing::instrument(skip_all, fields(order_id = %id, to = to.as_str()), err(level = "info", Debug))]
    pub async fn update_status(
        &self,
        actor: &Actor,
        id: Id,
        to: OrderStatus,
        version: Option<i64>,
    ) -> Result<Order> {
        let header = retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let (from, current_version) = store::orders::lock_order(&mut tx, id)
                .await?
                .ok_or_else(|| order_not_found(id))?;
            if let Some(expected) = version
                && expected != current_version
            {
                return Err(Error::version_conflict(
                    "order",
                    id,
                    expected,
                    current_version,
                ));
            }
            if !from.can_become(to) {
                return Err(Error::FailedPrecondition(
                    Detail::new(
                        reason::ORDER_STATE_CONFLICT,
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
                // The stock of every product of the order changes.
                for product in store::orders::return_inventory(&mut tx, id).await? {
                    tx.touches(Entity::Product, product);
                }
            }
            let header = store::orders::set_status(&mut tx, id, to).await?;
            tx.touches(Entity::Order, id);
            tx.commit().await?;
            tracing::info!(from = from.as_str(), "order status changed");
            Ok(header)
        })
        .await?;
        let order = hydrate(&self.loaders(ORDERS_PER_USER_DEFAULT), vec![header])
            .await?
            .remove(0);
        Ok(order)
    }

    /// A page of users, each with their most recent orders, items and
    /// products: the page query plus one batched query per level.
    #[tracing::instrument(skip_all, fields(page_size = page.size.get(), orders_per_user), err(level = "info", Debug))]
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

/// Why [`store::orders::place`] created no order, from what it found, in
/// the order the checks are documented: the user, then unknown products (in
/// request order), then the first line short of stock (in product id order).
fn why_not_placed(new: &NewOrder, placed: &[store::orders::PlacedLine]) -> Error {
    if !placed.first().is_some_and(|line| line.user_live) {
        return user_not_found(new.user_id);
    }
    let by_id: HashMap<Id, &store::orders::PlacedLine> =
        placed.iter().map(|line| (line.product_id, line)).collect();
    let missing: Vec<Id> = new
        .lines
        .iter()
        .map(|l| l.product_id)
        .filter(|id| by_id.get(id).is_none_or(|line| line.sku.is_none()))
        .collect();
    if !missing.is_empty() {
        return products_not_found(&missing, "");
    }
    for line in placed {
        let wanted = new
            .lines
            .iter()
            .find(|l| l.product_id == line.product_id)
            .map_or(0, |l| l.quantity);
        let available = line.available.unwrap_or(0);
        if available < wanted {
            return insufficient_inventory(line.product_id, available.into(), wanted.into());
        }
    }
    anyhow::anyhow!("an order with a live user, known products and enough stock was not placed")
        .into()
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
