//! `datagate.v1.CatalogService`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost_types::FieldMask;

use super::{
    Answer, Call, actor, apply_mask, parse_consistency, parse_id, parse_ids, parse_window, parsed,
    reply, required_version, timestamp,
};
use crate::{
    domain::{
        catalog::Catalog,
        price_history::PriceHistory,
        search::{ProductSearch, parse_categories, parse_page_size},
    },
    error::{Error, Violations},
    model::{
        Id,
        catalog::{
            MAX_ADJUSTMENT, MAX_BATCH, NewProduct, Product, ProductPatch, Sku, Text, parse_count,
            parse_price, parse_rating,
        },
        consistency::Consistency,
        paging::PageRequest,
        price_history::{Granularity, MAX_RANGE_DAYS},
        search::{MAX_QUERY_CHARS, SearchFilters, SearchRequest, SearchSort, SearchText},
    },
    proto::v1 as pb,
};

pub use pb::catalog_service_server::CatalogServiceServer;

pub struct CatalogApi {
    pub(crate) catalog: Catalog,
    pub(crate) search: ProductSearch,
    pub(crate) prices: PriceHistory,
    /// The largest `max_staleness` a GetProduct may ask for.
    pub(crate) max_staleness: Duration,
}

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for CatalogApi {
    async fn create_product(&self, call: Call<pb::CreateProductRequest>) -> Answer<pb::Product> {
        let actor = actor(&call)?;
        let new = parse_create_product(call.into_inner())?;
        let product = self.catalog.create(&actor, new).await?;
        reply(product)
    }

    async fn get_product(&self, call: Call<pb::GetProductRequest>) -> Answer<pb::Product> {
        let (id, consistency) = parse_get_product(call.into_inner(), self.max_staleness)?;
        reply(self.catalog.get(id, consistency).await?)
    }

    async fn batch_get_products(
        &self,
        call: Call<pb::BatchGetProductsRequest>,
    ) -> Answer<pb::BatchGetProductsResponse> {
        let r = call.into_inner();
        let ids = parse_batch_get_products(&r)?;
        let (products, missing) = self.catalog.batch_get(&ids, r.skip_missing).await?;
        reply(pb::BatchGetProductsResponse {
            products: products.into_iter().map(Into::into).collect(),
            missing_ids: missing.into_iter().map(|id| id.get()).collect(),
        })
    }

    async fn update_product(&self, call: Call<pb::UpdateProductRequest>) -> Answer<pb::Product> {
        let actor = actor(&call)?;
        let (id, version, patch) = parse_update_product(call.into_inner())?;
        reply(self.catalog.update(&actor, id, version, patch).await?)
    }

    async fn adjust_inventory(
        &self,
        call: Call<pb::AdjustInventoryRequest>,
    ) -> Answer<pb::Product> {
        let actor = actor(&call)?;
        let (id, delta) = parse_adjust_inventory(call.into_inner())?;
        reply(self.catalog.adjust_inventory(&actor, id, delta).await?)
    }

    async fn get_price_history(
        &self,
        call: Call<pb::GetPriceHistoryRequest>,
    ) -> Answer<pb::GetPriceHistoryResponse> {
        let (id, start, end, granularity) = parse_get_price_history(call.into_inner())?;
        let history = self.prices.get(id, start, end, granularity).await?;
        reply(pb::GetPriceHistoryResponse {
            measurements: history
                .measurements
                .into_iter()
                .map(|(at, price_cents)| pb::PriceMeasurement {
                    time: Some(timestamp(at)),
                    price_cents,
                })
                .collect(),
            days: history
                .days
                .into_iter()
                .map(|d| pb::DailyPrice {
                    day: d.day,
                    measurements: d.measurements,
                    min_cents: d.min_cents,
                    max_cents: d.max_cents,
                    average_cents: d.average_cents,
                    open_cents: d.open_cents,
                    close_cents: d.close_cents,
                })
                .collect(),
        })
    }

    async fn search_products(
        &self,
        call: Call<pb::SearchProductsRequest>,
    ) -> Answer<pb::SearchProductsResponse> {
        let search = parse_search_products(call.into_inner())?;
        let page = self.search.search(search).await?;
        reply(pb::SearchProductsResponse {
            products: page.products.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            fuzzy: page.corrected_query.is_some(),
            corrected_query: page.corrected_query.unwrap_or_default(),
        })
    }
}

