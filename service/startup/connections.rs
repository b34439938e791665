//! What one connection may hold of an instance. Without these, one
//! connection carried 1,000 concurrent streams and 3,000 connections that
//! sent only the HTTP/2 preface were held forever (~13 KiB each). The HTTP/2
//! limits (streams, header list, keepalive PINGs, reset floods) are tonic
//! settings (`http2_limits` in `startup`); this module owns what tonic
//! cannot do over `serve_with_incoming`:
//!
//! - the connection limit: [`Connections::admit`] closes a connection past
//!   `server.max_connections` at once, counts it
//!   (`grpc_connections_refused_total`) and logs at most one line per
//!   [`REFUSAL_LOG_EVERY`]; it never waits, so accepting goes on at full
//!   speed and a flood costs nothing but the accept;
//! - socket options: `TCP_NODELAY` (otherwise Nagle's algorithm holds every
//!   response larger than a segment until the client's delayed ACK, ~40 ms a
//!   call) and TCP keepalive (tonic ignores its own over an incoming stream);
//! - the idle timeout (gRPC's MaxConnectionIdle): a [`Connection`] with no
//!   call in flight for `server.idle_timeout` is closed
//!   (`grpc_connections_idle_closed_total`), including one that never starts
//!   a call.
//!
//! # The idle timeout
//!
//! It lives in the IO type, under HTTP/2 and under the TLS an acceptor may
//! wrap around it (`TlsStream<Connection>`), so it closes a connection
//! whatever stage the peer stalls in: before the preface, after it, or
//! between calls. The connection's reads and writes poll a timer; when it
//! fires with no call in flight and none ended within the timeout, the next
//! read or write fails and hyper drops the connection. Calls are counted by
//! [`CallsInFlight`], outermost in the tower stack: tonic puts the
//! connection's [`ConnectionInfo`] in each request's extensions (wrapped in
//! `TlsConnectInfo` under TLS; [`ConnectionInfo::of`] finds it either way),
//! and a call is in flight from its request until its response body ends or
//! is dropped, so streams (a health `Watch`) keep their connection.
//!
//! The close is not a GOAWAY (an IO type cannot send one): nothing is in
//! flight, so nothing is lost; a call the client sends in the very instant
//! the timer fires, before it reaches the stack, fails UNAVAILABLE before any
//! work was done and may be retried. HTTP/2 PINGs are not calls: they keep a
//! live connection's peer known, not the connection open.

use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Extensions, Request};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_stream::{Stream, StreamExt as _, wrappers::TcpListenerStream};
use tonic::{
    body::Body,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};

use crate::{
    config::ServerSettings,
    error::reason,
    middleware::{CallFuture, HeldBody, HeldUntilEnd, Inner, Middleware},
};

/// The longest run of refused connections logged as one line.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);

/// What [`Connections`] applies to each accepted connection. The default
/// applies none (but `TCP_NODELAY`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub tcp_keepalive: Option<Duration>,
}

impl Limits {
    pub fn from_settings(server: &ServerSettings) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Self {
            max_connections: Some(server.max_connections),
            idle_timeout: nonzero(server.idle_timeout),
            tcp_keepalive: nonzero(server.tcp_keepalive),
        }
    }
}

/// The accepted connections of `listener`, each admitted by a new
/// [`Connections`]: refused ones are closed and left out.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl Stream<Item = io::Result<Connection>> {
    let connections = Connections::new(limits);
    TcpListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Ok(stream) => connections.admit(stream).map(Ok),
        Err(e) => Some(Err(e)),
    })
}

/// The open connections of one server (a cheap handle).
#[derive(Clone)]
pub struct Connections(Arc<Shared>);

struct Shared {
    limits: Limits,
    open: AtomicUsize,
    refusals: RefusalLog,
}

impl Connections {
    pub fn new(limits: Limits) -> Self {
        Self(Arc::new(Shared {
            limits,
            open: AtomicUsize::new(0),
            refusals: RefusalLog::new(),
        }))
    }

