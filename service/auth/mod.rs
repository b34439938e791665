//! Caller identity from bearer tokens: the static tokens here, and signed
//! tokens (JWTs) of one issuer in `jwt.rs`, with its key sets in `jwks.rs`.
//!
//! Static tokens are long random secrets, so a fast hash (SHA-256) is the
//! right storage form: configuration holds only hashes, and a lookup hashes
//! the presented token and finds it in a map. Timing reveals nothing useful,
//! as an attacker controls the token, not its hash.

use std::{collections::HashMap, fmt, sync::Arc};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::config::AuthSettings;

mod jwks;
pub mod jwt;

/// The role that may call administrative RPCs.
pub const ADMIN_ROLE: &str = "admin";

/// Who is calling: resolved from the bearer token and attached to the request.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    name: Arc<str>,
    roles: Arc<[String]>,
}

impl Caller {
    pub fn new(name: &str, roles: &[String]) -> Self {
        Self {
            name: name.into(),
            roles: roles.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Caller({}, roles={:?})", self.name, self.roles)
    }
}

/// The configured tokens, by hash.
#[derive(Clone, Default)]
pub struct TokenStore {
    by_hash: Arc<HashMap<[u8; 32], Caller>>,
}

impl TokenStore {
    pub fn from_settings(settings: &AuthSettings) -> Self {
        let by_hash = settings
            .tokens
            .iter()
            .map(|t| (t.sha256, Caller::new(&t.caller, &t.roles)))
            .collect();
        Self {
            by_hash: Arc::new(by_hash),
        }
    }

    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        self.by_hash.get(&hash_token(token)).cloned()
    }
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (256 bits) and its configuration entry.
pub fn new_token(caller: &str, roles: &[String]) -> anyhow::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    let token = format!(
        "dg_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let entry = format!(
        "{caller}:{}:{}",
        roles.join("+"),
        hex::encode(hash_token(&token))
    );
    Ok((token, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_authenticates_through_its_configuration_entry() {
        let (token, entry) = new_token("billing", &["admin".into()]).unwrap();
        let settings = AuthSettings {
            tokens: vec![entry.parse().unwrap()],
            jwt: None,
        };
        let store = TokenStore::from_settings(&settings);
        let caller = store.authenticate(&token).expect("token is known");
        assert_eq!(caller.name(), "billing");
        assert!(caller.has_role(ADMIN_ROLE));
        assert!(store.authenticate("dg_not-a-token").is_none());
    }
}
