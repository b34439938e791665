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
            // The token is never echoed: a JWT's segments are long base64url
            // runs, and no message holds a run longer than an echoed
            // algorithm name (at most 16 letters and digits). (Checking
            // for the input's own segments instead fails on inputs that
            // quote the message itself.)
            let longest = detail
                .message
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .map(str::len)
                .max()
                .unwrap_or(0);
            assert!(longest <= 16, "{}", detail.message);
        }
        Err(other) => panic!("not UNAUTHENTICATED: {other:?}"),
    }
});
