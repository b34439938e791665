//! The limits the protos document, at their boundaries: the value at the
//! limit is accepted, one beyond is INVALID_ARGUMENT naming the field.
//! (Page sizes and `limit` are coerced down to their maximum, not refused:
//! `users.rs` and `search.rs` test that.) The MongoDB-backed limits
//! (profile fields, addresses, price history ranges) cost one document
//! operation per accepted boundary: refusals are decided before the
//! document store is reached.

use datagate::proto::v1 as pb;
use prost_types::Timestamp;
use tonic::Status;

use crate::support::{TestApp, api_test, unique, violated_fields};

/// Asserts that `result` is INVALID_ARGUMENT with one violation, of `field`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, field: &str) {
    let status = result.expect_err("one beyond the limit is refused");
    assert_eq!(violated_fields(&status), [field], "{status:?}");
}

fn new_user(tag: &str) -> pb::CreateUserRequest {
    let (email, username) = unique(tag);
    pb::CreateUserRequest {
        email,
        username,
        ..Default::default()
    }
}

/// A username of `len` characters (a letter, then digits and letters).
fn username(len: usize) -> String {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("u{}", &tag.repeat(2)[..len - 1])
}

#[api_test]
async fn user_limits_hold_at_their_boundaries() {
    let app = TestApp::spawn().await;
    let mut users = app.users().await;

    // Email: at most 254 characters (64 before the @).
    let email_of = |len: usize| {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let domain = format!("{}.example", "d".repeat(len - 64 - 1 - ".example".len()));
        format!("{tag}{}@{domain}", "l".repeat(64 - tag.len()))
    };
    let email = email_of(254);
    assert_eq!(email.len(), 254);
    users
        .create_user(pb::CreateUserRequest {
            email,
            ..new_user("limit")
        })
        .await
        .expect("a 254-character email");
    refused(
        users
            .create_user(pb::CreateUserRequest {
                email: email_of(255),
                ..new_user("limit")
            })
            .await,
        "email",
    );

    // Username: 3 to 32 characters.
    for len in [3, 32] {
        users
            .create_user(pb::CreateUserRequest {
                username: username(len),
                ..new_user("limit")
            })
            .await
            .unwrap_or_else(|e| panic!("a {len}-character username: {e:?}"));
    }
    for len in [2, 33] {
        refused(
            users
                .create_user(pb::CreateUserRequest {
                    username: username(len),
                    ..new_user("limit")
                })
                .await,
            "username",
        );
    }

    // Display name: at most 100 characters.
    users
        .create_user(pb::CreateUserRequest {
            display_name: "n".repeat(100),
            ..new_user("limit")
        })
        .await
        .expect("a 100-character display name");
    refused(
        users
            .create_user(pb::CreateUserRequest {
                display_name: "n".repeat(101),
                ..new_user("limit")
            })
            .await,
        "display_name",
    );

    // Password: 8 to 256 characters.
    for len in [8, 256] {
        users
            .create_user(pb::CreateUserRequest {
                password: "p".repeat(len),
                ..new_user("limit")
            })
            .await
            .unwrap_or_else(|e| panic!("a {len}-character password: {e:?}"));
    }
    for len in [7, 257] {
        refused(
            users
                .create_user(pb::CreateUserRequest {
                    password: "p".repeat(len),
                    ..new_user("limit")
                })
                .await,
            "password",
        );
    }

    // BatchGetUsers: at most 100 ids.
    let user = app
        .create_user(&unique("batch").0, &unique("batch").1)
        .await;
    let found = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![user.id; 100],
            skip_missing: false,
        })
        .await
        .expect("100 ids")
        .into_inner();
    assert_eq!(found.users.len(), 100);
    refused(
        users
            .batch_get_users(pb::BatchGetUsersRequest {
                ids: vec![user.id; 101],
                skip_missing: false,
            })
            .await,
        "ids",
    );

    // Team name: 1 to 100 characters.
    let name = |len: usize| {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        format!("{tag}{}", "t".repeat(len - tag.len()))
    };
    users
        .create_team(pb::CreateTeamRequest { name: name(100) })
        .await
        .expect("a 100-character team name");
    refused(
        users
            .create_team(pb::CreateTeamRequest { name: name(101) })
            .await,
        "name",
    );
    refused(
        users
            .create_team(pb::CreateTeamRequest {
                name: String::new(),
            })
            .await,
        "name",
    );
}

