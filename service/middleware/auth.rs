//! Caller identity and authorization: the bearer token of every call is
//! looked up in the configured [`TokenStore`]; a call without one, on a
//! connection whose client certificate the TLS handshake verified (mTLS),
//! is the identity that certificate names ([`PeerStore`]). The caller is
//! recorded in the call's span and attached to the request, and the
//! [`Policy`] decides whether its roles allow the method. A call with
//! neither, or with an unknown token, is answered UNAUTHENTICATED here, one
//! whose caller lacks the method's role PERMISSION_DENIED naming that role:
//! neither reaches admission, a handler or a database. Health and
//! reflection are open.
//!
//! A token wins over a certificate: a caller that holds both chose the
//! token for this call (e.g. a gateway calling on behalf of someone else).

use http::{Extensions, HeaderMap, Request};
use tonic::{
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::Span;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{
    auth::{Caller, PeerStore, Policy, TokenStore},
    error::{Detail, Error, reason},
};

/// Authenticates every call by its bearer token, or its connection's
/// verified client certificate.
#[derive(Clone)]
pub struct Auth {
    tokens: TokenStore,
    peers: PeerStore,
    policy: Policy,
}

impl Auth {
    pub fn new(tokens: TokenStore, policy: Policy) -> Self {
        Self {
            tokens,
            peers: PeerStore::default(),
            policy,
        }
    }

    /// With the roles of client certificate identities.
    pub fn with_peers(mut self, peers: PeerStore) -> Self {
        self.peers = peers;
        self
    }

    fn authenticate(&self, headers: &HeaderMap, extensions: &Extensions) -> Result<Caller, Error> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return self.authenticate_peer(extensions);
        };
        self.tokens.authenticate(token).ok_or_else(|| {
            Error::Unauthenticated(Detail::new(
                reason::INVALID_CREDENTIALS,
                "unknown bearer token: check the token configured for this caller",
            ))
        })
    }

    /// The identity of the connection's client certificate. tonic puts the
    /// certificates the handshake verified (leaf first) in every call's
    /// extensions, keyed by the connection's info type: TLS over TCP here
    /// (`startup::tls`).
    fn authenticate_peer(&self, extensions: &Extensions) -> Result<Caller, Error> {
        let certificates = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .ok_or_else(|| {
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
}

impl Middleware for Auth {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, mut request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        let caller = match self.authenticate(request.headers(), request.extensions()) {
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
