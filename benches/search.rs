//! SearchProducts at one million products: uncached (PostgreSQL) and cached
//! (Redis) latency percentiles for a mix of query shapes, against a primary
//! key lookup measured in the same run as the baseline, plus the
//! `EXPLAIN (ANALYZE, BUFFERS)` of the main search shape.
//!
//!   make bench-search          (starts PostgreSQL and Redis if needed)
//!
//! The catalog is `benches/support/catalog.rs`'s million products.

// The service's futures nest deeper than the default limit (128) lets
// the compiler prove `Send` (the service's own crate raises it too).
#![recursion_limit = "256"]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use datagate::{
    cache::Cache,
    config::Settings,
    domain::{
        catalog::Catalog,
        search::{ProductSearch, parse_page_size},
        write::Writes,
    },
    model::{
        Id,
        consistency::Consistency,
        paging::{PageRequest, PageTokens},
        search::{SearchFilters, SearchQuery, SearchRequest, SearchSort, SearchText},
    },
    search_log::SearchLog,
    store::postgres::Reads,
};
use secrecy::SecretString;
use sqlx::PgPool;

#[path = "support/catalog.rs"]
mod catalog;
#[path = "support/stats.rs"]
#[allow(dead_code)] // each benchmark uses part of it
mod stats;

use catalog::{DATABASE, PRODUCTS, prepare};
use datagate::generate::{ADJECTIVES, BRANDS, CATEGORIES, NOUNS};
use stats::{Rng, percentile};

/// One caller, then as many as saturate this machine's two cores.
const CONCURRENCY: [usize; 2] = [1, 4];
const ROUNDS: usize = 3;
const UNCACHED_ROUND: Duration = Duration::from_secs(6);
const CACHED_ROUND: Duration = Duration::from_secs(3);
const BASELINE_ROUND: Duration = Duration::from_secs(2);

/// A query shape of the mix, and its share of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    /// One noun, by relevance.
    Noun,
    /// Brand and noun, by relevance.
    BrandNoun,
    /// Adjective and noun in the noun's category, a price range.
    Filtered,
    /// One noun, cheapest first.
    NounByPrice,
    /// One noun, rated 4 or more, best rated first.
    NounByRating,
    /// The second page of a noun search, newest first.
    SecondPage,
    /// A misspelt noun: nothing matches, the word is corrected and searched.
    Typo,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Self::Noun => "one noun, relevance",
            Self::BrandNoun => "brand and noun",
            Self::Filtered => "category and price range",
            Self::NounByPrice => "noun by price",
            Self::NounByRating => "noun by rating, 4+",
            Self::SecondPage => "second page, newest",
            Self::Typo => "misspelt noun",
        }
    }
}

const MIX: [(Shape, u32); 7] = [
    (Shape::Noun, 30),
    (Shape::BrandNoun, 20),
    (Shape::Filtered, 15),
    (Shape::NounByPrice, 10),
    (Shape::NounByRating, 10),
    (Shape::SecondPage, 10),
    (Shape::Typo, 5),
];

fn request(
    text: &str,
    filters: SearchFilters,
    sort: SearchSort,
    token: Option<String>,
) -> SearchRequest {
    SearchRequest {
        text: SearchText::parse(text).unwrap(),
        filters,
        sort,
        page: PageRequest {
            size: parse_page_size(20).unwrap(),
            token,
        },
        user_id: None,
    }
}

/// Drops one letter from the middle of a word.
fn misspell(word: &str) -> String {
    let mid = word.len() / 2;
    format!("{}{}", &word[..mid], &word[mid + 1..])
}

