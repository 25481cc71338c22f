//! The CSI socket's life: stale sockets removed, live ones refused, mode 0660, clean shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use crate::support::*;

#[tokio::test]
async fn socket_is_0660_and_removed_on_sigterm() {
    let mut d = Driver::start(&[], &[]).await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let status = d.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(!d.socket.exists(), "socket removed at shutdown");
    // Read after the exit, with no wait: a SIGTERM exit flushes the log.
    assert!(d.log().contains("shut down cleanly"));
    assert!(
        !d.log().contains("drain timeout"),
        "an idle client must not hold shutdown up"
    );
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "a stale socket file is left behind");
    let d = Driver::start_in(dir, &[], &[]).await;
    d.wait_for_log("removing stale socket").await;
}

#[tokio::test]
async fn socket_in_use_is_refused_with_a_clear_error() {
    let d = Driver::start(&[], &[]).await;
    let second_dir = tempfile::tempdir().unwrap();
    let mut second = Driver::spawn(second_dir.path(), &d.socket, &[], &[]);
    let status = second.wait().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(second_dir.path().join("driver.log")).unwrap();
    assert!(log.contains("in use by another process"), "{log}");
    // The first driver is untouched.
    d.identity()
        .probe(rds_csi::csi::ProbeRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    std::fs::write(&socket, "precious").unwrap();
    let mut child = Driver::spawn(dir.path(), &socket, &[], &[]);
    assert!(!child.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
}
