//! PostgreSQL: everything that speaks SQL, and nothing else. Nothing here
//! knows about protobuf or decides a business outcome.
//!
//! Functions take a `&mut PgConnection` (a pooled connection or a
//! transaction) and model types, and return rows as model types, `Option`,
//! counts or booleans; errors are the generic database mapping of
//! [`crate::error::Error`]. Whether a missing row is "not found" or a
//! constraint violation is "already exists" is the domain's decision.

pub mod analytics;
pub mod audit;
pub mod availability;
pub mod diagnostics;
pub mod idempotency;
pub mod orders;
pub mod outbox;
pub mod partitions;
pub mod postgres;
pub mod products;
pub mod search;
pub mod teams;
pub mod users;

use chrono::{DateTime, Utc};
use sqlx::{
    PgConnection, Postgres, QueryBuilder,
    error::BoxDynError,
    postgres::{PgRow, PgTypeInfo, PgValueRef},
};

use crate::{
    error::Result,
    model::{Id, orders::OrderStatus, paging::keyset_time, teams::TeamRole, users::UserStatus},
};

// Model values read straight from their columns (a row's `FromRow`, or a
// tuple): a value the model refuses breaks an invariant of the schema and
// fails the read (an internal error naming the column and the value).

impl sqlx::Type<Postgres> for Id {
    fn type_info() -> PgTypeInfo {
        <i64 as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <i64 as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for Id {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let raw = <i64 as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(Id::parse(raw).map_err(|e| format!("id {raw} in the database: {e}"))?)
    }
}

/// Enums stored by their wire name (`as_str`) in a TEXT column, read back
/// with `parse`; `what` names the value in the error for an unknown name.
macro_rules! decode_by_name {
    ($($name:ty: $what:literal),+ $(,)?) => {$(
        impl sqlx::Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let name = <&str as sqlx::Decode<Postgres>>::decode(value)?;
                Ok(<$name>::parse(name).ok_or_else(|| {
                    format!(concat!("unknown ", $what, " {:?} in the database"), name)
                })?)
            }
        }
    )+};
}

decode_by_name!(
    UserStatus: "user status",
    OrderStatus: "order status",
    TeamRole: "team role",
);

/// The one value `sql` selects for the id bound to `$1`; `None` when no row
/// matches.
pub(crate) async fn scalar_for_id<T>(
    conn: &mut PgConnection,
    sql: &'static str,
    id: Id,
) -> Result<Option<T>>
where
    (T,): for<'r> sqlx::FromRow<'r, PgRow>,
    T: Send + Unpin,
{
    Ok(sqlx::query_scalar(sql)
        .bind(id.get())
        .fetch_optional(conn)
        .await?)
}

/// The raw values of `ids`, to bind as a `bigint[]`.
/// The rows `sql` selects for the ids bound to `$1` (as `= ANY($1)`), in
/// the order `sql` gives them.
pub(crate) async fn rows_for_ids<T>(
    conn: &mut PgConnection,
    sql: &str,
    ids: &[Id],
) -> Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    Ok(sqlx::query_as(sql)
        .bind(raw_ids(ids))
        .fetch_all(conn)
        .await?)
}

pub(crate) fn raw_ids(ids: &[Id]) -> Vec<i64> {
    ids.iter().map(|id| id.get()).collect()
}

/// The order a list walks `(created_at, id)` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListOrder {
    OldestFirst,
    NewestFirst,
}

/// Appends a list's predicates: the `status` asked for, the
/// `[after, before)` window on `created_at` and the keyset
/// condition past `cursor` (created_at µs, id): after it in ascending order,
/// before it when listing newest first.
pub(crate) fn push_list_predicates(
    q: &mut QueryBuilder<'_, Postgres>,
    order: ListOrder,
    status: Option<&'static str>,
    after: Option<DateTime<Utc>>,
    before: Option<DateTime<Utc>>,
    cursor: Option<(i64, i64)>,
) -> Result<()> {
    if let Some(status) = status {
        q.push(" AND status = ").push_bind(status);
    }
    if let Some(t) = after {
        q.push(" AND created_at >= ").push_bind(t);
    }
    if let Some(t) = before {
        q.push(" AND created_at < ").push_bind(t);
    }
    if let Some((micros, id)) = cursor {
        let op = match order {
            ListOrder::OldestFirst => ">",
            ListOrder::NewestFirst => "<",
        };
        q.push(format!(" AND (created_at, id) {op} ("))
            .push_bind(keyset_time(micros)?)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    Ok(())
}
