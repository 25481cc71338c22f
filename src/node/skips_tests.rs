//! The skip ledger's own tests (beside the lib only: tests/support includes `skips.rs` too,
//! and these need not run once per test binary).

use std::os::unix::fs::PermissionsExt;

use super::skips::{cannot_run, decide, entries, missing_tools, record};

/// A deliberate skip is recorded and counted, one entry per skip; a skip that is not
/// deliberate fails the test with the reason and records nothing; a host that can run the
/// test records nothing. Catches: removing the `record` call from `decide` (a skip that
/// counts as a pass and leaves no trace).
#[test]
fn a_deliberate_skip_is_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("skipped-tests.txt");
    assert_eq!(decide("runs", true, &[], true, &ledger), Ok(true));
    assert_eq!(entries(&ledger), Vec::<String>::new());

    let refused = decide("needs_root", false, &[], false, &ledger).unwrap_err();
    assert!(
        refused.contains("needs_root") && refused.contains("not root"),
        "{refused}"
    );
    assert!(refused.contains("RDS_CSI_SKIP_ROOT_TESTS=1"), "{refused}");
    assert_eq!(
        entries(&ledger),
        Vec::<String>::new(),
        "a refusal is no skip"
    );

    assert_eq!(
        decide("ext4_lifecycle", false, &[], true, &ledger),
        Ok(false)
    );
    assert_eq!(
        decide("xfs_lifecycle", true, &["mkfs.xfs"], true, &ledger),
        Ok(false)
    );
    assert_eq!(
        entries(&ledger),
        vec![
            "ext4_lifecycle: not root".to_string(),
            "xfs_lifecycle: missing mkfs.xfs".to_string()
        ]
    );
}

#[test]
fn reasons_name_root_and_each_missing_tool() {
    assert_eq!(cannot_run(true, &[]), None);
    assert_eq!(cannot_run(false, &[]).as_deref(), Some("not root"));
    assert_eq!(
        cannot_run(false, &["mkfs.xfs", "xfs_repair"]).as_deref(),
        Some("not root; missing mkfs.xfs, xfs_repair")
    );
}

/// A tool counts as installed only as an executable file in a `PATH` directory.
#[test]
fn a_tool_is_missing_unless_an_executable_file_on_path() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let exe = a.path().join("mkfs.ext4");
    std::fs::write(&exe, "").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(b.path().join("mkfs.xfs"), "").unwrap();
    std::fs::create_dir(b.path().join("losetup")).unwrap();
    let path = std::env::join_paths([a.path(), b.path()]).unwrap();
    assert_eq!(
        missing_tools(&["mkfs.ext4", "mkfs.xfs", "losetup"], Some(&path)),
        vec!["mkfs.xfs", "losetup"]
    );
    assert_eq!(missing_tools(&["mkfs.ext4"], None), vec!["mkfs.ext4"]);
}

/// Skips from parallel writers each land as one whole line.
#[test]
fn parallel_skips_are_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("skipped-tests.txt");
    std::thread::scope(|s| {
        for i in 0..8 {
            let ledger = &ledger;
            s.spawn(move || record(ledger, &format!("test_{i}"), "not root").unwrap());
        }
    });
    let mut got = entries(&ledger);
    got.sort();
    let want: Vec<String> = (0..8).map(|i| format!("test_{i}: not root")).collect();
    assert_eq!(got, want);
}

/// The tools the node tests gate on are the ones .ci/run installs, so CI never records a skip
/// for a tool it did not install.
#[test]
fn the_gated_tools_are_the_ones_ci_installs() {
    let run = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    let needed = run
        .lines()
        .find_map(|l| l.strip_prefix("needed=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("a needed=(...) line in .ci/run");
    let needed: Vec<&str> = needed.split_whitespace().collect();
    for tool in super::skips::NODE_TOOLS {
        assert!(
            needed.contains(tool),
            "{tool} is gated on but .ci/run does not install it"
        );
    }
}
