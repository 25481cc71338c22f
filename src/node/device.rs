//! Where a volume's block device comes from on this node. [`DeviceSource`] is the seam: the
//! file backend's images become loop devices here ([`LoopDevices`]); the RDS backend's
//! NVMe/TCP namespaces plug in beside it.
//!
//! Owns attaching and detaching devices, and finding the ones an earlier process attached (the
//! kernel is the record: a loop device's backing file is read from sysfs). Never detaches a
//! device it cannot prove belongs to the volume: before a loop device is detached, the kernel's
//! own record of what it is bound to (`LOOP_GET_STATUS64`: the backing file's device and inode)
//! must name the volume's image, since sysfs's path may be stale by then (the loop freed and
//! re-bound to another image in between).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::command::{Cmd, CommandRunner};
use super::paths::{AbsPath, BlockDevice};
use super::work;
use super::NodeError;
use crate::domain::{PUBLISH_BACKEND_KEY, PUBLISH_IMAGE_PATH_KEY};
use crate::ids::VolumeId;

/// What backs a volume on this node, recorded with its stage so an unstage after a restart
/// knows what to detach.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Backing {
    /// An image file of the file backend, attached as a loop device.
    File { image: AbsPath },
    /// A namespace of the RDS, reached over NVMe/TCP.
    Nvme(crate::backend::rds::values::NvmeTarget),
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { image } => write!(f, "image {image}"),
            Self::Nvme(t) => write!(f, "NVMe/TCP subsystem {}", t.nqn),
        }
    }
}

#[async_trait]
pub trait DeviceSource: Send + Sync + 'static {
    /// The backend this source serves, as `publish_context["backend"]` names it.
    fn kind(&self) -> &'static str;
    /// Where `volume` lives, from what the controller put in `publish_context` and the
    /// provisioner in `volume_context` (both empty after a restart: the id must then suffice
    /// to find and release it). Keys this source does not use are ignored. May look at the
    /// filesystem when a context names a path (the file backend resolves
    /// `publish_context["imagePath"]`): a caller passing a request's contexts runs it on the
    /// blocking pool. With empty contexts it does no I/O.
    fn locate(
        &self,
        volume: &VolumeId,
        publish_context: &HashMap<String, String>,
        volume_context: &HashMap<String, String>,
    ) -> Result<Backing, NodeError>;
    /// Whether the volume's storage exists (false: NOT_FOUND for RPCs that need it).
    async fn exists(&self, backing: &Backing) -> Result<bool, NodeError>;
    /// The device already attached for `backing`, if any (after a restart too).
    async fn find(&self, backing: &Backing) -> Result<Option<BlockDevice>, NodeError>;
    /// Attaches `backing`, or returns the device already attached for it. Idempotent.
    async fn attach(&self, backing: &Backing) -> Result<BlockDevice, NodeError>;
    /// Detaches the device attached for `backing`; nothing attached is success.
    async fn detach(&self, backing: &Backing) -> Result<(), NodeError>;
    /// Makes an attached device see its backing's current size; returns the size in bytes.
    async fn refresh_size(&self, backing: &Backing, device: &BlockDevice)
        -> Result<u64, NodeError>;
    /// Whether `device` is still attached to `backing` (for VolumeCondition).
    async fn healthy(&self, backing: &Backing, device: &BlockDevice) -> Result<bool, NodeError>;
}

/// How long a detach waits for the kernel to release a device still open elsewhere.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The file backend's images as loop devices, through `losetup` (argument vectors) and sysfs.
pub struct LoopDevices<R> {
    runner: R,
    /// The canonical `--file-root`: only images directly inside it are attached.
    file_root: PathBuf,
    /// `/sys` normally; a directory a test builds otherwise.
    sysfs: PathBuf,
    /// `LOOP_GET_STATUS64` on `/dev/<name>` normally; a test's fake otherwise.
    status: Arc<StatusReader>,
    /// Runs once, in the next detach, after sysfs is read and before the kernel is asked what
    /// the loop is bound to: where a test re-binds the loop to another image.
    before_check: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Reads what a loop device is bound to; `Ok(None)` when it is bound to nothing.
pub type StatusReader = dyn Fn(&str) -> std::io::Result<Option<LoopStatus>> + Send + Sync;

/// A file as the loop driver identifies its backing: the filesystem's device and the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

impl FileId {
    /// The identity of the file at `path` (following no symlink: images are regular files).
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let st = rustix::fs::lstat(path)?;
        Ok(FileId {
            dev_major: rustix::fs::major(st.st_dev),
            dev_minor: rustix::fs::minor(st.st_dev),
            inode: st.st_ino,
        })
    }
}

