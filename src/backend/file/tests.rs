use super::*;
use crate::domain::{AccessMode, Capability};

pub(super) fn req(id: &str, bytes: u64) -> CreateRequest {
    CreateRequest {
        id: VolumeId::try_from(id).unwrap(),
        name: id.to_string(),
        required_bytes: bytes,
        limit_bytes: 0,
        capabilities: vec![Capability::block(AccessMode::SingleNodeWriter)],
        parameters: BTreeMap::new(),
        source: None,
    }
}

#[tokio::test]
async fn create_is_sparse_idempotent_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let a = backend.create(req("vol-a", 10 << 30)).await.unwrap();
    assert_eq!(a.capacity_bytes, 10 << 30);
    let again = backend.create(req("vol-a", 1 << 30)).await.unwrap();
    assert_eq!(again, a, "same name, compatible size: the existing volume");
    let meta = std::fs::metadata(dir.path().join("vol-a.img")).unwrap();
    assert_eq!(meta.len(), 10 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "image must be sparse");
    drop(backend);
    let reopened = FileBackend::open(dir.path()).unwrap();
    assert_eq!(reopened.list().await.unwrap(), vec![a]);
}

#[tokio::test]
async fn incompatible_repeat_is_already_exists() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    backend.create(req("v", 1 << 20)).await.unwrap();
    let mut bigger = req("v", 2 << 20);
    assert!(matches!(
        backend.create(bigger.clone()).await,
        Err(BackendError::AlreadyExists(_))
    ));
    bigger.required_bytes = 1 << 20;
    bigger.capabilities = vec![Capability::block(AccessMode::MultiNodeMultiWriter)];
    assert!(matches!(
        backend.create(bigger).await,
        Err(BackendError::AlreadyExists(_))
    ));
    let mut limited = req("v", 0);
    limited.limit_bytes = 1 << 19;
    assert!(matches!(
        backend.create(limited).await,
        Err(BackendError::AlreadyExists(_))
    ));
}

#[tokio::test]
async fn required_above_limit_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let mut r = req("v", 2 << 20);
    r.limit_bytes = 1 << 20;
    assert!(matches!(
        backend.create(r).await,
        Err(BackendError::OutOfRange(_))
    ));
    assert!(backend.list().await.unwrap().is_empty());
}

