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
//!
//! Point reads (GetUser, GetProduct, GetOrder) are batched **across**
//! requests instead, by [`PointReads`] (see `point`): concurrent reads of
//! one entity from different calls share one query.
//!
//! The loaders sit below the domain and beside the cache: they read the store
//! (and the cache, for entities read far more often than they change) and
//! return model types; they never import the domain.

pub mod orders;
pub mod point;
pub mod products;
pub mod users;

use std::{collections::HashMap, hash::Hash, sync::Arc};

use dataloader::{BatchFn, cached::Loader};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::PgPool;
use tracing::Instrument as _;

pub use orders::{Loaders, OrderHeaders};
pub use point::{PointRead, PointReads};
pub use products::{Products, ProductsById, cached_products};
pub use users::{LiveUsers, UserLoader, UsersById, cached_users};

use crate::{
    cache::{Cache, Entity},
    error::{Error, Result},
    model::Id,
    retry, store,
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
    inner: Loader<K, Shared<V>, Traced<F>>,
}

/// A batch function whose every batch runs in a `loader.batch` span (DEBUG:
/// exported under the trace filter, not logged at INFO), named after the
/// batch function's type, so the statements and Redis commands of a batch
/// are its children.
pub struct Traced<F> {
    name: &'static str,
    batch: F,
}

impl<F> Traced<F> {
    fn new(batch: F) -> Self {
        let path = std::any::type_name::<F>();
        Self {
            name: path.rsplit("::").next().unwrap_or(path),
            batch,
        }
    }
}

impl<K, V, F> BatchFn<K, V> for Traced<F>
where
    F: BatchFn<K, V>,
{
    fn load(&mut self, keys: &[K]) -> impl Future<Output = HashMap<K, V>> {
        let span = tracing::debug_span!(
            "loader.batch",
            otel.name = self.name,
            loader = self.name,
            batch_size = keys.len(),
        );
        self.batch.load(keys).instrument(span)
    }
}

impl<K, V, F> BatchLoader<K, V, F>
where
    K: Eq + Hash + Clone + std::fmt::Debug,
    V: Clone,
    F: BatchFn<K, Shared<V>>,
{
    pub fn new(batch: F) -> Self {
        Self {
            inner: Loader::new(Traced::new(batch)).with_max_batch_size(MAX_BATCH),
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

/// `R`'s rows among `ids`, read in one query (retried), by id.
async fn find_by_id<R: PointRead>(db: &PgPool, ids: &[Id]) -> Result<HashMap<Id, R::Row>> {
    let rows = retry::postgres(|| async {
        let mut conn = store::postgres::acquire(db).await?;
        R::find_many(&mut conn, ids).await
    })
    .await?;
    Ok(rows.into_iter().map(|row| (R::id(&row), row)).collect())
}

/// `R`'s rows by id through the cache: one MGET, then one `find_many` of
/// the misses (one query, retried), then one fenced fill. Ids not found are
/// absent.
async fn cached<R: PointRead>(
    db: &PgPool,
    cache: &Cache,
    entity: Entity,
    ids: &[Id],
) -> Result<HashMap<Id, R::Row>>
where
    R::Row: Serialize + DeserializeOwned,
{
    let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    let found = cache
        .get_many_or_load(entity, &raw, |misses| async move {
            let misses: Vec<Id> = misses
                .into_iter()
                .filter_map(|m| Id::parse(m).ok())
                .collect();
            let rows = find_by_id::<R>(db, &misses).await?;
            Ok(rows.into_iter().map(|(id, row)| (id.get(), row)).collect())
        })
        .await?;
    Ok(found
        .into_values()
        .flatten()
        .map(|row| (R::id(&row), row))
        .collect())
}
