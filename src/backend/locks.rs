//! Per-volume and per-snapshot locks of one backend, so that a long copy (a snapshot, a
//! restore, a clone) and a change of what it copies from or to take turns, while unrelated
//! volumes and snapshots proceed in parallel.
//!
//! Reading a volume or snapshot (copying from it) takes its lock shared; changing it (create,
//! expand, delete) takes it exclusively. So a snapshot being restored from is deleted only
//! once the restores are done, a volume is not grown or deleted in the middle of its snapshot,
//! and two creates of one id never interleave. Locks are taken in one global order, so two
//! operations that each need two locks cannot deadlock. Entries nobody holds are pruned as the
//! map grows.

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::ids::{SnapshotId, VolumeId};
use crate::keyed::KeyedLocks;

/// What a lock guards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Volume(VolumeId),
    Snapshot(SnapshotId),
}

/// How it is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Read from (copied): others may read too.
    Shared,
    /// Created, changed or deleted: alone.
    Exclusive,
}

#[derive(Default)]
pub struct Locks {
    locks: KeyedLocks<Key, RwLock<()>>,
}

/// Held locks; dropping it releases them. Move it into the blocking task doing the I/O, so
/// they are released when the I/O is over even if the caller stopped waiting.
pub struct Held(#[allow(dead_code)] Vec<Guard>);

enum Guard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

impl Locks {
    /// Waits for every lock in `wanted` (a key named twice is held exclusively if either asks
    /// for that), taking them in key order.
    pub async fn acquire(&self, wanted: impl IntoIterator<Item = (Key, Mode)>) -> Held {
        let mut wanted: Vec<(Key, Mode)> = wanted.into_iter().collect();
        // Exclusive sorts after Shared: keep the last of each key.
        wanted.sort();
        wanted.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                earlier.1 = earlier.1.max(later.1);
                true
            } else {
                false
            }
        });
        let mut held = Vec::with_capacity(wanted.len());
        for (key, mode) in wanted {
            let lock = self.locks.get(&key);
            held.push(match mode {
                Mode::Shared => Guard::Shared(lock.read_owned().await),
                Mode::Exclusive => Guard::Exclusive(lock.write_owned().await),
            });
        }
        Held(held)
    }

    /// Keys with an entry (held, or not yet pruned).
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyed::MIN_PRUNE_AT;
    use std::sync::Arc;
    use std::time::Duration;

    fn vol(id: &str) -> Key {
        Key::Volume(VolumeId::try_from(id).unwrap())
    }

    fn snap(id: &str) -> Key {
        Key::Snapshot(SnapshotId::try_from(id).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn readers_share_a_writer_waits_for_them() {
        let locks = Arc::new(Locks::default());
        let r1 = locks.acquire([(snap("s"), Mode::Shared)]).await;
        let _r2 = locks.acquire([(snap("s"), Mode::Shared)]).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn({
            let locks = locks.clone();
            async move {
                let _w = locks.acquire([(snap("s"), Mode::Exclusive)]).await;
                tx.send(()).unwrap();
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rx.try_recv().is_err(), "a delete waits for the restores");
        drop(r1);
        drop(_r2);
        writer.await.unwrap();
        assert!(rx.try_recv().is_ok());
        // Another key is never blocked.
        let _w = locks.acquire([(snap("s"), Mode::Exclusive)]).await;
        let _other = locks.acquire([(snap("t"), Mode::Exclusive)]).await;
    }

    #[tokio::test(start_paused = true)]
    async fn crossed_pairs_do_not_deadlock() {
        let locks = Arc::new(Locks::default());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let locks = locks.clone();
            tasks.push(tokio::spawn(async move {
                let (a, b) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
                let _h = locks
                    .acquire([(vol(a), Mode::Exclusive), (vol(b), Mode::Shared)])
                    .await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // A key named twice is one exclusive lock, not a self-deadlock.
        let _h = locks
            .acquire([(vol("a"), Mode::Shared), (vol("a"), Mode::Exclusive)])
            .await;
    }

    #[tokio::test]
    async fn released_entries_are_pruned() {
        let locks = Locks::default();
        for i in 0..10_000 {
            drop(
                locks
                    .acquire([(vol(&format!("v{i}")), Mode::Exclusive)])
                    .await,
            );
        }
        assert!(
            locks.len() <= 2 * MIN_PRUNE_AT,
            "{} entries kept",
            locks.len()
        );
    }
}
