//! Who makes a write, for the audit log.
//!
//! Every write transaction names its [`Actor`] (see
//! [`WriteTx`](crate::domain::write::WriteTx)); triggers on the
//! audited tables record each changed row with it, in that transaction.

use std::sync::Arc;

/// The caller (token name) and request id behind a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    caller: Arc<str>,
    request_id: Option<Arc<str>>,
}

impl Actor {
    pub fn new(caller: impl Into<Arc<str>>, request_id: Option<Arc<str>>) -> Self {
        Self {
            caller: caller.into(),
            request_id,
        }
    }

    /// A write made by the service itself (such as `datagate seed`), not on
    /// behalf of a caller.
    pub fn system(task: &str) -> Self {
        Self::new(format!("datagate:{task}"), None)
    }

    pub fn caller(&self) -> &str {
        &self.caller
    }

    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

/// The request id of the current call, put in the request's extensions by
/// the outermost middleware; the api reads it for the [`Actor`].
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);
