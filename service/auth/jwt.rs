//! Caller identity from signed bearer tokens (JWTs) of one issuer.
//!
//! A token is checked in two steps. [`parse_header`] is pure and needs no
//! key: the token's shape and size, its header's `alg` against the allowlist
//! (so `none` and every HMAC algorithm are refused before any key is looked
//! at: no HMAC verified with a public key as its secret) and its `kid`. Then
//! [`JwtVerifier`] looks the `kid` up in the issuer's key set (`jwks.rs`),
//! requires the key to be published for the header's algorithm, and lets
//! `jsonwebtoken` verify the signature first and the claims after it: `exp`,
//! `iss` and `aud` required and matched, `nbf` honoured, both with the
//! configured leeway. The caller is the identity claim (`sub` by default)
//! with the roles of the roles claim (`roles`, an array of strings; absent:
//! no roles).
//!
//! Keys are loaded at start-up (a failure fails the start) and fetched again
//! every `refresh_interval` by [`JwtVerifier::refresh_periodically`]. A token
//! with a `kid` not in the set makes its call fetch the set once more, so a
//! new key is used without a restart; as anyone can send such a token, these
//! fetches are at most one per `min_refresh_interval` (the schedule does not
//! count), and calls in between are refused with TOKEN_KEY_UNKNOWN. A failed
//! fetch keeps the keys there are. Fetches are counted as
//! `jwks_refreshes_total{issuer,trigger,outcome}`, and the unknown-`kid`
//! fetches the limit skipped as `jwks_refreshes_skipped_total{issuer}`.
//!
//! Every refusal is UNAUTHENTICATED with its own reason and a message that
//! says what to fix; neither the message nor the log line quote the token
//! (the log names the reason and the `kid`).

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;
use tokio::{sync::Mutex, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Caller,
    jwks::{self, Key, KeySet, Source},
};
use crate::{
    config::{JwtAlgorithm, JwtSettings},
    error::{Detail, Error, reason},
};

/// The longest token looked at: real ones are a few hundred bytes, and
/// anything longer is not worth decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The longest `kid` accepted.
const MAX_KID_BYTES: usize = 256;
/// Verified tokens remembered (see [`Verified`]); the set is cleared whole
/// when full.
const VERIFIED_CAPACITY: usize = 4096;
/// The longest caller name a token may carry.
const MAX_NAME_BYTES: usize = 256;

/// Whether a bearer token is shaped like a JWT (JWS compact form: three
/// dot-separated segments, the last empty for `alg: none`).
pub fn is_jwt_shaped(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// What the header of a token says, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    pub algorithm: JwtAlgorithm,
    pub kid: String,
}

/// The header fields looked at; the others are left to `jsonwebtoken`
/// (which refuses unknown critical ones). An embedded `jwk` or `jku` is
/// never used: keys come from the configured set only.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Parses and checks the header of `token` without any key: its shape, its
/// `alg` (one of `allowed`; never `none` or HMAC) and its `kid`.
pub fn parse_header(token: &str, allowed: &[JwtAlgorithm]) -> Result<TokenHeader, Error> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed(format!(
            "it is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    let mut segments = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(malformed("it does not have three dot-separated segments"));
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("its header is not unpadded base64url"))?;
    let raw: RawHeader = serde_json::from_slice(&json)
        .map_err(|_| malformed("its header is not a JSON object with a string `alg`"))?;
    let algorithm = match raw.alg.as_str() {
        "RS256" => Some(JwtAlgorithm::RS256),
        "ES256" => Some(JwtAlgorithm::ES256),
        "EdDSA" => Some(JwtAlgorithm::EdDSA),
        _ => None,
    }
    .filter(|a| allowed.contains(a))
    .ok_or_else(|| algorithm_refused(&raw.alg, allowed))?;
    let kid = raw
        .kid
        .filter(|k| !k.is_empty() && k.len() <= MAX_KID_BYTES)
        .ok_or_else(|| {
            malformed(format!(
                "its header names no key: a `kid` of 1 to {MAX_KID_BYTES} bytes is required"
            ))
        })?;
    Ok(TokenHeader { algorithm, kid })
}

fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Error {
    Error::Unauthenticated(Detail::new(reason, message))
}

fn malformed(what: impl fmt::Display) -> Error {
    unauthenticated(
        reason::TOKEN_MALFORMED,
        format!("the bearer token is not a well-formed JWT: {what}"),
    )
}

fn algorithm_refused(alg: &str, allowed: &[JwtAlgorithm]) -> Error {
    // The header's `alg` is the caller's text: quoted only when it is a
    // plausible algorithm name.
    let named = if (1..=16).contains(&alg.len()) && alg.chars().all(|c| c.is_ascii_alphanumeric()) {
        format!("`{alg}`")
    } else {
        "an unsupported algorithm".to_owned()
    };
    unauthenticated(
        reason::TOKEN_ALGORITHM_REFUSED,
        format!(
            "the bearer token is signed with {named}, which this service does not accept: it accepts {} (never `none` or HMAC)",
            jwks::names(allowed)
        ),
    )
}

/// The outcome of checking a token against the keys at hand.
pub enum Verdict {
    Admit(Caller),
    Refuse(Error),
    /// The token names a key (this `kid`) the set does not have (yet):
    /// worth [`JwtVerifier::verify_refreshing`].
    UnknownKey(String),
}

/// Why the key set is fetched: the metric label.
#[derive(Clone, Copy)]
enum Trigger {
    Schedule,
    UnknownKid,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::UnknownKid => "unknown_kid",
        }
    }
}

/// Registers this issuer's key-refresh counters at zero, so an alert on the
/// first failed refresh sees it (`crate::metrics::export_known_series`).
fn export_refresh_series(issuer: &str) {
    for trigger in [Trigger::Schedule, Trigger::UnknownKid] {
        for outcome in ["ok", "failed"] {
            metrics::counter!(
                "jwks_refreshes_total",
                "issuer" => issuer.to_owned(),
                "trigger" => trigger.label(),
                "outcome" => outcome
            )
            .increment(0);
        }
    }
    metrics::counter!("jwks_refreshes_skipped_total", "issuer" => issuer.to_owned()).increment(0);
}

/// Verifies the JWTs of the configured issuer (cheap to clone: shared).
#[derive(Clone)]
pub struct JwtVerifier {
    shared: Arc<Shared>,
}

struct Shared {
    settings: JwtSettings,
    source: Source,
    /// One validation per accepted algorithm (its `algorithms` is that one).
    validations: HashMap<JwtAlgorithm, Validation>,
    /// The keys now: replaced whole by each successful fetch.
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch for an unknown `kid` started; held during that
    /// fetch, so concurrent calls with a new `kid` cause one fetch.
    last_on_demand: Mutex<Option<Instant>>,
    verified: Verified,
}

/// Tokens this verifier admitted, so that a caller sending the same token
/// on every call pays for one signature check, not one per call. Keyed by
/// the token's SHA-256 (the token itself is not kept). An entry holds only
/// while both are true: the key set is the one it was verified with (a
/// fetch that drops or replaces its key sends the token through the full
/// check again), and now is inside the window its `nbf` and `exp` allow,
/// leeway included (outside it the full check answers with the reason).
/// Refusals are never remembered.
#[derive(Default)]
struct Verified(RwLock<HashMap<[u8; 32], VerifiedToken>>);

struct VerifiedToken {
    caller: Caller,
    keys: Arc<KeySet>,
    /// Unix seconds, inclusive.
    from: u64,
    until: u64,
}

impl Verified {
    fn get(&self, digest: &[u8; 32], keys: &Arc<KeySet>, now: u64) -> Option<Caller> {
        let entries = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries.get(digest)?;
        (Arc::ptr_eq(&entry.keys, keys) && (entry.from..=entry.until).contains(&now))
            .then(|| entry.caller.clone())
    }

    fn insert(&self, digest: [u8; 32], token: VerifiedToken) {
        let mut entries = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= VERIFIED_CAPACITY {
            entries.clear();
        }
        entries.insert(digest, token);
    }
}

