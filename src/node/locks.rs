//! Who runs for a volume, and when: one changing call at a time per volume, each to the end in
//! a task of its own, whatever happens to the RPC that asked for it.
//!
//! Owns the per-volume locks and the calls in flight. A changing node call (stage, unstage,
//! publish, unpublish, expand) is spawned with [`VolumeLocks::run`]: the task takes the
//! volume's lock and keeps it until the call and every blocking job it started have returned
//! (a stuck mount keeps it too, see [`super::work::holding`]), so the undo of a failed call
//! always runs and a retry never overlaps the work it retries. A repeat of the same request
//! while it runs waits for it and gets its answer; a caller whose deadline
//! ([`crate::deadline`]) comes first is answered ABORTED "operation for volume X is already in
//! progress" (CSI's code for a pending operation) and the call runs on. A call answered
//! ABORTED while still waiting for the lock runs when its turn comes, as the kubelet's retry
//! would; the retry joins it.
//!
//! Entries of volumes nobody holds are pruned as the lock map grows, so random ids cannot
//! grow it without bound. Knows nothing of what the calls do.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};

use tokio::sync::{oneshot, watch, Mutex, OwnedMutexGuard};

use super::{plugin, NodeError};
use crate::ids::VolumeId;
use crate::keyed::KeyedLocks;

tokio::task_local! {
    /// The volume whose lock the current call's task holds.
    static HELD: VolumeId;
}

/// A turn on a volume: the lock, or nothing when the current call's task already holds it.
pub enum Turn {
    Own(#[allow(dead_code)] OwnedMutexGuard<()>),
    Held,
}

#[derive(Default)]
pub struct VolumeLocks {
    locks: KeyedLocks<VolumeId, Mutex<()>>,
    /// The changing calls in flight, by kind.
    pub calls: Calls,
}

/// The node's changing calls in flight, one registry per kind of request.
#[derive(Default)]
pub struct Calls {
    pub stage: InFlight<plugin::Stage, ()>,
    pub unstage: InFlight<plugin::Unstage, ()>,
    pub publish: InFlight<plugin::Publish, ()>,
    pub unpublish: InFlight<plugin::Unpublish, ()>,
    pub expand: InFlight<plugin::Expand, u64>,
}

impl VolumeLocks {
    /// Waits for the volume's turn; the guard releases it. Ids that differ only by letter case
    /// share one turn: they name one RDS volume (its NQN is the id in lowercase), and the
    /// node refuses the second spelling (`plugin`'s `load`), which only holds if the two never
    /// run at once. Inside a call started with [`Self::run`] for the volume the turn is
    /// already taken, and this returns at once.
    pub async fn lock(&self, volume: &VolumeId) -> Turn {
        let folded = fold(volume);
        if HELD.try_with(|held| *held == folded).unwrap_or(false) {
            return Turn::Held;
        }
        Turn::Own(self.locks.get(&folded).lock_owned().await)
    }

