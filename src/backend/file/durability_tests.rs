//! The durability of every crash-consistent sequence, checked on what the seam records
//! ([`testing::Journal`]): each file's content is synced before it is renamed into place, each
//! change of a name is synced in its directory before the next step, and each call answers only
//! once all it changed is durable. Each test names the sync lines whose removal it catches.

use super::tests::{req, root_with, snap_id, snap_req};
use super::*;

/// A backend on `dir` whose seam journals every step and change, and the journal, empty.
fn journaled(dir: &Path) -> (FileBackend, Arc<testing::Journal>) {
    let journal = Arc::new(testing::Journal::default());
    let backend = FileBackend::open_with_faults(dir, journal.clone()).unwrap();
    journal.take();
    (backend, journal)
}

/// The changes to the disk in `log`, one line each, relative to `root`.
fn ios(log: &[testing::Entry], root: &Path) -> Vec<String> {
    let at = |p: &Path| testing::rel(root, p);
    log.iter()
        .filter_map(|entry| match entry {
            testing::Entry::Step(_) => None,
            testing::Entry::Io(io) => Some(match io {
                Io::Wrote(p) => format!("write {}", at(p)),
                Io::SyncedFile(p) => format!("fsync {}", at(p)),
                Io::MadeDir(p) => format!("mkdir {}", at(p)),
                Io::Renamed { from, to } => format!("rename {} {}", at(from), at(to)),
                Io::Removed(p) => format!("remove {}", at(p)),
                Io::SyncedDir(p) => format!("fsync dir {}", at(p)),
            }),
        })
        .collect()
}

/// Checks the call just journaled: first that it broke no durability rule
/// ([`testing::broken`]), then that it did exactly `want` (so the rules were checked on the
/// sequence meant, not on nothing). With [`testing::Order::AllBeforeReturn`] the order of
/// `want` is not checked.
fn assert_durable(journal: &testing::Journal, root: &Path, order: testing::Order, want: &[&str]) {
    let log = journal.take();
    let broken = testing::broken(&log, root, order);
    assert!(
        broken.is_empty(),
        "durability rules broken:\n{}",
        broken.join("\n")
    );
    let mut did = ios(&log, root);
    let mut want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
    if order == testing::Order::AllBeforeReturn {
        did.sort();
        want.sort();
    }
    assert_eq!(did, want);
    let steps = testing::changes(&log, root);
    assert!(!steps.is_empty(), "the call changed some name");
}

/// The checker itself, on written logs: a log that keeps the rules passes, and each rule, broken
/// alone, is reported (so a green durability test means the rules held, not that the checker
/// never looks).
#[test]
fn the_durability_checker_reports_each_rule_broken_alone() {
    use testing::{broken, Entry, Order};
    let root = Path::new("/r");
    let p = |name: &str| root.join(name);
    let write = |n: &str| Entry::Io(Io::Wrote(p(n)));
    let fsync = |n: &str| Entry::Io(Io::SyncedFile(p(n)));
    let mv = |a: &str, b: &str| {
        Entry::Io(Io::Renamed {
            from: p(a),
            to: p(b),
        })
    };
    let rm = |n: &str| Entry::Io(Io::Removed(p(n)));
    let mkdir = |n: &str| Entry::Io(Io::MadeDir(p(n)));
    let dsync = |n: &str| Entry::Io(Io::SyncedDir(if n == "." { p("") } else { p(n) }));
    let good = vec![
        mkdir("d"),
        dsync("."),
        write("d/a.partial"),
        fsync("d/a.partial"),
        mv("d/a.partial", "d/a"),
        dsync("d"),
        rm("d/b"),
        dsync("d"),
    ];
    assert_eq!(
        broken(&good, root, Order::EachBeforeTheNext),
        Vec::<String>::new()
    );
    let without = |i: usize| {
        let mut log = good.clone();
        log.remove(i);
        broken(&log, root, Order::EachBeforeTheNext)
    };
    assert_eq!(
        without(1),
        [
            "`rename d/a.partial d/a` inside d before its parent was synced",
            "`rename d/a.partial d/a` before the change before it was made durable (sync of .)",
            "`remove d/b` inside d before its parent was synced",
            "`remove d/b` before the change before it was made durable (sync of .)",
            "returned before the changes in . were made durable",
        ]
    );
    assert_eq!(
        without(3),
        [
            "`rename d/a.partial d/a` while d/a.partial was written and not synced",
            "`remove d/b` while d/a was written and not synced",
            "returned with d/a written and not synced",
        ]
    );
    assert_eq!(
        without(5),
        ["`remove d/b` before the change before it was made durable (sync of d)"]
    );
    assert_eq!(
        without(7),
        ["returned before the changes in d were made durable"]
    );
    // Batched changes are fine at open, as long as all are durable before it returns.
    let batched = vec![rm("x"), rm("y"), dsync(".")];
    assert!(broken(&batched, root, Order::AllBeforeReturn).is_empty());
    assert_eq!(
        broken(&batched, root, Order::EachBeforeTheNext),
        ["`remove y` before the change before it was made durable (sync of .)"]
    );
    assert_eq!(
        broken(&batched[..2], root, Order::AllBeforeReturn),
        ["returned before the changes in . were made durable"]
    );
}

