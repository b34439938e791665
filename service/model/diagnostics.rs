//! What AdminService's diagnostics report about the database, Redis and the
//! pools, and the values their requests are parsed into.

use chrono::{DateTime, Utc};

/// A statement from `pg_stat_statements`, its text normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowStatement {
    pub query_id: i64,
    pub query: String,
    pub calls: i64,
    pub rows: i64,
    pub total_time_ms: f64,
    pub mean_time_ms: f64,
    /// Shared-buffer hits / (hits + reads); `None` when no block was touched.
    pub shared_buffer_hit_ratio: Option<f64>,
}

/// A backend of the service's database running (or idle in a transaction)
/// past the threshold asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveStatement {
    pub pid: i32,
    pub user: String,
    pub application_name: String,
    pub state: String,
    pub wait_event_type: String,
    pub wait_event: String,
    pub duration_ms: f64,
    pub query: String,
    pub blocked_by: Vec<i32>,
    /// One of the service's own backends (cancellable).
    pub own: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UnusedIndex {
    pub table: String,
    pub index: String,
    pub size_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SequentialScanTable {
    pub table: String,
    pub seq_scan: i64,
    pub idx_scan: i64,
    pub seq_tup_read: i64,
    pub live_rows: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RedundantIndex {
    pub table: String,
    pub index: String,
    pub covered_by: String,
    /// Same key (else `index`'s key is a prefix of `covered_by`'s).
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InvalidIndex {
    pub table: String,
    pub index: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexHealth {
    pub unused: Vec<UnusedIndex>,
    pub sequential_scans: Vec<SequentialScanTable>,
    pub redundant: Vec<RedundantIndex>,
    pub invalid: Vec<InvalidIndex>,
}

/// The statement AdviseIndexes plans: one from `pg_stat_statements`, or
/// text the caller gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdviceTarget {
    QueryId(i64),
    Statement(String),
}

/// The longest statement text AdviseIndexes takes.
pub const MAX_STATEMENT_CHARS: usize = 10_000;

impl AdviceTarget {
    /// Exactly one of a query id (non-zero) and a statement (non-blank, at
    /// most [`MAX_STATEMENT_CHARS`], no NUL).
    pub fn parse(query_id: i64, statement: &str) -> Result<Self, (&'static str, String)> {
        let statement = statement.trim();
        match (query_id, statement.is_empty()) {
            (0, true) => Err(("query_id", "set query_id or statement".into())),
            (id, true) => Ok(Self::QueryId(id)),
            (0, false) => {
                if statement.chars().count() > MAX_STATEMENT_CHARS {
                    Err((
                        "statement",
                        format!("must be at most {MAX_STATEMENT_CHARS} characters"),
                    ))
                } else if statement.contains('\0') {
                    Err(("statement", "must not contain NUL".into()))
                } else {
                    Ok(Self::Statement(statement.to_owned()))
                }
            }
            (_, false) => Err(("statement", "set query_id or statement, not both".into())),
        }
    }
}

/// A hypothetical index and what the planner makes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexCandidate {
    pub table: String,
    pub columns: Vec<String>,
    pub definition: String,
    pub cost_after: f64,
    pub improvement: f64,
    pub used: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    pub statement: String,
    pub cost_before: f64,
    pub candidates: Vec<IndexCandidate>,
}

text_newtype!(
    /// A PostgreSQL identifier the diagnostics accept from a caller: 1 to 63
    /// bytes of lower-case ASCII letters, digits and `_`, not starting with
    /// a digit. Such a name means the same quoted or not, and quoted it can
    /// never end the identifier early.
    Identifier
);

impl Identifier {
    pub const MAX_BYTES: usize = 63;

    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = !raw.is_empty()
            && raw.len() <= Self::MAX_BYTES
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !raw.as_bytes()[0].is_ascii_digit();
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {} lower-case letters, digits or _, not starting with a digit",
                Self::MAX_BYTES
            ))
        }
    }

    /// The identifier as SQL text, double-quoted.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

/// The most columns CreateIndex takes.
pub const MAX_INDEX_COLUMNS: usize = 8;

/// An index to build: a table and its key columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSpec {
    pub table: Identifier,
    pub columns: Vec<Identifier>,
}

impl IndexSpec {
    /// `<table>_<col>_<col>_idx`, cut to 63 bytes (an identifier's bytes are
    /// ASCII, so any cut is on a character boundary).
    pub fn name(&self) -> Identifier {
        let columns: Vec<&str> = self.columns.iter().map(Identifier::as_str).collect();
        let mut name = format!("{}_{}", self.table.as_str(), columns.join("_"));
        name.truncate(Identifier::MAX_BYTES - "_idx".len());
        Identifier(format!("{name}_idx"))
    }
}

