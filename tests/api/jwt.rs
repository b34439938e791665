//! Signed bearer tokens (JWTs): real tokens signed in the test with keys
//! made in the test, verified by the app against a JWKS file the test
//! writes (and rewrites, to rotate keys). Each test has its own issuer, so
//! the refresh counters on `/metrics` are its own.

use std::path::PathBuf;

use datagate::{
    config::{JwtAlgorithm, JwtSettings, Settings},
    error::reason,
    proto::v1 as pb,
    startup::Application,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use ring::{
    rand::{SecureRandom as _, SystemRandom},
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair},
};
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use crate::support::{
    TestApp, api_test, assert_error,
    observe::{Logs, sample, with_request_id},
    unique,
};

const AUDIENCE: &str = "datagate";

/// A signing key of the test's issuer and its public JWK.
struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl SigningKey {
    fn es256(kid: &str) -> Self {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        Self::new(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
    }

    fn ed25519(kid: &str) -> Self {
        // PKCS#8 v1 of a random seed: the form `jsonwebtoken` reads.
        let mut der = hex_bytes("302e020100300506032b657004220420");
        let mut seed = [0u8; 32];
        SystemRandom::new().fill(&mut seed).unwrap();
        der.extend_from_slice(&seed);
        Self::new(kid, Algorithm::EdDSA, EncodingKey::from_ed_der(&der))
    }

    /// RS256 with a key made once and kept as a fixture (ring cannot make
    /// RSA keys, and making one here would cost seconds in a debug build);
    /// it signs only these tests' tokens.
    fn rs256(kid: &str) -> Self {
        let pkcs1 = include_bytes!("fixtures/jwt-rs256-test-key.der");
        Self::new(kid, Algorithm::RS256, EncodingKey::from_rsa_der(pkcs1))
    }

    fn new(kid: &str, algorithm: Algorithm, encoding: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&encoding, algorithm).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.to_owned(),
            algorithm,
            encoding,
            jwk,
        }
    }

    /// A token over `claims`, signed by this key and naming it.
    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// The test's issuer: its name and its JWKS file.
struct Issuer {
    name: String,
    dir: PathBuf,
}

