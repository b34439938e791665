//! Product search: the normalized text, filters, sorts and keyset positions
//! of a search, its pages, the record each search leaves in the search log,
//! and the insights computed from that log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Id, bounded_text, catalog::Product, paging::PageRequest};

wire_enum! {
    /// How results are ordered; ties are broken by product id.
    #[derive(Serialize, Deserialize)]
    pub enum SearchSort {
        Relevance = "relevance",
        PriceAscending = "price_ascending",
        PriceDescending = "price_descending",
        Newest = "newest",
        Rating = "rating",
    }
}

/// The sort key of the last row of a page, with its id.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SortKey {
    /// `ts_rank` (a `real` in SQL, compared exactly).
    Rank(f32, i64),
    PriceCents(i64, i64),
    CreatedMicros(i64, i64),
    /// Hundredths of a star.
    RatingHundredths(i32, i64),
}

/// What a search selects, besides the text.
#[derive(Debug, Clone, Default)]
pub struct SearchFilters {
    /// Exact category names; empty means every category.
    pub categories: Vec<String>,
    pub min_price_cents: Option<i64>,
    pub max_price_cents: Option<i64>,
    pub min_rating: Option<f64>,
}

/// One page of a search.
#[derive(Debug, Clone, Copy)]
pub struct SearchQuery<'a> {
    /// Normalized search text.
    pub text: &'a str,
    pub filters: &'a SearchFilters,
    pub sort: SearchSort,
    /// Where the previous page ended.
    pub after: Option<SortKey>,
    pub limit: i64,
}

/// One search, as recorded in `product_searches`.
#[derive(Debug, Clone)]
pub struct SearchRecord {
    pub user_id: Option<i64>,
    /// The normalized query text.
    pub query: String,
    pub filters: serde_json::Value,
    /// Products on the page served.
    pub results_count: i32,
    pub processing_time_ms: f32,
    pub page: i32,
    pub searched_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueryStats {
    pub query: String,
    pub searches: i64,
    pub users: i64,
    pub average_results: f64,
    pub average_processing_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchInsights {
    pub total_searches: i64,
    pub zero_result_searches: i64,
    pub top_queries: Vec<QueryStats>,
    pub zero_result_queries: Vec<QueryStats>,
}

pub const MAX_QUERY_CHARS: usize = 200;
pub const MAX_CATEGORIES: usize = 20;
pub const DEFAULT_PAGE_SIZE: u32 = 20;
pub const MAX_PAGE_SIZE: u32 = 100;

text_newtype! {
    /// Search text, normalized: trimmed, single spaces, lower case (full-text
    /// and trigram matching ignore case anyway, and the cache and the search log
    /// then see one form of each query).
    SearchText
}

impl SearchText {
    pub fn parse(raw: &str) -> Result<Self, String> {
        // Whitespace of any kind (tabs, line breaks) separates words. The
        // bound applies to the lower-cased text, what is searched and
        // stored: lower-casing can lengthen it (`İ` becomes `i̇`, two chars).
        let words = raw.split_whitespace().collect::<Vec<_>>().join(" ");
        Ok(Self(bounded_text(
            &words.to_lowercase(),
            1,
            MAX_QUERY_CHARS,
        )?))
    }
}

#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub text: SearchText,
    pub filters: SearchFilters,
    pub sort: SearchSort,
    pub page: PageRequest,
    /// The end user searching, for the search log.
    pub user_id: Option<Id>,
}

impl SearchRequest {
    /// What a page token is bound to: everything but the page.
    pub(crate) fn canonical(&self) -> String {
        serde_json::json!({
            "q": self.text.as_str(),
            "f": self.filters_json(),
        })
        .to_string()
    }

    pub(crate) fn filters_json(&self) -> serde_json::Value {
        let f = &self.filters;
        let mut json = serde_json::json!({ "sort": self.sort.as_str() });
        if !f.categories.is_empty() {
            json["categories"] = serde_json::json!(f.categories);
        }
        if let Some(v) = f.min_price_cents {
            json["min_price_cents"] = v.into();
        }
        if let Some(v) = f.max_price_cents {
            json["max_price_cents"] = v.into();
        }
        if let Some(v) = f.min_rating {
            json["min_rating"] = v.into();
        }
        json
    }
}

#[derive(Debug, Clone)]
pub struct SearchPage {
    pub products: Vec<Product>,
    pub next_page_token: Option<String>,
    /// The text searched instead of the request's, when no word of the
    /// request matched and misspellings were corrected.
    pub corrected_query: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_text_is_trimmed_collapsed_and_lower_cased() {
        let text = SearchText::parse("  Wireless\t HEADPHONES \n").unwrap();
        assert_eq!(text.as_str(), "wireless headphones");
        assert!(SearchText::parse("   ").is_err());
        assert!(SearchText::parse(&"a".repeat(MAX_QUERY_CHARS + 1)).is_err());
        assert!(SearchText::parse(&"é".repeat(MAX_QUERY_CHARS)).is_ok());
        assert!(SearchText::parse("lamp\u{7}").is_err());
    }

    /// A crash of the `search_text` fuzz target (its round-trip check): 101
    /// `İ` passed the bound and lower-cased to 202 characters, text that no
    /// longer parsed.
    #[test]
    fn the_bound_applies_to_the_lower_cased_text() {
        assert!(SearchText::parse(&"İ".repeat(101)).is_err());
        let longest = SearchText::parse(&"İ".repeat(100)).unwrap();
        assert_eq!(longest.as_str().chars().count(), MAX_QUERY_CHARS);
        assert_eq!(
            SearchText::parse(longest.as_str()).unwrap().as_str(),
            longest.as_str()
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn parsed_text_is_normalized_and_parsing_it_again_changes_nothing(raw in "\\PC{0,250}") {
                if let Ok(text) = SearchText::parse(&raw) {
                    let s = text.as_str();
                    prop_assert!(!s.is_empty() && s.chars().count() <= MAX_QUERY_CHARS);
                    prop_assert_eq!(s, s.trim());
                    prop_assert!(!s.contains("  ") && !s.contains(['\t', '\n', '\r']));
                    prop_assert_eq!(s.to_lowercase(), s);
                    let again = SearchText::parse(s).unwrap();
                    prop_assert_eq!(again.as_str(), s);
                }
            }

            #[test]
            fn words_survive_parsing_in_order(words in prop::collection::vec("[a-zA-Z0-9]{1,10}", 1..8)) {
                let raw = format!("  {}\t", words.join(" \n "));
                let text = SearchText::parse(&raw).unwrap();
                let expected = words.join(" ").to_lowercase();
                prop_assert_eq!(text.as_str(), expected.as_str());
            }
        }
    }
}