    /// Volumes with an entry (held, or not yet pruned).
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Runs `call` (made from `request` by `start`) in a task of its own that holds `volume`'s
    /// lock, or joins the identical request already in `calls`; returns its answer, or
    /// [`NodeError::Aborted`] when the caller's deadline comes first (the call runs on).
    pub async fn run<R, T, F>(
        &self,
        calls: &InFlight<R, T>,
        volume: &VolumeId,
        request: R,
        start: impl FnOnce(R) -> F,
    ) -> Result<T, NodeError>
    where
        R: PartialEq + Clone + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
        F: Future<Output = Result<T, NodeError>> + Send + 'static,
    {
        let aborted = || {
            NodeError::Aborted(format!(
                "operation for volume {volume} is already in progress"
            ))
        };
        let waiting = {
            let mut entries = calls.entries.lock().unwrap_or_else(|e| e.into_inner());
            match entries
                .iter()
                .find(|e| e.volume == *volume && e.request == request)
            {
                Some(running) => Waiting::Joined(running.done.clone()),
                None => {
                    let id = calls.next.fetch_add(1, Ordering::Relaxed);
                    let (done_tx, done) = watch::channel(None);
                    let (answer_tx, answer) = oneshot::channel();
                    entries.push(Entry {
                        id,
                        volume: volume.clone(),
                        request: request.clone(),
                        done,
                    });
                    let call = start(request);
                    let lock = self.locks.get(&fold(volume));
                    let (entries, volume) = (calls.entries.clone(), volume.clone());
                    // The RPC's span goes with the call, so its log lines keep the RPC's fields.
                    let span = tracing::Span::current();
                    let task = async move {
                        // Removes the entry even if the call panics, so a repeat runs anew
                        // rather than joining an answer that never comes.
                        let _registered = Registered {
                            entries: entries.clone(),
                            id,
                        };
                        let guard: super::work::Hold = Arc::new(lock.lock_owned().await);
                        let result = HELD
                            .scope(fold(&volume), super::work::holding(guard, call))
                            .await;
                        let joined = {
                            let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(i) = entries.iter().position(|e| e.id == id) {
                                drop(entries.swap_remove(i));
                            }
                            // Under the registry's lock: nobody can join any more.
                            done_tx.receiver_count() > 0
                        };
                        // Shared only when someone joined: the lone caller gets the error as is.
                        let result = if joined {
                            let shared = result.map_err(Arc::new);
                            done_tx.send_replace(Some(shared.clone()));
                            shared.map_err(NodeError::Joined)
                        } else {
                            result
                        };
                        // The caller may have gone: the answer is then nobody's.
                        answer_tx.send(result).ok();
                    };
                    tokio::spawn(tracing::Instrument::instrument(task, span));
                    Waiting::Started(answer)
                }
            }
        };
        let at = crate::deadline::current();
        let gone = || NodeError::Io {
            action: format!("a node operation for volume {volume}"),
            source: std::io::Error::other("it ended without an answer (a panic)"),
        };
        match waiting {
            Waiting::Started(answer) => match within(at, answer).await {
                None => Err(aborted()),
                Some(answer) => answer.map_err(|_| gone())?,
            },
            Waiting::Joined(mut done) => {
                let wait = async move {
                    done.wait_for(Option::is_some)
                        .await
                        .map(|v| v.clone().expect("waited for an answer"))
                };
                match within(at, wait).await {
                    None => Err(aborted()),
                    Some(Err(_)) => Err(gone()),
                    Some(Ok(answer)) => answer.map_err(NodeError::Joined),
                }
            }
        }
    }
}

/// The key of a volume's turn: its id in lowercase (see [`VolumeLocks::lock`]).
fn fold(volume: &VolumeId) -> VolumeId {
    VolumeId::try_from(volume.as_str().to_ascii_lowercase().as_str())
        .unwrap_or_else(|_| volume.clone())
}

/// `f`'s output, or `None` when the deadline `at` comes first.
async fn within<F: Future>(at: Option<tokio::time::Instant>, f: F) -> Option<F::Output> {
    match at {
        Some(at) => tokio::time::timeout_at(at, f).await.ok(),
        None => Some(f.await),
    }
}

/// How a caller waits: for the call it started, or for the identical one it joined.
enum Waiting<T> {
    Started(oneshot::Receiver<Result<T, NodeError>>),
    Joined(watch::Receiver<Option<Result<T, Arc<NodeError>>>>),
}

/// The calls of one kind (stage, publish, ...) in flight: request and answer types `R`, `T`.
pub struct InFlight<R, T> {
    entries: Arc<SyncMutex<Vec<Entry<R, T>>>>,
    next: AtomicU64,
}

impl<R, T> Default for InFlight<R, T> {
    fn default() -> Self {
        Self {
            entries: Arc::default(),
            next: AtomicU64::new(0),
        }
    }
}

/// A call's place in its registry, given up when the call's task ends however it ends.
struct Registered<R, T> {
    entries: Arc<SyncMutex<Vec<Entry<R, T>>>>,
    id: u64,
}

impl<R, T> Drop for Registered<R, T> {
    fn drop(&mut self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = entries.iter().position(|e| e.id == self.id) {
            entries.swap_remove(i);
        }
    }
}

struct Entry<R, T> {
    id: u64,
    volume: VolumeId,
    request: R,
    /// Where the answer goes for those who joined.
    done: watch::Receiver<Option<Result<T, Arc<NodeError>>>>,
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

