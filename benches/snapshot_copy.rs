//! A file-backend snapshot of a 10 GiB sparse image with 100 MiB written (100 runs of 1 MiB
//! spread over the image, as a VM's writes are), copied three ways, side by side: a reflink
//! (`FICLONE`, what the backend does where the filesystem can), the sparse copy (its fallback:
//! data extents only) and a plain copy of every byte (what a naive copy does). Reports the
//! median wall time (page cache warm: the image was just written), the bytes written and the
//! bytes the copy allocates.
//!
//! It runs on the filesystem of the temporary directory (`SNAPSHOT_BENCH_DIR` to choose), and,
//! as root with `mkfs.xfs` installed, also on an XFS with `reflink=1` made for the run in a
//! loop device over a sparse file there, unmounted, detached and removed afterwards, so the
//! reflink column is measured even where the temporary directory cannot reflink.
//!
//! The plain copy writes the whole image. Where the disk has less room than that (free space is
//! checked first), it writes it in 1 GiB pieces, each to its own file, synced, then freed: the
//! same bytes read and written and synced, without holding them all at once; the report says so.
//! The XFS is mounted with `discard`, so what it frees is freed in its backing file too.
//!
//! Not criterion: each sample is a copy of gigabytes. `cargo bench --bench snapshot_copy` runs
//! it; `SNAPSHOT_BENCH_RUNS` (default 3; the plain copy of 10 GiB runs once) chooses how
//! often. `-- --test` checks the bench quickly: a 256 MiB image with 4 MiB written, one run,
//! and every copy compared byte for byte with the source.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rds_csi::backend::copy::{plain_copy, reflink, reflink_unsupported, sparse_copy, Method};

/// The size of one piece of a plain copy made in pieces.
const PIECE: u64 = 1 << 30;

const MIB: u64 = 1 << 20;

struct Shape {
    image: u64,
    written: u64,
    runs: usize,
    verify: bool,
}

/// One filesystem's results: method, median time, bytes written, bytes allocated.
type Row = (Method, Option<(Duration, u64, u64)>);

fn free_bytes(dir: &Path) -> u64 {
    let stat = rustix::fs::statvfs(dir).unwrap();
    stat.f_bavail * stat.f_frsize
}

/// A plain copy in [`PIECE`]s: each piece read from `src`, written to its own file, synced and
/// removed. Returns the bytes written and the most allocated at once.
fn plain_copy_in_pieces(src: &File, dir: &Path, len: u64) -> (u64, u64) {
    let mut buf = vec![0u8; MIB as usize];
    let (mut written, mut most) = (0, 0);
    let mut at = 0;
    while at < len {
        let end = (at + PIECE).min(len);
        let path = dir.join("piece.img");
        let piece = File::create(&path).unwrap();
        let mut pos = at;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos).unwrap();
            piece.write_all_at(&buf[..n], pos - at).unwrap();
            pos += n as u64;
        }
        piece.sync_all().unwrap();
        written += end - at;
        most = most.max(piece.metadata().unwrap().blocks() * 512);
        drop(piece);
        std::fs::remove_file(&path).unwrap();
        at = end;
    }
    (written, most)
}

fn make_image(path: &Path, shape: &Shape) -> File {
    let f = File::create(path).unwrap();
    f.set_len(shape.image).unwrap();
    let chunks = shape.written / MIB;
    let stride = shape.image / chunks;
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..chunks {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = (i as usize * 31 + j % 251 + 1) as u8;
        }
        f.write_all_at(&buf, i * stride).unwrap();
    }
    f.sync_all().unwrap();
    File::open(path).unwrap()
}

fn same(a: &File, b: &File, len: u64) -> bool {
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        a.read_exact_at(&mut x[..n], at).unwrap();
        b.read_exact_at(&mut y[..n], at).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        at += n as u64;
    }
    true
}