/// `n` requests of the mix, deterministic. Second pages get their token from
/// a first search, so building the list runs those first pages.
async fn mix(search: &ProductSearch, n: usize) -> anyhow::Result<Vec<(Shape, SearchRequest)>> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let total: u32 = MIX.iter().map(|(_, w)| w).sum();
    let mut requests = Vec::with_capacity(n);
    while requests.len() < n {
        let mut roll = (rng.next_u64() % u64::from(total)) as u32;
        let shape = MIX
            .iter()
            .find(|(_, w)| {
                if roll < *w {
                    true
                } else {
                    roll -= w;
                    false
                }
            })
            .map(|(s, _)| *s)
            .unwrap();
        // Popular categories are searched more, like they are stocked more.
        let category = (((rng.next_u64() % 1000) as f64 / 1000.0).powi(2) * 20.0) as usize;
        let noun = NOUNS[category * 12 + (rng.next_u64() % 12) as usize];
        let none = SearchFilters::default;
        let r = match shape {
            Shape::Noun => request(noun, none(), SearchSort::Relevance, None),
            Shape::BrandNoun => request(
                &format!("{} {noun}", rng.pick(&BRANDS)),
                none(),
                SearchSort::Relevance,
                None,
            ),
            Shape::Filtered => {
                let low = 1000 * (1 + rng.next_u64() % 20) as i64;
                request(
                    &format!("{} {noun}", rng.pick(&ADJECTIVES)),
                    SearchFilters {
                        categories: vec![CATEGORIES[category].to_owned()],
                        min_price_cents: Some(low),
                        max_price_cents: Some(low * 4),
                        min_rating: None,
                    },
                    SearchSort::Relevance,
                    None,
                )
            }
            Shape::NounByPrice => request(noun, none(), SearchSort::PriceAscending, None),
            Shape::NounByRating => request(
                noun,
                SearchFilters {
                    min_rating: Some(4.0),
                    ..none()
                },
                SearchSort::Rating,
                None,
            ),
            Shape::SecondPage => {
                let first = search
                    .search(request(noun, none(), SearchSort::Newest, None))
                    .await?;
                request(noun, none(), SearchSort::Newest, first.next_page_token)
            }
            Shape::Typo => request(&misspell(noun), none(), SearchSort::Relevance, None),
        };
        requests.push((shape, r));
    }
    Ok(requests)
}

#[derive(Default)]
struct Samples {
    all: Vec<Duration>,
    by_shape: BTreeMap<Shape, Vec<Duration>>,
    requests: usize,
    elapsed: Duration,
}

