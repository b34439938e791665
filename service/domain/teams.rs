//! Teams and team membership.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    error::{Detail, Error, Result},
    paging::{Page, PageRequest, PageTokens},
    users::{Id, bounded_text, user_not_found},
};
use crate::store;

/// A team name: 1 to 100 characters, unique regardless of case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamName(String);

impl TeamName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 1, 100).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeamRole {
    Member,
    Maintainer,
    Owner,
}

impl TeamRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Maintainer => "maintainer",
            Self::Owner => "owner",
        }
    }

    pub fn from_db(s: &str) -> anyhow::Result<Self> {
        match s {
            "member" => Ok(Self::Member),
            "maintainer" => Ok(Self::Maintainer),
            "owner" => Ok(Self::Owner),
            other => anyhow::bail!("unknown team role {other:?} in the database"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: Id,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub team: Team,
    pub user_id: Id,
    pub role: TeamRole,
    pub joined_at: DateTime<Utc>,
}

/// Keyset position in a user's teams: (joined_at µs, team id).
pub type MembershipCursor = (i64, i64);

pub fn team_not_found(id: Id) -> Error {
    Error::NotFound(
        Detail::new("TEAM_NOT_FOUND", format!("team {id} does not exist")).with("team_id", id),
    )
}

#[derive(Clone)]
pub struct Teams {
    db: PgPool,
    pages: PageTokens,
}

impl Teams {
    pub fn new(db: PgPool, pages: PageTokens) -> Self {
        Self { db, pages }
    }

    #[tracing::instrument(skip_all, err(Debug))]
    pub async fn create(&self, name: TeamName) -> Result<Team> {
        let mut conn = self.db.acquire().await?;
        let team = store::teams::insert_team(&mut conn, &name).await?;
        tracing::info!(team_id = %team.id, "team created");
        Ok(team)
    }

    /// The user row is locked (FOR SHARE) while the membership is inserted,
    /// so a concurrent delete cannot leave a deleted user in a team.
    #[tracing::instrument(skip_all, fields(team_id = %team_id, user_id = %user_id), err(Debug))]
    pub async fn add_member(&self, team_id: Id, user_id: Id, role: TeamRole) -> Result<Membership> {
        let mut tx = self.db.begin().await?;
        if !store::teams::lock_live_user(&mut tx, user_id).await? {
            return Err(user_not_found(user_id));
        }
        let membership = store::teams::insert_membership(&mut tx, team_id, user_id, role).await?;
        tx.commit().await?;
        Ok(membership)
    }

    #[tracing::instrument(skip_all, fields(team_id = %team_id, user_id = %user_id), err(Debug))]
    pub async fn remove_member(&self, team_id: Id, user_id: Id) -> Result<()> {
        let mut conn = self.db.acquire().await?;
        if store::teams::delete_membership(&mut conn, team_id, user_id).await? {
            return Ok(());
        }
        Err(if !store::teams::team_exists(&mut conn, team_id).await? {
            team_not_found(team_id)
        } else {
            Error::NotFound(
                Detail::new(
                    "TEAM_MEMBER_NOT_FOUND",
                    format!("user {user_id} is not a member of team {team_id}"),
                )
                .with("team_id", team_id)
                .with("user_id", user_id),
            )
        })
    }

    #[tracing::instrument(skip_all, fields(user_id = %user_id), err(Debug))]
    pub async fn list_for_user(&self, user_id: Id, page: PageRequest) -> Result<Page<Membership>> {
        let query = format!("user={user_id}");
        let after: Option<MembershipCursor> = page
            .token
            .as_deref()
            .map(|t| self.pages.decode("user_teams", &query, t))
            .transpose()?;
        let mut conn = self.db.acquire().await?;
        if store::users::current_version(&mut conn, user_id)
            .await?
            .is_none()
        {
            return Err(user_not_found(user_id));
        }
        let items =
            store::teams::memberships_of(&mut conn, user_id, after, page.size.fetch_limit())
                .await?;
        Ok(Page::from_overfetch(items, page.size, |last| {
            let cursor: MembershipCursor = (last.joined_at.timestamp_micros(), last.team.id.get());
            self.pages.encode("user_teams", &query, &cursor)
        }))
    }
}
