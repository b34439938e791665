//! Every write path removes what it makes stale from Redis. Each case reads
//! Redis directly: the entry is there before the write and gone after it (so
//! "invalidated" cannot pass for "never cached"), and the next read answers
//! the write. Query families (search pages, analytics answers) are not
//! deleted but fenced: the write moves the family's generation past the
//! cached entry's.

use datagate::proto::v1 as pb;
use prost_types::FieldMask;

use crate::support::{TestApp, api_test, unique};

fn mask(path: &str) -> Option<FieldMask> {
    Some(FieldMask {
        paths: vec![path.to_owned()],
    })
}

/// The first byte of the cached entry (`V` a value, `N` "not found"), if any.
async fn cached(app: &TestApp, entity: &str, id: i64) -> Option<u8> {
    app.redis_get(&app.cache_key(entity, id))
        .await
        .map(|v| v[0])
}

/// The invalidation generation of an entity's key (0 when never invalidated).
async fn generation(app: &TestApp, entity: &str, id: i64) -> u64 {
    app.redis_get(&format!("{}:gen", app.cache_key(entity, id)))
        .await
        .map_or(0, |g| String::from_utf8(g).unwrap().parse().unwrap())
}

async fn next_id(app: &TestApp, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COALESCE(max(id), 0) + 1 FROM {table}"))
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn get_user(app: &TestApp, id: i64) -> Result<pb::User, tonic::Status> {
    let mut users = app.users().await;
    users
        .get_user(pb::GetUserRequest {
            id,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_product(app: &TestApp, id: i64) -> Result<pb::Product, tonic::Status> {
    let mut catalog = app.catalog().await;
    catalog
        .get_product(pb::GetProductRequest {
            id,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_order(app: &TestApp, id: i64) -> Result<pb::Order, tonic::Status> {
    let mut orders = app.orders().await;
    orders
        .get_order(pb::GetOrderRequest { id })
        .await
        .map(|r| r.into_inner())
}

/// Whether a cached page of `family` exists (besides its generation).
async fn has_cached_query(app: &TestApp, family: &str) -> bool {
    let prefix = format!("{}:v1:{family}:", app.settings.redis.key_prefix);
    app.redis_keys()
        .await
        .iter()
        .any(|k| k.starts_with(&prefix) && !k.ends_with(":gen"))
}

#[api_test]
async fn create_user_removes_the_cached_not_found_of_its_id() {
    let app = TestApp::spawn().await;
    let id = next_id(&app, "users").await;
    get_user(&app, id).await.unwrap_err();
    assert_eq!(cached(&app, "user", id).await, Some(b'N'), "before");

    let (email, username) = unique("created");
    let created = app.create_user(&email, &username).await;
    assert_eq!(created.id, id);
    assert_eq!(cached(&app, "user", id).await, None, "after");
    assert_eq!(get_user(&app, id).await.unwrap(), created);
}

#[api_test]
async fn update_user_removes_the_cached_user_for_every_mask_path() {
    let app = TestApp::spawn().await;
    let (new_email, new_username) = unique("renamed");
    let cases = [
        (
            "email",
            pb::UserPatch {
                email: new_email,
                ..Default::default()
            },
        ),
        (
            "username",
            pb::UserPatch {
                username: new_username,
                ..Default::default()
            },
        ),
        (
            "display_name",
            pb::UserPatch {
                display_name: "Renamed".into(),
                ..Default::default()
            },
        ),
        (
            "status",
            pb::UserPatch {
                status: pb::UserStatus::Suspended.into(),
                ..Default::default()
            },
        ),
        (
            "password",
            pb::UserPatch {
                password: "a brand new password".into(),
                ..Default::default()
            },
        ),
    ];
    let mut users = app.users().await;
    for (path, patch) in cases {
        let (email, username) = unique("masked");
        let user = app.create_user(&email, &username).await;
        assert_eq!(get_user(&app, user.id).await.unwrap(), user);
        assert_eq!(
            cached(&app, "user", user.id).await,
            Some(b'V'),
            "{path}: before"
        );

        let updated = users
            .update_user(pb::UpdateUserRequest {
                id: user.id,
                version: user.version,
                user: Some(patch),
                update_mask: mask(path),
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(updated, user, "{path}: the write changed the user");
        assert_eq!(cached(&app, "user", user.id).await, None, "{path}: after");
        assert_eq!(get_user(&app, user.id).await.unwrap(), updated, "{path}");
    }
}

#[api_test]
async fn delete_user_removes_the_cached_user() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("deleted");
    let user = app.create_user(&email, &username).await;
    get_user(&app, user.id).await.unwrap();
    assert_eq!(cached(&app, "user", user.id).await, Some(b'V'), "before");

    app.users()
        .await
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: user.version,
        })
        .await
        .unwrap();
    assert_eq!(cached(&app, "user", user.id).await, None, "after");
    assert_eq!(
        get_user(&app, user.id).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

#[api_test]
async fn create_product_removes_its_cached_not_found_and_moves_the_search_generation() {
    let app = TestApp::spawn().await;
    let mut catalog = app.catalog().await;
    let search = pb::SearchProductsRequest {
        query: "gizmo".into(),
        ..Default::default()
    };
    catalog.search_products(search.clone()).await.unwrap();
    assert!(has_cached_query(&app, "search").await, "a page is cached");
    let id = next_id(&app, "products").await;
    get_product(&app, id).await.unwrap_err();
    assert_eq!(cached(&app, "product", id).await, Some(b'N'), "before");
    let generation = app.family_generation("search").await;

    let created = catalog
        .create_product(pb::CreateProductRequest {
            sku: "GIZMO-1".into(),
            title: "Gizmo".into(),
            category: "tools".into(),
            price_cents: 900,
            inventory: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.id, id);
    assert_eq!(cached(&app, "product", id).await, None, "after");
    assert!(app.family_generation("search").await > generation);
    assert_eq!(get_product(&app, id).await.unwrap(), created);
    let page = catalog.search_products(search).await.unwrap().into_inner();
    assert_eq!(page.products.iter().map(|p| p.id).collect::<Vec<_>>(), [id]);
}

#[api_test]
async fn update_product_removes_the_cached_product_and_moves_the_search_generation_for_every_mask_path()
 {
    let app = TestApp::spawn().await;
    let cases = [
        (
            "title",
            pb::ProductPatch {
                title: "Retitled".into(),
                ..Default::default()
            },
        ),
        (
            "description",
            pb::ProductPatch {
                description: "Described".into(),
                ..Default::default()
            },
        ),
        (
            "category",
            pb::ProductPatch {
                category: "garden".into(),
                ..Default::default()
            },
        ),
        (
            "price_cents",
            pb::ProductPatch {
                price_cents: 4321,
                ..Default::default()
            },
        ),
        (
            "rating",
            pb::ProductPatch {
                rating: 4.5,
                ..Default::default()
            },
        ),
        (
            "review_count",
            pb::ProductPatch {
                review_count: 17,
                ..Default::default()
            },
        ),
    ];
    let mut catalog = app.catalog().await;
    for (path, patch) in cases {
        let product = app.create_product(1000, 5).await;
        assert_eq!(get_product(&app, product.id).await.unwrap(), product);
        assert_eq!(
            cached(&app, "product", product.id).await,
            Some(b'V'),
            "{path}: before"
        );
        let generation = app.family_generation("search").await;

        let updated = catalog
            .update_product(pb::UpdateProductRequest {
                id: product.id,
                version: product.version,
                product: Some(patch),
                update_mask: mask(path),
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(updated, product, "{path}: the write changed the product");
        assert_eq!(
            cached(&app, "product", product.id).await,
            None,
            "{path}: after"
        );
        assert!(
            app.family_generation("search").await > generation,
            "{path}: search pages are fenced"
        );
        assert_eq!(
            get_product(&app, product.id).await.unwrap(),
            updated,
            "{path}"
        );
    }
}

#[api_test]
async fn adjust_inventory_removes_the_cached_product() {
    let app = TestApp::spawn().await;
    let product = app.create_product(1000, 5).await;
    get_product(&app, product.id).await.unwrap();
    assert_eq!(
        cached(&app, "product", product.id).await,
        Some(b'V'),
        "before"
    );

    app.catalog()
        .await
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: product.id,
            delta: -2,
        })
        .await
        .unwrap();
    assert_eq!(cached(&app, "product", product.id).await, None, "after");
    assert_eq!(get_product(&app, product.id).await.unwrap().inventory, 3);
}

#[api_test]
async fn create_order_removes_its_cached_not_found_and_its_cached_products() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("orderer");
    let user = app.create_user(&email, &username).await;
    let products = [
        app.create_product(100, 10).await,
        app.create_product(200, 10).await,
    ];
    let order_id = next_id(&app, "orders").await;
    get_order(&app, order_id).await.unwrap_err();
    assert_eq!(cached(&app, "order", order_id).await, Some(b'N'), "before");
    for p in &products {
        get_product(&app, p.id).await.unwrap();
        assert_eq!(cached(&app, "product", p.id).await, Some(b'V'), "before");
    }

    let order = app
        .orders()
        .await
        .create_order(pb::CreateOrderRequest {
            user_id: user.id,
            items: products
                .iter()
                .map(|p| pb::OrderLine {
                    product_id: p.id,
                    quantity: 4,
                })
                .collect(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.id, order_id);
    assert_eq!(cached(&app, "order", order_id).await, None, "after");
    for p in &products {
        assert_eq!(cached(&app, "product", p.id).await, None, "after");
        assert_eq!(get_product(&app, p.id).await.unwrap().inventory, 6);
    }
    assert_eq!(get_order(&app, order_id).await.unwrap().id, order_id);
}

#[api_test]
async fn update_order_status_removes_the_cached_order_and_a_cancel_its_cached_products() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("lifecycle");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(100, 10).await;
    let mut orders = app.orders().await;
    let order = app.create_order(user.id, product.id, 3).await;

    for to in [pb::OrderStatus::Processing, pb::OrderStatus::Cancelled] {
        assert_ne!(get_order(&app, order.id).await.unwrap().status(), to);
        get_product(&app, product.id).await.unwrap();
        assert_eq!(
            cached(&app, "order", order.id).await,
            Some(b'V'),
            "{to:?}: before"
        );
        assert_eq!(cached(&app, "product", product.id).await, Some(b'V'));
        let product_generation = generation(&app, "product", product.id).await;

        orders
            .update_order_status(pb::UpdateOrderStatusRequest {
                id: order.id,
                status: to.into(),
                version: 0,
            })
            .await
            .unwrap();
        assert_eq!(cached(&app, "order", order.id).await, None, "{to:?}: after");
        if to == pb::OrderStatus::Cancelled {
            // The response is read after the commit, so its product summaries
            // may already have refilled the entry: what shows the
            // invalidation is the generation the write moved past.
            assert!(
                generation(&app, "product", product.id).await > product_generation,
                "a cancel returns stock: the products are invalidated too"
            );
        }
        // The order is read with its products (which refills them).
        assert_eq!(get_order(&app, order.id).await.unwrap().status(), to);
    }
    assert_eq!(get_product(&app, product.id).await.unwrap().inventory, 10);
}

#[api_test]
async fn refresh_analytics_moves_the_analytics_generation_past_cached_answers() {
    let app = TestApp::spawn().await;
    let mut analytics = app.analytics().await;
    let request = pb::GetCategoryMetricsRequest {
        window_days: 7,
        categories: vec![],
    };
    let before = analytics
        .get_category_metrics(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(before.categories.is_empty(), "{before:?}");
    assert!(
        has_cached_query(&app, "analytics").await,
        "the answer is cached"
    );
    app.create_product(500, 1).await;
    let generation = app.family_generation("analytics").await;

    app.admin_as(&app.token)
        .await
        .refresh_analytics(pb::RefreshAnalyticsRequest {})
        .await
        .unwrap();
    assert!(app.family_generation("analytics").await > generation);
    let after = analytics
        .get_category_metrics(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after
            .categories
            .iter()
            .map(|c| (c.category.as_str(), c.products))
            .collect::<Vec<_>>(),
        [("tools", 1)],
        "the refreshed view, not the cached answer"
    );
}