/// Makes one step of one volume's operations crash or fail, once.
struct FaultOnce(std::sync::Mutex<Option<(Step, &'static str, Fault)>>);

impl FaultOnce {
    fn new(step: Step, volume: &'static str, fault: Fault) -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(Some((step, volume, fault)))))
    }
}

impl Faults for FaultOnce {
    fn before(&self, step: Step, volume: &str) -> Option<Fault> {
        let mut armed = self.0.lock().unwrap();
        match *armed {
            Some((at, v, fault)) if at == step && v == volume => {
                *armed = None;
                Some(fault)
            }
            _ => None,
        }
    }
}

/// Every step taken, in order.
#[derive(Default)]
struct Record(std::sync::Mutex<Vec<Step>>);

impl Faults for Record {
    fn before(&self, step: Step, _: &str) -> Option<Fault> {
        self.0.lock().unwrap().push(step);
        None
    }
}

/// The names under `dir`, sorted; directories end with '/'.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    if e.file_type().unwrap().is_dir() {
                        name + "/"
                    } else {
                        name
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn ids(backend: &FileBackend) -> Vec<String> {
    let volumes = backend.list().await.unwrap();
    volumes.iter().map(|v| v.id.to_string()).collect()
}

const FAIL: Fault = Fault::Fail(std::io::ErrorKind::Other);

/// A root holding the volume `keep` and, unless `only_keep`, the volume `v` of 1 MiB.
pub(super) async fn root_with(only_keep: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    backend.create(req("keep", 1 << 20)).await.unwrap();
    if !only_keep {
        backend.create(req("v", 1 << 20)).await.unwrap();
    }
    dir
}

#[tokio::test]
async fn every_change_takes_its_steps_in_order() {
    use Step::*;
    let dir = tempfile::tempdir().unwrap();
    let record = Arc::new(Record::default());
    let backend = FileBackend::open_with_faults(dir.path(), record.clone()).unwrap();
    let id = VolumeId::try_from("v").unwrap();
    let taken = || std::mem::take(&mut *record.0.lock().unwrap());
    backend.create(req("v", 1 << 20)).await.unwrap();
    assert_eq!(
        taken(),
        [
            CreateWriteImage,
            CreateWriteMetadata,
            CreateRenameImage,
            CreateSyncImage,
            CreateRenameMetadata,
            CreateSyncMetadata
        ],
        "the image's name is durable before the metadata names it"
    );
    backend.expand(&id, 2 << 20).await.unwrap();
    assert_eq!(
        taken(),
        [
            ExpandGrowImage,
            ExpandWriteMetadata,
            ExpandRenameMetadata,
            ExpandSyncMetadata
        ]
    );
    let snapshot = SnapshotRequest {
        id: SnapshotId::for_name("s").unwrap(),
        name: "s".into(),
        source: id.clone(),
        parameters: BTreeMap::new(),
    };
    backend.create_snapshot(snapshot.clone()).await.unwrap();
    assert_eq!(
        taken(),
        [
            SnapshotCopyImage,
            SnapshotWriteMetadata,
            SnapshotRenameImage,
            SnapshotSyncImage,
            SnapshotRenameMetadata,
            SnapshotSyncMetadata
        ],
        "a snapshot's image is durable before its metadata names it"
    );
    backend.delete_snapshot(&snapshot.id).await.unwrap();
    assert_eq!(
        taken(),
        [
            SnapshotDeleteMetadata,
            SnapshotDeleteSync,
            SnapshotDeleteImage
        ]
    );
    backend.delete(&id).await.unwrap();
    assert_eq!(
        taken(),
        [DeleteRemoveMetadata, DeleteSyncMetadata, DeleteRemoveImage],
        "the metadata goes first: never metadata without its image"
    );
}

#[tokio::test]
async fn a_crash_at_any_step_of_create_leaves_the_volume_whole_or_absent() {
    use Step::*;
    let keep = ["keep.img", "keep.json"];
    for (step, at_crash, committed) in [
        (CreateWriteImage, vec![], false),
        (CreateWriteMetadata, vec!["v.img.partial"], false),
        (
            CreateRenameImage,
            vec!["v.img.partial", "v.json.partial"],
            false,
        ),
        (CreateSyncImage, vec!["v.img", "v.json.partial"], false),
        (CreateRenameMetadata, vec!["v.img", "v.json.partial"], false),
        (CreateSyncMetadata, vec!["v.img", "v.json"], true),
    ] {
        let dir = root_with(true).await;
        let faults = FaultOnce::new(step, "v", Fault::Crash);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        assert!(
            backend.create(req("v", 1 << 20)).await.is_err(),
            "{step:?}: the crash happened"
        );
        drop(backend);
        let mut files: Vec<&str> = keep.into_iter().chain(at_crash).collect();
        files.sort();
        assert_eq!(names(dir.path()), files, "{step:?}: on disk at the crash");

        let reopened = FileBackend::open(dir.path()).unwrap();
        let (want_ids, want_files) = if committed {
            (
                vec!["keep", "v"],
                vec!["keep.img", "keep.json", "v.img", "v.json"],
            )
        } else {
            (vec!["keep"], keep.to_vec())
        };
        assert_eq!(ids(&reopened).await, want_ids, "{step:?}: visible");
        assert_eq!(names(dir.path()), want_files, "{step:?}: after open");
        // The CO retries CreateVolume: it succeeds and the volume is whole.
        reopened.create(req("v", 1 << 20)).await.unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("v.img")).unwrap().len(),
            1 << 20,
            "{step:?}"
        );
    }
}

