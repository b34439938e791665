//! CatalogService: products and inventory.

use datagate::proto::v1 as pb;
use prost_types::FieldMask;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{TestApp, api_test, assert_error, violated_fields};

#[api_test]
async fn a_created_product_is_read_back_with_its_inventory() {
    let app = TestApp::spawn().await;
    let created = app
        .catalog()
        .await
        .create_product(pb::CreateProductRequest {
            sku: "HAM-001".into(),
            title: "Claw hammer".into(),
            description: "Forged steel.\nLifetime warranty.".into(),
            category: "tools".into(),
            price_cents: 2499,
            rating: 4.567,
            review_count: 12,
            inventory: 30,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.price_cents, 2499);
    assert_eq!(created.inventory, 30);
    assert_eq!(created.rating, 4.57, "ratings keep two decimals");
    let fetched = app
        .catalog()
        .await
        .get_product(pb::GetProductRequest {
            id: created.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, created);
}

#[api_test]
async fn product_input_is_validated_field_by_field() {
    let app = TestApp::spawn().await;
    let status = app
        .catalog()
        .await
        .create_product(pb::CreateProductRequest {
            sku: "bad sku!".into(),
            title: String::new(),
            category: String::new(),
            price_cents: -1,
            rating: 7.0,
            review_count: -2,
            inventory: -5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        [
            "category",
            "inventory",
            "price_cents",
            "rating",
            "review_count",
            "sku",
            "title"
        ]
    );
}

#[api_test]
async fn a_duplicate_sku_in_any_case_is_already_exists() {
    let app = TestApp::spawn().await;
    let request = |sku: &str| pb::CreateProductRequest {
        sku: sku.into(),
        title: "Saw".into(),
        category: "tools".into(),
        price_cents: 100,
        ..Default::default()
    };
    app.catalog()
        .await
        .create_product(request("SAW-1"))
        .await
        .unwrap();
    let status = app
        .catalog()
        .await
        .create_product(request("saw-1"))
        .await
        .unwrap_err();
    assert_error(&status, Code::AlreadyExists, "SKU_ALREADY_EXISTS");
}

#[api_test]
async fn batch_get_products_keeps_request_order_and_names_missing_ids() {
    let app = TestApp::spawn().await;
    let a = app.create_product(100, 1).await;
    let b = app.create_product(200, 2).await;
    let mut catalog = app.catalog().await;
    let got = catalog
        .batch_get_products(pb::BatchGetProductsRequest {
            ids: vec![b.id, a.id],
            skip_missing: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.products.iter().map(|p| p.id).collect::<Vec<_>>(),
        [b.id, a.id]
    );
    let status = catalog
        .batch_get_products(pb::BatchGetProductsRequest {
            ids: vec![a.id, 999_999],
            skip_missing: false,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "PRODUCT_NOT_FOUND");
    assert_eq!(
        status.get_error_details().error_info().unwrap().metadata["missing_ids"],
        "999999"
    );
}

#[api_test]
async fn update_product_applies_the_mask_and_checks_the_version() {
    let app = TestApp::spawn().await;
    let product = app.create_product(1000, 5).await;
    let mut catalog = app.catalog().await;
    let request = |version| pb::UpdateProductRequest {
        id: product.id,
        version,
        product: Some(pb::ProductPatch {
            price_cents: 1250,
            title: "ignored".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["price_cents".into()],
        }),
    };
    let updated = catalog
        .update_product(request(product.version))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.price_cents, 1250);
    assert_eq!(updated.title, product.title);
    assert_eq!(updated.version, product.version + 1);
    let status = catalog
        .update_product(request(product.version))
        .await
        .unwrap_err();
    assert_error(&status, Code::Aborted, "VERSION_CONFLICT");
    let status = catalog
        .update_product(pb::UpdateProductRequest {
            id: product.id,
            version: updated.version,
            product: None,
            update_mask: Some(FieldMask {
                paths: vec!["inventory".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["update_mask"]);
}

#[api_test]
async fn inventory_adjusts_but_never_below_zero() {
    let app = TestApp::spawn().await;
    let product = app.create_product(500, 3).await;
    let mut catalog = app.catalog().await;
    let adjust = |delta| pb::AdjustInventoryRequest {
        product_id: product.id,
        delta,
    };
    assert_eq!(
        catalog
            .adjust_inventory(adjust(7))
            .await
            .unwrap()
            .into_inner()
            .inventory,
        10
    );
    assert_eq!(
        catalog
            .adjust_inventory(adjust(-10))
            .await
            .unwrap()
            .into_inner()
            .inventory,
        0
    );
    let status = catalog.adjust_inventory(adjust(-1)).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "INSUFFICIENT_INVENTORY");
    assert_eq!(app.inventory_of(product.id).await, 0);
    let status = catalog.adjust_inventory(adjust(0)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["delta"]);
    let status = catalog
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: 999_999,
            delta: 1,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "PRODUCT_NOT_FOUND");
}
