//! Partitions of the monthly range-partitioned tables, as maintenance and
//! AdminService see them.

use chrono::NaiveDate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub table: String,
    pub name: String,
    /// The month it covers (None for DEFAULT or a partition not named by us).
    pub month: Option<NaiveDate>,
    pub is_default: bool,
    /// The planner's estimate (`reltuples`), or -1 when never analyzed.
    pub estimated_rows: i64,
    pub bound: String,
}
