//! Copies of an image as one point in time: a reflink, a sparse copy of an image nobody writes,
//! or a sparse copy while the node plugin in this process holds the volume frozen.

use super::super::copy::{copy_still, try_reflink, Copied, CopyError, Writers};
use super::super::quiesce::Quiesced;
use super::steps::Stop;
use super::{Files, Step, NOT_STAGED, NO_NODE_PLUGIN, REFLINK_HINT};
use crate::backend::{BackendError, ContentSource};

impl Files {
    /// Copies the first `len` bytes of `source`'s image `from` into `to` as one point in time:
    /// a reflink; else a sparse copy of an image nobody writes, or, for a volume staged by the
    /// node plugin in this process, a sparse copy while that plugin holds its filesystem frozen
    /// (consulting `frozen_step` inside the freeze). An image in use that can be neither
    /// reflinked nor frozen is [`BackendError::InUse`], saying what to do instead.
    pub(super) fn copy(
        &self,
        from: &std::fs::File,
        to: &std::fs::File,
        len: u64,
        source: &ContentSource,
        frozen_step: Option<(Step, &str)>,
    ) -> Result<Copied, Stop> {
        let refused = |hint: &str, e: CopyError| -> Stop {
            Stop::Failed(match e {
                CopyError::Io(e) => BackendError::io(format!("copying {source}"))(e),
                CopyError::Busy(why) => {
                    BackendError::InUse(format!("cannot copy {source} now: {why}; {hint}"))
                }
                CopyError::Thawed => BackendError::InUse(format!(
                    "cannot copy {source} now: {}; {hint}",
                    CopyError::Thawed
                )),
            })
        };
        if let Some(copied) = try_reflink(from, to, len).map_err(|e| refused("", e))? {
            return Ok(copied);
        }
        let volume = match (source, self.quiescer.get()) {
            (ContentSource::Volume(v), Some((quiescer, window))) => Some((v, quiescer, *window)),
            _ => None,
        };
        let Some((volume, quiescer, window)) = volume else {
            return copy_still(from, to, len, Writers::Unknown)
                .map_err(|e| refused(NO_NODE_PLUGIN, e));
        };
        let hold = match quiescer.quiesce(volume, window) {
            Ok(Quiesced::Frozen(hold)) => hold,
            Ok(Quiesced::NotInUse) => {
                return copy_still(from, to, len, Writers::Unknown)
                    .map_err(|e| refused(NOT_STAGED, e));
            }
            Ok(Quiesced::Unfreezable(why)) => {
                return copy_still(from, to, len, Writers::Unknown).map_err(|e| refused(&why, e));
            }
            Err(e) => {
                return Err(Stop::Failed(BackendError::InUse(format!(
                    "cannot copy {source} now: it is staged on this node and could not be frozen \
                     for the copy: {e}; {REFLINK_HINT}"
                ))));
            }
        };
        if let Some((step, id)) = frozen_step {
            self.before(step, id)?;
        }
        let still = || hold.still();
        let copied = copy_still(from, to, len, Writers::Held(&still)).map_err(|e| {
            let hint = format!(
                "it was frozen for at most {window:?}: pause or stop the VM using it and retry, \
                 or {REFLINK_HINT}"
            );
            refused(&hint, e)
        })?;
        drop(hold);
        tracing::info!(volume_id = %volume, bytes_copied = copied.bytes_copied, "copied while its filesystem was frozen");
        Ok(copied)
    }
}
