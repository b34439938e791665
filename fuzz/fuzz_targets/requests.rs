//! Every request message's parse path: the first byte picks the RPC, the
//! rest is decoded as its protobuf request (`prost::Message::decode`, as
//! tonic does) and run through the `parse_<rpc>` function its handler calls.
//! Errors are the expected answer to most inputs; a panic is a bug.
//!
//! AdminService's diagnostics requests are here; its other requests have no
//! fields, so nothing parses them. A new RPC's parser goes in `PARSERS` (its index is its first byte, modulo
//! the table's length; corpus seeds start with it).

#![no_main]

use datagate::{
    fuzzing::{admin, analytics, catalog, orders, users},
    proto::v1 as pb,
};
use libfuzzer_sys::fuzz_target;

/// The default `redis.near_max_staleness`, for the point reads' parsers.
const MAX_STALENESS: std::time::Duration = std::time::Duration::from_secs(5);

/// Decodes `bytes` as `M` and parses it; what it parses to is dropped.
fn run<M: prost::Message + Default, T, E>(bytes: &[u8], parse: fn(M) -> Result<T, E>) {
    if let Ok(message) = M::decode(bytes) {
        let _ = parse(message);
    }
}

/// Parsers that take the request by reference.
fn run_ref<M: prost::Message + Default, T, E>(bytes: &[u8], parse: fn(&M) -> Result<T, E>) {
    if let Ok(message) = M::decode(bytes) {
        let _ = parse(&message);
    }
}

/// One entry per RPC, in the order of the services' files.
const PARSERS: &[fn(&[u8])] = &[
    // 0..=12: UserService
    |b| run::<pb::CreateUserRequest, _, _>(b, users::parse_new_user),
    |b| run::<pb::GetUserRequest, _, _>(b, |r| users::parse_get_user(r, MAX_STALENESS)),
    |b| run_ref::<pb::BatchGetUsersRequest, _, _>(b, users::parse_batch_get_users),
    |b| run::<pb::ListUsersRequest, _, _>(b, users::parse_list_users),
    |b| run::<pb::UpdateUserRequest, _, _>(b, users::parse_update_user),
    |b| run::<pb::DeleteUserRequest, _, _>(b, users::parse_delete_user),
    |b| run::<pb::VerifyPasswordRequest, _, _>(b, users::parse_verify_password),
    |b| run::<pb::CreateTeamRequest, _, _>(b, users::parse_create_team),
    |b| run::<pb::AddTeamMemberRequest, _, _>(b, users::parse_add_team_member),
    |b| run::<pb::RemoveTeamMemberRequest, _, _>(b, users::parse_remove_team_member),
    |b| run::<pb::ListUserTeamsRequest, _, _>(b, users::parse_list_user_teams),
    |b| run::<pb::GetUserProfileRequest, _, _>(b, users::parse_get_user_profile),
    |b| run::<pb::UpdateUserProfileRequest, _, _>(b, users::parse_update_user_profile),
    // 13..=19: CatalogService
    |b| run::<pb::CreateProductRequest, _, _>(b, catalog::parse_create_product),
    |b| run::<pb::GetProductRequest, _, _>(b, |r| catalog::parse_get_product(r, MAX_STALENESS)),
    |b| run_ref::<pb::BatchGetProductsRequest, _, _>(b, catalog::parse_batch_get_products),
    |b| run::<pb::UpdateProductRequest, _, _>(b, catalog::parse_update_product),
    |b| run::<pb::AdjustInventoryRequest, _, _>(b, catalog::parse_adjust_inventory),
    |b| run::<pb::GetPriceHistoryRequest, _, _>(b, catalog::parse_get_price_history),
    |b| run::<pb::SearchProductsRequest, _, _>(b, catalog::parse_search_products),
    // 20..=24: OrderService
    |b| run::<pb::CreateOrderRequest, _, _>(b, orders::parse_create_order),
    |b| run::<pb::GetOrderRequest, _, _>(b, orders::parse_get_order),
    |b| run::<pb::ListOrdersRequest, _, _>(b, orders::parse_list_orders),
    |b| run::<pb::UpdateOrderStatusRequest, _, _>(b, orders::parse_update_order_status),
    |b| run::<pb::ListUsersWithOrdersRequest, _, _>(b, orders::parse_list_users_with_orders),
    // 25..=30: AnalyticsService
    |b| run::<pb::GetSearchInsightsRequest, _, _>(b, analytics::parse_get_search_insights),
    |b| run::<pb::GetCategoryMetricsRequest, _, _>(b, analytics::parse_get_category_metrics),
    |b| run::<pb::GetRevenueTrendRequest, _, _>(b, analytics::parse_get_revenue_trend),
    |b| run::<pb::StartMarketAnalysisRequest, _, _>(b, analytics::parse_start_market_analysis),
    |b| run::<pb::GetMarketAnalysisRequest, _, _>(b, analytics::parse_get_market_analysis),
    |b| run::<pb::ListMarketAnalysesRequest, _, _>(b, analytics::parse_list_market_analyses),
    // 31..=36: AdminService (diagnostics)
    |b| run::<pb::ListSlowStatementsRequest, _, _>(b, admin::parse_list_slow_statements),
    |b| run::<pb::ListActiveStatementsRequest, _, _>(b, admin::parse_list_active_statements),
    |b| run::<pb::CancelStatementRequest, _, _>(b, admin::parse_cancel_statement),
    |b| run::<pb::AdviseIndexesRequest, _, _>(b, admin::parse_advise_indexes),
    |b| run::<pb::CreateIndexRequest, _, _>(b, admin::parse_create_index),
    |b| run::<pb::GetTableSizesRequest, _, _>(b, admin::parse_get_table_sizes),
];

fuzz_target!(|data: &[u8]| {
    if let Some((&which, message)) = data.split_first() {
        PARSERS[usize::from(which) % PARSERS.len()](message);
    }
});
