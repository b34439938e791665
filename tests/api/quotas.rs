//! Per-caller quotas: past its requests per second a caller is answered
//! RESOURCE_EXHAUSTED `QUOTA_EXCEEDED` with a RetryInfo, and other callers
//! are not affected.

use std::time::Duration;

use datagate::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{TestApp, api_test, assert_error};

#[api_test]
async fn a_caller_past_its_quota_is_refused_with_retry_info_and_others_are_not() {
    // Readers: a bucket of two calls, refilled once a minute, so the test
    // does not depend on how fast it runs. Writers: unlimited. The reader
    // is this test's own (metrics are per process, shared by the tests).
    let name = format!("quota-reader-{}", uuid::Uuid::new_v4().simple());
    let (token, entry) = datagate::auth::new_token(&name, &["reader".to_owned()]).unwrap();
    let app = TestApp::spawn_with(|settings| {
        settings.quotas.reader = 1.0 / 60.0;
        settings.quotas.burst = Duration::from_secs(120);
        settings.auth.tokens.push(entry.parse().unwrap());
    })
    .await;
    let reader = app.users_as(Some(&token)).await;
    let get = |mut client: crate::support::clients::UserClient| async move {
        client
            .get_user(pb::GetUserRequest {
                id: 424_242,
                ..Default::default()
            })
            .await
    };
    for _ in 0..2 {
        let status = get(reader.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "admitted: {status:?}");
    }

    let refused = get(reader.clone()).await.unwrap_err();
    assert_error(&refused, Code::ResourceExhausted, "QUOTA_EXCEEDED");
    assert!(refused.message().contains(&name), "{refused:?}");
    let retry = refused
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a RetryInfo delay");
    assert!(
        retry > Duration::from_secs(1) && retry <= Duration::from_secs(60),
        "the next token is up to a minute away: {retry:?}"
    );

    // Another caller's bucket is its own.
    let writer = app.users_as(Some(&app.writer_token)).await;
    for _ in 0..5 {
        let status = get(writer.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }

    let count = |outcome: &'static str| {
        let (app, name) = (&app, &name);
        async move {
            app.metric(
                "quota_requests_total",
                &[("caller", name), ("outcome", outcome)],
            )
            .await
        }
    };
    assert_eq!(count("admitted").await, 2.0);
    assert_eq!(count("exceeded").await, 1.0);
}

#[api_test]
async fn a_callers_own_quota_overrides_its_roles() {
    let app = TestApp::spawn_with(|settings| {
        settings.quotas.burst = Duration::from_secs(60);
        settings
            .quotas
            .callers
            .insert("test-writer".into(), 1.0 / 60.0);
    })
    .await;
    let mut writer = app.users_as(Some(&app.writer_token)).await;
    let request = || pb::GetUserRequest {
        id: 424_242,
        ..Default::default()
    };
    assert_eq!(
        writer.get_user(request()).await.unwrap_err().code(),
        Code::NotFound
    );
    let refused = writer.get_user(request()).await.unwrap_err();
    assert_error(&refused, Code::ResourceExhausted, "QUOTA_EXCEEDED");
    // The admin, on its role's (unlimited, here) rate, goes on.
    let mut admin = app.users().await;
    assert_eq!(
        admin.get_user(request()).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        admin.get_user(request()).await.unwrap_err().code(),
        Code::NotFound
    );
}
