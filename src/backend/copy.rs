//! How the file backend copies a volume image into a snapshot, a restored volume or a clone:
//! a reflink where the filesystem can make one, else a sparse-aware copy. Pure file I/O on
//! descriptors the caller opened; blocking, so callers run it on the blocking pool.
//!
//! - [`reflink`] (`FICLONE`) shares the source's extents: no data is copied, and the clone is
//!   the file as it was at one instant (the kernel holds the inode locks and flushes dirty
//!   pages first), so it is crash-consistent even while the image is being written.
//! - [`sparse_copy`] walks the data extents (`SEEK_DATA`/`SEEK_HOLE`) and copies only them,
//!   leaving holes as holes (and skipping all-zero chunks), so a 10 GiB image with 100 MiB
//!   written copies about 100 MiB. It reads the file over time, so it is one point in time only
//!   if nobody writes the image meanwhile: [`copy_image`] checks that, and [`copy_still`] also
//!   accepts an image open for writing whose writers the caller holds still (a frozen
//!   filesystem) for the whole copy.
//! - [`plain_copy`] copies every byte, holes included: what a naive copy does, kept for the
//!   benchmark that compares the three.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Bytes read and written per step of a copy.
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Reflink,
    SparseCopy,
    PlainCopy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::SparseCopy => "sparse copy",
            Self::PlainCopy => "plain copy",
        }
    }
}

/// What a copy did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    pub method: Method,
    /// Bytes written to the destination (0 for a reflink, whose extents are shared).
    pub bytes_copied: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The source was open for writing, or changed, while it would have been copied: the copy
    /// would not be one point in time.
    #[error("{0}")]
    Busy(String),
    /// The image's writers were held still for the copy, but no longer when it ended (the
    /// hold's window passed), so it may not be one point in time.
    #[error("the copy took longer than the volume could stay frozen, so it was thawed first")]
    Thawed,
}

/// Makes `dst` (new and empty) a point-in-time copy of the first `len` bytes of `src`, `len`
/// bytes long: a reflink if the filesystem can make one, else a sparse copy of an image nobody
/// writes meanwhile. `Busy` when the image is open for writing (a loop device attached
/// read-write, a VM) before or after the copy, or changed during it. Does not sync `dst`.
pub fn copy_image(src: &File, dst: &File, len: u64) -> Result<Copied, CopyError> {
    match try_reflink(src, dst, len)? {
        Some(copied) => Ok(copied),
        None => copy_still(src, dst, len, Writers::Unknown),
    }
}

/// A reflink of `src` into `dst`, sized to `len`; `None` when this filesystem (or this pair of
/// files) cannot make one, so the caller copies instead.
pub fn try_reflink(src: &File, dst: &File, len: u64) -> Result<Option<Copied>, CopyError> {
    match reflink(src, dst) {
        Ok(()) => {
            dst.set_len(len)?;
            Ok(Some(Copied {
                method: Method::Reflink,
                bytes_copied: 0,
            }))
        }
        Err(e) if reflink_unsupported(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Who may write the image while [`copy_still`] reads it.
#[derive(Clone, Copy)]
pub enum Writers<'a> {
    /// Anyone: an image open for writing is refused, since nothing holds its writers still.
    Unknown,
    /// Its writers are held still (the filesystem in it is frozen) for as long as the function
    /// answers true; it may be open for writing meanwhile.
    Held(&'a dyn Fn() -> bool),
}

const BUSY: &str = "the image is open for writing (attached to a loop device read-write, or \
                    used by a VM), and this filesystem cannot make a reflink, so a copy \
                    would not be one point in time";

/// A sparse copy of the first `len` bytes of `src` into `dst` that is one point in time or an
/// error: the image must not change while it is read (its size and times are compared before
/// and after), and with [`Writers::Unknown`] nobody may hold it open for writing; with
/// [`Writers::Held`] its writers must still be held when the copy ends (`Thawed` otherwise).
pub fn copy_still(
    src: &File,
    dst: &File,
    len: u64,
    writers: Writers<'_>,
) -> Result<Copied, CopyError> {
    let writable = || match writers {
        Writers::Unknown => open_for_writing(src) == Some(true),
        Writers::Held(_) => false,
    };
    if writable() {
        return Err(CopyError::Busy(BUSY.into()));
    }
    let before = Stamp::of(src)?;
    let bytes_copied = sparse_copy(src, dst, len)?;
    if let Writers::Held(still) = writers {
        if !still() {
            return Err(CopyError::Thawed);
        }
    }
    if writable() || Stamp::of(src)? != before {
        return Err(CopyError::Busy(format!(
            "{BUSY} (it was written while being copied)"
        )));
    }
    Ok(Copied {
        method: Method::SparseCopy,
        bytes_copied,
    })
}

/// `FICLONE`: `dst` becomes a copy of all of `src` sharing its extents.
pub fn reflink(src: &File, dst: &File) -> std::io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(std::io::Error::from)
}

/// Whether a reflink failed because this filesystem (or this pair of files) cannot make one.
pub fn reflink_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Copies the data extents of the first `len` bytes of `src` into `dst`, which is sized to
/// `len` with holes elsewhere; all-zero chunks are not written. Returns the bytes written.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> std::io::Result<u64> {
    use rustix::fs::SeekFrom;
    dst.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0;
    let mut pos = 0;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data after `pos`.
            Err(rustix::io::Errno::NXIO) => break,
            // A filesystem without SEEK_DATA: everything is data.
            Err(rustix::io::Errno::INVAL) if pos == 0 => 0,
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(rustix::io::Errno::NXIO | rustix::io::Errno::INVAL) => len,
            Err(e) => return Err(e.into()),
        };
        copied += copy_range(src, dst, data, hole, &mut buf, true)?;
        pos = hole.max(data + 1);
    }
    Ok(copied)
}

