//! OrderService: creation, idempotency, concurrency, the status lifecycle
//! and the reads.

use std::collections::HashSet;

use datagate::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{TestApp, api_test, assert_error, unique, violated_fields};

fn line(product_id: i64, quantity: i32) -> pb::OrderLine {
    pb::OrderLine {
        product_id,
        quantity,
    }
}

fn order_request(user_id: i64, items: Vec<pb::OrderLine>) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        user_id,
        items,
        request_id: String::new(),
    }
}

async fn customer(app: &TestApp) -> pb::User {
    let (email, username) = unique("buyer");
    app.create_user(&email, &username).await
}

#[api_test]
async fn an_order_takes_prices_from_the_catalog_and_stock_from_inventory() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let hammer = app.create_product(2499, 10).await;
    let nails = app.create_product(350, 100).await;

    let order = app
        .orders()
        .await
        .create_order(order_request(
            user.id,
            vec![line(nails.id, 4), line(hammer.id, 1)],
        ))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(order.status(), pb::OrderStatus::Pending);
    assert_eq!(order.total_cents, 2499 + 4 * 350);
    assert!(order.order_number.starts_with("ORD-"));
    let mut items: Vec<(i64, i32, i64, i64)> = order
        .items
        .iter()
        .map(|i| {
            (
                i.product_id,
                i.quantity,
                i.unit_price_cents,
                i.subtotal_cents,
            )
        })
        .collect();
    items.sort();
    let mut expected = vec![(hammer.id, 1, 2499, 2499), (nails.id, 4, 350, 1400)];
    expected.sort();
    assert_eq!(items, expected);
    assert!(
        order
            .items
            .iter()
            .all(|i| i.product.as_ref().is_some_and(|p| p.id == i.product_id))
    );
    assert_eq!(app.inventory_of(hammer.id).await, 9);
    assert_eq!(app.inventory_of(nails.id).await, 96);

    let fetched = app
        .orders()
        .await
        .get_order(pb::GetOrderRequest { id: order.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.total_cents, order.total_cents);
    assert_eq!(fetched.items.len(), 2);
    assert_eq!(
        fetched.items.iter().map(|i| i.subtotal_cents).sum::<i64>(),
        order.total_cents,
        "the database's generated subtotals add up to the total"
    );
}

#[api_test]
async fn an_order_beyond_the_stock_fails_naming_the_product_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let plenty = app.create_product(100, 50).await;
    let scarce = app.create_product(100, 2).await;
    let status = app
        .orders()
        .await
        .create_order(order_request(
            user.id,
            vec![line(plenty.id, 5), line(scarce.id, 3)],
        ))
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "INSUFFICIENT_INVENTORY");
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.metadata["product_id"], scarce.id.to_string());
    assert_eq!(info.metadata["available"], "2");
    assert_eq!(info.metadata["requested"], "3");
    assert_eq!(
        app.inventory_of(plenty.id).await,
        50,
        "the transaction rolled back"
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 0);
}

#[api_test]
async fn unknown_products_and_users_are_not_found() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let product = app.create_product(100, 5).await;
    let mut orders = app.orders().await;
    let status = orders
        .create_order(order_request(
            user.id,
            vec![line(product.id, 1), line(999_999, 1)],
        ))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "PRODUCT_NOT_FOUND");
    assert_eq!(
        status.get_error_details().error_info().unwrap().metadata["missing_ids"],
        "999999"
    );
    let status = orders
        .create_order(order_request(888_888, vec![line(product.id, 1)]))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
}

