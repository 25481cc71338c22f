//! Copies of a volume in use through the [`Quiescer`] seam, with a fake node that logs when it
//! freezes and thaws into the same log as the backend's steps: where the filesystem cannot
//! reflink, a volume held open for writing is copied between its freeze and its thaw, thawed
//! whatever happens to the copy, and refused (saying what to do) when it cannot be frozen.
//! The real freeze is tested as root in `tests/e2e/node_snapshots.rs`.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::backend::quiesce::{Hold, QuiesceError, Quiesced, Quiescer};

type Log = Arc<Mutex<Vec<String>>>;

/// How the fake node has the volume.
#[derive(Clone, Copy)]
enum Staged {
    Not,
    /// Mounted: it freezes; `window_passed` makes its hold report the window over.
    Mounted {
        window_passed: bool,
    },
    RawBlock,
    /// Mounted, and the kernel refuses the freeze.
    Refused,
}

struct FakeNode {
    staged: Staged,
    log: Log,
    /// The volume's image, which its VM writes again once thawed.
    image: std::path::PathBuf,
}

/// What the VM writes at [`AT`] as soon as its filesystem is thawed: a copy that read the image
/// after the thaw holds it.
const RESUMED: &[u8; 10] = b"after thaw";
const AT: u64 = 4096;

struct FakeHold {
    still: bool,
    log: Log,
    image: std::path::PathBuf,
}

impl Hold for FakeHold {
    fn still(&self) -> bool {
        self.still
    }
}

impl Drop for FakeHold {
    fn drop(&mut self) {
        self.log.lock().unwrap().push("thawed".into());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.image)
            .unwrap()
            .write_all_at(RESUMED, AT)
            .unwrap();
    }
}

impl Quiescer for FakeNode {
    fn quiesce(&self, volume: &VolumeId, _: Duration) -> Result<Quiesced, QuiesceError> {
        let log = self.log.clone();
        match self.staged {
            Staged::Not => Ok(Quiesced::NotInUse),
            Staged::Mounted { window_passed } => {
                log.lock().unwrap().push(format!("frozen {volume}"));
                Ok(Quiesced::Frozen(Box::new(FakeHold {
                    still: !window_passed,
                    log,
                    image: self.image.clone(),
                })))
            }
            Staged::RawBlock => Ok(Quiesced::Unfreezable(
                "it is a raw block device: pause or stop the VM".into(),
            )),
            Staged::Refused => Err(QuiesceError("the kernel said no".into())),
        }
    }
}

/// Logs each step of the backend into the node's log, and fails the one step it is armed for.
struct Steps {
    log: Log,
    fail_at: Mutex<Option<Step>>,
}

impl Faults for Steps {
    fn before(&self, step: Step, _: &str) -> Option<Fault> {
        self.log.lock().unwrap().push(format!("{step:?}"));
        let mut armed = self.fail_at.lock().unwrap();
        (*armed == Some(step)).then(|| {
            *armed = None;
            Fault::Fail(std::io::ErrorKind::Other)
        })
    }
}

/// A backend in a fresh root whose volume `v` (1 MiB, "the moment" at 4096) is held open for
/// writing, as a loop device attached read-write holds it; the node has it as `staged`. `None`
/// when the root's filesystem reflinks: then no copy needs a freeze, and there is nothing to
/// test here.
struct InUse {
    dir: tempfile::TempDir,
    backend: FileBackend,
    log: Log,
    steps: Arc<Steps>,
    _writer: std::fs::File,
}

async fn in_use(staged: Option<Staged>) -> Option<InUse> {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let steps = Arc::new(Steps {
        log: log.clone(),
        fail_at: Mutex::new(None),
    });
    let backend = FileBackend::open_with_faults(dir.path(), steps.clone()).unwrap();
    backend.create(volume_req("v")).await.unwrap();
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("v.img"))
        .unwrap();
    writer.write_all_at(b"the moment", AT).unwrap();
    let probe = std::fs::File::open(dir.path().join("v.img")).unwrap();
    let other = std::fs::File::create(dir.path().join("probe")).unwrap();
    if super::super::copy::reflink(&probe, &other).is_ok() {
        eprintln!("this filesystem reflinks: copies of volumes in use need no freeze here");
        return None;
    }
    std::fs::remove_file(dir.path().join("probe")).unwrap();
    if let Some(staged) = staged {
        backend.quiesce_with(Arc::new(FakeNode {
            staged,
            log: log.clone(),
            image: dir.path().join("v.img"),
        }));
    }
    log.lock().unwrap().clear();
    Some(InUse {
        dir,
        backend,
        log,
        steps,
        _writer: writer,
    })
}

fn volume_req(id: &str) -> CreateRequest {
    CreateRequest {
        id: VolumeId::try_from(id).unwrap(),
        name: id.to_string(),
        required_bytes: 1 << 20,
        limit_bytes: 0,
        capabilities: vec![],
        parameters: BTreeMap::new(),
        source: None,
    }
}

fn snapshot_req(name: &str) -> SnapshotRequest {
    SnapshotRequest {
        id: SnapshotId::for_name(name).unwrap(),
        name: name.to_string(),
        source: VolumeId::try_from("v").unwrap(),
        parameters: BTreeMap::new(),
    }
}

