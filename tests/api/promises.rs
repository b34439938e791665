//! Promises the design makes that no other test shows: VerifyPassword gives
//! nothing away, passwords stay out of the logs, a failed idempotent call is
//! not remembered, internal errors stay internal, and an empty `redis.url`
//! turns the cache off.

use datagate::proto::v1::{self as pb, verify_password_request::User as Who};
use prost_types::FieldMask;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{
    TestApp, api_test, assert_error,
    observe::{Logs, with_request_id},
    unique,
};

/// The Argon2 operations the call with this request id ran, by kind.
fn argon2_operations(lines: &[serde_json::Value], op: &str) -> usize {
    lines
        .iter()
        .filter(|l| l["message"] == "argon2 operation" && l["op"] == op)
        .count()
}

#[api_test]
async fn verify_password_answers_alike_and_hashes_once_for_a_wrong_password_an_unknown_email_and_no_password()
 {
    let app = TestApp::spawn().await;
    let (email, username) = unique("alike");
    app.create_user_with(pb::CreateUserRequest {
        email: email.clone(),
        username,
        password: "correct horse battery".into(),
        ..Default::default()
    })
    .await;
    let (nopw_email, nopw_username) = unique("alike_nopw");
    app.create_user(&nopw_email, &nopw_username).await;
    let mut users = app.users().await;
    let logs = Logs::capture();
    let verified_before = app
        .metric("password_hash_operations_total", &[("op", "verify")])
        .await;

    let cases = [
        ("a wrong password", Who::Email(email), "wrong horse battery"),
        (
            "an unknown email",
            Who::Email("nobody-at-all@example.com".into()),
            "correct horse battery",
        ),
        (
            "no password",
            Who::Email(nopw_email),
            "correct horse battery",
        ),
    ];
    let mut answers = Vec::new();
    for (case, who, password) in cases {
        let (request, request_id) = with_request_id(pb::VerifyPasswordRequest {
            user: Some(who),
            password: password.into(),
        });
        let answer = users.verify_password(request).await;
        let lines = logs.of_finished_request(&request_id).await;
        assert_eq!(argon2_operations(&lines, "verify"), 1, "{case}: {lines:#?}");
        assert_eq!(argon2_operations(&lines, "hash"), 0, "{case}: {lines:#?}");
        let finished = lines
            .iter()
            .find(|l| l["message"] == "rpc finished")
            .unwrap();
        answers.push((
            case,
            answer.map(|r| r.into_inner()),
            finished["code"].clone(),
        ));
    }

    let (_, first, first_code) = &answers[0];
    assert_eq!(
        first.as_ref().unwrap(),
        &pb::VerifyPasswordResponse {
            valid: false,
            user: None
        }
    );
    for (case, answer, code) in &answers[1..] {
        assert_eq!(answer.as_ref().unwrap(), first.as_ref().unwrap(), "{case}");
        assert_eq!(code, first_code, "{case}: the same status code");
    }
    let verified = app
        .metric("password_hash_operations_total", &[("op", "verify")])
        .await
        - verified_before;
    assert!(verified >= 3.0, "counted in the metric too: {verified}");
}

#[api_test]
async fn passwords_and_their_hashes_never_reach_a_log_line() {
    let app = TestApp::spawn().await;
    let first = "Zebra-Quartz-1337-Mauve";
    let second = "Ochre-Falcon-4242-Tundra";
    let mut users = app.users().await;
    let logs = Logs::capture();

    let (email, username) = unique("secret");
    let (request, create_id) = with_request_id(pb::CreateUserRequest {
        email,
        username,
        password: first.into(),
        ..Default::default()
    });
    let user = users.create_user(request).await.unwrap().into_inner();
    let (request, update_id) = with_request_id(pb::UpdateUserRequest {
        id: user.id,
        version: user.version,
        user: Some(pb::UserPatch {
            password: second.into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["password".into()],
        }),
    });
    users.update_user(request).await.unwrap();
    let mut verify_ids = Vec::new();
    for (password, valid) in [(first, false), (second, true)] {
        let (request, id) = with_request_id(pb::VerifyPasswordRequest {
            user: Some(Who::Id(user.id)),
            password: password.into(),
        });
        let answer = users.verify_password(request).await.unwrap().into_inner();
        assert_eq!(answer.valid, valid);
        verify_ids.push(id);
    }
    // A too-short password is refused by validation, which names the field.
    let (request, invalid_id) = with_request_id(pb::CreateUserRequest {
        email: "short-secret@example.com".into(),
        username: "shortsecret".into(),
        password: "Qz7-Wy".into(),
        ..Default::default()
    });
    users.create_user(request).await.unwrap_err();

    // The capture saw the calls, down to the hashing of each password.
    for id in [&create_id, &update_id].into_iter().chain(&verify_ids) {
        let lines = logs.of_finished_request(id).await;
        assert!(
            lines.iter().any(|l| l["message"] == "argon2 operation"),
            "{lines:#?}"
        );
    }
    logs.of_finished_request(&invalid_id).await;
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(user.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let salt_and_digest = hash.rsplit('$').take(2).collect::<Vec<_>>();
    let text = logs.text();
    assert!(text.len() > 10, "{text:#?}");
    for secret in [first, second, "Qz7-Wy"].into_iter().chain(salt_and_digest) {
        let leaks: Vec<&String> = text.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret:?} was logged: {leaks:#?}");
    }
}

#[api_test]
async fn a_failed_create_order_is_not_remembered_and_its_request_id_succeeds_once_stock_is_there() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("restock");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(700, 1).await;
    let mut orders = app.orders().await;
    let request = pb::CreateOrderRequest {
        user_id: user.id,
        items: vec![pb::OrderLine {
            product_id: product.id,
            quantity: 3,
        }],
        request_id: "checkout-after-restock".into(),
    };

    let failed = orders.create_order(request.clone()).await.unwrap_err();
    assert_error(&failed, Code::FailedPrecondition, "INSUFFICIENT_INVENTORY");
    let remembered: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(remembered, 0, "the failure left no key behind");

    app.catalog()
        .await
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: product.id,
            delta: 5,
        })
        .await
        .unwrap();
    let created = orders
        .create_order(request.clone())
        .await
        .expect("the same request_id succeeds now")
        .into_inner();
    let replayed = orders
        .create_order(request)
        .await
        .expect("a replay answers the success")
        .into_inner();
    assert_eq!(replayed, created);
    let placed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(placed, 1);
    assert_eq!(
        app.inventory_of(product.id).await,
        6 - 3,
        "stock taken once"
    );
}

