//! Products and their inventory.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    audit::Actor,
    error::{Detail, Error, Result},
    users::{Id, bounded_text, in_request_order},
};
use crate::{
    cache::{Cache, Entity, Family},
    store::{self, outbox::Change},
};

/// The most ids one BatchGetProducts call may ask for.
pub const MAX_BATCH: usize = 100;
/// NUMERIC(12,2) holds up to 9,999,999,999.99.
pub const MAX_PRICE_CENTS: i64 = 999_999_999_999;
/// The largest single inventory adjustment.
pub const MAX_ADJUSTMENT: i32 = 1_000_000;

/// A stock-keeping unit: 1 to 64 of `[A-Za-z0-9._-]`, unique regardless of case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let sku = raw.trim();
        if sku.is_empty() || sku.len() > 64 {
            return Err("must be 1 to 64 characters".into());
        }
        if !sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err("may only contain letters, digits, '.', '_' and '-'".into());
        }
        Ok(Self(sku.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free text fields of a product, trimmed and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(String);

impl Text {
    pub fn title(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 1, 200).map(Self)
    }

    pub fn description(raw: &str) -> Result<Self, String> {
        // Descriptions may hold line breaks; other control characters are refused.
        let text = raw.trim();
        if text.chars().count() > 5000 {
            return Err("must be at most 5000 characters".into());
        }
        if text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(
                "must not contain control characters other than line breaks and tabs".into(),
            );
        }
        Ok(Self(text.to_owned()))
    }

    pub fn category(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 1, 64).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub fn parse_price(cents: i64) -> Result<i64, String> {
    if (0..=MAX_PRICE_CENTS).contains(&cents) {
        Ok(cents)
    } else {
        Err(format!("must be between 0 and {MAX_PRICE_CENTS} cents"))
    }
}

pub fn parse_rating(rating: f64) -> Result<f64, String> {
    if rating.is_finite() && (0.0..=5.0).contains(&rating) {
        Ok((rating * 100.0).round() / 100.0)
    } else {
        Err("must be between 0 and 5".into())
    }
}

pub fn parse_count(n: i32) -> Result<i32, String> {
    if n >= 0 {
        Ok(n)
    } else {
        Err("must not be negative".into())
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Product {
    pub id: Id,
    pub sku: String,
    pub title: String,
    pub description: String,
    pub category: String,
    pub price_cents: i64,
    pub rating: f64,
    pub review_count: i32,
    pub inventory: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub sku: Sku,
    pub title: Text,
    pub description: Text,
    pub category: Text,
    pub price_cents: i64,
    pub rating: f64,
    pub review_count: i32,
    pub inventory: i32,
}

#[derive(Debug, Clone, Default)]
pub struct ProductPatch {
    pub title: Option<Text>,
    pub description: Option<Text>,
    pub category: Option<Text>,
    pub price_cents: Option<i64>,
    pub rating: Option<f64>,
    pub review_count: Option<i32>,
}

impl ProductPatch {
    pub fn is_empty(&self) -> bool {
        self.title.is_none()
            && self.description.is_none()
            && self.category.is_none()
            && self.price_cents.is_none()
            && self.rating.is_none()
            && self.review_count.is_none()
    }
}

pub fn product_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new("PRODUCT_NOT_FOUND", format!("product {id} does not exist"))
            .with("product_id", id),
    )
}

/// NOT_FOUND naming every missing product id.
pub fn products_not_found(ids: &[Id], hint: &str) -> Error {
    let list = ids.iter().map(Id::to_string).collect::<Vec<_>>().join(",");
    Error::NotFound(
        Detail::new(
            "PRODUCT_NOT_FOUND",
            format!("products {list} do not exist{hint}"),
        )
        .with("missing_ids", list),
    )
}

pub fn insufficient_inventory(product: Id, available: i64, requested: i64) -> Error {
    Error::FailedPrecondition(
        Detail::new(
            "INSUFFICIENT_INVENTORY",
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
    db: PgPool,
    cache: Cache,
}

/// Products by id through the cache: one MGET, then one query for the misses.
pub async fn cached_products(
    db: &PgPool,
    cache: &Cache,
    ids: &[Id],
) -> Result<HashMap<Id, Product>> {
    let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    let found = cache
        .get_many_or_load(Entity::Product, &raw, |misses| async move {
            let misses: Vec<Id> = misses
                .into_iter()
                .filter_map(|m| Id::parse(m).ok())
                .collect();
            let mut conn = db.acquire().await?;
            let products = store::products::find_many(&mut conn, &misses).await?;
            Ok(products.into_iter().map(|p| (p.id.get(), p)).collect())
        })
        .await?;
    Ok(found.into_values().flatten().map(|p| (p.id, p)).collect())
}

impl Catalog {
    pub fn new(db: PgPool, cache: Cache) -> Self {
        Self { db, cache }
    }

    #[tracing::instrument(skip_all, err(Debug))]
    pub async fn create(&self, actor: &Actor, new: NewProduct) -> Result<Product> {
        let mut tx = store::audit::begin(&self.db, actor).await?;
        let product = store::products::insert(&mut tx, &new).await?;
        store::outbox::push(&mut tx, &price_measurement(&product)).await?;
        tx.commit().await?;
        self.cache
            .invalidate(&[(Entity::Product, product.id.get())])
            .await;
        self.cache.invalidate_family(Family::Search).await;
        tracing::info!(product_id = %product.id, "product created");
        Ok(product)
    }

    #[tracing::instrument(skip_all, fields(product_id = %id), err(Debug))]
    pub async fn get(&self, id: Id) -> Result<Product> {
        self.cache
            .get_or_load(Entity::Product, id.get(), || async {
                let mut conn = self.db.acquire().await?;
                Ok(store::products::find_many(&mut conn, &[id]).await?.pop())
            })
            .await?
            .ok_or_else(|| product_not_found(id))
    }

    /// Products in request order; one cache MGET and one query for the misses.
    #[tracing::instrument(skip_all, fields(batch_size = ids.len()), err(Debug))]
    pub async fn batch_get(
        &self,
        ids: &[Id],
        skip_missing: bool,
    ) -> Result<(Vec<Product>, Vec<Id>)> {
        let by_id = cached_products(&self.db, &self.cache, ids).await?;
        let (products, missing) = in_request_order(ids, |id| by_id.get(&id).cloned());
        if !missing.is_empty() && !skip_missing {
            return Err(products_not_found(
                &missing,
                "; set skip_missing to get the others",
            ));
        }
        Ok((products, missing))
    }

    #[tracing::instrument(skip_all, fields(product_id = %id, version), err(Debug))]
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
        let mut tx = store::audit::begin(&self.db, actor).await?;
        let Some((product, price_changed)) =
            store::products::update(&mut tx, id, version, &patch).await?
        else {
            return Err(match store::products::current_version(&mut tx, id).await? {
                Some(current) => Error::Aborted(
                    Detail::new(
                        "VERSION_CONFLICT",
                        format!("product {id} is at version {current}, not {version}: read it again and retry"),
                    )
                    .with("product_id", id)
                    .with("current_version", current),
                ),
                None => product_not_found(id),
            });
        };
        if price_changed {
            store::outbox::push(&mut tx, &price_measurement(&product)).await?;
        }
        tx.commit().await?;
        self.cache.invalidate(&[(Entity::Product, id.get())]).await;
        self.cache.invalidate_family(Family::Search).await;
        Ok(product)
    }

    /// Stock is not searchable: cached search pages stay valid (they hold
    /// product ids, and products come from the product cache).
    #[tracing::instrument(skip_all, fields(product_id = %id, delta), err(Debug))]
    pub async fn adjust_inventory(&self, actor: &Actor, id: Id, delta: i32) -> Result<Product> {
        let mut tx = store::audit::begin(&self.db, actor).await?;
        store::products::adjust_inventory(&mut tx, id, delta).await?;
        let product = store::products::find_many(&mut tx, &[id])
            .await?
            .pop()
            .ok_or_else(|| product_not_found(id))?;
        tx.commit().await?;
        self.cache.invalidate(&[(Entity::Product, id.get())]).await;
        Ok(product)
    }
}
