//! The one place errors become gRPC statuses. Both matches are exhaustive with no `_` arm, so a
//! new error variant cannot reach a client without a deliberate code choice.

use tonic::{Code, Status};

use crate::node::NodeError;
use crate::{BackendError, Error};

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::VolumeNotFound(_) | Error::NodeNotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Conflict { .. }
            | Error::MigrationLimit { .. }
            | Error::StillPublished { .. } => Code::FailedPrecondition,
            Error::NodeFull { .. } => Code::ResourceExhausted,
            Error::NotReady | Error::NotActive(_) | Error::Unavailable(_) | Error::Retired => {
                Code::Unavailable
            }
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Aborted(_) => Code::Aborted,
            Error::Backend(b) => match b {
                BackendError::AlreadyExists(_) => Code::AlreadyExists,
                BackendError::OutOfRange(_) => Code::OutOfRange,
                BackendError::NotFound(_) | BackendError::SnapshotNotFound(_) => Code::NotFound,
                BackendError::InUse(_) => Code::FailedPrecondition,
                BackendError::Corrupt(_) | BackendError::Io { .. } | BackendError::Rejected(_) => {
                    Code::Internal
                }
                BackendError::InvalidArgument { .. } => Code::InvalidArgument,
                BackendError::Unavailable(_) => Code::Unavailable,
                BackendError::ResourceExhausted(_) => Code::ResourceExhausted,
            },
        };
        Status::new(code, err.to_string())
    }
}

impl From<NodeError> for Status {
    fn from(err: NodeError) -> Self {
        Status::new(node_code(&err), err.to_string())
    }
}

fn node_code(err: &NodeError) -> Code {
    match err {
        NodeError::InvalidArgument { .. } => Code::InvalidArgument,
        NodeError::NotFound(_) => Code::NotFound,
        NodeError::AlreadyExists(_) => Code::AlreadyExists,
        NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
        NodeError::OutOfRange(_) => Code::OutOfRange,
        NodeError::Command(_)
        | NodeError::Tool { .. }
        | NodeError::Mount(_)
        | NodeError::Io { .. } => Code::Internal,
        NodeError::Aborted(_) => Code::Aborted,
        NodeError::Busy(_) => Code::Unavailable,
        // It may still complete: the kubelet treats the volume's state as uncertain.
        NodeError::Stuck(_) => Code::DeadlineExceeded,
        NodeError::Joined(inner) => node_code(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The codes of the node's cancellation and pool errors, and a joined answer keeping the
    /// code of what it wraps. Catches a joined error mapped as its own kind (INTERNAL, say),
    /// which would turn the kubelet's NOT_FOUND or ALREADY_EXISTS into a retry loop.
    #[test]
    fn pending_stuck_busy_and_joined_node_errors_get_their_codes() {
        let code = |e: NodeError| Status::from(e).code();
        assert_eq!(
            code(NodeError::Aborted("in progress".into())),
            Code::Aborted
        );
        assert_eq!(
            code(NodeError::Stuck("mount".into())),
            Code::DeadlineExceeded
        );
        assert_eq!(code(NodeError::Busy("full".into())), Code::Unavailable);
        let joined = NodeError::Joined(Arc::new(NodeError::AlreadyExists("x".into())));
        assert_eq!(code(joined), Code::AlreadyExists);
    }
}