#[api_test]
async fn an_internal_error_reaches_the_caller_as_a_generic_message_and_is_logged_with_the_request_id()
 {
    let app = TestApp::spawn().await;
    let (email, username) = unique("undecodable");
    let user = app.create_user(&email, &username).await;
    // A row the service cannot decode: a status it does not know (the
    // constraint that keeps such rows out is dropped in this test's database).
    for sql in [
        "ALTER TABLE users DROP CONSTRAINT users_status_check",
        "UPDATE users SET status = 'archived-by-hand' WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(user.id)
            .execute(&app.db)
            .await
            .unwrap();
    }
    let internal_before = app
        .metric(
            "rpc_requests_total",
            &[
                ("service", "datagate.v1.UserService"),
                ("method", "GetUser"),
                ("code", "INTERNAL"),
            ],
        )
        .await;
    let logs = Logs::capture();

    let (request, request_id) = with_request_id(pb::GetUserRequest {
        id: user.id,
        ..Default::default()
    });
    let status = app.users().await.get_user(request).await.unwrap_err();

    assert_error(&status, Code::Internal, "INTERNAL");
    assert_eq!(
        status.message(),
        "internal error; it has been logged with the request id"
    );
    let details = status.get_error_details();
    assert!(
        details.error_info().unwrap().metadata.is_empty(),
        "{status:?}"
    );
    assert!(details.bad_request().is_none() && details.retry_info().is_none());
    assert_eq!(
        status.metadata().get("x-request-id").unwrap(),
        request_id.as_str(),
        "the caller has the id to quote"
    );
    let lines = logs.of_finished_request(&request_id).await;
    let logged = lines
        .iter()
        .find(|l| l["level"] == "ERROR" && l["message"] == "internal error")
        .unwrap_or_else(|| panic!("no ERROR line for {request_id}: {lines:#?}"));
    let chain = logged["error"].as_str().unwrap();
    assert!(
        chain.contains("archived-by-hand"),
        "the full chain: {chain}"
    );
    assert!(!status.message().contains("archived"));
    let internal = app
        .metric(
            "rpc_requests_total",
            &[
                ("service", "datagate.v1.UserService"),
                ("method", "GetUser"),
                ("code", "INTERNAL"),
            ],
        )
        .await;
    assert!(internal - internal_before >= 1.0);
}

#[api_test]
async fn an_empty_redis_url_turns_the_cache_off_and_calls_still_work() {
    let app = TestApp::spawn_with(|s| {
        s.redis.url = String::new().into();
        s.redis.key_prefix = format!("dgtest-off-{}", uuid::Uuid::new_v4().simple());
    })
    .await;
    let (email, username) = unique("uncached");
    let user = app.create_user(&email, &username).await;
    let mut users = app.users().await;
    for _ in 0..2 {
        assert_eq!(
            users
                .get_user(pb::GetUserRequest {
                    id: user.id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner(),
            user
        );
    }
    let missing = users
        .get_user(pb::GetUserRequest {
            id: 987_654,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&missing, Code::NotFound, "USER_NOT_FOUND");
    sqlx::query("UPDATE users SET display_name = 'changed in the database' WHERE id = $1")
        .bind(user.id)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(
        users
            .get_user(pb::GetUserRequest {
                id: user.id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .display_name,
        "changed in the database",
        "every read goes to PostgreSQL"
    );
    let product = app.create_product(100, 3).await;
    let mut catalog = app.catalog().await;
    catalog
        .get_product(pb::GetProductRequest {
            id: product.id,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        catalog
            .search_products(pb::SearchProductsRequest {
                query: "product".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    assert_eq!(app.redis_keys().await, Vec::<String>::new());
}