// Each RPC's request, parsed: every field violation collected, or the domain
// values the handler passes on. Public for the fuzz targets (`fuzz/`), which
// run them on arbitrary messages.

pub fn parse_create_product(r: pb::CreateProductRequest) -> Result<NewProduct, Error> {
    let mut v = Violations::default();
    let sku = v.check("sku", Sku::parse(&r.sku));
    let title = v.check("title", Text::title(&r.title));
    let description = v.check("description", Text::description(&r.description));
    let category = v.check("category", Text::category(&r.category));
    let price_cents = v.check("price_cents", parse_price(r.price_cents));
    let rating = v.check("rating", parse_rating(r.rating));
    let review_count = v.check("review_count", parse_count(r.review_count));
    let inventory = v.check("inventory", parse_count(r.inventory));
    Ok(parsed!(
        v,
        NewProduct {
            sku,
            title,
            description,
            category,
            price_cents,
            rating,
            review_count,
            inventory,
        }
    ))
}

/// The id, and the consistency asked for (`max_staleness`, at most `max`).
pub fn parse_get_product(
    r: pb::GetProductRequest,
    max: Duration,
) -> Result<(Id, Consistency), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "id", r.id);
    let consistency = v.check("max_staleness", parse_consistency(r.max_staleness, max));
    parsed!(v, id, consistency);
    Ok((id, consistency))
}

pub fn parse_batch_get_products(r: &pb::BatchGetProductsRequest) -> Result<Vec<Id>, Error> {
    parse_ids(&r.ids, MAX_BATCH)
}

/// The product, the version the update names, and the patch.
pub fn parse_update_product(r: pb::UpdateProductRequest) -> Result<(Id, i64, ProductPatch), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "id", r.id);
    required_version(&mut v, r.version, "product", "GetProduct");
    let patch = parse_patch(&mut v, r.product.unwrap_or_default(), r.update_mask);
    parsed!(v, id, patch);
    Ok((id, r.version, patch))
}

/// The product and the change of its inventory.
pub fn parse_adjust_inventory(r: pb::AdjustInventoryRequest) -> Result<(Id, i32), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "product_id", r.product_id);
    if r.delta == 0 || r.delta.unsigned_abs() > MAX_ADJUSTMENT.unsigned_abs() {
        v.add(
            "delta",
            format!("must be non-zero and at most {MAX_ADJUSTMENT} either way"),
        );
    }
    parsed!(v, id);
    Ok((id, r.delta))
}

/// The product, the `[start, end)` window and the granularity.
pub fn parse_get_price_history(
    r: pb::GetPriceHistoryRequest,
) -> Result<(Id, DateTime<Utc>, DateTime<Utc>, Granularity), Error> {
    let mut v = Violations::default();
    let id = parse_id(&mut v, "product_id", r.product_id);
    let (start, end) = parse_window(&mut v, r.start_time, r.end_time, MAX_RANGE_DAYS);
    let granularity = match pb::PriceHistoryGranularity::try_from(r.granularity) {
        Ok(pb::PriceHistoryGranularity::Daily) => Some(Granularity::Daily),
        Ok(_) => Some(Granularity::Measurements),
        Err(_) => {
            v.add(
                "granularity",
                format!(
                    "unknown granularity {}; use PRICE_HISTORY_GRANULARITY_MEASUREMENTS or PRICE_HISTORY_GRANULARITY_DAILY",
                    r.granularity
                ),
            );
            None
        }
    };
    parsed!(v, id, start, end, granularity);
    Ok((id, start, end, granularity))
}