/// Runs `call` (see [`stats::drive`]) and adds its latencies to `samples`.
async fn drive<F, Fut>(
    concurrency: usize,
    duration: Duration,
    samples: &mut Samples,
    shape_of: impl Fn(usize) -> Option<Shape>,
    call: F,
) where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (timed, elapsed) = stats::drive(concurrency, duration, call).await;
    for (i, latency) in timed {
        samples.all.push(latency);
        if let Some(shape) = shape_of(i) {
            samples.by_shape.entry(shape).or_default().push(latency);
        }
        samples.requests += 1;
    }
    samples.elapsed += elapsed;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin_url = std::env::var("DATABASE_URL")
        .map_err(|_| anyhow::anyhow!("set DATABASE_URL (make bench-search does)"))?;
    let redis_url = std::env::var("REDIS_URL")
        .map_err(|_| anyhow::anyhow!("set REDIS_URL (make bench-search does)"))?;
    let url = datagate::store::postgres::url_with_database(&admin_url, DATABASE);
    let db = prepare(&admin_url, &url).await?;

    let settings = Settings::load_with_overrides(None, &[("database.url", url.as_str())])?;
    let pages = PageTokens::new(&SecretString::from("b".repeat(32)));
    let (log, writer) = SearchLog::start(db.clone(), &settings.search_log);
    let uncached = ProductSearch::new(
        db.clone(),
        Reads::primary(&db),
        Cache::disabled(),
        pages.clone(),
        log.clone(),
    );
    let mut redis = settings.redis.clone();
    redis.url = redis_url.into();
    redis.key_prefix = format!("dgbench-search-{}", std::process::id());
    let cache = Cache::new(&redis)?;
    let cached = ProductSearch::new(db.clone(), Reads::primary(&db), cache, pages, log);
    let catalog = Catalog::new(&Writes::new(db.clone(), Cache::disabled()));

    let requests = Arc::new(mix(&uncached, 2000).await?);
    println!(
        "{} requests in the mix; warming the cache and PostgreSQL's buffers",
        requests.len()
    );
    for (_, r) in requests.iter() {
        cached.search(r.clone()).await?;
    }

    // Per concurrency level: uncached searches, cached searches, baseline.
    let mut samples: Vec<[Samples; 3]> = CONCURRENCY.iter().map(|_| Default::default()).collect();
    let searching = |search: &ProductSearch| {
        let (s, r) = (search.clone(), requests.clone());
        move |i: usize| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                s.search(r[i % r.len()].1.clone()).await.expect("search");
            }
        }
    };
    let shape_of = |i: usize| Some(requests[i % requests.len()].0);
    for round in 0..ROUNDS {
        for (level, concurrency) in CONCURRENCY.iter().enumerate() {
            let [searches, hits, lookups] = &mut samples[level];
            drive(
                *concurrency,
                UNCACHED_ROUND,
                searches,
                shape_of,
                searching(&uncached),
            )
            .await;
            drive(
                *concurrency,
                CACHED_ROUND,
                hits,
                shape_of,
                searching(&cached),
            )
            .await;
            let c = catalog.clone();
            drive(
                *concurrency,
                BASELINE_ROUND,
                lookups,
                |_| None,
                move |i| {
                    let c = c.clone();
                    async move {
                        let id = Id::parse(1 + (i as i64 * 7919) % PRODUCTS).unwrap();
                        c.get(id, Consistency::Strong).await.expect("product");
                    }
                },
            )
            .await;
        }
        println!("round {} of {ROUNDS} done", round + 1);
    }
    writer.close(Duration::from_secs(30)).await;

    let row = |name: &str, samples: &mut Vec<Duration>, rps: Option<f64>| {
        samples.sort();
        println!(
            "| {name} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            samples.len(),
            rps.map_or(String::new(), |r| format!("{r:.0}")),
            percentile(samples, 0.50),
            percentile(samples, 0.95),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        );
    };
    let rps = |s: &Samples| s.requests as f64 / s.elapsed.as_secs_f64();
    println!();
    println!(
        "SearchProducts over {PRODUCTS} products, page size 20, {ROUNDS} alternating rounds per concurrency level"
    );
    println!("| callers | path | requests | rps | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (level, concurrency) in CONCURRENCY.iter().enumerate() {
        let [searches, hits, lookups] = &mut samples[level];
        let (search_rps, hit_rps, lookup_rps) = (rps(searches), rps(hits), rps(lookups));
        let c = format!("{concurrency} |");
        row(
            &format!("{c} search, uncached (mix)"),
            &mut searches.all,
            Some(search_rps),
        );
        for (shape, samples) in searches.by_shape.iter_mut() {
            row(&format!("{c} &nbsp;&nbsp;{}", shape.label()), samples, None);
        }
        row(
            &format!("{c} search, cached (mix)"),
            &mut hits.all,
            Some(hit_rps),
        );
        row(
            &format!("{c} baseline: GetProduct by id, uncached"),
            &mut lookups.all,
            Some(lookup_rps),
        );
    }
    println!();
    for (level, concurrency) in CONCURRENCY.iter().enumerate() {
        let [searches, hits, lookups] = &samples[level];
        println!(
            "{concurrency} caller(s), ratios to the baseline: uncached search p50 {:.1}x, p95 {:.1}x; cached search p50 {:.2}x, p95 {:.2}x",
            percentile(&searches.all, 0.5) / percentile(&lookups.all, 0.5),
            percentile(&searches.all, 0.95) / percentile(&lookups.all, 0.95),
            percentile(&hits.all, 0.5) / percentile(&lookups.all, 0.5),
            percentile(&hits.all, 0.95) / percentile(&lookups.all, 0.95),
        );
    }

    explain(
        &db,
        "headphones",
        &SearchFilters::default(),
        SearchSort::Relevance,
    )
    .await?;
    explain(
        &db,
        "wireless headphones",
        &SearchFilters {
            categories: vec!["audio".into()],
            min_price_cents: Some(2000),
            max_price_cents: Some(20000),
            min_rating: None,
        },
        SearchSort::PriceAscending,
    )
    .await?;
    db.close().await;
    Ok(())
}

/// Prints the plan of one search page, as executed.
async fn explain(
    db: &PgPool,
    text: &str,
    filters: &SearchFilters,
    sort: SearchSort,
) -> anyhow::Result<()> {
    let query = SearchQuery {
        text,
        filters,
        sort,
        after: None,
        limit: 21,
    };
    let mut statement = datagate::store::search::statement("EXPLAIN (ANALYZE, BUFFERS) ", query)?;
    let sql = statement.sql().to_owned();
    let lines: Vec<String> = statement.build_query_scalar().fetch_all(db).await?;
    println!();
    println!("EXPLAIN (ANALYZE, BUFFERS) of {text:?}, {sort:?}, {filters:?}:");
    println!("{}", sql.trim_start_matches("EXPLAIN (ANALYZE, BUFFERS) "));
    for line in lines {
        println!("    {line}");
    }
    Ok(())
}
