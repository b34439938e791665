//! Caller identity and authorization: the bearer token of every call is
//! looked up in the configured [`TokenStore`]; the caller is recorded in the
//! call's span and attached to the request, and the [`Policy`] decides
//! whether its roles allow the method. A call without a known token is
//! answered UNAUTHENTICATED here, one whose caller lacks the method's role
//! PERMISSION_DENIED naming that role: neither reaches admission, a
//! handler or a database. Health and reflection are open.

use http::{HeaderMap, Request};
use tonic::body::Body;
use tracing::Span;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{
    auth::{Caller, Policy, TokenStore},
    error::{Detail, Error, reason},
};

/// Authenticates every call by its bearer token.
#[derive(Clone)]
pub struct Auth {
    tokens: TokenStore,
    policy: Policy,
}

impl Auth {
    pub fn new(tokens: TokenStore, policy: Policy) -> Self {
        Self { tokens, policy }
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Error> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated(Detail::new(
                    reason::MISSING_CREDENTIALS,
                    "missing bearer token: send `authorization: Bearer <token>` metadata",
                ))
            })?;
        self.tokens.authenticate(token).ok_or_else(|| {
            Error::Unauthenticated(Detail::new(
                reason::INVALID_CREDENTIALS,
                "unknown bearer token: check the token configured for this caller",
            ))
        })
    }
}

impl Middleware for Auth {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, mut request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        let caller = match self.authenticate(request.headers()) {
            Ok(caller) => caller,
            Err(error) => return Box::pin(std::future::ready(Ok(status_response(error)))),
        };
        Span::current().record("caller", caller.name());
        if let Err(error) = self.policy.authorize(&caller, request.uri().path()) {
            return Box::pin(std::future::ready(Ok(status_response(error))));
        }
        request.extensions_mut().insert(caller);
        Box::pin(inner.call(request))
    }
}
