//! Search text parsing (`SearchText::parse`, SearchProducts' `query`): any
//! string parses or is refused, never a panic; what parses is normalized, so
//! parsing it again changes nothing.

#![no_main]

use datagate::model::search::SearchText;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    if let Ok(text) = SearchText::parse(raw) {
        let again = SearchText::parse(text.as_str()).expect("normalized text parses again");
        assert_eq!(again.as_str(), text.as_str(), "normalizing is idempotent");
    }
});