impl JwtVerifier {
    /// Loads the key set: an error when it cannot be read or has no usable
    /// key, which fails the start.
    pub async fn load(settings: &JwtSettings) -> anyhow::Result<Self> {
        let source = Source::from_settings(settings)?;
        let keys = fetch_keys(&source, &settings.algorithms)
            .await
            .map_err(|e| anyhow::anyhow!("loading the JWT keys (auth.jwt): {e:#}"))?;
        tracing::info!(
            issuer = %settings.issuer,
            %source,
            keys = keys.count(),
            "loaded the JWT keys"
        );
        let validations = settings
            .algorithms
            .iter()
            .map(|&algorithm| (algorithm, validation(settings, algorithm)))
            .collect();
        export_refresh_series(&settings.issuer);
        Ok(Self {
            shared: Arc::new(Shared {
                settings: settings.clone(),
                source,
                validations,
                keys: RwLock::new(Arc::new(keys)),
                last_on_demand: Mutex::new(None),
                verified: Verified::default(),
            }),
        })
    }

    /// Checks `token` with the keys at hand (a token admitted before with
    /// the same keys and still inside its validity window is not checked
    /// again: [`Verified`]).
    pub fn verify(&self, token: &str) -> Verdict {
        let keys = self.keys();
        let digest = super::hash_token(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(caller) = self.shared.verified.get(&digest, &keys, now) {
            return Verdict::Admit(caller);
        }
        let header = match parse_header(token, &self.shared.settings.algorithms) {
            Ok(header) => header,
            Err(error) => return Verdict::Refuse(self.refused(error, None)),
        };
        let Some(key) = keys.get(&header.kid) else {
            return Verdict::UnknownKey(header.kid);
        };
        match self.check(token, &header, key) {
            Ok((caller, (from, until))) => {
                self.shared.verified.insert(
                    digest,
                    VerifiedToken {
                        caller: caller.clone(),
                        keys: keys.clone(),
                        from,
                        until,
                    },
                );
                Verdict::Admit(caller)
            }
            Err(error) => Verdict::Refuse(self.refused(error, Some(&header.kid))),
        }
    }

    /// Checks `token`, fetching the key set first when it names an unknown
    /// key (at most once per `min_refresh_interval`).
    pub async fn verify_refreshing(&self, token: &str) -> Result<Caller, Error> {
        match self.verify(token) {
            Verdict::Admit(caller) => return Ok(caller),
            Verdict::Refuse(error) => return Err(error),
            Verdict::UnknownKey(_) => {}
        }
        self.refresh_for_unknown_kid().await;
        match self.verify(token) {
            Verdict::Admit(caller) => Ok(caller),
            Verdict::Refuse(error) => Err(error),
            Verdict::UnknownKey(kid) => {
                let error = unauthenticated(
                    reason::TOKEN_KEY_UNKNOWN,
                    format!(
                        "the bearer token names a key (`kid`) that is not in the key set of issuer {}: use a token signed with a current key of that issuer",
                        self.shared.settings.issuer
                    ),
                );
                Err(self.refused(error, Some(&kid)))
            }
        }
    }

    /// Fetches the key set every `refresh_interval` until `stopping`.
    pub async fn refresh_periodically(self, stopping: CancellationToken) {
        let every = self.shared.settings.refresh_interval;
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            tokio::select! {
                () = stopping.cancelled() => return,
                () = self.refresh(Trigger::Schedule) => {}
            }
        }
    }

