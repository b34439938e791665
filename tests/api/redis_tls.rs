//! The cache over `rediss://` with an ACL user, against the TLS-only Redis
//! servers of the development environment (`REDIS_TLS_*`): reads are cached
//! on one node and on a cluster that also asks for a client certificate,
//! and with an ACL user allowed only the commands the README lists; with a
//! wrong password, or a CA that did not sign the server's
//! certificate, the cache fails open: reads answer from PostgreSQL, and the
//! log says why without the password.

use datagate::{config::RedisMode, proto::v1 as pb};

use crate::support::{
    TestApp, api_test,
    observe::{Logs, with_request_id},
    redis::{RedisTls, redis_tls},
    rename, unique,
};

async fn get_user(app: &TestApp, id: i64) -> pb::User {
    app.users()
        .await
        .get_user(pb::GetUserRequest {
            id,
            ..Default::default()
        })
        .await
        .expect("GetUser answers")
        .into_inner()
}

/// Renames the user behind the service's back: only a cache miss sees it.
async fn rename_behind_the_cache(app: &TestApp, id: i64) -> String {
    let name = format!("renamed behind the cache {id}");
    sqlx::query("UPDATE users SET display_name = $2 WHERE id = $1")
        .bind(id)
        .bind(&name)
        .execute(&app.db)
        .await
        .unwrap();
    name
}

/// The app on the single TLS node with the dev CA and the ACL user, as
/// `customize` changes them; and the real ones, for checking.
async fn spawn_on_tls(customize: impl FnOnce(&mut RedisTls)) -> (TestApp, RedisTls) {
    let mut tls = redis_tls();
    customize(&mut tls);
    let app = TestApp::spawn_with(|s| {
        s.redis.url = tls.url.into();
        s.redis.tls_ca_file = tls.ca_file;
        s.redis.username = tls.username;
        s.redis.password = tls.password.into();
        // The circuit stays closed, so every read of the failing tests
        // tries Redis and logs why it could not use it (the probes of the
        // readiness watcher count as failures too).
        s.redis.breaker_failures = 1_000_000;
    })
    .await;
    (app, redis_tls())
}

#[api_test]
async fn over_tls_with_an_acl_user_a_second_read_is_a_cache_hit() {
    let (app, tls) = spawn_on_tls(|_| {}).await;
    assert_a_second_read_is_a_hit(&app, "tls", async |key| tls.get(&key).await).await;
}

/// A user read twice through `app`: the miss fills the TLS Redis
/// (`stored` reads the key there) and the second read is a hit (a change
/// made behind the cache is not seen). The key read.
async fn assert_a_second_read_is_a_hit(
    app: &TestApp,
    tag: &str,
    stored: impl AsyncFnOnce(String) -> Option<Vec<u8>>,
) -> String {
    let (email, username) = unique(tag);
    let user = app.create_user(&email, &username).await;

    assert_eq!(get_user(app, user.id).await, user);
    let key = app.cache_key("user", user.id);
    let value = stored(key.clone()).await;
    assert_eq!(
        value.as_deref().and_then(|v| v.first()),
        Some(&b'V'),
        "the miss filled the TLS Redis"
    );
    rename_behind_the_cache(app, user.id).await;

    assert_eq!(
        get_user(app, user.id).await.display_name,
        user.display_name,
        "the second read is a hit"
    );
    key
}

#[api_test]
async fn over_tls_a_cluster_asking_for_a_client_certificate_caches_reads() {
    let tls = redis_tls();
    let app = TestApp::spawn_with(|s| {
        s.redis.mode = RedisMode::Cluster;
        s.redis.url = tls.cluster_urls.clone().into();
        s.redis.tls_ca_file = tls.ca_file.clone();
        s.redis.tls_cert_file = tls.client_cert.clone();
        s.redis.tls_key_file = tls.client_key.clone();
        s.redis.username = tls.username.clone();
        s.redis.password = tls.password.clone().into();
    })
    .await;
    let key =
        assert_a_second_read_is_a_hit(&app, "tlscluster", async |key| tls.cluster_get(&key).await)
            .await;
    assert!(key.contains('{'), "a hash-tagged cluster key: {key}");
}