/// A create's image and metadata are synced before either is renamed into place, the
/// image's name is durable before the metadata (the commit point) names it, and the
/// metadata's before the create answers.
///
/// Catches: removing `sync_file` of the image in `create_files` (volumes.rs), `sync_file` in
/// `write_json` (steps.rs), the `sync_dir` after the image's rename (`CreateSyncImage`) or
/// the last `sync_dir` of `create_files`.
#[tokio::test]
async fn a_create_makes_each_change_durable_before_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, journal) = journaled(dir.path());
    backend.create(req("v", 1 << 20)).await.unwrap();
    assert_durable(
        &journal,
        backend.root(),
        testing::Order::EachBeforeTheNext,
        &[
            "write v.img.partial",
            "write v.img.partial",
            "fsync v.img.partial",
            "write v.json.partial",
            "fsync v.json.partial",
            "rename v.img.partial v.img",
            "fsync dir .",
            "rename v.json.partial v.json",
            "fsync dir .",
        ],
    );
}

/// A restore and a clone are creates whose image is a copy: the copy is synced before
/// it is renamed into place, and each name is durable before the next step.
///
/// Catches: the same lines as
/// [`a_create_makes_each_change_durable_before_the_next_step`], on the copying path.
#[tokio::test]
async fn a_restore_and_a_clone_make_each_change_durable_before_the_next_step() {
    let dir = root_with(false).await;
    let (backend, journal) = journaled(dir.path());
    backend.create_snapshot(snap_req("s", "v")).await.unwrap();
    journal.take();
    let mut restore = req("r", 1 << 20);
    restore.source = Some(ContentSource::Snapshot(snap_req("s", "v").id));
    let mut clone = req("c", 1 << 20);
    clone.source = Some(ContentSource::Volume(VolumeId::try_from("v").unwrap()));
    for (r, id) in [(restore, "r"), (clone, "c")] {
        backend.create(r).await.unwrap();
        assert_durable(
            &journal,
            backend.root(),
            testing::Order::EachBeforeTheNext,
            &[
                format!("write {id}.img.partial").as_str(),
                &format!("write {id}.img.partial"),
                &format!("fsync {id}.img.partial"),
                &format!("write {id}.json.partial"),
                &format!("fsync {id}.json.partial"),
                &format!("rename {id}.img.partial {id}.img"),
                "fsync dir .",
                &format!("rename {id}.json.partial {id}.json"),
                "fsync dir .",
            ],
        );
    }
}

/// An expand syncs the grown image before the metadata with the new size is renamed over
/// the old (the commit point), and that rename is durable before the expand answers.
///
/// Catches: removing `sync_file` of the grown image in `expand` (volumes.rs), or its `sync_dir`.
#[tokio::test]
async fn an_expand_makes_each_change_durable_before_the_next_step() {
    let dir = root_with(false).await;
    let (backend, journal) = journaled(dir.path());
    let id = VolumeId::try_from("v").unwrap();
    backend.expand(&id, 2 << 20).await.unwrap();
    assert_durable(
        &journal,
        backend.root(),
        testing::Order::EachBeforeTheNext,
        &[
            "write v.img",
            "fsync v.img",
            "write v.json.partial",
            "fsync v.json.partial",
            "rename v.json.partial v.json",
            "fsync dir .",
        ],
    );
}

/// A delete's removal of the metadata (the commit point) is durable before the image is
/// removed, and the image's removal before the delete answers.
///
/// Catches: removing either `sync_dir` of `delete` (volumes.rs).
#[tokio::test]
async fn a_delete_makes_each_change_durable_before_the_next_step() {
    let dir = root_with(false).await;
    let (backend, journal) = journaled(dir.path());
    backend
        .delete(&VolumeId::try_from("v").unwrap())
        .await
        .unwrap();
    assert_durable(
        &journal,
        backend.root(),
        testing::Order::EachBeforeTheNext,
        &[
            "remove v.json",
            "fsync dir .",
            "remove v.img",
            "fsync dir .",
        ],
    );
}

