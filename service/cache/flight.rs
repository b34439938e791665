//! Single flight: concurrent misses on one key in this process share one
//! load. (Across replicas a short Redis lock does the same job; see
//! `Inner::load_once`.)
//!
//! A write forgets the key's flight, so readers that start after the write
//! begin a new load rather than join one that may have read the old row.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::OnceCell;

/// A loaded entry, shared by the callers of one flight: the stored form, so
/// that one map serves every cached type.
#[derive(Clone)]
pub(super) enum Fetched {
    Found(Arc<Vec<u8>>),
    Missing,
}

/// The flights in progress, by key.
#[derive(Default)]
pub(super) struct Flights(Mutex<HashMap<String, Arc<OnceCell<Fetched>>>>);

impl Flights {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<OnceCell<Fetched>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight for `key`, or leads a new one running `load`. A
    /// failed load is not shared: the next caller in line loads again.
    pub(super) async fn run<E, F, Fut>(&self, key: &str, load: F) -> Result<Fetched, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
    {
        let flight = self.map().entry(key.to_owned()).or_default().clone();
        let fetched = flight.get_or_try_init(load).await.cloned();
        let mut flights = self.map();
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(key);
        }
        fetched
    }

    /// A write makes the current flight's answer old: later readers start a new one.
    pub(super) fn forget(&self, key: &str) {
        self.map().remove(key);
    }

    /// [`forget`](Self::forget) for every key under `prefix`.
    pub(super) fn forget_prefix(&self, prefix: &str) {
        self.map().retain(|key, _| !key.starts_with(prefix));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Notify;

    use super::*;

    fn found(bytes: &[u8]) -> Fetched {
        Fetched::Found(Arc::new(bytes.to_vec()))
    }

    fn bytes(fetched: Fetched) -> Vec<u8> {
        match fetched {
            Fetched::Found(bytes) => bytes.to_vec(),
            Fetched::Missing => panic!("missing"),
        }
    }

    #[tokio::test]
    async fn concurrent_callers_of_one_key_share_one_load() {
        let flights = Flights::default();
        let loads = AtomicUsize::new(0);
        let release = Notify::new();
        let (loads, release) = (&loads, &release);
        let load = move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            release.notified().await;
            Ok::<_, ()>(found(b"once"))
        };
        let (a, b, ()) = tokio::join!(flights.run("k", load), flights.run("k", load), async {
            tokio::task::yield_now().await;
            release.notify_one();
        });
        assert_eq!(bytes(a.unwrap()), b"once");
        assert_eq!(bytes(b.unwrap()), b"once");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(flights.map().is_empty(), "the flight ends with its load");
    }

    #[tokio::test]
    async fn a_failed_load_is_not_shared_with_the_next_caller() {
        let flights = Flights::default();
        let failed = flights
            .run("k", || async { Err::<Fetched, _>("down") })
            .await;
        assert!(failed.is_err());
        let loaded = flights
            .run("k", || async { Ok::<_, ()>(found(b"v")) })
            .await;
        assert_eq!(bytes(loaded.unwrap()), b"v");
    }

    #[test]
    fn forgetting_a_prefix_forgets_only_the_keys_under_it() {
        let flights = Flights::default();
        for key in ["dg:v1:search:a", "dg:v1:search:b", "dg:v1:user:1"] {
            flights.map().insert(key.to_owned(), Arc::default());
        }
        flights.forget_prefix("dg:v1:search:");
        assert_eq!(flights.map().keys().collect::<Vec<_>>(), ["dg:v1:user:1"]);
        flights.forget("dg:v1:user:1");
        assert!(flights.map().is_empty());
    }
}
