//! `datagate.v1.AnalyticsService`.

use chrono::Utc;
use tonic::{Request, Response, Status};

use super::{parse_window, parsed};
use crate::{
    domain::{
        analytics::{
            Analytics, DEFAULT_LIMIT, DEFAULT_TREND_MONTHS, MAX_LIMIT, MAX_METRICS_DAYS,
            MAX_TREND_MONTHS, MAX_WINDOW_DAYS,
        },
        catalog::Text,
        error::Violations,
        search::parse_categories,
    },
    proto::v1 as pb,
    store::search::QueryStats,
};

pub use pb::analytics_service_server::AnalyticsServiceServer;

pub struct AnalyticsApi {
    analytics: Analytics,
}

impl AnalyticsApi {
    pub fn new(analytics: Analytics) -> Self {
        Self { analytics }
    }
}

#[tonic::async_trait]
impl pb::analytics_service_server::AnalyticsService for AnalyticsApi {
    async fn get_search_insights(
        &self,
        request: Request<pb::GetSearchInsightsRequest>,
    ) -> Result<Response<pb::GetSearchInsightsResponse>, Status> {
        let r = request.into_inner();
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
        let insights = self.analytics.search_insights(start, end, limit).await?;
        Ok(Response::new(pb::GetSearchInsightsResponse {
            total_searches: insights.total_searches,
            zero_result_searches: insights.zero_result_searches,
            top_queries: insights.top_queries.into_iter().map(Into::into).collect(),
            zero_result_queries: insights
                .zero_result_queries
                .into_iter()
                .map(Into::into)
                .collect(),
        }))
    }

    async fn get_category_metrics(
        &self,
        request: Request<pb::GetCategoryMetricsRequest>,
    ) -> Result<Response<pb::GetCategoryMetricsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        let window_days = match u32::try_from(r.window_days) {
            Ok(days) if (1..=MAX_METRICS_DAYS).contains(&days) => Some(days),
            _ => {
                v.add(
                    "window_days",
                    format!("must be between 1 and {MAX_METRICS_DAYS}"),
                );
                None
            }
        };
        let categories = v.check("categories", parse_categories(&r.categories));
        parsed!(v, window_days, categories);
        let metrics = self
            .analytics
            .category_metrics(window_days, &categories, Utc::now().date_naive())
            .await?;
        Ok(Response::new(pb::GetCategoryMetricsResponse {
            categories: metrics
                .into_iter()
                .map(|m| pb::CategoryMetrics {
                    category: m.category,
                    products: m.products,
                    average_price_cents: m.average_price_cents,
                    median_price_cents: m.median_price_cents,
                    average_rating: m.average_rating,
                    orders: m.orders,
                    units_sold: m.units_sold,
                    revenue_cents: m.revenue_cents,
                })
                .collect(),
        }))
    }

    async fn get_revenue_trend(
        &self,
        request: Request<pb::GetRevenueTrendRequest>,
    ) -> Result<Response<pb::GetRevenueTrendResponse>, Status> {
        let r = request.into_inner();
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
        let trend = self
            .analytics
            .revenue_trend(months, category.as_deref(), Utc::now().date_naive())
            .await?;
        Ok(Response::new(pb::GetRevenueTrendResponse {
            months: trend
                .into_iter()
                .map(|m| pb::MonthlyRevenue {
                    month: m.month.format("%Y-%m").to_string(),
                    revenue_cents: m.revenue_cents,
                    growth_rate: m.growth_rate,
                })
                .collect(),
        }))
    }
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