    /// `stream` as a [`Connection`], or `None` when the limit is reached:
    /// then `stream` is closed here.
    pub fn admit(&self, stream: TcpStream) -> Option<Connection> {
        let Some(slot) = Slot::take(&self.0) else {
            drop(stream);
            metrics::counter!("grpc_connections_refused_total").increment(1);
            if let Some(refused) = self.0.refusals.note(std::time::Instant::now()) {
                tracing::warn!(
                    event = reason::CONNECTION_LIMIT_REACHED,
                    max_connections = self.0.limits.max_connections,
                    refused,
                    "refused new connections: server.max_connections are open"
                );
            }
            return None;
        };
        configure(&stream, &self.0.limits);
        let info = ConnectionInfo {
            tcp: stream.connect_info(),
            activity: Arc::new(Activity::new()),
        };
        let idle = self.0.limits.idle_timeout.map(IdleTimer::new);
        Some(Connection {
            stream,
            info,
            idle,
            idle_closed: false,
            _slot: slot,
        })
    }
}

fn configure(stream: &TcpStream, limits: &Limits) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "could not set TCP_NODELAY");
    }
    if let Some(idle) = limits.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new().with_time(idle);
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            tracing::warn!(error = %e, "could not set TCP keepalive");
        }
    }
}

/// One place under the connection limit, given back on drop.
struct Slot(Arc<Shared>);

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.limits.max_connections.unwrap_or(usize::MAX);
        shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        metrics::gauge!("grpc_connections_open").increment(1.0);
        Some(Self(shared.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("grpc_connections_open").decrement(1.0);
    }
}

/// Refusals come by the thousand in a flood: one line per
/// [`REFUSAL_LOG_EVERY`] at most, with how many it stands for.
struct RefusalLog {
    start: std::time::Instant,
    /// Milliseconds since `start` of the last line, or `NEVER`.
    last_logged_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl RefusalLog {
    const NEVER: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            last_logged_ms: AtomicU64::new(Self::NEVER),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Notes one refusal at `now`; `Some(refusals)` when a line is due,
    /// with the refusals since the last one.
    fn note(&self, now: std::time::Instant) -> Option<u64> {
        self.unlogged.fetch_add(1, Ordering::AcqRel);
        let now_ms = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(Self::NEVER - 1);
        let last = self.last_logged_ms.load(Ordering::Acquire);
        let due = last == Self::NEVER
            || now_ms.saturating_sub(last) >= REFUSAL_LOG_EVERY.as_millis() as u64;
        // One of the accepts that find it due logs.
        (due && self
            .last_logged_ms
            .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
            .is_ok())
        .then(|| self.unlogged.swap(0, Ordering::AcqRel))
    }
}

/// The calls in flight on one connection, and when one last started or
/// ended.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_active.lock().expect("never poisoned") = Instant::now();
    }

    /// When the connection turns idle for `timeout`: `None` while a call is
    /// in flight.
    fn idle_at(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.last_active.lock().expect("never poisoned") + timeout)
    }
}

/// A call in flight on its connection, until dropped.
struct CallGuard(Arc<Activity>);

impl CallGuard {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(activity.clone())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // Touched first: a timer that sees no call in flight sees this end.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What tonic puts in each request's extensions for a [`Connection`]: its
/// addresses and its calls in flight. Under TLS it is inside
/// `TlsConnectInfo<ConnectionInfo>` (with the peer certificates), so
/// tonic's `Request::remote_addr` and `peer_certs`, which look for
/// `TcpConnectInfo`, find nothing: use [`ConnectionInfo::of`] and
/// `TlsConnectInfo::peer_certs`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    activity: Arc<Activity>,
}

impl ConnectionInfo {
    /// The connection of a request, with or without TLS around it.
    pub fn of(extensions: &Extensions) -> Option<&Self> {
        extensions.get::<Self>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<Self>>()
                .map(TlsConnectInfo::get_ref)
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }
}

impl super::tls::RemoteAddr for ConnectionInfo {
    fn remote_addr(&self) -> Option<SocketAddr> {
        ConnectionInfo::remote_addr(self)
    }
}

