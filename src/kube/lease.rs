//! The csi-attacher's leader Lease, followed and never written: which Lease and namespace, a
//! watch on that one object, a live read to confirm a takeover, and the pure reading of what a
//! Lease says about this controller ([`assess`]).
//!
//! Owns no attachment state and decides nothing beyond "does this Lease make us active, and
//! until when"; [`crate::role`] acts on the answer. The driver runs no election of its own:
//! ControllerPublish/Unpublish reach only the pod whose csi-attacher holds this Lease, so that
//! pod's driver is the one whose attachment state matters.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::{watch, Notify};

use super::KubeError;

/// Taken off every Lease's expiry before this controller stops serving: it must have stood
/// down before another csi-attacher can take the Lease, which happens no earlier than
/// `renewTime + leaseDurationSeconds` (csi-lib-utils' candidates wait a full lease duration
/// after the last change they saw). The holder's renewTime is written by the csi-attacher of
/// this same pod, on this node's clock; the margin covers the watch's delivery and this
/// process's own reaction, and a small skew when the identity is set by hand to another pod.
/// csi-lib-utils renews every 5 s a Lease of 15 s, so 2 s never makes a live holder flap.
pub const SKEW_MARGIN: Duration = Duration::from_secs(2);

/// How long a Lease watch may stay silent before it is started over (a fresh list), when the
/// Lease names no duration to go by. A live csi-attacher renews every few seconds.
pub const QUIET_DEFAULT: Duration = Duration::from_secs(15);

/// csi-lib-utils' `sanitizeName` (leaderelection/leader_election.go), which its leader election
/// applies to both the lock name and the holder identity before anything reaches the Lease:
/// every character outside `[A-Za-z0-9-]` becomes `-`, and an `X` is appended if the result
/// ends in `-`. Nothing is truncated.
fn sanitize(name: &str) -> String {
    let mut name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.ends_with('-') {
        name.push('X');
    }
    name
}

/// The Lease the csi-attacher of driver `driver` elects its leader with: csi-lib-utils'
/// `external-attacher-leader-<driver>`, sanitized ([`sanitize`]).
pub fn lease_name(driver: &str) -> String {
    sanitize(&format!("external-attacher-leader-{driver}"))
}

/// The `holderIdentity` that means this pod, as the csi-attacher writes it: its identity (the
/// pod's hostname, or `--leader-election-identity`) sanitized as csi-lib-utils does, so a pod
/// name with a `.` is recognised. Built once at start; [`assess`] takes only this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderIdentity(String);

impl HolderIdentity {
    pub fn of(identity: &str) -> Self {
        Self(sanitize(identity))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HolderIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The namespace of the Lease: `--leader-election-namespace`, else `POD_NAMESPACE`, else the
/// namespace file of the pod's service account. None of them is an error rather than a guess
/// (csi-lib-utils would fall back to `default`): following the wrong Lease would leave this
/// controller a standby for good.
pub fn resolve_namespace(
    flag: Option<&str>,
    pod_namespace: Option<&str>,
    service_account_dir: &Path,
) -> Result<String, KubeError> {
    let file = service_account_dir.join("namespace");
    let from_file = std::fs::read_to_string(&file).ok();
    let found = [flag, pod_namespace, from_file.as_deref()]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|ns| !ns.is_empty())
        .map(String::from);
    found.ok_or_else(|| {
        KubeError::Config(format!(
            "--leader-election: no namespace for the csi-attacher's Lease (POD_NAMESPACE is \
                 not set and {} cannot be read); pass --leader-election-namespace",
            file.display()
        ))
    })
}

/// What the driver reads of a Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub duration: Option<Duration>,
    pub renewed: Option<SystemTime>,
    pub acquired: Option<SystemTime>,
    pub transitions: Option<i32>,
}

