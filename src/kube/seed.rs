//! Boot seeding as a pure function: from this driver's VolumeAttachments and the PVs they name,
//! the attachment state to rebuild (rules, "Boot seeding"). VolumeAttachments are the only
//! source of truth; PV annotations are never read.
//!
//! Holders are ordered by `creationTimestamp`, the API server's one clock; within one creation
//! second by the attach instant each VolumeAttachment recorded (the driver's publish_context,
//! which the external-attacher stores in `status.attachmentMetadata`), because a migration often
//! starts within the second of its volume's attach. An instant was written on the clock of the
//! replica that answered, so it never reorders VolumeAttachments created in different seconds,
//! and never measures an age: ages are the API server's now minus `creationTimestamp`. Holders
//! nothing orders (one second, not every one with an instant, or equal instants) are reported
//! as such, never ordered by their VolumeAttachment names, which are hashes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::domain::{migration_timeout, AccessClass};
use crate::ids::{NodeId, VolumeId};

/// What seeding needs of a VolumeAttachment (already filtered to `spec.attacher == driver`).
/// A boot holds one per VolumeAttachment at once, so strings are exactly sized and a node name
/// is shared by every VolumeAttachment of that node ([`NodeNames`]).
#[derive(Clone, Debug)]
pub struct VaView {
    pub name: Box<str>,
    pub pv_name: Option<Box<str>>,
    pub inline_handle: Option<Box<str>>,
    pub node: Arc<str>,
    pub attached: bool,
    pub created: SystemTime,
    /// The attach instant the VolumeAttachment recorded (`status.attachmentMetadata` under
    /// [`crate::domain::PUBLISH_ATTACHED_AT_KEY`]), if it carries a readable one.
    pub attached_at: Option<SystemTime>,
}

/// Node names, each kept once and shared by everything that names that node (the views of one
/// list; the VolumeAttachment projection).
#[derive(Default)]
pub struct NodeNames(HashSet<Arc<str>>);

impl NodeNames {
    /// `name`, shared with every earlier holder of the same name.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.0.insert(name.clone());
        name
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Drops `name` if nothing but this set holds it any more.
    pub fn forget_unused(&mut self, name: &str) {
        if self.0.get(name).is_some_and(|n| Arc::strong_count(n) == 1) {
            self.0.remove(name);
        }
    }
}

/// What seeding needs of a PersistentVolume, borrowed from wherever the PVs are kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PvView<'a> {
    pub handle: Option<&'a str>,
    pub class: AccessClass,
    pub migration_timeout: Option<&'a str>,
}

/// One holder of a volume to rebuild.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedHolder {
    pub node: NodeId,
    /// When it attached: its VolumeAttachment's attach instant, or its creationTimestamp when it
    /// recorded none.
    pub attached: SystemTime,
    /// Whether `attached` is the attach instant the VolumeAttachment recorded.
    pub recorded_instant: bool,
    /// How long ago its VolumeAttachment was created, both ends on the API server's clock
    /// (its creationTimestamp, and the server's now): what a migration's deadline counts
    /// from. The attach instant was written on whichever replica answered, on its own clock,
    /// so it never measures an age.
    pub age: Duration,
}

/// One volume to rebuild: its holders oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedVolume {
    pub volume: VolumeId,
    pub holders: Vec<SeedHolder>,
    pub class: AccessClass,
    pub migration_timeout: Duration,
    /// False when two holders tie: the same attach instant and creationTimestamp, or, without
    /// instants, the same creationTimestamp second. Their order (by VA name, only to be
    /// stable) then means nothing, and a migration between them has no known direction.
    pub order_known: bool,
}

/// Why a VolumeAttachment was not used. Labels for `seeding_volumeattachments_skipped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    NotAttached,
    NoHandle,
    UnknownPv,
    NoNode,
    InvalidHandle,
    InvalidNode,
}

impl SkipReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAttached => "not_attached",
            Self::NoHandle => "no_volume_handle",
            Self::UnknownPv => "unknown_pv",
            Self::NoNode => "empty_node_name",
            Self::InvalidHandle => "invalid_volume_handle",
            Self::InvalidNode => "invalid_node_name",
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct SeedPlan {
    pub volumes: Vec<SeedVolume>,
    pub skipped: Vec<(String, SkipReason)>,
    /// PVs whose `migrationTimeoutSeconds` does not parse (their volume took the default), once
    /// each: PV name and the value.
    pub unparsable_timeouts: Vec<(String, String)>,
}

