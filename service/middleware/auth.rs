//! Caller identity and authorization. The bearer token of every call is
//! checked: a token shaped like a JWT (three dot-separated segments) goes to
//! the [`JwtVerifier`] when JWT is configured, any other to the configured
//! [`TokenStore`]. A call without a token, on a connection whose client
//! certificate the TLS handshake verified (mTLS), is the identity that
//! certificate names ([`PeerStore`]). The caller is recorded in the call's
//! span and attached to the request, and the [`Policy`] decides whether its
//! roles allow the method. A call with neither, or with a token that does
//! not verify, is answered UNAUTHENTICATED here, one whose caller lacks the
//! method's role PERMISSION_DENIED naming that role: neither reaches the
//! quotas, admission, a handler or a database. Health and reflection are
//! open.
//!
//! A token wins over a certificate: a caller that holds both chose the
//! token for this call (e.g. a gateway calling on behalf of someone else).
//!
//! Checking is synchronous (a map lookup, or a signature with a key at
//! hand); only a JWT naming a key not in the set waits, for the verifier to
//! fetch the set again, and only that call clones the rest of the stack
//! into its future.

use std::sync::Arc;

use http::{Extensions, HeaderMap, Request};
use rustls::pki_types::CertificateDer;
use tonic::body::Body;
use tracing::Span;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{
    auth::{
        Caller, PeerStore, Policy, TokenStore,
        jwt::{self, JwtVerifier, Verdict},
    },
    error::{Detail, Error, reason},
};

/// Authenticates every call by its bearer token or client certificate, and
/// authorizes it by the caller's roles.
#[derive(Clone)]
pub struct Auth {
    tokens: TokenStore,
    /// `None`: JWT is not configured, every token is a static one.
    jwt: Option<JwtVerifier>,
    peers: PeerStore,
    /// The client certificates the TLS handshake verified, leaf first, from
    /// a call's extensions (where tonic puts the connection's info, whose
    /// type the server assembly knows).
    certificates_of: CertificatesOf,
    policy: Policy,
}

/// Finds the verified client certificates in a call's extensions.
pub type CertificatesOf = fn(&Extensions) -> Option<Arc<Vec<CertificateDer<'static>>>>;

/// How a call's credentials were judged without waiting.
enum Checked {
    Done(Result<Caller, Error>),
    /// A JWT naming an unknown key: judged after a key set fetch.
    AfterRefresh(JwtVerifier, String),
}

impl Auth {
    pub fn new(tokens: TokenStore, jwt: Option<JwtVerifier>, policy: Policy) -> Self {
        Self {
            tokens,
            jwt,
            peers: PeerStore::default(),
            certificates_of: |_| None,
            policy,
        }
    }

    /// With the roles of client certificate identities, and where a call's
    /// verified client certificates are.
    pub fn with_peers(mut self, peers: PeerStore, certificates_of: CertificatesOf) -> Self {
        self.peers = peers;
        self.certificates_of = certificates_of;
        self
    }

    fn check(&self, headers: &HeaderMap, extensions: &Extensions) -> Checked {
        let Some(token) = bearer(headers) else {
            // Only a call without the header is the certificate's: one
            // with a header that is not a bearer token (e.g. a user's,
            // forwarded by a gateway over its mTLS connection) must not
            // become the gateway.
            if headers.contains_key(http::header::AUTHORIZATION) {
                return Checked::Done(Err(Error::Unauthenticated(Detail::new(
                    reason::INVALID_CREDENTIALS,
                    "the authorization metadata is not `Bearer <token>`",
                ))));
            }
            return Checked::Done(self.authenticate_peer(extensions));
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

    /// The identity of the connection's client certificate. tonic puts the
    /// certificates the handshake verified (leaf first) in every call's
    /// extensions, keyed by the connection's info type (`startup::tls`).
    fn authenticate_peer(&self, extensions: &Extensions) -> Result<Caller, Error> {
        let certificates = (self.certificates_of)(extensions).ok_or_else(|| {
            Error::Unauthenticated(Detail::new(
                reason::MISSING_CREDENTIALS,
                "missing bearer token: send `authorization: Bearer <token>` metadata",
            ))
        })?;
        certificates
            .first()
            .and_then(|leaf| self.peers.authenticate(leaf))
            .ok_or_else(|| {
                Error::Unauthenticated(Detail::new(
                    reason::CERTIFICATE_IDENTITY_MISSING,
                    "the client certificate names no identity: issue it with a SPIFFE URI SAN or a subject CN",
                ))
            })
    }

    /// The request on its way in as `caller` (recorded in the call's
    /// `span`), or the refusal if the caller may not call its method.
    fn admit(
        &self,
        mut request: Request<Body>,
        caller: Caller,
        span: &Span,
    ) -> Result<Request<Body>, Error> {
        span.record("caller", caller.name());
        self.policy.authorize(&caller, request.uri().path())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The bearer token of the `authorization` metadata, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
}

impl Middleware for Auth {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        match self.check(request.headers(), request.extensions()) {
            Checked::Done(Ok(caller)) => match self.admit(request, caller, &Span::current()) {
                Ok(request) => Box::pin(inner.call(request)),
                Err(error) => Box::pin(std::future::ready(Ok(status_response(error)))),
            },
            Checked::Done(Err(error)) => Box::pin(std::future::ready(Ok(status_response(error)))),
            Checked::AfterRefresh(verifier, token) => {
                // The ready service goes into the future; a clone stays.
                let clone = inner.clone();
                let mut ready = std::mem::replace(inner, clone);
                let span = Span::current();
                let auth = self.clone();
                Box::pin(async move {
                    let admitted = verifier
                        .verify_refreshing(&token)
                        .await
                        .and_then(|caller| auth.admit(request, caller, &span));
                    match admitted {
                        Ok(request) => ready.call(request).await,
                        Err(error) => Ok(status_response(error)),
                    }
                })
            }
        }
    }
}