pub fn parse_search_products(r: pb::SearchProductsRequest) -> Result<SearchRequest, Error> {
    let mut v = Violations::default();
    let text = v.check(
        "query",
        SearchText::parse(&r.query)
            .map_err(|e| format!("{e}; send 1 to {MAX_QUERY_CHARS} characters of search text")),
    );
    let categories = v.check("categories", parse_categories(&r.categories));
    let min_price_cents = r
        .min_price_cents
        .and_then(|c| v.check("min_price_cents", parse_price(c)));
    let max_price_cents = r
        .max_price_cents
        .and_then(|c| v.check("max_price_cents", parse_price(c)));
    if let (Some(min), Some(max)) = (min_price_cents, max_price_cents)
        && min > max
    {
        v.add(
            "max_price_cents",
            format!("must not be less than min_price_cents ({min})"),
        );
    }
    let min_rating = r
        .min_rating
        .and_then(|x| v.check("min_rating", parse_rating(x)));
    let sort = v.check("sort", parse_sort(r.sort));
    let size = v.check("page_size", parse_page_size(r.page_size));
    let user_id = match r.user_id {
        0 => None,
        raw => v.check(
            "user_id",
            Id::parse(raw).map_err(|e| format!("{e} (0 for an anonymous search)")),
        ),
    };
    parsed!(v, text, categories, sort, size);
    Ok(SearchRequest {
        text,
        filters: SearchFilters {
            categories,
            min_price_cents,
            max_price_cents,
            min_rating,
        },
        sort,
        page: PageRequest::new(size, r.page_token),
        user_id,
    })
}

fn parse_sort(raw: i32) -> Result<SearchSort, String> {
    use pb::ProductSort as S;
    match S::try_from(raw) {
        Ok(S::Unspecified | S::Relevance) => Ok(SearchSort::Relevance),
        Ok(S::PriceAscending) => Ok(SearchSort::PriceAscending),
        Ok(S::PriceDescending) => Ok(SearchSort::PriceDescending),
        Ok(S::Newest) => Ok(SearchSort::Newest),
        Ok(S::Rating) => Ok(SearchSort::Rating),
        Err(_) => Err(format!(
            "unknown sort {raw}; use PRODUCT_SORT_RELEVANCE, PRODUCT_SORT_PRICE_ASCENDING, \
             PRODUCT_SORT_PRICE_DESCENDING, PRODUCT_SORT_NEWEST or PRODUCT_SORT_RATING"
        )),
    }
}

const PATCHABLE: &str = "title, description, category, price_cents, rating, review_count";

fn parse_patch(
    v: &mut Violations,
    p: pb::ProductPatch,
    mask: Option<FieldMask>,
) -> Option<ProductPatch> {
    let mut patch = ProductPatch::default();
    let known = apply_mask(v, mask, PATCHABLE, |v, path| {
        match path {
            "title" => patch.title = v.check("product.title", Text::title(&p.title)),
            "description" => {
                patch.description =
                    v.check("product.description", Text::description(&p.description))
            }
            "category" => patch.category = v.check("product.category", Text::category(&p.category)),
            "price_cents" => {
                patch.price_cents = v.check("product.price_cents", parse_price(p.price_cents))
            }
            "rating" => patch.rating = v.check("product.rating", parse_rating(p.rating)),
            "review_count" => {
                patch.review_count = v.check("product.review_count", parse_count(p.review_count))
            }
            _ => return false,
        }
        true
    });
    known.then_some(patch)
}

impl From<Product> for pb::Product {
    fn from(p: Product) -> Self {
        Self {
            id: p.id.get(),
            sku: p.sku,
            title: p.title,
            description: p.description,
            category: p.category,
            price_cents: p.price_cents,
            rating: p.rating,
            review_count: p.review_count,
            inventory: p.inventory,
            create_time: Some(timestamp(p.created_at)),
            update_time: Some(timestamp(p.updated_at)),
            version: p.version,
        }
    }
}