#[api_test]
async fn malformed_orders_are_invalid_with_one_violation_per_problem() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let mut orders = app.orders().await;

    let cases: [(&str, pb::CreateOrderRequest, &[&str]); 5] = [
        ("no lines", order_request(user.id, vec![]), &["items"]),
        (
            "quantities out of range",
            order_request(user.id, vec![line(1, 0), line(2, -3), line(3, 1001)]),
            &[
                "items[0].quantity",
                "items[1].quantity",
                "items[2].quantity",
            ],
        ),
        (
            "a product twice",
            order_request(user.id, vec![line(7, 1), line(7, 2)]),
            &["items[1].product_id"],
        ),
        (
            "too many lines",
            order_request(user.id, (1..=51).map(|p| line(p, 1)).collect()),
            &["items"],
        ),
        (
            "no user and a bad request id",
            pb::CreateOrderRequest {
                user_id: 0,
                items: vec![line(1, 1)],
                request_id: "has space".into(),
            },
            &["request_id", "user_id"],
        ),
    ];
    for (case, request, fields) in cases {
        let status = orders.create_order(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{case}");
    }
}

#[api_test]
async fn twenty_concurrent_orders_for_the_last_five_units_sell_exactly_five() {
    let app = TestApp::spawn_with(|s| s.database.max_connections = 25).await;
    let product = app.create_product(999, 5).await;
    let other = app.create_product(10, 1000).await;
    let mut users = Vec::new();
    for _ in 0..20 {
        users.push(customer(&app).await);
    }
    let mut calls = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut client = app.orders().await;
        // Half the orders also take another product, listed first, so the
        // transactions lock rows in different request orders.
        let items = if i % 2 == 0 {
            vec![line(other.id, 1), line(product.id, 1)]
        } else {
            vec![line(product.id, 1)]
        };
        let request = order_request(user.id, items);
        calls.push(tokio::spawn(
            async move { client.create_order(request).await },
        ));
    }
    let mut sold = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => sold += 1,
            Err(status) => {
                assert_error(&status, Code::FailedPrecondition, "INSUFFICIENT_INVENTORY")
            }
        }
    }
    assert_eq!(sold, 5);
    assert_eq!(app.inventory_of(product.id).await, 0);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 5);
}

#[api_test]
async fn fifty_concurrent_retries_of_one_request_make_one_order_and_identical_answers() {
    let app = TestApp::spawn_with(|s| s.database.max_connections = 25).await;
    let user = customer(&app).await;
    let product = app.create_product(1500, 100).await;
    let request = pb::CreateOrderRequest {
        user_id: user.id,
        items: vec![line(product.id, 2)],
        request_id: "checkout-7f3a".into(),
    };
    let mut calls = Vec::new();
    for _ in 0..50 {
        let mut client = app.orders().await;
        let request = request.clone();
        calls.push(tokio::spawn(
            async move { client.create_order(request).await },
        ));
    }
    let mut answers = HashSet::new();
    for call in calls {
        let order = call
            .await
            .unwrap()
            .expect("every retry succeeds")
            .into_inner();
        answers.insert(format!("{order:?}"));
    }
    assert_eq!(answers.len(), 1, "50 identical responses");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 1);
    assert_eq!(app.inventory_of(product.id).await, 98, "stock taken once");
}

#[api_test]
async fn a_request_id_reused_with_another_payload_is_refused() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let product = app.create_product(100, 10).await;
    let mut orders = app.orders().await;
    let request = |quantity| pb::CreateOrderRequest {
        user_id: user.id,
        items: vec![line(product.id, quantity)],
        request_id: "same-key".into(),
    };
    orders.create_order(request(1)).await.unwrap();
    let status = orders.create_order(request(2)).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(app.inventory_of(product.id).await, 9);

    // Keys are per caller: another caller may use the same one.
    let other = datagate::proto::v1::order_service_client::OrderServiceClient::with_interceptor(
        app.channel().await,
        crate::support::Bearer(Some(app.writer_token.as_str().into())),
    )
    .create_order(request(2))
    .await;
    assert!(other.is_ok(), "{other:?}");
}

