//! `rediss://`: what the cache trusts and presents over TLS, and who it logs
//! in as.
//!
//! **Trust.** A server certificate must chain to `redis.tls_ca_file` when it
//! is set (a private CA: the bundle replaces the system roots, it does not
//! add to them), else to the system's roots. Hostname checks are always on:
//! the redis crate's `#insecure` URL fragment needs a feature this build
//! does not have, and such a URL is refused at start-up.
//!
//! **Client certificate.** `redis.tls_cert_file` and `redis.tls_key_file`
//! (both or neither) answer a server with `tls-auth-clients yes`.
//!
//! **Credentials.** `redis.username` / `redis.password` (an ACL user) win
//! over those in the URL. They travel only in `AUTH` over the connection;
//! the redis crate's `Debug` of a connection info redacts the password, and
//! its login error ("Password authentication failed") does not carry it
//! (`tests/api/redis_tls.rs` checks the log).
//!
//! **Files are read once, at start-up**, and checked here: a CA file with no
//! certificate in it would otherwise fail every handshake later, silently as
//! far as configuration goes. Rotating a CA or a client certificate is a
//! rolling restart. Errors name the setting and the path, never the
//! contents.
//!
//! **Crypto provider.** The redis crate (1.8) builds its rustls client
//! configuration with `ClientConfig::builder()`, the process-default
//! provider, and offers no way to hand it one. That resolves to ring
//! because ring is the only provider compiled into this binary (no
//! aws-lc-rs: see `Cargo.toml`); the unit test below fails if that ever
//! changes.

use std::{path::Path, sync::Arc};

use anyhow::{Context, bail};
use deadpool_redis::redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::RedisSettings;

/// Whether every URL in `urls` (one, or a cluster's comma-separated seeds)
/// asks for TLS.
pub(super) fn is_tls(urls: &str) -> bool {
    let mut urls = urls.split(',').map(str::trim).filter(|u| !u.is_empty());
    urls.clone().next().is_some() && urls.all(|u| u.starts_with("rediss://"))
}

/// Refuses a `rediss://...#insecure` URL (certificates unchecked): this
/// build could not honour it (no `tls-rustls-insecure`), so every connect
/// would fail; better to say so at start-up.
pub(super) fn refuse_insecure(urls: &str) -> anyhow::Result<()> {
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        if let Ok(info) = url.into_connection_info()
            && matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. })
        {
            bail!(
                "invalid configuration: redis.url: #insecure (no certificate checks) is not supported; name the server's CA in redis.tls_ca_file instead"
            );
        }
    }
    Ok(())
}

/// The certificates to connect to `urls` with: `None` for plain `redis://`,
/// or for `rediss://` with the system roots and no client certificate.
pub(super) fn certificates(
    settings: &RedisSettings,
    urls: &str,
) -> anyhow::Result<Option<TlsCertificates>> {
    let ca = non_empty(&settings.tls_ca_file);
    let cert = non_empty(&settings.tls_cert_file);
    let key = non_empty(&settings.tls_key_file);
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    if !is_tls(urls) {
        bail!(
            "invalid configuration: redis.tls_ca_file, redis.tls_cert_file and redis.tls_key_file need rediss:// URLs in redis.url"
        );
    }
    let root_cert = ca
        .map(|path| {
            let pem = read("redis.tls_ca_file", path)?;
            let certificates = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "invalid configuration: redis.tls_ca_file: {} is not a PEM certificate bundle: {e}",
                        path.display()
                    )
                })?;
            if certificates.is_empty() {
                bail!(
                    "invalid configuration: redis.tls_ca_file: {} holds no PEM certificate",
                    path.display()
                );
            }
            Ok(pem)
        })
        .transpose()?;
    let client_tls = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(client_identity(cert, key)?),
        _ => bail!(
            "invalid configuration: redis.tls_cert_file and redis.tls_key_file go together (a client certificate and its key)"
        ),
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

fn client_identity(cert: &Path, key: &Path) -> anyhow::Result<ClientTlsConfig> {
    let client_cert = read("redis.tls_cert_file", cert)?;
    let chain = CertificateDer::pem_slice_iter(&client_cert)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_default();
    if chain.is_empty() {
        bail!(
            "invalid configuration: redis.tls_cert_file: {} holds no PEM certificate",
            cert.display()
        );
    }
    let client_key = read("redis.tls_key_file", key)?;
    // The parser's error is not shown: it might quote the file.
    let Ok(private_key) = PrivateKeyDer::from_pem_slice(&client_key) else {
        bail!(
            "invalid configuration: redis.tls_key_file: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        );
    };
    // What every handshake will do with them, done once now: a certificate
    // rustls refuses (X.509 v1, say) or a key of another certificate would
    // otherwise fail each connect, the cache failing open for good.
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|config| {
            config
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, private_key)
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration: redis.tls_cert_file ({}) and redis.tls_key_file ({}) are not a usable client certificate and key: {e}",
                cert.display(),
                key.display()
            )
        })?;
    Ok(ClientTlsConfig {
        client_cert,
        client_key,
    })
}