/// A snapshot is made like a volume, in `snapshots/`, which is itself durable in the root
/// before anything is put in it; a snapshot delete is durable step by step like a volume's.
///
/// Catches: removing `sync_file` of the copied image in `snapshot_files` (snapshots.rs),
/// either of its `sync_dir`s, the parent's sync in `make_dir` (steps.rs), or either
/// `sync_dir` of `delete_snapshot`.
#[tokio::test]
async fn a_snapshot_and_its_delete_make_each_change_durable_before_the_next_step() {
    use testing::Order::EachBeforeTheNext;
    let dir = root_with(false).await;
    let (backend, journal) = journaled(dir.path());
    let root = backend.root().to_path_buf();
    let snap = |name: &str| {
        let id = snap_id(name);
        [
            format!("write snapshots/{id}.img.partial"),
            format!("write snapshots/{id}.img.partial"),
            format!("fsync snapshots/{id}.img.partial"),
            format!("write snapshots/{id}.json.partial"),
            format!("fsync snapshots/{id}.json.partial"),
            format!("rename snapshots/{id}.img.partial snapshots/{id}.img"),
            "fsync dir snapshots".to_string(),
            format!("rename snapshots/{id}.json.partial snapshots/{id}.json"),
            "fsync dir snapshots".to_string(),
        ]
    };
    backend.create_snapshot(snap_req("s", "v")).await.unwrap();
    let first: Vec<String> = ["mkdir snapshots", "fsync dir ."]
        .map(String::from)
        .into_iter()
        .chain(snap("s"))
        .collect();
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    assert_durable(&journal, &root, EachBeforeTheNext, &first);

    backend.create_snapshot(snap_req("t", "v")).await.unwrap();
    let second = snap("t");
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    assert_durable(&journal, &root, EachBeforeTheNext, &second);

    backend
        .delete_snapshot(&snap_req("s", "v").id)
        .await
        .unwrap();
    let id = snap_id("s");
    assert_durable(
        &journal,
        &root,
        EachBeforeTheNext,
        &[
            &format!("remove snapshots/{id}.json"),
            "fsync dir snapshots",
            &format!("remove snapshots/{id}.img"),
            "fsync dir snapshots",
        ],
    );
}

/// Open's cleanup (leftovers removed, what cannot be served quarantined) is durable before
/// open returns, and the quarantine is durable in the root before anything is moved into
/// it, also when only a snapshot is quarantined.
///
/// Catches: removing the `sync_dir` at the end of `load` or of `load_snapshots`, the sync
/// of the quarantine in `quarantine` (open.rs), or the parent's sync in `make_dir` (steps.rs).
#[tokio::test]
async fn open_makes_its_cleanup_durable_before_it_serves() {
    use testing::Order::AllBeforeReturn;
    let dir = root_with(false).await;
    let backend = FileBackend::open(dir.path()).unwrap();
    backend.create(req("lost", 1 << 20)).await.unwrap();
    backend.create_snapshot(snap_req("s", "v")).await.unwrap();
    drop(backend);
    let root = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::remove_file(root.join("lost.img")).unwrap();
    std::fs::write(root.join("orphan.img"), b"").unwrap();
    std::fs::write(root.join("half.json.partial"), b"{}").unwrap();
    let snapshots = root.join(SNAPSHOT_DIR);
    std::fs::write(snapshots.join("snap-x.img.partial"), b"").unwrap();

    let journal = Arc::new(testing::Journal::default());
    FileBackend::open_with_faults(&root, journal.clone()).unwrap();
    assert_durable(
        &journal,
        &root,
        AllBeforeReturn,
        &[
            "remove half.json.partial",
            "mkdir quarantine",
            "fsync dir .",
            "rename lost.json quarantine/lost.json",
            "fsync dir quarantine",
            "remove orphan.img",
            "fsync dir .",
            "remove snapshots/snap-x.img.partial",
            "fsync dir snapshots",
        ],
    );

    // Only a snapshot to quarantine: the quarantine is made while reading snapshots/.
    let dir = root_with(false).await;
    let backend = FileBackend::open(dir.path()).unwrap();
    backend.create_snapshot(snap_req("s", "v")).await.unwrap();
    drop(backend);
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let id = snap_id("s");
    std::fs::remove_file(root.join(SNAPSHOT_DIR).join(format!("{id}.img"))).unwrap();
    let journal = Arc::new(testing::Journal::default());
    FileBackend::open_with_faults(&root, journal.clone()).unwrap();
    assert_durable(
        &journal,
        &root,
        AllBeforeReturn,
        &[
            "mkdir quarantine",
            "fsync dir .",
            &format!("rename snapshots/{id}.json quarantine/{id}.json"),
            "fsync dir quarantine",
            "fsync dir snapshots",
        ],
    );
}
