//! Request-scoped batched loaders, on the `dataloader` crate.
//!
//! A loader collects the keys its callers ask for while they yield, then
//! loads them all with one `WHERE … = ANY($1)` query. Loaders are created per
//! request (their cache must not outlive it) and sized so one level of a
//! request is one query.
//!
//! The crate's behaviour, and how it is designed around here:
//! - its batch function returns a plain map: ours always holds **every**
//!   requested key, with a per-key result (`Ok(None)` for a missing id, so a
//!   missing key is NOT_FOUND for that key only; a failed query is the same
//!   shared error for every key, so it reaches every waiter);
//! - `load` panics when a key is absent from the results: only `try_load` and
//!   `try_load_many` are used;
//! - the batch runs inside the future of whichever caller drains the pending
//!   keys. If that caller is cancelled mid-batch, the keys it drained are
//!   neither pending nor loaded and the other waiters get an error from
//!   `try_load`. That error can only mean a lost batch (our results are
//!   complete), so the waiter loads again: the survivors pay one more query
//!   and never see the cancellation.

use std::{collections::HashMap, hash::Hash, sync::Arc};

use dataloader::{BatchFn, cached::Loader};
use sqlx::PgPool;

use crate::{
    cache::Cache,
    domain::{
        catalog::cached_products,
        error::{Error, Result},
        orders::{OrderHeader, OrderItem, ProductSummary},
        users::{Id, User},
    },
    store,
};

/// Large enough that a page (100 users × 20 orders × 50 items) is one batch.
const MAX_BATCH: usize = 100_000;
/// How often a waiter reloads after its batch was lost to a cancelled caller.
const LOST_BATCH_RETRIES: usize = 3;

/// One key's result, shared by every waiter on the batch.
pub type Shared<V> = std::result::Result<V, Arc<Error>>;

pub struct BatchLoader<K, V, F>
where
    K: Eq + Hash + Clone + std::fmt::Debug,
    V: Clone,
    F: BatchFn<K, Shared<V>>,
{
    inner: Loader<K, Shared<V>, F>,
}

impl<K, V, F> BatchLoader<K, V, F>
where
    K: Eq + Hash + Clone + std::fmt::Debug,
    V: Clone,
    F: BatchFn<K, Shared<V>>,
{
    pub fn new(batch: F) -> Self {
        Self {
            inner: Loader::new(batch).with_max_batch_size(MAX_BATCH),
        }
    }

    pub async fn load(&self, key: K) -> Result<V> {
        for _ in 0..LOST_BATCH_RETRIES {
            match Box::pin(self.inner.try_load(key.clone())).await {
                Ok(result) => return result.map_err(|e| e.duplicate()),
                Err(_) => tracing::debug!(?key, "batch lost to a cancelled caller; loading again"),
            }
        }
        Err(anyhow::anyhow!("key {key:?} was lost by {LOST_BATCH_RETRIES} batches in a row").into())
    }

    // The loads are boxed: a batch's future nests the loader's, the cache's
    // and sqlx's, deep enough to exceed the compiler's type layout depth in
    // the crates that await it.

    /// The values of `keys` (each once), or the first error among them.
    pub async fn load_many(&self, keys: &[K]) -> Result<HashMap<K, V>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        for _ in 0..LOST_BATCH_RETRIES {
            match Box::pin(self.inner.try_load_many(keys.to_vec())).await {
                Ok(results) => {
                    return results
                        .into_iter()
                        .map(|(k, v)| v.map(|v| (k, v)).map_err(|e| e.duplicate()))
                        .collect();
                }
                Err(_) => tracing::debug!("batch lost to a cancelled caller; loading again"),
            }
        }
        Err(anyhow::anyhow!("keys were lost by {LOST_BATCH_RETRIES} batches in a row").into())
    }
}