impl Issuer {
    fn publishing(keys: &[&SigningKey]) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("datagate-jwt-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let issuer = Self {
            name: format!("https://idp-{tag}.test/"),
            dir,
        };
        issuer.publish(keys);
        issuer
    }

    fn jwks_file(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    /// Replaces the JWKS with these keys (written whole, then renamed, so
    /// the app never reads half a file).
    fn publish(&self, keys: &[&SigningKey]) {
        let set = json!({ "keys": keys.iter().map(|k| &k.jwk).collect::<Vec<_>>() });
        let partial = self.dir.join("jwks.json.partial");
        std::fs::write(&partial, serde_json::to_vec(&set).unwrap()).unwrap();
        std::fs::rename(&partial, self.jwks_file()).unwrap();
    }

    /// The settings of an app that trusts this issuer; no scheduled refresh
    /// and an hour between on-demand ones, so only the tests' tokens cause
    /// fetches.
    fn settings(&self) -> JwtSettings {
        JwtSettings {
            issuer: self.name.clone(),
            audience: AUDIENCE.into(),
            jwks_file: Some(self.jwks_file()),
            jwks_url: None,
            jwks_ca_file: None,
            algorithms: vec![
                JwtAlgorithm::RS256,
                JwtAlgorithm::ES256,
                JwtAlgorithm::EdDSA,
            ],
            leeway: std::time::Duration::from_secs(30),
            identity_claim: "sub".into(),
            roles_claim: "roles".into(),
            refresh_interval: std::time::Duration::ZERO,
            min_refresh_interval: std::time::Duration::from_secs(3600),
        }
    }

    /// Claims this issuer would put in a token for `sub`, valid for 10 min.
    fn claims(&self, sub: &str) -> serde_json::Value {
        json!({
            "iss": self.name,
            "aud": AUDIENCE,
            "sub": sub,
            "roles": ["writer"],
            "iat": now(),
            "exp": now() + 600,
        })
    }

    async fn app(&self) -> TestApp {
        let jwt = self.settings();
        TestApp::spawn_with(move |settings| settings.auth.jwt = Some(jwt)).await
    }

    async fn refreshes(&self, app: &TestApp, outcome: &str) -> f64 {
        app.metric(
            "jwks_refreshes_total",
            &[
                ("issuer", &self.name),
                ("trigger", "unknown_kid"),
                ("outcome", outcome),
            ],
        )
        .await
    }

    async fn skipped(&self, app: &TestApp) -> f64 {
        app.metric("jwks_refreshes_skipped_total", &[("issuer", &self.name)])
            .await
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates a user with `token`; the audit log names the caller.
async fn create_user_as(app: &TestApp, token: &str) -> Result<String, Status> {
    let (email, username) = unique("jwt");
    let user = app
        .users_as(Some(token))
        .await
        .create_user(pb::CreateUserRequest {
            email,
            username,
            display_name: "JWT caller".into(),
            password: String::new(),
            status: 0,
        })
        .await?
        .into_inner();
    let (actor,): (String,) =
        sqlx::query_as("SELECT actor FROM audit_log WHERE table_name = 'users' AND record_id = $1")
            .bind(user.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    Ok(actor)
}

/// A call with `token`, expected to be refused with `reason`; the answer
/// quotes no part of the token.
async fn assert_refused(app: &TestApp, token: &str, reason: &str) {
    let status = app
        .users_as(Some(token))
        .await
        .get_user(pb::GetUserRequest {
            id: 1,
            ..Default::default()
        })
        .await
        .expect_err("the token is refused");
    assert_error(&status, Code::Unauthenticated, reason);
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    let said: Vec<&str> = std::iter::once(status.message())
        .chain(info.metadata.values().map(String::as_str))
        .collect();
    for segment in token.split('.').filter(|s| s.len() >= 8) {
        for text in &said {
            assert!(
                !text.contains(segment),
                "{reason}: the answer quotes the token: {text}"
            );
        }
    }
}

#[api_test]
async fn a_valid_token_is_admitted_as_its_subject() {
    let es256 = SigningKey::es256("es-1");
    let ed25519 = SigningKey::ed25519("ed-1");
    let rs256 = SigningKey::rs256("rs-1");
    let issuer = Issuer::publishing(&[&es256, &ed25519, &rs256]);
    let app = issuer.app().await;

    let by_es256 = create_user_as(&app, &es256.sign(&issuer.claims("billing-service"))).await;
    let by_ed25519 = create_user_as(&app, &ed25519.sign(&issuer.claims("orders-service"))).await;
    let by_rs256 = create_user_as(&app, &rs256.sign(&issuer.claims("checkout-service"))).await;

    assert_eq!(by_es256.unwrap(), "billing-service");
    assert_eq!(by_ed25519.unwrap(), "orders-service");
    assert_eq!(by_rs256.unwrap(), "checkout-service");
}

#[api_test]
async fn static_tokens_still_authenticate_beside_jwt() {
    let key = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;

    let actor = create_user_as(&app, &app.token).await;

    assert_eq!(actor.unwrap(), "test-admin");
    assert_refused(
        &app,
        "dg_not-a-configured-token",
        reason::INVALID_CREDENTIALS,
    )
    .await;
}

#[api_test]
async fn expired_and_not_yet_valid_tokens_are_refused_beyond_the_leeway() {
    let key = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;
    let mut expired = issuer.claims("svc");
    expired["exp"] = json!(now() - 120);
    let mut early = issuer.claims("svc");
    early["nbf"] = json!(now() + 600);
    let mut within_leeway = issuer.claims("svc");
    within_leeway["exp"] = json!(now() - 5);

    assert_refused(&app, &key.sign(&expired), reason::TOKEN_EXPIRED).await;
    assert_refused(&app, &key.sign(&early), reason::TOKEN_NOT_YET_VALID).await;
    assert_eq!(
        create_user_as(&app, &key.sign(&within_leeway))
            .await
            .unwrap(),
        "svc"
    );
}

#[api_test]
async fn a_token_for_another_audience_or_from_another_issuer_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;
    let mut other_audience = issuer.claims("svc");
    other_audience["aud"] = json!("another-service");
    let mut other_issuer = issuer.claims("svc");
    other_issuer["iss"] = json!("https://elsewhere.test/");
    let mut no_audience = issuer.claims("svc");
    no_audience.as_object_mut().unwrap().remove("aud");

    assert_refused(
        &app,
        &key.sign(&other_audience),
        reason::TOKEN_AUDIENCE_MISMATCH,
    )
    .await;
    assert_refused(
        &app,
        &key.sign(&other_issuer),
        reason::TOKEN_ISSUER_MISMATCH,
    )
    .await;
    assert_refused(&app, &key.sign(&no_audience), reason::TOKEN_MALFORMED).await;
}

#[api_test]
async fn a_token_signed_by_another_key_under_a_trusted_kid_is_refused() {
    let trusted = SigningKey::es256("es-1");
    let impostor = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&trusted]);
    let app = issuer.app().await;

    assert_refused(
        &app,
        &impostor.sign(&issuer.claims("svc")),
        reason::TOKEN_SIGNATURE_INVALID,
    )
    .await;
}

