//! The value and entity types every layer shares: ids, bounded text,
//! entities, filters, sorts and result types, with the `parse` constructors
//! that make invalid values unrepresentable (parse, don't validate).
//!
//! The model imports nothing above it (only [`crate::error`]): the api
//! converts protobuf into these types, the domain decides with them, the
//! loaders, cache, store and documents carry them.

/// An enum with one wire name per variant: the text it is stored as in a
/// database column, a document or a page token. Declares the enum (a `Copy`
/// value; further attributes pass through) with `as_str` and its inverse
/// `parse`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($variant:ident = $wire:literal),+ $(,)?
        }
    ) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $(#[$meta])*
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire),+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($wire => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

/// A text value that exists only valid: a `String` that the type's own
/// constructors (in an `impl` beside the invocation) check and normalize,
/// read back with `as_str`.
macro_rules! text_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

pub mod analytics;
pub mod audit;
pub mod availability;
pub mod catalog;
pub mod consistency;
pub mod deadline;
pub mod diagnostics;
pub mod idempotency;
pub mod market_analyses;
pub mod orders;
pub mod outbox;
pub mod paging;
pub mod partitions;
pub mod passwords;
pub mod price_history;
pub mod profiles;
pub mod search;
pub mod teams;
pub mod users;

/// A positive database id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Id(i64);

impl Id {
    pub fn parse(raw: i64) -> Result<Self, String> {
        if raw > 0 {
            Ok(Self(raw))
        } else {
            Err("must be a positive id".into())
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Trimmed free text of `min..=max` characters without control characters.
pub fn bounded_text(raw: &str, min: usize, max: usize) -> Result<String, String> {
    let text = raw.trim();
    let len = text.chars().count();
    if len < min || len > max {
        return Err(if min == 0 {
            format!("must be at most {max} characters")
        } else {
            format!("must be {min} to {max} characters")
        });
    }
    if text.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(text.to_owned())
}

/// The values of a batch read in request order (duplicates repeated), and
/// the ids not found, each once (AIP-231).
pub fn in_request_order<T>(ids: &[Id], mut find: impl FnMut(Id) -> Option<T>) -> (Vec<T>, Vec<Id>) {
    let mut found = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    for id in ids {
        match find(*id) {
            Some(value) => found.push(value),
            None if !missing.contains(id) => missing.push(*id),
            None => {}
        }
    }
    (found, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive() {
        assert!(Id::parse(1).is_ok());
        assert!(Id::parse(0).is_err());
        assert!(Id::parse(-5).is_err());
    }

    #[test]
    fn a_wire_enum_reads_back_each_of_its_names_and_nothing_else() {
        use orders::OrderStatus;
        for status in [
            OrderStatus::Pending,
            OrderStatus::Processing,
            OrderStatus::Completed,
            OrderStatus::Cancelled,
        ] {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::parse("Pending"), None);
        assert_eq!(OrderStatus::parse("shipped"), None);
    }
}
