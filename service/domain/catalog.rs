//! Products and their inventory: operations and outcomes. Value types are
//! in `model::catalog`; SQL in `store::products`.

use super::write::Writes;
use crate::{
    cache::{Entity, Family},
    error::{Detail, Error, Result, reason},
    loaders::{PointReads, Products, cached_products},
    model::{
        Id,
        audit::Actor,
        catalog::{NewProduct, Product, ProductPatch},
        consistency::Consistency,
        in_request_order,
        outbox::Change,
    },
    retry, store,
};

pub fn product_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new(
            reason::PRODUCT_NOT_FOUND,
            format!("product {id} does not exist"),
        )
        .with("product_id", id),
    )
}

/// NOT_FOUND naming every missing product id.
pub fn products_not_found(ids: &[Id], hint: &str) -> Error {
    let list = ids.iter().map(Id::to_string).collect::<Vec<_>>().join(",");
    Error::NotFound(
        Detail::new(
            reason::PRODUCT_NOT_FOUND,
            format!("products {list} do not exist{hint}"),
        )
        .with("missing_ids", list),
    )
}

pub fn insufficient_inventory(product: Id, available: i64, requested: i64) -> Error {
    Error::FailedPrecondition(
        Detail::new(
            reason::INSUFFICIENT_INVENTORY,
            format!("product {product} has {available} in stock, {requested} requested"),
        )
        .with("product_id", product)
        .with("available", available)
        .with("requested", requested),
    )
}

/// The product's current price, for its price history (through the outbox).
fn price_measurement(product: &Product) -> Change {
    Change::PriceMeasurement {
        product_id: product.id.get(),
        price_cents: product.price_cents,
        at: product.updated_at,
    }
}

#[derive(Clone)]
pub struct Catalog {
    writes: Writes,
    /// GetProduct's reads, batched across calls.
    reads: PointReads<Products>,
}

impl Catalog {
    /// The catalog on `writes`' pool and cache.
    pub fn new(writes: &Writes) -> Self {
        Self {
            writes: writes.clone(),
            reads: PointReads::new(writes.db().clone()),
        }
    }

    #[tracing::instrument(skip_all, err(level = "info", Debug))]
    pub async fn create(&self, actor: &Actor, new: NewProduct) -> Result<Product> {
        let product = retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let product = store::products::insert(&mut tx, &new).await.map_err(|e| {
                e.on_unique(
                    "products_sku_key",
                    reason::SKU_ALREADY_EXISTS,
                    "another product has this sku; skus are unique regardless of case",
                )
            })?;
            store::outbox::push(&mut tx, &price_measurement(&product)).await?;
            tx.touches(Entity::Product, product.id);
            tx.touches_family(Family::Search);
            tx.commit().await?;
            Ok(product)
        })
        .await?;
        tracing::info!(product_id = %product.id, "product created");
        Ok(product)
    }

    #[tracing::instrument(skip_all, fields(product_id = %id), err(level = "info", Debug))]
    pub async fn get(&self, id: Id, consistency: Consistency) -> Result<Product> {
        self.writes
            .cache()
            .get_or_load_within(
                Entity::Product,
                id.get(),
                consistency.max_staleness(),
                || self.reads.load(id),
            )
            .await?
            .ok_or_else(|| product_not_found(id))
    }

    /// Products in request order; one cache MGET and one query for the misses.
    #[tracing::instrument(skip_all, fields(batch_size = ids.len()), err(level = "info", Debug))]
    pub async fn batch_get(
        &self,
        ids: &[Id],
        skip_missing: bool,
    ) -> Result<(Vec<Product>, Vec<Id>)> {
        let by_id = cached_products(self.writes.db(), self.writes.cache(), ids).await?;
        let (products, missing) = in_request_order(ids, |id| by_id.get(&id).cloned());
        if !missing.is_empty() && !skip_missing {
            return Err(products_not_found(
                &missing,
                "; set skip_missing to get the others",
            ));
        }
        Ok((products, missing))
    }

    #[tracing::instrument(skip_all, fields(product_id = %id, version), err(level = "info", Debug))]
    pub async fn update(
        &self,
        actor: &Actor,
        id: Id,
        version: i64,
        patch: ProductPatch,
    ) -> Result<Product> {
        if patch.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "must name at least one of: title, description, category, price_cents, rating, review_count",
            ));
        }
        retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let Some((product, price_changed)) =
                store::products::update(&mut tx, id, version, &patch).await?
            else {
                return Err(match store::products::current_version(&mut tx, id).await? {
                    Some(current) => Error::version_conflict("product", id, version, current),
                    None => product_not_found(id),
                });
            };
            if price_changed {
                store::outbox::push(&mut tx, &price_measurement(&product)).await?;
            }
            tx.touches(Entity::Product, id);
            tx.touches_family(Family::Search);
            tx.commit().await?;
            Ok(product)
        })
        .await
    }

    /// Stock is not searchable: cached search pages stay valid (they hold
    /// product ids, and products come from the product cache).
    #[tracing::instrument(skip_all, fields(product_id = %id, delta), err(level = "info", Debug))]
    pub async fn adjust_inventory(&self, actor: &Actor, id: Id, delta: i32) -> Result<Product> {
        retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let available = store::products::lock_stock(&mut tx, id)
                .await?
                .ok_or_else(|| product_not_found(id))?;
            let wanted = i64::from(available) + i64::from(delta);
            if wanted > i64::from(i32::MAX) {
                return Err(Error::invalid(
                    "delta",
                    "would exceed the largest stock level",
                ));
            }
            let insufficient =
                || insufficient_inventory(id, available.into(), (-i64::from(delta)).max(0));
            if wanted < 0 {
                return Err(insufficient());
            }
            store::products::add_stock(&mut tx, id, delta)
                .await
                .map_err(|e| {
                    e.on_constraint(|c| (c == "inventory_quantity_check").then(insufficient))
                })?;
            let product = store::products::find_many(&mut tx, &[id])
                .await?
                .pop()
                .ok_or_else(|| product_not_found(id))?;
            tx.touches(Entity::Product, id);
            tx.commit().await?;
            Ok(product)
        })
        .await
    }
}