/// What `LOOP_GET_STATUS64` reports of a bound loop device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopStatus {
    pub backing: FileId,
    /// `LO_FLAGS_AUTOCLEAR`: detached already, freed when its last user closes it.
    pub autoclear: bool,
}

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Decodes the kernel's `huge_encode_dev` form of a device number.
fn decode_huge_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

/// `LOOP_GET_STATUS64` on `/dev/<name>`: what the kernel says the loop device is bound to.
pub fn kernel_loop_status(name: &str) -> std::io::Result<Option<LoopStatus>> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::File::open(format!("/dev/{name}"))?;
    // SAFETY: all-zero bytes are a valid loop_info64 (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 to the pointer, which is valid and
    // exclusively borrowed for the call; the fd is open for its duration.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_GET_STATUS64 as _,
            &mut info as *mut LoopInfo64,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    let (dev_major, dev_minor) = decode_huge_dev(info.lo_device);
    Ok(Some(LoopStatus {
        backing: FileId {
            dev_major,
            dev_minor,
            inode: info.lo_inode,
        },
        autoclear: info.lo_flags & LO_FLAGS_AUTOCLEAR != 0,
    }))
}

/// One loop device as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopInfo {
    pub name: String,
    pub major: u32,
    pub minor: u32,
    pub backing_file: PathBuf,
    /// The backing file was deleted while attached (sysfs appends " (deleted)").
    pub backing_deleted: bool,
    /// Detached while still open: the kernel frees it when its last user closes it.
    pub autoclear: bool,
    pub size_bytes: u64,
}

impl<R: CommandRunner> LoopDevices<R> {
    /// `file_root` must exist; it is canonicalized so the images' paths match what sysfs
    /// reports.
    pub fn new(runner: R, file_root: &Path, sysfs: impl Into<PathBuf>) -> Result<Self, NodeError> {
        let file_root = std::fs::canonicalize(file_root).map_err(|source| NodeError::Io {
            action: format!("resolving --file-root {}", file_root.display()),
            source,
        })?;
        Ok(Self {
            runner,
            file_root,
            sysfs: sysfs.into(),
            status: Arc::new(kernel_loop_status),
            before_check: Mutex::new(None),
        })
    }

    /// Reads loop status with `reader` instead of the kernel (a fake sysfs has no `/dev`).
    pub fn with_status_reader(
        mut self,
        reader: impl Fn(&str) -> std::io::Result<Option<LoopStatus>> + Send + Sync + 'static,
    ) -> Self {
        self.status = Arc::new(reader);
        self
    }

    /// Test seam: `hook` runs once in the next detach, after sysfs is read and before the
    /// kernel is asked what each loop device is bound to.
    #[doc(hidden)]
    pub fn before_next_detach_check(&self, hook: impl FnOnce() + Send + 'static) {
        *self.before_check.lock().expect("hook lock") = Some(Box::new(hook));
    }

    /// `LOOP_GET_STATUS64` (through the status reader) on the node's blocking pool.
    async fn status_of(&self, name: &str) -> Result<Option<LoopStatus>, NodeError> {
        let (status, name) = (self.status.clone(), name.to_string());
        work::blocking(format!("LOOP_GET_STATUS64 on /dev/{name}"), move || {
            status(&name).map_err(|source| NodeError::Io {
                action: format!("reading the status of loop device {name}"),
                source,
            })
        })
        .await
    }

    /// Whether `name` is, by the kernel's own record, a live binding of the file `image`
    /// (not an autoclear entry already on its way out).
    async fn bound_to(&self, name: &str, image: FileId) -> Result<bool, NodeError> {
        Ok(self
            .status_of(name)
            .await?
            .is_some_and(|s| s.backing == image && !s.autoclear))
    }

