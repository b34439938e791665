//! Market analyses: long-running, computed by background workers, stored in
//! MongoDB (`documents::market_analyses` explains the lease).

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::profiles::mongodb_not_configured;
use crate::{
    config::AnalysisSettings,
    documents::{
        Mongo, market_analyses as store,
        mongo::{from_document, to_document},
        price_history,
    },
    error::{Detail, Error, Result, reason},
    model::{
        market_analyses::{Analysis, AnalysisDoc, Kind, PriceTrend, Results},
        paging::{Page, PageRequest, PageTokens},
    },
    store::analytics,
};

const TOP_PRODUCTS: i64 = 10;
const TOKEN_SCOPE: &str = "market_analyses";

pub fn analysis_not_found(id: &str) -> Error {
    Error::NotFound(
        Detail::new(
            reason::MARKET_ANALYSIS_NOT_FOUND,
            format!("market analysis {id:?} does not exist or belongs to another caller"),
        )
        .with("analysis_id", id),
    )
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

type Cursor = (i64, String);

#[derive(Clone)]
pub struct MarketAnalyses {
    db: PgPool,
    mongo: Option<Mongo>,
    settings: AnalysisSettings,
    pages: PageTokens,
    /// Wakes this replica's idle workers when an analysis starts here.
    wake: Arc<Notify>,
}

impl MarketAnalyses {
    pub fn new(
        db: PgPool,
        mongo: Option<Mongo>,
        settings: AnalysisSettings,
        pages: PageTokens,
    ) -> Self {
        Self {
            db,
            mongo,
            settings,
            pages,
            wake: Arc::new(Notify::new()),
        }
    }

    fn mongo(&self) -> Result<&Mongo> {
        self.mongo.as_ref().ok_or_else(mongodb_not_configured)
    }

    /// Starts an analysis, or returns the recent one with the same parameters.
    #[tracing::instrument(skip_all, fields(kind = kind.as_str(), window_days), err(level = "info", Debug))]
    pub async fn start(
        &self,
        caller: &str,
        kind: Kind,
        categories: Vec<String>,
        window_days: u32,
    ) -> Result<Analysis> {
        let mongo = self.mongo()?;
        // Per caller: analyses are read by their caller only.
        let params_hash = hex::encode(Sha256::digest(
            format!(
                "{caller}|{}|{}|{window_days}",
                kind.as_str(),
                categories.join("\u{1f}")
            )
            .as_bytes(),
        ));
        let since = now_ms() - self.settings.dedupe_period.as_millis() as i64;
        if let Some(existing) = store::find_recent(mongo, &params_hash, since).await? {
            tracing::info!(analysis_id = %existing.id, "identical analysis found; returning it");
            return to_analysis(existing);
        }
        let doc = AnalysisDoc {
            id: uuid::Uuid::new_v4().to_string(),
            caller: caller.to_owned(),
            kind: kind.as_str().to_owned(),
            categories,
            window_days: window_days as i32,
            params_hash,
            status: "pending".into(),
            attempts: 0,
            lease_owner: None,
            lease_expires_ms: None,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            results: None,
            timings_ms: None,
            error: None,
        };
        store::insert(mongo, &doc).await?;
        self.wake.notify_one();
        tracing::info!(analysis_id = %doc.id, "market analysis started");
        to_analysis(doc)
    }

    /// One of the caller's analyses (any caller's for `any_caller`).
    pub async fn get(&self, caller: &str, id: &str, any_caller: bool) -> Result<Analysis> {
        let doc = store::find(self.mongo()?, id)
            .await?
            .filter(|d| any_caller || d.caller == caller)
            .ok_or_else(|| analysis_not_found(id))?;
        to_analysis(doc)
    }

    pub async fn list(
        &self,
        caller: &str,
        status: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<Analysis>> {
        let mongo = self.mongo()?;
        let query = format!("{caller}|{}", status.unwrap_or_default());
        let listing = self.pages.listing(TOKEN_SCOPE, &query);
        let after: Option<Cursor> = listing.after(&page)?;
        let docs = store::list(mongo, caller, status, after, page.size.fetch_limit()).await?;
        let analyses = docs
            .into_iter()
            .map(to_analysis)
            .collect::<Result<Vec<_>>>()?;
        Ok(listing.page(analyses, page.size, |last| -> Cursor {
            (last.doc.created_ms, last.doc.id.clone())
        }))
    }

    /// Claims one analysis as `worker` and runs it to the end. False when
    /// there was nothing to claim.
    #[tracing::instrument(skip(self), fields(analysis_id, attempt), err(level = "info", Debug))]
    pub async fn run_once(&self, worker: &str) -> Result<bool> {
        let mongo = self.mongo()?;
        let lease_ms = self.settings.lease.as_millis() as i64;
        let Some(doc) = store::claim(mongo, worker, now_ms(), lease_ms).await? else {
            return Ok(false);
        };
        tracing::Span::current()
            .record("analysis_id", doc.id.as_str())
            .record("attempt", doc.attempts);
        if doc.attempts > self.settings.max_attempts {
            let reason = format!("gave up after {} attempts", doc.attempts - 1);
            store::finish(mongo, &doc.id, worker, now_ms(), Err(reason)).await?;
            return Ok(true);
        }
        // Renew the lease at a third of its length while computing.
        let renewing = CancellationToken::new();
        let renewer = {
            let (mongo, id, worker, stop) = (
                mongo.clone(),
                doc.id.clone(),
                worker.to_owned(),
                renewing.clone(),
            );
            let every = self.settings.lease / 3;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                    match store::renew(&mongo, &id, &worker, now_ms() + lease_ms).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            tracing::warn!(error = ?e, "renewing a market analysis lease failed")
                        }
                    }
                }
            })
        };
        let outcome = self.compute(&doc).await;
        renewing.cancel();
        let _ = renewer.await;
        let outcome = match outcome {
            Ok((results, timings)) => Ok((to_document(&results)?, to_document(&timings)?)),
            Err(e) => {
                tracing::warn!(error = ?e, analysis_id = %doc.id, "market analysis failed");
                Err(format!("{e}"))
            }
        };
        if !store::finish(mongo, &doc.id, worker, now_ms(), outcome).await? {
            tracing::warn!(analysis_id = %doc.id, "lost the lease: another worker took the analysis over; result discarded");
        }
        Ok(true)
    }

    /// The analysis's sections, each timed.
    async fn compute(&self, doc: &AnalysisDoc) -> Result<(Results, BTreeMap<String, f64>)> {
        let kind = Kind::parse(&doc.kind)
            .ok_or_else(|| anyhow::anyhow!("unknown analysis kind {:?}", doc.kind))?;
        let window = chrono::Duration::days(i64::from(doc.window_days));
        let today = Utc::now().date_naive();
        let first_day = today - window + chrono::Duration::days(1);
        let since: DateTime<Utc> = first_day
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc();
        let mut results = Results::default();
        let mut timings = BTreeMap::new();
        let mut conn = crate::store::postgres::acquire(&self.db).await?;
        let mut timed = Instant::now();
        let mut lap = |name: &str, timings: &mut BTreeMap<String, f64>| {
            timings.insert(name.to_owned(), timed.elapsed().as_secs_f64() * 1000.0);
            timed = Instant::now();
        };
        if matches!(kind, Kind::Overview | Kind::Full) {
            results.category_metrics =
                analytics::category_metrics(&mut conn, first_day, &doc.categories).await?;
            lap("category_metrics", &mut timings);
        }
        if matches!(kind, Kind::Overview | Kind::Pricing | Kind::Full) {
            results.top_products =
                analytics::top_products(&mut conn, since, &doc.categories, TOP_PRODUCTS).await?;
            lap("top_products", &mut timings);
        }
        if matches!(kind, Kind::Pricing | Kind::Full) {
            let mongo = self.mongo()?;
            for product in &results.top_products {
                let buckets =
                    price_history::buckets(mongo, product.product_id, first_day, today).await?;
                let prices: Vec<i64> = price_history::in_order(&buckets)
                    .iter()
                    .map(|m| m.price_cents)
                    .collect();
                let (first, last) = (prices.first().copied(), prices.last().copied());
                results.price_trends.push(PriceTrend {
                    product_id: product.product_id,
                    measurements: prices.len() as i64,
                    first_cents: first.unwrap_or_default(),
                    last_cents: last.unwrap_or_default(),
                    min_cents: prices.iter().copied().min().unwrap_or_default(),
                    max_cents: prices.iter().copied().max().unwrap_or_default(),
                    change_rate: first
                        .zip(last)
                        .filter(|(f, _)| *f > 0)
                        .map(|(f, l)| (l - f) as f64 / f as f64),
                });
            }
            lap("price_trends", &mut timings);
        }
        if matches!(kind, Kind::Demand | Kind::Full) {
            results.search_demand =
                analytics::search_demand(&mut conn, since, &doc.categories).await?;
            lap("search_demand", &mut timings);
        }
        Ok((results, timings))
    }

    /// Runs `workers` workers on `tracker` until `stopping`; each works
    /// through what it can claim, then waits for a new analysis or the poll
    /// interval.
    pub fn spawn_workers(
        &self,
        workers: usize,
        tracker: &TaskTracker,
        stopping: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        if self.mongo.is_none() {
            return Vec::new();
        }
        (0..workers)
            .map(|n| {
                let (this, stopping) = (self.clone(), stopping.clone());
                let worker = format!("{}-{n}", uuid::Uuid::new_v4().simple());
                tracker.spawn(async move {
                    // Stopping ends the worker before its next claim: the
                    // analysis it runs finishes, a backlog waits for the
                    // next start (or another replica).
                    while !stopping.is_cancelled() {
                        match this.run_once(&worker).await {
                            Ok(true) => continue,
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(error = ?e, "market analysis worker: retrying")
                            }
                        }
                        tokio::select! {
                            () = stopping.cancelled() => return,
                            () = this.wake.notified() => {}
                            () = tokio::time::sleep(this.settings.poll_interval) => {}
                        }
                    }
                })
            })
            .collect()
    }
}

fn to_analysis(mut doc: AnalysisDoc) -> Result<Analysis> {
    let results = doc
        .results
        .take()
        .map(from_document::<Results>)
        .transpose()?;
    let timings_ms = doc
        .timings_ms
        .take()
        .map(from_document::<BTreeMap<String, f64>>)
        .transpose()?
        .unwrap_or_default();
    Ok(Analysis {
        doc,
        results,
        timings_ms,
    })
}
