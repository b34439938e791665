//! User profiles: names, preferences and a few addresses, embedded in one
//! document per user.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const MAX_ADDRESSES: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Preferences {
    pub language: String,
    pub currency: String,
    pub marketing_emails: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Address {
    pub label: String,
    pub line1: String,
    pub line2: String,
    pub city: String,
    pub region: String,
    pub postal_code: String,
    pub country: String,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profile {
    pub user_id: i64,
    pub given_name: String,
    pub family_name: String,
    pub preferences: Preferences,
    pub addresses: Vec<Address>,
    /// `None` for a profile never written.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The fields an update sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfilePatch {
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub preferences: Option<Preferences>,
    pub addresses: Option<Vec<Address>>,
}

impl ProfilePatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