/// Copies every byte of the first `len` bytes of `src` into `dst`, holes included.
pub fn plain_copy(src: &File, dst: &File, len: u64) -> std::io::Result<u64> {
    dst.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    copy_range(src, dst, 0, len, &mut buf, false)
}

fn copy_range(
    src: &File,
    dst: &File,
    from: u64,
    to: u64,
    buf: &mut [u8],
    skip_zeros: bool,
) -> std::io::Result<u64> {
    let mut copied = 0;
    let mut at = from;
    while at < to {
        let want = ((to - at) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        if !(skip_zeros && buf[..n].iter().all(|b| *b == 0)) {
            dst.write_all_at(&buf[..n], at)?;
            copied += n as u64;
        }
        at += n as u64;
    }
    Ok(copied)
}

/// Whether someone holds `file` open for writing, asked the kernel by trying to take a read
/// lease (refused with `EAGAIN` exactly when the file is open for writing anywhere) and
/// releasing it at once. `None` when the filesystem or our privileges allow no lease, so it
/// cannot be told. `file` must be opened read-only.
pub fn open_for_writing(file: &File) -> Option<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if rc == 0 {
        // SAFETY: as above; releases the lease just taken, before any holder could break it.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// What changes when a file is written: size, modification and change times (nanoseconds).
#[derive(Debug, PartialEq, Eq)]
struct Stamp(u64, i64, i64, i64, i64);

impl Stamp {
    fn of(file: &File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self(
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sparse_image(dir: &std::path::Path, len: u64, writes: &[(u64, u8, usize)]) -> File {
        let path = dir.join("src.img");
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        for &(at, byte, n) in writes {
            f.write_all_at(&vec![byte; n], at).unwrap();
        }
        f.sync_all().unwrap();
        File::open(&path).unwrap()
    }

    fn contents(f: &File, len: u64) -> Vec<u8> {
        let mut out = vec![0; len as usize];
        f.read_exact_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn the_three_copies_hold_the_same_bytes_and_only_the_sparse_ones_stay_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64 << 20;
        let writes = [
            (0, 1, 4096),
            (10 << 20, 2, 3 << 20),
            ((64 << 20) - 10, 3, 10),
        ];
        let src = sparse_image(dir.path(), len, &writes);
        let want = contents(&src, len);
        let new = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join(name))
                .unwrap()
        };

        let (sparse, plain, image) = (new("sparse"), new("plain"), new("image"));
        let copied = sparse_copy(&src, &sparse, len).unwrap();
        assert!((4096 + (3 << 20)..=(6 << 20)).contains(&copied), "{copied}");
        assert_eq!(plain_copy(&src, &plain, len).unwrap(), len);
        let made = copy_image(&src, &image, len).unwrap();
        for f in [&sparse, &plain, &image] {
            assert_eq!(f.metadata().unwrap().len(), len);
            assert_eq!(contents(f, len), want);
        }
        let allocated = |f: &File| f.metadata().unwrap().blocks() * 512;
        assert!(allocated(&sparse) < 8 << 20, "holes stay holes");
        assert!(
            allocated(&plain) >= len,
            "a plain copy allocates everything"
        );
        match made.method {
            Method::Reflink => assert_eq!(made.bytes_copied, 0),
            Method::SparseCopy => assert_eq!(made.bytes_copied, copied),
            Method::PlainCopy => unreachable!(),
        }
    }

    #[test]
    fn a_copy_can_be_larger_than_its_source_and_holds_zeros_beyond() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_image(dir.path(), 1 << 20, &[(0, 7, 1 << 20)]);
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("dst"))
            .unwrap();
        copy_image(&src, &dst, 4 << 20).unwrap();
        let got = contents(&dst, 4 << 20);
        assert!(got[..1 << 20].iter().all(|b| *b == 7));
        assert!(got[1 << 20..].iter().all(|b| *b == 0));
    }

    #[test]
    fn an_image_open_for_writing_is_not_copied_without_a_reflink() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_image(dir.path(), 1 << 20, &[(0, 1, 4096)]);
        assert_eq!(open_for_writing(&src), Some(false));
        let writer = File::options()
            .write(true)
            .open(dir.path().join("src.img"))
            .unwrap();
        assert_eq!(open_for_writing(&src), Some(true));
        let dst = File::create(dir.path().join("dst")).unwrap();
        match copy_image(&src, &dst, 1 << 20) {
            // This filesystem reflinks: the clone is one point in time anyway.
            Ok(c) => assert_eq!(c.method, Method::Reflink),
            Err(CopyError::Busy(m)) => assert!(m.contains("open for writing"), "{m}"),
            Err(e) => panic!("{e}"),
        }
        drop(writer);
        assert_eq!(open_for_writing(&src), Some(false));
    }
}