#[api_test]
async fn the_status_follows_the_lifecycle_and_cancelling_returns_the_stock() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let product = app.create_product(100, 10).await;
    let mut orders = app.orders().await;
    let set = |id, status: pb::OrderStatus| pb::UpdateOrderStatusRequest {
        id,
        status: status.into(),
        version: 0,
    };

    let done = orders
        .create_order(order_request(user.id, vec![line(product.id, 3)]))
        .await
        .unwrap()
        .into_inner();
    let processing = orders
        .update_order_status(set(done.id, pb::OrderStatus::Processing))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(processing.status(), pb::OrderStatus::Processing);
    assert_eq!(processing.items.len(), 1, "the answer carries the items");
    orders
        .update_order_status(set(done.id, pb::OrderStatus::Completed))
        .await
        .unwrap();
    for illegal in [
        pb::OrderStatus::Pending,
        pb::OrderStatus::Processing,
        pb::OrderStatus::Cancelled,
    ] {
        let status = orders
            .update_order_status(set(done.id, illegal))
            .await
            .unwrap_err();
        assert_error(&status, Code::FailedPrecondition, "ORDER_STATE_CONFLICT");
        let details = status.get_error_details();
        assert_eq!(details.error_info().unwrap().metadata["from"], "completed");
    }
    assert_eq!(
        app.inventory_of(product.id).await,
        7,
        "completing keeps the stock taken"
    );

    let cancelled = orders
        .create_order(order_request(user.id, vec![line(product.id, 4)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(app.inventory_of(product.id).await, 3);
    let status = orders
        .update_order_status(set(cancelled.id, pb::OrderStatus::Completed))
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "ORDER_STATE_CONFLICT");
    orders
        .update_order_status(set(cancelled.id, pb::OrderStatus::Cancelled))
        .await
        .unwrap();
    assert_eq!(
        app.inventory_of(product.id).await,
        7,
        "cancelling returned 4 units"
    );
    let status = orders
        .update_order_status(set(cancelled.id, pb::OrderStatus::Cancelled))
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "ORDER_STATE_CONFLICT");

    let status = orders
        .update_order_status(pb::UpdateOrderStatusRequest {
            id: done.id,
            status: 0,
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["status"]);
    let status = orders
        .update_order_status(set(424_242, pb::OrderStatus::Cancelled))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "ORDER_NOT_FOUND");
}

