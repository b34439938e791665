//! Users: their operations and outcomes. Value types are in
//! `model::users`; SQL in `store::users`; every write goes through
//! [`Writes`].

use super::{passwords::PasswordHasher, write::Writes};
use crate::{
    cache::Entity,
    error::{Detail, Error, Result, reason},
    loaders::{LiveUsers, PointReads, cached_users},
    model::{
        Id,
        audit::Actor,
        consistency::Consistency,
        in_request_order,
        outbox::Change,
        paging::{Page, PageRequest, PageTokens},
        passwords::Password,
        users::{BatchUsers, NewUser, User, UserCursor, UserFilter, UserLookup, UserPatch},
    },
    retry, store,
};

pub fn user_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new(
            reason::USER_NOT_FOUND,
            format!("user {id} does not exist or was deleted"),
        )
        .with("user_id", id),
    )
}

fn version_conflict(id: Id, expected: i64, current: i64) -> Error {
    Error::version_conflict("user", id, expected, current)
}

/// What the unique constraints of `users` mean.
fn unique_user_fields(e: Error) -> Error {
    e.on_unique(
        "users_email_live_key",
        reason::EMAIL_ALREADY_EXISTS,
        "another user has this email; emails are unique regardless of case",
    )
    .on_unique(
        "users_username_live_key",
        reason::USERNAME_ALREADY_EXISTS,
        "another user has this username; choose another",
    )
}

#[derive(Clone)]
pub struct Users {
    writes: Writes,
    pages: PageTokens,
    passwords: PasswordHasher,
    /// GetUser's reads, batched across calls.
    reads: PointReads<LiveUsers>,
}

impl Users {
    /// Users on `writes`' pool and cache (the application shares one
    /// `Writes`, with its one control pool, between the services).
    pub fn new(writes: &Writes, pages: PageTokens, passwords: PasswordHasher) -> Self {
        Self {
            writes: writes.clone(),
            pages,
            passwords,
            reads: PointReads::new(writes.db().clone()),
        }
    }

    #[tracing::instrument(skip_all, err(level = "info", Debug))]
    pub async fn create(&self, actor: &Actor, new: NewUser) -> Result<User> {
        let password_hash = match new.password.clone() {
            Some(p) => Some(self.passwords.hash(p).await?),
            None => None,
        };
        let user = retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let user = store::users::insert(&mut tx, &new, password_hash.as_deref())
                .await
                .map_err(unique_user_fields)?;
            // A "not found" for this id may be cached.
            tx.touches(Entity::User, user.id);
            tx.commit().await?;
            Ok(user)
        })
        .await?;
        tracing::info!(user_id = %user.id, "user created");
        Ok(user)
    }

    /// A live user, read as `consistency` asks (strong: see every
    /// acknowledged write; bounded: maybe from the near cache).
    #[tracing::instrument(skip_all, fields(user_id = %id), err(level = "info", Debug))]
    pub async fn get(&self, id: Id, consistency: Consistency) -> Result<User> {
        self.writes
            .cache()
            .get_or_load_within(Entity::User, id.get(), consistency.max_staleness(), || {
                self.reads.load(id)
            })
            .await?
            .ok_or_else(|| user_not_found(id))
    }

    /// One cache MGET for the batch, then one query for the misses: a missing
    /// id is "not found" for that id only.
    #[tracing::instrument(skip_all, fields(batch_size = ids.len()), err(level = "info", Debug))]
    pub async fn batch_get(&self, ids: &[Id], skip_missing: bool) -> Result<BatchUsers> {
        let found = cached_users(self.writes.db(), self.writes.cache(), ids).await?;
        let (users, missing) = in_request_order(ids, |id| found.get(&id).cloned());
        if !missing.is_empty() && !skip_missing {
            let list = missing
                .iter()
                .map(Id::to_string)
                .collect::<Vec<_>>()
                .join(",");
            return Err(Error::NotFound(
                Detail::new(
                    reason::USER_NOT_FOUND,
                    format!("users {list} do not exist or were deleted; set skip_missing to get the others"),
                )
                .with("missing_ids", list),
            ));
        }
        Ok(BatchUsers { users, missing })
    }

    #[tracing::instrument(skip_all, fields(page_size = page.size.get()), err(level = "info", Debug))]
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
        let listing = self.pages.listing(scope, &query);
        let after: Option<UserCursor> = listing.after(&page)?;
        let users = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(self.writes.db()).await?;
            store::users::list(&mut conn, &filter, after, page.size.fetch_limit()).await
        })
        .await?;
        Ok(listing.page(users, page.size, |last| -> UserCursor {
            (last.created_at.timestamp_micros(), last.id.get())
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %id, version), err(level = "info", Debug))]
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
        let user = retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
            let updated = store::users::update(&mut tx, id, version, &patch, password_hash.clone())
                .await
                .map_err(unique_user_fields)?;
            let user = match updated {
                Some(user) => user,
                None => {
                    return Err(match store::users::current_version(&mut tx, id).await? {
                        Some(current) => version_conflict(id, version, current),
                        None => user_not_found(id),
                    });
                }
            };
            tx.touches(Entity::User, id);
            tx.commit().await?;
            Ok(user)
        })
        .await?;
        tracing::info!(version = user.version, "user updated");
        Ok(user)
    }

    /// Soft delete: the row stays, the user disappears from every read, and
    /// its team memberships go, all in one transaction.
    #[tracing::instrument(skip_all, fields(user_id = %id), err(level = "info", Debug))]
    pub async fn delete(&self, actor: &Actor, id: Id, version: Option<i64>) -> Result<()> {
        retry::postgres(|| async {
            let mut tx = self.writes.begin(actor).await?;
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
            tx.touches(Entity::User, id);
            tx.commit().await
        })
        .await?;
        tracing::info!("user deleted");
        Ok(())
    }

    /// The user if the password matches, `None` otherwise (including unknown
    /// users and users without a password, in the same time).
    #[tracing::instrument(skip_all, err(level = "info", Debug))]
    pub async fn verify_password(
        &self,
        lookup: UserLookup,
        password: Password,
    ) -> Result<Option<User>> {
        let found = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(self.writes.db()).await?;
            store::users::credentials(&mut conn, &lookup).await
        })
        .await?;
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), hash),
            None => (None, None),
        };
        let valid = self.passwords.verify(password, hash).await?;
        Ok(user.filter(|_| valid))
    }
}
