//! A map of async locks by key, shared by the node plugin (one lock per volume) and the backends
//! (one per volume and per snapshot). A lock lives as long as someone holds or waits for it: the
//! map keeps only a weak reference, and entries nobody holds are pruned as the map grows, so
//! random keys cannot grow it without bound. Owns nothing but the map; what a lock means is the
//! caller's.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

/// The map is pruned when it reaches twice the entries kept at the last pruning, and never
/// below this.
pub const MIN_PRUNE_AT: usize = 64;

/// Locks of type `L` (a `tokio::sync::Mutex<()>` or `RwLock<()>`) by key.
pub struct KeyedLocks<K, L> {
    inner: Mutex<Inner<K, L>>,
}

struct Inner<K, L> {
    locks: HashMap<K, Weak<L>>,
    prune_at: usize,
}

impl<K, L> Default for KeyedLocks<K, L> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                locks: HashMap::new(),
                prune_at: 0,
            }),
        }
    }
}

impl<K: Clone + Eq + Hash, L: Default> KeyedLocks<K, L> {
    /// The key's lock, made if nobody holds one. Lock it outside: the map's own mutex is held
    /// only while looking up.
    pub fn get(&self, key: &K) -> Arc<L> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = inner.locks.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(L::default());
        inner.locks.insert(key.clone(), Arc::downgrade(&lock));
        if inner.locks.len() >= inner.prune_at.max(MIN_PRUNE_AT) {
            inner.locks.retain(|_, w| w.strong_count() > 0);
            inner.prune_at = 2 * inner.locks.len();
        }
        lock
    }

    /// Keys with an entry (held, or not yet pruned).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .locks
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Locks = KeyedLocks<u32, tokio::sync::Mutex<()>>;

    #[test]
    fn a_held_key_gives_the_same_lock_a_released_one_a_new_lock() {
        let locks = Locks::default();
        let held = locks.get(&1);
        assert!(Arc::ptr_eq(&held, &locks.get(&1)));
        let other = locks.get(&2);
        assert!(!Arc::ptr_eq(&held, &other));
        let weak = Arc::downgrade(&other);
        drop(other);
        assert!(
            weak.upgrade().is_none(),
            "the map does not keep a lock alive"
        );
    }

    #[test]
    fn released_entries_are_pruned_held_ones_kept() {
        let locks = Locks::default();
        let held = locks.get(&0);
        for key in 1..10_000 {
            drop(locks.get(&key));
        }
        assert!(
            locks.len() <= 2 * MIN_PRUNE_AT,
            "{} entries kept",
            locks.len()
        );
        assert!(
            Arc::ptr_eq(&held, &locks.get(&0)),
            "a held lock survives pruning"
        );
    }
}