fn new_product() -> pb::CreateProductRequest {
    let sku = format!("LIM-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    pb::CreateProductRequest {
        title: format!("Product {sku}"),
        sku,
        category: "tools".into(),
        price_cents: 100,
        inventory: 1,
        ..Default::default()
    }
}

#[api_test]
async fn catalog_limits_hold_at_their_boundaries() {
    let app = TestApp::spawn().await;
    let mut catalog = app.catalog().await;
    let sku_of = |len: usize| {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        format!("{tag}{}", "S".repeat(len - tag.len()))
    };

    // Price: 0 to 999,999,999,999 cents, the NUMERIC(12,2) column's range.
    for price_cents in [0, 999_999_999_999] {
        let product = catalog
            .create_product(pb::CreateProductRequest {
                price_cents,
                ..new_product()
            })
            .await
            .unwrap_or_else(|e| panic!("price {price_cents}: {e:?}"))
            .into_inner();
        assert_eq!(product.price_cents, price_cents, "stored as given");
    }
    for price_cents in [-1, 1_000_000_000_000] {
        refused(
            catalog
                .create_product(pb::CreateProductRequest {
                    price_cents,
                    ..new_product()
                })
                .await,
            "price_cents",
        );
    }

    // Sku 1 to 64, title 1 to 200, description at most 5000, category 1 to
    // 64 characters.
    let at_limits = catalog
        .create_product(pb::CreateProductRequest {
            sku: sku_of(64),
            title: "t".repeat(200),
            description: "d".repeat(5000),
            category: "c".repeat(64),
            ..new_product()
        })
        .await
        .expect("every text field at its limit")
        .into_inner();
    assert_eq!(at_limits.description.len(), 5000);
    let beyond: [(&str, pb::CreateProductRequest); 7] = [
        (
            "sku",
            pb::CreateProductRequest {
                sku: sku_of(65),
                ..new_product()
            },
        ),
        (
            "sku",
            pb::CreateProductRequest {
                sku: String::new(),
                ..new_product()
            },
        ),
        (
            "title",
            pb::CreateProductRequest {
                title: "t".repeat(201),
                ..new_product()
            },
        ),
        (
            "title",
            pb::CreateProductRequest {
                title: String::new(),
                ..new_product()
            },
        ),
        (
            "description",
            pb::CreateProductRequest {
                description: "d".repeat(5001),
                ..new_product()
            },
        ),
        (
            "category",
            pb::CreateProductRequest {
                category: "c".repeat(65),
                ..new_product()
            },
        ),
        (
            "category",
            pb::CreateProductRequest {
                category: String::new(),
                ..new_product()
            },
        ),
    ];
    for (field, request) in beyond {
        refused(catalog.create_product(request).await, field);
    }

    // Rating 0 to 5.
    catalog
        .create_product(pb::CreateProductRequest {
            rating: 5.0,
            ..new_product()
        })
        .await
        .expect("rating 5");
    for rating in [-0.01, 5.01] {
        refused(
            catalog
                .create_product(pb::CreateProductRequest {
                    rating,
                    ..new_product()
                })
                .await,
            "rating",
        );
    }

    // BatchGetProducts: at most 100 ids.
    let found = catalog
        .batch_get_products(pb::BatchGetProductsRequest {
            ids: vec![at_limits.id; 100],
            skip_missing: false,
        })
        .await
        .expect("100 ids")
        .into_inner();
    assert_eq!(found.products.len(), 100);
    refused(
        catalog
            .batch_get_products(pb::BatchGetProductsRequest {
                ids: vec![at_limits.id; 101],
                skip_missing: false,
            })
            .await,
        "ids",
    );

    // AdjustInventory: non-zero, at most 1,000,000 in either direction.
    let adjusted = catalog
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: at_limits.id,
            delta: 1_000_000,
        })
        .await
        .expect("+1,000,000")
        .into_inner();
    let adjusted = catalog
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: adjusted.id,
            delta: -1_000_000,
        })
        .await
        .expect("-1,000,000");
    drop(adjusted);
    for delta in [0, 1_000_001, -1_000_001] {
        refused(
            catalog
                .adjust_inventory(pb::AdjustInventoryRequest {
                    product_id: at_limits.id,
                    delta,
                })
                .await,
            "delta",
        );
    }

    // SearchProducts: query 1 to 200 characters, at most 20 categories,
    // min_rating 0 to 5.
    let search =
        |query: String, categories: usize, min_rating: Option<f64>| pb::SearchProductsRequest {
            query,
            categories: (0..categories).map(|i| format!("c{i}")).collect(),
            min_rating,
            ..Default::default()
        };
    catalog
        .search_products(search("q".repeat(200), 20, Some(5.0)))
        .await
        .expect("every search limit at once");
    refused(
        catalog
            .search_products(search("q".repeat(201), 0, None))
            .await,
        "query",
    );
    refused(
        catalog
            .search_products(search("lamp".into(), 21, None))
            .await,
        "categories",
    );
    refused(
        catalog
            .search_products(search("lamp".into(), 0, Some(5.01)))
            .await,
        "min_rating",
    );
}

