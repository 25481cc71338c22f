//! The seam through which the file backend asks whoever holds a volume in use to hold it still
//! while its image is copied without a reflink (a snapshot or a clone on ext4, say).
//!
//! The backend owns the copy and knows nothing of nodes, mounts or freezing; the implementation
//! (the node plugin's `node::freeze`, present only when the node plugin runs in the same process,
//! `--mode all`) owns how a volume is held still and must release it when the [`Hold`] is
//! dropped, whatever happened to the copy. Without an implementation (a controller alone) the
//! backend copies only images nobody has open for writing, as before.

use std::time::Duration;

use crate::ids::VolumeId;

/// How long a volume's filesystem may stay frozen for one copy. A VM's writes block while it is
/// frozen; a copy that needs longer is refused (and the filesystem thawed at this bound), so a
/// large image does not stall its VM for minutes.
pub const FREEZE_WINDOW: Duration = Duration::from_secs(10);

/// Holds volumes still for a copy. Called on the copy's blocking thread, so implementations may
/// block (for the volume's turn, for the freeze itself).
pub trait Quiescer: Send + Sync + 'static {
    /// Holds `volume` still for at most `window` from now: until the returned [`Hold`] is dropped
    /// or the window passes, whichever comes first.
    fn quiesce(&self, volume: &VolumeId, window: Duration) -> Result<Quiesced, QuiesceError>;
}

/// What [`Quiescer::quiesce`] found.
pub enum Quiesced {
    /// Not staged here: nothing this process runs writes the volume (anyone else who does still
    /// shows as a writer of its image, and the copy refuses).
    NotInUse,
    /// Its filesystem is frozen (every write flushed, new ones wait) until the hold is dropped.
    Frozen(Box<dyn Hold>),
    /// Staged here with nothing that can be frozen (raw block): why, and what to do instead.
    Unfreezable(String),
}

/// A frozen volume. Dropping it thaws the volume (always, on every path: success, failure,
/// panic) and lets node calls on the volume proceed again.
pub trait Hold: Send {
    /// Whether the volume is still frozen by this hold: false once the window has passed, when
    /// it was thawed (or is about to be) and writes may have resumed.
    fn still(&self) -> bool;
}

/// The volume is in use and could not be held still.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuiesceError(pub String);
