//! Validated paths and device names: everything the node layer puts on a command line or
//! hands to a syscall passes through one of these first.
//!
//! Owns path validation and the pure types of what a path holds ([`Found`]). The file
//! operations on paths a CO names live in [`super::confine`], which resolves them beneath the
//! kubelet's directory.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::Error;

/// Longest path accepted (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// An absolute path with no `.` or `..` component, no NUL and at most 4096 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "PathBuf", into = "PathBuf")]
pub struct AbsPath(PathBuf);

impl AbsPath {
    /// Validates `raw` as the request field `field`, so the error names what the caller sent.
    pub fn parse_field(raw: &str, field: &'static str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidArgument { field, reason };
        if raw.is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(invalid(format!(
                "is {} bytes, longer than the limit of {MAX_PATH_LEN}",
                raw.len()
            )));
        }
        if raw.contains('\0') {
            return Err(invalid("must not contain NUL".into()));
        }
        Self::from_path(Path::new(raw)).map_err(|reason| invalid(format!("{raw:?} {reason}")))
    }

    fn from_path(path: &Path) -> Result<Self, String> {
        if !path.is_absolute() {
            return Err("must be an absolute path".into());
        }
        // `Path::components` drops inner `.` components; look at the raw segments.
        for segment in path.as_os_str().as_bytes().split(|b| *b == b'/') {
            match segment {
                b".." => return Err("must not contain '..'".into()),
                b"." => return Err("must not contain '.' components".into()),
                _ => {}
            }
        }
        let mut clean = PathBuf::from("/");
        for component in path.components() {
            match component {
                Component::RootDir => {}
                Component::Normal(part) => clean.push(part),
                Component::ParentDir => return Err("must not contain '..'".into()),
                Component::CurDir | Component::Prefix(_) => {
                    return Err("must not contain '.' components".into())
                }
            }
        }
        if clean.as_os_str().as_bytes().contains(&0) {
            return Err("must not contain NUL".into());
        }
        Ok(Self(clean))
    }

    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// The last component; `None` only for `/`.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.0.file_name()
    }

    pub fn parent(&self) -> Option<AbsPath> {
        self.0.parent().map(|p| Self(p.to_path_buf()))
    }

    pub fn join(&self, name: &str) -> Result<AbsPath, String> {
        Self::from_path(&self.0.join(name))
    }
}

impl TryFrom<PathBuf> for AbsPath {
    type Error = String;
    fn try_from(path: PathBuf) -> Result<Self, String> {
        Self::from_path(&path)
    }
}

impl From<AbsPath> for PathBuf {
    fn from(p: AbsPath) -> PathBuf {
        p.0
    }
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.display(), f)
    }
}

impl fmt::Debug for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A block device the node made or found: its `/dev` path and its device number.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockDevice {
    pub path: AbsPath,
    pub major: u32,
    pub minor: u32,
}

impl BlockDevice {
    /// The kernel's name for it (`loop3`, `nvme1n1`): the last component of its path.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl fmt::Display for BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}:{})", self.path, self.major, self.minor)
    }
}

/// One command-line argument. Implemented only for validated values and static text, so a
/// command cannot be built from an unchecked string.
pub trait CommandArg {
    fn to_arg(&self) -> OsString;
}

impl CommandArg for &'static str {
    fn to_arg(&self) -> OsString {
        OsString::from(*self)
    }
}

impl CommandArg for AbsPath {
    fn to_arg(&self) -> OsString {
        self.0.clone().into_os_string()
    }
}

impl CommandArg for BlockDevice {
    fn to_arg(&self) -> OsString {
        self.path.to_arg()
    }
}

/// What is at a path, looked at without following a symlink there ([`super::confine`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Nothing,
    Directory,
    /// A block device node with this device number.
    BlockDevice {
        major: u32,
        minor: u32,
        mode: u32,
    },
    RegularFile {
        len: u64,
    },
    Symlink,
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_clean_paths_only() {
        for ok in ["/a", "/var/lib/kubelet/pods/x/volumes/y", "/a/b/", "//a//b"] {
            let p = AbsPath::parse_field(ok, "target_path").unwrap();
            assert!(!p.to_string().contains("//"), "{p}");
        }
        assert_eq!(
            AbsPath::parse_field("/a/b/", "f").unwrap().to_string(),
            "/a/b"
        );
        for bad in [
            "", "a/b", "./a", "/a/../b", "/a/./b", "/a\0b", "..", "relative",
        ] {
            let err = AbsPath::parse_field(bad, "target_path").unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        field: "target_path",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
        let long = format!("/{}", "x".repeat(MAX_PATH_LEN));
        assert!(AbsPath::parse_field(&long, "p").is_err());
    }

    #[test]
    fn serde_refuses_unclean_paths() {
        let ok: AbsPath = serde_json::from_str("\"/a/b\"").unwrap();
        assert_eq!(ok.to_string(), "/a/b");
        assert!(serde_json::from_str::<AbsPath>("\"/a/../b\"").is_err());
        assert!(serde_json::from_str::<AbsPath>("\"a\"").is_err());
    }
}
