//! Users by id: the batch function of a request-scoped user loader, and the
//! cache-aside batch read (one MGET, then one query for the misses).

use std::collections::HashMap;

use dataloader::BatchFn;
use sqlx::PgPool;

use super::{BatchLoader, Shared, cached, find_by_id, per_key, point::point_read};
use crate::{
    cache::{Cache, Entity},
    error::Result,
    model::{Id, users::User},
    store,
};

pub struct UsersById(pub PgPool);

impl BatchFn<Id, Shared<Option<User>>> for UsersById {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Option<User>>> {
        let found = find_by_id::<LiveUsers>(&self.0, keys)
            .await
            .map(|users| users.into_iter().map(|(id, u)| (id, Some(u))).collect());
        per_key(keys, found, None)
    }
}

pub type UserLoader = BatchLoader<Id, Option<User>, UsersById>;

/// Users by id through the cache: one MGET, then one query for the misses.
/// Missing (or deleted) users are absent from the map.
pub async fn cached_users(db: &PgPool, cache: &Cache, ids: &[Id]) -> Result<HashMap<Id, User>> {
    cached::<LiveUsers>(db, cache, Entity::User, ids).await
}

point_read!(
    /// Live users by id, batched across calls ([`super::PointReads`]).
    LiveUsers: User,
    "user",
    store::users::find_many
);