#[tokio::test]
async fn a_create_that_fails_at_any_step_leaves_nothing_behind() {
    use Step::*;
    for step in [
        CreateWriteImage,
        CreateWriteMetadata,
        CreateRenameImage,
        CreateSyncImage,
        CreateRenameMetadata,
        CreateSyncMetadata,
    ] {
        let dir = root_with(true).await;
        let faults = FaultOnce::new(step, "v", FAIL);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let err = backend.create(req("v", 1 << 20)).await.unwrap_err();
        assert!(matches!(err, BackendError::Io { .. }), "{step:?}: {err}");
        assert_eq!(ids(&backend).await, ["keep"], "{step:?}");
        assert_eq!(
            names(dir.path()),
            ["keep.img", "keep.json"],
            "{step:?}: cleaned up"
        );
        backend.create(req("v", 1 << 20)).await.unwrap();
        drop(backend);
        let reopened = FileBackend::open(dir.path()).unwrap();
        assert_eq!(ids(&reopened).await, ["keep", "v"], "{step:?}");
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_delete_leaves_the_volume_whole_or_gone() {
    use Step::*;
    for (step, at_crash, gone) in [
        (DeleteRemoveMetadata, vec!["v.img", "v.json"], false),
        (DeleteSyncMetadata, vec!["v.img"], true),
        (DeleteRemoveImage, vec!["v.img"], true),
    ] {
        let dir = root_with(false).await;
        let faults = FaultOnce::new(step, "v", Fault::Crash);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let id = VolumeId::try_from("v").unwrap();
        assert!(backend.delete(&id).await.is_err(), "{step:?}");
        drop(backend);
        let mut files: Vec<&str> = ["keep.img", "keep.json"]
            .into_iter()
            .chain(at_crash)
            .collect();
        files.sort();
        assert_eq!(names(dir.path()), files, "{step:?}: on disk at the crash");

        let reopened = FileBackend::open(dir.path()).unwrap();
        let want: &[&str] = if gone { &["keep"] } else { &["keep", "v"] };
        assert_eq!(ids(&reopened).await, want, "{step:?}: visible");
        reopened.delete(&id).await.unwrap();
        assert_eq!(names(dir.path()), ["keep.img", "keep.json"], "{step:?}");
    }
}

#[tokio::test]
async fn a_delete_that_failed_is_retried_until_its_files_are_gone() {
    use Step::*;
    for step in [DeleteRemoveMetadata, DeleteSyncMetadata, DeleteRemoveImage] {
        let dir = root_with(false).await;
        let faults = FaultOnce::new(step, "v", FAIL);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let id = VolumeId::try_from("v").unwrap();
        let err = backend.delete(&id).await.unwrap_err();
        assert!(matches!(err, BackendError::Io { .. }), "{step:?}: {err}");
        assert!(
            backend.get(&id).await.unwrap().is_some(),
            "{step:?}: not deleted until its files are"
        );
        backend.delete(&id).await.unwrap();
        assert!(backend.get(&id).await.unwrap().is_none(), "{step:?}");
        assert_eq!(names(dir.path()), ["keep.img", "keep.json"], "{step:?}");
        drop(backend);
        let reopened = FileBackend::open(dir.path()).unwrap();
        assert_eq!(ids(&reopened).await, ["keep"], "{step:?}: it stays deleted");
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_expand_leaves_the_old_size_or_the_new() {
    use Step::*;
    for (step, grown) in [
        (ExpandGrowImage, false),
        (ExpandWriteMetadata, false),
        (ExpandRenameMetadata, false),
        (ExpandSyncMetadata, true),
    ] {
        let dir = root_with(false).await;
        let faults = FaultOnce::new(step, "v", Fault::Crash);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let id = VolumeId::try_from("v").unwrap();
        assert!(backend.expand(&id, 4 << 20).await.is_err(), "{step:?}");
        drop(backend);

        let reopened = FileBackend::open(dir.path()).unwrap();
        let size = reopened.get(&id).await.unwrap().unwrap().capacity_bytes;
        assert_eq!(size, if grown { 4 << 20 } else { 1 << 20 }, "{step:?}");
        assert_eq!(
            names(dir.path()),
            ["keep.img", "keep.json", "v.img", "v.json"],
            "{step:?}"
        );
        let image = std::fs::metadata(dir.path().join("v.img")).unwrap().len();
        assert!(
            image >= size,
            "{step:?}: the image holds what the metadata says"
        );
        assert_eq!(reopened.expand(&id, 4 << 20).await.unwrap(), 4 << 20);
        assert_eq!(
            std::fs::metadata(dir.path().join("v.img")).unwrap().len(),
            4 << 20
        );
    }
}

#[tokio::test]
async fn an_expand_that_failed_changes_nothing_visible_and_can_be_retried() {
    use Step::*;
    for step in [
        ExpandGrowImage,
        ExpandWriteMetadata,
        ExpandRenameMetadata,
        ExpandSyncMetadata,
    ] {
        let dir = root_with(false).await;
        let faults = FaultOnce::new(step, "v", FAIL);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let id = VolumeId::try_from("v").unwrap();
        assert!(backend.expand(&id, 4 << 20).await.is_err(), "{step:?}");
        let size = backend.get(&id).await.unwrap().unwrap().capacity_bytes;
        assert_eq!(size, 1 << 20, "{step:?}");
        assert_eq!(backend.expand(&id, 4 << 20).await.unwrap(), 4 << 20);
        drop(backend);
        let reopened = FileBackend::open(dir.path()).unwrap();
        let size = reopened.get(&id).await.unwrap().unwrap().capacity_bytes;
        assert_eq!(size, 4 << 20, "{step:?}");
        assert_eq!(
            names(dir.path()),
            ["keep.img", "keep.json", "v.img", "v.json"],
            "{step:?}"
        );
    }
}

/// What the backend logs while `f` runs, as text.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    // While at most one dispatcher is registered, tracing-core decides whether a callsite is
    // ever enabled, at its first use, from the dispatcher of the thread using it: another test
    // logging the same warning on its thread, without a subscriber, would switch it off for
    // good while this one is capturing. A second dispatcher, kept for the whole test process,
    // makes every such decision ask all registered dispatchers, this capture included.
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let sink = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[tokio::test]
async fn open_quarantines_what_it_cannot_serve_and_serves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    for v in ["keep", "lost", "bad", "alias"] {
        backend.create(req(v, 1 << 20)).await.unwrap();
    }
    drop(backend);
    let root = dir.path();
    // Metadata without its image; unreadable metadata; metadata naming another volume;
    // leftovers of interrupted creates.
    std::fs::remove_file(root.join("lost.img")).unwrap();
    std::fs::write(root.join("bad.json"), b"{ not json").unwrap();
    std::fs::copy(root.join("keep.json"), root.join("alias.json")).unwrap();
    std::fs::write(root.join("orphan.img"), b"").unwrap();
    std::fs::write(root.join("half.json.partial"), b"{}").unwrap();

    let (backend, log) = logged(|| FileBackend::open(root));
    let backend = backend.expect("one inconsistent volume never stops the others");
    assert_eq!(ids(&backend).await, ["keep"]);
    assert_eq!(names(root), ["keep.img", "keep.json", "quarantine/"]);
    assert_eq!(
        names(&root.join("quarantine")),
        [
            "alias.img",
            "alias.json",
            "bad.img",
            "bad.json",
            "lost.json"
        ]
    );
    for (volume, why) in [
        ("lost", "its image lost.img is missing"),
        ("bad", "cannot be read"),
        ("alias", "names volume keep"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("quarantined") && l.contains(&format!("{volume}.json")))
            .unwrap_or_else(|| panic!("no quarantine line for {volume}:\n{log}"));
        assert!(line.contains("WARN") && line.contains(why), "{line}");
    }
    drop(backend);

    let (again, log) = logged(|| FileBackend::open(root));
    assert_eq!(ids(&again.unwrap()).await, ["keep"]);
    assert!(!log.contains("quarantined"), "nothing new to move:\n{log}");
    assert_eq!(names(&root.join("quarantine")).len(), 5);
}

#[tokio::test]
async fn delete_is_idempotent_and_expand_grows() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let id = VolumeId::try_from("v").unwrap();
    backend.create(req("v", 1 << 20)).await.unwrap();
    assert_eq!(backend.expand(&id, 4 << 20).await.unwrap(), 4 << 20);
    assert_eq!(
        backend.expand(&id, 4 << 20).await.unwrap(),
        4 << 20,
        "the same size again is OK"
    );
    assert!(
        matches!(backend.expand(&id, 2 << 20).await, Err(BackendError::OutOfRange(m)) if m.contains("shrinking")),
        "never shrinks"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("v.img")).unwrap().len(),
        4 << 20
    );
    backend.delete(&id).await.unwrap();
    backend.delete(&id).await.unwrap();
    assert!(backend.get(&id).await.unwrap().is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(matches!(
        backend.expand(&id, 1).await,
        Err(BackendError::NotFound(_))
    ));
}

/// The backend over `root`, with a create of "slow" spawned and held inside its I/O (before
/// its image is renamed into place) until the returned release is sent.
async fn a_create_stalled_in_its_io(
    root: &std::path::Path,
) -> (
    std::sync::Arc<FileBackend>,
    tokio::task::JoinHandle<Result<VolumeInfo, BackendError>>,
    testing::Release,
) {
    let (stall, release, stalled) = testing::Stall::new(Step::CreateRenameImage, "slow");
    let backend = std::sync::Arc::new(
        FileBackend::open_with_faults(root, std::sync::Arc::new(stall)).unwrap(),
    );
    let create = tokio::spawn({
        let backend = backend.clone();
        async move { backend.create(req("slow", 1 << 20)).await }
    });
    stalled.await.unwrap();
    (backend, create, release)
}

#[tokio::test]
async fn reads_answer_while_a_create_is_stuck_in_its_io() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let a = backend.create(req("a", 1 << 20)).await.unwrap();
    drop(backend);
    let (backend, create, release) = a_create_stalled_in_its_io(dir.path()).await;
    let id = VolumeId::try_from("a").unwrap();
    assert_eq!(backend.get(&id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(backend.list().await.unwrap(), vec![a.clone()]);
    assert!(
        !create.is_finished(),
        "the reads answered while the create was still in its I/O"
    );
    release.send(()).unwrap();
    create.await.unwrap().unwrap();
    assert_eq!(backend.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_create_whose_caller_gave_up_still_completes_before_the_next_change() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, create, release) = a_create_stalled_in_its_io(dir.path()).await;
    create.abort();
    assert!(create.await.unwrap_err().is_cancelled());
    let next = tokio::spawn({
        let backend = backend.clone();
        async move { backend.create(req("next", 1 << 20)).await }
    });
    release.send(()).unwrap();
    next.await.unwrap().unwrap();
    let ids: Vec<String> = backend
        .list()
        .await
        .unwrap()
        .iter()
        .map(|v| v.id.to_string())
        .collect();
    assert_eq!(ids, ["next", "slow"], "the index says what the disk has");
    assert!(dir.path().join("slow.json").exists());
}

#[tokio::test]
async fn a_volume_that_cannot_be_quarantined_is_left_alone_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    backend.create(req("keep", 1 << 20)).await.unwrap();
    backend.create(req("bad", 1 << 20)).await.unwrap();
    drop(backend);
    let root = dir.path();
    std::fs::write(root.join("bad.img"), b"the only copy of someone's data").unwrap();
    std::fs::write(root.join("bad.json"), b"{ not json").unwrap();
    // The quarantine cannot be made: a file is in its way.
    std::fs::write(root.join("quarantine"), b"").unwrap();

    let (backend, log) = logged(|| FileBackend::open(root));
    let backend = backend.expect("still serves the others");
    assert_eq!(ids(&backend).await, ["keep"]);
    assert!(log.contains("cannot quarantine"), "{log}");
    let err = backend.create(req("bad", 1 << 20)).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Corrupt(m) if m.contains("bad.")),
        "{err}"
    );
    assert_eq!(
        std::fs::read(root.join("bad.img")).unwrap(),
        b"the only copy of someone's data"
    );
    assert_eq!(
        names(root),
        ["bad.img", "bad.json", "keep.img", "keep.json", "quarantine"]
    );
}

