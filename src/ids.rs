//! Validated identifiers. A `VolumeId` or `NodeId` that exists has passed validation, so nothing
//! downstream (file paths, maps, metrics labels) ever sees an unchecked string.

use std::fmt;
use std::sync::Arc;

use crate::Error;

/// Longest volume id accepted (ATTACHMENT_RULES: Publish step 1).
pub const MAX_VOLUME_ID_LEN: usize = 128;
/// Longest node id accepted (a DNS subdomain name, as Kubernetes node names are).
pub const MAX_NODE_ID_LEN: usize = 253;

/// A volume id matching `^[A-Za-z0-9][A-Za-z0-9._-]*$`, at most 128 bytes. Because `/`, NUL and a
/// leading `.` are all refused, a `VolumeId` is always safe to use as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(Arc<str>);

/// A non-empty node id of at most 253 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl VolumeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Validates `raw` as the request field `field` so the error names what the caller sent.
    pub fn parse_field(raw: &str, field: &'static str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidArgument { field, reason };
        if raw.is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        if raw.len() > MAX_VOLUME_ID_LEN {
            return Err(invalid(format!(
                "is {} bytes, longer than the limit of {MAX_VOLUME_ID_LEN}",
                raw.len()
            )));
        }
        let bytes = raw.as_bytes();
        if !bytes[0].is_ascii_alphanumeric() {
            return Err(invalid(format!(
                "{raw:?} must start with a letter or digit"
            )));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(format!(
                "{:?} contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed",
                raw.escape_debug().to_string()
            )));
        }
        Ok(Self(Arc::from(raw)))
    }
}

/// Longest CreateVolume name the CSI spec allows.
pub const MAX_NAME_LEN: usize = 128;

impl VolumeId {
    /// The id of the volume CreateVolume `name` asks for. The CSI spec allows any name of at
    /// most 128 bytes without control characters; a name that is already a valid id is used as
    /// it is (Kubernetes' `pvc-<uuid>`, the Go driver's ids), any other becomes `vol-` and 32
    /// hex digits of its SHA-256, so it never reaches a path as written. The same name always
    /// gives the same id, which keeps CreateVolume idempotent.
    pub fn for_name(name: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidArgument {
            field: "name",
            reason,
        };
        if name.is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(format!(
                "is {} bytes, longer than the limit of {MAX_NAME_LEN}",
                name.len()
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| matches!(*c as u32, 0..=8 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F))
        {
            return Err(invalid(format!(
                "{:?} contains the control character {c:?}, which CSI names must not",
                name.escape_debug().to_string()
            )));
        }
        if let Ok(id) = Self::try_from(name) {
            return Ok(id);
        }
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(name.as_bytes()));
        Ok(Self(Arc::from(format!("vol-{}", &digest[..32]))))
    }
}

/// A snapshot id: the same characters as a [`VolumeId`] (so it is safe as a file name and as a
/// RouterOS slot once `.` and `_` are refused there), at most 128 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(Arc<str>);

/// The DNS namespace of RFC 4122, which the Go driver hashes snapshot names in.
const UUID_NAMESPACE_DNS: uuid::Uuid = uuid::Uuid::NAMESPACE_DNS;

impl SnapshotId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn parse_field(raw: &str, field: &'static str) -> Result<Self, Error> {
        VolumeId::parse_field(raw, field).map(|v| Self(v.0))
    }

    /// The id of the snapshot CreateSnapshot `name` asks for, exactly as the Go driver derives
    /// it (`pkg/utils/snapshotid.go`): `snap-<u>-at-<the first 10 hex digits of u>`, where `u`
    /// is the UUIDv5 of the name in the DNS namespace. The same name always gives the same id,
    /// on any controller and after any restart, and a Go driver's snapshot keeps its id.
    pub fn for_name(name: &str) -> Result<Self, Error> {
        // The same rules as a volume name: 1 to 128 bytes, no control characters.
        VolumeId::for_name(name)?;
        let u = uuid::Uuid::new_v5(&UUID_NAMESPACE_DNS, name.as_bytes());
        let simple = u.simple().to_string();
        Ok(Self(Arc::from(format!(
            "snap-{}-at-{}",
            u.hyphenated(),
            &simple[..10]
        ))))
    }
}

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn parse_field(raw: &str, field: &'static str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidArgument { field, reason };
        if raw.is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        if raw.len() > MAX_NODE_ID_LEN {
            return Err(invalid(format!(
                "is {} bytes, longer than the limit of {MAX_NODE_ID_LEN}",
                raw.len()
            )));
        }
        if raw.contains('\0') {
            return Err(invalid("must not contain NUL".into()));
        }
        Ok(Self(Arc::from(raw)))
    }
}

