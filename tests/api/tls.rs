//! TLS and mTLS on the gRPC port, with certificates made here (rcgen): calls
//! over TLS, identities from client certificates, the handshakes refused
//! (and their log line), certificate rotation without a restart, and the
//! plaintext health port beside the TLS port.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use datagate::{
    config::{ClientAuth, PeerEntry, Settings},
    proto::v1::{
        self as pb, admin_service_client::AdminServiceClient,
        user_service_client::UserServiceClient,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::{
    AlertDescription, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use tokio::{io::AsyncReadExt as _, net::TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    Bearer, TestApp, api_test,
    app::plaintext_channel,
    assert_error,
    observe::{Logs, wait_until},
    unique,
};

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const OPERATOR: &str = "spiffe://cluster.local/ns/ops/sa/operator";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";

// --- Certificates ------------------------------------------------------------

/// A private CA issuing server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate (PEM and DER) and its key (PEM).
struct Issued {
    cert_pem: String,
    der: CertificateDer<'static>,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            key_pem: key.serialize_pem(),
        }
    }

    /// The server's certificate, for `localhost` and 127.0.0.1.
    fn server(&self) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name = common_name("datagate");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A workload's client certificate naming `spiffe_id`.
    fn client(&self, spiffe_id: &str) -> Issued {
        self.issue(client_params(spiffe_id))
    }

    /// The same, valid only during 2020.
    fn expired_client(&self, spiffe_id: &str) -> Issued {
        let mut params = client_params(spiffe_id);
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
        self.issue(params)
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn client_params(spiffe_id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// A directory laid out as Kubernetes mounts a Secret: the files are
/// symlinks through `..data`, which a rotation points at a new directory.
struct SecretMount {
    root: PathBuf,
    generation: usize,
}

impl SecretMount {
    fn new(server: &Issued, client_ca: &Ca) -> Self {
        let root =
            std::env::temp_dir().join(format!("datagate-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).unwrap();
        let mut mount = Self {
            root,
            generation: 0,
        };
        mount.write(server, client_ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), mount.root.join(name))
                .unwrap();
        }
        mount
    }

    /// Writes a new generation and swaps `..data` to it at once.
    fn write(&mut self, server: &Issued, client_ca: &Ca) {
        self.generation += 1;
        let dir = format!("..gen{}", self.generation);
        let path = self.root.join(&dir);
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("tls.crt"), &server.cert_pem).unwrap();
        std::fs::write(path.join("tls.key"), &server.key_pem).unwrap();
        std::fs::write(path.join("ca.crt"), client_ca.pem()).unwrap();
        let next = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&dir, &next).unwrap();
        std::fs::rename(&next, self.root.join("..data")).unwrap();
    }

    fn file(&self, name: &str) -> String {
        self.root.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for SecretMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

// --- The app -----------------------------------------------------------------

/// The app with TLS from `mount`, `client_auth`, the peers `(identity,
/// roles)` and the plaintext health port.
async fn spawn_tls(
    mount: &SecretMount,
    client_auth: ClientAuth,
    peers: &[(&str, &[&str])],
    customize: impl FnOnce(&mut Settings),
) -> TestApp {
    TestApp::spawn_with(|settings| {
        let tls = &mut settings.server.tls;
        tls.enabled = true;
        tls.cert_file = mount.file("tls.crt");
        tls.key_file = mount.file("tls.key");
        tls.client_ca_file = mount.file("ca.crt");
        tls.client_auth = client_auth;
        settings.server.health_port = Some(0);
        settings.auth.peers = peers
            .iter()
            .map(|(identity, roles)| PeerEntry {
                identity: (*identity).into(),
                roles: roles.iter().map(|r| (*r).into()).collect(),
            })
            .collect();
        customize(settings);
    })
    .await
}

/// The app with mTLS required and `CHECKOUT` a writer, serving `ca`'s
/// server certificate from a mount that lives as long as the app's binding.
async fn checkout_app(ca: &Ca) -> (SecretMount, TestApp) {
    let mount = SecretMount::new(&ca.server(), ca);
    let app = spawn_tls(
        &mount,
        ClientAuth::Required,
        &[(CHECKOUT, &["writer"])],
        |_| {},
    )
    .await;
    (mount, app)
}

/// A tonic channel over TLS, trusting `ca`, with a client certificate if
/// given.
async fn tls_channel(
    app: &TestApp,
    ca: &Ca,
    client: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
    }
    Endpoint::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn client_config(ca: &Ca, client: Option<&Issued>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match client {
        Some(client) => builder
            .with_client_auth_cert(
                vec![client.der.clone()],
                PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A raw TLS connection (the client's side of the handshake done) and the
/// client's address.
async fn connect_tls(
    addr: SocketAddr,
    ca: &Ca,
    client: Option<&Issued>,
) -> (std::io::Result<TlsStream<TcpStream>>, SocketAddr) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let connector = TlsConnector::from(client_config(ca, client));
    let name = ServerName::try_from("localhost").unwrap();
    (connector.connect(name, tcp).await, local)
}

/// The leaf certificate a new TLS connection to the app is served.
async fn served_leaf(app: &TestApp, ca: &Ca) -> CertificateDer<'static> {
    let (stream, _) = connect_tls(app.addr, ca, None).await;
    let stream = stream.expect("the handshake succeeds");
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Asserts that the app refuses the handshake of a client presenting
/// `client` with `alert`, and logs one WARN line naming the client's
/// address and `cause`, without certificate material.
async fn assert_refused(
    app: &TestApp,
    ca: &Ca,
    client: Option<&Issued>,
    alert: AlertDescription,
    cause: &str,
) {
    let logs = Logs::capture();
    let (stream, client_addr) = connect_tls(app.addr, ca, client).await;
    // TLS 1.3: the client's handshake ends before the server has checked
    // the client's certificate; the refusal is the next thing it reads.
    let error = match stream {
        Err(error) => error,
        Ok(mut stream) => stream
            .read(&mut [0u8; 1])
            .await
            .expect_err("the server refuses the handshake"),
    };
    let received = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned();
    assert_eq!(
        received,
        Some(rustls::Error::AlertReceived(alert)),
        "{error}"
    );

    let peer = client_addr.to_string();
    let refusals = || {
        logs.text()
            .into_iter()
            .filter(|line| line.contains("TLS handshake refused") && line.contains(&peer))
            .collect::<Vec<_>>()
    };
    wait_until(
        "the refusal is logged",
        Duration::from_secs(10),
        async || !refusals().is_empty(),
    )
    .await;
    let lines = refusals();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["peer"], peer, "{line}");
    let logged_cause = line["cause"].as_str().unwrap();
    assert!(logged_cause.contains(cause), "{line}");
    assert!(
        !lines[0].contains("BEGIN") && !lines[0].contains("MII"),
        "{line}"
    );
}

fn create_user_request(prefix: &str) -> pb::CreateUserRequest {
    let (email, username) = unique(prefix);
    pb::CreateUserRequest {
        email,
        username,
        display_name: "Over TLS".into(),
        password: String::new(),
        status: 0,
    }
}

async fn audit_actor(app: &TestApp, user_id: i64) -> String {
    sqlx::query_scalar(
        "SELECT actor FROM audit_log WHERE table_name = 'users' AND record_id = $1 AND action = 'insert'",
    )
    .bind(user_id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

// --- Tests -------------------------------------------------------------------

#[api_test]
async fn a_tls_client_completes_a_call_authenticated_by_its_token() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(&mount, ClientAuth::None, &[], |_| {}).await;

    let channel = tls_channel(&app, &ca, None).await.unwrap();
    let mut users =
        UserServiceClient::with_interceptor(channel, Bearer(Some(app.token.as_str().into())));
    let request = create_user_request("tls");
    let user = users
        .create_user(request.clone())
        .await
        .unwrap()
        .into_inner();

    assert_eq!(user.email, request.email);
    assert_eq!(audit_actor(&app, user.id).await, "test-admin");
}

#[api_test]
async fn with_mtls_required_a_call_without_token_is_the_certificates_spiffe_identity() {
    let ca = Ca::new("datagate test CA");
    let (_mount, app) = checkout_app(&ca).await;

    let channel = tls_channel(&app, &ca, Some(&ca.client(CHECKOUT)))
        .await
        .unwrap();
    let user = UserServiceClient::new(channel)
        .create_user(create_user_request("mtls"))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(audit_actor(&app, user.id).await, CHECKOUT);
}

#[api_test]
async fn an_authorization_header_that_is_not_a_bearer_token_is_refused_not_the_certificates() {
    // A gateway with a writer's certificate forwards a user's header: the
    // call must not run as the gateway.
    let ca = Ca::new("datagate test CA");
    let (_mount, app) = checkout_app(&ca).await;
    let channel = tls_channel(&app, &ca, Some(&ca.client(CHECKOUT)))
        .await
        .unwrap();

    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   "] {
        let mut request = tonic::Request::new(create_user_request("forwarded"));
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let status = UserServiceClient::new(channel.clone())
            .create_user(request)
            .await
            .unwrap_err();
        assert_error(&status, Code::Unauthenticated, "INVALID_CREDENTIALS");
    }
}

#[api_test]
async fn certificate_identities_have_the_roles_mapped_to_them_and_others_none() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(
        &mount,
        ClientAuth::Required,
        &[(OPERATOR, &["admin"])],
        |_| {},
    )
    .await;

    let operator = tls_channel(&app, &ca, Some(&ca.client(OPERATOR)))
        .await
        .unwrap();
    let stranger = tls_channel(&app, &ca, Some(&ca.client(STRANGER)))
        .await
        .unwrap();
    let as_operator = AdminServiceClient::new(operator)
        .list_partitions(pb::ListPartitionsRequest {})
        .await;
    let as_stranger = AdminServiceClient::new(stranger)
        .list_partitions(pb::ListPartitionsRequest {})
        .await;

    assert!(as_operator.is_ok(), "{as_operator:?}");
    assert_eq!(as_stranger.unwrap_err().code(), Code::PermissionDenied);
}

#[api_test]
async fn a_verified_certificate_naming_no_identity_is_unauthenticated() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(&mount, ClientAuth::Required, &[], |_| {}).await;
    let mut nameless = CertificateParams::default();
    nameless.distinguished_name = DistinguishedName::new();
    nameless.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];

    let channel = tls_channel(&app, &ca, Some(&ca.issue(nameless)))
        .await
        .unwrap();
    let status = UserServiceClient::new(channel)
        .get_user(pb::GetUserRequest {
            id: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_error(
        &status,
        Code::Unauthenticated,
        "CERTIFICATE_IDENTITY_MISSING",
    );
}

#[api_test]
async fn with_optional_mtls_a_caller_without_a_certificate_needs_a_token() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(
        &mount,
        ClientAuth::Optional,
        &[(CHECKOUT, &["writer"])],
        |_| {},
    )
    .await;

    let channel = tls_channel(&app, &ca, None).await.unwrap();
    let without_token = UserServiceClient::new(channel.clone())
        .get_user(pb::GetUserRequest {
            id: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let with_token =
        UserServiceClient::with_interceptor(channel, Bearer(Some(app.token.as_str().into())))
            .create_user(create_user_request("optional"))
            .await
            .unwrap()
            .into_inner();
    // A token wins over a certificate on the same connection.
    let both = tls_channel(&app, &ca, Some(&ca.client(CHECKOUT)))
        .await
        .unwrap();
    let by_token_over_certificate =
        UserServiceClient::with_interceptor(both, Bearer(Some(app.token.as_str().into())))
            .create_user(create_user_request("both"))
            .await
            .unwrap()
            .into_inner();

    assert_error(&without_token, Code::Unauthenticated, "MISSING_CREDENTIALS");
    assert_eq!(audit_actor(&app, with_token.id).await, "test-admin");
    assert_eq!(
        audit_actor(&app, by_token_over_certificate.id).await,
        "test-admin"
    );
}

#[api_test]
async fn with_mtls_required_a_client_without_a_certificate_is_refused_at_the_handshake() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(&mount, ClientAuth::Required, &[], |_| {}).await;

    assert_refused(
        &app,
        &ca,
        None,
        AlertDescription::CertificateRequired,
        "no client certificate",
    )
    .await;
}

#[api_test]
async fn a_client_certificate_from_another_ca_is_refused_at_the_handshake() {
    let ca = Ca::new("datagate test CA");
    let other = Ca::new("someone else's CA");
    let (_mount, app) = checkout_app(&ca).await;

    assert_refused(
        &app,
        &ca,
        Some(&other.client(CHECKOUT)),
        AlertDescription::UnknownCA,
        "not issued by a CA of server.tls.client_ca_file",
    )
    .await;
}

#[api_test]
async fn an_expired_client_certificate_is_refused_at_the_handshake() {
    let ca = Ca::new("datagate test CA");
    let (_mount, app) = checkout_app(&ca).await;

    assert_refused(
        &app,
        &ca,
        Some(&ca.expired_client(CHECKOUT)),
        AlertDescription::CertificateExpired,
        "client certificate expired",
    )
    .await;
}

#[api_test]
async fn a_silent_client_delays_no_other_handshake_and_is_closed_at_the_handshake_timeout() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(&mount, ClientAuth::None, &[], |settings| {
        settings.server.tls.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let logs = Logs::capture();
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();

    // While the silent client holds its connection open, others connect.
    let (other, _) = connect_tls(app.addr, &ca, None).await;
    other.expect("another client's handshake completes");
    let closed = silent.read(&mut [0u8; 1]).await;

    assert!(matches!(closed, Ok(0)), "{closed:?}");
    wait_until(
        "the timeout is logged",
        Duration::from_secs(10),
        async || {
            logs.text().iter().any(|line| {
                line.contains("TLS handshake refused")
                    && line.contains(&silent_addr)
                    && line.contains("no handshake within")
            })
        },
    )
    .await;
}

#[api_test]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let ca = Ca::new("datagate test CA");
    let first = ca.server();
    let mut mount = SecretMount::new(&first, &ca);
    let app = spawn_tls(&mount, ClientAuth::None, &[], |settings| {
        settings.server.tls.reload_interval = Duration::from_millis(50);
    })
    .await;
    assert_eq!(served_leaf(&app, &ca).await, first.der);
    let open = tls_channel(&app, &ca, None).await.unwrap();

    let second = ca.server();
    mount.write(&second, &ca);

    wait_until(
        "a new connection is served the rotated certificate",
        Duration::from_secs(10),
        async || served_leaf(&app, &ca).await == second.der,
    )
    .await;
    // The connection opened before the rotation still serves calls.
    let check = HealthClient::new(open)
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap();
    assert_eq!(check.into_inner().status(), ServingStatus::Serving);
}

#[api_test]
async fn the_health_port_answers_in_plaintext_while_the_grpc_port_requires_tls() {
    let ca = Ca::new("datagate test CA");
    let mount = SecretMount::new(&ca.server(), &ca);
    let app = spawn_tls(&mount, ClientAuth::Required, &[], |_| {}).await;
    let health_addr = app.health_addr.expect("a health port");

    let liveness = HealthClient::new(plaintext_channel(health_addr).await)
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Only health is served there.
    let user_call = UserServiceClient::with_interceptor(
        plaintext_channel(health_addr).await,
        Bearer(Some(app.token.as_str().into())),
    )
    .get_user(pb::GetUserRequest {
        id: 1,
        ..Default::default()
    })
    .await
    .unwrap_err();
    // The gRPC port speaks TLS only.
    let plaintext_to_grpc_port = match Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Err(error) => Err(error.to_string()),
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "liveness".into(),
            })
            .await
            .map_err(|status| status.to_string()),
    };

    assert_eq!(liveness.status(), ServingStatus::Serving);
    assert_eq!(user_call.code(), Code::Unimplemented, "{user_call:?}");
    assert!(
        plaintext_to_grpc_port.is_err(),
        "{plaintext_to_grpc_port:?}"
    );
}
