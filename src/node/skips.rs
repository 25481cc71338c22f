//! The gate and the skip ledger of the tests that need a real node host (root, for loop
//! devices, mounts and device nodes; and the filesystem tools). One file serves the crate's
//! unit tests (`node::skips`) and the integration tests (tests/support/host.rs includes it by
//! path), so it uses only std and libc.
//!
//! A test that cannot run here fails, naming why, unless `RDS_CSI_SKIP_ROOT_TESTS=1` says the
//! skip is deliberate. A deliberate skip is never silent: it appends `test: reason` to the
//! ledger and says so on stderr. `.ci/check-skips` prints the ledger after `cargo test` and
//! fails on any entry, because CI runs as root with every tool installed.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The variable that makes a skip deliberate.
pub const SKIP_ENV: &str = "RDS_CSI_SKIP_ROOT_TESTS";

/// The variable naming the ledger file. Without it the ledger is `skipped-tests.txt` in the
/// cargo profile directory the test executable was built in (`target/debug`).
pub const LEDGER_ENV: &str = "RDS_CSI_SKIP_LEDGER";

/// The external tools the node tests run (the ones .ci/run installs).
pub const NODE_TOOLS: &[&str] = &[
    "losetup",
    "blkid",
    "mount",
    "mkfs.ext4",
    "e2fsck",
    "dumpe2fs",
    "debugfs",
    "resize2fs",
    "mkfs.xfs",
    "xfs_repair",
    "xfs_growfs",
    "xfs_io",
];

/// Where skips are recorded: `$RDS_CSI_SKIP_LEDGER`, or `skipped-tests.txt` above the test
/// executable's `deps/` directory.
pub fn ledger_path() -> PathBuf {
    if let Some(path) = std::env::var_os(LEDGER_ENV) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the test executable's directory");
    let profile = match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().unwrap_or(dir),
        _ => dir,
    };
    profile.join("skipped-tests.txt")
}

/// Those of `tools` that no directory of `path` (a `PATH` value) holds as an executable file.
pub fn missing_tools<'a>(tools: &[&'a str], path: Option<&std::ffi::OsStr>) -> Vec<&'a str> {
    use std::os::unix::fs::PermissionsExt;
    let dirs: Vec<PathBuf> = path
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    tools
        .iter()
        .copied()
        .filter(|tool| {
            !dirs.iter().any(|d| {
                std::fs::metadata(d.join(tool))
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        })
        .collect()
}

/// Why a test that needs root and `missing` tools cannot run; `None` when it can.
pub fn cannot_run(is_root: bool, missing: &[&str]) -> Option<String> {
    let mut reasons = Vec::new();
    if !is_root {
        reasons.push("not root".to_string());
    }
    if !missing.is_empty() {
        reasons.push(format!("missing {}", missing.join(", ")));
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Appends `test: reason` to `ledger` (one `write` of one line with O_APPEND, so tests in
/// parallel threads and processes never interleave) and says so on stderr.
pub fn record(ledger: &Path, test: &str, reason: &str) -> std::io::Result<()> {
    let line = format!("{test}: {reason}\n");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ledger)?
        .write_all(line.as_bytes())?;
    eprintln!(
        "SKIPPED {test}: {reason} (recorded in {})",
        ledger.display()
    );
    Ok(())
}

/// The ledger's entries, one per recorded skip; none when it does not exist.
pub fn entries(ledger: &Path) -> Vec<String> {
    std::fs::read_to_string(ledger)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The gate's decision for `test` on a host that `is_root` and lacks `missing` tools:
/// `Ok(true)` to run; `Ok(false)` after recording the skip in `ledger` when `deliberate`
/// (`RDS_CSI_SKIP_ROOT_TESTS=1`); otherwise `Err` with the message the test fails with.
pub fn decide(
    test: &str,
    is_root: bool,
    missing: &[&str],
    deliberate: bool,
    ledger: &Path,
) -> Result<bool, String> {
    let Some(reason) = cannot_run(is_root, missing) else {
        return Ok(true);
    };
    if !deliberate {
        return Err(format!(
            "{test} needs a node host and cannot run here: {reason}; CI runs it as root with \
             the tools installed. Set {SKIP_ENV}=1 to skip it knowingly (the skip is recorded \
             in {})",
            ledger.display()
        ));
    }
    record(ledger, test, &reason).map_err(|e| {
        format!(
            "{test}: skipped ({reason}) but not recorded in {}: {e}",
            ledger.display()
        )
    })?;
    Ok(false)
}

/// The gate of a test that needs root and `tools`: true when it can run; false after
/// recording a deliberate skip; a panic naming the reason otherwise.
pub fn can_run_or_skip(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let missing = missing_tools(tools, std::env::var_os("PATH").as_deref());
    let deliberate = std::env::var(SKIP_ENV).as_deref() == Ok("1");
    decide(test, is_root, &missing, deliberate, &ledger_path()).unwrap_or_else(|m| panic!("{m}"))
}
