//! Teams and team membership.

use chrono::{DateTime, Utc};

use super::{Id, bounded_text};

text_newtype! {
    /// A team name: 1 to 100 characters, unique regardless of case.
    TeamName
}

impl TeamName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 1, 100).map(Self)
    }
}

wire_enum! {
    pub enum TeamRole {
        Member = "member",
        Maintainer = "maintainer",
        Owner = "owner",
    }
}

/// Read straight from its row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Team {
    pub id: Id,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// Read straight from its row: the team's columns, then the membership's.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Membership {
    #[sqlx(flatten)]
    pub team: Team,
    pub user_id: Id,
    pub role: TeamRole,
    pub joined_at: DateTime<Utc>,
}

/// Keyset position in a user's teams: (joined_at µs, team id).
pub type MembershipCursor = (i64, i64);
