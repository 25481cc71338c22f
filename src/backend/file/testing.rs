//! Test seams built on [`Faults`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use super::{Fault, Faults, Io, Step};

/// Every step and every change to the disk, in the order they happened.
#[derive(Default)]
pub(crate) struct Journal(Mutex<Vec<Entry>>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Step(Step),
    Io(Io),
}

impl Journal {
    /// What was recorded since the last take.
    pub(crate) fn take(&self) -> Vec<Entry> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Faults for Journal {
    fn before(&self, step: Step, _: &str) -> Option<Fault> {
        self.0.lock().unwrap().push(Entry::Step(step));
        None
    }

    fn done(&self, io: &Io) {
        self.0.lock().unwrap().push(Entry::Io(io.clone()));
    }
}

/// How one call must order its changes of names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Each change of a name is durable (its directories synced) before the next change
    /// of a name and before the call returns: the steps of a create, expand, delete or
    /// snapshot, where a later name relies on an earlier one.
    EachBeforeTheNext,
    /// Changes may be batched, as long as all are durable before the call returns: open's
    /// cleanup, whose removals and moves do not rely on one another.
    AllBeforeReturn,
}

/// `path` relative to `root`, for messages and expectations (`.` for the root itself).
pub(crate) fn rel(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(p) if p.as_os_str().is_empty() => ".".into(),
        Ok(p) => p.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// The changes of names in `log`, one line each ("rename a b", "remove a", "mkdir d"),
/// relative to `root`.
pub(crate) fn changes(log: &[Entry], root: &Path) -> Vec<String> {
    log.iter()
        .filter_map(|entry| match entry {
            Entry::Io(Io::Renamed { from, to }) => {
                Some(format!("rename {} {}", rel(root, from), rel(root, to)))
            }
            Entry::Io(Io::Removed(p)) => Some(format!("remove {}", rel(root, p))),
            Entry::Io(Io::MadeDir(p)) => Some(format!("mkdir {}", rel(root, p))),
            _ => None,
        })
        .collect()
}

/// The durability rules the recorded call `log` broke, one line each; empty when it kept
/// them all. The rules, for what survives a power loss on a POSIX filesystem (a file's
/// content is durable once it is synced, a name once its directory is):
/// - no name changes while a file written in this call is not synced since, so a file is
///   never renamed into place, nor named by metadata, before its content is durable;
/// - nothing is put into a directory this call made before that directory's parent is
///   synced;
/// - with [`Order::EachBeforeTheNext`], no name changes before the directories of the
///   change before it are synced;
/// - the call returns only once every file it wrote and every directory it changed is
///   synced.
pub(crate) fn broken(log: &[Entry], root: &Path, order: Order) -> Vec<String> {
    let mut broken = Vec::new();
    let mut dirty: BTreeSet<PathBuf> = BTreeSet::new();
    let mut unsynced: BTreeSet<PathBuf> = BTreeSet::new();
    let mut made: BTreeSet<PathBuf> = BTreeSet::new();
    let at = |p: &Path| rel(root, p);
    let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    for entry in log {
        let Entry::Io(io) = entry else { continue };
        let (what, dirs, removed): (String, Vec<PathBuf>, Option<&PathBuf>) = match io {
            Io::Wrote(p) => {
                dirty.insert(p.clone());
                continue;
            }
            Io::SyncedFile(p) => {
                dirty.remove(p);
                continue;
            }
            Io::SyncedDir(d) => {
                unsynced.remove(d);
                made.retain(|m| m.parent() != Some(d.as_path()));
                continue;
            }
            Io::Renamed { from, to } => (
                format!("rename {} {}", at(from), at(to)),
                vec![parent(from), parent(to)],
                None,
            ),
            Io::Removed(p) => (format!("remove {}", at(p)), vec![parent(p)], Some(p)),
            Io::MadeDir(p) => (format!("mkdir {}", at(p)), vec![parent(p)], None),
        };
        for p in dirty.iter().filter(|p| Some(*p) != removed) {
            broken.push(format!(
                "`{what}` while {} was written and not synced",
                at(p)
            ));
        }
        for m in made.iter().filter(|m| dirs.contains(m)) {
            broken.push(format!(
                "`{what}` inside {} before its parent was synced",
                at(m)
            ));
        }
        if order == Order::EachBeforeTheNext {
            for d in &unsynced {
                broken.push(format!(
                    "`{what}` before the change before it was made durable (sync of {})",
                    at(d)
                ));
            }
        }
        if let Some(p) = removed {
            dirty.remove(p);
        }
        if let Io::Renamed { from, to } = io {
            if dirty.remove(from) {
                dirty.insert(to.clone());
            }
        }
        if let Io::MadeDir(p) = io {
            made.insert(p.clone());
        }
        unsynced.extend(dirs);
    }
    for p in &dirty {
        broken.push(format!("returned with {} written and not synced", at(p)));
    }
    for d in &unsynced {
        broken.push(format!(
            "returned before the changes in {} were made durable",
            at(d)
        ));
    }
    broken
}

/// Stalls one volume's operation just before `step`, as a disk that stops answering would,
/// until the test releases it. It blocks the thread doing the I/O, for real.
pub(crate) struct Stall {
    step: Step,
    volume: &'static str,
    entered: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

/// Sending on it (or dropping it) lets the stalled operation go on.
pub(crate) type Release = mpsc::Sender<()>;

impl Stall {
    /// The seam, the release, and a future that resolves once the operation is stalled.
    pub(crate) fn new(
        step: Step,
        volume: &'static str,
    ) -> (Self, Release, tokio::sync::oneshot::Receiver<()>) {
        let (release, waiting) = mpsc::channel();
        let (entered, stalled) = tokio::sync::oneshot::channel();
        let stall = Self {
            step,
            volume,
            entered: Mutex::new(Some(entered)),
            release: Mutex::new(waiting),
        };
        (stall, release, stalled)
    }
}

impl Faults for Stall {
    fn before(&self, step: Step, volume: &str) -> Option<Fault> {
        if step == self.step && volume == self.volume {
            if let Some(entered) = self.entered.lock().unwrap().take() {
                let _ = entered.send(());
            }
            // Bounded only so that a backend that stalls its caller's thread fails the test
            // (by completing in the wrong order) instead of hanging it; a correct backend
            // is released long before.
            let _ = self
                .release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
        None
    }
}