/// Which node ids a controller accepts beyond [`NodeId`]'s own rules.
///
/// In Kubernetes mode a node id is a Node's name and becomes part of API URLs (the Node GET of
/// Publish step 2 and 5.1, the VolumeAttachment name of 5.2), so it must be what Kubernetes
/// allows a Node to be named: a DNS-1123 subdomain. Standalone, node ids never leave the
/// process and keep [`NodeId`]'s looser rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeIdRules {
    Standalone,
    Kubernetes,
}

impl NodeIdRules {
    /// Validates `raw` as the request field `field`: INVALID_ARGUMENT naming it, before anything
    /// else sees the id.
    pub fn parse(self, raw: &str, field: &'static str) -> Result<NodeId, Error> {
        let node = NodeId::parse_field(raw, field)?;
        if self == Self::Kubernetes {
            if let Err(reason) = dns1123_subdomain(raw) {
                return Err(Error::InvalidArgument {
                    field,
                    reason: format!(
                        "{:?} is not a Kubernetes node name (a DNS-1123 subdomain): {reason}",
                        raw.escape_debug().to_string()
                    ),
                });
            }
        }
        Ok(node)
    }
}

/// Checks Kubernetes' `IsDNS1123Subdomain`: at most 253 bytes of dot-separated labels, each of
/// lowercase letters, digits and '-', starting and ending with a letter or digit.
pub fn dns1123_subdomain(raw: &str) -> Result<(), &'static str> {
    if raw.is_empty() {
        return Err("it is empty");
    }
    if raw.len() > MAX_NODE_ID_LEN {
        return Err("it is longer than 253 bytes");
    }
    for label in raw.split('.') {
        let bytes = label.as_bytes();
        let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
            return Err("it has an empty label (a leading, trailing or doubled '.')");
        };
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        {
            return Err("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if *first == b'-' || *last == b'-' {
            return Err("each label must start and end with a letter or digit");
        }
    }
    Ok(())
}

impl TryFrom<&str> for VolumeId {
    type Error = Error;
    fn try_from(raw: &str) -> Result<Self, Error> {
        Self::parse_field(raw, "volume_id")
    }
}

impl TryFrom<&str> for SnapshotId {
    type Error = Error;
    fn try_from(raw: &str) -> Result<Self, Error> {
        Self::parse_field(raw, "snapshot_id")
    }
}

impl TryFrom<&str> for NodeId {
    type Error = Error;
    fn try_from(raw: &str) -> Result<Self, Error> {
        Self::parse_field(raw, "node_id")
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    )*};
}
display_as_str!(VolumeId, NodeId, SnapshotId);

