//! The naive per-user way to answer ListUsersWithOrders: one query per user,
//! per order and per item. Benchmark and test code only: it exists to be
//! measured against the batched path and to trip the N+1 detector.

use datagate::{
    domain::users::Users,
    error::Result,
    model::{
        orders::{Order, UserWithOrders},
        paging::PageRequest,
        users::UserFilter,
    },
    store,
};
use sqlx::PgPool;

pub async fn list_users_with_orders_naively(
    db: &PgPool,
    users: &Users,
    page: PageRequest,
    orders_per_user: u32,
) -> Result<Vec<UserWithOrders>> {
    let page = users.list(UserFilter::default(), page).await?;
    let mut conn = db.acquire().await?;
    let mut result = Vec::with_capacity(page.items.len());
    for user in page.items {
        let mut recent_orders = Vec::new();
        for header in
            store::orders::recent_for_users(&mut conn, &[user.id], orders_per_user).await?
        {
            let mut items = Vec::new();
            for (_, mut item) in store::orders::items_for_orders(&mut conn, &[header.id]).await? {
                item.product = store::orders::product_summaries(&mut conn, &[item.product_id])
                    .await?
                    .pop();
                items.push(item);
            }
            recent_orders.push(Order { header, items });
        }
        result.push(UserWithOrders {
            user,
            recent_orders,
        });
    }
    Ok(result)
}
