//! `datagate.v1.AnalyticsService`.

use chrono::{DateTime, Utc};

use super::{Answer, Call, caller, paged, parse_page, parse_window, parsed, reply, timestamp};
use crate::{
    auth::ADMIN_ROLE,
    domain::{
        analytics::{
            Analytics, DEFAULT_LIMIT, DEFAULT_TREND_MONTHS, MAX_LIMIT, MAX_METRICS_DAYS,
            MAX_TREND_MONTHS, MAX_WINDOW_DAYS,
        },
        market_analyses::MarketAnalyses,
        search::parse_categories,
    },
    error::{Error, Violations},
    model::{
        analytics::CategoryMetrics,
        catalog::Text,
        market_analyses::{
            Analysis, Kind, MAX_CATEGORIES as ANALYSIS_MAX_CATEGORIES,
            MAX_WINDOW_DAYS as ANALYSIS_MAX_WINDOW_DAYS,
        },
        paging::PageRequest,
        search::QueryStats,
    },
    proto::v1 as pb,
};

pub use pb::analytics_service_server::AnalyticsServiceServer;

pub struct AnalyticsApi {
    pub(crate) analytics: Analytics,
    pub(crate) analyses: MarketAnalyses,
}

fn status_name(s: pb::MarketAnalysisStatus) -> &'static str {
    match s {
        pb::MarketAnalysisStatus::Pending | pb::MarketAnalysisStatus::Unspecified => "pending",
        pb::MarketAnalysisStatus::Running => "running",
        pb::MarketAnalysisStatus::Completed => "completed",
        pb::MarketAnalysisStatus::Failed => "failed",
    }
}

fn status_of(name: &str) -> pb::MarketAnalysisStatus {
    match name {
        "running" => pb::MarketAnalysisStatus::Running,
        "completed" => pb::MarketAnalysisStatus::Completed,
        "failed" => pb::MarketAnalysisStatus::Failed,
        _ => pb::MarketAnalysisStatus::Pending,
    }
}

fn kind_of(kind: Option<Kind>) -> pb::MarketAnalysisKind {
    match kind {
        Some(Kind::Overview) => pb::MarketAnalysisKind::Overview,
        Some(Kind::Pricing) => pb::MarketAnalysisKind::Pricing,
        Some(Kind::Demand) => pb::MarketAnalysisKind::Demand,
        Some(Kind::Full) => pb::MarketAnalysisKind::Full,
        None => pb::MarketAnalysisKind::Unspecified,
    }
}

/// A window of 1 to `max` days back from today (violation on `window_days`).
fn parse_window_days(v: &mut Violations, raw: i32, max: u32) -> Option<u32> {
    match u32::try_from(raw) {
        Ok(days) if (1..=max).contains(&days) => Some(days),
        _ => {
            v.add("window_days", format!("must be between 1 and {max}"));
            None
        }
    }
}

fn millis(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(timestamp)
}

impl From<Analysis> for pb::MarketAnalysis {
    fn from(a: Analysis) -> Self {
        let d = a.doc;
        Self {
            kind: kind_of(Kind::parse(&d.kind)).into(),
            status: status_of(&d.status).into(),
            attempts: d.attempts,
            create_time: millis(Some(d.created_ms)),
            start_time: millis(d.started_ms),
            finish_time: millis(d.finished_ms),
            results: a.results.map(|r| pb::MarketAnalysisResults {
                category_metrics: r.category_metrics.into_iter().map(Into::into).collect(),
                top_products: r
                    .top_products
                    .into_iter()
                    .map(|p| pb::TopProduct {
                        product_id: p.product_id,
                        title: p.title,
                        category: p.category,
                        units_sold: p.units_sold,
                        revenue_cents: p.revenue_cents,
                    })
                    .collect(),
                price_trends: r
                    .price_trends
                    .into_iter()
                    .map(|t| pb::PriceTrend {
                        product_id: t.product_id,
                        measurements: t.measurements,
                        first_cents: t.first_cents,
                        last_cents: t.last_cents,
                        min_cents: t.min_cents,
                        max_cents: t.max_cents,
                        change_rate: t.change_rate,
                    })
                    .collect(),
                search_demand: r
                    .search_demand
                    .into_iter()
                    .map(|s| pb::SearchDemand {
                        category: s.category,
                        searches: s.searches,
                        zero_result_searches: s.zero_result_searches,
                    })
                    .collect(),
            }),
            timings_ms: a.timings_ms.into_iter().collect(),
            error: d.error.unwrap_or_default(),
            id: d.id,
            categories: d.categories,
            window_days: d.window_days,
        }
    }
}

