//! The loaders of an order read: each user's recent orders, each order's
//! items, and the items' product summaries (through the product cache).

use std::collections::HashMap;

use dataloader::BatchFn;
use sqlx::PgPool;

use super::{BatchLoader, Shared, grouped, per_key, point::point_read, products::ProductsById};
use crate::{
    cache::Cache,
    model::{
        Id,
        orders::{OrderHeader, OrderItem, ProductSummary},
    },
    retry, store,
};

pub struct RecentOrdersByUser {
    pub db: PgPool,
    pub per_user: u32,
}

impl BatchFn<Id, Shared<Vec<OrderHeader>>> for RecentOrdersByUser {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Vec<OrderHeader>>> {
        let found = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            let orders = store::orders::recent_for_users(&mut conn, keys, self.per_user).await?;
            Ok(grouped(orders, |o| o.user_id))
        })
        .await;
        per_key(keys, found, Vec::new())
    }
}

pub struct ItemsByOrder(pub PgPool);

impl BatchFn<Id, Shared<Vec<OrderItem>>> for ItemsByOrder {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Vec<OrderItem>>> {
        let found = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.0).await?;
            let items = store::orders::items_for_orders(&mut conn, keys).await?;
            Ok(grouped(items, |(order_id, _)| *order_id)
                .into_iter()
                .map(|(order, items)| (order, items.into_iter().map(|(_, i)| i).collect()))
                .collect())
        })
        .await;
        per_key(keys, found, Vec::new())
    }
}

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

point_read!(
    /// Order headers by id, batched across calls ([`super::PointReads`]).
    OrderHeaders: OrderHeader,
    "order",
    store::orders::find_many
);
