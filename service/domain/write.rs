//! The one write path.
//!
//! Every write is a [`WriteTx`]: it begins on behalf of an [`Actor`] (so the
//! audit triggers record the caller and request id of every row it changes),
//! collects the cache entries and query families the write makes stale while
//! it runs, commits, and only then invalidates them. Invalidating before the
//! commit would let a concurrent read refill the old row; forgetting to
//! invalidate would serve it until its TTL. Neither can be written by hand
//! here: a write names what it touches next to the statement that touches
//! it, and [`WriteTx::commit`] does the rest. Dropping a `WriteTx` without
//! committing rolls back and invalidates nothing.
//!
//! **Deadlines.** The transaction's pool wait and every statement in it are
//! bounded by the call's deadline (`store::audit::begin`). If the call is
//! abandoned (its caller cancelled it, or its deadline passed) while a
//! statement runs, dropping the `WriteTx` cancels that statement in
//! PostgreSQL (`store::postgres::Control`, by the pid the first statement
//! returned) and only then lets the connection go back to the pool, which
//! rolls the transaction back. An ordinary early return (an error, a
//! replay) is not abandonment: it costs no cancel.
//!
//! **Retries.** A call's write runs inside `retry::postgres`: begin, the
//! write's own statements and the commit are one attempt, made again,
//! whole, on a fresh connection, while it fails for a transient reason (a
//! deadlock or serialization failure, the server ending the connection as
//! it shuts down or restarts, a connection lost), under the call policy and
//! the process's retry budget (`retry`). What is repeated, and why that is
//! safe:
//!
//! - **A failure before `COMMIT` was sent**: always. The transaction is
//!   rolled back (PostgreSQL aborts a transaction on its first error, and a
//!   transaction whose connection is gone never commits), so nothing of the
//!   attempt remains, and the next attempt reads the rows afresh: it decides
//!   again (a stock check, a version check) on what is there then.
//! - **A serialization failure or deadlock reported by `COMMIT`**: always;
//!   PostgreSQL answered that it rolled the transaction back.
//! - **Any other failure of `COMMIT`** (the connection lost while
//!   committing, the server shutting down under it): the commit may or may
//!   not have happened. Repeated only for a write that claimed an
//!   idempotency key in the transaction (`CreateOrder` with a
//!   `request_id`, see [`super::idempotency`]): the key's row commits with
//!   the write, so the next attempt either finds it and replays the stored
//!   response, or claims it afresh because nothing committed. Any other
//!   write is answered with the failure (UNAVAILABLE), as before: repeating
//!   an `AdjustInventory` whose first commit landed would add the stock
//!   twice.
//!
//! The write's work outside PostgreSQL happens after the commit
//! (invalidation) or before the attempt (password hashing), never inside
//! it, so an attempt that failed left nothing behind to repeat.

use std::ops::{Deref, DerefMut};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use tracing::Instrument as _;

use crate::{
    cache::{Cache, Entity, Family},
    error::{Error, Result},
    model::{Id, audit::Actor, deadline::Abandoned},
    statements,
    store::{self, audit::Begun, postgres::Control},
};

/// Begins write transactions; cheap to clone.
#[derive(Clone)]
pub struct Writes {
    db: PgPool,
    cache: Cache,
    /// Cancels the statement of a write its call abandoned. Each `Writes`
    /// has its own (lazy, at most two connections, closed when idle).
    control: Control,
}

impl Writes {
    pub fn new(db: PgPool, cache: Cache) -> Self {
        Self {
            control: Control::for_pool(&db),
            db,
            cache,
        }
    }

    /// The pool the writes go to (the services read from it too).
    pub fn db(&self) -> &PgPool {
        &self.db
    }

    /// The cache the writes invalidate (the services read through it too).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// A write transaction on behalf of `actor`. A call begins it inside
    /// `retry::postgres`, commit included (see "Retries" above).
    pub async fn begin(&self, actor: &Actor) -> Result<WriteTx> {
        let Begun { tx, pid } = store::audit::begin(&self.db, actor).await?;
        Ok(WriteTx {
            tx: Some(tx),
            cancel: Abandoned::current().map(|abandoned| Cancel {
                abandoned,
                pid,
                control: self.control.clone(),
            }),
            cache: self.cache.clone(),
            entities: Vec::new(),
            families: Vec::new(),
            keyed: false,
        })
    }
}

/// A transaction that invalidates what it touched once it has committed.
/// It dereferences to the connection the store functions take.
pub struct WriteTx {
    /// `Some` until committed or dropped.
    tx: Option<Transaction<'static, Postgres>>,
    /// How to cancel the statement in flight if the call is abandoned;
    /// `None` outside a call.
    cancel: Option<Cancel>,
    cache: Cache,
    entities: Vec<(Entity, i64)>,
    families: Vec<Family>,
    /// Whether an idempotency key was claimed in this transaction: then a
    /// commit whose outcome is unknown may be tried again (module doc).
    keyed: bool,
}

struct Cancel {
    abandoned: Abandoned,
    pid: i32,
    control: Control,
}

