//! Which arbiter a new volume actor starts on.
//!
//! The arbiter its caller runs on, when the caller runs on one of the supervisor's arbiters (the
//! gRPC server serves each connection on one of them, see `crate::grpc::server`): the caller's
//! messages then reach the actor, and its answers the caller, without waking another thread.
//! Otherwise (seeding, a reconciler on the runtime's workers, a caller on another thread) the
//! arbiter the volume id hashes to, which spreads volumes evenly.
//!
//! Placement decides only which thread runs an actor, never which actor serves a volume: that is
//! the supervisor's map, one actor per volume wherever it runs.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_rt::ArbiterHandle;

use crate::ids::VolumeId;

/// Distinguishes the arbiter sets of several supervisors in one process (tests, benches).
static NEXT_SET: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The arbiter set and slot of the arbiter this thread runs, if it is one.
    static HOME: Cell<Option<Caller>> = const { Cell::new(None) };
}

/// Where a caller runs: slot `slot` of the arbiter set `set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    set: u64,
    slot: usize,
}

/// The arbiter this thread runs, if it belongs to an [`Arbiters`] set.
pub fn caller() -> Option<Caller> {
    HOME.with(Cell::get)
}

/// A supervisor's actor arbiters. Empty: actors run on the supervisor's own arbiter.
pub struct Arbiters {
    set: u64,
    handles: Vec<ArbiterHandle>,
    hasher: RandomState,
}

impl Arbiters {
    /// Marks each arbiter's thread as slot `i` of this set. The mark is set by a task queued on
    /// the arbiter, so it is in place before anything queued there after this returns.
    pub fn new(handles: Vec<ArbiterHandle>) -> Self {
        let set = NEXT_SET.fetch_add(1, Ordering::Relaxed);
        for (slot, handle) in handles.iter().enumerate() {
            let home = Caller { set, slot };
            handle.spawn_fn(move || HOME.with(|h| h.set(Some(home))));
        }
        Self {
            set,
            handles,
            hasher: RandomState::new(),
        }
    }

    /// Slot `i`'s arbiter.
    pub fn handle(&self, slot: usize) -> Option<&ArbiterHandle> {
        self.handles.get(slot)
    }

    /// The slot a new actor for `volume` starts on, when `caller` asks for it; `None` when there
    /// are no arbiters.
    pub fn slot_for(&self, volume: &VolumeId, caller: Option<Caller>) -> Option<usize> {
        if self.handles.is_empty() {
            return None;
        }
        match caller {
            Some(c) if c.set == self.set && c.slot < self.handles.len() => Some(c.slot),
            _ => Some((self.hasher.hash_one(volume) % self.handles.len() as u64) as usize),
        }
    }

    /// The arbiter a new actor for `volume` starts on; see [`Arbiters::slot_for`].
    pub fn choose(&self, volume: &VolumeId, caller: Option<Caller>) -> Option<&ArbiterHandle> {
        self.slot_for(volume, caller)
            .and_then(|slot| self.handle(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(i: usize) -> VolumeId {
        VolumeId::try_from(format!("pvc-{i}").as_str()).expect("a valid volume id")
    }

    /// Marks are set on the arbiter threads and nowhere else.
    #[test]
    fn each_arbiter_knows_its_slot_and_other_threads_none() {
        actix_rt::System::new().block_on(async {
            let threads: Vec<_> = (0..3).map(|_| actix_rt::Arbiter::new()).collect();
            let arbiters = Arbiters::new(threads.iter().map(|a| a.handle()).collect());
            for slot in 0..3 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                assert!(arbiters
                    .handle(slot)
                    .expect("a slot")
                    .spawn(async move { tx.send(caller()).expect("the test waits") }));
                let seen = rx.await.expect("the arbiter answers");
                assert_eq!(
                    seen,
                    Some(Caller {
                        set: arbiters.set,
                        slot
                    })
                );
            }
            assert_eq!(
                caller(),
                None,
                "the test's own thread is no arbiter of the set"
            );
            for a in threads {
                a.stop();
            }
        });
    }

    #[test]
    fn a_caller_on_an_arbiter_of_the_set_gets_its_own_arbiter() {
        let arbiters = Arbiters {
            set: 7,
            handles: Vec::new(),
            hasher: RandomState::new(),
        };
        assert_eq!(
            arbiters.slot_for(&volume(0), Some(Caller { set: 7, slot: 0 })),
            None,
            "no arbiters: the supervisor's own"
        );
        let system = actix_rt::System::new();
        let threads: Vec<_> =
            system.block_on(async { (0..4).map(|_| actix_rt::Arbiter::new()).collect() });
        let arbiters = Arbiters::new(
            threads
                .iter()
                .map(|a: &actix_rt::Arbiter| a.handle())
                .collect(),
        );
        for v in 0..64 {
            for slot in 0..4 {
                let caller = Caller {
                    set: arbiters.set,
                    slot,
                };
                assert_eq!(arbiters.slot_for(&volume(v), Some(caller)), Some(slot));
            }
        }
        // Another set's arbiter, a slot out of range and no arbiter at all: the volume's hash,
        // the same for every such caller, and spread over the slots.
        let mut used = std::collections::BTreeSet::new();
        for v in 0..64 {
            let hashed = arbiters.slot_for(&volume(v), None);
            let foreign = Caller {
                set: arbiters.set + 1,
                slot: 1,
            };
            let beyond = Caller {
                set: arbiters.set,
                slot: 4,
            };
            assert_eq!(arbiters.slot_for(&volume(v), Some(foreign)), hashed);
            assert_eq!(arbiters.slot_for(&volume(v), Some(beyond)), hashed);
            used.extend(hashed);
        }
        assert_eq!(
            used.len(),
            4,
            "64 volumes hash onto every one of 4 arbiters"
        );
        for a in threads {
            a.stop();
        }
    }
}
