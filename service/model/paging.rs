//! Page sizes and page tokens (AIP-158).
//!
//! A page token is `base64url(payload ‖ HMAC-SHA256(payload))`. The payload
//! holds the keyset cursor (the sort key of the last row served) and a digest
//! of the query it belongs to, so a token cannot be forged, altered, or
//! replayed against different filters. Tokens carry no expiry: keyset cursors
//! stay meaningful as rows come and go.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac as _};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest as _, Sha256};

use crate::error::Error;

const MAC_LEN: usize = 32;

/// The time of a keyset cursor (µs since the epoch), or INVALID_ARGUMENT on
/// `page_token` for a position no row can have.
pub fn keyset_time(micros: i64) -> Result<DateTime<Utc>, Error> {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .ok_or_else(|| Error::invalid("page_token", "holds an impossible position"))
}

/// The canonical form of a `[after, before)` window on `created_at` (an
/// open end is empty), part of what a listing's page tokens are bound to.
pub(crate) fn canonical_window(
    after: Option<DateTime<Utc>>,
    before: Option<DateTime<Utc>>,
) -> String {
    let end = |t: Option<DateTime<Utc>>| t.map_or(String::new(), |t| t.to_rfc3339());
    format!("after={};before={}", end(after), end(before))
}

/// A validated page size: 0 means the default, more than the maximum is
/// coerced down to it, negative is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(u32);

impl PageSize {
    pub const DEFAULT: u32 = 50;
    pub const MAX: u32 = 500;

