//! Product search: parsed requests, keyset pages, the cache, and the search
//! log.
//!
//! **Caching.** A page is cached as the ordered product ids and the next
//! page token, under a hash of the normalized request (text, filters, sort,
//! page size and page token), in the [`Family::Search`] family: any product
//! write that can change a result (create, update) makes every cached page
//! stale at once. Products themselves come from the product cache, so a
//! stock change (which no search depends on) touches no cached page and a
//! cached page still shows current stock.

use std::{collections::HashMap, time::Instant};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::{
    cache::{Cache, Family},
    error::Result,
    loaders::cached_products,
    model::{
        Id,
        catalog::{Product, Text},
        paging::{Listing, PageSize, PageTokens},
        search::{
            DEFAULT_PAGE_SIZE, MAX_CATEGORIES, MAX_PAGE_SIZE, SearchPage, SearchQuery,
            SearchRecord, SearchRequest, SortKey,
        },
    },
    retry,
    search_log::SearchLog,
    store::{self, postgres::Reads},
};

const TOKEN_SCOPE: &str = "search";

/// The page size of a search: 0 means [`DEFAULT_PAGE_SIZE`], larger than
/// [`MAX_PAGE_SIZE`] is coerced down.
pub fn parse_page_size(requested: i32) -> Result<PageSize, String> {
    let requested = if requested == 0 {
        DEFAULT_PAGE_SIZE as i32
    } else {
        requested
    };
    PageSize::parse(requested).map(|size| size.capped(MAX_PAGE_SIZE))
}

/// Category filter: each a valid category name, at most [`MAX_CATEGORIES`],
/// sorted and without duplicates.
pub fn parse_categories(raw: &[String]) -> Result<Vec<String>, String> {
    if raw.len() > MAX_CATEGORIES {
        return Err(format!("must name at most {MAX_CATEGORIES} categories"));
    }
    let mut categories = raw
        .iter()
        .map(|c| Text::category(c).map(|t| t.as_str().to_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    categories.sort();
    categories.dedup();
    Ok(categories)
}

/// What a page token holds.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    /// The page the token leads to (2 for the first token).
    page: u32,
    /// The corrected text the first page was searched with, if it was.
    corrected: Option<String>,
    after: SortKey,
}

/// A page as cached: ids in order, the next token, the correction.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedPage {
    ids: Vec<i64>,
    next_page_token: Option<String>,
    corrected: Option<String>,
}

#[derive(Clone)]
pub struct ProductSearch {
    /// The primary: products of cached pages are read through the cache,
    /// which only the primary may fill.
    db: PgPool,
    /// The search itself: lag-tolerant.
    reads: Reads,
    cache: Cache,
    pages: PageTokens,
    log: SearchLog,
}

impl ProductSearch {
    pub fn new(db: PgPool, reads: Reads, cache: Cache, pages: PageTokens, log: SearchLog) -> Self {
        Self {
            db,
            reads,
            cache,
            pages,
            log,
        }
    }

    #[tracing::instrument(skip_all, fields(query = request.text.as_str(), sort = request.sort.as_str()), err(level = "info", Debug))]
    pub async fn search(&self, request: SearchRequest) -> Result<SearchPage> {
        let started = Instant::now();
        let canonical = request.canonical();
        let listing = self.pages.listing(TOKEN_SCOPE, &canonical);
        let cursor: Option<Cursor> = listing.after(&request.page)?;
        let page_number = cursor.as_ref().map_or(1, |c| c.page);
        let cache_key = format!(
            "{canonical}|{}|{}",
            request.page.size.get(),
            request.page.token.as_deref().unwrap_or_default()
        );

        // Products read to compute a missed page, so a miss reads each once.
        let mut fresh: Option<HashMap<Id, Product>> = None;
        let cached = self
            .cache
            .get_or_compute(Family::Search, &cache_key, || async {
                let (page, products) = self.compute(&request, &listing, cursor).await?;
                fresh = Some(products);
                Ok(page)
            })
            .await?;
        let by_id = match fresh {
            Some(products) => products,
            None => {
                let ids: Vec<Id> = cached
                    .ids
                    .iter()
                    .filter_map(|id| Id::parse(*id).ok())
                    .collect();
                cached_products(&self.db, &self.cache, &ids).await?
            }
        };
        let products: Vec<Product> = cached
            .ids
            .iter()
            .filter_map(|id| Id::parse(*id).ok().and_then(|id| by_id.get(&id).cloned()))
            .collect();

        let mut filters = request.filters_json();
        if let Some(corrected) = &cached.corrected {
            filters["corrected_query"] = corrected.as_str().into();
        }
        self.log.record(SearchRecord {
            user_id: request.user_id.map(Id::get),
            query: request.text.as_str().to_owned(),
            filters,
            results_count: products.len() as i32,
            processing_time_ms: started.elapsed().as_secs_f32() * 1000.0,
            page: page_number.try_into().unwrap_or(i32::MAX),
            searched_at: chrono::Utc::now(),
        });
        Ok(SearchPage {
            products,
            next_page_token: cached.next_page_token,
            corrected_query: cached.corrected,
        })
    }

