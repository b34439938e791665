//! TLS on the gRPC port: the rustls server configuration, reloaded from its
//! files while the service runs, and the acceptor stage between the accepted
//! connections and the server.
//!
//! Not tonic's `ServerTlsConfig`: it is read once, and Kubernetes rotates a
//! mounted Secret in place (it swaps a symlink), so a restart would be the
//! only way to serve a renewed certificate. Instead [`Tls`] holds the
//! current `ServerConfig`; [`Tls::watch`] reads the files every
//! `server.tls.reload_interval` and, when their contents changed, builds a
//! new one. A change that does not build (a half-written rotation, a key
//! that does not match the certificate) keeps the old config and logs an
//! error; the next change is tried again. Each handshake takes the config
//! current when its connection was accepted, so connections already open
//! keep theirs.
//!
//! [`accept`] is generic over the connection below TLS (TCP, or TCP wrapped
//! by another stage): it needs only [`Connected`] whose info names the
//! peer's address ([`RemoteAddr`]). Each handshake runs on its own task
//! under `server.tls.handshake_timeout`, so a slow or silent client delays
//! no one else's. The streams it yields are tokio-rustls `TlsStream`s, for
//! which tonic's `Connected` puts the verified peer certificates in every
//! call's extensions (`TlsConnectInfo`, read by `middleware::auth`).
//!
//! A refused handshake (no client certificate when one is required, one
//! from another CA, an expired one, a client that does not speak TLS) is
//! one WARN line with the cause and the peer's address; the client gets
//! rustls' alert. Certificate and key bytes are never logged.

use std::{
    fmt, io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use rustls::{
    CertificateError, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{PrivateKeyDer, pem::PemObject as _},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::{
    config::{ClientAuth, TlsSettings},
    pem,
};

/// Connections whose handshake finished, waiting for the server to take them.
const HANDSHAKEN_BACKLOG: usize = 64;

/// The current server configuration and what it was built from.
#[derive(Clone)]
pub struct Tls {
    shared: Arc<Shared>,
}

struct Shared {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// The file contents last read, built or not: a reload builds only
    /// when they change, and a bad change is reported once.
    last_read: Mutex<Files>,
}

/// The contents of the configured files.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Tls {
    /// Reads the files and builds the configuration: an error here stops
    /// the start-up, naming the file.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<Self> {
        let files = Files::read(settings)?;
        let config = server_config(&files, settings.client_auth)?;
        Ok(Self {
            shared: Arc::new(Shared {
                settings: settings.clone(),
                current: RwLock::new(config),
                last_read: Mutex::new(files),
            }),
        })
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.shared
            .current
            .read()
            .expect("no panic while holding the TLS config lock")
            .clone()
    }

    /// Reads the files again; `Ok(true)` when they had changed and the new
    /// configuration is now served, `Ok(false)` when nothing changed (or
    /// the change was already refused), `Err` when the change is refused.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let settings = &self.shared.settings;
        let files = Files::read(settings)?;
        let mut last_read = self
            .shared
            .last_read
            .lock()
            .expect("no panic while holding the TLS files lock");
        if *last_read == files {
            return Ok(false);
        }
        let built = server_config(&files, settings.client_auth);
        *last_read = files;
        let config = built?;
        *self
            .shared
            .current
            .write()
            .expect("no panic while holding the TLS config lock") = config;
        Ok(true)
    }

    /// Reloads every `reload_interval` until `stopping` (a background task).
    pub async fn watch(self, stopping: CancellationToken) {
        let every = self.shared.settings.reload_interval;
        if every.is_zero() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.reload() {
                Ok(true) => {
                    tracing::info!("TLS certificate files changed: new connections use them")
                }
                Ok(false) => {}
                Err(error) => tracing::error!(
                    error = format!("{error:#}"),
                    "TLS certificate files changed but cannot be used; still serving the previous ones"
                ),
            }
        }
    }
}

impl Files {
    fn read(settings: &TlsSettings) -> anyhow::Result<Self> {
        let read = |key: &str, path: &str| {
            std::fs::read(Path::new(path))
                .with_context(|| format!("reading server.tls.{key} {path:?}"))
        };
        Ok(Self {
            cert: read("cert_file", &settings.cert_file)?,
            key: read("key_file", &settings.key_file)?,
            client_ca: match settings.client_auth {
                ClientAuth::None => None,
                ClientAuth::Optional | ClientAuth::Required => {
                    Some(read("client_ca_file", &settings.client_ca_file)?)
                }
            },
        })
    }
}