    /// Loop devices the kernel shows bound to the file `image`, live ones only.
    async fn bindings_of(&self, image: FileId) -> Result<Vec<LoopInfo>, NodeError> {
        let mut found = Vec::new();
        for info in self.scan().await? {
            if !info.autoclear && self.bound_to(&info.name, image).await? {
                found.push(info);
            }
        }
        Ok(found)
    }

    /// Detaches the loop device `name` with `losetup --detach`.
    async fn losetup_detach(&self, info: &LoopInfo) -> Result<(), NodeError> {
        let device = Self::device(info)?;
        let cmd = Cmd::new("losetup").arg("--detach").arg(device);
        let out = self.runner.run(&cmd).await?;
        if out.success() {
            Ok(())
        } else {
            Err(tool_failed(&cmd, &out))
        }
    }

    /// After a failed or mismatched attach: detaches the loop devices bound to `image` now that
    /// were not before this call (`before`), so a failed attach leaks none. A loop device bound
    /// to anything else is never touched.
    async fn undo_attach(&self, image: FileId, before: &[LoopInfo]) {
        let now = match self.bindings_of(image).await {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "could not list loop devices to undo a failed attach");
                return;
            }
        };
        for info in now
            .iter()
            .filter(|l| !before.iter().any(|b| b.name == l.name))
        {
            match self.losetup_detach(info).await {
                Ok(()) => {
                    tracing::info!(device = %info.name, "detached the loop device a failed attach made")
                }
                Err(e) => {
                    tracing::warn!(device = %info.name, error = %e, "could not detach the loop device a failed attach made")
                }
            }
        }
    }

    fn image_of(&self, volume: &VolumeId) -> Result<AbsPath, NodeError> {
        AbsPath::try_from(self.file_root.join(format!("{volume}.img"))).map_err(|reason| {
            NodeError::Io {
                action: format!("building the image path of {volume}"),
                source: std::io::Error::other(reason),
            }
        })
    }

    /// Every loop device that has a backing file.
    pub fn loops(&self) -> Result<Vec<LoopInfo>, NodeError> {
        Self::loops_in(&self.sysfs)
    }

    /// [`Self::loops`], read on the node's blocking pool: never on an async worker.
    async fn scan(&self) -> Result<Vec<LoopInfo>, NodeError> {
        let sysfs = self.sysfs.clone();
        work::blocking("listing loop devices in sysfs", move || {
            Self::loops_in(&sysfs)
        })
        .await
    }

    fn loops_in(sysfs: &Path) -> Result<Vec<LoopInfo>, NodeError> {
        let block = sysfs.join("block");
        let entries = match std::fs::read_dir(&block) {
            Ok(e) => e,
            Err(source) => {
                return Err(NodeError::Io {
                    action: format!("listing {}", block.display()),
                    source,
                })
            }
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let dir = block.join(&name);
            let Ok(backing) = std::fs::read_to_string(dir.join("loop/backing_file")) else {
                continue;
            };
            let Ok(dev) = std::fs::read_to_string(dir.join("dev")) else {
                continue;
            };
            let size = std::fs::read_to_string(dir.join("size")).unwrap_or_default();
            if let Some(mut info) = parse_loop(&name, &backing, &dev, &size) {
                info.autoclear = std::fs::read_to_string(dir.join("loop/autoclear"))
                    .is_ok_and(|a| a.trim() == "1");
                found.push(info);
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// The live loop device of `image`: not one whose image was deleted, and not one already
    /// detached and waiting for its last user to close it.
    async fn loop_for(&self, image: &AbsPath) -> Result<Option<LoopInfo>, NodeError> {
        Ok(self
            .scan()
            .await?
            .into_iter()
            .find(|l| l.backing_file == image.as_path() && !l.backing_deleted && !l.autoclear))
    }

    /// Whether sysfs still shows `name` bound to a deleted file that had `image`'s name.
    async fn still_deleted(&self, name: &str, image: &AbsPath) -> Result<bool, NodeError> {
        Ok(self
            .scan()
            .await?
            .iter()
            .any(|l| l.name == name && l.backing_deleted && l.backing_file == image.as_path()))
    }

    async fn bound(&self, name: &str, image: &AbsPath) -> Result<bool, NodeError> {
        Ok(self
            .scan()
            .await?
            .iter()
            .any(|l| l.name == name && l.backing_file == image.as_path()))
    }

    fn device(info: &LoopInfo) -> Result<BlockDevice, NodeError> {
        Ok(BlockDevice {
            path: AbsPath::try_from(PathBuf::from(format!("/dev/{}", info.name))).map_err(
                |reason| NodeError::Io {
                    action: format!("naming loop device {}", info.name),
                    source: std::io::Error::other(reason),
                },
            )?,
            major: info.major,
            minor: info.minor,
        })
    }
}

fn file_image(backing: &Backing) -> Result<&AbsPath, NodeError> {
    match backing {
        Backing::File { image } => Ok(image),
        other => Err(NodeError::FailedPrecondition(format!(
            "{other} is not a file-backend volume; this node serves the file backend"
        ))),
    }
}

/// Parses the sysfs attributes of one loop device; `None` when they are not a loop device's.
pub fn parse_loop(name: &str, backing_file: &str, dev: &str, size: &str) -> Option<LoopInfo> {
    let backing = backing_file.trim_end_matches('\n');
    if backing.is_empty() {
        return None;
    }
    let (path, deleted) = match backing.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (backing, false),
    };
    let (major, minor) = dev.trim().split_once(':')?;
    Some(LoopInfo {
        name: name.to_string(),
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        backing_file: PathBuf::from(path),
        backing_deleted: deleted,
        autoclear: false,
        size_bytes: size.trim().parse::<u64>().unwrap_or(0).saturating_mul(512),
    })
}

/// Parses `losetup --find --show` output: one `/dev/loopN` line.
pub fn parse_losetup_show(stdout: &str) -> Option<String> {
    let line = stdout.trim();
    let name = line.strip_prefix("/dev/")?;
    let digits = name.strip_prefix("loop")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| name.to_string())
}