/// The client certificates the TLS handshake of a call's connection
/// verified, leaf first (for `middleware::auth`, which cannot name this
/// module's types).
pub fn peer_certificates(
    extensions: &Extensions,
) -> Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
    extensions
        .get::<TlsConnectInfo<ConnectionInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
}

/// The timer of a connection's idle timeout.
struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Ready once the connection has been idle for the timeout; until then
    /// the timer is re-armed for the next moment it could be.
    fn poll_idle(&mut self, activity: &Activity, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.sleep.as_mut().poll(cx));
            let now = Instant::now();
            match activity.idle_at(self.timeout) {
                Some(at) if at <= now => return Poll::Ready(()),
                Some(at) => self.sleep.as_mut().reset(at),
                // A call's end touches `last_active`, so looking again one
                // timeout from now is never late by more than the timeout.
                None => self.sleep.as_mut().reset(now + self.timeout),
            }
        }
    }
}

/// An admitted connection: the TCP stream, its place under the connection
/// limit (given back when hyper drops it) and its idle timer.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    idle: Option<IdleTimer>,
    idle_closed: bool,
    _slot: Slot,
}

impl Connection {
    /// Whether the idle timeout has closed the connection; polled whenever
    /// the stream would wait, so it fires whether hyper waits to read or to
    /// write.
    fn closed_when_idle(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.idle_closed
            && let Some(idle) = &mut self.idle
            && idle.poll_idle(&self.info.activity, cx).is_ready()
        {
            self.idle_closed = true;
            metrics::counter!("grpc_connections_idle_closed_total").increment(1);
            tracing::debug!(remote_addr = ?self.info.remote_addr(), "closed an idle connection");
        }
        self.idle_closed
    }

