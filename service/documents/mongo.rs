//! MongoDB: the client, the collections and their indexes, and one wrapper
//! every operation goes through (timeout, span, metrics, error mapping).
//!
//! **Deadlines.** The wrapper's timeout is the shorter of
//! `mongodb.operation_timeout` and the call's remaining deadline; running
//! out of the call's time is DEADLINE_EXCEEDED, running out of the
//! operation timeout within a longer deadline is UNAVAILABLE. Reads and
//! find-and-modify also carry `maxTimeMS` ([`Mongo::max_time`]: the same
//! bound less [`MARGIN`]), so the server stops the work itself rather than
//! finishing it for a caller that has gone; the driver offers no
//! `maxTimeMS` for `insert_one` / `update_one`, which the wrapper's timeout
//! bounds alone. A `maxTimeMS` expiry (server error 50) is DEADLINE_EXCEEDED
//! `QUERY_TIMEOUT`.
//!
//! **Outages.** The wrapper puts a fail-fast [`Gate`] (one per client, see
//! [`crate::model::availability`]) in front of every operation, so that
//! while MongoDB is unreachable calls fail at once with UNAVAILABLE
//! `DEPENDENCY_UNAVAILABLE` (`"dependency": "mongodb"`) and `RetryInfo`,
//! instead of each waiting out `server_selection_timeout`. It closes when
//! an operation fails for want of a server (`is_outage`) or when the
//! driver's own monitoring loses the last server the operations can use
//! (no writable server: every operation here needs the primary), which
//! catches the outage even when every call's deadline ends before server
//! selection gives up. While closed, one trial per backoff period pings
//! with a short bound ([`TRIAL_WAIT`]) and, answered, opens the gate and
//! goes on; the gate also opens when the driver's monitoring finds a usable
//! server again. The readiness probe's ping goes through the same wrapper,
//! so the `mongodb` health entry follows the gate. A call already past the
//! gate when the server goes away can still wait: the driver retries a read
//! that lost its connection once, and the retry waits out server selection
//! (`retryReads=false` in the URL makes it fail at once instead).
//!
//! Only the standard driver API is used. Filters and updates are built here
//! from typed values, never from documents a caller sent.

