//! Kubernetes mode, the paths around the attachment rules: how the driver decides it is in a
//! cluster, when it becomes ready, how long a Publish may wait on the API, which node ids may
//! reach an API URL, the PV annotation queue, and what seeding reports. The real binary against
//! the fake API server, as in `kubernetes.rs`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

// ---- `--kubernetes auto` ------------------------------------------------------------------

/// The driver with `--kubernetes auto`, no kubeconfig, and only the in-cluster signs in `env`
/// (the real ones of the machine running the tests are removed). `service_account_dir` is where
/// it looks for the mounted service account.
fn spawn_auto(dir: &Path, service_account_dir: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(dir.join("driver.log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env("HOME", dir)
        .env("RDS_CSI_SERVICE_ACCOUNT_DIR", service_account_dir)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args([
            "--node-id",
            "n1",
            "--kubernetes",
            "auto",
            "--metrics-address",
            "",
        ])
        .arg("--file-root")
        .arg(dir.join("volumes"))
        .arg("--node-state-dir")
        .arg(dir.join("node-state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd.spawn().expect("spawn rds-csi")
}

/// Waits for the child to exit, failing if it serves its socket instead.
async fn exit_without_serving(child: &mut Child, dir: &Path) -> std::process::ExitStatus {
    let socket = dir.join("csi.sock");
    let log = || std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!socket.exists(), "a socket was created:\n{}", log());
            return status;
        }
        assert!(
            !socket.exists(),
            "the driver served its socket (standalone) instead of failing:\n{}",
            log()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither exited nor served:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_in_cluster_signs_but_no_usable_config_refuses_to_start() {
    // A pod whose service-account mount is broken: the API server's address is in the
    // environment, but there is no token (and no kubeconfig).
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-service-account");
    let mut child = spawn_auto(
        dir.path(),
        &missing,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "1"),
        ],
    );
    let status = exit_without_serving(&mut child, dir.path()).await;
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(log.contains("KUBERNETES_SERVICE_HOST"), "{log}");
    assert!(log.contains("refusing to run standalone"), "{log}");

    // The service-account directory alone is a sign too (here without a token in it).
    let dir = tempfile::tempdir().unwrap();
    let account = dir.path().join("serviceaccount");
    std::fs::create_dir(&account).unwrap();
    let mut child = spawn_auto(dir.path(), &account, &[]);
    let status = exit_without_serving(&mut child, dir.path()).await;
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(log.contains(&account.display().to_string()), "{log}");
    assert!(log.contains("refusing to run standalone"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_no_cluster_signs_runs_standalone_and_warns_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_auto(dir.path(), &dir.path().join("no-service-account"), &[]);
    let socket = dir.path().join("csi.sock");
    let served = tokio::select! {
        _ = wait_for(&socket) => true,
        _ = async { while child.try_wait().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } } => false,
    };
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(served, "{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("standalone"))
        .unwrap_or_else(|| panic!("no warning about running standalone:\n{log}"));
    assert!(
        warning.contains("no-such-kubeconfig"),
        "the warning gives the reason: {warning}"
    );
}