    fn idle_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "connection closed: no call for server.idle_timeout",
        )
    }

    /// `polled` unless it waits and the connection is idle-closed.
    /// Polls the stream with `io` unless the connection was closed as idle,
    /// then [`unless_idle`](Self::unless_idle).
    fn poll_open<T>(
        &mut self,
        cx: &mut Context<'_>,
        io: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.idle_closed {
            return Poll::Ready(Err(Self::idle_error()));
        }
        let polled = io(Pin::new(&mut self.stream), cx);
        self.unless_idle(cx, polled)
    }

    fn unless_idle<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending if self.closed_when_idle(cx) => Poll::Ready(Err(Self::idle_error())),
            polled => polled,
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_open(cx, |stream, cx| stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_open(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_open(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.unless_idle(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Marks each call in flight on its [`Connection`], from its request until
/// its response body ends or is dropped: outermost in the stack, for every
/// call, health and reflection included (a health `Watch` is a call).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallsInFlight;

impl Middleware for CallsInFlight {
    const SKIPS_INFRASTRUCTURE: bool = false;

    fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        let Some(guard) =
            ConnectionInfo::of(request.extensions()).map(|info| CallGuard::new(&info.activity))
        else {
            return Box::pin(inner.call(request));
        };
        let response = inner.call(request);
        Box::pin(async move { Ok(HeldBody::wrap(response.await?, guard)) })
    }
}

/// A call is in flight until its response body ends or is dropped.
impl HeldUntilEnd for CallGuard {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_per_period_with_their_count() {
        let log = RefusalLog::new();
        let t0 = log.start;
        assert_eq!(log.note(t0), Some(1), "the first refusal is logged");
        assert_eq!(log.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(4)), None);
        assert_eq!(
            log.note(t0 + REFUSAL_LOG_EVERY),
            Some(3),
            "the next line counts the refusals it stands for"
        );
        assert_eq!(log.note(t0 + REFUSAL_LOG_EVERY), None);
    }

    #[test]
    fn a_connection_is_idle_only_without_calls_in_flight() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_secs(60);
        assert!(activity.idle_at(timeout).is_some());
        let call = CallGuard::new(&activity);
        let other = CallGuard::new(&activity);
        assert_eq!(activity.idle_at(timeout), None);
        drop(call);
        assert_eq!(
            activity.idle_at(timeout),
            None,
            "one call is still in flight"
        );
        drop(other);
        assert!(activity.idle_at(timeout).is_some());
    }

    mod under_tls {
        use bytes::Bytes;
        use h2::client::SendRequest;
        use tokio_rustls::{
            TlsAcceptor, TlsConnector,
            rustls::{self, pki_types::PrivatePkcs8KeyDer},
        };
        use tonic::transport::Server;

        use super::*;

        const BOUND: Duration = Duration::from_secs(10);

        fn provider() -> Arc<rustls::crypto::CryptoProvider> {
            Arc::new(rustls::crypto::ring::default_provider())
        }

        /// A health service served over TLS around [`Connection`]s with a
        /// short idle timeout, and a connector that trusts it.
        async fn tls_server() -> (SocketAddr, TlsConnector) {
            let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let cert = key.cert.der().clone();
            let server = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.clone()],
                    PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()).into(),
                )
                .unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();

            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let limits = Limits {
                idle_timeout: Some(Duration::from_millis(200)),
                ..Limits::default()
            };
            let acceptor = TlsAcceptor::from(Arc::new(server));
            let tls = incoming(listener, limits).then(move |connection| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(connection?).await }
            });
            let (_reporter, health) = tonic_health::server::health_reporter();
            tokio::spawn(
                Server::builder()
                    .layer(CallsInFlight.into_layer())
                    .add_service(health)
                    .serve_with_incoming(tls),
            );
            (addr, TlsConnector::from(Arc::new(client)))
        }

        /// An HTTP/2 connection over TLS, and the task that ends when the
        /// server closes it.
        async fn connect(
            addr: SocketAddr,
            connector: &TlsConnector,
        ) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (client, connection) = h2::client::handshake(tls).await.unwrap();
            (client, tokio::spawn(async { drop(connection.await) }))
        }

        /// Starts a health call and waits for its first message.
        async fn call(client: &SendRequest<Bytes>, method: &str) -> h2::RecvStream {
            let request =
                http::Request::post(format!("https://localhost/grpc.health.v1.Health/{method}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap();
            let mut client = client.clone().ready().await.unwrap();
            let (response, mut send) = client.send_request(request, false).unwrap();
            send.send_data(Bytes::from_static(&[0; 5]), true).unwrap();
            let mut body = tokio::time::timeout(BOUND, response)
                .await
                .unwrap()
                .unwrap()
                .into_body();
            let first = tokio::time::timeout(BOUND, body.data()).await.unwrap();
            assert!(first.is_some_and(|data| data.is_ok()), "{method} answers");
            body
        }

        #[tokio::test]
        async fn idle_connections_close_and_calls_keep_theirs_open() {
            let (addr, connector) = tls_server().await;
            let (watching, watching_task) = connect(addr, &connector).await;
            let watch = call(&watching, "Watch").await;
            let (idle, idle_task) = connect(addr, &connector).await;
            drop(call(&idle, "Check").await);

            tokio::time::timeout(BOUND, idle_task)
                .await
                .expect("the idle connection is closed under TLS")
                .unwrap();
            assert!(
                !watching_task.is_finished(),
                "the call in flight was found under TLS and kept its connection"
            );
            drop(call(&watching, "Check").await);
            drop(watch);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_counts_from_the_last_call() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_secs(60);
        let mut timer = IdleTimer::new(timeout);
        let idle = |timer: &mut IdleTimer| {
            timer
                .poll_idle(
                    &activity,
                    &mut Context::from_waker(std::task::Waker::noop()),
                )
                .is_ready()
        };

        let call = CallGuard::new(&activity);
        tokio::time::advance(timeout * 2).await;
        assert!(!idle(&mut timer), "a call in flight keeps it open");
        drop(call);
        tokio::time::advance(timeout / 2).await;
        assert!(!idle(&mut timer), "half the timeout after the call ended");
        tokio::time::advance(timeout / 2).await;
        assert!(idle(&mut timer), "the timeout after the call ended");
    }
}