pub(super) fn snap_req(name: &str, source: &str) -> SnapshotRequest {
    SnapshotRequest {
        id: SnapshotId::for_name(name).unwrap(),
        name: name.to_string(),
        source: VolumeId::try_from(source).unwrap(),
        parameters: BTreeMap::new(),
    }
}

pub(super) fn snap_id(name: &str) -> &'static str {
    Box::leak(
        SnapshotId::for_name(name)
            .unwrap()
            .to_string()
            .into_boxed_str(),
    )
}

fn write_image(dir: &Path, volume: &str, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(format!("{volume}.img")))
        .unwrap();
    f.write_all_at(data, at).unwrap();
}

fn read_file(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    buf
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_snapshot_leaves_none_that_claims_to_be_ready() {
    use Step::*;
    let id = snap_id("s");
    for (step, committed) in [
        (SnapshotCopyImage, false),
        (SnapshotWriteMetadata, false),
        (SnapshotRenameImage, false),
        (SnapshotSyncImage, false),
        (SnapshotRenameMetadata, false),
        (SnapshotSyncMetadata, true),
    ] {
        let dir = root_with(false).await;
        write_image(dir.path(), "v", 4096, b"the snapshot's moment");
        let faults = FaultOnce::new(step, id, Fault::Crash);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        assert!(
            backend.create_snapshot(snap_req("s", "v")).await.is_err(),
            "{step:?}: the crash happened"
        );
        drop(backend);

        let reopened = FileBackend::open(dir.path()).unwrap();
        let listed = reopened.list_snapshots().await.unwrap();
        let snapshots = dir.path().join(SNAPSHOT_DIR);
        if committed {
            assert_eq!(listed.len(), 1, "{step:?}");
            assert!(listed[0].ready);
        } else {
            assert!(listed.is_empty(), "{step:?}: nothing claims to be ready");
            assert!(
                reopened
                    .get_snapshot(&snap_req("s", "v").id)
                    .await
                    .unwrap()
                    .is_none(),
                "{step:?}"
            );
            assert_eq!(names(&snapshots), Vec::<String>::new(), "{step:?}: cleaned");
        }
        // The CO retries CreateSnapshot: it completes, with the data of the moment.
        write_image(dir.path(), "v", 8192, b"later");
        let made = reopened.create_snapshot(snap_req("s", "v")).await.unwrap();
        assert!(made.ready && made.size_bytes == 1 << 20, "{step:?}");
        assert_eq!(
            names(&snapshots),
            [format!("{id}.img"), format!("{id}.json")],
            "{step:?}"
        );
        let image = snapshots.join(format!("{id}.img"));
        assert_eq!(read_file(&image, 4096, 21), b"the snapshot's moment");
        let expect_later = !committed;
        assert_eq!(
            read_file(&image, 8192, 5) == b"later",
            expect_later,
            "{step:?}: a committed snapshot keeps its moment; a retried one takes a new one"
        );
    }
}

#[tokio::test]
async fn a_snapshot_that_fails_at_any_step_leaves_nothing_and_can_be_retried() {
    use Step::*;
    let id = snap_id("s");
    for step in [
        SnapshotCopyImage,
        SnapshotWriteMetadata,
        SnapshotRenameImage,
        SnapshotSyncImage,
        SnapshotRenameMetadata,
        SnapshotSyncMetadata,
    ] {
        let dir = root_with(false).await;
        let faults = FaultOnce::new(step, id, FAIL);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let err = backend
            .create_snapshot(snap_req("s", "v"))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Io { .. }), "{step:?}: {err}");
        assert!(
            backend.list_snapshots().await.unwrap().is_empty(),
            "{step:?}"
        );
        assert!(names(&dir.path().join(SNAPSHOT_DIR)).is_empty(), "{step:?}");
        backend.create_snapshot(snap_req("s", "v")).await.unwrap();
        drop(backend);
        let reopened = FileBackend::open(dir.path()).unwrap();
        assert_eq!(
            reopened.list_snapshots().await.unwrap().len(),
            1,
            "{step:?}"
        );
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_snapshot_delete_leaves_it_whole_or_gone() {
    use Step::*;
    let id = snap_id("s");
    for (step, gone) in [
        (SnapshotDeleteMetadata, false),
        (SnapshotDeleteSync, true),
        (SnapshotDeleteImage, true),
    ] {
        let dir = root_with(false).await;
        FileBackend::open(dir.path())
            .unwrap()
            .create_snapshot(snap_req("s", "v"))
            .await
            .unwrap();
        let faults = FaultOnce::new(step, id, Fault::Crash);
        let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
        let sid = snap_req("s", "v").id;
        assert!(backend.delete_snapshot(&sid).await.is_err(), "{step:?}");
        drop(backend);
        let reopened = FileBackend::open(dir.path()).unwrap();
        assert_eq!(
            reopened.list_snapshots().await.unwrap().is_empty(),
            gone,
            "{step:?}"
        );
        reopened.delete_snapshot(&sid).await.unwrap();
        assert!(names(&dir.path().join(SNAPSHOT_DIR)).is_empty(), "{step:?}");
    }
}

#[tokio::test]
async fn deleting_a_snapshot_waits_for_a_restore_from_it() {
    let dir = root_with(false).await;
    write_image(dir.path(), "v", 0, b"restored data");
    FileBackend::open(dir.path())
        .unwrap()
        .create_snapshot(snap_req("s", "v"))
        .await
        .unwrap();
    let (stall, release, stalled) = testing::Stall::new(Step::CreateWriteImage, "r");
    let backend = Arc::new(FileBackend::open_with_faults(dir.path(), Arc::new(stall)).unwrap());
    let sid = snap_req("s", "v").id;
    let restore = tokio::spawn({
        let backend = backend.clone();
        let mut r = req("r", 2 << 20);
        r.source = Some(ContentSource::Snapshot(sid.clone()));
        async move { backend.create(r).await }
    });
    stalled.await.unwrap();
    let delete = tokio::spawn({
        let backend = backend.clone();
        let sid = sid.clone();
        async move { backend.delete_snapshot(&sid).await }
    });
    // Other work goes on meanwhile.
    backend.create(req("other", 1 << 20)).await.unwrap();
    assert!(backend.get_snapshot(&sid).await.unwrap().is_some());
    assert!(!delete.is_finished(), "the delete waits for the restore");
    release.send(()).unwrap();
    let restored = restore.await.unwrap().unwrap();
    assert_eq!(restored.capacity_bytes, 2 << 20);
    delete.await.unwrap().unwrap();
    assert!(backend.get_snapshot(&sid).await.unwrap().is_none());
    assert_eq!(
        read_file(&dir.path().join("r.img"), 0, 13),
        b"restored data"
    );
}

#[tokio::test]
async fn open_quarantines_snapshots_it_cannot_serve() {
    let dir = root_with(false).await;
    let backend = FileBackend::open(dir.path()).unwrap();
    backend
        .create_snapshot(snap_req("good", "v"))
        .await
        .unwrap();
    backend
        .create_snapshot(snap_req("lost", "v"))
        .await
        .unwrap();
    drop(backend);
    let snapshots = dir.path().join(SNAPSHOT_DIR);
    std::fs::remove_file(snapshots.join(format!("{}.img", snap_id("lost")))).unwrap();
    std::fs::write(snapshots.join("snap-x.img"), b"").unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let listed = backend.list_snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id.as_str(), snap_id("good"));
    assert_eq!(
        names(&dir.path().join(QUARANTINE_DIR)),
        [format!("{}.json", snap_id("lost"))]
    );
    assert_eq!(names(&snapshots).len(), 2, "the orphan image is removed");
}

#[tokio::test]
async fn capacity_reports_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    assert!(backend.capacity().await.unwrap() > 0);
}
