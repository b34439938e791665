//! Idempotency keys: the `request_id` a caller sends so that a retried create
//! returns the first call's response instead of creating twice.

text_newtype! {
    /// An idempotency key: 1 to 128 visible ASCII characters.
    RequestKey
}

impl RequestKey {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 128 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be 1 to 128 visible ASCII characters".into());
        }
        Ok(Self(raw.to_owned()))
    }
}