    fn keys(&self) -> Arc<KeySet> {
        self.shared
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `error`, logged with its reason and the token's `kid` only.
    fn refused(&self, error: Error, kid: Option<&str>) -> Error {
        if let Error::Unauthenticated(detail) = &error {
            tracing::info!(
                reason = detail.reason,
                kid = kid.map(|k| k.chars().take(64).collect::<String>()),
                "bearer token refused"
            );
        }
        error
    }

    /// Fetches the key set for a call with an unknown `kid`, unless one
    /// such fetch started within `min_refresh_interval`; whether it did.
    async fn refresh_for_unknown_kid(&self) -> bool {
        let mut last = self.shared.last_on_demand.lock().await;
        let min = self.shared.settings.min_refresh_interval;
        if last.is_some_and(|at| at.elapsed() < min) {
            metrics::counter!(
                "jwks_refreshes_skipped_total",
                "issuer" => self.shared.settings.issuer.clone()
            )
            .increment(1);
            return false;
        }
        *last = Some(Instant::now());
        self.refresh(Trigger::UnknownKid).await;
        true
    }

    async fn refresh(&self, trigger: Trigger) {
        let issuer = &self.shared.settings.issuer;
        let outcome = match fetch_keys(&self.shared.source, &self.shared.settings.algorithms).await
        {
            Ok(keys) => {
                tracing::debug!(
                    %issuer,
                    keys = keys.count(),
                    trigger = trigger.label(),
                    "refreshed the JWT keys"
                );
                *self
                    .shared
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
                "ok"
            }
            Err(e) => {
                tracing::warn!(
                    %issuer,
                    source = %self.shared.source,
                    error = format!("{e:#}"),
                    trigger = trigger.label(),
                    "could not refresh the JWT keys; keeping the ones loaded"
                );
                "failed"
            }
        };
        metrics::counter!(
            "jwks_refreshes_total",
            "issuer" => issuer.clone(),
            "trigger" => trigger.label(),
            "outcome" => outcome
        )
        .increment(1);
    }

    /// The signature, then the claims, then the caller they name, with the
    /// Unix seconds from and until which its time claims admit it (leeway
    /// included).
    fn check(
        &self,
        token: &str,
        header: &TokenHeader,
        key: &Key,
    ) -> Result<(Caller, (u64, u64)), Error> {
        let settings = &self.shared.settings;
        if key.algorithm != header.algorithm {
            return Err(unauthenticated(
                reason::TOKEN_ALGORITHM_REFUSED,
                format!(
                    "the bearer token says {:?}, but its key is published for {:?}: sign with the key's algorithm",
                    header.algorithm, key.algorithm
                ),
            ));
        }
        let validation = &self.shared.validations[&header.algorithm];
        let claims =
            jsonwebtoken::decode::<HashMap<String, Value>>(token, &key.decoding, validation)
                .map_err(|e| claims_error(e.kind(), settings))?
                .claims;
        let caller = caller_from(&claims, settings)?;
        // `exp` is required and was checked; `nbf` is optional.
        let seconds = |claim: &str| claims.get(claim).and_then(Value::as_f64);
        let leeway = settings.leeway.as_secs();
        let from = seconds("nbf").map_or(0, |nbf| (nbf.ceil() as u64).saturating_sub(leeway));
        let until = seconds("exp").map_or(0, |exp| (exp.floor() as u64).saturating_add(leeway));
        Ok((caller, (from, until)))
    }
}

fn validation(settings: &JwtSettings, algorithm: JwtAlgorithm) -> Validation {
    let mut validation = Validation::new(Algorithm::from(algorithm));
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&[&settings.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = settings.leeway.as_secs();
    validation
}

async fn fetch_keys(source: &Source, allowed: &[JwtAlgorithm]) -> anyhow::Result<KeySet> {
    let document = source.fetch().await?;
    KeySet::parse(&document, allowed).map_err(|e| anyhow::anyhow!("{source}: {e:#}"))
}

/// A `jsonwebtoken` refusal, as the caller should read it.
fn claims_error(kind: &ErrorKind, settings: &JwtSettings) -> Error {
    match kind {
        ErrorKind::ExpiredSignature => unauthenticated(
            reason::TOKEN_EXPIRED,
            "the bearer token has expired (`exp`): get a new one from the issuer",
        ),
        ErrorKind::ImmatureSignature => unauthenticated(
            reason::TOKEN_NOT_YET_VALID,
            "the bearer token is not valid yet (`nbf` is in the future): check the clocks of the issuer and this caller",
        ),
        ErrorKind::InvalidAudience => unauthenticated(
            reason::TOKEN_AUDIENCE_MISMATCH,
            format!(
                "the bearer token is not meant for this service: ask the issuer for a token with audience (`aud`) {:?}",
                settings.audience
            ),
        ),
        ErrorKind::InvalidIssuer => unauthenticated(
            reason::TOKEN_ISSUER_MISMATCH,
            format!(
                "the bearer token comes from another issuer: this service accepts tokens issued (`iss`) by {:?}",
                settings.issuer
            ),
        ),
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => unauthenticated(
            reason::TOKEN_SIGNATURE_INVALID,
            "the bearer token's signature does not verify with the issuer's key it names: it was altered or signed with another key",
        ),
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            algorithm_refused("", &settings.algorithms)
        }
        ErrorKind::MissingRequiredClaim(claim) => malformed(format!(
            "it lacks the required claim `{}`",
            claim_name(claim)
        )),
        ErrorKind::InvalidClaimFormat(claim) => malformed(format!(
            "its claim `{}` has the wrong type",
            claim_name(claim)
        )),
        _ => malformed("its payload or signature is not valid base64url JSON"),
    }
}

/// Only the registered claim names `jsonwebtoken` reports are quoted.
fn claim_name(claim: &str) -> &str {
    match claim {
        "exp" | "nbf" | "iss" | "aud" | "sub" => claim,
        _ => "?",
    }
}

/// The caller the verified claims name.
fn caller_from(claims: &HashMap<String, Value>, settings: &JwtSettings) -> Result<Caller, Error> {
    let name = claims
        .get(&settings.identity_claim)
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= MAX_NAME_BYTES && !n.contains(char::is_control))
        .ok_or_else(|| {
            malformed(format!(
                "it has no claim `{}` naming the caller (a string of 1 to {MAX_NAME_BYTES} bytes)",
                settings.identity_claim
            ))
        })?;
    let roles = match claims.get(&settings.roles_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(roles)) => roles
            .iter()
            .map(|r| r.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| roles_malformed(settings))?,
        Some(_) => return Err(roles_malformed(settings)),
    };
    Ok(Caller::new(name, &roles))
}