impl From<CategoryMetrics> for pb::CategoryMetrics {
    fn from(m: CategoryMetrics) -> Self {
        Self {
            category: m.category,
            products: m.products,
            average_price_cents: m.average_price_cents,
            median_price_cents: m.median_price_cents,
            average_rating: m.average_rating,
            orders: m.orders,
            units_sold: m.units_sold,
            revenue_cents: m.revenue_cents,
        }
    }
}

#[tonic::async_trait]
impl pb::analytics_service_server::AnalyticsService for AnalyticsApi {
    async fn get_search_insights(
        &self,
        call: Call<pb::GetSearchInsightsRequest>,
    ) -> Answer<pb::GetSearchInsightsResponse> {
        let (start, end, limit) = parse_get_search_insights(call.into_inner())?;
        let insights = self.analytics.search_insights(start, end, limit).await?;
        reply(pb::GetSearchInsightsResponse {
            total_searches: insights.total_searches,
            zero_result_searches: insights.zero_result_searches,
            top_queries: insights.top_queries.into_iter().map(Into::into).collect(),
            zero_result_queries: insights
                .zero_result_queries
                .into_iter()
                .map(Into::into)
                .collect(),
        })
    }

    async fn get_category_metrics(
        &self,
        call: Call<pb::GetCategoryMetricsRequest>,
    ) -> Answer<pb::GetCategoryMetricsResponse> {
        let (window_days, categories) = parse_get_category_metrics(call.into_inner())?;
        let metrics = self
            .analytics
            .category_metrics(window_days, &categories, Utc::now().date_naive())
            .await?;
        reply(pb::GetCategoryMetricsResponse {
            categories: metrics.into_iter().map(Into::into).collect(),
        })
    }

    async fn get_revenue_trend(
        &self,
        call: Call<pb::GetRevenueTrendRequest>,
    ) -> Answer<pb::GetRevenueTrendResponse> {
        let (months, category) = parse_get_revenue_trend(call.into_inner())?;
        let trend = self
            .analytics
            .revenue_trend(months, category.as_deref(), Utc::now().date_naive())
            .await?;
        reply(pb::GetRevenueTrendResponse {
            months: trend
                .into_iter()
                .map(|m| pb::MonthlyRevenue {
                    month: m.month.format("%Y-%m").to_string(),
                    revenue_cents: m.revenue_cents,
                    growth_rate: m.growth_rate,
                })
                .collect(),
        })
    }

    async fn start_market_analysis(
        &self,
        call: Call<pb::StartMarketAnalysisRequest>,
    ) -> Answer<pb::MarketAnalysis> {
        let caller = caller(&call)?.clone();
        let (kind, categories, window_days) = parse_start_market_analysis(call.into_inner())?;
        let analysis = self
            .analyses
            .start(caller.name(), kind, categories, window_days)
            .await?;
        reply(analysis)
    }

    async fn get_market_analysis(
        &self,
        call: Call<pb::GetMarketAnalysisRequest>,
    ) -> Answer<pb::MarketAnalysis> {
        let caller = caller(&call)?.clone();
        let id = parse_get_market_analysis(call.into_inner())?;
        let analysis = self
            .analyses
            .get(caller.name(), &id, caller.has_role(ADMIN_ROLE))
            .await?;
        reply(analysis)
    }

    async fn list_market_analyses(
        &self,
        call: Call<pb::ListMarketAnalysesRequest>,
    ) -> Answer<pb::ListMarketAnalysesResponse> {
        let caller = caller(&call)?.clone();
        let (page, status) = parse_list_market_analyses(call.into_inner())?;
        let (analyses, next_page_token) =
            paged(self.analyses.list(caller.name(), status, page).await?);
        reply(pb::ListMarketAnalysesResponse {
            analyses,
            next_page_token,
        })
    }
}

// Each RPC's request, parsed: every field violation collected, or the domain
// values the handler passes on. Public for the fuzz targets (`fuzz/`), which
// run them on arbitrary messages.

/// The `[start, end)` window and how many queries of each kind.
pub fn parse_get_search_insights(
    r: pb::GetSearchInsightsRequest,
) -> Result<(DateTime<Utc>, DateTime<Utc>, u32), Error> {
    let mut v = Violations::default();
    let (start, end) = parse_window(&mut v, r.start_time, r.end_time, MAX_WINDOW_DAYS);
    let limit = match r.limit {
        0 => Some(DEFAULT_LIMIT),
        n if n < 0 => {
            v.add("limit", format!("must be between 0 and {MAX_LIMIT}"));
            None
        }
        n => Some((n as u32).min(MAX_LIMIT)),
    };
    parsed!(v, start, end, limit);
    Ok((start, end, limit))
}

