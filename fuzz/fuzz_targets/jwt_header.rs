//! JWT header parsing (`auth::jwt::parse_header`, what every JWT-shaped
//! bearer goes through before any key is looked at): any string is a header
//! with an allowed algorithm and a bounded `kid`, or an UNAUTHENTICATED
//! refusal whose message quotes no part of the token, never a panic.

#![no_main]

use datagate::{
    auth::jwt::parse_header,
    config::JwtAlgorithm,
    error::Error,
};
use libfuzzer_sys::fuzz_target;

const ALLOWED: [&[JwtAlgorithm]; 2] = [
    &[JwtAlgorithm::RS256, JwtAlgorithm::ES256, JwtAlgorithm::EdDSA],
    &[JwtAlgorithm::EdDSA],
];

fuzz_target!(|input: (bool, &str)| {
    let (narrow, token) = input;
    let allowed = ALLOWED[usize::from(narrow)];
    match parse_header(token, allowed) {
        Ok(header) => {
            assert!(allowed.contains(&header.algorithm));
            assert!(!header.kid.is_empty() && header.kid.len() <= 256);
        }
        Err(Error::Unauthenticated(detail)) => {
            // The token is never echoed: no segment of it long enough to be
            // a secret appears in the message.
            for segment in token.split('.').filter(|s| s.len() >= 16) {
                assert!(!detail.message.contains(segment), "{}", detail.message);
            }
        }
        Err(other) => panic!("not UNAUTHENTICATED: {other:?}"),
    }
});
