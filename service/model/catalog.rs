//! Products and their inventory: the product entity, its value types and
//! limits, and the shapes of its writes.

use chrono::{DateTime, Utc};

use super::{Id, bounded_text};

/// The most ids one BatchGetProducts call may ask for.
pub const MAX_BATCH: usize = 100;
/// NUMERIC(12,2) holds up to 9,999,999,999.99.
pub const MAX_PRICE_CENTS: i64 = 999_999_999_999;
/// The largest single inventory adjustment.
pub const MAX_ADJUSTMENT: i32 = 1_000_000;

text_newtype! {
    /// A stock-keeping unit: 1 to 64 of `[A-Za-z0-9._-]`, unique regardless of case.
    Sku
}

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let sku = raw.trim();
        if sku.is_empty() || sku.len() > 64 {
            return Err("must be 1 to 64 characters".into());
        }
        if !sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err("may only contain letters, digits, '.', '_' and '-'".into());
        }
        Ok(Self(sku.to_owned()))
    }
}

text_newtype! {
    /// Free text fields of a product, trimmed and bounded.
    Text
}

impl Text {
    pub fn title(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 1, 200).map(Self)
    }

    pub fn description(raw: &str) -> Result<Self, String> {
        // Descriptions may hold line breaks; other control characters are refused.
        let text = raw.trim();
        if text.chars().count() > 5000 {
            return Err("must be at most 5000 characters".into());
        }
        if text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(
                "must not contain control characters other than line breaks and tabs".into(),
            );
        }
        Ok(Self(text.to_owned()))
    }

    pub fn category(raw: &str) -> Result<Self, String> {
        bounded_text(raw, 1, 64).map(Self)
    }
}

pub fn parse_price(cents: i64) -> Result<i64, String> {
    if (0..=MAX_PRICE_CENTS).contains(&cents) {
        Ok(cents)
    } else {
        Err(format!("must be between 0 and {MAX_PRICE_CENTS} cents"))
    }
}

pub fn parse_rating(rating: f64) -> Result<f64, String> {
    if rating.is_finite() && (0.0..=5.0).contains(&rating) {
        Ok((rating * 100.0).round() / 100.0)
    } else {
        Err("must be between 0 and 5".into())
    }
}

pub fn parse_count(n: i32) -> Result<i32, String> {
    if n >= 0 {
        Ok(n)
    } else {
        Err("must not be negative".into())
    }
}

/// Read straight from its row (`store::products` selects these columns).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Product {
    pub id: Id,
    pub sku: String,
    pub title: String,
    pub description: String,
    pub category: String,
    pub price_cents: i64,
    pub rating: f64,
    pub review_count: i32,
    pub inventory: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub sku: Sku,
    pub title: Text,
    pub description: Text,
    pub category: Text,
    pub price_cents: i64,
    pub rating: f64,
    pub review_count: i32,
    pub inventory: i32,
}

#[derive(Debug, Clone, Default)]
pub struct ProductPatch {
    pub title: Option<Text>,
    pub description: Option<Text>,
    pub category: Option<Text>,
    pub price_cents: Option<i64>,
    pub rating: Option<f64>,
    pub review_count: Option<i32>,
}

impl ProductPatch {
    pub fn is_empty(&self) -> bool {
        self.title.is_none()
            && self.description.is_none()
            && self.category.is_none()
            && self.price_cents.is_none()
            && self.rating.is_none()
            && self.review_count.is_none()
    }
}
