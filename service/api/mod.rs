//! gRPC handlers: one file per service. Each RPC converts the request into
//! domain values (collecting every field violation), calls the domain, and
//! converts the result back. No SQL here. The conversion of each request is
//! a `parse_<rpc>` function beside the handlers, so the fuzz targets
//! (`fuzz/`, through `datagate::fuzzing`) run exactly what the handler runs.

pub mod admin;
pub mod analytics;
pub mod catalog;
pub mod error;
pub mod orders;
pub mod users;

use chrono::{DateTime, Utc};
use prost_types::{FieldMask, Timestamp};

use crate::{
    auth::Caller,
    error::{Error, Violations},
    model::{
        Id,
        audit::{Actor, RequestId},
        paging::{Page, PageRequest, PageSize},
    },
};

/// What a handler takes: the call's request, metadata and extensions
/// (caller, request id, deadline) included.
pub(crate) type Call<T> = tonic::Request<T>;

/// What a handler answers: the response message, or the call's status
/// (every domain [`Error`] converts into one).
pub(crate) type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

/// A handler's successful answer: `value` as the response message.
pub(crate) fn reply<T>(value: impl Into<T>) -> Answer<T> {
    Ok(tonic::Response::new(value.into()))
}

/// A page's items as response messages, and its next page token (empty on
/// the last page).
pub(crate) fn paged<T, M: From<T>>(page: Page<T>) -> (Vec<M>, String) {
    let items = page.items.into_iter().map(M::from).collect();
    (items, page.next_page_token.unwrap_or_default())
}

/// The caller of a call. Every service call passed the auth layer, so a
/// missing caller is a bug.
pub(crate) fn caller<T>(call: &Call<T>) -> Result<&Caller, Error> {
    call.extensions()
        .get::<Caller>()
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("no caller on an authenticated call")))
}

/// The caller and request id of a call, for the writes it makes.
pub(crate) fn actor<T>(call: &Call<T>) -> Result<Actor, Error> {
    let caller = caller(call)?;
    let request_id = call.extensions().get::<RequestId>().map(|r| r.0.clone());
    Ok(Actor::new(caller.name(), request_id))
}

pub(crate) fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub(crate) fn parse_timestamp(t: &Timestamp) -> Result<DateTime<Utc>, String> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| "is not a valid timestamp".to_owned())
}

pub(crate) fn parse_id(v: &mut Violations, field: &str, raw: i64) -> Option<Id> {
    v.check(field, Id::parse(raw))
}

/// A point read's `max_staleness` (unset or zero: strong), at most `max`.
pub(crate) fn parse_consistency(
    max_staleness: Option<prost_types::Duration>,
    max: std::time::Duration,
) -> Result<crate::model::consistency::Consistency, String> {
    crate::model::consistency::Consistency::parse(max_staleness.map(|d| (d.seconds, d.nanos)), max)
}

/// The id of a request that carries nothing else to parse (violation on `field`).
pub(crate) fn one_id(field: &str, raw: i64) -> Result<Id, Error> {
    Id::parse(raw).map_err(|e| Error::invalid(field, e))
}

/// The ids of a batch request: at most `max`, each positive (violations on
/// `ids` and `ids[i]`).
pub(crate) fn parse_ids(raw: &[i64], max: usize) -> Result<Vec<Id>, Error> {
    let mut v = Violations::default();
    if raw.len() > max {
        v.add("ids", format!("must hold at most {max} ids"));
    }
    let ids = raw
        .iter()
        .enumerate()
        .filter_map(|(i, id)| parse_id(&mut v, &format!("ids[{i}]"), *id))
        .collect();
    v.into_result()?;
    Ok(ids)
}

/// The version an update must name: the entity's current one (`from`, the
/// RPC that reads it); optimistic concurrency needs it.
pub(crate) fn required_version(v: &mut Violations, raw: i64, entity: &str, from: &str) {
    if raw <= 0 {
        v.add(
            "version",
            format!("must be the {entity}'s current version (from {from})"),
        );
    }
}

/// The version a change may name: 0 for any version (`None`), else the
/// entity's current one.
pub(crate) fn optional_version(v: &mut Violations, raw: i64, entity: &str) -> Option<i64> {
    if raw < 0 {
        v.add(
            "version",
            format!("must be 0 (any version) or the {entity}'s current version"),
        );
    }
    (raw > 0).then_some(raw)
}

/// Walks the paths of an update mask (AIP-134): `apply` parses the field a
/// path names into the patch and answers whether it knows the path. An
/// empty mask or an unknown path is a violation on `update_mask` naming
/// `allowed`; the answer is whether every path was known.
pub(crate) fn apply_mask(
    v: &mut Violations,
    mask: Option<FieldMask>,
    allowed: &str,
    mut apply: impl FnMut(&mut Violations, &str) -> bool,
) -> bool {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        v.add(
            "update_mask",
            format!("must name the fields to change: {allowed}"),
        );
        return false;
    }
    let mut ok = true;
    for path in &paths {
        if !apply(v, path) {
            ok = false;
            v.add(
                "update_mask",
                format!("unknown path {path:?}; allowed: {allowed}"),
            );
        }
    }
    ok
}

/// A `[created_after, created_before)` filter; `created_before` must be later.
pub(crate) fn parse_time_range(
    v: &mut Violations,
    created_after: Option<&Timestamp>,
    created_before: Option<&Timestamp>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let after = created_after.and_then(|t| v.check("created_after", parse_timestamp(t)));
    let before = created_before.and_then(|t| v.check("created_before", parse_timestamp(t)));
    if let (Some(after), Some(before)) = (after, before)
        && after >= before
    {
        v.add("created_before", "must be later than created_after");
    }
    (after, before)
}

/// A required `[start_time, end_time)` window of at most `max_days` (violations
/// on `start_time` / `end_time`).
pub(crate) fn parse_window(
    v: &mut Violations,
    start_time: Option<Timestamp>,
    end_time: Option<Timestamp>,
    max_days: i64,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let mut required = |field: &str, t: Option<Timestamp>| match t {
        Some(t) => v.check(field, parse_timestamp(&t)),
        None => {
            v.add(field, "is required");
            None
        }
    };
    let start = required("start_time", start_time);
    let end = required("end_time", end_time);
    if let (Some(start), Some(end)) = (start, end) {
        if start >= end {
            v.add("end_time", "must be later than start_time");
        } else if end - start > chrono::Duration::days(max_days) {
            v.add(
                "end_time",
                format!("the window may span at most {max_days} days"),
            );
        }
    }
    (start, end)
}

pub(crate) fn parse_page(
    v: &mut Violations,
    page_size: i32,
    page_token: String,
) -> Option<PageRequest> {
    let size = v.check("page_size", PageSize::parse(page_size))?;
    Some(PageRequest::new(size, page_token))
}

/// Fails with every collected violation, or unwraps the parsed values (each
/// present once there is no violation; a missing one is a bug, reported as
/// an internal error rather than a panic). `parsed!(v, Struct { a, b })` is
/// the struct of the unwrapped values.
macro_rules! parsed {
    ($violations:expr, $ty:ident { $($value:ident),+ $(,)? }) => {{
        parsed!($violations, $($value),+);
        $ty { $($value),+ }
    }};
    ($violations:expr, $($value:ident),+ $(,)?) => {
        $violations.into_result()?;
        $(let Some($value) = $value else {
            return Err($crate::error::Error::Internal(anyhow::anyhow!(concat!(stringify!($value), " missing without a violation"))).into());
        };)+
    };
}
pub(crate) use parsed;
