//! Coalesced lookups of volume disks: while one lookup (`/disk print detail where slot=…`)
//! waits for an SSH session, the lookups that arrive join it, and when the session comes one
//! command answers them all, each member taking its own disk from it: the lookup itself if it
//! is still alone; up to [`MAX_SELECTED`] slots as one alternation
//! (`/disk print detail where slot~"a|b|…"`: RouterOS's console `~` takes POSIX regular
//! expressions, bar `{}` bounds and empty `()`, per its Regular Expressions manual); more as
//! the volume listing the driver already sends (`/disk print detail where slot~"pvc"`, every
//! disk whose slot has `pvc` in it, which is every volume slot).
//!
//! A batch forms only while its leader waits for a session: with a session free, a lookup is
//! sent at once, as itself. Reads and writes wait for sessions in one queue, in order.
//!
//! Owns the open batch and who is in it; running the command is the caller's (the backend's,
//! through [`super::ssh::SshPool::run_chosen`]). The rules:
//! - a lookup joins only a batch whose command is not sent yet: the batch is closed the moment
//!   its session is had, before its command is chosen, so every answer was read after its
//!   lookup arrived, never staler than a command of its own;
//! - only lookups of a slot the listing matches join (`~"pvc"` is RouterOS's regular
//!   expression match, case-sensitive): any other slot is looked up on its own;
//! - writes never pass through here;
//! - a failed command fails every member with the same error;
//! - a member whose leader is dropped (its caller's deadline passed) is told so and looks up
//!   again; each member is bounded by its own caller's deadline.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::command::{Listing, RosCommand};
use super::parse::Disk;
use super::values::Slot;
use crate::backend::BackendError;

/// What a member gets: its disk (or none), or the error every member of its batch gets.
pub(super) type Answer = Result<Option<Disk>, BackendError>;

/// The most slots one alternation names (about 2.6 KB of command line for volume ids); a
/// bigger batch is answered by the whole volume listing.
pub(super) const MAX_SELECTED: usize = 64;

/// The substring the volume listing's `slot~"pvc"` matches.
const LISTED: &str = "pvc";

/// Whether the volume listing shows the disk in `slot`, if there is one.
pub(super) fn listed(slot: &Slot) -> bool {
    slot.as_str().contains(LISTED)
}

#[derive(Default)]
pub(super) struct Coalescer {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    open: Option<Batch>,
    next: u64,
}

struct Batch {
    id: u64,
    members: Vec<Member>,
}

struct Member {
    slot: Slot,
    reply: oneshot::Sender<Answer>,
}

/// Entering: a lookup either leads a new batch (and sends its command) or joins the open one.
pub(super) struct Entered<'a> {
    pub lead: Option<Lead<'a>>,
    /// The answer; closed without one when the batch's leader was dropped before answering.
    pub answer: oneshot::Receiver<Answer>,
}

/// The leader's hold on its open batch. Dropped before [`Lead::close`], it disbands the batch:
/// its members' answers close, and they look up again.
pub(super) struct Lead<'a> {
    coalescer: &'a Coalescer,
    id: u64,
}

/// A closed batch: the command that answers it, then [`Closed::answer`].
pub(super) struct Closed {
    members: Vec<Member>,
}

impl Coalescer {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the open batch, or opens one led by this lookup.
    pub(super) fn enter(&self, slot: &Slot) -> Entered<'_> {
        let (reply, answer) = oneshot::channel();
        let member = Member {
            slot: slot.clone(),
            reply,
        };
        let mut state = self.state();
        if let Some(open) = state.open.as_mut() {
            open.members.push(member);
            return Entered { lead: None, answer };
        }
        state.next += 1;
        let id = state.next;
        state.open = Some(Batch {
            id,
            members: vec![member],
        });
        Entered {
            lead: Some(Lead {
                coalescer: self,
                id,
            }),
            answer,
        }
    }
}

impl Lead<'_> {
    /// Closes the batch (no lookup joins it from now on), when its session is had.
    pub(super) fn close(self) -> Closed {
        let mut state = self.coalescer.state();
        let members = match state.open.take() {
            Some(b) if b.id == self.id => b.members,
            other => {
                state.open = other;
                Vec::new()
            }
        };
        drop(state);
        std::mem::forget(self);
        Closed { members }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut state = self.coalescer.state();
        if state.open.as_ref().is_some_and(|b| b.id == self.id) {
            state.open = None;
        }
    }
}

impl Closed {
    pub(super) fn len(&self) -> usize {
        self.members.len()
    }

    /// The one command that answers every member: the lookup of the only member's slot, the
    /// members' slots as one alternation, or the volume listing.
    pub(super) fn command(&self) -> RosCommand {
        match self.members.as_slice() {
            [one] => RosCommand::Get {
                slot: one.slot.clone(),
            },
            some if some.len() <= MAX_SELECTED => {
                let mut slots: Vec<Slot> = some.iter().map(|m| m.slot.clone()).collect();
                slots.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                slots.dedup();
                RosCommand::GetMany { slots }
            }
            _ => RosCommand::List(Listing::Volumes),
        }
    }

    /// Gives each member its disk from `disks` (what the command printed), or `failed` to all.
    pub(super) fn answer(self, disks: Result<Vec<Disk>, BackendError>) {
        match disks {
            Ok(disks) => {
                for m in self.members {
                    let disk = disks.iter().find(|d| d.slot == m.slot.as_str()).cloned();
                    let _ = m.reply.send(Ok(disk));
                }
            }
            Err(e) => {
                for m in self.members {
                    let _ = m.reply.send(Err(share(&e)));
                }
            }
        }
    }
}