    /// A repeat of the request in flight waits for it and gets its answer (here an error, with
    /// its code), and the work ran once; the same request after it finished runs anew. Catches
    /// a repeat that starts its own run, and an entry left in the registry after its call.
    #[tokio::test]
    async fn a_repeat_joins_the_call_in_flight_and_gets_its_answer() {
        let locks = Arc::new(VolumeLocks::default());
        let calls = Arc::new(InFlight::<u32, u32>::default());
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let call = {
            let (runs, gate) = (runs.clone(), gate.clone());
            move |_: u32| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                started_tx.send(()).unwrap();
                gate.acquire().await.unwrap().forget();
                Err::<u32, _>(NodeError::NotFound("volume v is gone".into()))
            }
        };
        let first = {
            let (locks, calls) = (locks.clone(), calls.clone());
            tokio::spawn(async move { locks.run(&calls, &vol("v"), 7, call).await })
        };
        started.await.unwrap();
        let v = vol("v");
        let repeat = locks.run(&calls, &v, 7, |_| async {
            unreachable!("a repeat joins; it runs nothing")
        });
        tokio::pin!(repeat);
        assert!(futures::poll!(&mut repeat).is_pending());
        gate.add_permits(1);
        let joined = repeat.await.unwrap_err();
        assert_eq!(joined.metric_label(), "not_found");
        assert_eq!(
            tonic::Status::from(joined).code(),
            tonic::Code::NotFound,
            "the joined answer keeps its code"
        );
        assert!(first.await.unwrap().is_err());
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let again = locks.run(&calls, &v, 7, |_| async { Ok(8) });
        assert_eq!(again.await.unwrap(), 8, "a finished call is not joined");
    }

    /// A lone caller gets its call's error as it is, not wrapped as a joined answer.
    #[tokio::test]
    async fn a_lone_caller_gets_the_error_itself() {
        let (locks, calls) = (VolumeLocks::default(), InFlight::<u32, ()>::default());
        let err = locks
            .run(&calls, &vol("v"), 1, |_| async {
                Err(NodeError::AlreadyExists("staged elsewhere".into()))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::AlreadyExists(_)), "{err:?}");
    }

    /// The call's task runs in the span of the RPC that started it, so the body's log lines
    /// keep `rpc` and `volume_id`. Catches the spawned task left without the caller's span.
    #[tokio::test]
    async fn the_call_runs_in_the_rpcs_span() {
        use tracing::Instrument;
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let (locks, calls) = (VolumeLocks::default(), InFlight::<u32, String>::default());
        let v = vol("v");
        let seen = locks
            .run(&calls, &v, 1, |_| async {
                let span = tracing::Span::current();
                Ok(span.metadata().map_or("none", |m| m.name()).to_string())
            })
            .instrument(tracing::info_span!("rpc_under_test"))
            .await
            .unwrap();
        assert_eq!(seen, "rpc_under_test");
    }

    /// A call that panics answers its caller with an error, and leaves no entry a repeat
    /// would join: the repeat runs anew. Catches an entry removed only on the normal path.
    #[tokio::test]
    async fn a_call_that_panics_is_not_joined_by_its_repeat() {
        let (locks, calls) = (VolumeLocks::default(), InFlight::<u32, u32>::default());
        let v = vol("v");
        let err = locks
            .run(&calls, &v, 1, |_| async { panic!("a bug in the call") })
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::Io { .. }), "{err:?}");
        let again = locks.run(&calls, &v, 1, |_| async { Ok(2) }).await;
        assert_eq!(again.unwrap(), 2);
    }
}
