//! Cross-request batching of point reads: concurrent reads of one entity by
//! id, from different calls, share one `WHERE id = ANY($1)` query.
//!
//! Each [`PointReads`] has one batcher task (spawned on first use, ended
//! when the last handle is dropped). A read queues its id with a reply
//! channel; the task drains everything queued (`recv_many`) into one batch
//! as soon as one of its [`IN_FLIGHT`] slots is free. There is no batching
//! delay: an idle batcher answers a lone read with a batch of one at once,
//! and what queues while the slots are busy goes into the next batch, so
//! batches grow with the load and the query count does not.
//!
//! The guarantees the request-scoped loaders have, kept here:
//!
//! - **Per-key results**: a missing row is `None` for that id only; a failed
//!   batch fails each of its waiters with that one error.
//! - **Fresh reads**: a batch's query starts after every read in it was
//!   queued, so it sees every write acknowledged before the read began (the
//!   cache's fence and generation are the cache's, around this load).
//! - **Cancellation**: a caller that goes away takes only its own reply
//!   with it. The batch runs on the batcher's task, so it is not cancelled
//!   for the others; a waiter gone before its batch starts is left out, and
//!   a batch whose waiters have all gone is dropped (inside calls, its read
//!   connection is closed, as for an abandoned call, so PostgreSQL stops the
//!   statement).
//! - **Deadlines**: each waiter waits at most until its own call's deadline
//!   (then DEADLINE_EXCEEDED). The batch runs under the **longest** deadline
//!   among its waiters (none if one has none), which becomes its pool wait
//!   bound and statement timeout as for any read (`store::postgres`): a
//!   waiter with a short deadline cannot cut the query short for one with a
//!   longer one, and the query never outlives the last waiter's deadline.
//!
//! A batch's statement runs on the batcher's task, outside every call's
//! statement log, so it is not counted in a call's statements (it is
//! counted in `point_read_batches_total` and `point_read_batch_size`).

use std::{
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use sqlx::{PgConnection, PgPool};
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tracing::Instrument as _;

use super::{Shared, find_by_id};
use crate::{
    error::{Error, Result},
    model::{Id, deadline::Deadline},
};

/// How many batches of one entity run at once: enough to keep a few
/// connections busy (one slow batch does not hold up every read), few
/// enough that under load the reads gather into large batches.
pub const IN_FLIGHT: usize = 4;
/// The most reads in one batch (one `= ANY($1)` array).
pub const MAX_BATCH: usize = 1_000;

/// An entity read by id, in batches.
pub trait PointRead: Send + Sync + 'static {
    type Row: Clone + Send + Sync + 'static;
    /// The entity's name in metrics and spans.
    const NAME: &'static str;

    fn id(row: &Self::Row) -> Id;

    /// The rows among `ids` (in any order; the missing ones absent).
    fn find_many(
        conn: &mut PgConnection,
        ids: &[Id],
    ) -> impl Future<Output = Result<Vec<Self::Row>>> + Send;
}

/// Declares a [`PointRead`] whose rows carry their `id`: the marker type,
/// the row type, the entity's name and the store function reading rows by
/// id, e.g. `point_read!(Products: Product, "product", store::products::find_many);`.
macro_rules! point_read {
    ($(#[$doc:meta])* $marker:ident: $row:ty, $name:literal, $find_many:path) => {
        $(#[$doc])*
        pub struct $marker;

        impl $crate::loaders::PointRead for $marker {
            type Row = $row;
            const NAME: &'static str = $name;

            fn id(row: &$row) -> $crate::model::Id {
                row.id
            }

            fn find_many(
                conn: &mut ::sqlx::PgConnection,
                ids: &[$crate::model::Id],
            ) -> impl Future<Output = $crate::error::Result<Vec<$row>>> + Send {
                $find_many(conn, ids)
            }
        }
    };
}
pub(crate) use point_read;

struct Waiter<V> {
    id: Id,
    deadline: Option<Deadline>,
    reply: oneshot::Sender<Shared<Option<V>>>,
}

/// What the batcher has done, for metrics and tests.
#[derive(Default)]
struct Stats {
    queued: AtomicUsize,
    batches: AtomicU64,
}

/// The point reads of one entity; cheap to clone (clones share the batcher).
pub struct PointReads<R: PointRead> {
    inner: Arc<Inner<R>>,
}

impl<R: PointRead> Clone for PointReads<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R: PointRead> {
    db: PgPool,
    in_flight: usize,
    /// Set when the batcher is spawned, on the first read (inside the
    /// runtime). Dropping it (with the last handle) ends the batcher.
    queue: OnceLock<mpsc::UnboundedSender<Waiter<R::Row>>>,
    stats: Arc<Stats>,
}

impl<R: PointRead> PointReads<R> {
    /// Point reads on `db`, [`IN_FLIGHT`] batches at a time.
    pub fn new(db: PgPool) -> Self {
        Self::with_in_flight(db, IN_FLIGHT)
    }

    /// Point reads on `db`, at most `in_flight` (at least 1) batches at a time.
    pub fn with_in_flight(db: PgPool, in_flight: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                in_flight: in_flight.max(1),
                queue: OnceLock::new(),
                stats: Arc::default(),
            }),
        }
    }

    /// The row with this id, `None` if there is none; read in the next batch.
    pub async fn load(&self, id: Id) -> Result<Option<R::Row>> {
        let (reply, answer) = oneshot::channel();
        let deadline = Deadline::current();
        self.inner.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self
            .queue()
            .send(Waiter {
                id,
                deadline,
                reply,
            })
            .is_err()
        {
            self.inner.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(anyhow::anyhow!("the {} batcher has stopped", R::NAME).into());
        }
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.instant(), answer)
                .await
                .map_err(|_elapsed| Error::deadline_exceeded())?,
            None => answer.await,
        };
        answer
            .map_err(|_| anyhow::anyhow!("a {} batch ended without an answer", R::NAME))?
            .map_err(|e| e.duplicate())
    }

    /// Reads queued and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.inner.stats.queued.load(Ordering::Relaxed)
    }

    /// Batches run so far (each one query, with its retries).
    pub fn batches(&self) -> u64 {
        self.inner.stats.batches.load(Ordering::Relaxed)
    }

    fn queue(&self) -> &mpsc::UnboundedSender<Waiter<R::Row>> {
        self.inner.queue.get_or_init(|| {
            let (queue, waiting) = mpsc::unbounded_channel();
            tokio::spawn(batcher::<R>(
                self.inner.db.clone(),
                waiting,
                self.inner.stats.clone(),
                self.inner.in_flight,
            ));
            queue
        })
    }
}

