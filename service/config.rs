//! Typed settings, loaded once at start-up.
//!
//! Layers, later ones winning: the defaults in `config/default.toml` (compiled
//! into the binary, so it runs anywhere), an optional file given with
//! `--config`, then `DATAGATE__SECTION__KEY` environment variables. This is
//! the only module that reads the environment. Secrets are `SecretString`s, so
//! `Debug` never prints them.

use std::{net::SocketAddr, path::Path, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "DATAGATE";

/// Settings that have no usable default and must be provided.
const REQUIRED: &[&str] = &["database.url"];

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub admission: AdmissionSettings,
    pub quotas: QuotaSettings,
    pub metrics: MetricsSettings,
    pub telemetry: TelemetrySettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub mongodb: MongoSettings,
    pub partitions: PartitionSettings,
    pub diagnostics: DiagnosticsSettings,
    pub search_log: SearchLogSettings,
    pub analytics: AnalyticsSettings,
    pub analysis: AnalysisSettings,
    pub auth: AuthSettings,
    pub pagination: PaginationSettings,
    pub idempotency: IdempotencySettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PartitionSettings {
    pub months_ahead: u32,
    pub search_retention_months: u32,
    pub audit_retention_months: u32,
    /// Zero turns the schedule off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

/// AdminService's diagnostics: how often table sizes are sampled (their
/// growth is computed from the samples) and how long samples are kept.
#[derive(Debug, Clone, Deserialize)]
pub struct DiagnosticsSettings {
    /// Zero turns the sampler off.
    #[serde(with = "humantime_serde")]
    pub size_sample_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub size_sample_retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MongoSettings {
    /// Empty turns the MongoDB-backed features off (their RPCs answer
    /// FAILED_PRECONDITION).
    pub url: SecretString,
    /// One database per environment.
    pub database: String,
    pub min_pool_size: u32,
    pub max_pool_size: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub server_selection_timeout: Duration,
    /// Bound on every operation, pool wait included.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// How often the outbox relay looks for changes to apply to MongoDB
    /// (it is also woken right after each commit that adds one).
    #[serde(with = "humantime_serde")]
    pub outbox_interval: Duration,
    /// Measurements per price-history bucket (product × day) before a new
    /// bucket starts.
    pub price_bucket_capacity: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnalysisSettings {
    /// Market-analysis workers per replica (0: this replica runs none).
    pub workers: usize,
    /// How long a claimed analysis is reserved for its worker; the worker
    /// renews it while it runs, and others take the analysis over once it
    /// expires.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often idle workers look for pending analyses.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Identical requests within this period share one analysis.
    #[serde(with = "humantime_serde")]
    pub dedupe_period: Duration,
    /// Runs (takeovers included) before an analysis is failed.
    pub max_attempts: i32,
    /// How long a finished (completed or failed) analysis is kept: MongoDB
    /// deletes it after this (a TTL index on `finished_at`). Whole seconds,
    /// at least one.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdempotencySettings {
    /// How long a create's idempotency key (and its stored response) is
    /// kept: a retry within it replays the first response.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often expired keys are swept; zero turns the sweep off.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Keys deleted per statement (each a short transaction).
    pub sweep_batch: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnalyticsSettings {
    /// How often the sales view is refreshed; zero turns the schedule off
    /// (AdminService.RefreshAnalytics still refreshes it).
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SearchLogSettings {
    /// Searches waiting to be written; when full, new ones are dropped (and
    /// counted), never waited for.
    pub buffer: usize,
    /// The most searches one INSERT writes.
    pub batch_size: usize,
    /// How long a search may wait for its batch to fill.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

/// How the cache reaches Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis server (a primary, or an endpoint that fails over between
    /// primaries): `url` is one URL. Keys carry no hash tags, so a sharding
    /// proxy in front of several servers needs `Cluster` instead.
    #[default]
    Single,
    /// Redis Cluster: `url` is a comma-separated list of seed node URLs.
    Cluster,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    #[serde(default)]
    pub mode: RedisMode,
    /// Empty turns caching off. In cluster mode, comma-separated seed URLs.
    pub url: SecretString,
    pub key_prefix: String,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub create_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub recycle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    pub ttl_jitter: f64,
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// TTL of cached query results (search pages), also jittered.
    #[serde(with = "humantime_serde")]
    pub query_ttl: Duration,
    /// TTL of cached analytics answers, also jittered.
    #[serde(with = "humantime_serde")]
    pub analytics_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_open_for: Duration,
    /// A command timeout noticed this long or more after it was due (this
    /// process was running late, not necessarily Redis) is a miss but not a
    /// breaker failure; zero counts every timeout.
    #[serde(with = "humantime_serde")]
    pub breaker_ignore_late_by: Duration,
    /// The ACL user to log in as (empty: the URL's, or none). Wins over
    /// the URL's, as `password` does.
    pub username: String,
    /// The ACL user's password (empty: the URL's, or none).
    pub password: SecretString,
    /// PEM bundle of the CA that signed the servers' certificates, for
    /// `rediss://` (empty: the system roots); see `cache::tls`.
    pub tls_ca_file: String,
    /// A client certificate and its key (PEM), for servers that ask for one
    /// (`tls-auth-clients`); both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// The largest `max_staleness` a read may ask for; near-cache entries
    /// expire after it (`cache::near`).
    #[serde(with = "humantime_serde")]
    pub near_max_staleness: Duration,
    /// The near cache's memory bound, in bytes of stored values; zero turns
    /// it off (bounded reads are then served as strong ones).
    pub near_max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub max_message_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_readiness_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Connections older than this are closed gracefully (HTTP/2 GOAWAY), so
    /// callers reconnect and spread over new replicas; zero: never.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Connection hardening (`startup::connections`): open connections past
    /// this are closed at once.
    pub max_connections: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: calls at once per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`: a call's metadata, in bytes.
    pub max_header_list_bytes: u32,
    /// A connection with no call in flight for this long is closed; zero:
    /// never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval, and how long an unanswered PING waits before the
    /// connection is closed; zero interval: no pings.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes; zero: none.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// A plaintext port serving only `grpc.health.v1.Health`, for the
    /// kubelet's gRPC probes, which cannot speak TLS; unset: none; zero: any
    /// free port (as for `port`).
    pub health_port: Option<u16>,
    pub tls: TlsSettings,
}

/// TLS on the gRPC port (see `startup::tls`).
#[derive(Debug, Clone, Deserialize)]
pub struct TlsSettings {
    pub enabled: bool,
    /// PEM files: the certificate chain (leaf first) and its private key.
    pub cert_file: String,
    pub key_file: String,
    /// PEM bundle of the CAs that sign client certificates (mTLS).
    pub client_ca_file: String,
    pub client_auth: ClientAuth,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often the files are read again; changed contents are served to
    /// new connections. Zero: never.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

/// Whether callers present a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// None is asked for.
    #[default]
    None,
    /// One is asked for; a caller without one authenticates by token.
    Optional,
    /// The handshake fails without a valid one.
    Required,
}

/// Admission control: the adaptive concurrency limit in front of the
/// handlers and its short queue (see `middleware::admission`).
#[derive(Debug, Clone, Deserialize)]
pub struct AdmissionSettings {
    pub enabled: bool,
    pub min_limit: usize,
    pub initial_limit: usize,
    pub max_limit: usize,
    /// Calls that may wait for a slot; beyond them calls are shed at once.
    pub queue_length: usize,
    /// The longest a call waits for a slot (at most half its deadline).
    #[serde(with = "humantime_serde")]
    pub max_queue_wait: Duration,
    /// The largest fraction of the limit one caller may hold while others
    /// have calls.
    pub caller_share: f64,
    /// The `RetryInfo` delay of a shed call while few are shed; it doubles
    /// up to `max_retry_after` while rejections outnumber half the
    /// admissions, and comes back down when they stop.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

/// Per-caller quotas (see `middleware::quota`): requests per second, zero
/// for unlimited.
#[derive(Debug, Clone, Deserialize)]
pub struct QuotaSettings {
    pub reader: f64,
    pub writer: f64,
    pub admin: f64,
    /// A caller may spend this many seconds of its rate at once.
    #[serde(with = "humantime_serde")]
    pub burst: Duration,
    /// Rates of named callers, overriding their role's.
    #[serde(default)]
    pub callers: std::collections::HashMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_filter: String,
    /// The filter of what is exported as spans (an EnvFilter, like
    /// `log_filter` but separate): the loader spans are DEBUG, below the
    /// usual log level, and still exported.
    pub trace_filter: String,
    pub otlp_endpoint: String,
    pub service_name: String,
    pub trace_sample_ratio: f64,
    /// A statement at least this slow is logged as SLOW_QUERY and counted.
    #[serde(with = "humantime_serde")]
    pub slow_statement_threshold: Duration,
    /// A request running one statement shape more often than this is
    /// reported as N_PLUS_ONE_DETECTED.
    pub n_plus_one_threshold: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: SecretString,
    /// A streaming read replica for lag-tolerant reads (search, analytics,
    /// insights, market analyses); empty sends every read to `url`.
    pub read_url: SecretString,
    pub min_connections: u32,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    pub tokens: Vec<TokenEntry>,
    /// The roles of client certificate identities (mTLS).
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// Signed bearer tokens (JWTs) from one issuer; absent: JWT is off and
    /// only the static `tokens` authenticate (see `auth::jwt`).
    #[serde(default)]
    pub jwt: Option<JwtSettings>,
}

/// The roles of one client certificate identity (a SPIFFE ID or a subject
/// CN): a table `{ identity = "...", roles = ["writer"] }`, or in an
/// environment variable `identity=role+role`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PeerEntryForm")]
pub struct PeerEntry {
    pub identity: String,
    pub roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PeerEntryForm {
    Table {
        identity: String,
        roles: Vec<String>,
    },
    Text(String),
}

impl TryFrom<PeerEntryForm> for PeerEntry {
    type Error = String;

    fn try_from(form: PeerEntryForm) -> Result<Self, Self::Error> {
        let (identity, roles) = match form {
            PeerEntryForm::Table { identity, roles } => (identity, roles),
            PeerEntryForm::Text(text) => {
                // SPIFFE IDs have no `=`; a CN might, so the last one splits.
                let (identity, roles) = text
                    .trim()
                    .rsplit_once('=')
                    .ok_or_else(|| format!("expected `identity=role+role`, got {text:?}"))?;
                let roles = roles
                    .split('+')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect();
                (identity.to_owned(), roles)
            }
        };
        if identity.trim().is_empty() {
            return Err("a peer entry needs an identity".into());
        }
        Ok(Self { identity, roles })
    }
}

/// The JWTs one issuer signs for this service, and where its public keys
/// are (a JWKS: exactly one of `jwks_file` and `jwks_url`).
#[derive(Debug, Clone, Deserialize)]
pub struct JwtSettings {
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must include (this service's name at the issuer).
    pub audience: String,
    #[serde(default)]
    pub jwks_file: Option<std::path::PathBuf>,
    /// `https://` only: the keys decide who may call.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CAs that sign the `jwks_url` server's certificate, instead of
    /// the webpki roots (an issuer with a private CA).
    #[serde(default)]
    pub jwks_ca_file: Option<std::path::PathBuf>,
    /// The signature algorithms accepted; HMAC and `none` never are.
    #[serde(default = "JwtSettings::default_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde", default = "JwtSettings::default_leeway")]
    pub leeway: Duration,
    /// The claim naming the caller.
    #[serde(default = "JwtSettings::default_identity_claim")]
    pub identity_claim: String,
    /// The claim holding the caller's roles (an array of strings; absent:
    /// no roles).
    #[serde(default = "JwtSettings::default_roles_claim")]
    pub roles_claim: String,
    /// How often the key set is fetched again; zero: only on an unknown `kid`.
    #[serde(
        with = "humantime_serde",
        default = "JwtSettings::default_refresh_interval"
    )]
    pub refresh_interval: Duration,
    /// The least time between two fetches caused by tokens with an unknown
    /// `kid` (anyone can send one).
    #[serde(
        with = "humantime_serde",
        default = "JwtSettings::default_min_refresh_interval"
    )]
    pub min_refresh_interval: Duration,
}

/// The JWT signature algorithms datagate can accept (all asymmetric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum JwtAlgorithm {
    RS256,
    ES256,
    EdDSA,
}

impl JwtAlgorithm {
    /// Every algorithm datagate can accept: the default of `jwt.algorithms`.
    pub const ALL: [Self; 3] = [Self::RS256, Self::ES256, Self::EdDSA];
}

impl JwtSettings {
    fn default_algorithms() -> Vec<JwtAlgorithm> {
        JwtAlgorithm::ALL.to_vec()
    }
    fn default_leeway() -> Duration {
        Duration::from_secs(30)
    }
    fn default_identity_claim() -> String {
        "sub".into()
    }
    fn default_roles_claim() -> String {
        "roles".into()
    }
    fn default_refresh_interval() -> Duration {
        Duration::from_secs(300)
    }
    fn default_min_refresh_interval() -> Duration {
        Duration::from_secs(30)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.issuer.trim().is_empty() || self.audience.trim().is_empty() {
            bail!("invalid configuration: auth.jwt.issuer and auth.jwt.audience must not be empty");
        }
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), None) => {}
            (None, Some(url)) if url.starts_with("https://") => {}
            (None, Some(_)) => {
                bail!("invalid configuration: auth.jwt.jwks_url must be an https:// URL")
            }
            _ => bail!(
                "invalid configuration: set exactly one of auth.jwt.jwks_file and auth.jwt.jwks_url"
            ),
        }
        if self.algorithms.is_empty() {
            bail!(
                "invalid configuration: auth.jwt.algorithms must name at least one of RS256, ES256, EdDSA"
            );
        }
        if self.identity_claim.is_empty() || self.roles_claim.is_empty() {
            bail!(
                "invalid configuration: auth.jwt.identity_claim and auth.jwt.roles_claim must not be empty"
            );
        }
        // Anyone can send a token naming an unknown `kid`: each may cause a
        // fetch, so fetches need a floor.
        if self.min_refresh_interval < Duration::from_secs(1) {
            bail!("invalid configuration: auth.jwt.min_refresh_interval must be at least 1s");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaginationSettings {
    pub token_secret: SecretString,
    /// Secrets whose tokens are still accepted (a rotation in progress);
    /// tokens are signed with `token_secret` only.
    #[serde(default)]
    pub previous_token_secrets: Vec<SecretString>,
}

/// One configured bearer token: `caller:role+role:sha256-hex`. Only the hash
/// of the token is configured, never the token itself.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub caller: String,
    pub roles: Vec<String>,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("caller", &self.caller)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl FromStr for TokenEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [caller, roles, hash] = parts[..] else {
            return Err("expected `caller:role+role:sha256-hex`".into());
        };
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !valid_name(caller) {
            return Err(format!("invalid caller name {caller:?}"));
        }
        let roles: Vec<String> = roles
            .split('+')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = roles.iter().find(|r| !valid_name(r)) {
            return Err(format!("invalid role {bad:?} for caller {caller}"));
        }
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(hash, &mut sha256)
            .map_err(|_| format!("the hash of caller {caller} is not 64 hex digits"))?;
        Ok(Self {
            caller: caller.to_owned(),
            roles,
            sha256,
        })
    }
}