impl LeaseView {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration: spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            renewed: spec.renew_time.map(|t| SystemTime::from(t.0)),
            acquired: spec.acquire_time.map(|t| SystemTime::from(t.0)),
            transitions: spec.lease_transitions,
        }
    }

    /// One holder's tenure: a new acquisition (even by the same identity) is a new term, so its
    /// attachment state is rebuilt.
    pub fn term(&self) -> TermKey {
        TermKey {
            holder: self.holder.clone(),
            acquired: self.acquired,
            transitions: self.transitions,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermKey {
    pub holder: Option<String>,
    pub acquired: Option<SystemTime>,
    pub transitions: Option<i32>,
}

/// What a Lease makes this controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The Lease names us and has not expired: active until `until` (wall clock), unless it is
    /// renewed.
    Active {
        until: SystemTime,
        term: TermKey,
    },
    Standby(Why),
}

/// Why a controller is a standby, for logs and the UNAVAILABLE message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// Not seen yet, or deleted.
    NoLease,
    NoHolder,
    Held(String),
    /// It names us but was not renewed in time (or we could not see it renewed).
    Expired,
    /// It names us but has no renewTime or leaseDurationSeconds to tell how long.
    Incomplete,
    /// It could not be read.
    Unreadable(String),
    /// It names us under a new acquisition: the old term's state is dropped and rebuilt.
    NewTerm,
    /// Another pod holds it, live, and this controller runs without `--leader-election`: it
    /// cannot follow the terms, so it serves no attachment until restarted with the flag.
    Unelected(String),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoLease => write!(f, "no csi-attacher leader Lease is seen"),
            Self::NoHolder => write!(f, "the csi-attacher leader Lease has no holder"),
            Self::Held(holder) => write!(f, "the csi-attacher leader Lease is held by {holder}"),
            Self::Expired => write!(
                f,
                "the csi-attacher leader Lease names this pod but was not seen renewed in time"
            ),
            Self::Incomplete => write!(
                f,
                "the csi-attacher leader Lease names this pod but has no renewTime or leaseDurationSeconds"
            ),
            Self::Unreadable(e) => write!(f, "the csi-attacher leader Lease cannot be read: {e}"),
            Self::NewTerm => write!(
                f,
                "the csi-attacher leader Lease was acquired anew; attachment state is being rebuilt"
            ),
            Self::Unelected(holder) => write!(
                f,
                "the csi-attacher leader Lease is held by {holder}, so the csi-attachers run an \
                 election and another controller replica may serve; this one runs without \
                 --leader-election and serves no attachment until restarted with it"
            ),
        }
    }
}

/// What `lease` (first seen at `seen`) makes controller `me` at `now`.
///
/// Active exactly while the Lease's holder is `me` (sanitized, as the csi-attacher wrote it)
/// and `min(renewTime, seen) + leaseDurationSeconds - margin` is ahead. `seen` caps a renewTime
/// in the future (a skewed clock) at the moment we learned of it. An expired Lease still naming `me` is a standby: another csi-attacher may take
/// it at any moment, and its acquisition may be what we have not seen yet.
pub fn assess(
    lease: Option<&LeaseView>,
    seen: SystemTime,
    me: &HolderIdentity,
    now: SystemTime,
    margin: Duration,
) -> Verdict {
    let Some(lease) = lease else {
        return Verdict::Standby(Why::NoLease);
    };
    match lease.holder.as_deref() {
        None => return Verdict::Standby(Why::NoHolder),
        Some(holder) if holder != me.as_str() => return Verdict::Standby(Why::Held(holder.into())),
        Some(_) => {}
    }
    let (Some(renewed), Some(duration)) = (lease.renewed, lease.duration) else {
        return Verdict::Standby(Why::Incomplete);
    };
    let until = renewed.min(seen) + duration.saturating_sub(margin);
    if duration <= margin || now >= until {
        return Verdict::Standby(Why::Expired);
    }
    Verdict::Active {
        until,
        term: lease.term(),
    }
}

/// The latest the watch says, and when this process learned it, on both clocks: the wall clock
/// to compare with the Lease's renewTime, the monotonic one for the deadline that follows.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub lease: Option<LeaseView>,
    pub at: SystemTime,
    pub at_mono: tokio::time::Instant,
}

impl Seen {
    pub fn now(lease: Option<LeaseView>) -> Self {
        Self {
            lease,
            at: SystemTime::now(),
            at_mono: tokio::time::Instant::now(),
        }
    }
}

