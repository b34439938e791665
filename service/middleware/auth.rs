//! Caller identity: the bearer token of every call is checked, the caller is
//! recorded in the call's span and attached to the request (the handlers
//! authorize by its roles). A token shaped like a JWT (three dot-separated
//! segments) goes to the [`JwtVerifier`] when JWT is configured; any other
//! to the configured [`TokenStore`]. A call without a valid token is
//! answered UNAUTHENTICATED here, never reaching a handler. Health and
//! reflection are open.
//!
//! Checking is synchronous (a map lookup, or a signature with a key at
//! hand); only a JWT naming a key not in the set waits, for the verifier to
//! fetch the set again, and only that call clones the rest of the stack
//! into its future.

use http::{HeaderMap, Request};
use tonic::body::Body;
use tracing::Span;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{
    auth::{
        Caller, TokenStore,
        jwt::{self, JwtVerifier, Verdict},
    },
    error::{Detail, Error, reason},
};

/// Authenticates every call by its bearer token.
#[derive(Clone)]
pub struct Auth {
    tokens: TokenStore,
    /// `None`: JWT is not configured, every token is a static one.
    jwt: Option<JwtVerifier>,
}

/// How a call's token was judged without waiting.
enum Checked {
    Done(Result<Caller, Error>),
    /// A JWT naming an unknown key: judged after a key set fetch.
    AfterRefresh(JwtVerifier, String),
}

impl Auth {
    pub fn new(tokens: TokenStore, jwt: Option<JwtVerifier>) -> Self {
        Self { tokens, jwt }
    }

    fn check(&self, headers: &HeaderMap) -> Checked {
        let token = match bearer(headers) {
            Ok(token) => token,
            Err(error) => return Checked::Done(Err(error)),
        };
        if let Some(verifier) = &self.jwt
            && jwt::is_jwt_shaped(token)
        {
            return match verifier.verify(token) {
                Verdict::Admit(caller) => Checked::Done(Ok(caller)),
                Verdict::Refuse(error) => Checked::Done(Err(error)),
                Verdict::UnknownKey(_) => Checked::AfterRefresh(verifier.clone(), token.to_owned()),
            };
        }
        Checked::Done(self.tokens.authenticate(token).ok_or_else(|| {
            Error::Unauthenticated(Detail::new(
                reason::INVALID_CREDENTIALS,
                "unknown bearer token: check the token configured for this caller",
            ))
        }))
    }
}

/// The bearer token of the `authorization` metadata.
fn bearer(headers: &HeaderMap) -> Result<&str, Error> {
    headers
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
        })
}

/// The request on its way in, as `caller` (recorded in the call's `span`).
fn admit(mut request: Request<Body>, caller: Caller, span: &Span) -> Request<Body> {
    span.record("caller", caller.name());
    request.extensions_mut().insert(caller);
    request
}

impl Middleware for Auth {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        match self.check(request.headers()) {
            Checked::Done(Ok(caller)) => {
                Box::pin(inner.call(admit(request, caller, &Span::current())))
            }
            Checked::Done(Err(error)) => Box::pin(std::future::ready(Ok(status_response(error)))),
            Checked::AfterRefresh(verifier, token) => {
                // The ready service goes into the future; a clone stays.
                let clone = inner.clone();
                let mut ready = std::mem::replace(inner, clone);
                let span = Span::current();
                Box::pin(async move {
                    match verifier.verify_refreshing(&token).await {
                        Ok(caller) => ready.call(admit(request, caller, &span)).await,
                        Err(error) => Ok(status_response(error)),
                    }
                })
            }
        }
    }
}
