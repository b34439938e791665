//! The tower stack in front of every gRPC service, outermost first:
//!
//! 1. [`Rpc`] (`rpc.rs`): the request id (`x-request-id` accepted or
//!    generated, returned), one tracing span per call (a child of the
//!    caller's W3C trace context), the call's statement log, and when the
//!    call ends, its metrics and one log line with the final status code. It
//!    is outermost so that rejected calls are counted and logged too.
//! 2. [`Auth`] (`auth.rs`): the caller's identity from the bearer token,
//!    recorded in the span and attached to the request.
//! 3. [`Quotas`] (`quota.rs`): each caller's requests per second;
//!    RESOURCE_EXHAUSTED `QUOTA_EXCEEDED` with a RetryInfo past it, before
//!    any other work.
//! 4. [`Deadlines`] (`deadline.rs`): the shorter of the caller's
//!    `grpc-timeout` and the server's bound, made the call's current
//!    [`Deadline`](crate::model::deadline::Deadline); past it the call is dropped
//!    (which cancels its queries) and answered with DEADLINE_EXCEEDED.
//! 5. [`Admission`] (`admission.rs`): the adaptive concurrency limit, its
//!    short fair queue, and RESOURCE_EXHAUSTED for calls beyond both
//!    (after auth, for the caller; inside the deadline, which bounds the
//!    wait). Health, reflection and AdminService calls are never shed.
//!
//! The stack is composed once, in the server assembly (`startup`). Around
//! it, when the idle timeout is on, `startup::connections::CallsInFlight`
//! counts each call in flight on its connection: it belongs with the
//! connection type it marks, and uses the skeleton below.
//!
//! # One skeleton
//!
//! A middleware here is a small value (its settings) implementing
//! [`Middleware`]: one [`handle`](Middleware::handle) that gets the request
//! and the rest of the stack, and returns the response future: it may change
//! the request before passing it on, answer it itself, or wrap what the rest
//! of the stack returns. The tower plumbing every middleware would otherwise
//! repeat lives once, in [`MiddlewareLayer`] and [`MiddlewareService`]:
//!
//! - `poll_ready` passes through: none of these middleware has capacity of
//!   its own to wait for.
//! - the response future is boxed: each `handle` returns a different future
//!   type, and one allocation per layer per call is nothing beside a
//!   database round trip.
//! - health checks and reflection (`is_infrastructure`) skip a middleware
//!   whose [`SKIPS_INFRASTRUCTURE`](Middleware::SKIPS_INFRASTRUCTURE) says
//!   so: probes and tools need no token, and health `Watch` streams stay
//!   open past any deadline.
//!
//! A generic method over the inner service, rather than a boxed `next`
//! closure, keeps the inner future unboxed until the middleware's own box.

mod admission;
mod auth;
mod deadline;
mod quota;
#[cfg(fuzzing)]
pub use deadline::parse_grpc_timeout;
mod rpc;

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

pub use self::{admission::Admission, auth::Auth, deadline::Deadlines, quota::Quotas, rpc::Rpc};
use crate::error::Error;

/// The response future of a call through the stack.
pub type CallFuture<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send + 'static>>;

/// The rest of the stack, as a middleware sees it: a gRPC service whose
/// futures can be boxed, and which can be cloned into a future that calls
/// it only after awaiting something (auth fetching a key set).
pub trait Inner:
    Service<Request<Body>, Response = Response<Body>, Future: Send + 'static, Error: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Future: Send + 'static,
            Error: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// What one layer of the stack does to a call.
pub trait Middleware: Clone {
    /// Whether health checks and reflection bypass this middleware.
    const SKIPS_INFRASTRUCTURE: bool;

    /// Handles one call; `inner` is ready, and is called at most once.
    fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error>;

    /// This middleware as a tower layer, for `ServiceBuilder`.
    fn into_layer(self) -> MiddlewareLayer<Self> {
        MiddlewareLayer(self)
    }
}

/// The tower [`Layer`] of any [`Middleware`].
#[derive(Clone, Debug)]
pub struct MiddlewareLayer<M>(M);

impl<M: Middleware, S> Layer<S> for MiddlewareLayer<M> {
    type Service = MiddlewareService<M, S>;

    fn layer(&self, inner: S) -> Self::Service {
        MiddlewareService {
            middleware: self.0.clone(),
            inner,
        }
    }
}

/// The tower [`Service`] of any [`Middleware`] in front of `S`.
#[derive(Clone, Debug)]
pub struct MiddlewareService<M, S> {
    middleware: M,
    inner: S,
}

impl<M: Middleware, S: Inner> Service<Request<Body>> for MiddlewareService<M, S> {
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = CallFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if M::SKIPS_INFRASTRUCTURE && is_infrastructure(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        self.middleware.handle(request, &mut self.inner)
    }
}

/// What a response body holds until the body ends (or is dropped): a
/// call's record, a connection's count of calls in flight. It sees each
/// frame on the way.
pub trait HeldUntilEnd: Send + Unpin + 'static {
    /// A frame of the body, or its error, before it is passed on.
    fn frame(&mut self, _frame: &Result<Frame<Bytes>, Status>) {}
}

/// A response body that passes `inner` through and drops what it `held`
/// when the body ends or is dropped.
pub struct HeldBody<H> {
    inner: Body,
    held: Option<H>,
}

impl<H: HeldUntilEnd> HeldBody<H> {
    /// `response` with its body holding `held`.
    pub fn wrap(response: Response<Body>, held: H) -> Response<Body> {
        response.map(|inner| {
            Body::new(Self {
                inner,
                held: Some(held),
            })
        })
    }
}

impl<H: HeldUntilEnd> http_body::Body for HeldBody<H> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(frame)) => {
                if let Some(held) = this.held.as_mut() {
                    held.frame(frame);
                }
            }
            Poll::Ready(None) => this.held = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Health checks and reflection: called by probes and tools, not callers.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// A call answered by the middleware itself.
fn status_response(error: Error) -> Response<Body> {
    Status::from(error).into_http()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{ServiceExt as _, service_fn};

    use super::*;

    /// Marks the responses it sees.
    #[derive(Clone)]
    struct Mark<const SKIPS: bool>;

    impl<const SKIPS: bool> Middleware for Mark<SKIPS> {
        const SKIPS_INFRASTRUCTURE: bool = SKIPS;

        fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
            let response = inner.call(request);
            Box::pin(async move {
                let mut response = response.await?;
                response
                    .headers_mut()
                    .insert("x-marked", http::HeaderValue::from_static("1"));
                Ok(response)
            })
        }
    }

    async fn marked<M: Middleware>(middleware: M, path: &str) -> bool {
        let handler = service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let response = middleware
            .into_layer()
            .layer(handler)
            .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        response.headers().contains_key("x-marked")
    }

    #[tokio::test]
    async fn infrastructure_calls_bypass_only_the_middleware_that_skips_them() {
        let health = "/grpc.health.v1.Health/Check";
        let service = "/datagate.v1.UserService/GetUser";
        assert!(!marked(Mark::<true>, health).await);
        assert!(marked(Mark::<true>, service).await);
        assert!(marked(Mark::<false>, health).await);
        assert!(marked(Mark::<false>, service).await);
    }

    #[test]
    fn health_and_reflection_are_infrastructure() {
        assert!(is_infrastructure("/grpc.health.v1.Health/Check"));
        assert!(is_infrastructure("/grpc.health.v1.Health/Watch"));
        assert!(is_infrastructure(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_infrastructure(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_infrastructure("/datagate.v1.UserService/GetUser"));
        assert!(!is_infrastructure("/grpc.health.v1.HealthX/Check"));
    }
}