#[api_test]
async fn a_refusal_is_logged_with_its_reason_and_kid_and_never_the_token() {
    let trusted = SigningKey::es256("es-1");
    let impostor = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&trusted]);
    let app = issuer.app().await;
    let token = impostor.sign(&issuer.claims("svc"));
    let logs = Logs::capture();

    let (request, request_id) = with_request_id(pb::GetUserRequest {
        id: 1,
        ..Default::default()
    });
    let status = app
        .users_as(Some(&token))
        .await
        .get_user(request)
        .await
        .expect_err("the token is refused");

    assert_error(
        &status,
        Code::Unauthenticated,
        reason::TOKEN_SIGNATURE_INVALID,
    );
    let lines = logs.of_finished_request(&request_id).await;
    let refusal = lines
        .iter()
        .find(|l| l["message"] == "bearer token refused")
        .unwrap_or_else(|| panic!("no refusal line in {lines:?}"));
    assert_eq!(refusal["reason"], reason::TOKEN_SIGNATURE_INVALID);
    assert_eq!(refusal["kid"], "es-1");
    for line in logs.text() {
        for segment in token.split('.') {
            assert!(
                !line.contains(segment),
                "a log line quotes the token: {line}"
            );
        }
    }
}

#[api_test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;
    let b64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let claims = serde_json::to_vec(&issuer.claims("svc")).unwrap();
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"es-1"}"#),
        b64(&claims)
    );
    // The classic confusion: HMAC keyed with the public key everyone has.
    let public_key = serde_json::to_vec(&key.jwk).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("es-1".into());
    let hmac = jsonwebtoken::encode(
        &header,
        &issuer.claims("svc"),
        &EncodingKey::from_secret(&public_key).unwrap(),
    )
    .unwrap();

    assert_refused(&app, &unsigned, reason::TOKEN_ALGORITHM_REFUSED).await;
    assert_refused(&app, &hmac, reason::TOKEN_ALGORITHM_REFUSED).await;
}

#[api_test]
async fn the_key_refresh_counters_are_exported_at_zero_from_the_start() {
    let key = SigningKey::es256("es-zero");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;

    let metrics = app.metrics().await;
    let mut absent = Vec::new();
    for trigger in ["schedule", "unknown_kid"] {
        for outcome in ["ok", "failed"] {
            let labels = [
                ("issuer", issuer.name.as_str()),
                ("trigger", trigger),
                ("outcome", outcome),
            ];
            if sample(&metrics, "jwks_refreshes_total", &labels) != Some(0.0) {
                absent.push(format!("jwks_refreshes_total{labels:?}"));
            }
        }
    }
    if sample(
        &metrics,
        "jwks_refreshes_skipped_total",
        &[("issuer", issuer.name.as_str())],
    ) != Some(0.0)
    {
        absent.push("jwks_refreshes_skipped_total".to_owned());
    }
    assert!(absent.is_empty(), "not at zero: {absent:?}");
}

