//! `datagate.v1.AdminService`: callers need the `admin` role (the
//! authorization matrix, `startup::services::RPC_ROLES`, checks it before
//! a call gets here).

use chrono::{Datelike as _, Utc};
use tonic::{Request, Response, Status};

use crate::{
    domain::{analytics::Analytics, partitions::Partitions},
    error::{Detail, Error, reason},
    proto::v1 as pb,
};

pub use pb::admin_service_server::AdminServiceServer;

pub struct AdminApi {
    pub(crate) partitions: Partitions,
    pub(crate) analytics: Analytics,
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_partitions(
        &self,
        _request: Request<pb::ListPartitionsRequest>,
    ) -> Result<Response<pb::ListPartitionsResponse>, Status> {
        let (partitions, default_rows) = self.partitions.list().await?;
        Ok(Response::new(pb::ListPartitionsResponse {
            partitions: partitions
                .into_iter()
                .map(|p| pb::Partition {
                    month: p
                        .month
                        .map(|m| format!("{:04}-{:02}", m.year(), m.month()))
                        .unwrap_or_default(),
                    table: p.table,
                    name: p.name,
                    is_default: p.is_default,
                    estimated_rows: p.estimated_rows,
                    bound: p.bound,
                })
                .collect(),
            default_rows: default_rows
                .into_iter()
                .map(|(table, rows)| pb::DefaultRows {
                    table: table.to_owned(),
                    rows,
                })
                .collect(),
        }))
    }

    async fn ensure_partitions(
        &self,
        _request: Request<pb::EnsurePartitionsRequest>,
    ) -> Result<Response<pb::EnsurePartitionsResponse>, Status> {
        let created = self.partitions.ensure(Utc::now().date_naive()).await?;
        Ok(Response::new(pb::EnsurePartitionsResponse { created }))
    }

    async fn retire_partitions(
        &self,
        _request: Request<pb::RetirePartitionsRequest>,
    ) -> Result<Response<pb::RetirePartitionsResponse>, Status> {
        let dropped = self.partitions.retire(Utc::now().date_naive()).await?;
        Ok(Response::new(pb::RetirePartitionsResponse { dropped }))
    }

    async fn refresh_analytics(
        &self,
        _request: Request<pb::RefreshAnalyticsRequest>,
    ) -> Result<Response<pb::RefreshAnalyticsResponse>, Status> {
        let started = std::time::Instant::now();
        if !self.analytics.refresh().await? {
            return Err(Error::Aborted(Detail::new(
                reason::REFRESH_IN_PROGRESS,
                "another replica is refreshing the analytics now; retry when it is done",
            ))
            .into());
        }
        Ok(Response::new(pb::RefreshAnalyticsResponse {
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        }))
    }
}