/// Drains the queue into batches while a slot is free; ends when every
/// handle is gone and the running batches have answered.
async fn batcher<R: PointRead>(
    db: PgPool,
    mut waiting: mpsc::UnboundedReceiver<Waiter<R::Row>>,
    stats: Arc<Stats>,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut running = JoinSet::new();
    // Resolved once (after the recorder is installed: handles taken before
    // go nowhere); a batch only bumps them.
    crate::metrics::handle();
    let series = BatchSeries {
        batches: metrics::counter!("point_read_batches_total", "entity" => R::NAME),
        sizes: metrics::histogram!("point_read_batch_size", "entity" => R::NAME),
    };
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        while running.try_join_next().is_some() {}
        let mut batch = Vec::new();
        if waiting.recv_many(&mut batch, MAX_BATCH).await == 0 {
            break;
        }
        stats.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let db = db.clone();
        let series = series.clone();
        running.spawn(async move {
            run_batch::<R>(&db, batch, &series).await;
            drop(slot);
        });
    }
    while running.join_next().await.is_some() {}
}

/// One entity's batch metrics.
#[derive(Clone)]
struct BatchSeries {
    batches: metrics::Counter,
    sizes: metrics::Histogram,
}

async fn run_batch<R: PointRead>(
    db: &PgPool,
    mut waiters: Vec<Waiter<R::Row>>,
    series: &BatchSeries,
) {
    waiters.retain(|w| !w.reply.is_closed());
    if waiters.is_empty() {
        return;
    }
    let deadline = longest(waiters.iter().map(|w| w.deadline));
    let mut ids: Vec<Id> = waiters.iter().map(|w| w.id).collect();
    ids.sort_unstable();
    ids.dedup();
    series.batches.increment(1);
    series.sizes.record(ids.len() as f64);
    let span = tracing::debug_span!("point_read_batch", entity = R::NAME, batch_size = ids.len());

    let load = find_by_id::<R>(db, &ids);
    // Dropped once no one waits for it any more. In the deadline's scope,
    // its read connection is then closed rather than returned with the
    // statement still running (see `store::postgres::Conn`); outside a call
    // it goes back as any read's does.
    let load = async {
        match deadline {
            Some(deadline) => deadline.scope(load).await,
            None => load.await,
        }
    };
    let everyone_left =
        futures_util::future::join_all(waiters.iter_mut().map(|w| w.reply.closed()));
    let found = tokio::select! {
        found = load.instrument(span) => found,
        _ = everyone_left => return,
    };

    match found {
        Ok(by_id) => {
            for w in waiters {
                let _ = w.reply.send(Ok(by_id.get(&w.id).cloned()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, entity = R::NAME, batch_size = ids.len(), "point read batch failed");
            let e = Arc::new(e);
            for w in waiters {
                let _ = w.reply.send(Err(e.clone()));
            }
        }
    }
}

/// The latest of the waiters' deadlines; `None` if one has none (it is not
/// in a call, and the connection's default bounds its read).
fn longest(deadlines: impl Iterator<Item = Option<Deadline>>) -> Option<Deadline> {
    let mut latest: Option<Deadline> = None;
    for deadline in deadlines {
        let deadline = deadline?;
        latest = Some(latest.map_or(deadline, |l| l.max(deadline)));
    }
    latest
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_batch_runs_under_the_longest_deadline_of_its_waiters() {
        let short = Deadline::after(Duration::from_millis(100));
        let long = Deadline::after(Duration::from_secs(5));
        assert_eq!(
            longest([Some(short), Some(long), Some(short)].into_iter()),
            Some(long)
        );
        assert_eq!(longest([Some(short)].into_iter()), Some(short));
    }

    #[test]
    fn a_waiter_without_a_deadline_leaves_the_batch_to_the_connections_default() {
        let long = Deadline::after(Duration::from_secs(5));
        assert_eq!(longest([Some(long), None].into_iter()), None);
        assert_eq!(longest([None, Some(long)].into_iter()), None);
    }
}