fn read(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "invalid configuration: {setting}: cannot read {}",
            path.display()
        )
    })
}

fn non_empty(path: &str) -> Option<&Path> {
    let path = path.trim();
    (!path.is_empty()).then(|| Path::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn settings(overrides: &[(&str, &str)]) -> RedisSettings {
        let mut all = vec![("database.url", "postgres://localhost/datagate")];
        all.extend_from_slice(overrides);
        Settings::load_with_overrides(None, &all).unwrap().redis
    }

    /// A file of the test's own under the system temporary directory.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Why `certificates` refuses `overrides` with `url`.
    fn refusal(overrides: &[(&str, &str)], url: &str) -> String {
        certificates(&settings(overrides), url)
            .unwrap_err()
            .to_string()
    }

    fn file(contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("dg-tls-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    #[test]
    fn only_urls_that_all_say_rediss_are_tls() {
        for (url, tls) in [
            ("rediss://a:6380", true),
            ("rediss://a:6380, rediss://b:6380", true),
            ("redis://a:6379", false),
            ("rediss://a:6380,redis://b:6379", false),
            ("", false),
        ] {
            assert_eq!(is_tls(url), tls, "{url:?}");
        }
    }

    #[test]
    fn an_insecure_url_is_refused() {
        let error = refuse_insecure("rediss://a:6380,rediss://b:6380/#insecure")
            .unwrap_err()
            .to_string();
        assert!(error.contains("#insecure"), "{error}");
        assert!(refuse_insecure("rediss://a:6380,rediss://b:6380").is_ok());
        assert!(refuse_insecure("redis://a:6379").is_ok());
    }

    #[test]
    fn without_tls_files_the_system_roots_are_used() {
        let plain = settings(&[]);
        assert!(certificates(&plain, "rediss://a:6380").unwrap().is_none());
        assert!(certificates(&plain, "redis://a:6379").unwrap().is_none());
    }

    #[test]
    fn tls_files_with_a_plain_url_are_refused() {
        let ca = file("not read");
        let error = refusal(&[("redis.tls_ca_file", ca.path())], "redis://a:6379");
        assert!(error.contains("rediss://"), "{error}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_setting() {
        let empty = file("no certificates here\n");
        for (path, says) in [
            (
                "/nonexistent/ca.pem",
                &["redis.tls_ca_file", "/nonexistent/ca.pem"][..],
            ),
            (empty.path(), &["holds no PEM certificate"][..]),
        ] {
            let error = refusal(&[("redis.tls_ca_file", path)], "rediss://a:6380");
            assert!(says.iter().all(|s| error.contains(s)), "{error}");
        }
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_bad_key_is_not_quoted() {
        let cert = file(
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUU2VjcmV0\n-----END CERTIFICATE-----\n",
        );
        let error = refusal(&[("redis.tls_cert_file", cert.path())], "rediss://a:6380");
        assert!(error.contains("go together"), "{error}");

        let mut secret = String::from("-----BEGIN PRIVATE KEY-----\n");
        secret.push_str("c2VjcmV0LWtleS1tYXRlcmlhbA==!!\n-----END PRIVATE KEY-----\n");
        let key = file(&secret);
        let error = refusal(
            &[
                ("redis.tls_cert_file", cert.path()),
                ("redis.tls_key_file", key.path()),
            ],
            "rediss://a:6380",
        );
        assert!(error.contains("redis.tls_key_file"), "{error}");
        assert!(!error.contains("c2VjcmV0"), "{error}");
    }

    /// The redis crate's `ClientConfig::builder()` takes the process-default
    /// provider, installed from the crate features: it must be ring (the
    /// project's one provider), and building it must not panic (it would,
    /// were a second provider such as aws-lc-rs compiled in).
    #[test]
    fn the_provider_the_redis_crate_falls_back_to_is_ring() {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let suites = |provider: &rustls::crypto::CryptoProvider| {
            provider
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            suites(config.crypto_provider()),
            suites(&rustls::crypto::ring::default_provider())
        );
    }
}
