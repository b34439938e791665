//! Users: the value types that make invalid users unrepresentable, the user
//! entity, and the shapes of its reads and writes.

use chrono::{DateTime, Utc};

use super::{Id, bounded_text, paging::canonical_window, passwords::Password};

/// The most ids one BatchGetUsers call may ask for.
pub const MAX_BATCH: usize = 100;

text_newtype! {
    /// An email address, trimmed, compared case-insensitively by the database.
    /// The rules are deliberately simple (one `@`, a dotted domain, no spaces):
    /// deliverability can only be proven by sending mail.
    Email
}

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, String> {
        let email = raw.trim();
        if email.is_empty() {
            return Err("is required".into());
        }
        if email.chars().count() > Self::MAX_LEN {
            return Err(format!("must be at most {} characters", Self::MAX_LEN));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain spaces or control characters".into());
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err("must contain exactly one @".into());
        };
        if domain.contains('@') {
            return Err("must contain exactly one @".into());
        }
        if local.is_empty() || local.len() > 64 {
            return Err("must have 1 to 64 characters before the @".into());
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
            return Err("must have a domain such as example.com after the @".into());
        }
        Ok(Self(email.to_owned()))
    }
}

text_newtype! {
    /// A username: 3 to 32 characters of `[a-z0-9_.-]` starting with a letter,
    /// stored in lower case.
    Username
}

impl Username {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let name = raw.trim().to_ascii_lowercase();
        if !(3..=32).contains(&name.len()) {
            return Err("must be 3 to 32 characters".into());
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err("must start with a letter".into());
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
        {
            return Err("may only contain letters, digits, '_', '.' and '-'".into());
        }
        Ok(Self(name))
    }
}

text_newtype! {
    /// Free text shown to people: at most 100 characters, no control characters.
    DisplayName
}

impl DisplayName {
    pub const MAX_LEN: usize = 100;

    pub fn parse(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 0, Self::MAX_LEN).map(Self)
    }
}

wire_enum! {
    #[derive(serde::Serialize, serde::Deserialize)]
    pub enum UserStatus {
        Active = "active",
        Inactive = "inactive",
        Suspended = "suspended",
    }
}

/// Read straight from its row (`store::users` selects these columns).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct User {
    pub id: Id,
    pub email: String,
    pub username: String,
    pub display_name: String,
    pub status: UserStatus,
    pub has_password: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: Email,
    pub username: Username,
    pub display_name: DisplayName,
    pub status: UserStatus,
    pub password: Option<Password>,
}

/// The changes of an update: `None` leaves a field as it is. For the
/// password, `Some(None)` removes it.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub email: Option<Email>,
    pub username: Option<Username>,
    pub display_name: Option<DisplayName>,
    pub status: Option<UserStatus>,
    pub password: Option<Option<Password>>,
}

impl UserPatch {
    pub fn is_empty(&self) -> bool {
        self.email.is_none()
            && self.username.is_none()
            && self.display_name.is_none()
            && self.status.is_none()
            && self.password.is_none()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFilter {
    pub status: Option<UserStatus>,
    /// Inclusive.
    pub created_after: Option<DateTime<Utc>>,
    /// Exclusive.
    pub created_before: Option<DateTime<Utc>>,
}

impl UserFilter {
    /// The canonical form page tokens are bound to.
    pub(crate) fn canonical(&self) -> String {
        format!(
            "status={};{}",
            self.status.map_or("any", UserStatus::as_str),
            canonical_window(self.created_after, self.created_before),
        )
    }
}

/// The keyset position after which a page starts: (created_at µs, id).
pub type UserCursor = (i64, i64);

#[derive(Debug, Clone)]
pub enum UserLookup {
    Id(Id),
    Email(Email),
}

/// The result of a batch get: users in request order, and the ids not found.
#[derive(Debug, Clone)]
pub struct BatchUsers {
    pub users: Vec<User>,
    pub missing: Vec<Id>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_need_one_at_and_a_dotted_domain() {
        assert!(Email::parse(" ada@example.com ").is_ok());
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "a@b@c.com",
            "ada@example",
            "a da@x.com",
            "ada@.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Email::parse(&format!("{}@example.com", "a".repeat(65))).is_err());
    }

    #[test]
    fn usernames_are_lowercased_and_restricted() {
        assert_eq!(Username::parse("Ada_L").unwrap().as_str(), "ada_l");
        for bad in ["ab", "1ada", "ada lovelace", "ada!", &"a".repeat(33)] {
            assert!(Username::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_names_reject_control_characters_and_overlong_text() {
        assert!(DisplayName::parse("Ada Lovelace").is_ok());
        assert!(DisplayName::parse("bad\u{7}").is_err());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
    }

    #[test]
    fn filters_have_distinct_canonical_forms() {
        let any = UserFilter::default();
        let active = UserFilter {
            status: Some(UserStatus::Active),
            ..UserFilter::default()
        };
        assert_ne!(any.canonical(), active.canonical());
    }
}