/// The window in days and the categories (empty for every one).
pub fn parse_get_category_metrics(
    r: pb::GetCategoryMetricsRequest,
) -> Result<(u32, Vec<String>), Error> {
    let mut v = Violations::default();
    let window_days = parse_window_days(&mut v, r.window_days, MAX_METRICS_DAYS);
    let categories = v.check("categories", parse_categories(&r.categories));
    parsed!(v, window_days, categories);
    Ok((window_days, categories))
}

/// The number of months and the category, if one.
pub fn parse_get_revenue_trend(
    r: pb::GetRevenueTrendRequest,
) -> Result<(u32, Option<String>), Error> {
    let mut v = Violations::default();
    let months = match r.months {
        0 => Some(DEFAULT_TREND_MONTHS),
        n => match u32::try_from(n) {
            Ok(n) if n <= MAX_TREND_MONTHS => Some(n),
            _ => {
                v.add(
                    "months",
                    format!("must be between 0 and {MAX_TREND_MONTHS}"),
                );
                None
            }
        },
    };
    let category = match r.category.trim() {
        "" => Some(None),
        raw => v.check(
            "category",
            Text::category(raw).map(|c| Some(c.as_str().to_owned())),
        ),
    };
    parsed!(v, months, category);
    Ok((months, category))
}

/// The kind, the categories and the window in days.
pub fn parse_start_market_analysis(
    r: pb::StartMarketAnalysisRequest,
) -> Result<(Kind, Vec<String>, u32), Error> {
    let mut v = Violations::default();
    let kind = match pb::MarketAnalysisKind::try_from(r.kind) {
        Ok(pb::MarketAnalysisKind::Overview) => Some(Kind::Overview),
        Ok(pb::MarketAnalysisKind::Pricing) => Some(Kind::Pricing),
        Ok(pb::MarketAnalysisKind::Demand) => Some(Kind::Demand),
        Ok(pb::MarketAnalysisKind::Full) => Some(Kind::Full),
        _ => {
            v.add(
                "kind",
                "must be MARKET_ANALYSIS_KIND_OVERVIEW, _PRICING, _DEMAND or _FULL",
            );
            None
        }
    };
    let categories = match parse_categories(&r.categories) {
        Ok(c) if (1..=ANALYSIS_MAX_CATEGORIES).contains(&c.len()) => Some(c),
        Ok(_) => {
            v.add(
                "categories",
                format!("must name 1 to {ANALYSIS_MAX_CATEGORIES} categories"),
            );
            None
        }
        Err(e) => {
            v.add("categories", e);
            None
        }
    };
    let window_days = parse_window_days(&mut v, r.window_days, ANALYSIS_MAX_WINDOW_DAYS);
    parsed!(v, kind, categories, window_days);
    Ok((kind, categories, window_days))
}

/// The analysis id (a UUID, as StartMarketAnalysis made it).
pub fn parse_get_market_analysis(r: pb::GetMarketAnalysisRequest) -> Result<String, Error> {
    if uuid::Uuid::parse_str(&r.id).is_err() {
        return Err(Error::invalid(
            "id",
            "must be an analysis id from StartMarketAnalysis",
        ));
    }
    Ok(r.id)
}

/// The page and the status filter (`None` for any).
pub fn parse_list_market_analyses(
    r: pb::ListMarketAnalysesRequest,
) -> Result<(PageRequest, Option<&'static str>), Error> {
    let mut v = Violations::default();
    let page = parse_page(&mut v, r.page_size, r.page_token);
    let status = match pb::MarketAnalysisStatus::try_from(r.status) {
        Ok(pb::MarketAnalysisStatus::Unspecified) => Some(None),
        Ok(s) => Some(Some(status_name(s))),
        Err(_) => {
            v.add("status", format!("unknown status {}", r.status));
            None
        }
    };
    parsed!(v, page, status);
    Ok((page, status))
}

impl From<QueryStats> for pb::QueryStats {
    fn from(s: QueryStats) -> Self {
        Self {
            query: s.query,
            searches: s.searches,
            users: s.users,
            average_results: s.average_results,
            average_processing_ms: s.average_processing_ms,
        }
    }
}
