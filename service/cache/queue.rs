//! The invalidation queue: writes never fail because of Redis.
//!
//! An invalidation that cannot reach Redis is queued here (bounded: on
//! overflow the queued keys are dropped and the whole namespace is flushed
//! instead) and replayed before this process uses Redis again, and by the
//! background probe, so a Redis that comes back with its old data serves
//! nothing stale to this replica. Family invalidations are kept apart: a
//! flush deletes values but keeps generations, so a family's bump must still
//! be replayed.

use std::{
    collections::HashSet,
    sync::{Mutex, MutexGuard},
};

use super::{Entity, Family};

/// How many entity keys may wait before the queue overflows.
pub(super) const MAX_PENDING: usize = 10_000;

#[derive(Default)]
struct Pending {
    keys: HashSet<(Entity, i64)>,
    families: HashSet<Family>,
    overflowed: bool,
}

/// What a replay has to apply.
#[derive(Debug, PartialEq)]
pub(super) struct Replay {
    pub(super) entries: Vec<(Entity, i64)>,
    pub(super) families: Vec<Family>,
    /// The queue overflowed: flush every value instead of the entries.
    pub(super) flush: bool,
}

pub(super) struct Queue {
    pending: Mutex<Pending>,
    capacity: usize,
}

impl Queue {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            pending: Mutex::default(),
            capacity,
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues entity invalidations; past capacity, asks for a flush instead.
    pub(super) fn push(&self, entries: &[(Entity, i64)]) {
        let mut pending = self.pending();
        if pending.keys.len() + entries.len() > self.capacity {
            pending.overflowed = true;
            pending.keys.clear();
        } else if !pending.overflowed {
            pending.keys.extend(entries.iter().copied());
        }
        tracing::warn!(
            queued = pending.keys.len(),
            overflowed = pending.overflowed,
            "cache invalidation queued until Redis answers"
        );
    }

    pub(super) fn push_family(&self, family: Family) {
        self.pending().families.insert(family);
        tracing::warn!(
            family = family.name(),
            "cache invalidation queued until Redis answers"
        );
    }

    /// What is queued now; `None` when nothing is.
    pub(super) fn to_replay(&self) -> Option<Replay> {
        let pending = self.pending();
        if pending.keys.is_empty() && pending.families.is_empty() && !pending.overflowed {
            return None;
        }
        Some(Replay {
            entries: pending.keys.iter().copied().collect(),
            families: pending.families.iter().copied().collect(),
            flush: pending.overflowed,
        })
    }

    /// Removes what `replay` applied; what was queued meanwhile stays.
    pub(super) fn replayed(&self, replay: &Replay) {
        let mut pending = self.pending();
        for entry in &replay.entries {
            pending.keys.remove(entry);
        }
        for family in &replay.families {
            pending.families.remove(family);
        }
        if replay.flush {
            pending.overflowed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(ids: std::ops::Range<i64>) -> Vec<(Entity, i64)> {
        ids.map(|id| (Entity::User, id)).collect()
    }

    /// The replay a test expects.
    fn expected(entries: Vec<(Entity, i64)>, families: Vec<Family>, flush: bool) -> Replay {
        Replay {
            entries,
            families,
            flush,
        }
    }

    /// What a queue of `capacity` has to replay after one push of each of
    /// `pushes`, its entries sorted.
    fn replay_after(capacity: usize, pushes: &[std::ops::Range<i64>]) -> Replay {
        let queue = Queue::new(capacity);
        for ids in pushes {
            queue.push(&users(ids.clone()));
        }
        let mut replay = queue.to_replay().unwrap();
        replay.entries.sort_by_key(|(_, id)| *id);
        replay
    }

    #[test]
    fn an_empty_queue_has_nothing_to_replay() {
        assert_eq!(Queue::new(10).to_replay(), None);
    }

    #[test]
    fn entries_queue_up_to_capacity_without_duplicates() {
        assert_eq!(
            replay_after(4, &[0..2, 1..3]),
            expected(users(0..3), vec![], false)
        );
    }

    #[test]
    fn an_overflow_drops_the_entries_and_asks_for_a_flush() {
        assert_eq!(
            replay_after(4, &[0..3, 3..5]),
            expected(vec![], vec![], true)
        );
    }

    #[test]
    fn once_overflowed_further_entries_wait_for_the_flush_instead() {
        assert_eq!(replay_after(4, &[0..5, 10..11]).entries, vec![]);
    }

    #[test]
    fn families_survive_an_overflow() {
        let queue = Queue::new(1);
        queue.push_family(Family::Search);
        queue.push(&users(0..2));
        let replay = queue.to_replay().unwrap();
        assert!(replay.flush);
        assert_eq!(replay.families, [Family::Search]);
    }

    #[test]
    fn a_replay_removes_only_what_it_applied() {
        let queue = Queue::new(10);
        queue.push(&users(0..2));
        queue.push_family(Family::Search);
        let replay = queue.to_replay().unwrap();
        queue.push(&users(5..6));
        queue.push_family(Family::Analytics);
        queue.replayed(&replay);
        assert_eq!(
            queue.to_replay().unwrap(),
            expected(users(5..6), vec![Family::Analytics], false)
        );
    }

    #[test]
    fn a_replayed_flush_ends_the_overflow() {
        let queue = Queue::new(1);
        queue.push(&users(0..2));
        queue.replayed(&queue.to_replay().unwrap());
        assert_eq!(queue.to_replay(), None);
        queue.push(&users(7..8));
        assert_eq!(queue.to_replay().unwrap().entries, users(7..8));
    }
}
