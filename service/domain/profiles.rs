//! User profiles: names, preferences and a few addresses, embedded in one
//! MongoDB document per user (`user_profiles`, `_id` = user id). Parsing
//! and operations; types in `model::profiles`, documents in
//! `documents::profiles`.

use super::users::Users;
use crate::{
    documents::{Mongo, profiles as store},
    error::{Detail, Error, Result, Violations, reason},
    model::{
        Id, bounded_text,
        consistency::Consistency,
        profiles::{Address, MAX_ADDRESSES, Preferences, Profile, ProfilePatch},
    },
};

pub fn parse_name(raw: &str) -> Result<String, String> {
    bounded_text(raw, 0, 100)
}

pub fn parse_preferences(v: &mut Violations, field: &str, raw: Preferences) -> Preferences {
    let language = raw.language.trim();
    let language_ok = language.is_empty()
        || language.split('-').enumerate().all(|(i, part)| {
            let len_ok = if i == 0 {
                (2..=3).contains(&part.len())
            } else {
                (2..=8).contains(&part.len())
            };
            len_ok && part.chars().all(|c| c.is_ascii_alphanumeric())
        });
    if !language_ok {
        v.add(
            format!("{field}.language"),
            "must be a BCP 47 language tag such as \"en\" or \"pt-BR\", or empty",
        );
    }
    let currency = raw.currency.trim().to_ascii_uppercase();
    if !(currency.is_empty()
        || (currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase())))
    {
        v.add(
            format!("{field}.currency"),
            "must be an ISO 4217 code such as \"EUR\", or empty",
        );
    }
    Preferences {
        language: language.to_owned(),
        currency,
        marketing_emails: raw.marketing_emails,
    }
}

/// The address list: at most [`MAX_ADDRESSES`], each valid, and exactly one
/// primary when there are any.
pub fn parse_addresses(v: &mut Violations, field: &str, raw: Vec<Address>) -> Vec<Address> {
    if raw.len() > MAX_ADDRESSES {
        v.add(
            field,
            format!("must hold at most {MAX_ADDRESSES} addresses"),
        );
    }
    let primaries = raw.iter().filter(|a| a.primary).count();
    if !raw.is_empty() && primaries != 1 {
        v.add(
            field,
            format!("exactly one address must be primary ({primaries} are)"),
        );
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let at = |name: &str| format!("{field}[{i}].{name}");
            let mut text = |name: &str, value: &str, min: usize, max: usize| {
                v.check(&at(name), bounded_text(value, min, max))
                    .unwrap_or_default()
            };
            let label = text("label", &a.label, 1, 40);
            let line1 = text("line1", &a.line1, 1, 200);
            let line2 = text("line2", &a.line2, 0, 200);
            let city = text("city", &a.city, 1, 100);
            let region = text("region", &a.region, 0, 100);
            let postal_code = text("postal_code", &a.postal_code, 1, 20);
            let country = a.country.trim().to_ascii_uppercase();
            if country.len() != 2 || !country.chars().all(|c| c.is_ascii_uppercase()) {
                v.add(
                    at("country"),
                    "must be an ISO 3166-1 alpha-2 code such as \"DE\"",
                );
            }
            Address {
                label,
                line1,
                line2,
                city,
                region,
                postal_code,
                country,
                primary: a.primary,
            }
        })
        .collect()
}

pub fn mongodb_not_configured() -> Error {
    Error::FailedPrecondition(Detail::new(
        reason::MONGODB_NOT_CONFIGURED,
        "this deployment has no document store (mongodb.url); profiles, price history and market analyses are off",
    ))
}

#[derive(Clone)]
pub struct Profiles {
    users: Users,
    mongo: Option<Mongo>,
}

impl Profiles {
    pub fn new(users: Users, mongo: Option<Mongo>) -> Self {
        Self { users, mongo }
    }

    fn mongo(&self) -> Result<&Mongo> {
        self.mongo.as_ref().ok_or_else(mongodb_not_configured)
    }

    /// The profile of a live user (empty if never written).
    #[tracing::instrument(skip_all, fields(user_id = %id), err(level = "info", Debug))]
    pub async fn get(&self, id: Id) -> Result<Profile> {
        let mongo = self.mongo()?;
        self.users.get(id, Consistency::Strong).await?;
        Ok(store::find(mongo, id.get()).await?.unwrap_or(Profile {
            user_id: id.get(),
            ..Profile::default()
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %id), err(level = "info", Debug))]
    pub async fn update(&self, id: Id, patch: ProfilePatch) -> Result<Profile> {
        let mongo = self.mongo()?;
        if patch.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "must name at least one of: given_name, family_name, preferences, addresses",
            ));
        }
        self.users.get(id, Consistency::Strong).await?;
        store::update(mongo, id.get(), &patch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(primary: bool) -> Address {
        Address {
            label: "home".into(),
            line1: "1 Main St".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "de".into(),
            primary,
            ..Address::default()
        }
    }

    #[test]
    fn addresses_need_exactly_one_primary_and_at_most_five() {
        let mut v = Violations::default();
        let parsed = parse_addresses(&mut v, "a", vec![address(true), address(false)]);
        assert!(v.into_result().is_ok());
        assert_eq!(parsed[0].country, "DE");
        for list in [
            vec![address(false)],
            vec![address(true), address(true)],
            vec![address(true); 6],
        ] {
            let mut v = Violations::default();
            parse_addresses(&mut v, "a", list);
            assert!(v.into_result().is_err());
        }
        let mut v = Violations::default();
        parse_addresses(&mut v, "a", vec![]);
        assert!(v.into_result().is_ok(), "no addresses at all is fine");
    }

    #[test]
    fn preferences_take_language_tags_and_currency_codes() {
        let mut v = Violations::default();
        let p = parse_preferences(
            &mut v,
            "p",
            Preferences {
                language: "pt-BR".into(),
                currency: "eur".into(),
                marketing_emails: true,
            },
        );
        assert!(v.into_result().is_ok());
        assert_eq!(p.currency, "EUR");
        let mut v = Violations::default();
        parse_preferences(
            &mut v,
            "p",
            Preferences {
                language: "english please".into(),
                currency: "EURO".into(),
                marketing_emails: false,
            },
        );
        assert!(v.into_result().is_err());
    }
}
