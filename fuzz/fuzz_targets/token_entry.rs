//! The configuration's token entries (`auth.tokens`, `caller:role+role:sha256-hex`,
//! `TokenEntry::from_str`): any string parses or is refused with a message,
//! never a panic; what parses has a valid caller name.

#![no_main]

use datagate::config::TokenEntry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    if let Ok(entry) = raw.parse::<TokenEntry>() {
        assert!(!entry.caller.is_empty() && entry.caller.len() <= 64);
        assert!(entry.roles.iter().all(|r| !r.is_empty()));
    }
});