/// Deserialized from its `caller:role+role:sha256-hex` form.
impl<'de> Deserialize<'de> for TokenEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Settings {
    /// Loads the settings from the defaults, an optional file and the
    /// environment, and checks them. Errors are one line, naming the setting
    /// and the environment variable that sets it.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_with_overrides(file, &[])
    }

    /// Like [`load`](Self::load), with `(key, value)` overrides on top of
    /// everything else (the test harness points each app at its own database).
    pub fn load_with_overrides(
        file: Option<&Path>,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("auth.tokens")
                .with_list_parse_key("auth.peers")
                .with_list_parse_key("pagination.previous_token_secrets")
                .with_list_parse_key("auth.jwt.algorithms"),
        );
        for (key, value) in overrides {
            builder = builder
                .set_override(*key, *value)
                .map_err(|e| anyhow::anyhow!("invalid override {key}: {e}"))?;
        }
        let raw = builder
            .build()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;

        for key in REQUIRED {
            let present = raw
                .get_string(key)
                .map(|v| !v.trim().is_empty())
                .unwrap_or(false);
            if !present {
                bail!(
                    "missing required setting `{key}`: set {}",
                    env_var_name(key)
                );
            }
        }
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let db = &self.database;
        if db.max_connections == 0 || db.min_connections > db.max_connections {
            bail!(
                "invalid configuration: database.min_connections ({}) must not exceed database.max_connections ({}), which must be positive",
                db.min_connections,
                db.max_connections
            );
        }
        if !(0.0..=1.0).contains(&self.telemetry.trace_sample_ratio) {
            bail!("invalid configuration: telemetry.trace_sample_ratio must be between 0 and 1");
        }
        let partitions = &self.partitions;
        if partitions.months_ahead > 24
            || partitions.search_retention_months == 0
            || partitions.audit_retention_months == 0
        {
            bail!(
                "invalid configuration: partitions.months_ahead must be at most 24 and the retentions at least 1 month"
            );
        }
        let mongo = &self.mongodb;
        if mongo.max_pool_size == 0
            || mongo.price_bucket_capacity < 1
            || mongo.min_pool_size > mongo.max_pool_size
            || mongo.database.is_empty()
            || mongo.database.contains(['/', '\\', '.', ' ', '"', '$'])
        {
            bail!(
                "invalid configuration: mongodb.database must be a plain name and mongodb.min_pool_size must not exceed mongodb.max_pool_size, which must be positive"
            );
        }
        let retention = self.analysis.retention.as_secs();
        if retention == 0 || retention > i32::MAX as u64 {
            bail!(
                "invalid configuration: analysis.retention must be at least 1s and at most {} s",
                i32::MAX
            );
        }
        let log = &self.search_log;
        if log.buffer == 0 || log.batch_size == 0 || log.flush_interval.is_zero() {
            bail!(
                "invalid configuration: search_log.buffer, search_log.batch_size and search_log.flush_interval must be positive"
            );
        }
        let redis = &self.redis;
        if redis.pool_size == 0 || !(0.0..0.5).contains(&redis.ttl_jitter) {
            bail!(
                "invalid configuration: redis.pool_size must be positive and redis.ttl_jitter in [0, 0.5)"
            );
        }
        // The overflow flush deletes `SCAN MATCH <prefix>:*`: a glob character
        // in the prefix would reach other namespaces' keys.
        if redis.key_prefix.is_empty()
            || redis.key_prefix.contains(char::is_whitespace)
            || redis.key_prefix.contains(['*', '?', '[', ']', '\\'])
        {
            bail!(
                "invalid configuration: redis.key_prefix must be a non-empty word without glob characters"
            );
        }
        // A brace in the prefix would become every key's hash tag, putting
        // the whole cache in one cluster slot.
        if redis.mode == RedisMode::Cluster && redis.key_prefix.contains(['{', '}']) {
            bail!(
                "invalid configuration: redis.key_prefix must not contain braces in cluster mode"
            );
        }
        let admission = &self.admission;
        if admission.min_limit == 0
            || admission.min_limit > admission.initial_limit
            || admission.initial_limit > admission.max_limit
            || !(admission.caller_share > 0.0 && admission.caller_share <= 1.0)
        {
            bail!(
                "invalid configuration: admission needs 1 <= min_limit <= initial_limit <= max_limit and caller_share in (0, 1]"
            );
        }
        if self.server.max_message_bytes < 1024 {
            bail!("invalid configuration: server.max_message_bytes must be at least 1024");
        }
        if let Some(jwt) = &self.auth.jwt {
            jwt.validate()?;
        }
        let quotas = &self.quotas;
        let rates = [quotas.reader, quotas.writer, quotas.admin]
            .into_iter()
            .chain(quotas.callers.values().copied());
        if rates
            .into_iter()
            .any(|rate| !rate.is_finite() || rate < 0.0)
            || quotas.burst.is_zero()
        {
            bail!(
                "invalid configuration: quota rates must be finite and at least 0 (0: unlimited), and quotas.burst positive"
            );
        }
        let server = &self.server;
        if server.max_connections == 0
            || server.max_concurrent_streams == 0
            || server.max_header_list_bytes < 1024
        {
            bail!(
                "invalid configuration: server.max_connections and server.max_concurrent_streams must be positive and server.max_header_list_bytes at least 1024"
            );
        }
        if !server.http2_keepalive_interval.is_zero() && server.http2_keepalive_timeout.is_zero() {
            bail!(
                "invalid configuration: server.http2_keepalive_timeout must be positive while server.http2_keepalive_interval is on"
            );
        }
        self.server.grpc_addr()?;
        self.server.validate_tls()?;
        self.metrics.addr()?;
        Ok(())
    }
}