#[api_test]
async fn a_token_admitted_before_is_refused_once_it_expires_or_its_key_is_withdrawn() {
    let first = SigningKey::es256("es-first");
    let second = SigningKey::es256("es-second");
    let issuer = Issuer::publishing(&[&first]);
    let jwt = JwtSettings {
        leeway: std::time::Duration::ZERO,
        ..issuer.settings()
    };
    let app = TestApp::spawn_with(move |settings| settings.auth.jwt = Some(jwt)).await;

    // Expiry: admitted on every call up to its `exp`, refused after it,
    // though it verified before.
    let mut short = issuer.claims("short-lived");
    short["exp"] = json!(now() + 2);
    let short = first.sign(&short);
    for _ in 0..3 {
        assert_eq!(create_user_as(&app, &short).await.unwrap(), "short-lived");
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_refused(&app, &short, reason::TOKEN_EXPIRED).await;

    // Withdrawal: a token admitted with the first key is refused once the
    // issuer publishes a set without it and the service fetches that set.
    let kept = first.sign(&issuer.claims("kept"));
    assert_eq!(create_user_as(&app, &kept).await.unwrap(), "kept");
    assert_eq!(create_user_as(&app, &kept).await.unwrap(), "kept");
    issuer.publish(&[&second]);
    let by_second = create_user_as(&app, &second.sign(&issuer.claims("new"))).await;
    assert_eq!(
        by_second.unwrap(),
        "new",
        "the unknown kid fetched the new set"
    );
    assert_refused(&app, &kept, reason::TOKEN_KEY_UNKNOWN).await;
}

#[api_test]
async fn a_token_with_an_unknown_kid_is_refused_after_one_fetch_of_the_keys() {
    let key = SigningKey::es256("es-1");
    let stranger = SigningKey::es256("unknown-kid");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;

    assert_refused(
        &app,
        &stranger.sign(&issuer.claims("svc")),
        reason::TOKEN_KEY_UNKNOWN,
    )
    .await;

    assert_eq!(issuer.refreshes(&app, "ok").await, 1.0);
}

#[api_test]
async fn a_key_published_later_is_used_without_a_restart_and_fetches_are_rate_limited() {
    let first = SigningKey::es256("key-1");
    let second = SigningKey::ed25519("key-2");
    let third = SigningKey::es256("key-3");
    let issuer = Issuer::publishing(&[&first]);
    let app = issuer.app().await;
    assert_eq!(
        create_user_as(&app, &first.sign(&issuer.claims("a")))
            .await
            .unwrap(),
        "a"
    );

    // Rotation: the issuer publishes a new key and signs with it.
    issuer.publish(&[&first, &second]);
    let by_second = create_user_as(&app, &second.sign(&issuer.claims("b"))).await;
    assert_eq!(by_second.unwrap(), "b");
    assert_eq!(issuer.refreshes(&app, "ok").await, 1.0);

    // Another new key within min_refresh_interval: no second fetch, so it
    // is not known yet.
    issuer.publish(&[&first, &second, &third]);
    assert_refused(
        &app,
        &third.sign(&issuer.claims("c")),
        reason::TOKEN_KEY_UNKNOWN,
    )
    .await;
    assert_eq!(issuer.refreshes(&app, "ok").await, 1.0);
    assert_eq!(issuer.skipped(&app).await, 1.0);
    // The keys fetched before still verify.
    assert_eq!(
        create_user_as(&app, &second.sign(&issuer.claims("d")))
            .await
            .unwrap(),
        "d"
    );
}

#[api_test]
async fn a_key_set_that_cannot_be_read_again_leaves_the_loaded_keys_in_use() {
    let key = SigningKey::es256("es-1");
    let stranger = SigningKey::es256("unknown-kid");
    let issuer = Issuer::publishing(&[&key]);
    let app = issuer.app().await;
    std::fs::write(issuer.jwks_file(), b"{ not a key set").unwrap();

    assert_refused(
        &app,
        &stranger.sign(&issuer.claims("svc")),
        reason::TOKEN_KEY_UNKNOWN,
    )
    .await;

    assert_eq!(issuer.refreshes(&app, "failed").await, 1.0);
    let actor = create_user_as(&app, &key.sign(&issuer.claims("svc"))).await;
    assert_eq!(actor.unwrap(), "svc");
}

#[api_test]
async fn the_start_fails_when_the_keys_cannot_be_loaded() {
    let key = SigningKey::es256("es-1");
    let issuer = Issuer::publishing(&[&key]);
    let mut jwt = issuer.settings();
    jwt.jwks_file = Some(issuer.dir.join("missing.json"));
    let mut settings = Settings::load_with_overrides(
        None,
        &[
            ("database.url", "postgres://localhost:1/unused"),
            ("server.host", "127.0.0.1"),
            ("server.port", "0"),
            ("metrics.host", "127.0.0.1"),
            ("metrics.port", "0"),
        ],
    )
    .unwrap();
    settings.auth.jwt = Some(jwt);

    let error = Application::build(settings)
        .await
        .err()
        .expect("the start fails");

    let error = format!("{error:#}");
    assert!(error.contains("loading the JWT keys"), "{error}");
    assert!(error.contains("missing.json"), "{error}");
}