/// A copy of a failed batch's error for each of its members.
fn share(e: &BackendError) -> BackendError {
    match e {
        BackendError::Unavailable(m) => BackendError::Unavailable(m.clone()),
        BackendError::ResourceExhausted(m) => BackendError::ResourceExhausted(m.clone()),
        BackendError::Corrupt(m) => BackendError::Corrupt(m.clone()),
        other => BackendError::Rejected(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(s: &str) -> Slot {
        Slot::parse(s, "slot").unwrap()
    }

    fn disk(s: &str) -> Disk {
        Disk {
            slot: s.into(),
            kind: "file".into(),
            file_path: None,
            size: None,
            nvme_export: true,
            nvme_port: None,
            nqn: None,
            disabled: false,
            comment: None,
        }
    }

    /// Lookups that arrive while the first waits join it; one listing answers all, each with
    /// its own disk (or none).
    #[test]
    fn lookups_waiting_together_get_one_listing() {
        let c = Coalescer::default();
        let a = c.enter(&slot("pvc-a"));
        let b = c.enter(&slot("pvc-b"));
        let missing = c.enter(&slot("pvc-gone"));
        assert!(b.lead.is_none() && missing.lead.is_none(), "they join");
        let closed = a.lead.unwrap().close();
        assert_eq!(closed.len(), 3);
        assert_eq!(
            closed.command(),
            RosCommand::GetMany {
                slots: vec![slot("pvc-a"), slot("pvc-b"), slot("pvc-gone")]
            }
        );
        // What `~` matches may hold more (a slot containing a member's): each takes its own.
        closed.answer(Ok(vec![disk("pvc-ab"), disk("pvc-a"), disk("pvc-b")]));
        let got = |mut r: oneshot::Receiver<Answer>| r.try_recv().unwrap().unwrap();
        assert_eq!(got(a.answer).unwrap().slot, "pvc-a");
        assert_eq!(got(b.answer).unwrap().slot, "pvc-b");
        assert_eq!(got(missing.answer), None);
    }

    /// More lookups than one alternation names are answered by the volume listing.
    #[test]
    fn a_big_batch_is_the_volume_listing() {
        let c = Coalescer::default();
        let entered: Vec<_> = (0..=MAX_SELECTED)
            .map(|i| c.enter(&slot(&format!("pvc-{i}"))))
            .collect();
        let lead = entered.into_iter().next().unwrap().lead.unwrap();
        assert_eq!(lead.close().command(), RosCommand::List(Listing::Volumes));
    }

    /// A lookup alone when its session comes is sent as itself, not as a listing.
    #[test]
    fn a_lone_lookup_is_its_own_command() {
        let c = Coalescer::default();
        let a = c.enter(&slot("pvc-a"));
        let closed = a.lead.unwrap().close();
        assert_eq!(
            closed.command(),
            RosCommand::Get {
                slot: slot("pvc-a")
            }
        );
    }

    /// The never-join-a-sent-listing rule: a lookup arriving after its batch closed (its
    /// command chosen and sent) starts a new batch, whose command is sent after it arrived.
    /// Catches `close` leaving the batch open (joiners would take an answer read before them).
    #[test]
    fn a_lookup_never_joins_a_batch_already_sent() {
        let c = Coalescer::default();
        let a = c.enter(&slot("pvc-a"));
        let closed = a.lead.unwrap().close();
        let late = c.enter(&slot("pvc-a"));
        assert!(late.lead.is_some(), "a new batch, led by the late lookup");
        assert_eq!(closed.len(), 1);
        closed.answer(Ok(vec![disk("pvc-a")]));
        let mut late_answer = late.answer;
        assert!(
            late_answer.try_recv().is_err(),
            "the earlier command's answer is not the late lookup's"
        );
    }

    /// A failed command fails every member, with the error it had.
    #[test]
    fn a_failed_listing_fails_all_its_members() {
        let c = Coalescer::default();
        let a = c.enter(&slot("pvc-a"));
        let b = c.enter(&slot("pvc-b"));
        a.lead
            .unwrap()
            .close()
            .answer(Err(BackendError::Unavailable(
                "the RDS failed listing disks: boom".into(),
            )));
        for mut r in [a.answer, b.answer] {
            match r.try_recv().unwrap() {
                Err(BackendError::Unavailable(m)) => assert!(m.contains("boom"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A leader dropped before its session came (its caller's deadline passed) disbands the
    /// batch: its members' answers close (they look up again) and the next lookup leads.
    #[test]
    fn a_dropped_leader_releases_its_members() {
        let c = Coalescer::default();
        let a = c.enter(&slot("pvc-a"));
        let mut b = c.enter(&slot("pvc-b"));
        drop(a);
        assert!(matches!(
            b.answer.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(c.enter(&slot("pvc-c")).lead.is_some());
    }

    #[test]
    fn only_slots_the_listing_shows_are_coalesced() {
        assert!(listed(&slot("pvc-0a1b")));
        assert!(!listed(&slot(
            "snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc"
        )));
        assert!(
            !listed(&slot("PVC-upper")),
            "RouterOS's ~ is case-sensitive"
        );
    }
}