impl InUse {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The files under `snapshots/`, sorted.
    fn snapshot_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join(SNAPSHOT_DIR))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn refused(&self, name: &str) -> String {
        match self.backend.create_snapshot(snapshot_req(name)).await {
            Err(BackendError::InUse(m)) => m,
            other => panic!("{name}: expected InUse, got {other:?}"),
        }
    }
}

fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    buf
}

/// A snapshot and a clone of a volume the node has mounted and the image open for writing are
/// made between the node's freeze and its thaw, with the image's content at the freeze. Fails
/// if `copy` stops asking the quiescer (the copy is refused as in use), or drops the hold
/// before copying (the VM's write after the thaw is then in the copy).
#[tokio::test]
async fn a_volume_in_use_is_copied_between_its_freeze_and_its_thaw() {
    let Some(t) = in_use(Some(Staged::Mounted {
        window_passed: false,
    }))
    .await
    else {
        return;
    };
    let snap = t.backend.create_snapshot(snapshot_req("s")).await.unwrap();
    assert!(snap.ready);
    assert_eq!(
        t.taken(),
        [
            "SnapshotCopyImage",
            "frozen v",
            "SnapshotCopyFrozen",
            "thawed",
            "SnapshotWriteMetadata",
            "SnapshotRenameImage",
            "SnapshotSyncImage",
            "SnapshotRenameMetadata",
            "SnapshotSyncMetadata",
        ]
    );
    let image = t
        .dir
        .path()
        .join(SNAPSHOT_DIR)
        .join(format!("{}.img", snap.id));
    assert_eq!(read_at(&image, AT, 10), b"the moment");
    assert_eq!(read_at(&t.dir.path().join("v.img"), AT, 10), RESUMED);

    let clone = CreateRequest {
        source: Some(ContentSource::Volume(VolumeId::try_from("v").unwrap())),
        ..volume_req("c")
    };
    t.backend.create(clone).await.unwrap();
    let log = t.taken();
    let (frozen, thawed) = (
        log.iter().position(|s| s == "frozen v").expect("frozen"),
        log.iter().position(|s| s == "thawed").expect("thawed"),
    );
    let written = log.iter().position(|s| s == "CreateWriteMetadata").unwrap();
    assert!(frozen < thawed && thawed < written, "{log:?}");
    assert_eq!(read_at(&t.dir.path().join("c.img"), AT, 10), RESUMED);
}

/// A copy that fails while the volume is frozen still thaws it, and leaves no snapshot; the
/// retry freezes again and succeeds. Fails if the hold is leaked (kept past the error) or the
/// failed snapshot is not undone.
#[tokio::test]
async fn a_copy_that_fails_while_frozen_still_thaws_and_leaves_nothing() {
    let Some(t) = in_use(Some(Staged::Mounted {
        window_passed: false,
    }))
    .await
    else {
        return;
    };
    *t.steps.fail_at.lock().unwrap() = Some(Step::SnapshotCopyFrozen);
    let err = t
        .backend
        .create_snapshot(snapshot_req("s"))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Io { .. }), "{err}");
    assert_eq!(
        t.taken(),
        [
            "SnapshotCopyImage",
            "frozen v",
            "SnapshotCopyFrozen",
            "thawed"
        ]
    );
    assert_eq!(t.snapshot_files(), Vec::<String>::new());
    assert!(t.backend.list_snapshots().await.unwrap().is_empty());
    t.backend.create_snapshot(snapshot_req("s")).await.unwrap();
    assert_eq!(t.taken().iter().filter(|s| *s == "thawed").count(), 1);
}

/// A copy that ends after the freeze window passed (the hold no longer holds) is refused as not
/// one point in time, says what to do, and leaves nothing. Fails if `copy_still` stops asking
/// the hold after the copy.
#[tokio::test]
async fn a_copy_that_outlasts_the_freeze_window_is_refused() {
    let Some(t) = in_use(Some(Staged::Mounted {
        window_passed: true,
    }))
    .await
    else {
        return;
    };
    let message = t.refused("s").await;
    assert!(message.contains("longer than"), "{message}");
    assert!(message.contains("pause or stop the VM"), "{message}");
    assert!(t.taken().contains(&"thawed".to_string()));
    assert_eq!(t.snapshot_files(), Vec::<String>::new());
}

/// Refusals say what to do: raw block (the node's reason), no node plugin in this process, a
/// node that does not stage it, a freeze the kernel refused. Each fails if its hint is dropped
/// (the old message named none of these).
#[tokio::test]
async fn a_volume_in_use_that_cannot_be_frozen_is_refused_saying_what_to_do() {
    for (staged, hint) in [
        (
            Some(Staged::RawBlock),
            "raw block device: pause or stop the VM",
        ),
        (None, "no node plugin runs in this process"),
        (Some(Staged::Not), "this node plugin does not stage it"),
        (
            Some(Staged::Refused),
            "could not be frozen for the copy: the kernel said no",
        ),
    ] {
        let Some(t) = in_use(staged).await else {
            return;
        };
        let message = t.refused("s").await;
        assert!(message.contains(hint), "{hint}: {message}");
        assert!(message.contains("reflink"), "{message}");
        assert!(
            !t.taken().iter().any(|s| s.starts_with("frozen")),
            "{hint}: nothing frozen"
        );
        assert_eq!(t.snapshot_files(), Vec::<String>::new(), "{hint}");
    }
}
