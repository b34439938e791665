//! Connection hardening: the connection limit, the idle timeout and the
//! HTTP/2 stream limit, seen by raw TCP and `h2` clients (a tonic channel
//! would reconnect and hide what the server did to a connection).
//!
//! Waits here are bounds on loopback (a failure, not a measurement): every
//! assertion is about counts and states.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, client::SendRequest};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

use crate::support::{TestApp, api_test};

/// The longest any step here may take on a busy machine.
const BOUND: Duration = Duration::from_secs(10);

/// The client connection preface and an empty SETTINGS frame: what a
/// client sends before its first call.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// An HTTP/2 connection, and the task driving it: the task ends when the
/// connection closes.
struct Http2 {
    client: SendRequest<Bytes>,
    driver: JoinHandle<()>,
}

impl Http2 {
    /// A connection the server admitted (it answered a health check on
    /// it), or `None` when the server closed it.
    async fn admitted(addr: SocketAddr) -> Option<Self> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.ok()?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let connection = Self { client, driver };
        connection.try_check().await.ok()?;
        Some(connection)
    }

    /// Starts a health call (`Check` or `Watch`) for the whole server.
    async fn start(&self, method: &str) -> Result<h2::client::ResponseFuture, h2::Error> {
        let mut client = self.client.clone().ready().await?;
        let request =
            http::Request::post(format!("http://localhost/grpc.health.v1.Health/{method}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
        let (response, mut body) = client.send_request(request, false)?;
        // One uncompressed, empty HealthCheckRequest (service "").
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
        Ok(response)
    }

    /// A health check on this connection, to its end: its grpc-status.
    async fn try_check(&self) -> Result<String, h2::Error> {
        let response = self.start("Check").await?.await?;
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            data?;
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        Ok(trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing")
            .to_owned())
    }

    async fn check(&self) {
        let status = tokio::time::timeout(BOUND, self.try_check())
            .await
            .expect("the check answers")
            .expect("the connection carries the check");
        assert_eq!(status, "0", "the health check is OK");
    }

    /// A health `Watch` whose first update arrived: a call in flight until
    /// the returned stream is dropped.
    async fn watch(&self) -> RecvStream {
        let response = tokio::time::timeout(BOUND, async {
            self.start("Watch").await.unwrap().await.unwrap()
        })
        .await
        .expect("the watch starts");
        let mut body = response.into_body();
        let first = tokio::time::timeout(BOUND, body.data())
            .await
            .expect("the watch sends the current status");
        assert!(first.is_some_and(|data| data.is_ok()));
        body
    }

    /// Waits until the server has closed the connection.
    async fn wait_closed(self) {
        tokio::time::timeout(BOUND, self.driver)
            .await
            .expect("the server closes the connection")
            .unwrap();
    }
}

/// Whether the server closes a raw connection that sent only the preface
/// (reading past the server's own SETTINGS), within the bound.
async fn closed_by_server(addr: SocketAddr) -> bool {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // A refused connection may be closed before the write.
    let _ = tcp.write_all(PREFACE).await;
    let mut buffer = [0; 1024];
    tokio::time::timeout(BOUND, async {
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// `n` admitted connections. Refused attempts are retried (bounded):
/// connections the app's start-up opened may still hold a place for a
/// moment; once `n` = the limit are held here, no other connection holds one.
async fn fill(addr: SocketAddr, n: usize) -> Vec<Http2> {
    let mut admitted = Vec::new();
    for _ in 0..100 {
        if admitted.len() == n {
            return admitted;
        }
        match Http2::admitted(addr).await {
            Some(connection) => admitted.push(connection),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("only {} of {n} connections were admitted", admitted.len());
}

/// The value of an unlabelled metric in the Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} is exported"))
        .trim()
        .parse()
        .unwrap()
}

#[api_test]
async fn connections_past_max_connections_are_closed_while_admitted_ones_answer() {
    let app = TestApp::spawn_with(|s| s.server.max_connections = 8).await;
    let mut admitted = fill(app.addr, 8).await;

    for attempt in 0..4 {
        assert!(
            closed_by_server(app.addr).await,
            "connection {} past the limit is closed",
            attempt + 9
        );
    }
    for connection in &admitted {
        connection.check().await;
    }
    let metrics = app.metrics().await;
    assert!(metric(&metrics, "grpc_connections_refused_total") >= 4.0);
    assert!(metric(&metrics, "grpc_connections_open") >= 8.0);

    // A connection that closes gives its place back.
    let Http2 { client, driver } = admitted.pop().unwrap();
    drop(client);
    driver.await.unwrap();
    fill(app.addr, 1).await[0].check().await;
}

#[api_test]
async fn idle_connections_are_closed_and_connections_with_a_call_in_flight_are_not() {
    let app = TestApp::spawn_with(|s| s.server.idle_timeout = Duration::from_millis(300)).await;
    let watching = Http2::admitted(app.addr).await.unwrap();
    let watch = watching.watch().await;
    let after_a_call = Http2::admitted(app.addr).await.unwrap();

    // Both idle connections close: the one whose call ended, and one that
    // sent only the preface and never a call.
    assert!(
        closed_by_server(app.addr).await,
        "a preface-only connection is closed"
    );
    after_a_call.wait_closed().await;

    // The watching connection, open longer than both, still carries calls.
    assert!(
        !watching.driver.is_finished(),
        "the watching connection is open"
    );
    assert!(!watch.is_end_stream(), "the watch goes on");
    watching.check().await;
    let metrics = app.metrics().await;
    assert!(metric(&metrics, "grpc_connections_idle_closed_total") >= 2.0);

    // Once its call ends, it is idle too.
    drop(watch);
    watching.wait_closed().await;
}

#[api_test]
async fn max_concurrent_streams_is_advertised_and_extra_calls_wait_for_a_stream() {
    let app = TestApp::spawn_with(|s| s.server.max_concurrent_streams = 3).await;
    let connection = Http2::admitted(app.addr).await.unwrap();
    assert_eq!(
        connection.client.current_max_send_streams(),
        3,
        "the server's SETTINGS_MAX_CONCURRENT_STREAMS"
    );

    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(connection.watch().await);
    }
    // A fourth call waits for a stream, and gets one when a watch ends.
    let queued = connection.start("Check").await.unwrap();
    drop(watches.pop());
    let response = tokio::time::timeout(BOUND, queued)
        .await
        .expect("the queued call gets a stream")
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
}