    /// Runs the search in PostgreSQL. A first page on which nothing
    /// matches is searched again with misspelt words corrected, if any were.
    async fn compute(
        &self,
        request: &SearchRequest,
        listing: &Listing<'_>,
        cursor: Option<Cursor>,
    ) -> Result<(CachedPage, HashMap<Id, Product>)> {
        let size = request.page.size;
        let (page_number, earlier_correction, after) = match cursor {
            Some(c) => (c.page, c.corrected, Some(c.after)),
            None => (1, None, None),
        };
        let text = earlier_correction
            .as_deref()
            .unwrap_or(request.text.as_str());
        let (rows, corrected) = retry::postgres(|| async {
            let query = |text| SearchQuery {
                text,
                filters: &request.filters,
                sort: request.sort,
                after,
                limit: size.fetch_limit(),
            };
            let mut conn = store::postgres::acquire(self.reads.pool()).await?;
            let mut rows = store::search::search(&mut conn, query(text)).await?;
            let mut corrected = earlier_correction.clone();
            if rows.is_empty() && after.is_none() {
                corrected = correct(&mut conn, request.text.as_str()).await?;
                if let Some(text) = &corrected {
                    rows = store::search::search(&mut conn, query(text)).await?;
                }
            }
            Ok((rows, corrected))
        })
        .await?;
        let rows = listing.page(rows, size, |(_, key)| Cursor {
            page: page_number + 1,
            corrected: corrected.clone(),
            after: *key,
        });
        let page = CachedPage {
            ids: rows.items.iter().map(|(p, _)| p.id.get()).collect(),
            next_page_token: rows.next_page_token,
            corrected,
        };
        let products = rows.items.into_iter().map(|(p, _)| (p.id, p)).collect();
        Ok((page, products))
    }
}

/// A word correction may replace: letters and digits only, 3 or more.
/// (`or` is too short; quoted and excluded words carry punctuation.)
fn is_plain_word(token: &str) -> bool {
    token.chars().count() >= 3 && token.chars().all(char::is_alphanumeric)
}

/// The text with each plain word (letters and digits, 3 or more) replaced by
/// its most similar title word; `None` when nothing changes. Words with
/// search syntax (quotes, a leading `-`) and `or` are kept as they are.
async fn correct(conn: &mut sqlx::PgConnection, text: &str) -> Result<Option<String>> {
    let tokens: Vec<&str> = text.split(' ').collect();
    let words: Vec<String> = tokens
        .iter()
        .filter(|t| is_plain_word(t))
        .map(|t| (*t).to_owned())
        .collect();
    if words.is_empty() {
        return Ok(None);
    }
    let mut replacements = store::search::corrections(conn, &words).await?.into_iter();
    let corrected: Vec<String> = tokens
        .iter()
        .map(|t| match is_plain_word(t) {
            true => replacements
                .next()
                .flatten()
                .unwrap_or_else(|| (*t).to_owned()),
            false => (*t).to_owned(),
        })
        .collect();
    let corrected = corrected.join(" ");
    Ok((corrected != text).then_some(corrected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_sorted_without_duplicates_and_bounded() {
        let raw = ["tools", "audio", "tools"].map(String::from);
        assert_eq!(parse_categories(&raw).unwrap(), ["audio", "tools"]);
        let many: Vec<String> = (0..=MAX_CATEGORIES).map(|i| format!("c{i}")).collect();
        assert!(parse_categories(&many).is_err());
        assert!(parse_categories(&[String::new()]).is_err());
    }

    #[test]
    fn page_sizes_default_to_twenty_and_cap_at_a_hundred() {
        assert_eq!(parse_page_size(0).unwrap().get(), DEFAULT_PAGE_SIZE);
        assert_eq!(parse_page_size(7).unwrap().get(), 7);
        assert_eq!(parse_page_size(1000).unwrap().get(), MAX_PAGE_SIZE);
        assert!(parse_page_size(-1).is_err());
    }

    #[test]
    fn only_plain_words_are_corrected() {
        let plain: Vec<&str> = "wireles \"claw hedphones\" -sledge or hdmi 4k"
            .split(' ')
            .filter(|t| is_plain_word(t))
            .collect();
        assert_eq!(plain, ["wireles", "hdmi"]);
    }
}