fn roles_malformed(settings: &JwtSettings) -> Error {
    malformed(format!(
        "its claim `{}` must be an array of role names (strings)",
        settings.roles_claim
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const ALL: &[JwtAlgorithm] = &JwtAlgorithm::ALL;

    fn token_with_header(header: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(header), b64(r#"{"sub":"x"}"#))
    }

    fn reason_of(error: Error) -> &'static str {
        match error {
            Error::Unauthenticated(detail) => detail.reason,
            other => panic!("not UNAUTHENTICATED: {other:?}"),
        }
    }

    #[test]
    fn a_header_with_an_allowed_algorithm_and_a_kid_parses() {
        let header =
            parse_header(&token_with_header(r#"{"alg":"ES256","kid":"k1"}"#), ALL).unwrap();
        assert_eq!(
            header,
            TokenHeader {
                algorithm: JwtAlgorithm::ES256,
                kid: "k1".into()
            }
        );
    }

    #[test]
    fn none_hmac_and_unlisted_algorithms_are_refused() {
        for alg in ["none", "HS256", "HS512", "RS384", "PS256", "es256"] {
            let token = token_with_header(&format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
            let error = parse_header(&token, ALL).unwrap_err();
            assert_eq!(reason_of(error), reason::TOKEN_ALGORITHM_REFUSED, "{alg}");
        }
        let rs256_only = parse_header(
            &token_with_header(r#"{"alg":"ES256","kid":"k1"}"#),
            &[JwtAlgorithm::RS256],
        );
        assert_eq!(
            reason_of(rs256_only.unwrap_err()),
            reason::TOKEN_ALGORITHM_REFUSED
        );
    }

    #[test]
    fn a_refused_algorithm_is_quoted_only_when_it_looks_like_a_name() {
        let token = token_with_header(r#"{"alg":"<script>alert(1)</script>","kid":"k1"}"#);
        let Error::Unauthenticated(detail) = parse_header(&token, ALL).unwrap_err() else {
            panic!("not UNAUTHENTICATED");
        };
        assert!(!detail.message.contains("script"), "{}", detail.message);
    }

    #[test]
    fn malformed_tokens_are_refused_as_malformed() {
        let cases = [
            "a.b".to_owned(),
            "a.b.c.d".to_owned(),
            "!!!.b.c".to_owned(),
            token_with_header("not json"),
            token_with_header(r#"{"kid":"k1"}"#),
            token_with_header(r#"{"alg":"ES256"}"#),
            token_with_header(r#"{"alg":"ES256","kid":""}"#),
            "a".repeat(MAX_TOKEN_BYTES + 1),
        ];
        for token in cases {
            let error = parse_header(&token, ALL).unwrap_err();
            assert_eq!(reason_of(error), reason::TOKEN_MALFORMED, "{token:.40}");
        }
    }

    #[test]
    fn jwt_shaped_tokens_have_exactly_two_dots() {
        for (token, shaped) in [
            ("a.b.c", true),
            ("a.b.", true),
            ("dg_abcdef", false),
            ("a.b.c.d", false),
        ] {
            assert_eq!(is_jwt_shaped(token), shaped, "{token}");
        }
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            issuer: "https://idp.example.com/".into(),
            audience: "datagate".into(),
            jwks_file: Some("/dev/null".into()),
            jwks_url: None,
            jwks_ca_file: None,
            algorithms: ALL.to_vec(),
            leeway: Duration::from_secs(30),
            identity_claim: "sub".into(),
            roles_claim: "roles".into(),
            refresh_interval: Duration::ZERO,
            min_refresh_interval: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_for_unknown_kids_are_at_most_one_per_min_refresh_interval() {
        let dir = std::env::temp_dir().join(format!("datagate-jwt-unit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwks.json");
        // RFC 8037's example Ed25519 public key.
        std::fs::write(
            &file,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"a"}]}"#,
        )
        .unwrap();
        let mut settings = settings();
        settings.jwks_file = Some(file);
        let verifier = JwtVerifier::load(&settings).await.unwrap();

        let first = verifier.refresh_for_unknown_kid().await;
        tokio::time::advance(Duration::from_secs(29)).await;
        let within = verifier.refresh_for_unknown_kid().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let after = verifier.refresh_for_unknown_kid().await;

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(first, "the first unknown kid fetches");
        assert!(!within, "29 s later: skipped");
        assert!(after, "30 s later: fetches again");
    }

    fn claims(json: Value) -> HashMap<String, Value> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_caller_is_the_identity_claim_with_the_roles_claim() {
        let caller = caller_from(
            &claims(serde_json::json!({"sub": "billing", "roles": ["writer", "reader"]})),
            &settings(),
        )
        .unwrap();
        assert_eq!(caller.name(), "billing");
        assert!(caller.has_role("writer") && caller.has_role("reader"));

        let no_roles =
            caller_from(&claims(serde_json::json!({"sub": "billing"})), &settings()).unwrap();
        assert!(!no_roles.has_role("reader"));

        let mut custom = settings();
        custom.identity_claim = "client_id".into();
        custom.roles_claim = "scp".into();
        let caller = caller_from(
            &claims(serde_json::json!({"sub": "u", "client_id": "orders", "scp": ["admin"]})),
            &custom,
        )
        .unwrap();
        assert_eq!(caller.name(), "orders");
        assert!(caller.has_role("admin"));
    }

    #[test]
    fn a_missing_name_or_roles_that_are_not_strings_are_malformed() {
        for json in [
            serde_json::json!({"roles": ["reader"]}),
            serde_json::json!({"sub": ""}),
            serde_json::json!({"sub": 42}),
            serde_json::json!({"sub": "x", "roles": "admin"}),
            serde_json::json!({"sub": "x", "roles": ["admin", 1]}),
        ] {
            let error = caller_from(&claims(json.clone()), &settings()).unwrap_err();
            assert_eq!(reason_of(error), reason::TOKEN_MALFORMED, "{json}");
        }
    }
}