fn tool_failed(cmd: &Cmd, out: &super::command::Output) -> NodeError {
    NodeError::Tool {
        command: cmd.to_string(),
        code: out.code,
        message: out.message(),
    }
}

#[async_trait]
impl<R: CommandRunner> DeviceSource for LoopDevices<R> {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn locate(
        &self,
        volume: &VolumeId,
        publish_context: &HashMap<String, String>,
        _volume_context: &HashMap<String, String>,
    ) -> Result<Backing, NodeError> {
        let image = self.image_of(volume)?;
        if let Some(backend) = publish_context.get(PUBLISH_BACKEND_KEY) {
            if backend != self.kind() {
                return Err(NodeError::invalid(
                    "publish_context",
                    format!(
                        "names backend {backend:?}, but this node serves the {:?} backend",
                        self.kind()
                    ),
                ));
            }
        }
        if let Some(named) = publish_context.get(PUBLISH_IMAGE_PATH_KEY) {
            let same = std::fs::canonicalize(named)
                .map(|p| p == image.as_path())
                .unwrap_or(Path::new(named) == image.as_path());
            if !same {
                return Err(NodeError::invalid(
                    "publish_context",
                    format!(
                        "imagePath {named:?} is not volume {volume}'s image on this node ({image})"
                    ),
                ));
            }
        }
        Ok(Backing::File { image })
    }