/// A table's size now and its growth since the oldest sample in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSize {
    pub table: String,
    pub parent: Option<String>,
    pub total_bytes: i64,
    pub estimated_rows: i64,
    /// (bytes grown, when the sample compared with was taken).
    pub growth: Option<(i64, DateTime<Utc>)>,
}

/// Redis `INFO`, summed over the servers that answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisInfo {
    pub nodes: i32,
    pub keyspace_hits: i64,
    pub keyspace_misses: i64,
    pub used_memory_bytes: i64,
    pub max_memory_bytes: i64,
    pub evicted_keys: i64,
    pub connected_clients: i64,
}

impl RedisInfo {
    /// The sections of one server's `INFO` reply added to this sum.
    pub fn add_reply(&mut self, reply: &str) {
        self.nodes += 1;
        for line in reply.lines() {
            let Some((key, value)) = line.trim().split_once(':') else {
                continue;
            };
            let Ok(value) = value.parse::<i64>() else {
                continue;
            };
            let field = match key {
                "keyspace_hits" => &mut self.keyspace_hits,
                "keyspace_misses" => &mut self.keyspace_misses,
                "used_memory" => &mut self.used_memory_bytes,
                "maxmemory" => &mut self.max_memory_bytes,
                "evicted_keys" => &mut self.evicted_keys,
                "connected_clients" => &mut self.connected_clients,
                _ => continue,
            };
            *field += value;
        }
    }

    /// hits / (hits + misses), `None` before any lookup.
    pub fn hit_ratio(&self) -> Option<f64> {
        let total = self.keyspace_hits + self.keyspace_misses;
        (total > 0).then(|| self.keyspace_hits as f64 / total as f64)
    }
}

/// A connection pool of this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub pool: &'static str,
    pub size: i64,
    pub idle: i64,
    pub max: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseHealth {
    pub buffer_cache_hit_ratio: Option<f64>,
    pub connections: Vec<(String, i64)>,
    pub replication_lag_seconds: Option<f64>,
    /// `None` when the cache is off or Redis did not answer.
    pub redis: Option<RedisInfo>,
    pub pools: Vec<PoolStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_lower_case_names_only() {
        assert_eq!(
            Identifier::parse("order_items").unwrap().quoted(),
            "\"order_items\""
        );
        for bad in [
            "",
            "Users",
            "users; drop",
            "a\"b",
            "1st",
            "é",
            &"x".repeat(64),
        ] {
            assert!(Identifier::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Identifier::parse(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn an_index_name_fits_in_an_identifier() {
        let id = |s: &str| Identifier::parse(s).unwrap();
        let spec = IndexSpec {
            table: id("orders"),
            columns: vec![id("user_id"), id("created_at")],
        };
        assert_eq!(spec.name().as_str(), "orders_user_id_created_at_idx");
        let long = IndexSpec {
            table: id(&"t".repeat(60)),
            columns: vec![id("c")],
        };
        assert_eq!(long.name().as_str().len(), 63);
        assert!(long.name().as_str().ends_with("_idx"));
    }

    #[test]
    fn advice_takes_exactly_one_of_a_query_id_and_a_statement() {
        assert_eq!(AdviceTarget::parse(7, " "), Ok(AdviceTarget::QueryId(7)));
        assert_eq!(
            AdviceTarget::parse(0, " SELECT 1 "),
            Ok(AdviceTarget::Statement("SELECT 1".into()))
        );
        assert!(AdviceTarget::parse(0, "").is_err());
        assert!(AdviceTarget::parse(7, "SELECT 1").is_err());
        assert!(AdviceTarget::parse(0, "SELECT '\0'").is_err());
        assert!(AdviceTarget::parse(0, &"x".repeat(MAX_STATEMENT_CHARS + 1)).is_err());
    }

    #[test]
    fn redis_info_is_summed_over_servers() {
        let mut info = RedisInfo::default();
        let reply = "# Stats\r\nkeyspace_hits:30\r\nkeyspace_misses:10\r\nevicted_keys:2\r\n\
                     # Memory\r\nused_memory:1000\r\nused_memory_human:1000B\r\nmaxmemory:0\r\n\
                     # Clients\r\nconnected_clients:3\r\n";
        info.add_reply(reply);
        info.add_reply(reply);
        assert_eq!(info.nodes, 2);
        assert_eq!(info.keyspace_hits, 60);
        assert_eq!(info.used_memory_bytes, 2000);
        assert_eq!(info.connected_clients, 6);
        assert_eq!(info.evicted_keys, 4);
        assert_eq!(info.hit_ratio(), Some(0.75));
        assert_eq!(RedisInfo::default().hit_ratio(), None);
    }
}