impl Settings {
    /// What `serve` needs beyond what every command needs.
    pub fn check_serving(&self) -> anyhow::Result<()> {
        let secret = self.pagination.token_secret.expose_secret();
        if secret.trim().is_empty() {
            bail!(
                "missing required setting `pagination.token_secret`: set {}",
                env_var_name("pagination.token_secret")
            );
        }
        if secret.len() < 32 {
            bail!(
                "invalid configuration: pagination.token_secret must be at least 32 bytes ({})",
                env_var_name("pagination.token_secret")
            );
        }
        Ok(())
    }
}

impl ServerSettings {
    pub fn grpc_addr(&self) -> anyhow::Result<SocketAddr> {
        socket_addr(&self.host, self.port).context("invalid configuration: server.host")
    }

    /// The plaintext health port's address, if there is one.
    pub fn health_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.health_port
            .map(|port| socket_addr(&self.host, port).context("invalid configuration: server.host"))
            .transpose()
    }

    fn validate_tls(&self) -> anyhow::Result<()> {
        if self.port != 0 && self.health_port == Some(self.port) {
            bail!("invalid configuration: server.health_port must differ from server.port");
        }
        let tls = &self.tls;
        if !tls.enabled {
            // Required client certificates cannot be silently dropped.
            if tls.client_auth != ClientAuth::None {
                bail!(
                    "invalid configuration: server.tls.client_auth is {:?} but TLS is off: set {}=true",
                    tls.client_auth,
                    env_var_name("server.tls.enabled")
                );
            }
            return Ok(());
        }
        for (key, value) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
            if value.trim().is_empty() {
                bail!(
                    "missing required setting `server.tls.{key}` (TLS is enabled): set {}",
                    env_var_name(&format!("server.tls.{key}"))
                );
            }
        }
        if tls.client_auth != ClientAuth::None && tls.client_ca_file.trim().is_empty() {
            bail!(
                "missing required setting `server.tls.client_ca_file` (server.tls.client_auth is {:?}): set {}",
                tls.client_auth,
                env_var_name("server.tls.client_ca_file")
            );
        }
        if tls.handshake_timeout.is_zero() {
            bail!("invalid configuration: server.tls.handshake_timeout must be positive");
        }
        Ok(())
    }
}

