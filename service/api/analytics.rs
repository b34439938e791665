//! `datagate.v1.AnalyticsService`.

use tonic::{Request, Response, Status};

use super::{parse_timestamp, parsed};
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
        let mut required = |field: &str, t: Option<prost_types::Timestamp>| match t {
            Some(t) => v.check(field, parse_timestamp(&t)),
            None => {
                v.add(field, "is required");
                None
            }
        };
        let start = required("start_time", r.start_time);
        let end = required("end_time", r.end_time);
        if let (Some(start), Some(end)) = (start, end) {
            if start >= end {
                v.add("end_time", "must be later than start_time");
            } else if end - start > chrono::Duration::days(MAX_WINDOW_DAYS) {
                v.add(
                    "end_time",
                    format!("the window may span at most {MAX_WINDOW_DAYS} days"),
                );
            }
        }
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
