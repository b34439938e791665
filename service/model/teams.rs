//! Teams and team membership.

use chrono::{DateTime, Utc};

use super::{Id, bounded_text};

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

wire_enum! {
    pub enum TeamRole: "team role" {
        Member = "member",
        Maintainer = "maintainer",
        Owner = "owner",
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
