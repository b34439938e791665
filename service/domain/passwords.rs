//! Passwords: validation, Argon2id hashing and verification.
//!
//! Hashing is CPU- and memory-hard by design (19 MiB, 2 passes), so it runs on
//! the blocking pool behind a semaphore: a burst of logins cannot starve the
//! async workers or allocate without bound. Passwords stay in `SecretString`
//! until hashed; neither they nor their hashes reach a log line.

use std::sync::{Arc, OnceLock};

use argon2::{
    Argon2, PasswordHash, PasswordVerifier as _,
    password_hash::{PasswordHasher as _, SaltString, rand_core::OsRng},
};
use tokio::sync::Semaphore;

use crate::{error::Error, model::passwords::Password};

#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
}

impl PasswordHasher {
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
        }
    }

    /// Sized to the machine: hashing cannot go faster than its cores.
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// An Argon2id PHC string for the password.
    pub async fn hash(&self, password: Password) -> Result<String, Error> {
        self.run("hash", move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
        })
        .await
    }

    /// Whether the password matches the stored hash. Without a stored hash it
    /// verifies against a dummy one, so the answer takes the same time and an
    /// observer cannot tell "no such user" from "wrong password".
    pub async fn verify(&self, password: Password, stored: Option<String>) -> Result<bool, Error> {
        self.run("verify", move || {
            let (hash, real) = match &stored {
                Some(h) => (h.as_str(), true),
                None => (dummy_hash(), false),
            };
            let parsed = PasswordHash::new(hash)
                .map_err(|e| anyhow::anyhow!("stored password hash is malformed: {e}"))?;
            let matches = Argon2::default()
                .verify_password(password.expose().as_bytes(), &parsed)
                .is_ok();
            Ok(real && matches)
        })
        .await
    }

    /// Runs one Argon2 operation (`op`: hash or verify) on the blocking pool,
    /// counted in `password_hash_operations_total{op}` and logged at DEBUG in
    /// the caller's span, so the work a call does can be counted.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, Error> {
        metrics::counter!("password_hash_operations_total", "op" => op).increment(1);
        tracing::debug!(op, "argon2 operation");
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| anyhow::anyhow!("password hasher closed"))?;
        let result = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| anyhow::anyhow!("password hashing task failed: {e}"))?;
        Ok(result?)
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(b"datagate-timing-equaliser", &salt)
            .expect("hashing a constant cannot fail")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = PasswordHasher::new(2);
        let hash = hasher
            .hash(Password::parse("correct horse".into()).unwrap())
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let ok = Password::parse_candidate("correct horse".into()).unwrap();
        let wrong = Password::parse_candidate("wrong horse".into()).unwrap();
        assert!(hasher.verify(ok.clone(), Some(hash.clone())).await.unwrap());
        assert!(!hasher.verify(wrong, Some(hash)).await.unwrap());
        assert!(!hasher.verify(ok, None).await.unwrap());
    }
}
