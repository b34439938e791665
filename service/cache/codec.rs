//! The stored forms of cached values, and their TTLs.
//!
//! A value is `V` + postcard (a compact, serde-based binary encoding: no
//! field names, so a user is a third of its JSON size, and no schema to
//! maintain next to the Rust types); a remembered "not found" is `N` (short
//! TTL). A query entry is `V` + postcard of (generation, value): the
//! generation it was computed at, which decides whether it is still a hit.
//! TTLs carry ± jitter so entries written together do not expire together.

use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};

use crate::error::Result;

const VALUE: u8 = b'V';
const NOT_FOUND: &[u8] = b"N";

/// An entity entry as read from Redis.
#[derive(Debug, PartialEq)]
pub(super) enum Stored<T> {
    Value(T),
    NotFound,
    /// Nothing, or nothing in a stored form.
    Absent,
    /// A value that does not decode as `T`: a cached type changed shape
    /// without a format bump, or replicas of two versions share the cache.
    Undecodable,
}

/// Reads an entity entry.
pub(super) fn read<T: DeserializeOwned>(stored: Option<&[u8]>) -> Stored<T> {
    match stored {
        Some(bytes) if bytes == NOT_FOUND => Stored::NotFound,
        Some(bytes) if bytes.first() == Some(&VALUE) => match decode(bytes) {
            Some(value) => Stored::Value(value),
            None => Stored::Undecodable,
        },
        _ => Stored::Absent,
    }
}

/// The stored form of a value (`V` + postcard) or of "not found" (`N`).
/// Cached types are plain structs, so encoding only fails on a programming
/// error (such as `#[serde(flatten)]`, which postcard cannot encode): that
/// is an internal error, never a "not found".
pub(super) fn encode<T: Serialize>(value: Option<&T>) -> Result<Vec<u8>> {
    Ok(match value {
        Some(value) => postcard::to_extend(value, vec![VALUE])
            .map_err(|e| anyhow::anyhow!("encoding a cache value: {e}"))?,
        None => NOT_FOUND.to_vec(),
    })
}

/// A stored value; `None` if it is not one or does not decode as `T`.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes(bytes.strip_prefix(&[VALUE])?).ok()
}

/// The stored form of a query result computed at `generation`.
pub(super) fn encode_query<T: Serialize>(generation: u64, value: &T) -> Result<Vec<u8>> {
    Ok(postcard::to_extend(&(generation, value), vec![VALUE])
        .map_err(|e| anyhow::anyhow!("encoding a cached query result: {e}"))?)
}

/// The generation a stored query entry was computed at.
pub(super) fn query_generation(bytes: &[u8]) -> Option<u64> {
    postcard::take_from_bytes::<u64>(bytes.strip_prefix(&[VALUE])?)
        .ok()
        .map(|(generation, _)| generation)
}

/// The result in a stored query entry; `None` if it does not decode as `T`.
pub(super) fn decode_query<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes::<(u64, T)>(bytes.strip_prefix(&[VALUE])?)
        .ok()
        .map(|(_, value)| value)
}

/// `base` ± `jitter` (a fraction), in milliseconds, at least 1.
pub(super) fn ttl_ms(base: Duration, jitter: f64) -> u64 {
    let mut bytes = [0u8; 4];
    let unit = if getrandom::fill(&mut bytes).is_ok() {
        f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
    } else {
        0.5
    };
    jittered_ms(base, jitter, unit)
}

/// `base` scaled by `1 + jitter·(2·unit − 1)` for `unit` in `[0, 1]`.
fn jittered_ms(base: Duration, jitter: f64, unit: f64) -> u64 {
    let factor = 1.0 + jitter * (2.0 * unit - 1.0);
    (base.as_secs_f64() * factor * 1000.0).max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Row {
        id: i64,
        name: String,
        tags: Vec<String>,
    }

    fn row() -> Row {
        Row {
            id: 42,
            name: "Ada".into(),
            tags: vec!["admin".into()],
        }
    }

    #[test]
    fn a_value_round_trips_through_its_stored_form() {
        let bytes = encode(Some(&row())).unwrap();
        assert_eq!(bytes[0], b'V');
        assert_eq!(decode::<Row>(&bytes), Some(row()));
        assert_eq!(read::<Row>(Some(&bytes)), Stored::Value(row()));
    }

    #[test]
    fn not_found_is_stored_as_n() {
        let bytes = encode::<Row>(None).unwrap();
        assert_eq!(bytes, b"N");
        assert_eq!(read::<Row>(Some(&bytes)), Stored::NotFound);
        assert_eq!(decode::<Row>(&bytes), None, "not a value");
    }

    #[test]
    fn nothing_or_an_unknown_form_reads_as_absent() {
        assert_eq!(read::<Row>(None), Stored::Absent);
        assert_eq!(read::<Row>(Some(b"")), Stored::Absent);
        assert_eq!(read::<Row>(Some(b"X1")), Stored::Absent);
    }

    #[test]
    fn a_query_entry_round_trips_with_its_generation() {
        let bytes = encode_query(7, &vec![3_i64, 1, 2]).unwrap();
        assert_eq!(bytes[0], b'V');
        assert_eq!(query_generation(&bytes), Some(7));
        assert_eq!(decode_query::<Vec<i64>>(&bytes), Some(vec![3, 1, 2]));
    }

    #[test]
    fn a_payload_that_does_not_decode_is_none_not_a_panic() {
        for bytes in [
            &b"V"[..],
            b"V\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            b"Vnot postcard",
            b"",
            b"X",
        ] {
            assert_eq!(decode::<Row>(bytes), None, "{bytes:?}");
            assert_eq!(decode_query::<Row>(bytes), None, "{bytes:?}");
        }
        let other_shape = encode(Some(&"just a string")).unwrap();
        assert_eq!(decode::<Row>(&other_shape), None);
        assert_eq!(read::<Row>(Some(&other_shape)), Stored::Undecodable);
        assert_eq!(read::<Row>(Some(b"V\xff")), Stored::Undecodable);
        assert_eq!(query_generation(b"N"), None);
    }

    #[test]
    fn jittered_ttls_stay_within_base_times_one_plus_or_minus_jitter() {
        let base = Duration::from_secs(300);
        let (low, high) = (270_000, 330_000);
        for _ in 0..10_000 {
            let ttl = ttl_ms(base, 0.1);
            assert!((low..=high).contains(&ttl), "{ttl} ms");
        }
        assert_eq!(jittered_ms(base, 0.1, 0.0), low);
        assert_eq!(jittered_ms(base, 0.1, 1.0), high);
    }

    #[test]
    fn zero_jitter_gives_exactly_the_base_ttl() {
        for _ in 0..100 {
            assert_eq!(ttl_ms(Duration::from_secs(60), 0.0), 60_000);
        }
    }

    #[test]
    fn a_ttl_is_never_below_one_millisecond() {
        assert_eq!(ttl_ms(Duration::ZERO, 0.5), 1);
        assert_eq!(jittered_ms(Duration::from_millis(1), 1.0, 0.0), 1);
        for _ in 0..1_000 {
            assert!(ttl_ms(Duration::from_micros(500), 0.9) >= 1);
        }
    }
}
