//! Users: the value types that make invalid users unrepresentable, and the
//! operations on them. Transactions begin and commit here; SQL lives in
//! `store::users`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    audit::Actor,
    error::{Detail, Error, Result},
    paging::{Page, PageRequest, PageTokens},
    passwords::{Password, PasswordHasher},
};
use std::collections::HashMap;

use crate::{
    cache::{Cache, Entity},
    loaders::{UserLoader, UsersById},
    store::{self, outbox::Change},
};

/// The most ids one BatchGetUsers call may ask for.
pub const MAX_BATCH: usize = 100;

/// A positive database id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Id(i64);

impl Id {
    pub fn parse(raw: i64) -> Result<Self, String> {
        if raw > 0 {
            Ok(Self(raw))
        } else {
            Err("must be a positive id".into())
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Trimmed free text of `min..=max` characters without control characters.
pub(crate) fn bounded_text(raw: &str, min: usize, max: usize) -> Result<String, String> {
    let text = raw.trim();
    let len = text.chars().count();
    if len < min || len > max {
        return Err(if min == 0 {
            format!("must be at most {max} characters")
        } else {
            format!("must be {min} to {max} characters")
        });
    }
    if text.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(text.to_owned())
}

/// An email address, trimmed, compared case-insensitively by the database.
/// The rules are deliberately simple (one `@`, a dotted domain, no spaces):
/// deliverability can only be proven by sending mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

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

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A username: 3 to 32 characters of `[a-z0-9_.-]` starting with a letter,
/// stored in lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

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

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free text shown to people: at most 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_LEN: usize = 100;

    pub fn parse(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 0, Self::MAX_LEN).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UserStatus {
    Active,
    Inactive,
    Suspended,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Suspended => "suspended",
        }
    }

    pub fn from_db(s: &str) -> anyhow::Result<Self> {
        match s {
            "active" => Ok(Self::Active),
            "inactive" => Ok(Self::Inactive),
            "suspended" => Ok(Self::Suspended),
            other => anyhow::bail!("unknown user status {other:?} in the database"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    fn canonical(&self) -> String {
        format!(
            "status={};after={};before={}",
            self.status.map_or("any", UserStatus::as_str),
            self.created_after.map_or(String::new(), |t| t.to_rfc3339()),
            self.created_before
                .map_or(String::new(), |t| t.to_rfc3339()),
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

/// The values of a batch read in request order (duplicates repeated), and
/// the ids not found, each once (AIP-231).
pub(crate) fn in_request_order<T>(
    ids: &[Id],
    mut find: impl FnMut(Id) -> Option<T>,
) -> (Vec<T>, Vec<Id>) {
    let mut found = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    for id in ids {
        match find(*id) {
            Some(value) => found.push(value),
            None if !missing.contains(id) => missing.push(*id),
            None => {}
        }
    }
    (found, missing)
}

pub fn user_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new(
            "USER_NOT_FOUND",
            format!("user {id} does not exist or was deleted"),
        )
        .with("user_id", id),
    )
}

fn version_conflict(id: Id, expected: i64, current: i64) -> Error {
    Error::Aborted(
        Detail::new(
            "VERSION_CONFLICT",
            format!(
                "user {id} is at version {current}, not {expected}: it changed since you read it; read it again and retry"
            ),
        )
        .with("user_id", id)
        .with("current_version", current),
    )
}

#[derive(Clone)]
pub struct Users {
    db: PgPool,
    pages: PageTokens,
    passwords: PasswordHasher,
    cache: Cache,
}

impl Users {
    pub fn new(db: PgPool, pages: PageTokens, passwords: PasswordHasher, cache: Cache) -> Self {
        Self {
            db,
            pages,
            passwords,
            cache,
        }
    }

    #[tracing::instrument(skip_all, err(Debug))]
    pub async fn create(&self, actor: &Actor, new: NewUser) -> Result<User> {
        let password_hash = match new.password.clone() {
            Some(p) => Some(self.passwords.hash(p).await?),
            None => None,
        };
        let mut tx = store::audit::begin(&self.db, actor).await?;
        let user = store::users::insert(&mut tx, &new, password_hash.as_deref()).await?;
        tx.commit().await?;
        // A "not found" for this id may be cached.
        self.cache
            .invalidate(&[(Entity::User, user.id.get())])
            .await;
        tracing::info!(user_id = %user.id, "user created");
        Ok(user)
    }

    #[tracing::instrument(skip_all, fields(user_id = %id), err(Debug))]
    pub async fn get(&self, id: Id) -> Result<User> {
        self.cache
            .get_or_load(Entity::User, id.get(), || async {
                let mut conn = self.db.acquire().await?;
                store::users::find(&mut conn, id).await
            })
            .await?
            .ok_or_else(|| user_not_found(id))
    }

    /// One cache MGET for the batch, then one query (through the users
    /// loader) for the misses: a missing id is "not found" for that id only.
    #[tracing::instrument(skip_all, fields(batch_size = ids.len()), err(Debug))]
    pub async fn batch_get(&self, ids: &[Id], skip_missing: bool) -> Result<BatchUsers> {
        let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
        let found: HashMap<i64, Option<User>> = self
            .cache
            .get_many_or_load(Entity::User, &raw, |misses| async move {
                let misses: Vec<Id> = misses
                    .into_iter()
                    .filter_map(|m| Id::parse(m).ok())
                    .collect();
                let loader = UserLoader::new(UsersById(self.db.clone()));
                let loaded = loader.load_many(&misses).await?;
                Ok(loaded
                    .into_iter()
                    .filter_map(|(id, user)| user.map(|u| (id.get(), u)))
                    .collect())
            })
            .await?;
        let (users, missing) = in_request_order(ids, |id| found.get(&id.get()).cloned().flatten());
        if !missing.is_empty() && !skip_missing {
            let list = missing
                .iter()
                .map(Id::to_string)
                .collect::<Vec<_>>()
                .join(",");
            return Err(Error::NotFound(
                Detail::new(
                    "USER_NOT_FOUND",
                    format!("users {list} do not exist or were deleted; set skip_missing to get the others"),
                )
                .with("missing_ids", list),
            ));
        }
        Ok(BatchUsers { users, missing })
    }

    #[tracing::instrument(skip_all, fields(page_size = page.size.get()), err(Debug))]
    pub async fn list(&self, filter: UserFilter, page: PageRequest) -> Result<Page<User>> {
        self.list_scoped("users", filter, page).await
    }

    /// [`list`](Self::list) with page tokens of their own `scope`, for other
    /// listings that page through users.
    pub async fn list_scoped(
        &self,
        scope: &str,
        filter: UserFilter,
        page: PageRequest,
    ) -> Result<Page<User>> {
        let query = filter.canonical();
        let after: Option<UserCursor> = page
            .token
            .as_deref()
            .map(|t| self.pages.decode(scope, &query, t))
            .transpose()?;
        let mut conn = self.db.acquire().await?;
        let users = store::users::list(&mut conn, &filter, after, page.size.fetch_limit()).await?;
        Ok(Page::from_overfetch(users, page.size, |last| {
            let cursor: UserCursor = (last.created_at.timestamp_micros(), last.id.get());
            self.pages.encode(scope, &query, &cursor)
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %id, version), err(Debug))]
    pub async fn update(
        &self,
        actor: &Actor,
        id: Id,
        version: i64,
        patch: UserPatch,
    ) -> Result<User> {
        if patch.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "must name at least one of: email, username, display_name, status, password",
            ));
        }
        let password_hash = match patch.password.clone() {
            Some(Some(p)) => Some(Some(self.passwords.hash(p).await?)),
            Some(None) => Some(None),
            None => None,
        };
        let mut tx = store::audit::begin(&self.db, actor).await?;
        let updated = store::users::update(&mut tx, id, version, &patch, password_hash).await?;
        let user = match updated {
            Some(user) => user,
            None => {
                return Err(match store::users::current_version(&mut tx, id).await? {
                    Some(current) => version_conflict(id, version, current),
                    None => user_not_found(id),
                });
            }
        };
        tx.commit().await?;
        self.cache.invalidate(&[(Entity::User, id.get())]).await;
        tracing::info!(version = user.version, "user updated");
        Ok(user)
    }

    /// Soft delete: the row stays, the user disappears from every read, and
    /// its team memberships go, all in one transaction.
    #[tracing::instrument(skip_all, fields(user_id = %id), err(Debug))]
    pub async fn delete(&self, actor: &Actor, id: Id, version: Option<i64>) -> Result<()> {
        let mut tx = store::audit::begin(&self.db, actor).await?;
        if !store::users::soft_delete(&mut tx, id, version).await? {
            return Err(
                match (store::users::current_version(&mut tx, id).await?, version) {
                    (Some(current), Some(expected)) => version_conflict(id, expected, current),
                    _ => user_not_found(id),
                },
            );
        }
        store::teams::remove_all_memberships(&mut tx, id).await?;
        store::outbox::push(&mut tx, &Change::DeleteProfile { user_id: id.get() }).await?;
        tx.commit().await?;
        self.cache.invalidate(&[(Entity::User, id.get())]).await;
        tracing::info!("user deleted");
        Ok(())
    }

    /// The user if the password matches, `None` otherwise (including unknown
    /// users and users without a password, in the same time).
    #[tracing::instrument(skip_all, err(Debug))]
    pub async fn verify_password(
        &self,
        lookup: UserLookup,
        password: Password,
    ) -> Result<Option<User>> {
        let mut conn = self.db.acquire().await?;
        let found = store::users::credentials(&mut conn, &lookup).await?;
        drop(conn);
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), hash),
            None => (None, None),
        };
        let valid = self.passwords.verify(password, hash).await?;
        Ok(user.filter(|_| valid))
    }
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
    fn ids_must_be_positive() {
        assert!(Id::parse(1).is_ok());
        assert!(Id::parse(0).is_err());
        assert!(Id::parse(-5).is_err());
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