use std::{
    future::IntoFuture,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use mongodb::{
    Client, Collection, Cursor, Database, IndexModel,
    bson::{Document, doc},
    error::ErrorKind,
    event::{EventHandler, cmap::CmapEvent, sdam::SdamEvent},
    options::ClientOptions,
};
use secrecy::ExposeSecret as _;
use serde::{Serialize, de::DeserializeOwned};

use super::market_analyses;
use crate::{
    config::MongoSettings,
    error::{Detail, Error, Result, reason},
    model::{
        availability::{Admit, FIRST_BACKOFF, Gate, TRIAL_WAIT},
        deadline::{Deadline, wait_bound},
        diagnostics::PoolStats,
    },
    telemetry::{DbOperation, DbSpan, DbSystem, Peer},
};

/// Taken off the call's remaining time for `maxTimeMS`, so the server's
/// answer arrives before the wrapper's timeout.
pub const MARGIN: Duration = Duration::from_millis(50);

/// How often the driver's monitoring checks the server when the URL does not
/// say (`heartbeatFrequencyMS`; the driver's default is 10 s, and 500 ms
/// its floor). The gate follows the monitoring (see [`follow_topology`]),
/// so an outage closes it, and a return opens it, within about this long
/// even without calls; two `hello`s a second are nothing to a server.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// MongoDB's `MaxTimeMSExpired`.
const MAX_TIME_EXPIRED: i32 = 50;
/// MongoDB's `InterruptedAtShutdown` and `ShutdownInProgress`: the server
/// is going away.
const SHUTTING_DOWN: [i32; 2] = [11600, 91];

/// `maxTimeMS` for an operation bounded by `bound`: [`MARGIN`] less, at
/// least 1 ms (0 would mean no limit).
fn max_time_within(bound: Duration) -> Duration {
    bound.saturating_sub(MARGIN).max(Duration::from_millis(1))
}

pub const USER_PROFILES: &str = "user_profiles";
pub const PRICE_HISTORY: &str = "price_history";

/// The indexes of each collection, created at start-up (creating an index
/// that exists with the same definition does nothing); finished analyses
/// are kept for `analysis_retention`.
fn indexes(analysis_retention: Duration) -> Vec<(&'static str, IndexModel)> {
    let index = |keys: Document| IndexModel::builder().keys(keys).build();
    let mut indexes = vec![
        // A product's buckets by day; and the idempotency check of the relay.
        (PRICE_HISTORY, index(doc! { "product_id": 1, "day": 1 })),
        (PRICE_HISTORY, index(doc! { "product_id": 1, "seqs": 1 })),
    ];
    indexes.extend(
        market_analyses::indexes(analysis_retention)
            .into_iter()
            .map(|model| (market_analyses::MARKET_ANALYSES, model)),
    );
    indexes
}

/// MongoDB's `IndexOptionsConflict`: an index of that name exists with
/// other options (a TTL index with another `expireAfterSeconds`).
const INDEX_OPTIONS_CONFLICT: i32 = 85;

#[derive(Clone)]
pub struct Mongo {
    db: Database,
    timeout: std::time::Duration,
    /// Whether MongoDB answers: operations fail fast while it does not.
    gate: Arc<Gate>,
    /// The server the operation spans name (the URL's first host).
    peer: Option<Arc<Peer>>,
    /// The driver's connection pool, as its CMAP events tell it.
    pool: Arc<PoolUsage>,
    max_pool_size: u32,
}

/// Connections of the driver's pools (one per server), counted from the
/// connection monitoring (CMAP) events, since the driver exposes no pool
/// statistics: open (created, not yet closed) and checked out (in use by an
/// operation).
#[derive(Default)]
struct PoolUsage {
    open: AtomicI64,
    checked_out: AtomicI64,
}

impl PoolUsage {
    fn follow(&self, event: &CmapEvent) {
        let (counter, delta) = match event {
            CmapEvent::ConnectionCreated(_) => (&self.open, 1),
            CmapEvent::ConnectionClosed(_) => (&self.open, -1),
            CmapEvent::ConnectionCheckedOut(_) => (&self.checked_out, 1),
            CmapEvent::ConnectionCheckedIn(_) => (&self.checked_out, -1),
            _ => return,
        };
        counter.fetch_add(delta, Ordering::Relaxed);
    }
}

impl Mongo {
    /// The client for `settings`, or `None` when no URL is configured. No
    /// connection is made until the first operation.
    pub async fn connect(settings: &MongoSettings) -> anyhow::Result<Option<Self>> {
        let url = settings.url.expose_secret().trim();
        if url.is_empty() {
            return Ok(None);
        }
        let mut options = client_options(url, settings).await?;
        let gate = Arc::new(Gate::new("mongodb", "the document store"));
        let follower = gate.clone();
        options.sdam_event_handler = Some(EventHandler::callback(move |event| {
            follow_topology(&follower, &event);
        }));
        let pool = Arc::new(PoolUsage::default());
        let counter = pool.clone();
        options.cmap_event_handler = Some(EventHandler::callback(move |event| {
            counter.follow(&event);
        }));
        let client = Client::with_options(options)?;
        Ok(Some(Self {
            db: client.database(&settings.database),
            timeout: settings.operation_timeout,
            gate,
            peer: Peer::from_url(DbSystem::MongoDb, url).map(Arc::new),
            pool,
            max_pool_size: settings.max_pool_size,
        }))
    }

    /// The connection pool's open and idle connections and its maximum.
    /// Every operation needs the primary, so one server's pool is the one
    /// that saturates: `mongodb.max_pool_size` is its maximum.
    pub fn pool_stats(&self) -> PoolStats {
        let open = self.pool.open.load(Ordering::Relaxed).max(0);
        let in_use = self.pool.checked_out.load(Ordering::Relaxed).max(0);
        PoolStats {
            pool: "mongodb",
            size: open,
            idle: (open - in_use).max(0),
            max: i64::from(self.max_pool_size),
        }
    }

    pub fn collection<T: Send + Sync>(&self, name: &str) -> Collection<T> {
        self.db.collection(name)
    }

    /// Creates every declared index; a TTL index whose retention changed is
    /// updated in place (`collMod`). One that fails does not hold the
    /// others up: each is tried, and the first failure returned.
    pub async fn ensure_indexes(&self, analysis_retention: Duration) -> Result<()> {
        let mut first_failure = None;
        for (collection, model) in indexes(analysis_retention) {
            if let Err(e) = self.ensure_index(collection, model).await {
                first_failure.get_or_insert(e);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Creates one index (see [`Mongo::ensure_indexes`]).
    async fn ensure_index(&self, collection: &'static str, model: IndexModel) -> Result<()> {
        let collection_handle = self.collection::<Document>(collection);
        let ttl = model
            .options
            .as_ref()
            .and_then(|o| Some((o.name.clone()?, o.expire_after?)));
        // false: the index exists with other options.
        let created = self
            .run("create_index", collection, async {
                match collection_handle.create_index(model).await {
                    Ok(_) => Ok(true),
                    Err(e) if ttl.is_some() && error_code(&e) == Some(INDEX_OPTIONS_CONFLICT) => {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        if let (false, Some((name, expire_after))) = (created, ttl) {
            let seconds = i64::try_from(expire_after.as_secs()).unwrap_or(i64::MAX);
            self.run(
                "coll_mod",
                collection,
                self.db.run_command(doc! {
                    "collMod": collection,
                    "index": { "name": &name, "expireAfterSeconds": seconds },
                }),
            )
            .await?;
            tracing::info!(
                collection,
                index = name,
                seconds,
                "TTL index retention changed"
            );
        }
        Ok(())
    }

    /// Whether MongoDB answers a ping (through the gate: false at once
    /// while it is closed, but for the period's trial).
    pub async fn ping(&self) -> bool {
        self.run("ping", "admin", self.db.run_command(doc! { "ping": 1 }))
            .await
            .is_ok()
    }

    /// The `maxTimeMS` to give a read or find-and-modify of the call running
    /// on this task (see the module doc).
    pub fn max_time(&self) -> Duration {
        max_time_within(wait_bound(self.timeout, Deadline::current().map(Deadline::remaining)).0)
    }

    /// Runs one operation through the gate (see the module doc), under the
    /// operation timeout (or the call's deadline, if sooner), in a span,
    /// timed.
    pub async fn run<T, F>(&self, operation: &'static str, collection: &str, op: F) -> Result<T>
    where
        F: IntoFuture<Output = mongodb::error::Result<T>>,
    {
        match self.gate.admit(Instant::now()) {
            Admit::Go => {}
            Admit::Trial => self.trial().await?,
            Admit::Refuse(retry_after) => return Err(self.gate.refused(retry_after)),
        }
        let mut span = DbSpan::start(self.peer.as_deref(), None, || DbOperation {
            operation,
            collection: Some(collection.into()),
            query: None,
        });
        let (timeout, by_deadline) =
            wait_bound(self.timeout, Deadline::current().map(Deadline::remaining));
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, op.into_future()).await;
        match &result {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => span.fail("mongodb_error"),
            Err(_) => span.fail("timeout"),
        }
        drop(span);
        metrics::histogram!(
            "query_latency_seconds",
            "database_type" => "mongodb",
            "operation" => operation
        )
        .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(value)) => {
                self.gate.up();
                Ok(value)
            }
            Ok(Err(error)) => {
                if is_outage(&error) {
                    self.gate.down(Instant::now());
                }
                Err(map_error(operation, error))
            }
            // Slow, or still selecting a server: not proof of an outage (the
            // driver's monitoring tells, see `follow_topology`).
            Err(_) if by_deadline => Err(Error::deadline_exceeded()),
            Err(_) => Err(unavailable(operation, "timed out")),
        }
    }

    /// Runs a `find` through [`Mongo::run`] and collects every document it
    /// finds (the cursor's further batches through the wrapper too).
    pub async fn find_all<T, F>(&self, collection: &str, find: F) -> Result<Vec<T>>
    where
        T: DeserializeOwned + Send + Sync,
        F: IntoFuture<Output = mongodb::error::Result<Cursor<T>>>,
    {
        let cursor = self.run("find", collection, find).await?;
        self.run("find", collection, cursor.try_collect::<Vec<_>>())
            .await
    }

    /// The trial of a closed gate: a ping within [`TRIAL_WAIT`] (or the
    /// call's time left, if less). Answered, the gate opens and the call
    /// goes on; else it backs off further and the call is refused.
    async fn trial(&self) -> Result<()> {
        let wait = Deadline::current().map_or(TRIAL_WAIT, |d| d.remaining().min(TRIAL_WAIT));
        let pinged =
            tokio::time::timeout(wait, self.db.run_command(doc! { "ping": 1 }).into_future()).await;
        match pinged {
            // An answer, even an error, is a server that answers.
            Ok(Ok(_)) => {}
            Ok(Err(error)) if !is_outage(&error) => {}
            _ => {
                self.gate.down(Instant::now());
                return Err(self.gate.refused(FIRST_BACKOFF));
            }
        }
        self.gate.up();
        Ok(())
    }
}

/// Moves the gate with the driver's view of the deployment: closed when the
/// last server the operations can use (a writable one) is lost, open when
/// one is found. Runs on the driver's event task, for every SDAM event.
fn follow_topology(gate: &Gate, event: &SdamEvent) {
    let SdamEvent::TopologyDescriptionChanged(changed) = event else {
        return;
    };
    match (
        changed.previous_description.has_writable_server(),
        changed.new_description.has_writable_server(),
    ) {
        (true, false) => gate.down(Instant::now()),
        (false, true) => gate.up(),
        _ => {}
    }
}

/// Whether a driver error means MongoDB cannot be reached (rather than an
/// operation that failed on a server that answered): no server could be
/// selected, the connection broke or could not be made, the pool was
/// cleared by such a failure, or the server is shutting down.
fn is_outage(error: &mongodb::error::Error) -> bool {
    match &*error.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. } => true,
        ErrorKind::Command(command) => SHUTTING_DOWN.contains(&command.code),
        _ => false,
    }
}

fn unavailable(operation: &str, why: &str) -> Error {
    tracing::warn!(
        database_type = "mongodb",
        operation,
        why,
        "MongoDB unavailable"
    );
    Error::Unavailable {
        detail: Detail::new(
            reason::DEPENDENCY_UNAVAILABLE,
            "the document store is unavailable; retry with backoff",
        )
        .with("dependency", "mongodb"),
        retry_after: std::time::Duration::from_secs(1),
    }
}

/// The server's error code of a failed command.
fn error_code(error: &mongodb::error::Error) -> Option<i32> {
    match *error.kind {
        ErrorKind::Command(ref command) => Some(command.code),
        _ => None,
    }
}

fn map_error(operation: &str, error: mongodb::error::Error) -> Error {
    if is_outage(&error) {
        return unavailable(operation, &error.to_string());
    }
    match *error.kind {
        ErrorKind::Command(ref command) if command.code == MAX_TIME_EXPIRED => {
            Error::DeadlineExceeded(Detail::new(
                reason::QUERY_TIMEOUT,
                "the document query was stopped at the call's deadline",
            ))
        }
        _ => Error::Internal(anyhow::Error::new(error).context(format!("mongodb {operation}"))),
    }
}

/// BSON for a value the service built (never fails for the types used).
pub fn to_document<T: Serialize>(value: &T) -> Result<Document> {
    mongodb::bson::to_document(value)
        .map_err(|e| Error::Internal(anyhow::anyhow!("encoding a document: {e}")))
}

pub fn from_document<T: DeserializeOwned>(document: Document) -> Result<T> {
    mongodb::bson::from_document(document)
        .map_err(|e| Error::Internal(anyhow::anyhow!("decoding a document: {e}")))
}

/// The driver's options: `url`'s, with the pool and timeouts of
/// `settings`. TLS is the URL's alone (`tls=true`, `tlsCAFile=`,
/// `tlsCertificateKeyFile=`: the driver's rustls, with ring), so nothing
/// here may set `options.tls`.
async fn client_options(url: &str, settings: &MongoSettings) -> anyhow::Result<ClientOptions> {
    let mut options = ClientOptions::parse(url)
        .await
        .map_err(|e| anyhow::anyhow!("invalid configuration: mongodb.url: {e}"))?;
    options.app_name = Some("datagate".into());
    options.min_pool_size = Some(settings.min_pool_size);
    options.max_pool_size = Some(settings.max_pool_size);
    options.connect_timeout = Some(settings.connect_timeout);
    options.server_selection_timeout = Some(settings.server_selection_timeout);
    options.heartbeat_freq.get_or_insert(HEARTBEAT);
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The development server (nx-27017) speaks no TLS, so the options are
    /// checked where the driver takes them.
    #[tokio::test]
    async fn tls_options_in_the_url_reach_the_driver() {
        let settings = crate::config::Settings::load_with_overrides(
            None,
            &[("database.url", "postgres://localhost/datagate")],
        )
        .unwrap()
        .mongodb;
        let url = "mongodb://db.internal:27017/?tls=true&tlsCAFile=/etc/datagate/mongo-ca.pem\
                   &tlsCertificateKeyFile=/etc/datagate/mongo-client.pem";

        let options = client_options(url, &settings).await.unwrap();

        let Some(mongodb::options::Tls::Enabled(tls)) = options.tls else {
            panic!("TLS is on: {:?}", options.tls);
        };
        assert_eq!(
            tls.ca_file_path.as_deref(),
            Some(std::path::Path::new("/etc/datagate/mongo-ca.pem"))
        );
        assert_eq!(
            tls.cert_key_file_path.as_deref(),
            Some(std::path::Path::new("/etc/datagate/mongo-client.pem"))
        );
        assert_eq!(tls.allow_invalid_certificates, None);
        assert_eq!(options.max_pool_size, Some(settings.max_pool_size));
        let plain = client_options("mongodb://db.internal:27017", &settings)
            .await
            .unwrap();
        assert!(plain.tls.is_none(), "{:?}", plain.tls);
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_broken_connection_is_an_outage_and_an_operation_error_is_not() {
        let io = |kind: std::io::ErrorKind| mongodb::error::Error::from(kind);
        assert!(is_outage(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(is_outage(&io(std::io::ErrorKind::UnexpectedEof)));
        assert!(!is_outage(&mongodb::error::Error::from(
            ErrorKind::MissingResumeToken
        )));
        assert!(!is_outage(&mongodb::error::Error::custom("a bug")));
    }

    #[test]
    fn max_time_leaves_the_margin_and_is_never_zero() {
        assert_eq!(max_time_within(200 * MS), 200 * MS - MARGIN);
        assert_eq!(max_time_within(MARGIN), MS, "0 would mean no limit");
        assert_eq!(max_time_within(Duration::ZERO), MS);
    }
}