    async fn exists(&self, backing: &Backing) -> Result<bool, NodeError> {
        let image = file_image(backing)?;
        let image = image.clone();
        work::blocking(
            format!("looking at {image}"),
            move || match std::fs::symlink_metadata(image.as_path()) {
                Ok(meta) => Ok(meta.file_type().is_file()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(source) => Err(NodeError::Io {
                    action: format!("looking at {image}"),
                    source,
                }),
            },
        )
        .await
    }

    async fn find(&self, backing: &Backing) -> Result<Option<BlockDevice>, NodeError> {
        let image = file_image(backing)?;
        self.loop_for(image)
            .await?
            .as_ref()
            .map(Self::device)
            .transpose()
    }

    async fn attach(&self, backing: &Backing) -> Result<BlockDevice, NodeError> {
        let image = file_image(backing)?;
        if let Some(existing) = self.loop_for(image).await? {
            tracing::debug!(image = %image, device = %existing.name, "reusing the loop device already attached");
            return Self::device(&existing);
        }
        if !self.exists(backing).await? {
            return Err(NodeError::NotFound(format!(
                "the volume's image {image} does not exist"
            )));
        }
        let img = image.clone();
        let id = work::blocking(
            format!("stat {image} for its device and inode"),
            move || {
                FileId::of(img.as_path()).map_err(|source| NodeError::Io {
                    action: format!("looking at {img}"),
                    source,
                })
            },
        )
        .await?;
        let before = self.bindings_of(id).await?;
        let cmd = Cmd::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg("--")
            .arg(image.clone());
        let attached = async {
            let out = self.runner.run(&cmd).await?;
            if !out.success() {
                return Err(tool_failed(&cmd, &out));
            }
            let name = parse_losetup_show(&out.stdout).ok_or_else(|| NodeError::Tool {
                command: cmd.to_string(),
                code: out.code,
                message: format!("unexpected output {:?}", out.stdout.trim()),
            })?;
            // The kernel's record, not sysfs's path: the device losetup named may have been
            // freed and re-bound to another image since.
            let found = self.scan().await?.into_iter().find(|l| l.name == name);
            let bound = found.is_some() && self.bound_to(&name, id).await?;
            let info = match found {
                Some(info) if bound => info,
                _ => {
                    return Err(NodeError::Tool {
                        command: cmd.to_string(),
                        code: out.code,
                        message: format!("{name} is not bound to {image} after attaching"),
                    })
                }
            };
            Ok(info)
        }
        .await;
        match attached {
            Ok(info) => {
                tracing::info!(image = %image, device = %info.name, "attached loop device");
                Self::device(&info)
            }
            Err(e) => {
                self.undo_attach(id, &before).await;
                Err(e)
            }
        }
    }

    async fn detach(&self, backing: &Backing) -> Result<(), NodeError> {
        let image = file_image(backing)?;
        let img = image.clone();
        let live = match work::blocking(
            format!("stat {image} for its device and inode"),
            move || Ok(FileId::of(img.as_path())),
        )
        .await?
        {
            Ok(id) => Some(id),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(NodeError::Io {
                    action: format!("looking at {image}"),
                    source,
                })
            }
        };
        // A deleted image's loop device is still ours to release.
        let candidates: Vec<LoopInfo> = self
            .scan()
            .await?
            .into_iter()
            .filter(|l| l.backing_file == image.as_path())
            .collect();
        if let Some(hook) = self.before_check.lock().expect("hook lock").take() {
            hook();
        }
        for info in candidates {
            if info.autoclear {
                // Detached already; the kernel frees it when its last user closes it.
                continue;
            }
            let Some(status) = self.status_of(&info.name).await? else {
                continue;
            };
            let ours = !status.autoclear
                && if info.backing_deleted {
                    // Bound to a deleted file that had the image's name: ours while sysfs
                    // still shows that deleted file and the kernel not the live image.
                    Some(status.backing) != live && self.still_deleted(&info.name, image).await?
                } else {
                    Some(status.backing) == live
                };
            if !ours {
                tracing::warn!(image = %image, device = %info.name, kernel = ?status,
                    "loop device is no longer bound to the volume's image (freed and re-bound, or detaching); not detaching it");
                continue;
            }
            if let Err(e) = self.losetup_detach(&info).await {
                if self.bound_to(&info.name, status.backing).await? {
                    return Err(e);
                }
            }
            // A device someone still has open (another process's probe, say) is freed by
            // the kernel when they close it; wait a moment for that, so an unstage that
            // returns has really let go.
            let deadline = tokio::time::Instant::now() + DETACH_WAIT;
            while self.bound(&info.name, image).await? {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(image = %image, device = %info.name,
                        "loop device still open elsewhere; the kernel frees it when the last user closes it");
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            tracing::info!(image = %image, device = %info.name, "detached loop device");
        }
        Ok(())
    }

    async fn refresh_size(
        &self,
        backing: &Backing,
        device: &BlockDevice,
    ) -> Result<u64, NodeError> {
        let image = file_image(backing)?;
        if !self.healthy(backing, device).await? {
            return Err(NodeError::FailedPrecondition(format!(
                "{device} is no longer attached to {image}"
            )));
        }
        let cmd = Cmd::new("losetup")
            .arg("--set-capacity")
            .arg(device.clone());
        let out = self.runner.run(&cmd).await?;
        if !out.success() {
            return Err(tool_failed(&cmd, &out));
        }
        let info = self.loop_for(image).await?.ok_or_else(|| {
            NodeError::FailedPrecondition(format!("{device} vanished while being resized"))
        })?;
        Ok(info.size_bytes)
    }

    async fn healthy(&self, backing: &Backing, device: &BlockDevice) -> Result<bool, NodeError> {
        let image = file_image(backing)?;
        Ok(self
            .loop_for(image)
            .await?
            .is_some_and(|l| l.major == device.major && l.minor == device.minor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::command::CommandError;
    use crate::node::fakes::RecordingRunner;

    fn fake_loop(sys: &Path, n: u32, backing: &str, sectors: u64) {
        let dir = sys.join(format!("block/loop{n}"));
        std::fs::create_dir_all(dir.join("loop")).unwrap();
        std::fs::write(dir.join("loop/backing_file"), format!("{backing}\n")).unwrap();
        std::fs::write(dir.join("dev"), format!("7:{n}\n")).unwrap();
        std::fs::write(dir.join("size"), format!("{sectors}\n")).unwrap();
    }

    /// The fake kernel's `LOOP_GET_STATUS64`, from the fake sysfs: bound to nothing without a
    /// backing file (ENXIO's answer), else the identity of the file sysfs names (a deleted one
    /// gets an identity no live file has), autoclear as sysfs says.
    fn sysfs_kernel(
        sys: PathBuf,
    ) -> impl Fn(&str) -> std::io::Result<Option<LoopStatus>> + Send + Sync + 'static {
        move |name| {
            let dir = sys.join("block").join(name).join("loop");
            let Ok(backing) = std::fs::read_to_string(dir.join("backing_file")) else {
                return Ok(None);
            };
            let backing = backing.trim_end_matches('\n');
            let backing = match backing.strip_suffix(" (deleted)") {
                Some(_) => FileId {
                    dev_major: 0,
                    dev_minor: 0,
                    inode: u64::from(name.len() as u32) << 32,
                },
                None => FileId::of(Path::new(backing))?,
            };
            let autoclear =
                std::fs::read_to_string(dir.join("autoclear")).is_ok_and(|a| a.trim() == "1");
            Ok(Some(LoopStatus { backing, autoclear }))
        }
    }

    fn loop_devices(
        runner: RecordingRunner,
        root: &Path,
        sys: &Path,
    ) -> LoopDevices<RecordingRunner> {
        LoopDevices::new(runner, root, sys)
            .unwrap()
            .with_status_reader(sysfs_kernel(sys.to_path_buf()))
    }

    fn exit(code: i32, stdout: &str) -> Result<crate::node::command::Output, CommandError> {
        Ok(crate::node::command::Output {
            code: Some(code),
            stdout: stdout.into(),
            stderr: if code == 0 {
                String::new()
            } else {
                "losetup: failed".into()
            },
        })
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("volumes");
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(sys.join("block/vda")).unwrap();
        (dir, std::fs::canonicalize(root).unwrap(), sys)
    }

    fn vol(id: &str) -> VolumeId {
        VolumeId::try_from(id).unwrap()
    }

    #[test]
    fn parsers() {
        let info = parse_loop("loop3", "/v/a.img (deleted)\n", "7:3\n", "2048\n").unwrap();
        assert!(info.backing_deleted);
        assert_eq!(info.backing_file, PathBuf::from("/v/a.img"));
        assert_eq!((info.major, info.minor, info.size_bytes), (7, 3, 1 << 20));
        assert!(parse_loop("loop3", "\n", "7:3", "0").is_none());
        assert!(parse_loop("loop3", "/a", "junk", "0").is_none());
        assert_eq!(
            parse_losetup_show("/dev/loop12\n").as_deref(),
            Some("loop12")
        );
        for bad in ["", "/dev/sda", "/dev/loop", "/dev/loop1; rm -rf /", "loop1"] {
            assert_eq!(parse_losetup_show(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_attached_image_is_found_and_reused_without_losetup() {
        let (_dir, root, sys) = setup();
        let image = root.join("v1.img");
        std::fs::write(&image, b"").unwrap();
        fake_loop(&sys, 4, image.to_str().unwrap(), 2048);
        fake_loop(&sys, 5, "/elsewhere/v1.img", 2048);
        let runner = RecordingRunner::default();
        let loops = loop_devices(runner.clone(), &root, &sys);
        let backing = loops
            .locate(&vol("v1"), &HashMap::new(), &HashMap::new())
            .unwrap();
        let dev = loops.attach(&backing).await.unwrap();
        assert_eq!(
            (dev.path.to_string(), dev.major, dev.minor),
            ("/dev/loop4".into(), 7, 4)
        );
        assert!(
            runner.calls().is_empty(),
            "no losetup for a device already attached"
        );
    }

    #[tokio::test]
    async fn attach_runs_losetup_with_an_argument_vector_and_verifies_the_binding() {
        let (_dir, root, sys) = setup();
        let image = root.join("v1.img");
        std::fs::write(&image, b"").unwrap();
        let runner = RecordingRunner::default();
        let sys2 = sys.clone();
        let img = image.to_str().unwrap().to_string();
        runner.on("losetup --find", move |_| {
            fake_loop(&sys2, 9, &img, 8);
            Ok(crate::node::command::Output {
                code: Some(0),
                stdout: "/dev/loop9\n".into(),
                stderr: String::new(),
            })
        });
        let loops = loop_devices(runner.clone(), &root, &sys);
        let backing = loops
            .locate(&vol("v1"), &HashMap::new(), &HashMap::new())
            .unwrap();
        let dev = loops.attach(&backing).await.unwrap();
        assert_eq!(dev.name(), "loop9");
        assert_eq!(
            runner.calls(),
            vec![format!("losetup --find --show -- {}", image.display())]
        );
    }

    #[tokio::test]
    async fn detach_touches_only_the_volumes_own_loop_devices() {
        let (_dir, root, sys) = setup();
        let image = root.join("v1.img");
        fake_loop(&sys, 1, "/other/v1.img", 8);
        fake_loop(&sys, 2, &format!("{} (deleted)", image.display()), 8);
        let runner = RecordingRunner::default();
        let sys2 = sys.clone();
        runner.on("losetup --detach /dev/loop2", move |_| {
            std::fs::remove_dir_all(sys2.join("block/loop2/loop")).unwrap();
            Ok(crate::node::command::Output {
                code: Some(0),
                ..Default::default()
            })
        });
        let loops = loop_devices(runner.clone(), &root, &sys);
        let backing = Backing::File {
            image: AbsPath::try_from(image).unwrap(),
        };
        loops.detach(&backing).await.unwrap();
        assert_eq!(
            runner.calls(),
            vec!["losetup --detach /dev/loop2".to_string()]
        );
    }

    fn file_backing(image: &Path) -> Backing {
        Backing::File {
            image: AbsPath::try_from(image.to_path_buf()).unwrap(),
        }
    }

    /// Catches dropping the kernel-status check in `detach` (or reading only sysfs's path): a
    /// loop that sysfs listed as the image's, but that was freed and re-bound to another image
    /// before the check, is not detached; nor is an autoclear entry (sysfs's or the kernel's).
    #[tokio::test]
    async fn detach_leaves_a_loop_rebound_to_another_image_and_autoclear_entries() {
        let (_dir, root, sys) = setup();
        let image = root.join("v1.img");
        let other = root.join("other.img");
        std::fs::write(&image, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        fake_loop(&sys, 3, image.to_str().unwrap(), 8);
        fake_loop(&sys, 4, image.to_str().unwrap(), 8);
        std::fs::write(sys.join("block/loop4/loop/autoclear"), "1\n").unwrap();
        let runner = RecordingRunner::default();
        let loops = loop_devices(runner.clone(), &root, &sys);
        let (sys2, other2) = (sys.clone(), other.clone());
        loops.before_next_detach_check(move || {
            std::fs::write(
                sys2.join("block/loop3/loop/backing_file"),
                format!("{}\n", other2.display()),
            )
            .unwrap();
        });
        loops.detach(&file_backing(&image)).await.unwrap();
        assert_eq!(runner.calls(), Vec::<String>::new(), "nothing detached");
    }

    /// Catches dropping `undo_attach` after a failed `losetup --find`: the loop device it
    /// bound to the image before failing is detached, and only that one.
    #[tokio::test]
    async fn a_failed_attach_leaks_no_loop_device() {
        let (_dir, root, sys) = setup();
        let image = root.join("v1.img");
        std::fs::write(&image, b"").unwrap();
        let runner = RecordingRunner::default();
        let (sys2, img) = (sys.clone(), image.display().to_string());
        runner.on("losetup --find", move |_| {
            fake_loop(&sys2, 7, &img, 8);
            exit(1, "")
        });
        runner.ok("losetup --detach /dev/loop7");
        let loops = loop_devices(runner.clone(), &root, &sys);
        let err = loops.attach(&file_backing(&image)).await.unwrap_err();
        assert!(err.to_string().contains("losetup"), "{err}");
        assert_eq!(
            runner.calls(),
            vec![
                format!("losetup --find --show -- {}", image.display()),
                "losetup --detach /dev/loop7".to_string()
            ]
        );
    }

    /// Catches trusting losetup's output (or sysfs's path) after attach: the device it names,
    /// re-bound to another image by now, is left alone; the image's own new binding is
    /// detached.
    #[tokio::test]
    async fn an_attach_whose_device_was_rebound_detaches_only_what_it_attached() {
        let (_dir, root, sys) = setup();
        let image = root.join("v1.img");
        let other = root.join("other.img");
        std::fs::write(&image, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let runner = RecordingRunner::default();
        let (sys2, img, oth) = (
            sys.clone(),
            image.display().to_string(),
            other.display().to_string(),
        );
        runner.on("losetup --find", move |_| {
            fake_loop(&sys2, 7, &oth, 8);
            fake_loop(&sys2, 8, &img, 8);
            exit(0, "/dev/loop7\n")
        });
        runner.ok("losetup --detach /dev/loop8");
        let loops = loop_devices(runner.clone(), &root, &sys);
        let err = loops.attach(&file_backing(&image)).await.unwrap_err();
        assert!(err.to_string().contains("not bound"), "{err}");
        assert_eq!(
            runner.calls(),
            vec![
                format!("losetup --find --show -- {}", image.display()),
                "losetup --detach /dev/loop8".to_string()
            ]
        );
    }

    #[test]
    fn a_context_naming_another_image_or_backend_is_refused() {
        let (_dir, root, sys) = setup();
        let loops = loop_devices(RecordingRunner::default(), &root, &sys);
        let ctx = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        let err = loops
            .locate(
                &vol("v1"),
                &ctx(PUBLISH_IMAGE_PATH_KEY, "/etc/shadow"),
                &HashMap::new(),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::InvalidArgument {
                    field: "publish_context",
                    ..
                }
            ),
            "{err}"
        );
        let err = loops
            .locate(
                &vol("v1"),
                &ctx(PUBLISH_BACKEND_KEY, "rds"),
                &HashMap::new(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("rds"), "{err}");
        let own = root.join("v1.img").display().to_string();
        let mut ok = ctx(PUBLISH_IMAGE_PATH_KEY, &own);
        ok.insert("somethingElse".into(), "ignored".into());
        ok.insert(
            crate::domain::PUBLISH_ATTACHED_AT_KEY.into(),
            "2026-01-02T03:04:05.123456789Z".into(),
        );
        assert!(
            loops.locate(&vol("v1"), &ok, &HashMap::new()).is_ok(),
            "unknown keys are ignored"
        );
    }
}
