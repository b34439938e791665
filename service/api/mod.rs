//! gRPC handlers: one file per service. Each RPC converts the request into
//! domain values (collecting every field violation), calls the domain, and
//! converts the result back. No SQL here.

pub mod catalog;
pub mod error;
pub mod orders;
pub mod users;

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::domain::{
    error::Violations,
    paging::{PageRequest, PageSize},
    users::Id,
};

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

pub(crate) fn parse_page(
    v: &mut Violations,
    page_size: i32,
    page_token: String,
) -> Option<PageRequest> {
    let size = v.check("page_size", PageSize::parse(page_size))?;
    Some(PageRequest {
        size,
        token: (!page_token.is_empty()).then_some(page_token),
    })
}

/// Fails with every collected violation, or unwraps the parsed values (each
/// present once there is no violation; a missing one is a bug, reported as
/// an internal error rather than a panic).
macro_rules! parsed {
    ($violations:expr, $($value:ident),+ $(,)?) => {
        $violations.into_result()?;
        $(let Some($value) = $value else {
            return Err($crate::domain::error::Error::Internal(anyhow::anyhow!(concat!(stringify!($value), " missing without a violation"))).into());
        };)+
    };
}
pub(crate) use parsed;
