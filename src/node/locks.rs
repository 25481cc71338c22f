//! One async lock per volume id, so the node's RPCs for one volume run one at a time while
//! different volumes proceed in parallel. Entries of volumes nobody holds are pruned as the map
//! grows, so random ids cannot grow it without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

use crate::ids::VolumeId;

const MIN_PRUNE_AT: usize = 64;

#[derive(Default)]
pub struct VolumeLocks {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    locks: HashMap<VolumeId, Weak<tokio::sync::Mutex<()>>>,
    prune_at: usize,
}

impl VolumeLocks {
    /// Waits for the volume's turn; the guard releases it.
    pub async fn lock(&self, volume: &VolumeId) -> OwnedMutexGuard<()> {
        let lock = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match inner.locks.get(volume).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    inner.locks.insert(volume.clone(), Arc::downgrade(&lock));
                    if inner.locks.len() >= inner.prune_at.max(MIN_PRUNE_AT) {
                        inner.locks.retain(|_, w| w.strong_count() > 0);
                        inner.prune_at = 2 * inner.locks.len();
                    }
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// Volumes with an entry (held, or not yet pruned).
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
    use std::time::Duration;

    fn vol(id: &str) -> VolumeId {
        VolumeId::try_from(id).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn one_volume_waits_another_does_not() {
        let locks = Arc::new(VolumeLocks::default());
        let held = locks.lock(&vol("a")).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for id in ["a", "b"] {
            let locks = locks.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _g = locks.lock(&vol(id)).await;
                tx.send(id).unwrap();
            });
        }
        assert_eq!(rx.recv().await, Some("b"), "another volume is not blocked");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            rx.try_recv().is_err(),
            "the same volume waits for the holder"
        );
        drop(held);
        assert_eq!(rx.recv().await, Some("a"));
    }

    #[tokio::test]
    async fn released_entries_are_pruned() {
        let locks = VolumeLocks::default();
        for i in 0..10_000 {
            drop(locks.lock(&vol(&format!("v{i}"))).await);
        }
        assert!(
            locks.len() <= 2 * MIN_PRUNE_AT,
            "{} entries kept",
            locks.len()
        );
    }
}
