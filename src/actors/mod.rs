//! Attachment state: one [`volume::VolumeActor`] per volume owns it, the
//! [`supervisor::Supervisor`] starts, seeds and reaps them, and [`Router`] is how callers reach
//! a volume without ever touching its state.

pub mod messages;
pub mod placement;
pub mod state;
pub mod supervisor;
pub mod volume;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::backend::VolumeBackend;
use crate::ids::{NodeId, VolumeId};
use crate::kube::{AttachmentAuthority, ClusterSink, NodeDirectory};
use crate::metrics::Metrics;
use crate::Error;
use messages::{InTerm, Route, ShareAddresses, Traced};
use supervisor::Supervisor;
use volume::VolumeActor;

/// What every volume actor needs from the outside world.
pub struct VolumeDeps {
    pub backend: Arc<dyn VolumeBackend>,
    pub nodes: Arc<dyn NodeDirectory>,
    pub authority: Arc<dyn AttachmentAuthority>,
    pub sink: Arc<dyn ClusterSink>,
    pub metrics: Arc<Metrics>,
    pub grace_period: Duration,
    pub node_limit: NodeLimit,
}

/// How many volumes each node holds, against `--max-volumes-per-node` (0: no limit, and no
/// counting at all). A node gains a volume only through a publish that reserved it here first,
/// so two volumes racing for a node's last slot cannot both get it; it loses one whenever a
/// volume actor drops it as a holder. Seeding counts what the VolumeAttachments show.
#[derive(Debug, Default)]
pub struct NodeLimit {
    max: u64,
    held: Mutex<HashMap<NodeId, u64>>,
}

impl NodeLimit {
    pub fn new(max: u64) -> Self {
        Self {
            max,
            held: Mutex::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, u64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one of `node`'s slots, or refuses with `NodeFull` (RESOURCE_EXHAUSTED).
    pub fn reserve(&self, node: &NodeId) -> Result<(), Error> {
        let mut held = self.lock();
        let count = held.entry(node.clone()).or_insert(0);
        if *count >= self.max {
            return Err(Error::NodeFull {
                node: node.clone(),
                held: *count,
                max: self.max,
            });
        }
        *count += 1;
        Ok(())
    }

    /// Counts a holder found at seeding, even beyond the limit (that is reality).
    pub fn add(&self, node: &NodeId) {
        if self.enabled() {
            *self.lock().entry(node.clone()).or_insert(0) += 1;
        }
    }

    pub fn release(&self, node: &NodeId) {
        if !self.enabled() {
            return;
        }
        let mut held = self.lock();
        if let Some(count) = held.get_mut(node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(node);
            }
        }
    }

    /// Volumes `node` holds (0 when the limit is off).
    pub fn held(&self, node: &NodeId) -> u64 {
        self.lock().get(node).copied().unwrap_or(0)
    }
}

/// How long the [`Router`] waits for a volume actor's answer before DEADLINE_EXCEEDED.
pub const MAILBOX_TIMEOUT: Duration = Duration::from_secs(30);

/// The budget of one Publish: how long it may spend on the backend read of its volume (step 2,
/// on RDS a pool wait and a command), the Node existence check (step 2: a GET when the Node
/// projection misses), every live check of rules 5.1 and 5.2 on every holder, and the
/// first-lease-duration check of a holderless volume ("High availability"), all together.
///
/// It is a deadline counted from when the [`Router`] sent the Publish, so time spent queued
/// behind other messages of the same volume counts too, and never later than the caller's own
/// gRPC deadline. Past it, whatever is still waiting is abandoned and the Publish fails closed:
/// UNAVAILABLE, nothing changed, never a late OK; the external-attacher retries.
///
/// 8 s keeps every Publish answered below the external-attacher's default `--timeout` (15 s),
/// after which it would give up on the call and retry while the attach could still happen, and
/// well below [`MAILBOX_TIMEOUT`] (30 s), after which the Router answers DEADLINE_EXCEEDED for
/// an attach that may still happen. The margin is for the actor's own work.
pub const LIVE_CHECK_BUDGET: Duration = Duration::from_secs(8);
const _: () = assert!(
    LIVE_CHECK_BUDGET.as_secs() < 15 && LIVE_CHECK_BUDGET.as_secs() * 2 < MAILBOX_TIMEOUT.as_secs()
);

/// The answer for a message of a term this controller no longer (or not yet) serves. The
/// caller's client retries, with whichever controller serves now.
pub(crate) fn other_term() -> Error {
    Error::NotActive(
        "this call was admitted in another term of this controller; nothing changed, retry".into(),
    )
}

/// How many times a message is re-routed after finding its actor stopping.
const MAX_ROUTE_ATTEMPTS: usize = 16;

/// A router's remembered actor addresses, by volume.
pub type AddressCache = RwLock<HashMap<VolumeId, Addr<VolumeActor>>>;

/// Sends messages to volume actors. Remembers the address the supervisor gave for each volume,
/// so the supervisor is asked again only on first use or after an actor stopped. The supervisor
/// forgets a volume here when it reaps its actor, so the cache does not grow with every volume
/// ever touched; a reap that races a route can leave one stale entry, which the next message for
/// that volume replaces. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    supervisor: Addr<Supervisor>,
    mailbox_timeout: Duration,
    known: Arc<AddressCache>,
}

