//! `datagate.v1.AdminService`: callers need the `admin` role (the
//! authorization matrix, `startup::services::RPC_ROLES`, checks it before
//! a call gets here).

use std::time::Duration;

use chrono::{Datelike as _, Utc};

use super::{Answer, Call, parsed, reply, timestamp};
use crate::{
    domain::{analytics::Analytics, diagnostics::Diagnostics, partitions::Partitions},
    error::{Detail, Error, Violations, reason},
    model::diagnostics::{self as model, AdviceTarget, Identifier, IndexSpec, MAX_INDEX_COLUMNS},
    proto::v1 as pb,
};

pub use pb::admin_service_server::AdminServiceServer;

pub struct AdminApi {
    pub(crate) partitions: Partitions,
    pub(crate) analytics: Analytics,
    pub(crate) diagnostics: Diagnostics,
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_partitions(
        &self,
        _call: Call<pb::ListPartitionsRequest>,
    ) -> Answer<pb::ListPartitionsResponse> {
        let (partitions, default_rows) = self.partitions.list().await?;
        reply(pb::ListPartitionsResponse {
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
        })
    }

    async fn ensure_partitions(
        &self,
        _call: Call<pb::EnsurePartitionsRequest>,
    ) -> Answer<pb::EnsurePartitionsResponse> {
        let created = self.partitions.ensure(Utc::now().date_naive()).await?;
        reply(pb::EnsurePartitionsResponse { created })
    }

    async fn retire_partitions(
        &self,
        _call: Call<pb::RetirePartitionsRequest>,
    ) -> Answer<pb::RetirePartitionsResponse> {
        let dropped = self.partitions.retire(Utc::now().date_naive()).await?;
        reply(pb::RetirePartitionsResponse { dropped })
    }

