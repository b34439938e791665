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

use std::ops::{Deref, DerefMut};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::{
    cache::{Cache, Entity, Family},
    error::Result,
    model::{Id, audit::Actor},
    store,
};

/// Begins write transactions; cheap to clone.
#[derive(Clone)]
pub struct Writes {
    db: PgPool,
    cache: Cache,
}

impl Writes {
    pub fn new(db: PgPool, cache: Cache) -> Self {
        Self { db, cache }
    }

    /// A write transaction on behalf of `actor`.
    pub async fn begin(&self, actor: &Actor) -> Result<WriteTx> {
        Ok(WriteTx {
            tx: store::audit::begin(&self.db, actor).await?,
            cache: self.cache.clone(),
            entities: Vec::new(),
            families: Vec::new(),
        })
    }
}

/// A transaction that invalidates what it touched once it has committed.
/// It dereferences to the connection the store functions take.
pub struct WriteTx {
    tx: Transaction<'static, Postgres>,
    cache: Cache,
    entities: Vec<(Entity, i64)>,
    families: Vec<Family>,
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

    /// Every cached result of `family` is stale once this commits.
    pub fn touches_family(&mut self, family: Family) {
        if !self.families.contains(&family) {
            self.families.push(family);
        }
    }

    /// Commits, then invalidates what the write touched. Invalidation never
    /// fails the write: when Redis is unreachable it is queued and replayed
    /// before Redis is used again.
    pub async fn commit(self) -> Result<()> {
        let Self {
            tx,
            cache,
            entities,
            families,
        } = self;
        tx.commit().await?;
        cache.invalidate(&entities).await;
        for family in families {
            cache.invalidate_family(family).await;
        }
        Ok(())
    }
}

impl Deref for WriteTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}
