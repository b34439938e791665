//! UserService through the front door: every RPC's success and failure paths.

use datagate::proto::v1 as pb;
use prost_types::Timestamp;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{TestApp, api_test, assert_error, mask, unique, violated_fields};

#[api_test]
async fn create_user_returns_the_stored_user_without_any_password_material() {
    let app = TestApp::spawn().await;
    let mut users = app.users().await;

    let created = users
        .create_user(pb::CreateUserRequest {
            email: "  Ada@Example.com ".into(),
            username: "Ada".into(),
            display_name: "Ada Lovelace".into(),
            password: "correct horse battery".into(),
            status: 0,
        })
        .await
        .unwrap()
        .into_inner();

    assert!(created.id > 0);
    assert_eq!(created.email, "Ada@Example.com");
    assert_eq!(created.username, "ada");
    assert_eq!(created.status(), pb::UserStatus::Active);
    assert!(created.has_password);
    assert_eq!(created.version, 1);
    let fetched = users
        .get_user(pb::GetUserRequest {
            id: created.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, created);
    let stored_hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(created.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(stored_hash.starts_with("$argon2id$"), "stored as Argon2id");
    assert!(!format!("{fetched:?}").contains("argon2"));
}

#[api_test]
async fn get_user_of_an_unknown_id_is_not_found() {
    let app = TestApp::spawn().await;
    let status = app
        .users()
        .await
        .get_user(pb::GetUserRequest {
            id: 987_654,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    assert!(status.message().contains("987654"));
}

#[api_test]
async fn get_user_with_a_non_positive_id_is_invalid() {
    let app = TestApp::spawn().await;
    let status = app
        .users()
        .await
        .get_user(pb::GetUserRequest {
            id: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["id"]);
}

/// Creates the user `existing` (email, username), then asserts that
/// creating `second` is refused as ALREADY_EXISTS with `reason`.
async fn assert_second_user_refused(existing: (&str, &str), second: (&str, &str), reason: &str) {
    let app = TestApp::spawn().await;
    app.create_user(existing.0, existing.1).await;
    let status = app
        .users()
        .await
        .create_user(pb::CreateUserRequest {
            email: second.0.into(),
            username: second.1.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::AlreadyExists, reason);
}

#[api_test]
async fn a_duplicate_email_in_any_case_is_already_exists() {
    assert_second_user_refused(
        ("grace@example.com", "grace"),
        ("GRACE@example.com", "grace2"),
        "EMAIL_ALREADY_EXISTS",
    )
    .await;
}

#[api_test]
async fn a_duplicate_username_is_already_exists() {
    assert_second_user_refused(
        ("one@example.com", "samename"),
        ("two@example.com", "SameName"),
        "USERNAME_ALREADY_EXISTS",
    )
    .await;
}

#[api_test]
async fn invalid_input_reports_every_violated_field_at_once() {
    let app = TestApp::spawn().await;
    let status = app
        .users()
        .await
        .create_user(pb::CreateUserRequest {
            email: "not-an-email".into(),
            username: "x".into(),
            display_name: "bell\u{7}".into(),
            password: "short".into(),
            status: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["display_name", "email", "password", "status", "username"]
    );
    let details = status.get_error_details();
    let email = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .find(|v| v.field == "email")
        .unwrap();
    assert!(
        email.description.contains('@'),
        "actionable: {}",
        email.description
    );
    assert!(!status.message().contains("sqlx"), "no internals leak");
}

#[api_test]
async fn batch_get_returns_users_in_request_order_with_duplicates() {
    let app = TestApp::spawn().await;
    let a = app.create_user("a@example.com", "usera").await;
    let b = app.create_user("b@example.com", "userb").await;
    let response = app
        .users()
        .await
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![b.id, a.id, b.id],
            skip_missing: false,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<i64> = response.users.iter().map(|u| u.id).collect();
    assert_eq!(ids, [b.id, a.id, b.id]);
    assert!(response.missing_ids.is_empty());
}

#[api_test]
async fn batch_get_with_a_missing_id_fails_naming_it_unless_told_to_skip() {
    let app = TestApp::spawn().await;
    let a = app.create_user("a@example.com", "usera").await;
    let mut users = app.users().await;

    let status = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![a.id, 999_999],
            skip_missing: false,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().unwrap().metadata["missing_ids"],
        "999999"
    );

    let response = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![999_999, a.id],
            skip_missing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.users.len(), 1);
    assert_eq!(response.users[0].id, a.id);
    assert_eq!(response.missing_ids, [999_999]);
}

#[api_test]
async fn batch_get_rejects_oversized_batches_and_bad_ids() {
    let app = TestApp::spawn().await;
    let mut users = app.users().await;
    for (ids, field) in [((1..=101).collect(), "ids"), (vec![1, -4], "ids[1]")] {
        let status = users
            .batch_get_users(pb::BatchGetUsersRequest {
                ids,
                skip_missing: true,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
}

#[api_test]
async fn list_users_pages_through_everyone_once_in_creation_order() {
    let app = TestApp::spawn().await;
    let mut expected = Vec::new();
    for i in 0..7 {
        expected.push(
            app.create_user(&format!("u{i}@example.com"), &format!("user{i}"))
                .await
                .id,
        );
    }
    let mut users = app.users().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = users
            .list_users(pb::ListUsersRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 3);
        seen.extend(page.users.iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
}

#[api_test]
async fn list_users_filters_by_status_and_creation_time() {
    let app = TestApp::spawn().await;
    let active = app.create_user("act@example.com", "active1").await;
    let suspended = app
        .create_user_with(pb::CreateUserRequest {
            email: "sus@example.com".into(),
            username: "suspended1".into(),
            status: pb::UserStatus::Suspended.into(),
            ..Default::default()
        })
        .await;
    sqlx::query("UPDATE users SET created_at = now() - interval '10 days' WHERE id = $1")
        .bind(active.id)
        .execute(&app.db)
        .await
        .unwrap();
    let mut users = app.users().await;

    let only_suspended = users
        .list_users(pb::ListUsersRequest {
            status: pb::UserStatus::Suspended.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        only_suspended
            .users
            .iter()
            .map(|u| u.id)
            .collect::<Vec<_>>(),
        [suspended.id]
    );

    let five_days_ago = Timestamp {
        seconds: chrono::Utc::now().timestamp() - 5 * 86_400,
        nanos: 0,
    };
    let recent = users
        .list_users(pb::ListUsersRequest {
            created_after: Some(five_days_ago),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        recent.users.iter().map(|u| u.id).collect::<Vec<_>>(),
        [suspended.id]
    );

    let older = users
        .list_users(pb::ListUsersRequest {
            created_before: Some(five_days_ago),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        older.users.iter().map(|u| u.id).collect::<Vec<_>>(),
        [active.id]
    );
}

#[api_test]
async fn a_tampered_or_foreign_page_token_is_invalid() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        app.create_user(&format!("t{i}@example.com"), &format!("tok{i}"))
            .await;
    }
    let mut users = app.users().await;
    let first = users
        .list_users(pb::ListUsersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());

    let mut tampered = token.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let status = users
        .list_users(pb::ListUsersRequest {
            page_size: 1,
            page_token: String::from_utf8(tampered).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);

    let status = users
        .list_users(pb::ListUsersRequest {
            page_size: 1,
            page_token: token,
            status: pb::UserStatus::Suspended.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);
}

#[api_test]
async fn page_size_out_of_range_is_invalid_or_capped() {
    let app = TestApp::spawn().await;
    let mut users = app.users().await;
    let status = users
        .list_users(pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);

    let capped = users
        .list_users(pb::ListUsersRequest {
            page_size: 1_000_000,
            ..Default::default()
        })
        .await;
    assert!(
        capped.is_ok(),
        "an oversized page size is coerced to the maximum"
    );
}

#[api_test]
async fn update_user_changes_only_masked_fields_and_bumps_the_version() {
    let app = TestApp::spawn().await;
    let user = app.create_user("up@example.com", "updater").await;
    let updated = app
        .users()
        .await
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                display_name: "New Name".into(),
                email: "ignored@example.com".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "New Name");
    assert_eq!(updated.email, user.email, "email was not in the mask");
    assert_eq!(updated.version, user.version + 1);
}

#[api_test]
async fn update_user_with_a_stale_version_is_aborted_with_the_current_version() {
    let app = TestApp::spawn().await;
    let user = app.create_user("stale@example.com", "stale").await;
    let mut users = app.users().await;
    let patch = |name: &str| pb::UpdateUserRequest {
        id: user.id,
        version: user.version,
        user: Some(pb::UserPatch {
            display_name: name.into(),
            ..Default::default()
        }),
        update_mask: mask(&["display_name"]),
    };
    users.update_user(patch("first")).await.unwrap();
    let status = users.update_user(patch("second")).await.unwrap_err();
    assert_error(&status, Code::Aborted, "VERSION_CONFLICT");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().unwrap().metadata["current_version"],
        "2"
    );
}

#[api_test]
async fn update_user_rejects_bad_masks_and_values() {
    let app = TestApp::spawn().await;
    let user = app.create_user("mask@example.com", "masker").await;
    let mut users = app.users().await;

    let cases: [(pb::UpdateUserRequest, &[&str]); 3] = [
        (
            pb::UpdateUserRequest {
                id: user.id,
                version: user.version,
                user: Some(pb::UserPatch::default()),
                update_mask: None,
            },
            &["update_mask"],
        ),
        (
            pb::UpdateUserRequest {
                id: user.id,
                version: user.version,
                user: Some(pb::UserPatch {
                    email: "broken".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["email", "id"]),
            },
            &["update_mask", "user.email"],
        ),
        (
            pb::UpdateUserRequest {
                id: user.id,
                version: 0,
                user: Some(pb::UserPatch::default()),
                update_mask: mask(&["display_name"]),
            },
            &["version"],
        ),
    ];
    for (request, fields) in cases {
        let status = users.update_user(request.clone()).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{request:?}");
    }
}

#[api_test]
async fn update_user_to_a_taken_email_is_already_exists() {
    let app = TestApp::spawn().await;
    app.create_user("taken@example.com", "taken").await;
    let user = app.create_user("free@example.com", "free").await;
    let status = app
        .users()
        .await
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                email: "TAKEN@example.com".into(),
                ..Default::default()
            }),
            update_mask: mask(&["email"]),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::AlreadyExists, "EMAIL_ALREADY_EXISTS");
}

#[api_test]
async fn a_deleted_user_is_not_found_everywhere_and_its_email_can_be_reused() {
    let app = TestApp::spawn().await;
    let user = app.create_user("gone@example.com", "gone").await;
    let mut users = app.users().await;
    users
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: user.version,
        })
        .await
        .unwrap();

    let status = users
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    let status = users
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version + 1,
            user: Some(pb::UserPatch::default()),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    let status = users
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: 0,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    let listed = users
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.users.iter().all(|u| u.id != user.id));

    let again = app.create_user("GONE@example.com", "gone").await;
    assert_ne!(again.id, user.id);
    let still_there: bool =
        sqlx::query_scalar("SELECT deleted_at IS NOT NULL FROM users WHERE id = $1")
            .bind(user.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(still_there, "soft delete keeps the row");
}

#[api_test]
async fn delete_user_with_a_stale_version_is_aborted() {
    let app = TestApp::spawn().await;
    let user = app.create_user("del@example.com", "deleter").await;
    let status = app
        .users()
        .await
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: user.version + 5,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::Aborted, "VERSION_CONFLICT");
}

#[api_test]
async fn verify_password_accepts_the_right_password_by_email_or_id() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("pw");
    let user = app
        .create_user_with(pb::CreateUserRequest {
            email: email.clone(),
            username,
            password: "correct horse battery".into(),
            ..Default::default()
        })
        .await;
    let mut users = app.users().await;
    for who in [
        pb::verify_password_request::User::Email(email.to_uppercase()),
        pb::verify_password_request::User::Id(user.id),
    ] {
        let answer = users
            .verify_password(pb::VerifyPasswordRequest {
                user: Some(who),
                password: "correct horse battery".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.valid);
        assert_eq!(answer.user.unwrap().id, user.id);
    }
}

#[api_test]
async fn verify_password_answers_invalid_for_wrong_passwords_unknown_and_passwordless_users() {
    let app = TestApp::spawn().await;
    app.create_user_with(pb::CreateUserRequest {
        email: "pw@example.com".into(),
        username: "pwuser".into(),
        password: "correct horse battery".into(),
        ..Default::default()
    })
    .await;
    let nopw = app.create_user("nopw@example.com", "nopw").await;
    let mut users = app.users().await;
    let cases = [
        (
            pb::verify_password_request::User::Email("pw@example.com".into()),
            "wrong horse battery",
        ),
        (
            pb::verify_password_request::User::Email("nobody@example.com".into()),
            "correct horse battery",
        ),
        (
            pb::verify_password_request::User::Id(nopw.id),
            "anything at all",
        ),
    ];
    for (who, password) in cases {
        let answer = users
            .verify_password(pb::VerifyPasswordRequest {
                user: Some(who.clone()),
                password: password.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.valid, "{who:?}");
        assert!(answer.user.is_none());
    }
}

#[api_test]
async fn verify_password_needs_a_user_and_a_password() {
    let app = TestApp::spawn().await;
    let status = app
        .users()
        .await
        .verify_password(pb::VerifyPasswordRequest {
            user: None,
            password: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["password", "user"]);
}

#[api_test]
async fn a_password_can_be_changed_and_removed_through_update() {
    let app = TestApp::spawn().await;
    let user = app
        .create_user_with(pb::CreateUserRequest {
            email: "chg@example.com".into(),
            username: "changer".into(),
            password: "old password!".into(),
            ..Default::default()
        })
        .await;
    let mut users = app.users().await;
    let changed = users
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                password: "new password!".into(),
                ..Default::default()
            }),
            update_mask: mask(&["password"]),
        })
        .await
        .unwrap()
        .into_inner();
    let verify = |password: &str| pb::VerifyPasswordRequest {
        user: Some(pb::verify_password_request::User::Id(user.id)),
        password: password.into(),
    };
    assert!(
        !users
            .verify_password(verify("old password!"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    assert!(
        users
            .verify_password(verify("new password!"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );

    let removed = users
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: changed.version,
            user: Some(pb::UserPatch::default()),
            update_mask: mask(&["password"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!removed.has_password);
    assert!(
        !users
            .verify_password(verify("new password!"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
}