macro_rules! serde_validated {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::try_from(&*raw).map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_validated!(VolumeId, NodeId, SnapshotId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        let ok = ["a", "pvc-1234", "A.b_c-d", "0", &"x".repeat(128)];
        for raw in ok {
            assert!(VolumeId::try_from(raw).is_ok(), "{raw} should be valid");
        }
        let bad = [
            "",
            "../etc",
            "..",
            ".hidden",
            "a/b",
            "a\0b",
            "-a",
            "a b",
            "é",
            &"x".repeat(129),
        ];
        for raw in bad {
            let err = VolumeId::try_from(raw).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        field: "volume_id",
                        ..
                    }
                ),
                "{raw:?}: {err}"
            );
        }
    }

    #[test]
    fn names_map_to_ids_deterministically_and_safely() {
        for same in ["pvc-1b2c", "vm-disk", "a.b_c-d"] {
            assert_eq!(VolumeId::for_name(same).unwrap().as_str(), same);
        }
        for odd in ["../escape", "/abs", "sanity-vol+1", "é", ".hidden", "a b"] {
            let id = VolumeId::for_name(odd).unwrap();
            assert!(
                id.as_str().starts_with("vol-") && id.as_str().len() == 36,
                "{odd:?} -> {id}"
            );
            assert_eq!(VolumeId::for_name(odd).unwrap(), id, "deterministic");
            assert!(VolumeId::try_from(id.as_str()).is_ok());
        }
        assert_ne!(
            VolumeId::for_name("a+b").unwrap(),
            VolumeId::for_name("a+c").unwrap()
        );
        assert!(VolumeId::for_name("tab\tand\nnewline are allowed").is_ok());
        for bad in ["", "a\u{1}b", "del\u{7f}", &"x".repeat(129)] {
            let err = VolumeId::for_name(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { field: "name", .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn kubernetes_node_ids_are_dns_subdomains() {
        let long_label = "a".repeat(64);
        let longest = format!("{}.b", "a".repeat(251));
        let ok = [
            "n1",
            "worker-1.example.com",
            "0",
            "a-b",
            long_label.as_str(),
            longest.as_str(),
        ];
        for raw in ok {
            assert_eq!(dns1123_subdomain(raw), Ok(()), "{raw}");
            assert!(NodeIdRules::Kubernetes.parse(raw, "node_id").is_ok());
        }
        let too_long = format!("{}.b", "a".repeat(252));
        let bad = [
            "",
            "Node-A",
            "n_1",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a.-b",
            "a b",
            "n1/../x",
            "n1?x",
            "é",
            too_long.as_str(),
        ];
        for raw in bad {
            assert!(dns1123_subdomain(raw).is_err(), "{raw:?}");
            let err = NodeIdRules::Kubernetes.parse(raw, "node_id").unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        field: "node_id",
                        ..
                    }
                ),
                "{raw:?}: {err}"
            );
        }
        // Standalone keeps the looser rules.
        for raw in ["Node-A", "n_1", "a..b", "-a", "é"] {
            assert!(
                NodeIdRules::Standalone.parse(raw, "node_id").is_ok(),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn snapshot_ids_are_the_go_drivers() {
        // uuid.NewSHA1(uuid.NameSpaceDNS, []byte("snapshot-1")) in Go (and uuid5 in Python).
        let id = SnapshotId::for_name("snapshot-1").unwrap();
        assert_eq!(
            id.as_str(),
            "snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc"
        );
        let u = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_DNS, b"snapshot-1");
        assert_eq!(u.get_version_num(), 5);
        let hex: String = u.to_string().replace('-', "");
        assert_eq!(id.as_str(), format!("snap-{u}-at-{}", &hex[..10]));
        assert_eq!(id.as_str().len(), 5 + 36 + 4 + 10);
        assert_eq!(SnapshotId::for_name("snapshot-1").unwrap(), id);
        assert_ne!(SnapshotId::for_name("snapshot-2").unwrap(), id);
        // Any CSI name, up to 128 bytes, becomes a valid id.
        let long = "n".repeat(128);
        for name in ["a b", "../x", long.as_str()] {
            let id = SnapshotId::for_name(name).unwrap();
            assert!(SnapshotId::try_from(id.as_str()).is_ok());
        }
        for bad in ["", "a\u{1}", &"n".repeat(129)] {
            assert!(SnapshotId::for_name(bad).is_err(), "{bad:?}");
        }
        assert!(SnapshotId::try_from("../x").is_err());
    }

    #[test]
    fn node_ids() {
        assert!(NodeId::try_from("worker-1.example").is_ok());
        assert!(NodeId::try_from(&*"n".repeat(253)).is_ok());
        assert!(NodeId::try_from("").is_err());
        assert!(NodeId::try_from(&*"n".repeat(254)).is_err());
    }
}
