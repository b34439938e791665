//! SQL for product search and the search log.
//!
//! **Matching.** A query is matched with full-text search:
//! `products.search_vector @@ websearch_to_tsquery('english', query)`, served
//! by the GIN index on the generated `search_vector`; relevance is `ts_rank`
//! (title words weigh most). When nothing matches, the caller may correct
//! the query's words with [`corrections`]: each word's most similar word of
//! any title, by trigram similarity over the small `search_words` table. That
//! is how pg_trgm earns its cost here: matching trigrams against every title
//! of a million products took hundreds of milliseconds a query, while the
//! vocabulary holds a few thousand words and answers in about a millisecond,
//! and only for queries that found nothing.
//!
//! **Paging.** Keyset on the sort key and the product id (the tie-breaker):
//! each sort has its own [`SortKey`], and the next page starts strictly after
//! the last row served, so pages neither repeat nor skip rows, ties included.
//! The page is chosen by id first and joined to inventory afterwards, so only
//! the page's rows are joined.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::products::product_columns;
use crate::{
    error::Result,
    model::{
        catalog::Product,
        paging::keyset_time,
        search::{QueryStats, SearchInsights, SearchQuery, SearchRecord, SearchSort, SortKey},
    },
};

#[derive(sqlx::FromRow)]
struct SearchRow {
    #[sqlx(flatten)]
    product: Product,
    rank: f32,
    rating_hundredths: i32,
}

/// One page of matches (at most `limit`), each with its sort key.
pub async fn search(
    conn: &mut PgConnection,
    query: SearchQuery<'_>,
) -> Result<Vec<(Product, SortKey)>> {
    let sort = query.sort;
    // Not a prepared statement: PostgreSQL would switch to a generic plan
    // after a few runs, and no one plan suits both a rare and a common word,
    // or a narrow and a wide price range (the generic plan intersected the
    // matches with half the price index). Planning each search with its
    // values costs well under a millisecond.
    let rows: Vec<SearchRow> = statement("", query)?
        .build_query_as()
        .persistent(false)
        .fetch_all(conn)
        .await?;
    rows.into_iter()
        .map(|row| {
            let product = row.product;
            let id = product.id.get();
            let key = match sort {
                SearchSort::Relevance => SortKey::Rank(row.rank, id),
                SearchSort::PriceAscending | SearchSort::PriceDescending => {
                    SortKey::PriceCents(product.price_cents, id)
                }
                SearchSort::Newest => {
                    SortKey::CreatedMicros(product.created_at.timestamp_micros(), id)
                }
                SearchSort::Rating => SortKey::RatingHundredths(row.rating_hundredths, id),
            };
            Ok((product, key))
        })
        .collect()
}

/// The statement of one search page, after `prefix` (such as `EXPLAIN`).
pub fn statement<'a>(prefix: &str, query: SearchQuery<'a>) -> Result<QueryBuilder<'a, Postgres>> {
    let SearchQuery {
        text,
        filters,
        sort,
        after,
        limit,
    } = query;
    let mut q = QueryBuilder::new(prefix);
    q.push("WITH q AS (SELECT websearch_to_tsquery('english', ")
        .push_bind(text.to_owned())
        .push(
            ") AS tsq), page AS (SELECT p.id, ts_rank(p.search_vector, q.tsq) AS rank \
             FROM products p, q WHERE p.search_vector @@ q.tsq",
        );
    if !filters.categories.is_empty() {
        q.push(" AND p.category = ANY(")
            .push_bind(filters.categories.clone())
            .push(")");
    }
    if let Some(min) = filters.min_price_cents {
        q.push(" AND p.price >= ")
            .push_bind(min)
            .push("::bigint / 100.0");
    }
    if let Some(max) = filters.max_price_cents {
        q.push(" AND p.price <= ")
            .push_bind(max)
            .push("::bigint / 100.0");
    }
    if let Some(min) = filters.min_rating {
        q.push(" AND p.rating >= ").push_bind(min).push("::numeric");
    }
    if let Some(after) = after {
        q.push(" AND ");
        match after {
            SortKey::Rank(r, id) => {
                q.push("(ts_rank(p.search_vector, q.tsq), p.id) < (")
                    .push_bind(r)
                    .push("::real, ")
                    .push_bind(id)
                    .push(")");
            }
            SortKey::PriceCents(cents, id) => {
                let op = if sort == SearchSort::PriceAscending {
                    ">"
                } else {
                    "<"
                };
                q.push(format!("(p.price, p.id) {op} ("))
                    .push_bind(cents)
                    .push("::bigint / 100.0, ")
                    .push_bind(id)
                    .push(")");
            }
            SortKey::CreatedMicros(micros, id) => {
                q.push("(p.created_at, p.id) < (")
                    .push_bind(keyset_time(micros)?)
                    .push(", ")
                    .push_bind(id)
                    .push(")");
            }
            SortKey::RatingHundredths(hundredths, id) => {
                q.push("(p.rating, p.id) < (")
                    .push_bind(hundredths)
                    .push("::int / 100.0, ")
                    .push_bind(id)
                    .push(")");
            }
        }
    }
    // The same order inside `page` (where `rank` is its output column) and
    // on the joined rows outside it.
    let order = |rank: &str| match sort {
        SearchSort::Relevance => format!("{rank} DESC, p.id DESC"),
        SearchSort::PriceAscending => "p.price ASC, p.id ASC".into(),
        SearchSort::PriceDescending => "p.price DESC, p.id DESC".into(),
        SearchSort::Newest => "p.created_at DESC, p.id DESC".into(),
        SearchSort::Rating => "p.rating DESC, p.id DESC".into(),
    };
    q.push(format!(" ORDER BY {} LIMIT ", order("rank")))
        .push_bind(limit)
        .push(concat!(
            ") SELECT ",
            product_columns!(),
            ", page.rank, (p.rating * 100)::int AS rating_hundredths \
             FROM page JOIN products p ON p.id = page.id \
             JOIN inventory i ON i.product_id = p.id"
        ));
    q.push(format!(" ORDER BY {}", order("page.rank")));
    Ok(q)
}

