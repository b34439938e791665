//! Users by id: the batch function of a request-scoped user loader, and the
//! cache-aside batch read (one MGET, then one query for the misses).

use std::collections::HashMap;

use dataloader::BatchFn;
use sqlx::{PgConnection, PgPool};

use super::{BatchLoader, PointRead, Shared, cached, per_key};
use crate::{
    cache::{Cache, Entity},
    error::Result,
    model::{Id, users::User},
    retry, store,
};

pub struct UsersById(pub PgPool);

impl BatchFn<Id, Shared<Option<User>>> for UsersById {
    async fn load(&mut self, keys: &[Id]) -> HashMap<Id, Shared<Option<User>>> {
        let found = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.0).await?;
            let users = store::users::find_many(&mut conn, keys).await?;
            Ok(users.into_iter().map(|u| (u.id, Some(u))).collect())
        })
        .await;
        per_key(keys, found, None)
    }
}

pub type UserLoader = BatchLoader<Id, Option<User>, UsersById>;

/// Users by id through the cache: one MGET, then one query for the misses.
/// Missing (or deleted) users are absent from the map.
pub async fn cached_users(db: &PgPool, cache: &Cache, ids: &[Id]) -> Result<HashMap<Id, User>> {
    cached(
        db,
        cache,
        Entity::User,
        ids,
        |u: &User| u.id,
        store::users::find_many,
    )
    .await
}

/// Live users by id, batched across calls ([`super::PointReads`]).
pub struct LiveUsers;

impl PointRead for LiveUsers {
    type Row = User;
    const NAME: &'static str = "user";

    fn id(row: &User) -> Id {
        row.id
    }

    fn find_many(
        conn: &mut PgConnection,
        ids: &[Id],
    ) -> impl Future<Output = Result<Vec<User>>> + Send {
        store::users::find_many(conn, ids)
    }
}
