//! The node plugin's volumes: staging, publishing, stats and expansion on this machine.
//!
//! Owns what happens on the node: block devices (through [`device::DeviceSource`]), mounts and
//! device nodes (through [`mounter::Mounter`]), external tools (through
//! [`command::CommandRunner`]) and the node's records of what it staged. It never touches
//! attachment state (that is the controller's) and knows nothing of gRPC: `grpc::node`
//! validates requests into the types here and maps [`NodeError`] to status codes.
//!
//! **Adoption.** A volume staged with no record of ours (the Go node plugin writes none) is
//! adopted by the first NodePublishVolume or NodeExpandVolume that finds the kernel showing it
//! staged (its own device mounted at the staging path, or for block attached); the record it
//! writes says so ([`records::Origin::Adopted`]). A mount of another device is never adopted.
//!
//! **Confinement.** Every staging path and target lies beneath `--kubelet-dir` and is touched
//! only through [`confine::KubeletRoot`], which resolves it from a directory fd on that root
//! and never follows a symlink beneath it.
//!
//! **Serialization.** Node RPCs for one volume never interleave; RPCs for different volumes run
//! in parallel. This uses a per-volume async lock ([`locks::VolumeLocks`]) rather than an actor
//! per volume: the node holds no in-memory state worth owning (the kernel and the record files
//! are the state), its work is a sequence of blocking tools and syscalls, and the kubelet's
//! overlapping retries only need to wait their turn. An actor would add a mailbox and a thread
//! hop and own nothing. Calls on one path wait for each other too ([`confine::PathLocks`]):
//! two volumes published at one target never interleave.
//!
//! **Blocking work** (syscalls, record files, device reads) runs on a bounded pool with a
//! timeout per job ([`work`]); external tools run as child processes with a timeout of their
//! own, never killed because a caller went away ([`command`]). No RPC blocks an async worker.
//!
//! **Cancellation.** A changing call (stage, unstage, publish, unpublish, expand) runs to the
//! end in a task of its own, holding the volume's lock, whatever happens to the RPC that
//! asked for it; a repeat joins it, and a caller whose deadline comes first is answered
//! ABORTED ([`locks`]).
//!
//! **Ownership** is decided in one place: before any call unmounts, removes, publishes from or
//! measures a path, [`ownership::decide`] says whether what is there is the volume's, from its
//! record's device history, the device its backing resolves to now and the mount table. A
//! mount left by a device that vanished or was renumbered is still the volume's; a mount of
//! any other device never is.
//!
//! **Which file owns what:**
//! - [`plugin`]: the CSI node calls, in order (stage, unstage, publish, unpublish, stats,
//!   expand) and the syscalls they make through the seams; `plugin/identity.rs` holds a
//!   request to its volume's storage and judges paths with `ownership`;
//!   `plugin/adoption.rs` answers for volumes with no record (adoption, read-only calls).
//! - [`ownership`]: the pure rule "does what is at this path belong to this volume".
//! - [`records`]: the per-volume record files (staging path, targets, device history).
//! - [`device`] (loop devices) and [`nvme`] (NVMe/TCP): where a block device comes from.
//! - [`mounter`] and [`mountinfo`]: making mounts and device nodes, reading the mount table.
//! - [`filesystem`] and [`command`]: probing, formatting, checking and growing filesystems
//!   through external tools run as argument vectors.
//! - [`paths`]: validated path values, pure; [`confine`]: every file operation on a path the
//!   CO names, beneath `--kubelet-dir`, and how mountinfo names such a path; [`locks`]: the
//!   per-volume turn and the calls in flight; [`work`]: the bounded pool blocking jobs run on.
//! - [`reconciler`]: the RDS node's periodic pass (stale staging mounts recovered, orphaned
//!   NVMe/TCP connections nothing uses disconnected), under the same per-volume locks.
//! - [`freeze`]: a staged filesystem frozen for the file backend's copy (`--mode all`).

pub mod command;
pub mod confine;
pub mod device;
#[cfg(test)]
pub(crate) mod fake_sysfs;
pub mod filesystem;
pub mod freeze;
pub mod locks;
pub mod mounter;
pub mod mountinfo;
pub mod nvme;
pub mod ownership;
pub mod paths;
pub mod plugin;
pub mod reconciler;
pub mod records;
pub mod work;

#[cfg(test)]
mod cancel_tests;
#[cfg(test)]
pub(crate) mod fakes;
#[cfg(test)]
pub(crate) mod skips;
#[cfg(test)]
mod skips_tests;

pub use plugin::NodePlugin;

use command::CommandError;
use mounter::MountError;

/// Every way a node operation can fail. `grpc::status` maps each variant to a CSI code.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{field} {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("`{command}` failed (exit {}): {message}", code.map_or("by a signal".to_string(), |c| c.to_string()))]
    Tool {
        command: String,
        code: Option<i32>,
        message: String,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("{action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    /// Another call for the volume is running and the caller's deadline came first (CSI's
    /// code for "an operation is pending for the volume").
    #[error("{0}")]
    Aborted(String),
    /// No slot of the blocking pool freed in time; nothing was done.
    #[error("{0}")]
    Busy(String),
    /// A blocking job ran past its timeout; it may still complete.
    #[error("{0}")]
    Stuck(String),
    /// The answer of the same call already in flight, which this repeat waited for.
    #[error(transparent)]
    Joined(std::sync::Arc<NodeError>),
}

impl NodeError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::OutOfRange(_) => "out_of_range",
            Self::Command(_) | Self::Tool { .. } => "tool_failed",
            Self::Mount(_) => "mount_failed",
            Self::Io { .. } => "io",
            Self::Aborted(_) => "aborted",
            Self::Busy(_) => "busy",
            Self::Stuck(_) => "stuck",
            Self::Joined(inner) => inner.metric_label(),
        }
    }
}

/// Validation errors from the shared parsers (ids, capabilities) keep their field and code.
impl From<crate::Error> for NodeError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::InvalidArgument { field, reason } => {
                Self::InvalidArgument { field, reason }
            }
            crate::Error::VolumeNotFound(v) => Self::NotFound(format!("volume {v} does not exist")),
            crate::Error::AlreadyExists(m) => Self::AlreadyExists(m),
            other => Self::FailedPrecondition(other.to_string()),
        }
    }
}