impl WriteTx {
    /// The cached `entity` with this id is stale once this commits (a "not
    /// found" for a new id may be cached too).
    pub fn touches(&mut self, entity: Entity, id: Id) {
        let entry = (entity, id.get());
        if !self.entities.contains(&entry) {
            self.entities.push(entry);
        }
    }

    /// This transaction claimed an idempotency key: it commits with the
    /// write, so a repeat of the write replays it if the commit landed.
    pub(super) fn claimed_key(&mut self) {
        self.keyed = true;
    }

    /// Every cached result of `family` is stale once this commits.
    pub fn touches_family(&mut self, family: Family) {
        if !self.families.contains(&family) {
            self.families.push(family);
        }
    }

    /// Commits, then invalidates what the write touched. Invalidation never
    /// fails the write: when Redis is unreachable it is queued and replayed
    /// before Redis is used again.
    ///
    /// The commit and the invalidation run on a task of their own, awaited
    /// here: a call dropped at its deadline or cancelled by its caller
    /// between the two cannot leave a committed row cached (the task goes
    /// on), and Redis gets its full command timeout rather than what is left
    /// of the call's deadline. A commit whose outcome is unknown (the
    /// connection broke while committing) invalidates too: a needless
    /// invalidation costs one refill, a missed one serves a stale row; its
    /// error is transient only if the write claimed an idempotency key (see
    /// "Retries" in the module doc).
    pub async fn commit(mut self) -> Result<()> {
        let tx = self
            .tx
            .take()
            .expect("a WriteTx holds its transaction until it ends");
        let cache = self.cache.clone();
        let entities = std::mem::take(&mut self.entities);
        let families = std::mem::take(&mut self.families);
        let work = async move {
            let committed = tx.commit().await;
            if committed.is_ok() || matches!(committed, Err(sqlx::Error::Io(_))) {
                cache.invalidate(&entities).await;
                for family in families {
                    cache.invalidate_family(family).await;
                }
            }
            committed
        };
        // The call's span and statement log go along (its COMMIT and Redis
        // commands are the call's); its deadline does not.
        let work = work.instrument(tracing::Span::current());
        let committing = match statements::current() {
            Some(log) => tokio::spawn(statements::scope(log, work)),
            None => tokio::spawn(work),
        };
        match committing.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(commit_failed(e, self.keyed)),
            Err(e) => Err(anyhow::anyhow!("committing a write: {e}").into()),
        }
    }

    fn tx(&self) -> &Transaction<'static, Postgres> {
        self.tx
            .as_ref()
            .expect("a WriteTx holds its transaction until it ends")
    }
}

/// The error of a failed `COMMIT`, transient (the write is tried again)
/// only if PostgreSQL answered that it rolled back (a serialization failure
/// or deadlock) or if the transaction claimed an idempotency key (`keyed`);
/// otherwise the commit may have happened, and the write is not repeated.
fn commit_failed(e: sqlx::Error, keyed: bool) -> Error {
    let rolled_back = e
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| matches!(&*code, "40001" | "40P01"));
    let error = Error::from(e);
    if rolled_back || keyed {
        error
    } else {
        error.not_transient()
    }
}

impl Deref for WriteTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.tx()
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.tx
            .as_mut()
            .expect("a WriteTx holds its transaction until it ends")
    }
}

impl Drop for WriteTx {
    /// Uncommitted: the transaction rolls back (sqlx queues the `ROLLBACK`
    /// for the connection's return to the pool). If the call was abandoned,
    /// a statement may still be running: cancel it first, holding the
    /// connection until the cancel is delivered (see `store::postgres`).
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        let Some(cancel) = self.cancel.take().filter(|c| c.abandoned.is_set()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        metrics::counter!("abandoned_statement_cancels_total").increment(1);
        // Not on the task tracker: Drop has no handle to it. The task is
        // bounded by `Control::TIMEOUT`, then returns the connection.
        runtime.spawn(async move {
            cancel.control.cancel(cancel.pid).await;
            drop(tx);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::error::testing::sqlstate;

    fn lost(kind: io::ErrorKind) -> sqlx::Error {
        sqlx::Error::Io(io::Error::from(kind))
    }

    #[test]
    fn a_commit_answered_with_a_rollback_is_repeated() {
        for code in ["40001", "40P01"] {
            assert!(
                commit_failed(sqlstate(code), false).is_transient(),
                "{code}"
            );
        }
    }

    #[test]
    fn a_commit_of_unknown_outcome_is_repeated_only_with_an_idempotency_key() {
        let unknown = || {
            [
                sqlstate("57P01"),
                sqlstate("57P02"),
                lost(io::ErrorKind::ConnectionReset),
                lost(io::ErrorKind::UnexpectedEof),
            ]
        };
        for e in unknown() {
            let error = commit_failed(e, false);
            assert!(
                matches!(error, Error::Unavailable { .. }) && !error.is_transient(),
                "{error:?}"
            );
        }
        for e in unknown() {
            assert!(commit_failed(e, true).is_transient());
        }
    }
}
