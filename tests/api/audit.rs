//! The audit log: every write path records its rows with the caller and the
//! request id, in the write's transaction.

use datagate::proto::v1 as pb;
use tonic::{Code, Request};

use crate::support::{TestApp, api_test, unique};

/// A request carrying an `x-request-id` of the test's choosing.
fn with_id<T>(message: T, request_id: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    request
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct AuditRow {
    table_name: String,
    record_id: i64,
    action: String,
    actor: String,
    old_values: Option<serde_json::Value>,
    new_values: Option<serde_json::Value>,
}

/// The audit rows written under `request_id`, in the order they were written.
async fn audit_rows(app: &TestApp, request_id: &str) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT table_name, record_id, action, actor, old_values, new_values \
         FROM audit_log WHERE request_id = $1 ORDER BY id",
    )
    .bind(request_id)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// (table, record id, action) of each row, for compact assertions.
fn summary(rows: &[AuditRow]) -> Vec<(&str, i64, &str)> {
    rows.iter()
        .map(|r| (r.table_name.as_str(), r.record_id, r.action.as_str()))
        .collect()
}

#[api_test]
async fn user_writes_are_audited_with_caller_and_request_id_and_no_password_hash() {
    let app = TestApp::spawn().await;
    let mut users = app.users().await;
    let (email, username) = unique("audited");

    let user = users
        .create_user(with_id(
            pb::CreateUserRequest {
                email,
                username,
                display_name: "Audited".into(),
                password: "correct horse battery".into(),
                status: 0,
            },
            "audit-create-user",
        ))
        .await
        .unwrap()
        .into_inner();
    let created = audit_rows(&app, "audit-create-user").await;
    assert_eq!(summary(&created), [("users", user.id, "insert")]);
    assert_eq!(created[0].actor, "test-admin");
    assert_eq!(created[0].old_values, None);
    let new = created[0].new_values.as_ref().unwrap();
    assert_eq!(new["display_name"], "Audited");
    assert!(new.get("password_hash").is_none(), "{new}");

    let updated = users
        .update_user(with_id(
            pb::UpdateUserRequest {
                id: user.id,
                version: user.version,
                user: Some(pb::UserPatch {
                    display_name: "Renamed".into(),
                    password: "another long password".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into(), "password".into()],
                }),
            },
            "audit-update-user",
        ))
        .await
        .unwrap()
        .into_inner();
    let rows = audit_rows(&app, "audit-update-user").await;
    assert_eq!(summary(&rows), [("users", user.id, "update")]);
    let (old, new) = (
        rows[0].old_values.as_ref().unwrap(),
        rows[0].new_values.as_ref().unwrap(),
    );
    assert_eq!(old["display_name"], "Audited");
    assert_eq!(new["display_name"], "Renamed");
    assert_eq!(new["password_changed"], true);
    assert!(old.get("password_hash").is_none() && new.get("password_hash").is_none());

    users
        .delete_user(with_id(
            pb::DeleteUserRequest {
                id: user.id,
                version: updated.version,
            },
            "audit-delete-user",
        ))
        .await
        .unwrap();
    let rows = audit_rows(&app, "audit-delete-user").await;
    assert_eq!(summary(&rows), [("users", user.id, "delete")]);
    assert!(!rows[0].new_values.as_ref().unwrap()["deleted_at"].is_null());
}

