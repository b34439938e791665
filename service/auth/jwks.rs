//! The issuer's public keys: a JWKS (RFC 7517) read from a file or fetched
//! over HTTPS, turned into the verification keys [`jwt`](super::jwt) looks
//! up by `kid`.
//!
//! Only what can verify an accepted algorithm is kept: a key without a
//! `kid`, meant for encryption (`use: enc`), of another type or curve, or
//! marked for an algorithm not allowed is skipped, so a token can never pick
//! an algorithm its key was not published for. Symmetric (`oct`) keys are
//! always skipped: HMAC is never accepted. A set with no usable key is an
//! error, not an empty set: replacing good keys with none would lock every
//! caller out.
//!
//! The HTTPS client is rustls with the ring provider and the webpki roots
//! (as sqlx), one GET per fetch with a time and size bound; redirects are
//! not followed. Errors name the source, never key material.

use std::{collections::HashMap, fmt, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse},
};

use crate::config::{JwtAlgorithm, JwtSettings};

/// The longest a fetch of the key set may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest key set accepted (a JWKS is a few kilobytes).
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One verification key: the algorithm it was published for, and the key.
#[derive(Clone)]
pub struct Key {
    pub algorithm: JwtAlgorithm,
    pub decoding: DecodingKey,
}

/// The usable keys of one JWKS, by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Key>,
}

impl KeySet {
    /// The usable keys of a JWKS document for the `allowed` algorithms.
    pub fn parse(document: &[u8], allowed: &[JwtAlgorithm]) -> anyhow::Result<Self> {
        // serde_json's own message may quote the document: only its position.
        let set: JwkSet = serde_json::from_slice(document).map_err(|e| {
            anyhow!(
                "not a JSON Web Key Set (`{{\"keys\": [...]}}`): invalid at line {}, column {}",
                e.line(),
                e.column()
            )
        })?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.as_deref().filter(|k| !k.is_empty()) else {
                continue;
            };
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let Some(algorithm) = algorithm_of(&jwk.algorithm, jwk.common.key_algorithm) else {
                continue;
            };
            if !allowed.contains(&algorithm) || by_kid.contains_key(kid) {
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(decoding) => {
                    by_kid.insert(
                        kid.to_owned(),
                        Key {
                            algorithm,
                            decoding,
                        },
                    );
                }
                Err(e) => tracing::warn!(kid, error = %e, "skipping an unusable key of the JWKS"),
            }
        }
        if by_kid.is_empty() {
            bail!(
                "the key set has no usable key: none with a `kid` for {}",
                names(allowed)
            );
        }
        Ok(Self { by_kid })
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.by_kid.get(kid)
    }

    pub fn count(&self) -> usize {
        self.by_kid.len()
    }
}

/// The algorithm a key verifies: the one it was published for (`alg`), or
/// the one its type implies; `None` when they disagree or nothing fits.
fn algorithm_of(
    parameters: &AlgorithmParameters,
    published: Option<KeyAlgorithm>,
) -> Option<JwtAlgorithm> {
    let implied = match parameters {
        AlgorithmParameters::RSA(_) => JwtAlgorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            JwtAlgorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            JwtAlgorithm::EdDSA
        }
        _ => return None,
    };
    match published {
        None => Some(implied),
        Some(published) => {
            (published == KeyAlgorithm::from(Algorithm::from(implied))).then_some(implied)
        }
    }
}

impl From<JwtAlgorithm> for Algorithm {
    fn from(algorithm: JwtAlgorithm) -> Self {
        match algorithm {
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
            JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// `RS256, ES256`: for messages.
pub fn names(algorithms: &[JwtAlgorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the key set comes from.
#[derive(Clone)]
pub enum Source {
    File(PathBuf),
    Url {
        uri: http::Uri,
        /// Boxed: the client is large beside a path.
        client: Box<HttpsClient>,
    },
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

impl Source {
    pub fn from_settings(settings: &JwtSettings) -> anyhow::Result<Self> {
        match (&settings.jwks_file, &settings.jwks_url) {
            (Some(path), _) => Ok(Self::File(path.clone())),
            (None, Some(url)) => {
                let uri: http::Uri = url
                    .parse()
                    .with_context(|| format!("auth.jwt.jwks_url {url:?} is not a URL"))?;
                if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
                    bail!("auth.jwt.jwks_url must be an https:// URL");
                }
                Ok(Self::Url {
                    uri,
                    client: Box::new(https_client(settings.jwks_ca_file.as_deref())?),
                })
            }
            (None, None) => bail!("set auth.jwt.jwks_file or auth.jwt.jwks_url"),
        }
    }

    /// The key set document, as the source has it now.
    pub async fn fetch(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || std::fs::read(&path))
                    .await
                    .context("reading the JWKS file")?
                    .with_context(|| format!("reading the JWKS file {}", self))
            }
            Self::Url { uri, client } => tokio::time::timeout(FETCH_TIMEOUT, get(client, uri))
                .await
                .map_err(|_| anyhow!("fetching {self} took longer than {FETCH_TIMEOUT:?}"))?
                .with_context(|| format!("fetching {self}")),
        }
    }
}

/// The file's path, or the URL without its query (which could carry a
/// credential).
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url { uri, .. } => write!(
                f,
                "https://{}{}",
                uri.authority().map_or("", |a| a.as_str()),
                uri.path()
            ),
        }
    }
}

