//! The `grpc-timeout` header parser the deadline middleware runs on every
//! call: any header value (any bytes `http` accepts as one) parses to a
//! duration or to nothing, never a panic.

#![no_main]

use datagate::fuzzing::parse_grpc_timeout;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert("grpc-timeout", value);
    if let Some(timeout) = parse_grpc_timeout(&headers) {
        // What the middleware does next: the caller's bound, capped by the server's.
        let _ = timeout.min(std::time::Duration::from_secs(30));
    }
});