/// Where [`crate::role`] learns about the Lease.
#[async_trait]
pub trait LeaseSource: Send + Sync + 'static {
    /// Changes as the watch reports; `None` until its first complete list.
    fn subscribe(&self) -> watch::Receiver<Option<Seen>>;
    /// A live read (never a cache), to confirm before serving.
    async fn fetch(&self) -> Result<Option<LeaseView>, KubeError>;
    /// Starts the watch over with a fresh list: it has said nothing for longer than the Lease
    /// could live, so it may be stuck.
    fn restart(&self);
}

/// The kube-rs side: a watcher on the one Lease, by name.
pub struct KubeLease {
    api: Api<Lease>,
    name: String,
    seen: watch::Receiver<Option<Seen>>,
    restart: Arc<Notify>,
}

impl KubeLease {
    /// Starts watching Lease `name` in `namespace`.
    pub fn start(client: Client, namespace: &str, name: &str) -> Arc<Self> {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let (tx, seen) = watch::channel(None);
        let restart = Arc::new(Notify::new());
        let this = Arc::new(Self {
            api: api.clone(),
            name: name.to_string(),
            seen,
            restart: restart.clone(),
        });
        let name = name.to_string();
        tokio::spawn(async move {
            loop {
                let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
                let mut stream = watcher(api.clone(), config).default_backoff().boxed();
                let mut listing: Option<Option<LeaseView>> = None;
                loop {
                    let event = tokio::select! {
                        event = stream.next() => event,
                        () = restart.notified() => {
                            tracing::info!(lease = %name, "the Lease watch was silent too long; listing it again");
                            break;
                        }
                    };
                    let Some(event) = event else { break };
                    match event {
                        Ok(Event::Init) => listing = Some(None),
                        Ok(Event::InitApply(lease)) => {
                            listing = Some(Some(LeaseView::of(&lease)));
                        }
                        Ok(Event::InitDone) => {
                            let _ = tx.send(Some(Seen::now(listing.take().flatten())));
                        }
                        Ok(Event::Apply(lease)) => {
                            let _ = tx.send(Some(Seen::now(Some(LeaseView::of(&lease)))));
                        }
                        Ok(Event::Delete(_)) => {
                            let _ = tx.send(Some(Seen::now(None)));
                        }
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e, "watching the csi-attacher's Lease failed; retrying with backoff");
                        }
                    }
                }
            }
        });
        this
    }
}

#[async_trait]
impl LeaseSource for KubeLease {
    fn subscribe(&self) -> watch::Receiver<Option<Seen>> {
        self.seen.clone()
    }

    async fn fetch(&self) -> Result<Option<LeaseView>, KubeError> {
        self.api
            .get_opt(&self.name)
            .await
            .map(|l| l.as_ref().map(LeaseView::of))
            .map_err(|e| KubeError::Api {
                action: format!("getting Lease {}", self.name),
                message: e.to_string(),
            })
    }

