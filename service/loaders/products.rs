//! Products by id: the cache-aside batch read, and the batch function of the
//! product-summary loader of order reads.

use std::collections::HashMap;

use dataloader::BatchFn;
use sqlx::PgPool;

use super::{Shared, cached, per_key, point::point_read};
use crate::{
    cache::{Cache, Entity},
    error::Result,
    model::{Id, catalog::Product, orders::ProductSummary},
    store,
};

/// Products by id through the cache: one MGET, then one query for the misses.
/// Unknown products are absent from the map.
pub async fn cached_products(
    db: &PgPool,
    cache: &Cache,
    ids: &[Id],
) -> Result<HashMap<Id, Product>> {
    cached::<Products>(db, cache, Entity::Product, ids).await
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

point_read!(
    /// Products by id, batched across calls ([`super::PointReads`]).
    Products: Product,
    "product",
    store::products::find_many
);