    async fn refresh_analytics(
        &self,
        _call: Call<pb::RefreshAnalyticsRequest>,
    ) -> Answer<pb::RefreshAnalyticsResponse> {
        let started = std::time::Instant::now();
        if !self.analytics.refresh().await? {
            return Err(Error::Aborted(Detail::new(
                reason::REFRESH_IN_PROGRESS,
                "another replica is refreshing the analytics now; retry when it is done",
            ))
            .into());
        }
        reply(pb::RefreshAnalyticsResponse {
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    async fn list_slow_statements(
        &self,
        call: Call<pb::ListSlowStatementsRequest>,
    ) -> Answer<pb::ListSlowStatementsResponse> {
        let limit = parse_list_slow_statements(call.into_inner())?;
        let (by_total, by_mean) = self.diagnostics.slow_statements(limit).await?;
        let convert = |list: Vec<model::SlowStatement>| {
            list.into_iter()
                .map(|s| pb::SlowStatement {
                    query_id: s.query_id,
                    query: s.query,
                    calls: s.calls,
                    rows: s.rows,
                    total_time_ms: s.total_time_ms,
                    mean_time_ms: s.mean_time_ms,
                    shared_buffer_hit_ratio: s.shared_buffer_hit_ratio,
                })
                .collect()
        };
        reply(pb::ListSlowStatementsResponse {
            by_total_time: convert(by_total),
            by_mean_time: convert(by_mean),
        })
    }

    async fn list_active_statements(
        &self,
        call: Call<pb::ListActiveStatementsRequest>,
    ) -> Answer<pb::ListActiveStatementsResponse> {
        let min_duration = parse_list_active_statements(call.into_inner())?;
        let statements = self.diagnostics.active_statements(min_duration).await?;
        reply(pb::ListActiveStatementsResponse {
            statements: statements
                .into_iter()
                .map(|s| pb::ActiveStatement {
                    pid: s.pid,
                    user: s.user,
                    application_name: s.application_name,
                    state: s.state,
                    wait_event_type: s.wait_event_type,
                    wait_event: s.wait_event,
                    duration_ms: s.duration_ms,
                    query: s.query,
                    blocked_by: s.blocked_by,
                    own: s.own,
                })
                .collect(),
        })
    }

    async fn cancel_statement(
        &self,
        call: Call<pb::CancelStatementRequest>,
    ) -> Answer<pb::CancelStatementResponse> {
        let pid = parse_cancel_statement(call.into_inner())?;
        let cancelled = self.diagnostics.cancel(pid).await?;
        reply(pb::CancelStatementResponse { cancelled })
    }

    async fn get_index_health(
        &self,
        _call: Call<pb::GetIndexHealthRequest>,
    ) -> Answer<pb::GetIndexHealthResponse> {
        let health = self.diagnostics.index_health().await?;
        reply(pb::GetIndexHealthResponse {
            unused_indexes: health
                .unused
                .into_iter()
                .map(|i| pb::UnusedIndex {
                    table: i.table,
                    index: i.index,
                    size_bytes: i.size_bytes,
                })
                .collect(),
            sequential_scan_tables: health
                .sequential_scans
                .into_iter()
                .map(|t| pb::SequentialScanTable {
                    table: t.table,
                    seq_scan: t.seq_scan,
                    idx_scan: t.idx_scan,
                    seq_tup_read: t.seq_tup_read,
                    live_rows: t.live_rows,
                })
                .collect(),
            redundant_indexes: health
                .redundant
                .into_iter()
                .map(|i| pb::RedundantIndex {
                    table: i.table,
                    index: i.index,
                    covered_by: i.covered_by,
                    duplicate: i.duplicate,
                })
                .collect(),
            invalid_indexes: health
                .invalid
                .into_iter()
                .map(|i| pb::InvalidIndex {
                    table: i.table,
                    index: i.index,
                })
                .collect(),
        })
    }

    async fn advise_indexes(
        &self,
        call: Call<pb::AdviseIndexesRequest>,
    ) -> Answer<pb::AdviseIndexesResponse> {
        let target = parse_advise_indexes(call.into_inner())?;
        let advice = self.diagnostics.advise(target).await?;
        reply(pb::AdviseIndexesResponse {
            statement: advice.statement,
            cost_before: advice.cost_before,
            candidates: advice
                .candidates
                .into_iter()
                .map(|c| pb::IndexCandidate {
                    table: c.table,
                    columns: c.columns,
                    definition: c.definition,
                    cost_after: c.cost_after,
                    improvement: c.improvement,
                    used: c.used,
                })
                .collect(),
        })
    }

    async fn create_index(
        &self,
        call: Call<pb::CreateIndexRequest>,
    ) -> Answer<pb::CreateIndexResponse> {
        let spec = parse_create_index(call.into_inner())?;
        let (index, definition, took) = self.diagnostics.create_index(spec).await?;
        reply(pb::CreateIndexResponse {
            index,
            definition,
            duration_ms: took.as_secs_f64() * 1000.0,
        })
    }

    async fn get_table_sizes(
        &self,
        call: Call<pb::GetTableSizesRequest>,
    ) -> Answer<pb::GetTableSizesResponse> {
        let window = parse_get_table_sizes(call.into_inner())?;
        let tables = self.diagnostics.table_sizes(window).await?;
        reply(pb::GetTableSizesResponse {
            tables: tables
                .into_iter()
                .map(|t| pb::TableSize {
                    table: t.table,
                    parent: t.parent.unwrap_or_default(),
                    total_bytes: t.total_bytes,
                    estimated_rows: t.estimated_rows,
                    growth_bytes: t.growth.map(|(bytes, _)| bytes),
                    sampled_since: t.growth.map(|(_, at)| timestamp(at)),
                })
                .collect(),
        })
    }

    async fn get_database_health(
        &self,
        _call: Call<pb::GetDatabaseHealthRequest>,
    ) -> Answer<pb::GetDatabaseHealthResponse> {
        let health = self.diagnostics.database_health().await?;
        let redis = match health.redis {
            Some(info) => pb::RedisInfo {
                available: true,
                hit_ratio: info.hit_ratio(),
                used_memory_bytes: info.used_memory_bytes,
                max_memory_bytes: info.max_memory_bytes,
                evicted_keys: info.evicted_keys,
                connected_clients: info.connected_clients,
                nodes: info.nodes,
            },
            None => pb::RedisInfo::default(),
        };
        reply(pb::GetDatabaseHealthResponse {
            buffer_cache_hit_ratio: health.buffer_cache_hit_ratio,
            connections: health
                .connections
                .into_iter()
                .map(|(state, count)| pb::ConnectionCount { state, count })
                .collect(),
            replication_lag_seconds: health.replication_lag_seconds,
            redis: Some(redis),
            pools: health
                .pools
                .into_iter()
                .map(|p| pb::PoolStats {
                    pool: p.pool.to_owned(),
                    size: p.size,
                    idle: p.idle,
                    max: p.max,
                })
                .collect(),
        })
    }
}

// Each diagnostics request, parsed: every field violation collected, or the
// domain values the handler passes on.

const DEFAULT_STATEMENTS: i64 = 10;
const MAX_STATEMENTS: i64 = 100;
const DEFAULT_MIN_DURATION: Duration = Duration::from_secs(1);
const DEFAULT_GROWTH_HOURS: u64 = 24;
const MAX_GROWTH_HOURS: i32 = 90 * 24;

/// How many statements per list (0: the default; capped at the maximum).
pub fn parse_list_slow_statements(r: pb::ListSlowStatementsRequest) -> Result<i64, Error> {
    match i64::from(r.limit) {
        0 => Ok(DEFAULT_STATEMENTS),
        n if n < 0 => Err(Error::invalid(
            "limit",
            format!("must be between 0 and {MAX_STATEMENTS}"),
        )),
        n => Ok(n.min(MAX_STATEMENTS)),
    }
}

/// The threshold a statement must have run for.
pub fn parse_list_active_statements(r: pb::ListActiveStatementsRequest) -> Result<Duration, Error> {
    match r.min_duration_ms {
        0 => Ok(DEFAULT_MIN_DURATION),
        n if n < 0 => Err(Error::invalid("min_duration_ms", "must not be negative")),
        n => Ok(Duration::from_millis(n.unsigned_abs())),
    }
}

pub fn parse_cancel_statement(r: pb::CancelStatementRequest) -> Result<i32, Error> {
    if r.pid > 0 {
        Ok(r.pid)
    } else {
        Err(Error::invalid("pid", "must be a positive process id"))
    }
}

pub fn parse_advise_indexes(r: pb::AdviseIndexesRequest) -> Result<AdviceTarget, Error> {
    AdviceTarget::parse(r.query_id, &r.statement)
        .map_err(|(field, description)| Error::invalid(field, description))
}

pub fn parse_create_index(r: pb::CreateIndexRequest) -> Result<IndexSpec, Error> {
    let mut v = Violations::default();
    let table = v.check("table", Identifier::parse(&r.table));
    if r.columns.is_empty() || r.columns.len() > MAX_INDEX_COLUMNS {
        v.add(
            "columns",
            format!("must name 1 to {MAX_INDEX_COLUMNS} columns"),
        );
    }
    let columns: Vec<Option<Identifier>> = r
        .columns
        .iter()
        .take(MAX_INDEX_COLUMNS)
        .enumerate()
        .map(|(i, c)| v.check(&format!("columns[{i}]"), Identifier::parse(c)))
        .collect();
    let columns: Option<Vec<Identifier>> = columns.into_iter().collect();
    Ok(parsed!(v, IndexSpec { table, columns }))
}

/// The growth window.
pub fn parse_get_table_sizes(r: pb::GetTableSizesRequest) -> Result<Duration, Error> {
    let hours = match r.growth_window_hours {
        0 => DEFAULT_GROWTH_HOURS,
        n if (1..=MAX_GROWTH_HOURS).contains(&n) => n.unsigned_abs().into(),
        _ => {
            return Err(Error::invalid(
                "growth_window_hours",
                format!("must be between 0 and {MAX_GROWTH_HOURS}"),
            ));
        }
    };
    Ok(Duration::from_secs(hours * 3600))
}
