//! Node calls whose caller's deadline passes mid-work, through the binary's socket, as root:
//! the work goes on to the end and the kubelet's retry converges on it.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rds_csi::csi::volume_capability::access_mode::Mode;
use rds_csi::csi::NodeStageVolumeRequest;
use tonic::Code;

use crate::node::{mount_cap, Node};
use crate::support::host::{root_or_skip, Host};
use crate::support::Driver;

const MIB: i64 = 1 << 20;

/// A `mkfs.ext4` first on the driver's PATH that logs each run, then waits for a line on a
/// FIFO before it runs the real one. The FIFO is returned open read-write, so the script never
/// waits to open it, and when the test ends (or fails) without writing, it reads EOF and exits
/// without formatting: nothing is left waiting.
fn gated_mkfs(host: &Host) -> (String, std::path::PathBuf, std::fs::File) {
    let bin = host.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let (log, gate) = (host.path().join("mkfs.log"), host.path().join("mkfs.gate"));
    let c = std::ffi::CString::new(gate.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v mkfs.ext4"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let script = bin.join("mkfs.ext4");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> {log}\nread x < {gate} || exit 1\nexec {real} \"$@\"\n",
            log = log.display(),
            gate = gate.display(),
            real = real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let gate = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&gate)
        .unwrap();
    (path, log, gate)
}

/// The kubelet's NodeStageVolume deadline passes while mkfs runs: the caller is answered
/// ABORTED "in progress" before its deadline, mkfs is not killed, and the retry gets OK with
/// mkfs run once and one mount. Catches the stage awaited in the RPC's future (tonic drops it
/// at the deadline, the tool is SIGKILLed and the retry formats again) and a retry that does
/// not join the stage in flight.
#[tokio::test]
async fn a_stage_past_its_grpc_deadline_mid_mkfs_runs_on_and_its_retry_converges() {
    if !root_or_skip("stage_past_its_deadline") {
        return;
    }
    let host = Host::new();
    let (path, log, mut gate) = gated_mkfs(&host);
    let d = Driver::start_with_env(
        host.driver_dir(),
        &[],
        &host.kubelet_args(&[]),
        None,
        &[("PATH", &path)],
    )
    .await;
    let n = Node { d, host };
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("slow", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("slow", cap.clone()).await;
    let staging = n.host.at("stage");
    std::fs::create_dir(&staging).unwrap();
    let stage = || NodeStageVolumeRequest {
        volume_id: "slow".into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    };

    // mkfs waits at the gate, so this deadline always passes mid-mkfs.
    let mut first = tonic::Request::new(stage());
    first.set_timeout(Duration::from_secs(2));
    let err = n.d.node().node_stage_volume(first).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(
        err.message(),
        "operation for volume slow is already in progress"
    );

    let retry = {
        let mut client = n.d.node();
        let req = stage();
        tokio::spawn(async move { client.node_stage_volume(req).await })
    };
    gate.write_all(b"go\n").unwrap();
    retry.await.unwrap().unwrap();
    drop(gate);

    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "run\n",
        "mkfs ran once"
    );
    assert_eq!(n.mount_count("stage"), 1, "one mount");
    n.unstage("slow", "stage").await.unwrap();
    n.d.unpublish("slow", "n1").await.unwrap();
    n.host.assert_clean();
}