impl MetricsSettings {
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        socket_addr(&self.host, self.port).context("invalid configuration: metrics.host")
    }
}

fn socket_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let ip = host
        .parse::<std::net::IpAddr>()
        .with_context(|| format!("{host:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// `database.url` → `DATAGATE__DATABASE__URL`.
pub fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}__{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_entries_parse_caller_roles_and_hash() {
        let hash = "ab".repeat(32);
        let entry: TokenEntry = format!("orders-api:admin+reader:{hash}").parse().unwrap();
        assert_eq!(entry.caller, "orders-api");
        assert_eq!(entry.roles, vec!["admin", "reader"]);
        assert_eq!(entry.sha256, [0xab; 32]);

        let no_roles: TokenEntry = format!("svc::{hash}").parse().unwrap();
        assert!(no_roles.roles.is_empty());
    }

    #[test]
    fn token_entries_reject_malformed_input() {
        assert!("svc:admin".parse::<TokenEntry>().is_err());
        assert!("svc:admin:zz".parse::<TokenEntry>().is_err());
        assert!(
            format!("bad name:admin:{}", "ab".repeat(32))
                .parse::<TokenEntry>()
                .is_err()
        );
    }

    #[test]
    fn token_entry_debug_hides_the_hash() {
        let entry: TokenEntry = format!("svc:admin:{}", "ab".repeat(32)).parse().unwrap();
        assert!(!format!("{entry:?}").contains("abab"));
    }

    #[test]
    fn analyses_are_kept_30_days_by_default_and_a_retention_under_a_second_is_refused() {
        let load = |retention: Option<&str>| {
            let mut overrides = vec![("database.url", "postgres://localhost/datagate")];
            overrides.extend(retention.map(|r| ("analysis.retention", r)));
            Settings::load_with_overrides(None, &overrides)
        };
        assert_eq!(
            load(None).unwrap().analysis.retention,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            load(Some("12h")).unwrap().analysis.retention,
            Duration::from_secs(12 * 3600)
        );
        for retention in ["0s", "500ms"] {
            let error = load(Some(retention)).unwrap_err().to_string();
            assert!(error.contains("analysis.retention"), "{retention}: {error}");
        }
    }

    #[test]
    fn a_key_prefix_with_glob_characters_is_refused() {
        let load = |prefix: &str| {
            Settings::load_with_overrides(
                None,
                &[
                    ("database.url", "postgres://localhost/datagate"),
                    ("redis.key_prefix", prefix),
                ],
            )
        };
        assert!(load("dg-staging_2").is_ok());
        for prefix in ["dg*", "dg?", "dg[ab]", "dg\\x"] {
            let error = load(prefix).unwrap_err().to_string();
            assert!(error.contains("redis.key_prefix"), "{prefix}: {error}");
        }
    }

    #[test]
    fn peer_entries_parse_from_a_table_or_text() {
        let text: PeerEntry =
            serde_json::from_str(r#""spiffe://cluster.local/ns/shop/sa/checkout=writer+reader""#)
                .unwrap();
        assert_eq!(text.identity, "spiffe://cluster.local/ns/shop/sa/checkout");
        assert_eq!(text.roles, vec!["writer", "reader"]);
        let table: PeerEntry =
            serde_json::from_str(r#"{"identity": "billing", "roles": []}"#).unwrap();
        assert_eq!(table.identity, "billing");
        assert!(table.roles.is_empty());
        assert!(serde_json::from_str::<PeerEntry>(r#""no-roles-part""#).is_err());
        assert!(serde_json::from_str::<PeerEntry>(r#""=admin""#).is_err());
    }

    #[test]
    fn tls_needs_its_files() {
        let load = |overrides: &[(&str, &str)]| {
            let mut all = vec![("database.url", "postgres://localhost/datagate")];
            all.extend_from_slice(overrides);
            Settings::load_with_overrides(None, &all)
        };
        let error = load(&[("server.tls.enabled", "true")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("DATAGATE__SERVER__TLS__CERT_FILE"),
            "{error}"
        );
        let with_files = [
            ("server.tls.enabled", "true"),
            ("server.tls.cert_file", "/tls/tls.crt"),
            ("server.tls.key_file", "/tls/tls.key"),
        ];
        assert!(load(&with_files).is_ok());
        let mut mtls = with_files.to_vec();
        mtls.push(("server.tls.client_auth", "required"));
        let error = load(&mtls).unwrap_err().to_string();
        assert!(
            error.contains("DATAGATE__SERVER__TLS__CLIENT_CA_FILE"),
            "{error}"
        );
        let error = load(&[("server.health_port", "50051")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("server.health_port"), "{error}");
        // Unset: no health port; 0: any free one, as for the gRPC port.
        assert_eq!(load(&[]).unwrap().server.health_port, None);
        let ephemeral = load(&[("server.port", "0"), ("server.health_port", "0")]).unwrap();
        assert_eq!(ephemeral.server.health_port, Some(0));
    }

    #[test]
    fn jwt_settings_take_their_defaults_and_refuse_hmac_or_two_key_sources() {
        let load = |extra: &[(&str, &str)]| {
            let mut overrides = vec![
                ("database.url", "postgres://localhost/datagate"),
                ("auth.jwt.issuer", "https://idp.example.com/"),
                ("auth.jwt.audience", "datagate"),
            ];
            overrides.extend_from_slice(extra);
            Settings::load_with_overrides(None, &overrides)
        };
        let settings = load(&[("auth.jwt.jwks_file", "/etc/datagate/jwks.json")]).unwrap();
        let jwt = settings.auth.jwt.expect("the section is present");
        assert_eq!(jwt.algorithms.len(), 3);
        assert_eq!(jwt.leeway, Duration::from_secs(30));
        assert_eq!(
            (jwt.identity_claim.as_str(), jwt.roles_claim.as_str()),
            ("sub", "roles")
        );
        assert_eq!(jwt.min_refresh_interval, Duration::from_secs(30));

        let both = load(&[
            ("auth.jwt.jwks_file", "/etc/datagate/jwks.json"),
            ("auth.jwt.jwks_url", "https://idp.example.com/jwks.json"),
        ]);
        assert!(both.unwrap_err().to_string().contains("exactly one"));
        let plain = load(&[("auth.jwt.jwks_url", "http://idp.example.com/jwks.json")]);
        assert!(plain.unwrap_err().to_string().contains("https://"));
        let algorithm = |name: &str| serde_json::from_value::<JwtAlgorithm>(name.into());
        assert_eq!(algorithm("EdDSA").unwrap(), JwtAlgorithm::EdDSA);
        assert!(algorithm("HS256").is_err() && algorithm("none").is_err());
        assert!(
            Settings::load_with_overrides(None, &[("database.url", "postgres://x/y")])
                .unwrap()
                .auth
                .jwt
                .is_none()
        );
    }

    #[test]
    fn connection_limits_must_be_usable() {
        let load = |key, value| {
            Settings::load_with_overrides(
                None,
                &[
                    ("database.url", "postgres://localhost/datagate"),
                    (key, value),
                ],
            )
        };
        let defaults = load("server.idle_timeout", "5m").unwrap().server;
        assert_eq!(defaults.max_concurrent_streams, 200);
        assert!(
            load("server.idle_timeout", "0s").is_ok(),
            "zero turns it off"
        );
        for (key, value) in [
            ("server.max_connections", "0"),
            ("server.max_concurrent_streams", "0"),
            ("server.max_header_list_bytes", "512"),
            ("server.http2_keepalive_timeout", "0s"),
        ] {
            let error = load(key, value).unwrap_err().to_string();
            assert!(error.contains(key), "{key} = {value}: {error}");
        }
    }

    #[test]
    fn the_redis_password_stays_out_of_debug_output() {
        let settings = Settings::load_with_overrides(
            None,
            &[
                ("database.url", "postgres://localhost/datagate"),
                ("redis.username", "datagate"),
                ("redis.password", "hunter2-acl-password"),
            ],
        )
        .unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn env_var_names_follow_the_double_underscore_convention() {
        assert_eq!(env_var_name("database.url"), "DATAGATE__DATABASE__URL");
    }
}
