//! A TCP proxy in front of the test Redis that a test controls: it counts
//! what reaches Redis and can freeze traffic (as a stopped Redis would:
//! bytes are held, not lost). So a test can tell a call that tried Redis
//! from one the open breaker, or its deadline, kept away.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use datagate::config::Settings;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

/// A proxy to the test Redis; its tasks end when it is dropped.
pub struct RedisProxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    /// Bytes the clients sent, counted as they arrive (frozen or not).
    received: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl RedisProxy {
    pub async fn start() -> Self {
        let url = std::env::var("REDIS_URL").expect("REDIS_URL is set (`make test` does)");
        let upstream = url
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, _) = watch::channel(false);
        let received = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (frozen_tx, counter, token) = (frozen.clone(), received.clone(), stop.clone());
        tokio::spawn(token.clone().run_until_cancelled_owned(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let up = pipe(
                    token.clone(),
                    client_read,
                    server_write,
                    frozen_tx.subscribe(),
                    Some(counter.clone()),
                );
                let down = pipe(
                    token.clone(),
                    server_read,
                    client_write,
                    frozen_tx.subscribe(),
                    None,
                );
                tokio::spawn(token.clone().run_until_cancelled_owned(up));
                tokio::spawn(token.clone().run_until_cancelled_owned(down));
            }
        }));
        Self {
            addr,
            frozen,
            received,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Settings for a `Cache` of a test's own behind this proxy: every
    /// Redis timeout `timeouts`, and the breaker given.
    pub fn cache_settings(
        &self,
        timeouts: Duration,
        breaker_failures: u32,
        breaker_open_for: Duration,
    ) -> Settings {
        let mut settings =
            Settings::load_with_overrides(None, &[("database.url", "postgres://unused/unused")])
                .unwrap();
        let redis = &mut settings.redis;
        redis.url = self.url().into();
        redis.key_prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
        redis.command_timeout = timeouts;
        redis.wait_timeout = timeouts;
        redis.create_timeout = timeouts;
        redis.recycle_timeout = timeouts;
        redis.breaker_failures = breaker_failures;
        redis.breaker_open_for = breaker_open_for;
        // Every timeout counts, however late this busy test process notices it.
        redis.breaker_ignore_late_by = Duration::ZERO;
        settings
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies `from` to `to`, counting what it reads, holding it while frozen.
async fn pipe(
    stop: CancellationToken,
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: impl AsyncWrite + Unpin,
    mut frozen: watch::Receiver<bool>,
    counter: Option<Arc<AtomicU64>>,
) {
    let (chunks, mut held) = mpsc::unbounded_channel::<Vec<u8>>();
    // Reading goes on while frozen, so every byte is counted when it arrives.
    let reader = tokio::spawn(stop.run_until_cancelled_owned(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if let Some(counter) = &counter {
                counter.fetch_add(n as u64, Ordering::SeqCst);
            }
            if chunks.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    }));
    while let Some(chunk) = held.recv().await {
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&chunk).await.is_err() {
            break;
        }
    }
    reader.abort();
}