    pub fn parse(requested: i32) -> Result<Self, String> {
        match requested {
            n if n < 0 => Err(format!("must be between 0 and {}", Self::MAX)),
            0 => Ok(Self(Self::DEFAULT)),
            n => Ok(Self((n as u32).min(Self::MAX))),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The same size, at most `max`.
    pub fn capped(self, max: u32) -> Self {
        Self(self.0.min(max))
    }

    /// One more row than the page, to learn whether another page follows.
    pub fn fetch_limit(self) -> i64 {
        i64::from(self.0) + 1
    }
}

/// What a list call asks for: a page size and maybe a token from the previous page.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub size: PageSize,
    pub token: Option<String>,
}

impl PageRequest {
    /// A request for pages of `size`; an empty `token` (protobuf's unset)
    /// asks for the first page.
    pub fn new(size: PageSize, token: String) -> Self {
        Self {
            size,
            token: (!token.is_empty()).then_some(token),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

impl<T> Page<T> {
    /// A page from rows fetched with [`PageSize::fetch_limit`]: the extra row,
    /// if present, is dropped and proves a next page exists, whose token
    /// `next_token` makes from the last row kept.
    pub fn from_overfetch(
        mut items: Vec<T>,
        size: PageSize,
        next_token: impl FnOnce(&T) -> String,
    ) -> Self {
        let size = size.get() as usize;
        let next_page_token = if items.len() > size {
            items.truncate(size);
            items.last().map(next_token)
        } else {
            None
        };
        Self {
            items,
            next_page_token,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Payload<C> {
    /// Which listing the token belongs to, e.g. `users`.
    s: String,
    /// Digest of the query's filters.
    q: String,
    /// The keyset cursor.
    c: C,
}

/// Signs page tokens with the configured secret, and checks them against it
/// and the previous secrets, if any: so the secret is rotated without
/// breaking the listings in progress (the new secret goes to every replica
/// with the old one as previous; once no replica signs with the old one and
/// its tokens have been used up, the old one is dropped).
#[derive(Clone)]
pub struct PageTokens {
    key: Arc<[u8]>,
    previous: Arc<[Arc<[u8]>]>,
}

impl PageTokens {
    pub fn new(secret: &SecretString) -> Self {
        Self {
            key: secret.expose_secret().as_bytes().into(),
            previous: Arc::new([]),
        }
    }

    /// Also accepting the tokens signed with `previous` secrets.
    pub fn with_previous(mut self, previous: &[SecretString]) -> Self {
        self.previous = previous
            .iter()
            .map(|secret| Arc::from(secret.expose_secret().as_bytes()))
            .collect();
        self
    }

    fn mac(&self) -> Hmac<Sha256> {
        mac_with(&self.key)
    }

    /// Makes the token for the page after `cursor`. `query` is a canonical
    /// description of the filters the token is bound to.
    pub fn encode<C: Serialize>(&self, scope: &str, query: &str, cursor: &C) -> String {
        let payload = serde_json::to_vec(&Payload {
            s: scope.to_owned(),
            q: query_digest(query),
            c: cursor,
        })
        .expect("cursors serialize to JSON");
        let mut mac = self.mac();
        mac.update(&payload);
        let mut bytes = payload;
        bytes.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Returns the cursor of a token made by [`encode`](Self::encode) for the
    /// same scope and query, or INVALID_ARGUMENT on `page_token`.
    pub fn decode<C: DeserializeOwned>(
        &self,
        scope: &str,
        query: &str,
        token: &str,
    ) -> Result<C, Error> {
        let invalid = || {
            Error::invalid(
                "page_token",
                "is not a token returned by this listing; start again without a page_token",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        if bytes.len() <= MAC_LEN {
            return Err(invalid());
        }
        let (payload, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let signed_with = |key: &[u8]| {
            let mut mac = mac_with(key);
            mac.update(payload);
            mac.verify_slice(tag).is_ok()
        };
        if !(signed_with(&self.key) || self.previous.iter().any(|key| signed_with(key))) {
            return Err(invalid());
        }
        let payload: Payload<C> = serde_json::from_slice(payload).map_err(|_| invalid())?;
        if payload.s != scope {
            return Err(invalid());
        }
        if payload.q != query_digest(query) {
            return Err(Error::invalid(
                "page_token",
                "belongs to a query with other filters; send the same filters as for the first page",
            ));
        }
        Ok(payload.c)
    }
}

impl PageTokens {
    /// The tokens of one listing: `scope` names it (e.g. `users`) and `query`
    /// is the canonical description of its filters, so every token it reads
    /// and makes is bound to the same two.
    pub fn listing<'a>(&'a self, scope: &'a str, query: &'a str) -> Listing<'a> {
        Listing {
            tokens: self,
            scope,
            query,
        }
    }
}

/// The page tokens of one listing (see [`PageTokens::listing`]).
pub struct Listing<'a> {
    tokens: &'a PageTokens,
    scope: &'a str,
    query: &'a str,
}

impl Listing<'_> {
    /// The keyset cursor the request's page token carries; `None` for the
    /// first page.
    pub fn after<C: DeserializeOwned>(&self, page: &PageRequest) -> Result<Option<C>, Error> {
        page.token
            .as_deref()
            .map(|t| self.tokens.decode(self.scope, self.query, t))
            .transpose()
    }

    /// The token of the page after `cursor`.
    pub fn token<C: Serialize>(&self, cursor: &C) -> String {
        self.tokens.encode(self.scope, self.query, cursor)
    }

    /// [`Page::from_overfetch`], the next token made from the cursor of the
    /// last row kept.
    pub fn page<T, C: Serialize>(
        &self,
        items: Vec<T>,
        size: PageSize,
        cursor: impl FnOnce(&T) -> C,
    ) -> Page<T> {
        Page::from_overfetch(items, size, |last| self.token(&cursor(last)))
    }
}

fn mac_with(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn query_digest(query: &str) -> String {
    hex::encode(&Sha256::digest(query.as_bytes())[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> PageTokens {
        PageTokens::new(&SecretString::from("k".repeat(32)))
    }

    #[test]
    fn after_a_rotation_tokens_of_the_previous_secret_still_decode() {
        let old = tokens();
        let token = old.encode("users", "q", &7_i64);
        let rotated = PageTokens::new(&SecretString::from("n".repeat(32)))
            .with_previous(&[SecretString::from("k".repeat(32))]);
        assert_eq!(rotated.decode::<i64>("users", "q", &token).unwrap(), 7);
        let fresh = rotated.encode("users", "q", &8_i64);
        assert!(
            old.decode::<i64>("users", "q", &fresh).is_err(),
            "signed with the new one"
        );
        let dropped = PageTokens::new(&SecretString::from("n".repeat(32)));
        assert!(
            dropped.decode::<i64>("users", "q", &token).is_err(),
            "old secret dropped"
        );
    }

    #[test]
    fn a_window_has_one_canonical_form_with_empty_open_ends() {
        let t = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(canonical_window(None, None), "after=;before=");
        assert_eq!(
            canonical_window(Some(t), None),
            "after=2023-11-14T22:13:20+00:00;before="
        );
    }

    #[test]
    fn a_token_round_trips_its_cursor() {
        let t = tokens();
        let token = t.encode("users", "status=any", &(17_i64, 42_i64));
        let cursor: (i64, i64) = t.decode("users", "status=any", &token).unwrap();
        assert_eq!(cursor, (17, 42));
    }

    #[test]
    fn a_changed_byte_invalidates_the_token() {
        let t = tokens();
        let token = t.encode("users", "q", &(1_i64, 2_i64));
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[8] ^= 1;
        let forged = URL_SAFE_NO_PAD.encode(bytes);
        assert!(t.decode::<(i64, i64)>("users", "q", &forged).is_err());
        assert!(t.decode::<(i64, i64)>("users", "q", "not base64!").is_err());
        assert!(t.decode::<(i64, i64)>("users", "q", "").is_err());
    }

    #[test]
    fn a_token_is_bound_to_its_scope_query_and_key() {
        let t = tokens();
        let token = t.encode("users", "status=active", &(1_i64, 2_i64));
        assert!(
            t.decode::<(i64, i64)>("teams", "status=active", &token)
                .is_err()
        );
        assert!(
            t.decode::<(i64, i64)>("users", "status=any", &token)
                .is_err()
        );
        let other = PageTokens::new(&SecretString::from("o".repeat(32)));
        assert!(
            other
                .decode::<(i64, i64)>("users", "status=active", &token)
                .is_err()
        );
    }

    #[test]
    fn a_listing_reads_back_the_cursor_of_the_last_row_it_served() {
        let t = tokens();
        let listing = t.listing("users", "status=any");
        let first = PageRequest::new(PageSize::parse(2).unwrap(), String::new());
        assert_eq!(listing.after::<(i64, i64)>(&first).unwrap(), None);
        let page = listing.page(
            vec![(1_i64, 10_i64), (2, 20), (3, 30)],
            first.size,
            |&row| row,
        );
        let next = PageRequest::new(first.size, page.next_page_token.unwrap());
        assert_eq!(listing.after::<(i64, i64)>(&next).unwrap(), Some((2, 20)));
        assert!(
            t.listing("users", "status=active")
                .after::<(i64, i64)>(&next)
                .is_err()
        );
    }

    #[test]
    fn an_overfetched_row_means_a_next_page() {
        let size = PageSize::parse(2).unwrap();
        let page = Page::from_overfetch(vec![1, 2, 3], size, |last| format!("after {last}"));
        assert_eq!(page.items, [1, 2]);
        assert_eq!(page.next_page_token.as_deref(), Some("after 2"));
        let last = Page::from_overfetch(vec![1, 2], size, |_| unreachable!("no next page"));
        assert_eq!(last.items, [1, 2]);
        assert!(last.next_page_token.is_none());
    }

    #[test]
    fn page_sizes_default_cap_and_reject_negatives() {
        assert_eq!(PageSize::parse(0).unwrap().get(), PageSize::DEFAULT);
        assert_eq!(PageSize::parse(7).unwrap().get(), 7);
        assert_eq!(PageSize::parse(10_000).unwrap().get(), PageSize::MAX);
        assert!(PageSize::parse(-1).is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        type Cursor = (i64, i64, String);

        proptest! {
            #[test]
            fn a_token_decodes_to_its_cursor_for_its_scope_and_query(
                scope in "[a-z_]{1,12}",
                query in ".{0,64}",
                cursor in (any::<i64>(), any::<i64>(), ".{0,32}"),
            ) {
                let token = tokens().encode(&scope, &query, &cursor);
                let back: Cursor = tokens().decode(&scope, &query, &token).unwrap();
                prop_assert_eq!(back, cursor);
            }

            #[test]
            fn a_token_with_any_byte_changed_is_refused(
                cursor in (any::<i64>(), any::<i64>(), ".{0,32}"),
                at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let token = tokens().encode("users", "q", &cursor);
                let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
                let i = at.index(bytes.len());
                bytes[i] ^= flip;
                let tampered = URL_SAFE_NO_PAD.encode(&bytes);
                let refused = tokens().decode::<Cursor>("users", "q", &tampered);
                prop_assert!(refused.is_err());
            }

            #[test]
            fn a_token_is_refused_for_another_scope_query_or_secret(
                cursor in (any::<i64>(), any::<i64>(), ".{0,32}"),
                other in "[a-z]{1,8}",
            ) {
                let token = tokens().encode("users", "q", &cursor);
                let (scope, query) = (format!("{other}!"), format!("q{other}"));
                let other_scope = tokens().decode::<Cursor>(&scope, "q", &token);
                let other_query = tokens().decode::<Cursor>("users", &query, &token);
                let elsewhere = PageTokens::new(&SecretString::from(other.repeat(8)));
                let other_secret = elsewhere.decode::<Cursor>("users", "q", &token);
                prop_assert!(other_scope.is_err());
                prop_assert!(other_query.is_err());
                prop_assert!(other_secret.is_err());
            }

            #[test]
            fn any_string_as_a_token_is_an_error_never_a_panic(token in ".{0,200}") {
                prop_assert!(tokens().decode::<Cursor>("users", "q", &token).is_err());
            }
        }
    }
}