/// `room`: the bytes that can really be written there (for a loop-device filesystem, what its
/// backing file's filesystem has free).
fn measure(dir: &Path, shape: &Shape, room: u64) -> Vec<Row> {
    let src_path = dir.join("source.img");
    let src = make_image(&src_path, shape);
    let mut rows = Vec::new();
    let in_pieces = room < shape.image + (1 << 30);
    for method in [Method::Reflink, Method::SparseCopy, Method::PlainCopy] {
        let runs = if method == Method::PlainCopy && shape.image > (1 << 30) {
            1
        } else {
            shape.runs
        };
        let mut samples = Vec::new();
        let mut result = None;
        for run in 0..runs {
            let dst_path = dir.join(format!("copy-{run}.img"));
            let dst = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&dst_path)
                .unwrap();
            let started = Instant::now();
            if method == Method::PlainCopy && in_pieces {
                let (bytes, most) = plain_copy_in_pieces(&src, dir, shape.image);
                samples.push(started.elapsed());
                result = Some((bytes, most));
                drop(dst);
                std::fs::remove_file(&dst_path).unwrap();
                continue;
            }
            let copied = match method {
                Method::Reflink => match reflink(&src, &dst) {
                    Ok(()) => Some(0),
                    Err(e) if reflink_unsupported(&e) => None,
                    Err(e) => panic!("reflink: {e}"),
                },
                Method::SparseCopy => Some(sparse_copy(&src, &dst, shape.image).unwrap()),
                Method::PlainCopy => Some(plain_copy(&src, &dst, shape.image).unwrap()),
            };
            if copied.is_some() {
                dst.sync_all().unwrap();
            }
            let elapsed = started.elapsed();
            if let Some(bytes) = copied {
                if shape.verify {
                    assert!(same(&src, &dst, shape.image), "{method:?} copy differs");
                }
                samples.push(elapsed);
                result = Some((bytes, dst.metadata().unwrap().blocks() * 512));
            }
            drop(dst);
            std::fs::remove_file(&dst_path).unwrap();
            if copied.is_none() {
                break;
            }
        }
        samples.sort();
        rows.push((
            method,
            result.map(|(bytes, allocated)| (samples[samples.len() / 2], bytes, allocated)),
        ));
    }
    std::fs::remove_file(&src_path).unwrap();
    if in_pieces {
        println!(
            "\n(less than {} free: the plain copy is written in 1 GiB pieces, each synced and \
             freed; 'allocated' is one piece)",
            human(shape.image + (1 << 30))
        );
    }
    rows
}

fn fs_type(path: &Path) -> String {
    let out = Command::new("findmnt")
        .args(["--noheadings", "--output", "FSTYPE", "--target"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

fn print(fs: &str, shape: &Shape, rows: &[Row]) {
    println!(
        "\n{fs}: a {} sparse image with {} written",
        human(shape.image),
        human(shape.written)
    );
    println!(
        "  {:<12} {:>12} {:>16} {:>16}",
        "method", "time", "bytes written", "allocated"
    );
    for (method, result) in rows {
        match result {
            Some((t, bytes, allocated)) => println!(
                "  {:<12} {:>12} {:>16} {:>16}",
                method.name(),
                format!("{:.3} s", t.as_secs_f64()),
                human(*bytes),
                human(*allocated)
            ),
            None => println!(
                "  {:<12} not supported on {fs} (FICLONE refused)",
                method.name()
            ),
        }
    }
}

/// A temporary XFS with reflinks in a loop device; everything is undone on drop.
struct Xfs {
    backing: PathBuf,
    mount: tempfile::TempDir,
    device: Option<String>,
    mounted: bool,
}

impl Xfs {
    fn make(under: &Path, bytes: u64) -> Result<Xfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let backing = under.join("rds-csi-bench-xfs.img");
        let mut xfs = Xfs {
            backing: backing.clone(),
            mount: tempfile::tempdir().unwrap(),
            device: None,
            mounted: false,
        };
        File::create(&backing)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| e.to_string())?;
        let run = |cmd: &mut Command| -> Result<String, String> {
            let out = cmd.output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&backing))?;
        let device = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing))?;
        xfs.device = Some(device.clone());
        run(Command::new("mount")
            .args(["-o", "discard"])
            .arg(&device)
            .arg(xfs.mount.path()))?;
        xfs.mounted = true;
        Ok(xfs)
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.mount.path()).status();
        }
        if let Some(device) = &self.device {
            let _ = Command::new("losetup").arg("--detach").arg(device).status();
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    let shape = if test {
        Shape {
            image: 256 * MIB,
            written: 4 * MIB,
            runs: 1,
            verify: true,
        }
    } else {
        Shape {
            image: 10 << 30,
            written: 100 * MIB,
            runs: std::env::var("SNAPSHOT_BENCH_RUNS")
                .map(|v| v.parse().expect("SNAPSHOT_BENCH_RUNS is a number"))
                .unwrap_or(3),
            verify: false,
        }
    };
    let base = std::env::var_os("SNAPSHOT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let fs = fs_type(dir.path());
    let rows = measure(dir.path(), &shape, free_bytes(dir.path()));
    print(&fs, &shape, &rows);
    if rows[0].1.is_none() {
        // Room for the image and one plain copy of it (sparse: only what is written is used).
        match Xfs::make(&base, 2 * shape.image + (1 << 30)) {
            Ok(xfs) => {
                let rows = measure(xfs.mount.path(), &shape, free_bytes(&base));
                print("xfs (reflink=1, loop device)", &shape, &rows);
                assert!(rows[0].1.is_some(), "XFS with reflink=1 made no reflink");
            }
            Err(why) => println!("\nno XFS with reflinks measured: {why}"),
        }
    }
}
