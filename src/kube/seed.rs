//! Boot seeding as a pure function: from this driver's VolumeAttachments and the PVs they name,
//! the attachment state to rebuild (rules, "Boot seeding"). VolumeAttachments are the only
//! source of truth; PV annotations are never read.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::domain::{migration_timeout, AccessClass};
use crate::ids::{NodeId, VolumeId};

/// What seeding needs of a VolumeAttachment (already filtered to `spec.attacher == driver`).
#[derive(Clone, Debug)]
pub struct VaView {
    pub name: String,
    pub pv_name: Option<String>,
    pub inline_handle: Option<String>,
    pub node: String,
    pub attached: bool,
    pub created: SystemTime,
}

/// What seeding needs of a PersistentVolume, borrowed from wherever the PVs are kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PvView<'a> {
    pub handle: Option<&'a str>,
    pub class: AccessClass,
    pub migration_timeout: Option<&'a str>,
}

/// One volume to rebuild: its holders oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedVolume {
    pub volume: VolumeId,
    pub holders: Vec<(NodeId, SystemTime)>,
    pub class: AccessClass,
    pub migration_timeout: Duration,
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

/// A volume's PV (name and view, if known) and its holders with creation time and VA name.
type Group<'a, 'p> = (
    Option<(&'a str, PvView<'p>)>,
    Vec<(NodeId, SystemTime, &'a str)>,
);

/// Groups attached VolumeAttachments by volume handle, oldest first. The access class and the
/// migration timeout come from the PV; a missing PV (inline volume) counts as exclusive.
/// `pvs` looks a PV up by name.
pub fn plan<'p>(vas: &[VaView], pvs: impl Fn(&str) -> Option<PvView<'p>>) -> SeedPlan {
    let mut plan = SeedPlan::default();
    let mut groups: BTreeMap<VolumeId, Group<'_, 'p>> = BTreeMap::new();
    for va in vas {
        let pv = va.pv_name.as_deref().and_then(&pvs);
        let handle = match (&va.pv_name, pv, &va.inline_handle) {
            (Some(_), None, _) => Err(SkipReason::UnknownPv),
            (Some(_), Some(pv), _) => pv.handle.ok_or(SkipReason::NoHandle),
            (None, _, Some(inline)) => Ok(inline.as_str()),
            (None, _, None) => Err(SkipReason::NoHandle),
        };
        let checked = handle
            .and_then(|h| VolumeId::try_from(h).map_err(|_| SkipReason::InvalidHandle))
            .and_then(|volume| match va.node.as_str() {
                "" => Err(SkipReason::NoNode),
                node => NodeId::try_from(node)
                    .map(|n| (volume, n))
                    .map_err(|_| SkipReason::InvalidNode),
            })
            .and_then(|ids| {
                if va.attached {
                    Ok(ids)
                } else {
                    Err(SkipReason::NotAttached)
                }
            });
        let pv = va.pv_name.as_deref().zip(pv);
        match checked {
            Ok((volume, node)) => {
                let entry = groups.entry(volume).or_insert((pv, Vec::new()));
                entry.0 = entry.0.or(pv);
                entry.1.push((node, va.created, &va.name));
            }
            Err(reason) => plan.skipped.push((va.name.clone(), reason)),
        }
    }
    for (volume, (pv, mut holders)) in groups {
        // Oldest first; equal timestamps fall back to the VA name so the order is stable.
        holders.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.2.cmp(b.2)));
        let (timeout, unparsable) = migration_timeout(pv.and_then(|(_, p)| p.migration_timeout));
        if let (Some((name, _)), Some(raw)) = (pv, unparsable) {
            plan.unparsable_timeouts.push((name.to_string(), raw));
        }
        plan.volumes.push(SeedVolume {
            volume,
            class: pv.map_or(AccessClass::Exclusive, |(_, p)| p.class),
            migration_timeout: timeout,
            holders: holders.into_iter().map(|(n, t, _)| (n, t)).collect(),
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
        }
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
        let p = plan(&vas, |n| pvs.get(n).copied());
        assert!(p.skipped.is_empty());
        assert_eq!(p.volumes.len(), 2);
        let x = &p.volumes[0];
        assert_eq!(
            x.volume.as_str(),
            "handle-x",
            "keyed by volumeHandle, not PV name"
        );
        let nodes: Vec<&str> = x.holders.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(nodes, ["node-a", "node-b"], "oldest first");
        assert_eq!(x.holders[1].1, at(20));
        assert_eq!(
            (x.class, x.migration_timeout),
            (AccessClass::Migratable, Duration::from_secs(90))
        );
        assert_eq!(p.volumes[1].class, AccessClass::Exclusive);
        assert_eq!(p.volumes[1].migration_timeout, Duration::from_secs(300));
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
        let p = plan(&vas, |n| pvs.get(n).copied());
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
        let p = plan(&vas, |n| pvs.get(n).copied());
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
        let p = plan(&vas, |n| pvs.get(n).copied());
        let nodes: Vec<&str> = p.volumes[0]
            .holders
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(nodes, ["n2", "n1", "n0"]);
    }
}
