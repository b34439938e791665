//! `datagate.v1.OrderService`.

use super::{
    Answer, Call, actor, one_id, optional_version, paged, parse_id, parse_page, parse_time_range,
    parsed, reply, timestamp,
};
use crate::{
    domain::orders::{self, Orders, RawLine, parse_new_order},
    error::{Error, Violations},
    model::{
        Id,
        orders::{NewOrder, Order, OrderFilter, OrderStatus},
        paging::PageRequest,
    },
    proto::v1 as pb,
};

pub use pb::order_service_server::OrderServiceServer;

pub struct OrderApi {
    pub(crate) orders: Orders,
}

#[tonic::async_trait]
impl pb::order_service_server::OrderService for OrderApi {
    async fn create_order(&self, call: Call<pb::CreateOrderRequest>) -> Answer<pb::Order> {
        let actor = actor(&call)?;
        let new = parse_create_order(call.into_inner())?;
        let order = self.orders.create(&actor, new).await?;
        reply(order)
    }

    async fn get_order(&self, call: Call<pb::GetOrderRequest>) -> Answer<pb::Order> {
        let id = parse_get_order(call.into_inner())?;
        reply(self.orders.get(id).await?)
    }

    async fn list_orders(
        &self,
        call: Call<pb::ListOrdersRequest>,
    ) -> Answer<pb::ListOrdersResponse> {
        let (filter, page) = parse_list_orders(call.into_inner())?;
        let (orders, next_page_token) = paged(self.orders.list(filter, page).await?);
        reply(pb::ListOrdersResponse {
            orders,
            next_page_token,
        })
    }

    async fn update_order_status(
        &self,
        call: Call<pb::UpdateOrderStatusRequest>,
    ) -> Answer<pb::Order> {
        let actor = actor(&call)?;
        let (id, status, version) = parse_update_order_status(call.into_inner())?;
        reply(
            self.orders
                .update_status(&actor, id, status, version)
                .await?,
        )
    }

    async fn list_users_with_orders(
        &self,
        call: Call<pb::ListUsersWithOrdersRequest>,
    ) -> Answer<pb::ListUsersWithOrdersResponse> {
        let (page, per_user) = parse_list_users_with_orders(call.into_inner())?;
        let page = self.orders.list_users_with_orders(page, per_user).await?;
        reply(pb::ListUsersWithOrdersResponse {
            users: page
                .items
                .into_iter()
                .map(|u| pb::UserWithOrders {
                    user: Some(u.user.into()),
                    recent_orders: u.recent_orders.into_iter().map(Into::into).collect(),
                })
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }
}

// Each RPC's request, parsed: every field violation collected, or the domain
// values the handler passes on. Public for the fuzz targets (`fuzz/`), which
// run them on arbitrary messages.

pub fn parse_create_order(r: pb::CreateOrderRequest) -> Result<NewOrder, Error> {
    let lines: Vec<RawLine> = r
        .items
        .iter()
        .map(|line| RawLine {
            product_id: line.product_id,
            quantity: line.quantity,
        })
        .collect();
    parse_new_order(r.user_id, &lines, &r.request_id)
}

pub fn parse_get_order(r: pb::GetOrderRequest) -> Result<Id, Error> {
    one_id("id", r.id)
}

pub fn parse_list_orders(r: pb::ListOrdersRequest) -> Result<(OrderFilter, PageRequest), Error> {
    let mut v = Violations::default();
    let user_id = if r.user_id == 0 {
        Some(None)
    } else {
        parse_id(&mut v, "user_id", r.user_id).map(Some)
    };
    let status = v.check("status", parse_status(r.status));
    let (created_after, created_before) =
        parse_time_range(&mut v, r.created_after.as_ref(), r.created_before.as_ref());
    let page = parse_page(&mut v, r.page_size, r.page_token);
    parsed!(v, user_id, status, page);
    let filter = OrderFilter {
        user_id,
        status,
        created_after,
        created_before,
    };
    Ok((filter, page))
}

/// The order, its new status, and the version the change names, if any.
pub fn parse_update_order_status(
    r: pb::UpdateOrderStatusRequest,
) -> Result<(Id, OrderStatus, Option<i64>), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "id", r.id);
    let status = match parse_status(r.status) {
        Ok(Some(status)) => Some(status),
        Ok(None) => {
            v.add("status", "must be set to the new status");
            None
        }
        Err(e) => {
            v.add("status", e);
            None
        }
    };
    let version = optional_version(&mut v, r.version, "order");
    parsed!(v, id, status);
    Ok((id, status, version))
}

/// The page of users and how many recent orders each gets.
pub fn parse_list_users_with_orders(
    r: pb::ListUsersWithOrdersRequest,
) -> Result<(PageRequest, u32), Error> {
    let mut v = Violations::default();
    let size = v.check("page_size", orders::users_page_size(r.page_size));
    let per_user = v.check(
        "orders_per_user",
        orders::orders_per_user(r.orders_per_user),
    );
    parsed!(v, size, per_user);
    Ok((PageRequest::new(size, r.page_token), per_user))
}

/// `UNSPECIFIED` means "any"; unknown numbers are invalid.
fn parse_status(raw: i32) -> Result<Option<OrderStatus>, String> {
    match pb::OrderStatus::try_from(raw) {
        Ok(pb::OrderStatus::Unspecified) => Ok(None),
        Ok(pb::OrderStatus::Pending) => Ok(Some(OrderStatus::Pending)),
        Ok(pb::OrderStatus::Processing) => Ok(Some(OrderStatus::Processing)),
        Ok(pb::OrderStatus::Completed) => Ok(Some(OrderStatus::Completed)),
        Ok(pb::OrderStatus::Cancelled) => Ok(Some(OrderStatus::Cancelled)),
        Err(_) => Err(format!("unknown status {raw}")),
    }
}

impl From<Order> for pb::Order {
    fn from(o: Order) -> Self {
        let h = o.header;
        let status = match h.status {
            OrderStatus::Pending => pb::OrderStatus::Pending,
            OrderStatus::Processing => pb::OrderStatus::Processing,
            OrderStatus::Completed => pb::OrderStatus::Completed,
            OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        };
        Self {
            id: h.id.get(),
            order_number: h.order_number,
            user_id: h.user_id.get(),
            status: status.into(),
            total_cents: h.total_cents,
            items: o
                .items
                .into_iter()
                .map(|i| pb::OrderItem {
                    product_id: i.product_id.get(),
                    quantity: i.quantity,
                    unit_price_cents: i.unit_price_cents,
                    subtotal_cents: i.subtotal_cents,
                    product: i.product.map(|p| pb::ProductSummary {
                        id: p.id.get(),
                        sku: p.sku,
                        title: p.title,
                        category: p.category,
                        price_cents: p.price_cents,
                    }),
                })
                .collect(),
            create_time: Some(timestamp(h.created_at)),
            update_time: Some(timestamp(h.updated_at)),
            version: h.version,
        }
    }
}
