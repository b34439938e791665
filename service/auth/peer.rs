//! Caller identity from verified client certificates (mTLS).
//!
//! The TLS acceptor (`startup::tls`) has already verified the chain against
//! the configured client CAs by the time a call arrives, so this module only
//! reads who the leaf certificate names:
//!
//! - its SPIFFE ID, a URI SAN `spiffe://<trust domain>/<path>`, what SPIRE,
//!   Istio and Linkerd issue to workloads (one per SVID);
//! - else its subject CN, what a classic private CA issues.
//!
//! The identity is the caller's name (audit log, quotas, spans) as it
//! stands, and `auth.peers` gives it roles; an identity not listed there is
//! a caller without roles, like a token configured with none.

use std::{collections::HashMap, sync::Arc};

use x509_parser::{extensions::GeneralName, parse_x509_certificate};

use super::Caller;
use crate::config::AuthSettings;

const SPIFFE_SCHEME: &str = "spiffe://";

/// The identity a certificate names: its SPIFFE URI SAN, else its subject
/// CN; `None` when it names neither (or is not a certificate).
pub fn identity(certificate_der: &[u8]) -> Option<String> {
    let (_, certificate) = parse_x509_certificate(certificate_der).ok()?;
    let spiffe = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(SPIFFE_SCHEME) => Some(uri.to_string()),
                _ => None,
            })
        });
    spiffe
        .or_else(|| {
            certificate
                .subject()
                .iter_common_name()
                .find_map(|cn| cn.as_str().ok())
                .filter(|cn| !cn.trim().is_empty())
                // A CN is free text its requester may choose: one that
                // looks like a SPIFFE ID must not pass for one.
                .filter(|cn| !cn.starts_with(SPIFFE_SCHEME))
                .map(str::to_owned)
        })
        // A name that goes into logs, spans and ownership columns.
        .filter(|name| name.len() <= MAX_IDENTITY_BYTES && !name.contains(char::is_control))
}

/// The longest identity a certificate may name.
const MAX_IDENTITY_BYTES: usize = 256;

/// The configured roles of certificate identities.
#[derive(Clone, Default)]
pub struct PeerStore {
    by_identity: Arc<HashMap<String, Caller>>,
}

impl PeerStore {
    pub fn from_settings(settings: &AuthSettings) -> Self {
        let by_identity = settings
            .peers
            .iter()
            .map(|p| (p.identity.clone(), Caller::new(&p.identity, &p.roles)))
            .collect();
        Self {
            by_identity: Arc::new(by_identity),
        }
    }

    /// The caller a verified leaf certificate names, `None` when it names
    /// no identity.
    pub fn authenticate(&self, certificate_der: &[u8]) -> Option<Caller> {
        let identity = identity(certificate_der)?;
        Some(
            self.by_identity
                .get(&identity)
                .cloned()
                .unwrap_or_else(|| Caller::new(&identity, &[])),
        )
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;
    use crate::config::PeerEntry;

    fn certificate(common_name: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        if let Some(cn) = common_name {
            subject.push(DnType::CommonName, cn);
        }
        subject.push(DnType::OrganizationName, "shop");
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_cn_posing_as_a_spiffe_id_or_holding_control_characters_names_no_one() {
        let posing = certificate(Some("spiffe://cluster.local/ns/x/sa/admin"), vec![]);
        assert_eq!(identity(&posing), None);
        let control = certificate(Some("billing\nadmin"), vec![]);
        assert_eq!(identity(&control), None);
        let long = certificate(Some(&"a".repeat(300)), vec![]);
        assert_eq!(identity(&long), None);
    }

    fn uri(value: &str) -> SanType {
        SanType::URI(value.try_into().unwrap())
    }

    #[test]
    fn the_spiffe_uri_san_is_the_identity_even_with_a_common_name() {
        let der = certificate(
            Some("checkout.shop"),
            vec![
                SanType::DnsName("checkout.shop.svc".try_into().unwrap()),
                uri("https://example.com/not-spiffe"),
                uri("spiffe://cluster.local/ns/shop/sa/checkout"),
            ],
        );
        assert_eq!(
            identity(&der).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/checkout")
        );
    }

    #[test]
    fn without_a_spiffe_uri_the_subject_common_name_is_the_identity() {
        let der = certificate(Some("billing"), vec![uri("https://example.com/x")]);
        assert_eq!(identity(&der).as_deref(), Some("billing"));
    }

    #[test]
    fn a_certificate_naming_neither_has_no_identity() {
        assert_eq!(identity(&certificate(None, vec![])), None);
        assert_eq!(identity(b"not a certificate"), None);
    }

    #[test]
    fn mapped_identities_get_their_roles_and_others_none() {
        let settings = AuthSettings {
            tokens: vec![],
            peers: vec![PeerEntry {
                identity: "spiffe://cluster.local/ns/shop/sa/checkout".into(),
                roles: vec!["writer".into()],
            }],
            jwt: None,
        };
        let peers = PeerStore::from_settings(&settings);

        let mapped = certificate(
            None,
            vec![uri("spiffe://cluster.local/ns/shop/sa/checkout")],
        );
        let caller = peers.authenticate(&mapped).expect("an identity");
        assert_eq!(caller.name(), "spiffe://cluster.local/ns/shop/sa/checkout");
        assert!(caller.has_role("writer"));

        let unmapped = certificate(Some("stranger"), vec![]);
        let caller = peers.authenticate(&unmapped).expect("an identity");
        assert_eq!(caller.name(), "stranger");
        assert!(!caller.has_role("writer"));
        assert!(!caller.has_role("reader"));
    }
}