#[api_test]
async fn order_limits_hold_at_their_boundaries() {
    let app = TestApp::spawn().await;
    let mut orders = app.orders().await;
    let user = app
        .create_user(&unique("orders").0, &unique("orders").1)
        .await;
    let products = {
        let mut products = Vec::new();
        for _ in 0..51 {
            products.push(app.create_product(100, 2000).await);
        }
        products
    };
    let line = |product: &pb::Product, quantity: i32| pb::OrderLine {
        product_id: product.id,
        quantity,
    };
    let order = |items: Vec<pb::OrderLine>, request_id: String| pb::CreateOrderRequest {
        user_id: user.id,
        items,
        request_id,
    };

    // Quantity 1 to 1000; request id 1 to 128 characters.
    let key = |len: usize| {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        format!("{tag}{}", "k".repeat(len - tag.len()))
    };
    orders
        .create_order(order(vec![line(&products[0], 1000)], key(128)))
        .await
        .expect("quantity 1000 with a 128-character request id");
    refused(
        orders
            .create_order(order(vec![line(&products[0], 1001)], String::new()))
            .await,
        "items[0].quantity",
    );
    refused(
        orders
            .create_order(order(vec![line(&products[0], 0)], String::new()))
            .await,
        "items[0].quantity",
    );
    refused(
        orders
            .create_order(order(vec![line(&products[0], 1)], key(129)))
            .await,
        "request_id",
    );

    // 1 to 50 lines.
    let lines = |n: usize| products[..n].iter().map(|p| line(p, 1)).collect();
    let created = orders
        .create_order(order(lines(50), String::new()))
        .await
        .expect("50 lines")
        .into_inner();
    assert_eq!(created.items.len(), 50);
    refused(
        orders.create_order(order(lines(51), String::new())).await,
        "items",
    );
    refused(
        orders.create_order(order(Vec::new(), String::new())).await,
        "items",
    );
}

