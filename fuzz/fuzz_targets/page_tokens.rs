//! Page tokens (`PageTokens::decode`, every listing's `page_token`) with a
//! fixed secret and scope: any string is refused or decodes to a cursor,
//! never a panic.
//!
//! The first byte picks how the rest is used. Even: the rest is the token,
//! as a caller would send it (almost always refused at the base64 or MAC
//! check). Odd: the rest is a payload this harness signs with the secret, so
//! the fuzzer also reaches what lies behind the MAC: the JSON payload, the
//! scope and query checks, and the cursor types the listings decode.

#![no_main]

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use datagate::model::{
    paging::{PageTokens, keyset_time},
    search::SortKey,
};
use hmac::{Hmac, Mac as _};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use sha2::Sha256;

const SECRET: &str = "fuzz-page-token-secret";
const SCOPE: &str = "users";
const QUERY: &str = "status=;after=;before=";

/// `payload ‖ HMAC-SHA256(payload)`, base64url: a token as `encode` makes them.
fn signed(payload: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(payload);
    let mut bytes = payload.to_vec();
    bytes.extend_from_slice(&mac.finalize().into_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        signed(rest)
    };
    let tokens = PageTokens::new(&SecretString::from(SECRET));
    // The cursors of users, orders and teams: (µs, id), read as a time next.
    if let Ok((micros, _id)) = tokens.decode::<(i64, i64)>(SCOPE, QUERY, &token) {
        let _ = keyset_time(micros);
    }
    // Market analyses: (ms, id).
    let _ = tokens.decode::<(i64, String)>(SCOPE, QUERY, &token);
    // Search: a sort key.
    let _ = tokens.decode::<SortKey>(SCOPE, QUERY, &token);
});
