//! Orders: the status lifecycle, orders with their items and product
//! summaries, and the shapes of order requests and listings.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Id, idempotency::RequestKey, paging::canonical_window, users::User};

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

wire_enum! {
    #[derive(Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum OrderStatus {
        Pending = "pending",
        Processing = "processing",
        Completed = "completed",
        Cancelled = "cancelled",
    }
}

impl OrderStatus {
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

/// An order without its items, as stored in `orders` (read straight from
/// its row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
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
    pub(crate) fn canonical(&self) -> String {
        format!(
            "user={};status={};{}",
            self.user_id.map_or(String::new(), |u| u.to_string()),
            self.status.map_or("any", OrderStatus::as_str),
            canonical_window(self.created_after, self.created_before),
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