#[api_test]
async fn analytics_limits_hold_at_their_boundaries() {
    let app = TestApp::spawn().await;
    let mut analytics = app.analytics().await;
    let categories = |n: usize| (0..n).map(|i| format!("c{i}")).collect::<Vec<_>>();

    // GetCategoryMetrics: window 1 to 365 days, at most 20 categories.
    for window_days in [1, 365] {
        analytics
            .get_category_metrics(pb::GetCategoryMetricsRequest {
                window_days,
                categories: categories(20),
            })
            .await
            .unwrap_or_else(|e| panic!("window {window_days}: {e:?}"));
    }
    for window_days in [0, 366] {
        refused(
            analytics
                .get_category_metrics(pb::GetCategoryMetricsRequest {
                    window_days,
                    categories: Vec::new(),
                })
                .await,
            "window_days",
        );
    }
    refused(
        analytics
            .get_category_metrics(pb::GetCategoryMetricsRequest {
                window_days: 30,
                categories: categories(21),
            })
            .await,
        "categories",
    );

    // GetRevenueTrend: 1 to 36 months.
    for months in [1, 36] {
        analytics
            .get_revenue_trend(pb::GetRevenueTrendRequest {
                months,
                category: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{months} months: {e:?}"));
    }
    for months in [-1, 37] {
        refused(
            analytics
                .get_revenue_trend(pb::GetRevenueTrendRequest {
                    months,
                    category: String::new(),
                })
                .await,
            "months",
        );
    }

    // GetSearchInsights: at most 366 days apart.
    let day = 86_400;
    let end = chrono::Utc::now().timestamp();
    let insights = |days: i64| pb::GetSearchInsightsRequest {
        start_time: Some(Timestamp {
            seconds: end - days * day,
            nanos: 0,
        }),
        end_time: Some(Timestamp {
            seconds: end,
            nanos: 0,
        }),
        limit: 0,
    };
    analytics
        .get_search_insights(insights(366))
        .await
        .expect("366 days");
    let status = analytics
        .get_search_insights(insights(367))
        .await
        .expect_err("367 days are refused");
    assert!(
        !violated_fields(&status).is_empty(),
        "a violation names the range: {status:?}"
    );
}

/// An address whose every field is `at_limit` (its maximum length) or the
/// shortest the field allows.
fn address(label: &str, at_limit: bool, primary: bool) -> pb::Address {
    let text = |min: &str, len: usize| {
        if at_limit {
            "x".repeat(len)
        } else {
            min.to_owned()
        }
    };
    pb::Address {
        label: if at_limit {
            format!("{label}{}", "l".repeat(40 - label.len()))
        } else {
            label.to_owned()
        },
        line1: text("1 Main St", 200),
        line2: text("", 200),
        city: text("Berlin", 100),
        region: text("", 100),
        postal_code: text("10115", 20),
        country: "DE".into(),
        primary,
    }
}

#[api_test]
async fn profile_and_price_history_limits_hold_at_their_boundaries() {
    let app = TestApp::spawn_with_mongo(|_| {}).await;
    let (email, username) = unique("doclimit");
    let user = app.create_user(&email, &username).await;
    let mut users = app.users().await;
    let update = |profile: pb::UserProfile, paths: &[&str]| pb::UpdateUserProfileRequest {
        user_id: user.id,
        profile: Some(profile),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    let all = ["given_name", "family_name", "addresses"];

    // Names: at most 100 characters; addresses: at most 5, each field at
    // its documented maximum. One write holds every boundary.
    let at_limit = pb::UserProfile {
        given_name: "g".repeat(100),
        family_name: "f".repeat(100),
        addresses: (0..5)
            .map(|i| address(&format!("a{i}"), true, i == 0))
            .collect(),
        ..Default::default()
    };
    let stored = users
        .update_user_profile(update(at_limit.clone(), &all))
        .await
        .expect("every field at its limit")
        .into_inner();
    assert_eq!(stored.given_name.chars().count(), 100);
    assert_eq!(stored.addresses, at_limit.addresses, "stored as given");

    for (field, profile) in [
        (
            "profile.given_name",
            pb::UserProfile {
                given_name: "g".repeat(101),
                ..at_limit.clone()
            },
        ),
        (
            "profile.family_name",
            pb::UserProfile {
                family_name: "f".repeat(101),
                ..at_limit.clone()
            },
        ),
        (
            "profile.addresses",
            pb::UserProfile {
                addresses: (0..6)
                    .map(|i| address(&format!("a{i}"), false, i == 0))
                    .collect(),
                ..at_limit.clone()
            },
        ),
    ] {
        refused(
            users.update_user_profile(update(profile, &all)).await,
            field,
        );
    }
    type Spoil = fn(&mut pb::Address);
    let beyond: [(&str, Spoil); 7] = [
        ("label", |a| a.label = "l".repeat(41)),
        ("label", |a| a.label = String::new()),
        ("line1", |a| a.line1 = "x".repeat(201)),
        ("line2", |a| a.line2 = "x".repeat(201)),
        ("city", |a| a.city = "x".repeat(101)),
        ("region", |a| a.region = "x".repeat(101)),
        ("postal_code", |a| a.postal_code = "x".repeat(21)),
    ];
    for (name, spoil) in beyond {
        let mut one = address("home", true, true);
        spoil(&mut one);
        let profile = pb::UserProfile {
            addresses: vec![one],
            ..Default::default()
        };
        refused(
            users
                .update_user_profile(update(profile, &["addresses"]))
                .await,
            &format!("profile.addresses[0].{name}"),
        );
    }
    let kept = users
        .get_user_profile(pb::GetUserProfileRequest { user_id: user.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        kept.addresses, at_limit.addresses,
        "refusals change nothing"
    );

    // GetPriceHistory: a window of at most 366 days.
    let product = app.create_product(1_000, 1).await;
    let mut catalog = app.catalog().await;
    let end = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };
    let history = |span_seconds: i64| pb::GetPriceHistoryRequest {
        product_id: product.id,
        start_time: Some(Timestamp {
            seconds: end.seconds - span_seconds,
            nanos: 0,
        }),
        end_time: Some(end),
        granularity: pb::PriceHistoryGranularity::Daily.into(),
    };
    catalog
        .get_price_history(history(366 * 86_400))
        .await
        .expect("a 366-day window");
    refused(
        catalog.get_price_history(history(366 * 86_400 + 1)).await,
        "end_time",
    );
}