#[api_test]
async fn a_stale_version_on_a_status_change_is_aborted() {
    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let product = app.create_product(100, 10).await;
    let mut orders = app.orders().await;
    let order = orders
        .create_order(order_request(user.id, vec![line(product.id, 1)]))
        .await
        .unwrap()
        .into_inner();
    let status = orders
        .update_order_status(pb::UpdateOrderStatusRequest {
            id: order.id,
            status: pb::OrderStatus::Processing.into(),
            version: order.version + 1,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::Aborted, "VERSION_CONFLICT");
}

#[api_test]
async fn list_orders_filters_by_user_and_status_and_pages_newest_first() {
    let app = TestApp::spawn().await;
    let alice = customer(&app).await;
    let bob = customer(&app).await;
    let product = app.create_product(100, 100).await;
    let mut orders = app.orders().await;
    let mut alice_orders = Vec::new();
    for _ in 0..5 {
        alice_orders.push(
            orders
                .create_order(order_request(alice.id, vec![line(product.id, 1)]))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    orders
        .create_order(order_request(bob.id, vec![line(product.id, 1)]))
        .await
        .unwrap();
    orders
        .update_order_status(pb::UpdateOrderStatusRequest {
            id: alice_orders[0],
            status: pb::OrderStatus::Cancelled.into(),
            version: 0,
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = orders
            .list_orders(pb::ListOrdersRequest {
                user_id: alice.id,
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            page.orders
                .iter()
                .all(|o| o.user_id == alice.id && !o.items.is_empty())
        );
        seen.extend(page.orders.iter().map(|o| o.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut newest_first = alice_orders.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let cancelled = orders
        .list_orders(pb::ListOrdersRequest {
            status: pb::OrderStatus::Cancelled.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.orders.iter().map(|o| o.id).collect::<Vec<_>>(),
        [alice_orders[0]]
    );
}

#[api_test]
async fn list_users_with_orders_nests_recent_orders_items_and_products() {
    let app = TestApp::spawn().await;
    let product = app.create_product(250, 1000).await;
    let mut expected = Vec::new();
    for n in 0..3 {
        let user = customer(&app).await;
        let mut ids = Vec::new();
        for _ in 0..n * 3 {
            ids.push(
                app.orders()
                    .await
                    .create_order(order_request(user.id, vec![line(product.id, 1)]))
                    .await
                    .unwrap()
                    .into_inner()
                    .id,
            );
        }
        ids.reverse();
        ids.truncate(4);
        expected.push((user.id, ids));
    }
    let page = app
        .orders()
        .await
        .list_users_with_orders(pb::ListUsersWithOrdersRequest {
            page_size: 10,
            page_token: String::new(),
            orders_per_user: 4,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(i64, Vec<i64>)> = page
        .users
        .iter()
        .map(|u| {
            (
                u.user.as_ref().unwrap().id,
                u.recent_orders.iter().map(|o| o.id).collect(),
            )
        })
        .collect();
    assert_eq!(got, expected, "each user's newest orders, at most 4");
    for order in page.users.iter().flat_map(|u| &u.recent_orders) {
        assert_eq!(order.items.len(), 1);
        assert_eq!(order.items[0].product.as_ref().unwrap().id, product.id);
    }
    let status = app
        .orders()
        .await
        .list_users_with_orders(pb::ListUsersWithOrdersRequest {
            page_size: -1,
            page_token: String::new(),
            orders_per_user: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["orders_per_user", "page_size"]);
}

/// The round trips of a CreateOrder, counted by the statement log (which
/// counts every statement sqlx sends, COMMIT included, but not BEGIN).
#[api_test]
async fn an_order_is_placed_in_one_statement_between_the_audit_statement_and_commit() {
    use std::sync::Arc;

    use datagate::{
        cache::Cache,
        domain::{
            orders::{Orders, RawLine, parse_new_order},
            passwords::PasswordHasher,
            users::Users,
            write::Writes,
        },
        model::{audit::Actor, paging::PageTokens},
        statements::{self, RequestLog},
    };
    use secrecy::SecretString;

    let app = TestApp::spawn().await;
    let user = customer(&app).await;
    let first = app.create_product(500, 10).await;
    let second = app.create_product(700, 10).await;
    let writes = Writes::new(app.db.clone(), Cache::disabled());
    let pages = PageTokens::new(&SecretString::from("p".repeat(32)));
    let users = Users::new(&writes, pages.clone(), PasswordHasher::new(2));
    let orders = Orders::new(&writes, pages, users);
    let lines = [
        RawLine {
            product_id: second.id,
            quantity: 2,
        },
        RawLine {
            product_id: first.id,
            quantity: 1,
        },
    ];
    let actor = Actor::new("test-orders", None);

    for (request_id, statements) in [("", 3), ("count-round-trips", 5)] {
        let new = parse_new_order(user.id, &lines, request_id).unwrap();
        let log = Arc::new(RequestLog::default());
        let order = statements::scope(log.clone(), orders.create(&actor, new))
            .await
            .unwrap();
        assert_eq!(
            log.total(),
            statements,
            "request id {request_id:?}: {:?}",
            log.shapes()
        );
        assert_eq!(order.header.total_cents, 2 * 700 + 500);
        let items: Vec<(i64, i32)> = order
            .items
            .iter()
            .map(|i| (i.product_id.get(), i.quantity))
            .collect();
        assert_eq!(
            items,
            [(first.id, 1), (second.id, 2)],
            "in product id order"
        );
    }
    let stock: Vec<i32> = sqlx::query_scalar(
        "SELECT quantity FROM inventory WHERE product_id = ANY($1) ORDER BY product_id",
    )
    .bind(vec![first.id, second.id])
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(stock, [8, 6], "two orders took their lines' stock");
}