/// Every key of the batch with its result: the value found, `missing`
/// otherwise, or the one shared error.
fn per_key<V: Clone>(
    keys: &[Id],
    found: Result<HashMap<Id, V>>,
    missing: V,
) -> HashMap<Id, Shared<V>> {
    match found {
        Ok(mut found) => keys
            .iter()
            .map(|k| (*k, Ok(found.remove(k).unwrap_or_else(|| missing.clone()))))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, batch_size = keys.len(), "batch load failed");
            let e = Arc::new(e);
            keys.iter().map(|k| (*k, Err(e.clone()))).collect()
        }
    }
}

fn grouped<T>(rows: Vec<T>, key: impl Fn(&T) -> Id) -> HashMap<Id, Vec<T>> {
    let mut groups: HashMap<Id, Vec<T>> = HashMap::new();
    for row in rows {
        groups.entry(key(&row)).or_default().push(row);
    }
    groups
}

pub struct UsersById(pub PgPool);

impl BatchFn<Id, Shared<Option<User>>> for UsersById {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Option<User>>> {
        let found = async {
            let mut conn = self.0.acquire().await?;
            let users = store::users::find_many(&mut conn, keys).await?;
            Ok(users.into_iter().map(|u| (u.id, Some(u))).collect())
        }
        .await;
        per_key(keys, found, None)
    }
}

pub struct RecentOrdersByUser {
    pub db: PgPool,
    pub per_user: u32,
}

impl BatchFn<Id, Shared<Vec<OrderHeader>>> for RecentOrdersByUser {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Vec<OrderHeader>>> {
        let found = async {
            let mut conn = self.db.acquire().await?;
            let orders = store::orders::recent_for_users(&mut conn, keys, self.per_user).await?;
            Ok(grouped(orders, |o| o.user_id))
        }
        .await;
        per_key(keys, found, Vec::new())
    }
}

pub struct ItemsByOrder(pub PgPool);

impl BatchFn<Id, Shared<Vec<OrderItem>>> for ItemsByOrder {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Vec<OrderItem>>> {
        let found = async {
            let mut conn = self.0.acquire().await?;
            let items = store::orders::items_for_orders(&mut conn, keys).await?;
            Ok(grouped(items, |(order_id, _)| *order_id)
                .into_iter()
                .map(|(order, items)| (order, items.into_iter().map(|(_, i)| i).collect()))
                .collect())
        }
        .await;
        per_key(keys, found, Vec::new())
    }
}

/// Product summaries, through the product cache: products are shared by
/// many orders and read far more often than they change, so here caching
/// pays (one MGET, then one query for the misses).
pub struct ProductsById {
    pub db: PgPool,
    pub cache: Cache,
}

impl BatchFn<Id, Shared<Option<ProductSummary>>> for ProductsById {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Option<ProductSummary>>> {
        let found = Box::pin(cached_products(&self.db, &self.cache, keys))
            .await
            .map(|products| {
                products
                    .into_iter()
                    .map(|(id, p)| {
                        let summary = ProductSummary {
                            id,
                            sku: p.sku,
                            title: p.title,
                            category: p.category,
                            price_cents: p.price_cents,
                        };
                        (id, Some(summary))
                    })
                    .collect()
            });
        per_key(keys, found, None)
    }
}

pub type UserLoader = BatchLoader<Id, Option<User>, UsersById>;

/// The loaders of one order-reading request.
pub struct Loaders {
    pub recent_orders: BatchLoader<Id, Vec<OrderHeader>, RecentOrdersByUser>,
    pub items: BatchLoader<Id, Vec<OrderItem>, ItemsByOrder>,
    pub products: BatchLoader<Id, Option<ProductSummary>, ProductsById>,
}

impl Loaders {
    pub fn new(db: PgPool, cache: Cache, orders_per_user: u32) -> Self {
        Self {
            recent_orders: BatchLoader::new(RecentOrdersByUser {
                db: db.clone(),
                per_user: orders_per_user,
            }),
            items: BatchLoader::new(ItemsByOrder(db.clone())),
            products: BatchLoader::new(ProductsById { db, cache }),
        }
    }
}