async fn get(client: &HttpsClient, uri: &http::Uri) -> anyhow::Result<Vec<u8>> {
    let request = http::Request::get(uri.clone())
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())?;
    let response = client.request(request).await?;
    if !response.status().is_success() {
        bail!("the server answered {}", response.status());
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the response: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

/// The HTTPS client of the key set URL: the server's certificate is
/// verified against the webpki roots, or only against the CAs of
/// `ca_file` (an issuer inside the cluster, with a private CA).
fn https_client(ca_file: Option<&std::path::Path>) -> anyhow::Result<HttpsClient> {
    let roots = match ca_file {
        None => rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => std::fs::read(path)
            .context("cannot read it")
            .and_then(|bundle| crate::pem::roots(&bundle))
            .with_context(|| format!("auth.jwt.jwks_ca_file {}", path.display()))?,
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the ring provider supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[JwtAlgorithm] = &JwtAlgorithm::ALL;

    /// An Ed25519 public key (RFC 8037's example).
    const OKP_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    fn okp(kid: &str, extra: &str) -> String {
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{OKP_X}","kid":"{kid}"{extra}}}"#)
    }

    #[test]
    fn keys_are_kept_by_kid_with_the_algorithm_their_type_implies() {
        let document = format!(r#"{{"keys":[{}]}}"#, okp("a", ""));
        let keys = KeySet::parse(document.as_bytes(), ALL).unwrap();
        assert_eq!(keys.get("a").unwrap().algorithm, JwtAlgorithm::EdDSA);
        assert!(keys.get("b").is_none());
    }

    #[test]
    fn keys_without_kid_for_encryption_hmac_or_another_algorithm_are_skipped() {
        let document = format!(
            r#"{{"keys":[{},{},{},{},{}]}}"#,
            okp("", ""),
            okp("enc", r#","use":"enc""#),
            okp("marked-es256", r#","alg":"ES256""#),
            r#"{"kty":"oct","k":"c2VjcmV0","kid":"hmac"}"#,
            okp("good", r#","alg":"EdDSA""#),
        );
        let keys = KeySet::parse(document.as_bytes(), ALL).unwrap();
        assert_eq!(keys.count(), 1);
        assert!(keys.get("good").is_some());
    }

    #[test]
    fn a_set_without_a_usable_key_is_an_error() {
        let only_eddsa = format!(r#"{{"keys":[{}]}}"#, okp("a", ""));
        let error = KeySet::parse(only_eddsa.as_bytes(), &[JwtAlgorithm::RS256])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("no usable key"), "{error}");
    }

    #[test]
    fn a_document_that_is_not_a_key_set_is_an_error_that_quotes_nothing() {
        let error = KeySet::parse(br#"{"keys": "secret-looking"}"#, ALL)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("line 1"), "{error}");
        assert!(!error.contains("secret-looking"), "{error}");
    }

    fn url_settings(url: &str) -> JwtSettings {
        JwtSettings {
            issuer: "i".into(),
            audience: "a".into(),
            jwks_file: None,
            jwks_url: Some(url.into()),
            jwks_ca_file: None,
            algorithms: ALL.to_vec(),
            leeway: Duration::ZERO,
            identity_claim: "sub".into(),
            roles_claim: "roles".into(),
            refresh_interval: Duration::ZERO,
            min_refresh_interval: Duration::ZERO,
        }
    }

    #[test]
    fn a_url_source_shows_no_query() {
        let source =
            Source::from_settings(&url_settings("https://idp.example.com/keys?token=abc")).unwrap();
        assert_eq!(source.to_string(), "https://idp.example.com/keys");
    }

    #[tokio::test]
    async fn an_unreachable_url_is_an_error_naming_it() {
        // Nothing listens on port 1: the connection is refused at once.
        let source = Source::from_settings(&url_settings("https://127.0.0.1:1/jwks.json")).unwrap();
        let error = format!("{:#}", source.fetch().await.unwrap_err());
        assert!(
            error.contains("fetching https://127.0.0.1:1/jwks.json"),
            "{error}"
        );
    }
    /// An HTTPS server on loopback answering every request with `body`,
    /// its certificate (for 127.0.0.1) signed by a CA of its own: the URL
    /// and the CA's PEM file.
    async fn https_server(body: &'static str) -> (String, temp_file::Temp) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (url, temp_file::Temp::with(ca.pem().as_bytes()))
    }

    /// A file removed when dropped.
    mod temp_file {
        pub struct Temp(pub std::path::PathBuf);

        impl Temp {
            pub fn with(contents: &[u8]) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "datagate-jwks-ca-{}.pem",
                    uuid::Uuid::new_v4().simple()
                ));
                std::fs::write(&path, contents).unwrap();
                Self(path)
            }
        }

        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn a_url_source_fetches_over_https_trusting_only_the_configured_ca() {
        let (url, ca) = https_server(r#"{"keys": []}"#).await;
        let mut settings = url_settings(&url);
        settings.jwks_ca_file = Some(ca.0.clone());
        let source = Source::from_settings(&settings).unwrap();
        assert_eq!(source.fetch().await.unwrap(), br#"{"keys": []}"#);

        // Without the CA, the webpki roots do not know the server.
        let untrusted = Source::from_settings(&url_settings(&url)).unwrap();
        let error = format!("{:#}", untrusted.fetch().await.unwrap_err());
        assert!(error.contains("certificate"), "{error}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_setting() {
        let empty = temp_file::Temp::with(b"not a certificate");
        let mut settings = url_settings("https://127.0.0.1:1/jwks.json");
        settings.jwks_ca_file = Some(empty.0.clone());
        let error = format!("{:#}", Source::from_settings(&settings).err().unwrap());
        assert!(error.contains("auth.jwt.jwks_ca_file"), "{error}");
    }
}
