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

impl TryFrom<&str> for VolumeId {
    type Error = Error;
    fn try_from(raw: &str) -> Result<Self, Error> {
        Self::parse_field(raw, "volume_id")
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
display_as_str!(VolumeId, NodeId);

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
serde_validated!(VolumeId, NodeId);

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
    fn node_ids() {
        assert!(NodeId::try_from("worker-1.example").is_ok());
        assert!(NodeId::try_from(&*"n".repeat(253)).is_ok());
        assert!(NodeId::try_from("").is_err());
        assert!(NodeId::try_from(&*"n".repeat(254)).is_err());
    }
}
