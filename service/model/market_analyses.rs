//! Market analyses: what a caller asks for, the stored analysis (one
//! document, with its lease and flexible nested results), and its results.

use std::collections::BTreeMap;

use mongodb::bson::Document;
use serde::{Deserialize, Serialize};

use super::analytics::{CategoryMetrics, SearchDemand, TopProduct};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub caller: String,
    pub kind: String,
    pub categories: Vec<String>,
    pub window_days: i32,
    /// SHA-256 of caller, kind, categories and window: identical requests
    /// share it.
    pub params_hash: String,
    /// `pending`, `running`, `completed` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub lease_owner: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub results: Option<Document>,
    pub timings_ms: Option<Document>,
    pub error: Option<String>,
}

pub const MAX_CATEGORIES: usize = 10;
pub const MAX_WINDOW_DAYS: u32 = 365;

wire_enum! {
    pub enum Kind {
        Overview = "overview",
        Pricing = "pricing",
        Demand = "demand",
        Full = "full",
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PriceTrend {
    pub product_id: i64,
    pub measurements: i64,
    pub first_cents: i64,
    pub last_cents: i64,
    pub min_cents: i64,
    pub max_cents: i64,
    pub change_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Results {
    pub category_metrics: Vec<CategoryMetrics>,
    pub top_products: Vec<TopProduct>,
    pub price_trends: Vec<PriceTrend>,
    pub search_demand: Vec<SearchDemand>,
}

/// An analysis as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub doc: AnalysisDoc,
    pub results: Option<Results>,
    pub timings_ms: BTreeMap<String, f64>,
}