impl Router {
    pub fn new(supervisor: Addr<Supervisor>, mailbox_timeout: Duration) -> Self {
        let known: Arc<AddressCache> = Default::default();
        supervisor.do_send(ShareAddresses(Arc::downgrade(&known)));
        Self {
            supervisor,
            mailbox_timeout,
            known,
        }
    }

    /// How many volumes have a remembered address.
    pub fn remembered_len(&self) -> usize {
        self.known.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn remembered(&self, volume: &VolumeId) -> Option<Addr<VolumeActor>> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
    }

    async fn route(
        &self,
        volume: &VolumeId,
        term: Option<crate::role::Term>,
    ) -> Result<Addr<VolumeActor>, Error> {
        let route = Route {
            volume: volume.clone(),
            term,
            caller: placement::caller(),
        };
        let addr = self
            .supervisor
            .send(route)
            .await
            .map_err(|_| Error::Unavailable("the volume supervisor has stopped".into()))??;
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.clone(), addr.clone());
        Ok(addr)
    }

    pub fn supervisor(&self) -> &Addr<Supervisor> {
        &self.supervisor
    }

    /// Delivers `msg` to the volume's actor and returns its answer. A message that meets an
    /// actor being reaped (mailbox closed, or `Error::Retired`) is retried through the
    /// supervisor, which starts a fresh actor: it is never lost. The supervisor routes it only
    /// in the message's term. The caller's gRPC deadline, if its task has one, goes with it.
    /// Errors: `Unavailable` if the supervisor is gone or the volume is poisoned (its actor
    /// died; final, not retried), `NotActive` if the supervisor or the actor serves another term
    /// (final), `DeadlineExceeded` if the actor does not answer in time.
    pub async fn send<M, T>(&self, volume: &VolumeId, msg: M) -> Result<T, Error>
    where
        M: Message<Result = Result<T, Error>> + InTerm + Clone + Send + 'static,
        T: Send + 'static,
        VolumeActor: Handler<M> + Handler<Traced<M>>,
        <VolumeActor as Actor>::Context: ToEnvelope<VolumeActor, Traced<M>>,
    {
        let mut next = self.remembered(volume);
        let sent = tokio::time::Instant::now();
        let reply_by = crate::deadline::current();
        for _ in 0..MAX_ROUTE_ATTEMPTS {
            let addr = match next.take() {
                Some(addr) => addr,
                None => self.route(volume, msg.term()).await?,
            };
            let traced = Traced {
                msg: msg.clone(),
                span: tracing::Span::current(),
                sent,
                reply_by,
            };
            match addr.send(traced).timeout(self.mailbox_timeout).await {
                Ok(Err(Error::Retired)) | Err(MailboxError::Closed) => {}
                Ok(answer) => return answer,
                Err(MailboxError::Timeout) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "volume {volume} did not answer within {:?}",
                        self.mailbox_timeout
                    )))
                }
            }
        }
        Err(Error::Unavailable(format!(
            "volume {volume} actor kept stopping; retry"
        )))
    }
}

/// Tests: a volume's holders as [`messages::Describe`] shows them, in attach order (empty when
/// idle).
#[cfg(test)]
pub(crate) async fn holders_of(router: &Router, volume: &str) -> Vec<String> {
    let volume = VolumeId::try_from(volume).expect("a valid volume id");
    let view = router
        .send(&volume, messages::Describe)
        .await
        .expect("Describe answers");
    view.map_or_else(Vec::new, |view| {
        view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["node"].as_str().expect("node").to_string())
            .collect()
    })
}

#[cfg(test)]
mod actor_tests;

#[cfg(test)]
mod model_tests;
