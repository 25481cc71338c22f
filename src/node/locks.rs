//! One async lock per volume id, so the node's RPCs for one volume run one at a time while
//! different volumes proceed in parallel. Entries of volumes nobody holds are pruned as the map
//! grows, so random ids cannot grow it without bound.

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::ids::VolumeId;
use crate::keyed::KeyedLocks;

#[derive(Default)]
pub struct VolumeLocks {
    locks: KeyedLocks<VolumeId, Mutex<()>>,
}

impl VolumeLocks {
    /// Waits for the volume's turn; the guard releases it. Ids that differ only by letter case
    /// share one turn: they name one RDS volume (its NQN is the id in lowercase), and the
    /// node refuses the second spelling (`plugin`'s `load`), which only holds if the two never
    /// run at once.
    pub async fn lock(&self, volume: &VolumeId) -> OwnedMutexGuard<()> {
        let folded = VolumeId::try_from(volume.as_str().to_ascii_lowercase().as_str())
            .unwrap_or_else(|_| volume.clone());
        self.locks.get(&folded).lock_owned().await
    }

    /// Volumes with an entry (held, or not yet pruned).
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

    /// `PVC-1` waits while `pvc-1` holds its turn: removing the case folding in `lock` lets
    /// the second spelling run at once.
    #[tokio::test]
    async fn ids_differing_only_by_case_share_one_turn() {
        let locks = VolumeLocks::default();
        let held = locks.lock(&vol("pvc-1")).await;
        let upper = vol("PVC-1");
        let mut other = std::pin::pin!(locks.lock(&upper));
        assert!(
            futures::poll!(other.as_mut()).is_pending(),
            "the other spelling waits"
        );
        drop(held);
        let _turn = other.await;
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
