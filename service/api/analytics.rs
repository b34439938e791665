//! `datagate.v1.AnalyticsService`.

use tonic::{Request, Response, Status};

use super::{parse_window, parsed};
use crate::{
    domain::{
        analytics::{Analytics, DEFAULT_LIMIT, MAX_LIMIT, MAX_WINDOW_DAYS},
        error::Violations,
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
