//! Who is calling, and what each caller may do.
//!
//! - [`Caller`]: the identity the auth middleware resolved for a call, with
//!   its roles.
//! - [`Role`] and [`Policy`]: the three roles (`reader` < `writer` <
//!   `admin`, each including the ones below it) and the role each RPC
//!   requires, from the one table beside the service registration
//!   (`startup::services::RPC_ROLES`).
//! - [`TokenStore`]: the static bearer tokens of the configuration;
//!   `jwt.rs` (keys in `jwks.rs`): signed tokens (JWTs) of one issuer;
//!   `peer.rs`: identities from verified client certificates.
//!
//! Static tokens are long random secrets, so a fast hash (SHA-256) is the
//! right storage form: configuration holds only hashes, and a lookup hashes
//! the presented token and finds it in a map. Timing reveals nothing useful,
//! as an attacker controls the token, not its hash.

use std::{collections::HashMap, fmt, sync::Arc};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::{
    config::AuthSettings,
    error::{Detail, Error, reason},
};

pub mod peer;

pub use self::peer::PeerStore;

mod jwks;
pub mod jwt;

/// The role that may call administrative RPCs.
pub const ADMIN_ROLE: &str = Role::Admin.as_str();

/// What a caller may do. Each role includes the ones below it: a writer may
/// read, an admin may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Every read.
    Reader,
    /// Every read and write of the domain's data.
    Writer,
    /// Everything, operations (`AdminService`) included.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Reader, Role::Writer, Role::Admin];

    /// The role's name in configuration, tokens and errors.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`; `None` for a name this service does not know.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The PERMISSION_DENIED reason naming this role.
    pub const fn required_reason(self) -> &'static str {
        match self {
            Role::Reader => reason::READER_ROLE_REQUIRED,
            Role::Writer => reason::WRITER_ROLE_REQUIRED,
            Role::Admin => reason::ADMIN_ROLE_REQUIRED,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role every RPC requires, by its path (`/package.Service/Method`).
/// A path it does not list is refused: a method added without a line in the
/// table is closed, not open (and the authorization test fails).
#[derive(Clone)]
pub struct Policy {
    by_path: Arc<HashMap<&'static str, Role>>,
}

impl Policy {
    pub fn new(table: &[(&'static str, Role)]) -> Self {
        Self {
            by_path: Arc::new(table.iter().copied().collect()),
        }
    }

    /// The role `path` requires; `None` for a path not in the table.
    pub fn required(&self, path: &str) -> Option<Role> {
        self.by_path.get(path).copied()
    }

    /// Whether `caller` may call `path`: PERMISSION_DENIED naming the role
    /// it lacks, or the method unknown to the table.
    pub fn authorize(&self, caller: &Caller, path: &str) -> Result<(), Error> {
        let Some(required) = self.required(path) else {
            return Err(Error::PermissionDenied(
                Detail::new(
                    reason::METHOD_NOT_AUTHORIZED,
                    format!(
                        "{path} is open to no caller: not a method of this service, or missing from its authorization table"
                    ),
                )
                .with("method", path),
            ));
        };
        if caller.may(required) {
            return Ok(());
        }
        Err(Error::PermissionDenied(
            Detail::new(
                required.required_reason(),
                format!(
                    "caller {} lacks the `{required}` role that {path} requires",
                    caller.name()
                ),
            )
            .with("role", required.as_str())
            .with("method", path),
        ))
    }
}

/// Who is calling: resolved from the bearer token or the client certificate
/// and attached to the request.
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

    /// The name, shared (a reference count, not a copy).
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether one of the caller's roles is `required` or above it. Role
    /// names this service does not know grant nothing.
    pub fn may(&self, required: Role) -> bool {
        self.roles
            .iter()
            .filter_map(|r| Role::parse(r))
            .any(|role| role >= required)
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
            .inspect(|t| {
                for role in t.roles.iter().filter(|r| Role::parse(r).is_none()) {
                    tracing::warn!(
                        caller = t.caller,
                        role,
                        "a token's role is not one of reader, writer, admin: it grants nothing"
                    );
                }
            })
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

    const READ: &str = "/datagate.v1.UserService/GetUser";
    const WRITE: &str = "/datagate.v1.UserService/DeleteUser";
    const OPERATE: &str = "/datagate.v1.AdminService/ListPartitions";

    fn policy() -> Policy {
        Policy::new(&[
            (READ, Role::Reader),
            (WRITE, Role::Writer),
            (OPERATE, Role::Admin),
        ])
    }

    fn caller(roles: &[&str]) -> Caller {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        Caller::new("svc", &roles)
    }

    fn denied_reason(policy: &Policy, caller: &Caller, path: &str) -> Option<&'static str> {
        match policy.authorize(caller, path) {
            Ok(()) => None,
            Err(Error::PermissionDenied(detail)) => Some(detail.reason),
            Err(other) => panic!("not PERMISSION_DENIED: {other:?}"),
        }
    }

    #[test]
    fn each_role_includes_the_ones_below_it() {
        let policy = policy();
        let expected = [
            (
                vec!["reader"],
                [
                    None,
                    Some("WRITER_ROLE_REQUIRED"),
                    Some("ADMIN_ROLE_REQUIRED"),
                ],
            ),
            (vec!["writer"], [None, None, Some("ADMIN_ROLE_REQUIRED")]),
            (vec!["admin"], [None, None, None]),
            (vec!["reader", "admin"], [None, None, None]),
        ];
        for (roles, outcomes) in expected {
            let caller = caller(&roles);
            for (path, outcome) in [READ, WRITE, OPERATE].into_iter().zip(outcomes) {
                assert_eq!(
                    denied_reason(&policy, &caller, path),
                    outcome,
                    "{roles:?} {path}"
                );
            }
        }
    }

    #[test]
    fn no_role_or_an_unknown_one_grants_nothing() {
        let policy = policy();
        for roles in [vec![], vec!["superuser"], vec!["Admin"]] {
            assert_eq!(
                denied_reason(&policy, &caller(&roles), READ),
                Some("READER_ROLE_REQUIRED"),
                "{roles:?}"
            );
        }
    }

    #[test]
    fn a_method_missing_from_the_table_is_closed_even_to_admins() {
        assert_eq!(
            denied_reason(
                &policy(),
                &caller(&["admin"]),
                "/datagate.v1.UserService/New"
            ),
            Some("METHOD_NOT_AUTHORIZED")
        );
    }

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn a_new_token_authenticates_through_its_configuration_entry() {
        let (token, entry) = new_token("billing", &["admin".into()]).unwrap();
        let settings = AuthSettings {
            tokens: vec![entry.parse().unwrap()],
            peers: vec![],
            jwt: None,
        };
        let store = TokenStore::from_settings(&settings);
        let caller = store.authenticate(&token).expect("token is known");
        assert_eq!(caller.name(), "billing");
        assert!(caller.has_role(ADMIN_ROLE));
        assert!(store.authenticate("dg_not-a-token").is_none());
    }
}
