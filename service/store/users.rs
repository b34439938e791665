//! SQL for `users`. Plain functions over a connection; the domain layer owns
//! transactions and decides what a unique violation means (it knows the
//! constraint names `users_email_live_key` and `users_username_live_key`).

use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::{ListOrder, push_list_predicates, rows_for_ids, scalar_for_id};
use crate::{
    error::Result,
    model::{
        Id,
        users::{NewUser, User, UserCursor, UserFilter, UserLookup, UserPatch, UserStatus},
    },
};

/// `SELECT <user columns> FROM users <rest>`, as one literal.
macro_rules! select_users {
    ($rest:literal) => {
        concat!(
            "SELECT id, email, username, display_name, status, password_hash IS NOT NULL AS has_password, \
             created_at, updated_at, version FROM users ",
            $rest
        )
    };
}

/// Like `select_users!`, plus the password hash (for verification only).
macro_rules! select_users_with_hash {
    ($rest:literal) => {
        concat!(
            "SELECT id, email, username, display_name, status, password_hash IS NOT NULL AS has_password, \
             created_at, updated_at, version, password_hash FROM users ",
            $rest
        )
    };
}

/// The user columns, for `RETURNING`.
macro_rules! user_columns {
    () => {
        "id, email, username, display_name, status, password_hash IS NOT NULL AS has_password, \
         created_at, updated_at, version"
    };
}

pub async fn insert(
    conn: &mut PgConnection,
    new: &NewUser,
    password_hash: Option<&str>,
) -> Result<User> {
    let user: User = sqlx::query_as(concat!(
        "INSERT INTO users (email, username, display_name, status, password_hash) \
         VALUES ($1, $2, $3, $4, $5) RETURNING ",
        user_columns!()
    ))
    .bind(new.email.as_str())
    .bind(new.username.as_str())
    .bind(new.display_name.as_str())
    .bind(new.status.as_str())
    .bind(password_hash)
    .fetch_one(conn)
    .await?;
    Ok(user)
}

/// Live users among `ids`, in no particular order.
pub async fn find_many(conn: &mut PgConnection, ids: &[Id]) -> Result<Vec<User>> {
    rows_for_ids(
        conn,
        select_users!("WHERE id = ANY($1) AND deleted_at IS NULL"),
        ids,
    )
    .await
}

/// Live users matching `filter`, oldest first, after the keyset position
/// `after`. Only the filters present become predicates, so each combination
/// is its own prepared statement with a plan that uses the right index.
pub async fn list(
    conn: &mut PgConnection,
    filter: &UserFilter,
    after: Option<UserCursor>,
    limit: i64,
) -> Result<Vec<User>> {
    let mut q: QueryBuilder<Postgres> =
        QueryBuilder::new(select_users!("WHERE deleted_at IS NULL"));
    push_list_predicates(
        &mut q,
        ListOrder::OldestFirst,
        filter.status.map(|s| s.as_str()),
        filter.created_after,
        filter.created_before,
        after,
    )?;
    q.push(" ORDER BY created_at, id LIMIT ").push_bind(limit);
    let users: Vec<User> = q.build_query_as().fetch_all(conn).await?;
    Ok(users)
}

/// Applies the patch if the user is live and at `version`; `None` otherwise.
/// `password_hash`: `None` keeps it, `Some(None)` removes it.
pub async fn update(
    conn: &mut PgConnection,
    id: Id,
    version: i64,
    patch: &UserPatch,
    password_hash: Option<Option<String>>,
) -> Result<Option<User>> {
    let user: Option<User> = sqlx::query_as(concat!(
        "UPDATE users SET \
           email = COALESCE($3, email), \
           username = COALESCE($4, username), \
           display_name = COALESCE($5, display_name), \
           status = COALESCE($6, status), \
           password_hash = CASE WHEN $7 THEN $8 ELSE password_hash END, \
           updated_at = now(), \
           version = version + 1 \
         WHERE id = $1 AND version = $2 AND deleted_at IS NULL \
         RETURNING ",
        user_columns!()
    ))
    .bind(id.get())
    .bind(version)
    .bind(patch.email.as_ref().map(|e| e.as_str()))
    .bind(patch.username.as_ref().map(|u| u.as_str()))
    .bind(patch.display_name.as_ref().map(|d| d.as_str()))
    .bind(patch.status.map(UserStatus::as_str))
    .bind(password_hash.is_some())
    .bind(password_hash.flatten())
    .fetch_optional(conn)
    .await?;
    Ok(user)
}

/// The version of a live user, to tell a stale version from a missing user.
pub async fn current_version(conn: &mut PgConnection, id: Id) -> Result<Option<i64>> {
    const SQL: &str = "SELECT version FROM users WHERE id = $1 AND deleted_at IS NULL";
    scalar_for_id(conn, SQL, id).await
}

/// Marks a live user deleted (at `version`, if given). Whether it did.
pub async fn soft_delete(conn: &mut PgConnection, id: Id, version: Option<i64>) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE users SET deleted_at = now(), updated_at = now(), version = version + 1 \
         WHERE id = $1 AND deleted_at IS NULL AND ($2::bigint IS NULL OR version = $2)",
    )
    .bind(id.get())
    .bind(version)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A live user and their password hash, by id or email.
pub async fn credentials(
    conn: &mut PgConnection,
    lookup: &UserLookup,
) -> Result<Option<(User, Option<String>)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: User,
        password_hash: Option<String>,
    }
    let query = match lookup {
        UserLookup::Id(id) => sqlx::query_as::<_, Row>(select_users_with_hash!(
            "WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id.get()),
        UserLookup::Email(email) => sqlx::query_as::<_, Row>(select_users_with_hash!(
            "WHERE lower(email) = lower($1) AND deleted_at IS NULL"
        ))
        .bind(email.as_str().to_owned()),
    };
    let row = query.fetch_optional(conn).await?;
    Ok(row.map(|r| (r.user, r.password_hash)))
}
/// Locks a live user against concurrent deletion; whether it exists.
pub async fn lock_live_user(conn: &mut PgConnection, id: Id) -> Result<bool> {
    const SQL: &str = "SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL FOR SHARE";
    let found: Option<i64> = scalar_for_id(conn, SQL, id).await?;
    Ok(found.is_some())
}