/// TLS 1.2 and 1.3, ALPN h2, ring; client certificates verified against
/// the client CAs when `client_auth` asks for them.
fn server_config(files: &Files, client_auth: ClientAuth) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = pem::certificates(&files.cert).context("server.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|e| anyhow!("server.tls.key_file: no private key in PEM form ({e})"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?;
    let builder = match (&files.client_ca, client_auth) {
        (Some(bundle), ClientAuth::Optional | ClientAuth::Required) => {
            builder.with_client_cert_verifier(client_verifier(bundle, client_auth, provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("server.tls.cert_file and key_file do not make a usable certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    bundle: &[u8],
    client_auth: ClientAuth,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let roots = pem::roots(bundle).context("server.tls.client_ca_file")?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if client_auth == ClientAuth::Optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .context("server.tls.client_ca_file: cannot verify client certificates")
}

/// The peer address a connection's info names, for the refusal log.
pub trait RemoteAddr {
    fn remote_addr(&self) -> Option<SocketAddr>;
}

impl RemoteAddr for TcpConnectInfo {
    fn remote_addr(&self) -> Option<SocketAddr> {
        TcpConnectInfo::remote_addr(self)
    }
}

/// The TLS connections made of `connections`: each handshake on its own
/// task, with the configuration current at its accept. Accept errors pass
/// through (the server skips them); refused handshakes are logged and
/// dropped. Dropping the stream (the server stopped) ends every handshake.
pub fn accept<IO, S>(connections: S, tls: Tls, handshake_timeout: Duration) -> Handshaken<IO>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: RemoteAddr,
    S: Stream<Item = io::Result<IO>> + Send + 'static,
{
    let (done, handshaken) = mpsc::channel(HANDSHAKEN_BACKLOG);
    let task = tokio::spawn(async move {
        let mut handshakes = JoinSet::new();
        tokio::pin!(connections);
        loop {
            tokio::select! {
                () = done.closed() => return,
                next = connections.next() => match next {
                    None => return,
                    Some(Err(error)) => {
                        if done.send(Err(error)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(io)) => {
                        handshakes.spawn(handshake(io, tls.current(), handshake_timeout, done.clone()));
                    }
                },
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            }
        }
    });
    Handshaken {
        handshaken: ReceiverStream::new(handshaken),
        _task: AbortOnDropHandle::new(task),
    }
}

async fn handshake<IO>(
    io: IO,
    config: Arc<ServerConfig>,
    timeout: Duration,
    done: mpsc::Sender<io::Result<TlsStream<IO>>>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: RemoteAddr,
{
    let peer = Peer(io.connect_info().remote_addr());
    match tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(io)).await {
        Ok(Ok(stream)) => {
            // Err: the server has stopped; the connection closes.
            let _ = done.send(Ok(stream)).await;
        }
        Ok(Err(error)) => match refusal(&error) {
            Some(cause) => tracing::warn!(%peer, %cause, "TLS handshake refused"),
            None => tracing::debug!(%peer, %error, "connection closed during the TLS handshake"),
        },
        Err(_) => tracing::warn!(
            %peer,
            cause = format!("no handshake within {timeout:?}"),
            "TLS handshake refused"
        ),
    }
}

/// Why rustls refused a handshake, in words an operator acts on; `None`
/// for I/O errors (the peer went away: a TCP check, a reset).
fn refusal(error: &io::Error) -> Option<String> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::NoCertificatesPresented => {
            "no client certificate (server.tls.client_auth is required)".into()
        }
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => {
                "client certificate not issued by a CA of server.tls.client_ca_file".into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "client certificate expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "client certificate not valid yet".into()
            }
            other => format!("invalid client certificate: {other}"),
        },
        other => other.to_string(),
    })
}

struct Peer(Option<SocketAddr>);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("unknown"),
        }
    }
}

/// The stream [`accept`] returns; it owns the task that accepts.
pub struct Handshaken<IO> {
    handshaken: ReceiverStream<io::Result<TlsStream<IO>>>,
    _task: AbortOnDropHandle<()>,
}

impl<IO> Stream for Handshaken<IO> {
    type Item = io::Result<TlsStream<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.handshaken).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    /// A directory with a server certificate and key, deleted on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "datagate-tls-unit-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let dir = Self(dir);
            dir.issue();
            dir
        }

        /// Writes a new self-signed certificate and its key.
        fn issue(&self) {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            self.write("tls.crt", &cert.pem());
            self.write("tls.key", &key.serialize_pem());
        }

        fn write(&self, name: &str, contents: &str) {
            std::fs::write(self.0.join(name), contents).unwrap();
        }

        fn settings(&self) -> TlsSettings {
            TlsSettings {
                enabled: true,
                cert_file: self.0.join("tls.crt").to_str().unwrap().into(),
                key_file: self.0.join("tls.key").to_str().unwrap().into(),
                client_ca_file: String::new(),
                client_auth: ClientAuth::None,
                handshake_timeout: Duration::from_secs(10),
                reload_interval: Duration::from_secs(30),
            }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_config_speaks_h2_only() {
        let dir = Dir::new();
        let tls = Tls::load(&dir.settings()).unwrap();
        assert_eq!(tls.current().alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn unchanged_files_keep_the_config_and_changed_ones_replace_it() {
        let dir = Dir::new();
        let tls = Tls::load(&dir.settings()).unwrap();
        let first = tls.current();

        assert!(!tls.reload().unwrap());
        assert!(Arc::ptr_eq(&first, &tls.current()));

        dir.issue();
        assert!(tls.reload().unwrap());
        assert!(!Arc::ptr_eq(&first, &tls.current()));
    }

    #[test]
    fn a_change_that_does_not_build_keeps_the_config_and_is_reported_once() {
        let dir = Dir::new();
        let tls = Tls::load(&dir.settings()).unwrap();
        let served = tls.current();

        // A rotation half done: a new certificate beside the old key.
        let key = std::fs::read_to_string(dir.0.join("tls.key")).unwrap();
        dir.issue();
        dir.write("tls.key", &key);
        let error = format!("{:#}", tls.reload().unwrap_err());
        assert!(
            error.contains("do not make a usable certificate"),
            "{error}"
        );
        assert!(!error.contains("PRIVATE KEY"), "{error}");
        assert!(Arc::ptr_eq(&served, &tls.current()));
        assert!(!tls.reload().unwrap(), "the same change is refused once");

        dir.issue();
        assert!(tls.reload().unwrap());
    }

    #[test]
    fn start_up_fails_naming_a_file_that_is_not_pem() {
        let dir = Dir::new();
        dir.write("tls.crt", "not a certificate");
        let error = format!("{:#}", Tls::load(&dir.settings()).err().unwrap());
        assert!(error.contains("server.tls.cert_file"), "{error}");
    }
}
