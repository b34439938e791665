//! Sales and catalog analytics: the result types of the analytics RPCs and
//! of market analyses.

use chrono::NaiveDate;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct CategoryMetrics {
    pub category: String,
    pub products: i64,
    pub average_price_cents: f64,
    pub median_price_cents: f64,
    pub average_rating: f64,
    pub orders: i64,
    pub units_sold: i64,
    pub revenue_cents: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct TopProduct {
    pub product_id: i64,
    pub title: String,
    pub category: String,
    pub units_sold: i64,
    pub revenue_cents: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct SearchDemand {
    pub category: String,
    pub searches: i64,
    pub zero_result_searches: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MonthlyRevenue {
    /// The first day of the month.
    pub month: NaiveDate,
    pub revenue_cents: i64,
    pub growth_rate: Option<f64>,
}
