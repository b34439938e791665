//! A password as callers send it: length-checked, kept in a `SecretString`
//! so that neither `Debug` nor a log line shows it. Hashing is the domain's
//! (`domain::passwords`).

use secrecy::{ExposeSecret as _, SecretString};

pub const MIN_LEN: usize = 8;
pub const MAX_LEN: usize = 256;

/// A password that meets the length rules.
#[derive(Debug, Clone)]
pub struct Password(SecretString);

impl Password {
    pub fn parse(raw: String) -> Result<Self, String> {
        let len = raw.chars().count();
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return Err(format!("must be {MIN_LEN} to {MAX_LEN} characters"));
        }
        Ok(Self(SecretString::from(raw)))
    }

    /// A password presented for verification: any non-empty password up to
    /// the maximum length (a too-short one simply does not match).
    pub fn parse_candidate(raw: String) -> Result<Self, String> {
        if raw.is_empty() || raw.chars().count() > MAX_LEN {
            return Err(format!("must be 1 to {MAX_LEN} characters"));
        }
        Ok(Self(SecretString::from(raw)))
    }
}

impl Password {
    /// The password itself, for the hasher only.
    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_length_rules() {
        assert!(Password::parse("short".into()).is_err());
        assert!(Password::parse("x".repeat(257)).is_err());
        assert!(Password::parse("long enough".into()).is_ok());
        assert!(Password::parse_candidate(String::new()).is_err());
        assert!(Password::parse_candidate("short".into()).is_ok());
    }

    #[test]
    fn debug_does_not_print_the_password() {
        let p = Password::parse("supersecret".into()).unwrap();
        assert!(!format!("{p:?}").contains("supersecret"));
    }
}