/// The least-privileged ACL user the README documents, on this test's
/// prefix: if the cache sent a command it does not list, the miss would
/// not fill, or the write's invalidation would not reach Redis and the
/// last read would be stale.
#[api_test]
async fn an_acl_user_with_only_the_documented_commands_caches_and_invalidates() {
    let tls = redis_tls();
    let user_name = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let prefix = user_name.clone();
    let mut admin = tls.connection().await;
    let mut setuser = vec![
        "SETUSER".to_owned(),
        user_name.clone(),
        "on".into(),
        format!(">{password}"),
        "resetkeys".into(),
        format!("~{prefix}:*"),
        "resetchannels".into(),
    ];
    setuser.extend(
        "-@all +get +mget +set +del +unlink +incr +pexpire +scan +ping +evalsha +script|load +cluster|slots"
            .split(' ')
            .map(str::to_owned),
    );
    let _: () = deadpool_redis::redis::cmd("ACL")
        .arg(&setuser)
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let app = TestApp::spawn_with(|s| {
        s.redis.url = tls.url.clone().into();
        s.redis.tls_ca_file = tls.ca_file.clone();
        s.redis.username = user_name.clone();
        s.redis.password = password.clone().into();
        s.redis.key_prefix = prefix;
    })
    .await;
    let (email, username) = unique("acl");
    let user = app.create_user(&email, &username).await;
    assert_eq!(get_user(&app, user.id).await, user);
    assert!(
        tls.get(&app.cache_key("user", user.id)).await.is_some(),
        "the miss filled"
    );

    let renamed = app
        .users()
        .await
        .update_user(rename(&user, "renamed through the API"))
        .await
        .expect("UpdateUser")
        .into_inner();
    assert_eq!(get_user(&app, user.id).await, renamed, "invalidated");
    rename_behind_the_cache(&app, user.id).await;
    assert_eq!(get_user(&app, user.id).await, renamed, "refilled, a hit");

    drop(app);
    let _: u64 = deadpool_redis::redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user_name)
        .query_async(&mut admin)
        .await
        .expect("ACL DELUSER");
}

/// Reads a user twice with a row change between them, and returns the
/// second read's log lines: with the cache failing open both reads come
/// from PostgreSQL, so the second sees the change.
async fn reads_fail_open(app: &TestApp, logs: &Logs) -> Vec<serde_json::Value> {
    let (email, username) = unique("failopen");
    let user = app.create_user(&email, &username).await;
    assert_eq!(get_user(app, user.id).await, user);
    let renamed = rename_behind_the_cache(app, user.id).await;

    let (request, request_id) = with_request_id(pb::GetUserRequest {
        id: user.id,
        ..Default::default()
    });
    let read = app
        .users()
        .await
        .get_user(request)
        .await
        .expect("GetUser answers without the cache")
        .into_inner();

    assert_eq!(read.display_name, renamed, "read from PostgreSQL");
    logs.of_finished_request(&request_id).await
}

/// The line saying the cache was not usable, from the call's lines.
fn unavailable_error(lines: &[serde_json::Value]) -> String {
    lines
        .iter()
        .find(|l| l["message"] == "cache unavailable; using PostgreSQL")
        .and_then(|l| l["error"].as_str())
        .unwrap_or_else(|| panic!("no 'cache unavailable' line in {lines:#?}"))
        .to_owned()
}

#[api_test]
async fn with_a_wrong_password_the_cache_fails_open_and_says_so_without_the_password() {
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let logs = Logs::capture();
    let (app, tls) = spawn_on_tls(|tls| tls.password = wrong.clone()).await;
    let errors_before = app.metric("cache_errors_total", &[("op", "mget")]).await;

    let lines = reads_fail_open(&app, &logs).await;

    let error = unavailable_error(&lines);
    assert!(
        error.to_lowercase().contains("authentication"),
        "the log names the failed login: {error}"
    );
    let errors_after = app.metric("cache_errors_total", &[("op", "mget")]).await;
    assert!(
        errors_after > errors_before,
        "{errors_before} -> {errors_after}"
    );
    for secret in [&wrong, &tls.password] {
        assert!(
            !logs.text().iter().any(|l| l.contains(secret.as_str())),
            "a password reached the log"
        );
    }
}

#[api_test]
async fn with_a_ca_that_did_not_sign_the_server_certificate_the_cache_fails_open() {
    let dir = std::env::temp_dir().join(format!("dgtest-ca-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let other_ca = dir.join("other-ca.crt");
    let made = tokio::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=a CA the server does not know", "-keyout"])
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .await
        .expect("openssl is installed (scripts/dev-env.sh installs it)");
    assert!(made.status.success(), "{made:?}");
    let logs = Logs::capture();
    let other_ca = other_ca.to_str().unwrap().to_owned();
    let (app, _) = spawn_on_tls(|tls| tls.ca_file = other_ca).await;

    let lines = reads_fail_open(&app, &logs).await;

    let error = unavailable_error(&lines);
    assert!(
        error.contains("certificate"),
        "the log names the untrusted certificate: {error}"
    );
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
}
