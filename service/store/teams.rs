//! SQL for `teams` and `user_teams`.

use sqlx::PgConnection;

use crate::{
    error::Result,
    model::{
        Id,
        paging::keyset_time,
        teams::{Membership, MembershipCursor, Team, TeamName, TeamRole},
    },
};

/// The columns of a [`Membership`], from memberships `m` joined to `teams t`.
macro_rules! membership_columns {
    () => {
        "t.id, t.name, t.created_at, m.user_id, m.role, m.joined_at"
    };
}

pub async fn insert_team(conn: &mut PgConnection, name: &TeamName) -> Result<Team> {
    Ok(
        sqlx::query_as("INSERT INTO teams (name) VALUES ($1) RETURNING id, name, created_at")
            .bind(name.as_str())
            .fetch_one(conn)
            .await?,
    )
}

pub async fn team_exists(conn: &mut PgConnection, id: Id) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM teams WHERE id = $1)")
            .bind(id.get())
            .fetch_one(conn)
            .await?,
    )
}

pub async fn insert_membership(
    conn: &mut PgConnection,
    team_id: Id,
    user_id: Id,
    role: TeamRole,
) -> Result<Membership> {
    let membership: Membership = sqlx::query_as(concat!(
        "WITH m AS ( \
           INSERT INTO user_teams (team_id, user_id, role) VALUES ($1, $2, $3) \
           RETURNING team_id, user_id, role, joined_at) \
         SELECT ",
        membership_columns!(),
        " FROM m JOIN teams t ON t.id = m.team_id"
    ))
    .bind(team_id.get())
    .bind(user_id.get())
    .bind(role.as_str())
    .fetch_one(conn)
    .await?;
    Ok(membership)
}

pub async fn delete_membership(conn: &mut PgConnection, team_id: Id, user_id: Id) -> Result<bool> {
    let done = sqlx::query("DELETE FROM user_teams WHERE team_id = $1 AND user_id = $2")
        .bind(team_id.get())
        .bind(user_id.get())
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn remove_all_memberships(conn: &mut PgConnection, user_id: Id) -> Result<u64> {
    let done = sqlx::query("DELETE FROM user_teams WHERE user_id = $1")
        .bind(user_id.get())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// A user's memberships in join order, after the keyset position `after`.
pub async fn memberships_of(
    conn: &mut PgConnection,
    user_id: Id,
    after: Option<MembershipCursor>,
    limit: i64,
) -> Result<Vec<Membership>> {
    let (after_at, after_team) = match after {
        Some((micros, team)) => (Some(keyset_time(micros)?), team),
        None => (None, 0),
    };
    let memberships: Vec<Membership> = sqlx::query_as(concat!(
        "SELECT ",
        membership_columns!(),
        " FROM user_teams m JOIN teams t ON t.id = m.team_id \
         WHERE m.user_id = $1 \
           AND ($2::timestamptz IS NULL OR (m.joined_at, m.team_id) > ($2, $3)) \
         ORDER BY m.joined_at, m.team_id \
         LIMIT $4"
    ))
    .bind(user_id.get())
    .bind(after_at)
    .bind(after_team)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(memberships)
}