/// For each word, the most similar title word (trigram similarity of at
/// least `pg_trgm.similarity_threshold`, 0.3 by default), if any; a word
/// titles have is its own answer. One statement for all the words.
pub async fn corrections(conn: &mut PgConnection, words: &[String]) -> Result<Vec<Option<String>>> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT s.word FROM search_words s WHERE s.word % w.word \
                 ORDER BY similarity(s.word, w.word) DESC, s.word LIMIT 1) \
         FROM unnest($1::text[]) WITH ORDINALITY AS w(word, n) ORDER BY w.n",
    )
    .bind(words)
    .fetch_all(conn)
    .await?)
}

/// Inserts a batch of search records in one statement.
pub async fn insert_records(conn: &mut PgConnection, records: &[SearchRecord]) -> Result<u64> {
    let mut user_ids = Vec::with_capacity(records.len());
    let mut queries = Vec::with_capacity(records.len());
    let mut filters = Vec::with_capacity(records.len());
    let mut counts = Vec::with_capacity(records.len());
    let mut times = Vec::with_capacity(records.len());
    let mut pages = Vec::with_capacity(records.len());
    let mut at = Vec::with_capacity(records.len());
    for r in records {
        user_ids.push(r.user_id);
        queries.push(r.query.as_str());
        filters.push(&r.filters);
        counts.push(r.results_count);
        times.push(r.processing_time_ms);
        pages.push(r.page);
        at.push(r.searched_at);
    }
    let done = sqlx::query(
        "INSERT INTO product_searches \
           (user_id, query, filters, results_count, processing_time_ms, page, searched_at) \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::jsonb[], $4::int[], $5::real[], \
                              $6::int[], $7::timestamptz[])",
    )
    .bind(user_ids)
    .bind(queries)
    .bind(filters)
    .bind(counts)
    .bind(times)
    .bind(pages)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// The searches of a window that insights count: first pages only.
macro_rules! window_searches {
    () => {
        "FROM product_searches WHERE searched_at >= $1 AND searched_at < $2 AND page = 1"
    };
}

/// The most frequent queries of the window [$1, $2), at most $3.
pub const TOP_QUERIES: &str = concat!(
    "SELECT query, count(*) AS searches, count(DISTINCT user_id) AS users, \
     avg(results_count)::float8 AS average_results, \
     avg(processing_time_ms)::float8 AS average_processing_ms ",
    window_searches!(),
    " GROUP BY query ORDER BY searches DESC, query LIMIT $3"
);

/// The most frequent queries of the window that found nothing, at most $3.
pub const ZERO_RESULT_QUERIES: &str = concat!(
    "SELECT query, count(*) AS searches, count(DISTINCT user_id) AS users, \
     0::float8 AS average_results, \
     avg(processing_time_ms)::float8 AS average_processing_ms ",
    window_searches!(),
    " AND results_count = 0 GROUP BY query ORDER BY searches DESC, query LIMIT $3"
);

/// Searches and zero-result searches in the window.
pub const SEARCH_TOTALS: &str = concat!(
    "SELECT count(*), count(*) FILTER (WHERE results_count = 0) ",
    window_searches!()
);

/// Insights over [start, end): partition pruning limits every statement to
/// the partitions the window overlaps.
pub async fn insights(
    conn: &mut PgConnection,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    limit: i64,
) -> Result<SearchInsights> {
    let (total_searches, zero_result_searches): (i64, i64) = sqlx::query_as(SEARCH_TOTALS)
        .bind(start)
        .bind(end)
        .fetch_one(&mut *conn)
        .await?;
    let mut lists = Vec::with_capacity(2);
    for sql in [TOP_QUERIES, ZERO_RESULT_QUERIES] {
        let stats: Vec<QueryStats> = sqlx::query_as(sql)
            .bind(start)
            .bind(end)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        lists.push(stats);
    }
    let zero_result_queries = lists.pop().unwrap_or_default();
    let top_queries = lists.pop().unwrap_or_default();
    Ok(SearchInsights {
        total_searches,
        zero_result_searches,
        top_queries,
        zero_result_queries,
    })
}
