//! `user_profiles` in MongoDB: one document per user, `_id` = user id.

use mongodb::{
    bson::{self, doc},
    options::ReturnDocument,
};
use serde::{Deserialize, Serialize};

use super::mongo::{Mongo, USER_PROFILES, to_document};
use crate::{
    error::Result,
    model::profiles::{Address, Preferences, Profile, ProfilePatch},
};

#[derive(Debug, Serialize, Deserialize)]
struct ProfileDoc {
    #[serde(rename = "_id")]
    user_id: i64,
    #[serde(default)]
    given_name: String,
    #[serde(default)]
    family_name: String,
    #[serde(default)]
    preferences: Preferences,
    #[serde(default)]
    addresses: Vec<Address>,
    /// Epoch milliseconds (see `documents::price_history` on dates).
    updated_at_ms: i64,
}

impl From<ProfileDoc> for Profile {
    fn from(d: ProfileDoc) -> Self {
        Self {
            user_id: d.user_id,
            given_name: d.given_name,
            family_name: d.family_name,
            preferences: d.preferences,
            addresses: d.addresses,
            updated_at: chrono::DateTime::from_timestamp_millis(d.updated_at_ms),
        }
    }
}

pub async fn find(mongo: &Mongo, user_id: i64) -> Result<Option<Profile>> {
    let profiles = mongo.collection::<ProfileDoc>(USER_PROFILES);
    Ok(mongo
        .run(
            "find_one",
            USER_PROFILES,
            profiles
                .find_one(doc! { "_id": user_id })
                .max_time(mongo.max_time()),
        )
        .await?
        .map(Profile::from))
}

/// Sets the patched fields (creating the profile if needed) and returns it.
pub async fn update(mongo: &Mongo, user_id: i64, patch: &ProfilePatch) -> Result<Profile> {
    let mut set = doc! { "updated_at_ms": chrono::Utc::now().timestamp_millis() };
    let mut on_insert = doc! {};
    let mut field = |name: &str, value: Option<bson::Bson>, default: bson::Bson| match value {
        Some(value) => {
            set.insert(name, value);
        }
        None => {
            on_insert.insert(name, default);
        }
    };
    field(
        "given_name",
        patch.given_name.clone().map(Into::into),
        "".into(),
    );
    field(
        "family_name",
        patch.family_name.clone().map(Into::into),
        "".into(),
    );
    field(
        "preferences",
        patch
            .preferences
            .as_ref()
            .map(to_document)
            .transpose()?
            .map(Into::into),
        to_document(&Preferences::default())?.into(),
    );
    let addresses = match &patch.addresses {
        Some(list) => Some(
            list.iter()
                .map(to_document)
                .collect::<Result<Vec<_>>>()?
                .into(),
        ),
        None => None,
    };
    field("addresses", addresses, bson::Bson::Array(Vec::new()));
    let profiles = mongo.collection::<ProfileDoc>(USER_PROFILES);
    let updated = mongo
        .run(
            "find_one_and_update",
            USER_PROFILES,
            profiles
                .find_one_and_update(
                    doc! { "_id": user_id },
                    doc! { "$set": set, "$setOnInsert": on_insert },
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .max_time(mongo.max_time()),
        )
        .await?;
    updated
        .map(Profile::from)
        .ok_or_else(|| anyhow::anyhow!("an upsert returned no document").into())
}

pub async fn delete(mongo: &Mongo, user_id: i64) -> Result<()> {
    let profiles = mongo.collection::<ProfileDoc>(USER_PROFILES);
    mongo
        .run(
            "delete_one",
            USER_PROFILES,
            profiles.delete_one(doc! { "_id": user_id }),
        )
        .await?;
    Ok(())
}