#[api_test]
async fn product_and_inventory_writes_are_audited() {
    let app = TestApp::spawn().await;
    let mut catalog = app.catalog().await;

    let product = catalog
        .create_product(with_id(
            pb::CreateProductRequest {
                sku: "AUDIT-1".into(),
                title: "Audited hammer".into(),
                category: "tools".into(),
                price_cents: 1999,
                inventory: 5,
                ..Default::default()
            },
            "audit-create-product",
        ))
        .await
        .unwrap()
        .into_inner();
    let rows = audit_rows(&app, "audit-create-product").await;
    assert_eq!(
        summary(&rows),
        [
            ("products", product.id, "insert"),
            ("inventory", product.id, "insert")
        ]
    );
    assert!(rows.iter().all(|r| r.actor == "test-admin"));
    assert!(
        rows[0]
            .new_values
            .as_ref()
            .unwrap()
            .get("search_vector")
            .is_none()
    );

    let updated = catalog
        .update_product(with_id(
            pb::UpdateProductRequest {
                id: product.id,
                version: product.version,
                product: Some(pb::ProductPatch {
                    price_cents: 2499,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["price_cents".into()],
                }),
            },
            "audit-update-product",
        ))
        .await
        .unwrap()
        .into_inner();
    let rows = audit_rows(&app, "audit-update-product").await;
    assert_eq!(summary(&rows), [("products", product.id, "update")]);
    assert_eq!(rows[0].old_values.as_ref().unwrap()["price"], 19.99);
    assert_eq!(rows[0].new_values.as_ref().unwrap()["price"], 24.99);

    catalog
        .adjust_inventory(with_id(
            pb::AdjustInventoryRequest {
                product_id: product.id,
                delta: -2,
            },
            "audit-adjust",
        ))
        .await
        .unwrap();
    let rows = audit_rows(&app, "audit-adjust").await;
    assert_eq!(summary(&rows), [("inventory", product.id, "update")]);
    assert_eq!(rows[0].old_values.as_ref().unwrap()["quantity"], 5);
    assert_eq!(rows[0].new_values.as_ref().unwrap()["quantity"], 3);

    // A refused write leaves no audit row: it shares the write's transaction.
    let stale = catalog
        .update_product(with_id(
            pb::UpdateProductRequest {
                id: product.id,
                version: product.version,
                product: Some(pb::ProductPatch {
                    title: "Never".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
            },
            "audit-stale",
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let overdraw = catalog
        .adjust_inventory(with_id(
            pb::AdjustInventoryRequest {
                product_id: product.id,
                delta: -100,
            },
            "audit-overdraw",
        ))
        .await
        .unwrap_err();
    assert_eq!(overdraw.code(), Code::FailedPrecondition);
    assert!(audit_rows(&app, "audit-stale").await.is_empty());
    assert!(audit_rows(&app, "audit-overdraw").await.is_empty());
    assert_eq!(updated.version, product.version + 1);
}

#[api_test]
async fn order_writes_are_audited_with_their_items_and_stock() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("auditbuyer");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(500, 10).await;
    let mut orders = app.orders().await;

    let order = orders
        .create_order(with_id(
            pb::CreateOrderRequest {
                user_id: user.id,
                items: vec![pb::OrderLine {
                    product_id: product.id,
                    quantity: 3,
                }],
                request_id: String::new(),
            },
            "audit-create-order",
        ))
        .await
        .unwrap()
        .into_inner();
    let rows = audit_rows(&app, "audit-create-order").await;
    let item_id: i64 = sqlx::query_scalar("SELECT id FROM order_items WHERE order_id = $1")
        .bind(order.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        summary(&rows),
        [
            ("inventory", product.id, "update"),
            ("orders", order.id, "insert"),
            ("order_items", item_id, "insert"),
        ]
    );
    assert!(rows.iter().all(|r| r.actor == "test-admin"));

    orders
        .update_order_status(with_id(
            pb::UpdateOrderStatusRequest {
                id: order.id,
                status: pb::OrderStatus::Cancelled.into(),
                version: order.version,
            },
            "audit-cancel-order",
        ))
        .await
        .unwrap();
    let rows = audit_rows(&app, "audit-cancel-order").await;
    assert_eq!(
        summary(&rows),
        [
            ("inventory", product.id, "update"),
            ("orders", order.id, "update")
        ]
    );
    assert_eq!(rows[1].old_values.as_ref().unwrap()["status"], "pending");
    assert_eq!(rows[1].new_values.as_ref().unwrap()["status"], "cancelled");
}

#[api_test]
async fn writes_made_outside_the_service_are_audited_with_the_database_role() {
    let app = TestApp::spawn().await;
    let product = app.create_product(100, 1).await;
    sqlx::query("UPDATE products SET rating = 4.5 WHERE id = $1")
        .bind(product.id)
        .execute(&app.db)
        .await
        .unwrap();
    let (actor, request_id): (String, Option<String>) = sqlx::query_as(
        "SELECT actor, request_id FROM audit_log \
         WHERE table_name = 'products' AND record_id = $1 AND action = 'update'",
    )
    .bind(product.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let role: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(actor, format!("db:{role}"));
    assert_eq!(request_id, None);
}
