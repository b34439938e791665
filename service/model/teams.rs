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