    fn restart(&self) {
        self.restart.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = Duration::from_secs(2);

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn lease(holder: &str, renewed: u64, duration: u64) -> LeaseView {
        LeaseView {
            holder: Some(holder.into()),
            duration: Some(Duration::from_secs(duration)),
            renewed: Some(at(renewed)),
            acquired: Some(at(0)),
            transitions: Some(3),
        }
    }

    #[test]
    fn lease_names_follow_csi_lib_utils() {
        assert_eq!(
            lease_name("rds.csi.srvlab.io"),
            "external-attacher-leader-rds-csi-srvlab-io"
        );
        assert_eq!(lease_name("a_b/c"), "external-attacher-leader-a-b-c");
        assert_eq!(lease_name("drv."), "external-attacher-leader-drv-X");
        assert_eq!(lease_name("Ü"), "external-attacher-leader--X");
    }

    #[test]
    fn the_namespace_is_the_flag_then_pod_namespace_then_the_service_account() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("namespace"), "from-file\n").unwrap();
        let none = dir.path().join("absent");
        assert_eq!(
            resolve_namespace(Some("flag"), Some("env"), dir.path()).unwrap(),
            "flag"
        );
        assert_eq!(
            resolve_namespace(None, Some("env"), dir.path()).unwrap(),
            "env"
        );
        assert_eq!(
            resolve_namespace(None, Some(" "), dir.path()).unwrap(),
            "from-file"
        );
        assert_eq!(
            resolve_namespace(None, None, dir.path()).unwrap(),
            "from-file"
        );
        let err = resolve_namespace(None, None, &none).unwrap_err();
        assert!(
            err.to_string().contains("pass --leader-election-namespace"),
            "{err}"
        );
    }

    #[test]
    fn assess_reads_holder_expiry_and_skew() {
        let me = "pod-a";
        let fresh = lease(me, 100, 15);
        let identity = HolderIdentity::of(me);
        // One row per case: lease, first seen, now, verdict.
        let cases: Vec<(Option<LeaseView>, u64, u64, Verdict)> = vec![
            (None, 100, 100, Verdict::Standby(Why::NoLease)),
            (
                Some(LeaseView {
                    holder: None,
                    ..fresh.clone()
                }),
                100,
                100,
                Verdict::Standby(Why::NoHolder),
            ),
            (
                Some(lease("pod-b", 100, 15)),
                100,
                101,
                Verdict::Standby(Why::Held("pod-b".into())),
            ),
            (
                Some(fresh.clone()),
                100,
                101,
                Verdict::Active {
                    until: at(113),
                    term: fresh.term(),
                },
            ),
            // Seen late: the renewTime still decides.
            (
                Some(fresh.clone()),
                110,
                111,
                Verdict::Active {
                    until: at(113),
                    term: fresh.term(),
                },
            ),
            // Expired, with the holder unchanged: a standby.
            (
                Some(fresh.clone()),
                100,
                113,
                Verdict::Standby(Why::Expired),
            ),
            (
                Some(fresh.clone()),
                100,
                500,
                Verdict::Standby(Why::Expired),
            ),
            // A renewTime ahead of our clock counts from when we saw it.
            (
                Some(lease(me, 1000, 15)),
                100,
                101,
                Verdict::Active {
                    until: at(113),
                    term: lease(me, 1000, 15).term(),
                },
            ),
            (
                Some(lease(me, 1000, 15)),
                100,
                113,
                Verdict::Standby(Why::Expired),
            ),
            // No way to tell how long: a standby.
            (
                Some(LeaseView {
                    duration: None,
                    ..fresh.clone()
                }),
                100,
                100,
                Verdict::Standby(Why::Incomplete),
            ),
            (
                Some(LeaseView {
                    renewed: None,
                    ..fresh.clone()
                }),
                100,
                100,
                Verdict::Standby(Why::Incomplete),
            ),
            // A lease no longer than the margin never makes anyone active.
            (
                Some(lease(me, 100, 2)),
                100,
                100,
                Verdict::Standby(Why::Expired),
            ),
        ];
        for (i, (lease, seen, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                assess(lease.as_ref(), at(seen), &identity, at(now), MARGIN),
                want,
                "case {i}"
            );
        }
    }

    /// csi-lib-utils writes the holder identity through its `sanitizeName`: a pod name with a
    /// `.` is held as `-`. Catches the comparison of the raw identity in `assess`.
    #[test]
    fn the_holder_is_compared_as_the_attacher_writes_it() {
        let written = lease("ctrl-0-rds-X", 100, 15);
        let me = HolderIdentity::of("ctrl-0.rds.");
        assert_eq!(me.as_str(), "ctrl-0-rds-X");
        let verdict = assess(Some(&written), at(100), &me, at(101), MARGIN);
        assert_eq!(
            verdict,
            Verdict::Active {
                until: at(113),
                term: written.term()
            }
        );
    }

    #[test]
    fn a_new_acquisition_is_a_new_term_and_a_renewal_is_not() {
        let first = lease("pod-a", 100, 15);
        let renewed = lease("pod-a", 105, 15);
        assert_eq!(first.term(), renewed.term());
        let again = LeaseView {
            acquired: Some(at(200)),
            transitions: Some(5),
            ..renewed.clone()
        };
        assert_ne!(first.term(), again.term());
    }
}