/// Whether `a` and `b`, one volume's holders sorted by [`holder_order`], are ordered by something
/// other than their names (rules, "Boot seeding" 3): different creation seconds, or, within one,
/// an attach instant recorded by each, and different.
fn ordered(a: &VaView, b: &VaView) -> bool {
    a.created != b.created || matches!((a.attached_at, b.attached_at), (Some(x), Some(y)) if x != y)
}

/// One volume's holders oldest first (rules, "Boot seeding" 3): by creationTimestamp, the API
/// server's one clock; within one creation second by the attach instants. An instant was
/// written on the clock of whichever replica answered, so it never reorders VolumeAttachments
/// created in different seconds. Ties fall back to the VA name, only so the order is stable.
fn holder_order(a: &VaView, b: &VaView) -> std::cmp::Ordering {
    (a.created, a.attached_at)
        .cmp(&(b.created, b.attached_at))
        .then_with(|| a.name.cmp(&b.name))
}

/// Groups attached VolumeAttachments by volume handle, oldest first. The access class and the
/// migration timeout come from the PV; a missing PV (inline volume) counts as exclusive.
/// `pvs` looks a PV up by name; `server_now` is the API server's clock now, against which
/// each holder's age is measured.
///
/// Nothing is kept per volume until the volume's entry is built: each holder is one row
/// (volume, node, position in `vas`), the rows are sorted by volume and then oldest first, so
/// a volume's holders lie side by side, and each volume is then built once, at its exact size.
/// At boot `vas` is every VolumeAttachment of the cluster, alive while the plan is built: any
/// per-volume structure built on the way would peak together with it.
pub fn plan<'p>(
    vas: &[VaView],
    server_now: SystemTime,
    pvs: impl Fn(&str) -> Option<PvView<'p>>,
) -> SeedPlan {
    let mut plan = SeedPlan::default();
    let mut rows: Vec<(VolumeId, NodeId, usize)> = Vec::with_capacity(vas.len());
    // A few hundred nodes hold every volume: each name is checked once and its id shared.
    let mut nodes: HashMap<&str, NodeId> = HashMap::new();
    for (at, va) in vas.iter().enumerate() {
        let handle = match (
            &va.pv_name,
            va.pv_name.as_deref().and_then(&pvs),
            &va.inline_handle,
        ) {
            (Some(_), None, _) => Err(SkipReason::UnknownPv),
            (Some(_), Some(pv), _) => pv.handle.ok_or(SkipReason::NoHandle),
            (None, _, Some(inline)) => Ok(&**inline),
            (None, _, None) => Err(SkipReason::NoHandle),
        };
        let checked = handle
            .and_then(|h| VolumeId::try_from(h).map_err(|_| SkipReason::InvalidHandle))
            .and_then(|volume| match &*va.node {
                "" => Err(SkipReason::NoNode),
                node => match nodes.get(node) {
                    Some(id) => Ok((volume, id.clone())),
                    None => {
                        let id = NodeId::try_from(node).map_err(|_| SkipReason::InvalidNode)?;
                        nodes.insert(node, id.clone());
                        Ok((volume, id))
                    }
                },
            })
            .and_then(|ids| {
                if va.attached {
                    Ok(ids)
                } else {
                    Err(SkipReason::NotAttached)
                }
            });
        match checked {
            Ok((volume, node)) => rows.push((volume, node, at)),
            Err(reason) => plan.skipped.push((va.name.to_string(), reason)),
        }
    }
    let view = |row: &(VolumeId, NodeId, usize)| &vas[row.2];
    // The position breaks a tie of equal names too, as a stable sort would.
    rows.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| holder_order(view(a), view(b)))
            .then(a.2.cmp(&b.2))
    });
    let same_volume = |a: &(VolumeId, NodeId, usize), b: &(VolumeId, NodeId, usize)| a.0 == b.0;
    plan.volumes
        .reserve_exact(rows.chunk_by(same_volume).count());
    for holders in rows.chunk_by(same_volume) {
        let order_known = holders
            .windows(2)
            .all(|w| ordered(view(&w[0]), view(&w[1])));
        // The volume's PV is that of its first VolumeAttachment in the list that names one.
        let pv = holders
            .iter()
            .filter_map(|row| Some((row.2, view(row).pv_name.as_deref()?)))
            .min_by_key(|(at, _)| *at)
            .and_then(|(_, name)| Some((name, pvs(name)?)));
        let (timeout, unparsable) = migration_timeout(pv.and_then(|(_, p)| p.migration_timeout));
        if let (Some((name, _)), Some(raw)) = (pv, unparsable) {
            plan.unparsable_timeouts.push((name.to_string(), raw));
        }
        plan.volumes.push(SeedVolume {
            volume: holders[0].0.clone(),
            class: pv.map_or(AccessClass::Exclusive, |(_, p)| p.class),
            migration_timeout: timeout,
            holders: holders
                .iter()
                .map(|row| {
                    let va = view(row);
                    SeedHolder {
                        node: row.1.clone(),
                        attached: va.attached_at.unwrap_or(va.created),
                        recorded_instant: va.attached_at.is_some(),
                        age: server_now.duration_since(va.created).unwrap_or_default(),
                    }
                })
                .collect(),
            order_known,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn va(name: &str, pv: &str, node: &str, attached: bool, created: u64) -> VaView {
        VaView {
            name: name.into(),
            pv_name: Some(pv.into()),
            inline_handle: None,
            node: node.into(),
            attached,
            created: at(created),
            attached_at: None,
        }
    }

    /// `va` with the attach instant `ms` milliseconds into second `created`, as the attacher
    /// stores it from this driver's publish_context.
    fn va_at(name: &str, node: &str, created: u64, ms: u64) -> VaView {
        VaView {
            attached_at: Some(at(created) + Duration::from_millis(ms)),
            ..va(name, "pv", node, true, created)
        }
    }

    fn order_of(p: &SeedPlan) -> (Vec<&str>, bool) {
        let v = &p.volumes[0];
        (
            v.holders.iter().map(|h| h.node.as_str()).collect(),
            v.order_known,
        )
    }

    fn pv(
        name: &'static str,
        handle: &'static str,
        class: AccessClass,
        timeout: Option<&'static str>,
    ) -> (&'static str, PvView<'static>) {
        (
            name,
            PvView {
                handle: Some(handle),
                class,
                migration_timeout: timeout,
            },
        )
    }

    #[test]
    fn keyed_by_handle_ordered_by_creation_with_pv_class_and_timeout() {
        let pvs = HashMap::from([
            pv("pv-static", "handle-x", AccessClass::Migratable, Some("90")),
            pv("pv-rwo", "handle-y", AccessClass::Exclusive, None),
        ]);
        let vas = vec![
            va("va-new", "pv-static", "node-b", true, 20),
            va("va-old", "pv-static", "node-a", true, 10),
            va("va-rwo", "pv-rwo", "node-c", true, 5),
        ];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert!(p.skipped.is_empty());
        assert_eq!(p.volumes.len(), 2);
        let x = &p.volumes[0];
        assert_eq!(
            x.volume.as_str(),
            "handle-x",
            "keyed by volumeHandle, not PV name"
        );
        let nodes: Vec<&str> = x.holders.iter().map(|h| h.node.as_str()).collect();
        assert_eq!(nodes, ["node-a", "node-b"], "oldest first");
        assert_eq!(x.holders[1].attached, at(20));
        assert!(!x.holders[1].recorded_instant);
        assert!(x.order_known);
        assert_eq!(
            (x.class, x.migration_timeout),
            (AccessClass::Migratable, Duration::from_secs(90))
        );
        assert_eq!(p.volumes[1].class, AccessClass::Exclusive);
        assert_eq!(p.volumes[1].migration_timeout, Duration::from_secs(300));
    }

    /// A plan for 100k volumes lives beside the views of every VolumeAttachment until the
    /// supervisor takes it: the volumes and each volume's holders are allocated at their exact
    /// size, never grown. Catches the `reserve_exact` (or a holder list grown by pushes).
    #[test]
    fn the_plan_is_allocated_at_its_exact_size() {
        let pvs: HashMap<String, PvView<'static>> = (0..5)
            .map(|i| {
                let handle: &'static str = Box::leak(format!("h-{i}").into_boxed_str());
                (
                    format!("pv-{i}"),
                    PvView {
                        handle: Some(handle),
                        class: AccessClass::Migratable,
                        migration_timeout: None,
                    },
                )
            })
            .collect();
        let mut vas: Vec<VaView> = (0..5)
            .map(|i| va(&format!("va-{i}"), &format!("pv-{i}"), "n1", true, 10))
            .collect();
        vas.extend((0..3).map(|i| va(&format!("va-m{i}"), "pv-0", &format!("m{i}"), true, 20 + i)));
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert_eq!(p.volumes.len(), 5);
        assert_eq!(p.volumes.capacity(), p.volumes.len());
        assert_eq!(p.volumes[0].holders.len(), 4);
        for v in &p.volumes {
            assert_eq!(
                v.holders.capacity(),
                v.holders.len(),
                "{}",
                v.volume.as_str()
            );
        }
    }

    /// Two PVs naming one handle (a volume re-bound by hand): the volume takes the PV of its
    /// VolumeAttachment that comes first in the list, whichever holder is older. Catches taking
    /// the oldest holder's PV instead.
    #[test]
    fn a_volume_named_by_two_pvs_takes_the_pv_of_its_first_listed_va() {
        let pvs = HashMap::from([
            pv("pv-a", "h", AccessClass::Exclusive, Some("60")),
            pv("pv-b", "h", AccessClass::Migratable, Some("90")),
        ]);
        for (first, second, class, timeout) in [
            (
                ("va-1", "pv-b", 20),
                ("va-2", "pv-a", 10),
                AccessClass::Migratable,
                90,
            ),
            (
                ("va-1", "pv-a", 20),
                ("va-2", "pv-b", 10),
                AccessClass::Exclusive,
                60,
            ),
        ] {
            let vas = vec![
                va(first.0, first.1, "newer", true, first.2),
                va(second.0, second.1, "older", true, second.2),
            ];
            let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
            let v = &p.volumes[0];
            assert_eq!(order_of(&p), (vec!["older", "newer"], true));
            assert_eq!(
                (v.class, v.migration_timeout),
                (class, Duration::from_secs(timeout))
            );
        }
    }

    #[test]
    fn pending_and_invalid_vas_are_skipped_with_a_reason() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Exclusive, None)]);
        let mut inline = va("va-inline", "x", "node-a", true, 1);
        inline.pv_name = None;
        inline.inline_handle = Some("inline-h".into());
        let mut nothing = va("va-nothing", "x", "node-a", true, 1);
        nothing.pv_name = None;
        let vas = vec![
            va("va-pending", "pv", "node-b", false, 2),
            va("va-unknown-pv", "gone", "node-a", true, 1),
            va("va-no-node", "pv", "", true, 1),
            va("va-attached", "pv", "node-a", true, 1),
            inline,
            nothing,
        ];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        let mut skipped = p.skipped.clone();
        skipped.sort();
        assert_eq!(
            skipped,
            vec![
                ("va-no-node".to_string(), SkipReason::NoNode),
                ("va-nothing".to_string(), SkipReason::NoHandle),
                ("va-pending".to_string(), SkipReason::NotAttached),
                ("va-unknown-pv".to_string(), SkipReason::UnknownPv),
            ]
        );
        let h = p.volumes.iter().find(|v| v.volume.as_str() == "h").unwrap();
        assert_eq!(h.holders.len(), 1, "the pending VA is not a holder");
        let inline = p
            .volumes
            .iter()
            .find(|v| v.volume.as_str() == "inline-h")
            .unwrap();
        assert_eq!(inline.class, AccessClass::Exclusive, "no PV: exclusive");
    }

    #[test]
    fn an_unparsable_timeout_takes_the_default_and_is_reported_once_per_pv() {
        let pvs = HashMap::from([
            pv(
                "pv-odd",
                "h-odd",
                AccessClass::Migratable,
                Some("ten minutes"),
            ),
            pv("pv-ok", "h-ok", AccessClass::Migratable, Some("90")),
        ]);
        let vas = vec![
            va("va-1", "pv-odd", "n1", true, 10),
            va("va-2", "pv-odd", "n2", true, 20),
            va("va-3", "pv-ok", "n1", true, 10),
        ];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert_eq!(
            p.unparsable_timeouts,
            vec![("pv-odd".to_string(), "ten minutes".to_string())]
        );
        let odd = p.volumes.iter().find(|v| v.volume.as_str() == "h-odd");
        assert_eq!(odd.unwrap().migration_timeout, Duration::from_secs(300));
    }

    #[test]
    fn more_than_two_are_all_kept() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Migratable, None)]);
        let vas: Vec<_> = (0..3)
            .map(|i| va(&format!("va-{i}"), "pv", &format!("n{i}"), true, 10 - i))
            .collect();
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        let nodes: Vec<&str> = p.volumes[0]
            .holders
            .iter()
            .map(|h| h.node.as_str())
            .collect();
        assert_eq!(nodes, ["n2", "n1", "n0"]);
    }

    /// Two VolumeAttachments created in one second: their attach instants order them, whichever
    /// VA name sorts first, and each holder keeps its exact instant.
    #[test]
    fn one_second_is_ordered_by_the_attach_instants_whatever_the_names() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Migratable, None)]);
        for (source_va, target_va) in [("va-a", "va-b"), ("va-b", "va-a")] {
            let vas = vec![
                va_at(target_va, "target", 10, 700),
                va_at(source_va, "source", 10, 200),
            ];
            let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
            assert_eq!(
                order_of(&p),
                (vec!["source", "target"], true),
                "{source_va} is the source"
            );
            let target = &p.volumes[0].holders[1];
            assert_eq!(target.attached, at(10) + Duration::from_millis(700));
            assert!(target.recorded_instant);
        }
    }

    /// Rules, "Boot seeding" 3: instants order VolumeAttachments only within one creation
    /// second; across seconds creationTimestamp (the API server's clock) decides, whatever the
    /// instants (written by replicas whose clocks differ) say. This replaced a test that
    /// asserted the opposite (instants before creation seconds); catches `order` comparing
    /// instants ahead of `created`.
    #[test]
    fn instants_never_reorder_different_creation_seconds() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Migratable, None)]);
        // The replica that answered second had a clock 1.8 s behind.
        let vas = vec![
            va_at("va-1", "created-second", 11, 100),
            va_at("va-2", "created-first", 10, 1_900),
        ];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert_eq!(
            order_of(&p),
            (vec!["created-first", "created-second"], true)
        );
        // Equal instants in one second: nothing orders them.
        let vas = vec![va_at("va-1", "x", 10, 500), va_at("va-2", "y", 10, 500)];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert!(!p.volumes[0].order_known);
    }

    /// Rules, "Boot seeding" 3: a holder's age is the API server's now minus its
    /// creationTimestamp, whatever this process's clock says and whatever instant the
    /// VolumeAttachment recorded: here the server's now is a day away from the local clock, and
    /// the target's instant (written on a replica 30 s ahead) is 30 s after its creation.
    /// Catches measuring ages against the local `SystemTime::now()` or from the instant.
    #[test]
    fn ages_come_from_the_api_servers_clock() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Migratable, None)]);
        let vas = vec![
            va_at("va-1", "source", 10, 0),
            va_at("va-2", "target", 100, 30_000),
        ];
        let server_now = SystemTime::now() + Duration::from_secs(86_400);
        let created = |secs| server_now - Duration::from_secs(secs);
        let vas: Vec<VaView> = vas
            .into_iter()
            .zip([created(400), created(310)])
            .map(|(va, c)| VaView {
                created: c,
                attached_at: va.attached_at.map(|_| c + Duration::from_secs(30)),
                ..va
            })
            .collect();
        let p = plan(&vas, server_now, |n| pvs.get(n).copied());
        let ages: Vec<Duration> = p.volumes[0].holders.iter().map(|h| h.age).collect();
        assert_eq!(ages, [Duration::from_secs(400), Duration::from_secs(310)]);
        // A creationTimestamp ahead of the server's now (never from one clock) is age zero.
        let p = plan(&vas, created(350), |n| pvs.get(n).copied());
        assert_eq!(p.volumes[0].holders[1].age, Duration::ZERO);
    }

    /// Without instants (the Go driver, an older version of this one), creationTimestamp
    /// orders; in one second nothing does, and the plan says so instead of trusting the names.
    #[test]
    fn without_instants_creation_orders_and_a_tie_is_unknown() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Migratable, None)]);
        for (first, second) in [("va-a", "va-b"), ("va-b", "va-a")] {
            let vas = vec![
                va(second, "pv", "newer", true, 11),
                va(first, "pv", "older", true, 10),
            ];
            let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
            assert_eq!(order_of(&p), (vec!["older", "newer"], true));
            let vas = vec![
                va(second, "pv", "x", true, 10),
                va(first, "pv", "y", true, 10),
            ];
            let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
            assert!(!p.volumes[0].order_known, "an exact tie");
            assert_eq!(p.volumes[0].holders[0].attached, at(10));
        }
    }

    /// An instant on only some VolumeAttachments (a migration across an upgrade from a version
    /// without them) is not compared with a whole second: creationTimestamp orders, a tie is
    /// unknown, and the holder that has an instant keeps it.
    #[test]
    fn instants_on_only_some_vas_fall_back_to_creation() {
        let pvs = HashMap::from([pv("pv", "h", AccessClass::Migratable, None)]);
        let vas = vec![
            va_at("va-a", "newer", 12, 100),
            va("va-b", "pv", "older", true, 10),
        ];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert_eq!(order_of(&p), (vec!["older", "newer"], true));
        let newer = &p.volumes[0].holders[1];
        assert_eq!(
            (newer.attached, newer.recorded_instant),
            (at(12) + Duration::from_millis(100), true)
        );
        let vas = vec![va_at("va-a", "x", 10, 100), va("va-b", "pv", "y", true, 10)];
        let p = plan(&vas, at(1_000), |n| pvs.get(n).copied());
        assert!(!p.volumes[0].order_known, "one second, one instant: a tie");
    }
}
