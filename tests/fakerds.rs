//! The fake RDS (tests/support/fake_rds.rs) behaves like a RouterOS SSH server: a russh client
//! logs in with a key, runs the Go driver's commands one session each, and gets RouterOS text
//! back, checked here byte for byte; then auth, exec-only sessions, concurrency counters, every
//! fault kind and the command log.

#[path = "support/fake_rds.rs"]
mod fake_rds;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_rds::{
    client_keypair, parse_authorized_keys, CommandRecord, Disk, FakeRds, FakeRdsConfig, PublicKey,
};
use russh::client;
use russh::keys::{load_secret_key, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;

const T: &str = "2025-11-11 14:32:41";
const V1: &str = "pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f";
const V2: &str = "pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8";
const SNAP: &str = "snap-11111111-2222-3333-4444-555555555555-at-1111111122";
const GIB: u64 = 1 << 30;

/// The `/disk` legend, as the fake wraps it.
const LEGEND: &str = "Flags: X - DISABLED; A - ACQUIRED, E - EMPTY, B - BLOCK-DEVICE;\r\n\
M - MOUNTED, F - FORMATTING, S - SWAP-ENABLED; p - PARTITION;\r\n\
f - RAID-MEMBER-FAILED, r - RAID-MEMBER; c - ENCRYPTED;\r\n\
g - GUID-PARTITION-TABLE; t - NVME-TCP-EXPORT; i - ISCSI-EXPORT;\r\n\
s - SMB-EXPORT, n - NFS-EXPORT;\r\n";

// ------------------------------------------------------------------------------------------
// A small SSH client, as the driver's will be: key auth, one session per command
// ------------------------------------------------------------------------------------------

struct Client {
    host_key: PublicKey,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(matches!(key, PublicKeyOrCertificate::PublicKey { key, .. }
            if key.key_data() == self.host_key.key_data()))
    }
}

type Ssh = Arc<client::Handle<Client>>;

#[derive(Debug, Default, PartialEq, Eq)]
struct Answer {
    stdout: String,
    exit_status: Option<u32>,
    eof: bool,
    closed: bool,
}

async fn connect_as(rds: &FakeRds, key: &Path, user: &str) -> Result<Ssh, String> {
    let key = load_secret_key(key, None).map_err(|e| e.to_string())?;
    let mut handle = client::connect(
        Arc::new(client::Config::default()),
        rds.address(),
        Client {
            host_key: rds.host_public_key(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let auth = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .map_err(|e| e.to_string())?;
    if !auth.success() {
        return Err("authentication rejected".into());
    }
    Ok(Arc::new(handle))
}

async fn connect(rds: &FakeRds, key: &Path) -> Ssh {
    connect_as(rds, key, "admin").await.unwrap()
}

/// Runs one command in a new session; errors only if the session cannot be opened.
async fn try_exec(ssh: &Ssh, command: &str) -> Result<Answer, russh::Error> {
    let mut channel = ssh.channel_open_session().await?;
    channel.exec(true, command).await?;
    let mut answer = Answer::default();
    let mut out = vec![];
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => answer.exit_status = Some(exit_status),
            ChannelMsg::Eof => answer.eof = true,
            ChannelMsg::Close => answer.closed = true,
            _ => {}
        }
    }
    answer.stdout = String::from_utf8(out).unwrap();
    Ok(answer)
}

async fn exec(ssh: &Ssh, command: &str) -> Answer {
    try_exec(ssh, command).await.unwrap()
}

/// Runs a command and expects exit status 0; returns stdout.
async fn run(ssh: &Ssh, command: &str) -> String {
    let a = exec(ssh, command).await;
    assert_eq!(a.exit_status, Some(0), "{command}: {a:?}");
    assert!(a.eof && a.closed, "{command}: {a:?}");
    a.stdout
}

struct Setup {
    rds: FakeRds,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup_with(f: impl FnOnce(&mut FakeRdsConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(dir.path());
    let mut config = FakeRdsConfig::new(public);
    config.fixed_time = Some(T.into());
    f(&mut config);
    Setup {
        rds: FakeRds::start(config).await,
        key,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

fn add_volume_cmd(slot: &str, size: &str) -> String {
    format!(
        "/disk add type=file file-path=/storage-pool/metal-csi/{slot}.img file-size={size} \
         slot={slot} nvme-tcp-export=yes nvme-tcp-server-port=4420 \
         nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:{slot}"
    )
}

/// The entry of an exported Go-style volume (`pvc-<uuid>`), laid out by hand: every
/// `pvc-<uuid>` has the same length and dash positions, so only values change.
fn volume_entry(index: usize, slot: &str, size: u64, human: &str) -> String {
    let uuid = slot.strip_prefix("pvc-").unwrap();
    let (head, tail) = uuid.split_at(23); // "ccdecfad-a8bf-572e-9120" / "-464c4d99f12f"
    let (nqn_head, nqn_tail) = uuid.split_at(13); // "ccdecfad-a8bf" / "-572e-9120-464c4d99f12f"
    let size = fake_rds::group_thousands(size);
    format!(
        "{index:>2}  B     t    type=file slot=\"{slot}\"\r\n\
         \x20              slot-default=\"\" parent=\"\" fs=-\r\n\
         \x20              model=\"/storage-pool/metal-csi/pvc-{head}\r\n\
         \x20              {tail}.img\"\r\n\
         \x20              size={size} mount-filesystem=yes mount-read-only=no\r\n\
         \x20              compress=no sector-size=512 raid-master=none\r\n\
         \x20              nvme-tcp-export=yes nvme-tcp-server-port=4420\r\n\
         \x20              nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-{nqn_head}\r\n\
         \x20              {nqn_tail}\"\r\n\
         \x20              nvme-tcp-server-allow-host-name=\"\" iscsi-export=no\r\n\
         \x20              nfs-sharing=no smb-sharing=no media-sharing=no\r\n\
         \x20              media-interface=none swap=no\r\n\
         \x20              file-path=/storage-pool/metal-csi/pvc-{head}\r\n\
         \x20              {tail}.img\r\n\
         \x20              file-size={human} file-offset=0\r\n\
         \r\n"
    )
}

fn pool_entry(free: &str, use_pct: u32) -> String {
    format!(
        " 0  BM         type=partition slot=\"storage-pool\" slot-default=\"\"\r\n\
         \x20              parent=\"raid1\" fs-label=\"storage-pool\" fs=btrfs\r\n\
         \x20              size=7 949 127 950 336 free={free} use={use_pct}%\r\n\
         \x20              mount-point=\"storage-pool\" mount-filesystem=yes\r\n\
         \x20              mount-read-only=no compress=no sector-size=512 raid-master=none\r\n\
         \x20              nvme-tcp-export=no iscsi-export=no nfs-sharing=no\r\n\
         \x20              smb-sharing=no media-sharing=no media-interface=none swap=no\r\n\
         \r\n"
    )
}

// ------------------------------------------------------------------------------------------
// Output formats, byte for byte
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn go_volume_lifecycle_prints_routeros_text() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    let capacity = r#"/disk print detail where mount-point="storage-pool""#;

    assert_eq!(
        run(&ssh, capacity).await,
        format!("{LEGEND}{}", pool_entry("5 963 595 964 416", 25))
    );

    assert_eq!(run(&ssh, &add_volume_cmd(V1, "10G")).await, "");
    let entry = volume_entry(0, V1, 10 * GIB, "10.0GiB");
    assert_eq!(
        run(&ssh, &format!("/disk print detail where slot={V1}")).await,
        format!("{LEGEND}{entry}")
    );
    assert_eq!(
        run(&ssh, r#"/disk print detail where slot~"pvc""#).await,
        format!("{LEGEND}{entry}")
    );
    assert_eq!(
        run(&ssh, r#"/disk print detail where slot~"snap-""#).await,
        LEGEND
    );
    assert_eq!(
        run(&ssh, "/disk print detail where slot=pvc-missing").await,
        LEGEND,
        "not found: the legend alone"
    );
    // 10 GiB came off the free space.
    assert_eq!(
        run(&ssh, capacity).await,
        format!("{LEGEND}{}", pool_entry("5 952 858 546 176", 25))
    );
    assert_eq!(
        run(
            &ssh,
            r#"/file print detail where name~"storage-pool/metal-csi""#
        )
        .await,
        format!(
            " 0   name=storage-pool/metal-csi type=directory\r\n\
             \x20    last-modified={T}\r\n\
             \r\n\
             \x201   name=storage-pool/metal-csi/{V1}.img\r\n\
             \x20    type=.img file size=10.0GiB last-modified={T}\r\n\
             \r\n"
        )
    );

    // Expand.
    assert_eq!(
        run(&ssh, &format!("/disk set [find slot={V1}] file-size=20G")).await,
        ""
    );
    assert_eq!(
        run(&ssh, &format!("/disk print detail where slot={V1}")).await,
        format!("{LEGEND}{}", volume_entry(0, V1, 20 * GIB, "20.0GiB"))
    );

    // Delete as the Go driver does: the disk, then its file.
    assert_eq!(
        run(&ssh, &format!("/disk remove [find slot={V1}]")).await,
        ""
    );
    assert!(s.rds.disks().is_empty());
    assert_eq!(s.rds.files().len(), 1, "the backing file outlives the disk");
    assert_eq!(
        run(&ssh, &format!("/disk print detail where slot={V1}")).await,
        LEGEND
    );
    assert_eq!(
        run(
            &ssh,
            &format!(r#"/file remove [find name="storage-pool/metal-csi/{V1}.img"]"#)
        )
        .await,
        ""
    );
    assert!(s.rds.files().is_empty());
    assert_eq!(s.rds.pool_free_bytes(), fake_rds::DEFAULT_POOL_FREE);
    assert_eq!(
        run(
            &ssh,
            r#"/file print detail where name~"storage-pool/metal-csi/pvc""#
        )
        .await,
        "",
        "/file has no legend: nothing matched prints nothing"
    );
}

#[tokio::test]
async fn snapshots_copy_size_and_content() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    run(&ssh, &add_volume_cmd(V1, "10G")).await;
    s.rds
        .write_content(&format!("/storage-pool/metal-csi/{V1}.img"), "vm data 1");

    // CreateSnapshot, verbatim.
    let snap = format!(
        "/disk add type=file copy-from=[find slot={V1}] \
         file-path=/storage-pool/metal-csi/{SNAP}.img slot={SNAP}"
    );
    assert_eq!(run(&ssh, &snap).await, "");
    let expected = format!(
        "{LEGEND} 0  B          type=file\r\n\
         \x20              slot=\"{SNAP}\"\r\n\
         \x20              slot-default=\"\" parent=\"\" fs=-\r\n\
         \x20              model=\"/storage-pool/metal-csi/snap-11111111-2222-3333-4444\r\n\
         \x20              -555555555555-at-1111111122.img\"\r\n\
         \x20              size=10 737 418 240 mount-filesystem=yes mount-read-only=no\r\n\
         \x20              compress=no sector-size=512 raid-master=none nvme-tcp-export=no\r\n\
         \x20              iscsi-export=no nfs-sharing=no smb-sharing=no media-sharing=no\r\n\
         \x20              media-interface=none swap=no\r\n\
         \x20              file-path=/storage-pool/metal-csi/snap-11111111-2222-3333-4444\r\n\
         \x20              -555555555555-at-1111111122.img\r\n\
         \x20              file-size=10.0GiB file-offset=0\r\n\
         \r\n"
    );
    assert_eq!(
        run(&ssh, r#"/disk print detail where slot~"snap-""#).await,
        expected
    );
    assert_eq!(
        run(&ssh, &format!("/disk print detail where slot={SNAP}")).await,
        expected
    );
    let snap_file = s
        .rds
        .file(&format!("storage-pool/metal-csi/{SNAP}.img"))
        .unwrap();
    assert_eq!(
        (snap_file.size, snap_file.content.as_str()),
        (10 * GIB, "vm data 1")
    );

    // Data written after the snapshot stays out of it.
    s.rds
        .write_content(&format!("/storage-pool/metal-csi/{V1}.img"), "vm data 2");

    // RestoreSnapshot, verbatim, to a larger size.
    let restore = format!(
        "/disk add type=file copy-from=[find slot={SNAP}] file-path=/storage-pool/metal-csi/{V2}.img \
         file-size=20G slot={V2} nvme-tcp-export=yes nvme-tcp-server-port=4420 \
         nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:{V2}"
    );
    assert_eq!(run(&ssh, &restore).await, "");
    let restored = s
        .rds
        .file(&format!("/storage-pool/metal-csi/{V2}.img"))
        .unwrap();
    assert_eq!(
        (restored.size, restored.content.as_str()),
        (20 * GIB, "vm data 1")
    );
    assert_eq!(
        s.rds.disk(V2).unwrap(),
        Disk {
            file_size: 20 * GIB,
            ..Disk::volume(V2, 0)
        }
    );

    // Smaller than the source, or from nothing: refused.
    let smaller = format!(
        "/disk add type=file copy-from=[find slot={SNAP}] file-path=/storage-pool/metal-csi/x.img \
         file-size=1G slot=x"
    );
    assert_eq!(
        run(&ssh, &smaller).await,
        "failure: file-size is smaller than source\r\n"
    );
    let missing = "/disk add type=file copy-from=[find slot=snap-none] \
                   file-path=/storage-pool/metal-csi/snap-none.img slot=snap-none";
    assert_eq!(run(&ssh, missing).await, "failure: no such item\r\n");
    assert_eq!(s.rds.disks().len(), 3);
}

/// A disk's comment is kept, printed as RouterOS prints one (`;;; text` after the flags, the
/// properties from the next line on), matched by `where`, and read back by the driver's parser.
#[tokio::test]
async fn comments_are_kept_printed_and_matched() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    run(&ssh, &add_volume_cmd(V1, "10G")).await;
    assert_eq!(
        run(
            &ssh,
            &format!("/disk set [find slot={V1}] comment=source-{SNAP}-at-1739800000")
        )
        .await,
        ""
    );
    assert_eq!(
        s.rds.disk(V1).unwrap().comment,
        format!("source-{SNAP}-at-1739800000")
    );
    let text = run(&ssh, &format!("/disk print detail where slot={V1}")).await;
    let entry: Vec<&str> = text.lines().skip_while(|l| !l.starts_with(" 0")).collect();
    assert_eq!(
        entry[0],
        format!(" 0  B     t    ;;; source-{SNAP}-at-1739800000")
    );
    assert!(
        entry[1].starts_with("               type=file slot="),
        "{text}"
    );
    let disks = rds_csi::backend::rds::parse::disks(&text).unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(
        disks[0].comment.as_deref(),
        Some(format!("source-{SNAP}-at-1739800000").as_str())
    );
    assert_eq!(disks[0].slot, V1);
    assert!(disks[0].nvme_export);
    let matched = run(
        &ssh,
        &format!("/disk print detail where comment=\"source-{SNAP}-at-1739800000\""),
    )
    .await;
    assert_eq!(matched, text);
    // Given on /disk add too.
    run(
        &ssh,
        &format!(
            "/disk add type=file copy-from=[find slot={V1}] \
             file-path=/storage-pool/metal-csi/{SNAP}.img slot={SNAP} comment=note"
        ),
    )
    .await;
    assert_eq!(s.rds.disk(SNAP).unwrap().comment, "note");
}

/// `comment=` given on a plain `/disk add` (a property of the new item, as RouterOS's `add`
/// takes every writable property of a `/disk` entry) leaves the disk exactly as the same add
/// followed by `/disk set comment=`: the same listing, byte for byte, `;;; text` line included.
/// The add stays as strict as without it: a misspelt property, or a bad value beside a comment,
/// is refused and leaves nothing behind.
#[tokio::test]
async fn a_comment_given_on_the_add_is_the_comment_set_after_it() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    let comment = "made-0123456789abcdef";
    let print = format!("/disk print detail where slot={V1}");

    assert_eq!(run(&ssh, &add_volume_cmd(V1, "10G")).await, "");
    assert_eq!(
        run(
            &ssh,
            &format!("/disk set [find slot={V1}] comment={comment}")
        )
        .await,
        ""
    );
    let set_after = run(&ssh, &print).await;
    run(&ssh, &format!("/disk remove [find slot={V1}]")).await;
    run(
        &ssh,
        &format!("/file remove [find name=\"storage-pool/metal-csi/{V1}.img\"]"),
    )
    .await;
    assert!(s.rds.disk(V1).is_none());

    let add = format!("{} comment={comment}", add_volume_cmd(V1, "10G"));
    assert_eq!(run(&ssh, &add).await, "");
    assert_eq!(s.rds.disk(V1).unwrap().comment, comment);
    let given_on_add = run(&ssh, &print).await;
    assert_eq!(given_on_add, set_after);
    assert!(
        given_on_add.contains(&format!(";;; {comment}\r\n")),
        "{given_on_add}"
    );

    let misspelt = format!("{} comments={comment}", add_volume_cmd(V2, "10G"));
    let column = misspelt.find("comments=").unwrap() + 1;
    let refused = [
        (
            misspelt.clone(),
            format!("expected end of command (line 1 column {column})\r\n"),
        ),
        (
            format!("{} comment={comment}", add_volume_cmd(V2, "lots")),
            "input does not match any value of file-size\r\n".to_string(),
        ),
    ];
    for (command, expected) in &refused {
        assert_eq!(&run(&ssh, command).await, expected, "{command}");
    }
    assert!(s.rds.disk(V2).is_none(), "a refused add made nothing");
}

#[tokio::test]
async fn errors_are_routeros_texts_with_exit_status_zero() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    let add_a = "/disk add type=file file-path=/storage-pool/metal-csi/a.img file-size=1G slot=a";
    assert_eq!(run(&ssh, add_a).await, "");
    let free = s.rds.pool_free_bytes();
    let cases: &[(&str, &str)] = &[
        (add_a, "failure: item with such slot already exists\r\n"),
        (
            "/disk add type=file file-path=/storage-pool/metal-csi/b.img file-size=lots slot=b",
            "input does not match any value of file-size\r\n",
        ),
        (
            "/disk add type=file file-path=/storage-pool/metal-csi/b.img file-size=1.5G slot=b",
            "input does not match any value of file-size\r\n",
        ),
        (
            "/disk add type=file bogus=1 slot=b",
            "expected end of command (line 1 column 21)\r\n",
        ),
        (
            "/disk add type=file file-path=/storage-pool/metal-csi/b.img file-size=8T slot=b",
            "failure: not enough space\r\n",
        ),
        (
            "/disk add type=file file-path=/storage-pool/metal-csi/b.img file-size=1G slot=b \
             nvme-tcp-export=maybe",
            "input does not match any value of nvme-tcp-export\r\n",
        ),
        (
            "/disk add type=file file-path=/flash/b.img file-size=1G slot=b",
            "failure: invalid file-path\r\n",
        ),
        ("/disk remove [find slot=nope]", "no such item\r\n"),
        (
            "/disk print detail where slot~\"a{1}\"",
            "failure: invalid regular expression\r\n",
        ),
        (
            "/disk print detail where slot~\"a()\"",
            "failure: invalid regular expression\r\n",
        ),
        (
            "/disk set [find slot=nope] file-size=2G",
            "failure: no such item\r\n",
        ),
        (
            "/disk set [find slot=a] file-size=512M",
            "failure: shrinking not supported\r\n",
        ),
        (
            "/disk set [find slot=a] file-size=8T",
            "failure: not enough space\r\n",
        ),
        (
            r#"/file remove [find name="storage-pool/metal-csi/a.img"]"#,
            "failure: file is in use\r\n",
        ),
        (r#"/file remove [find name="storage-pool/none.img"]"#, ""),
        (
            "/system resource print",
            "bad command name system (line 1 column 2)\r\n",
        ),
        (
            "/disk frobnicate",
            "bad command name frobnicate (line 1 column 7)\r\n",
        ),
        (
            "/disk print detail where slot=\"a",
            "syntax error (line 1 column 31)\r\n",
        ),
    ];
    for (command, expected) in cases {
        let a = exec(&ssh, command).await;
        assert_eq!(
            (a.stdout.as_str(), a.exit_status),
            (*expected, Some(0)),
            "{command}"
        );
    }
    assert_eq!(s.rds.disks().len(), 1, "no failed command changed anything");
    assert_eq!(s.rds.pool_free_bytes(), free);

    // The backing file stays after `/disk remove`; adding it again with a size is refused, and
    // without one adopts it.
    run(&ssh, "/disk remove [find slot=a]").await;
    assert_eq!(run(&ssh, add_a).await, "failure: file already exists\r\n");
    assert_eq!(
        run(
            &ssh,
            "/disk add type=file file-path=/storage-pool/metal-csi/a.img slot=a2"
        )
        .await,
        ""
    );
    assert_eq!(s.rds.disk("a2").unwrap().file_size, GIB);
    assert_eq!(s.rds.pool_free_bytes(), free);
}

#[tokio::test]
async fn prepopulated_go_disks_print_like_created_ones() {
    let s = setup().await;
    s.rds.add_disk(Disk::volume(V1, 10 * GIB)).unwrap();
    s.rds.add_disk(Disk::volume(V2, GIB)).unwrap();
    s.rds.add_disk(Disk::snapshot(SNAP, 10 * GIB)).unwrap();
    s.rds
        .add_file("/storage-pool/metal-csi/pvc-orphan.img", 5 * GIB)
        .unwrap();
    assert_eq!(
        s.rds.add_disk(Disk::volume(V1, GIB)),
        Err("failure: item with such slot already exists".into())
    );
    let ssh = connect(&s.rds, &s.key).await;

    assert_eq!(
        run(&ssh, r#"/disk print detail where slot~"pvc""#).await,
        format!(
            "{LEGEND}{}{}",
            volume_entry(0, V1, 10 * GIB, "10.0GiB"),
            volume_entry(1, V2, GIB, "1024.0MiB")
        )
    );
    let snaps = run(&ssh, r#"/disk print detail where slot~"snap-""#).await;
    assert!(snaps.starts_with(&format!("{LEGEND} 0  B          type=file\r\n")));
    assert_eq!(snaps.matches("type=file").count(), 1);

    // The orphan reconciler's listing: directory first, then files by name.
    assert_eq!(
        run(
            &ssh,
            r#"/file print detail where name~"storage-pool/metal-csi""#
        )
        .await,
        format!(
            " 0   name=storage-pool/metal-csi type=directory\r\n\
             \x20    last-modified={T}\r\n\
             \r\n\
             \x201   name=storage-pool/metal-csi/{V2}.img\r\n\
             \x20    type=.img file size=1024.0MiB last-modified={T}\r\n\
             \r\n\
             \x202   name=storage-pool/metal-csi/{V1}.img\r\n\
             \x20    type=.img file size=10.0GiB last-modified={T}\r\n\
             \r\n\
             \x203   name=storage-pool/metal-csi/pvc-orphan.img type=.img file size=5.0GiB\r\n\
             \x20    last-modified={T}\r\n\
             \r\n\
             \x204   name=storage-pool/metal-csi/snap-11111111-2222-3333-4444-555555555555-at\r\n\
             \x20    -1111111122.img\r\n\
             \x20    type=.img file size=10.0GiB last-modified={T}\r\n\
             \r\n"
        )
    );
    // A Go `regexp.QuoteMeta`'d name is a regular expression here too.
    let one = run(
        &ssh,
        r#"/file print detail where name~"storage-pool/metal-csi/pvc-orphan\.img""#,
    )
    .await;
    assert!(one.starts_with(" 0   name=storage-pool/metal-csi/pvc-orphan.img "));
    assert_eq!(one.matches("name=").count(), 1);

    // Free space: 26 GiB of files.
    assert_eq!(
        s.rds.pool_free_bytes(),
        fake_rds::DEFAULT_POOL_FREE - 26 * GIB
    );
}

// ------------------------------------------------------------------------------------------
// SSH: keys, auth, exec only
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn key_helpers_write_usable_files() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup().await;
    let mode = std::fs::metadata(&s.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let private = load_secret_key(&s.key, None).unwrap();
    let public_line = std::fs::read_to_string(s.key.with_extension("pub")).unwrap();
    assert_eq!(
        parse_authorized_keys(&public_line).unwrap()[0].key_data(),
        private.public_key().key_data()
    );

    let host = s.rds.host_public_key_openssh();
    assert!(host.starts_with("ssh-ed25519 AAAA"), "{host}");
    assert_eq!(host.split(' ').count(), 2, "no comment: {host}");
    let dir = tempfile::tempdir().unwrap();
    let host_file = s.rds.write_host_key(dir.path());
    assert_eq!(
        std::fs::read_to_string(host_file).unwrap(),
        format!("{host}\n")
    );
    let known = std::fs::read_to_string(s.rds.write_known_hosts(dir.path())).unwrap();
    assert_eq!(
        known,
        format!("[127.0.0.1]:{} {host}\n", s.rds.address().port())
    );
    // The client above checks the server's key against exactly this one.
    let ssh = connect(&s.rds, &s.key).await;
    assert_eq!(run(&ssh, "/disk print detail where slot=x").await, LEGEND);
}

#[tokio::test]
async fn only_the_configured_key_and_user_log_in() {
    let s = setup().await;
    let other = tempfile::tempdir().unwrap();
    let (stranger, stranger_public) = client_keypair(other.path());

    assert!(connect_as(&s.rds, &stranger, "admin").await.is_err());
    assert!(connect_as(&s.rds, &s.key, "root").await.is_err());
    assert_eq!(s.rds.connections_authenticated(), 0);
    assert!(s.rds.commands().is_empty());

    connect(&s.rds, &s.key).await;
    assert_eq!(s.rds.connections_authenticated(), 1);

    s.rds.authorize_key(stranger_public);
    connect_as(&s.rds, &stranger, "admin").await.unwrap();
    assert_eq!(s.rds.connections_authenticated(), 2);
    assert_eq!(s.rds.connections_accepted(), 4);
}

#[tokio::test]
async fn sessions_take_exec_only() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;

    let mut shell = ssh.channel_open_session().await.unwrap();
    shell.request_shell(true).await.unwrap();
    assert!(matches!(shell.wait().await, Some(ChannelMsg::Failure)));

    let mut pty = ssh.channel_open_session().await.unwrap();
    pty.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    assert!(matches!(pty.wait().await, Some(ChannelMsg::Failure)));

    let mut sftp = ssh.channel_open_session().await.unwrap();
    sftp.request_subsystem(true, "sftp").await.unwrap();
    assert!(matches!(sftp.wait().await, Some(ChannelMsg::Failure)));

    // Exec still works on the same connection, and on a channel refused a shell.
    shell
        .exec(true, "/disk print detail where slot=x")
        .await
        .unwrap();
    let mut out = vec![];
    while let Some(msg) = shell.wait().await {
        if let ChannelMsg::Data { data } = msg {
            out.extend_from_slice(&data);
        }
    }
    assert_eq!(String::from_utf8(out).unwrap(), LEGEND);
}

// ------------------------------------------------------------------------------------------
// Concurrency
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn counts_concurrent_sessions_per_connection_and_in_total() {
    let s = setup().await;
    let a = connect(&s.rds, &s.key).await;
    let b = connect(&s.rds, &s.key).await;
    s.rds.hang(true);

    let mut tasks = vec![];
    for i in 0..12 {
        let ssh = a.clone();
        tasks.push(tokio::spawn(async move {
            exec(&ssh, &format!("/disk print detail where slot=a{i}")).await
        }));
    }
    s.rds.wait_for_commands(12).await;
    assert_eq!(s.rds.open_sessions(), 12);
    assert_eq!(s.rds.max_concurrent_sessions_per_connection(), 12);
    assert_eq!(s.rds.max_concurrent_sessions_total(), 12);

    for i in 0..3 {
        let ssh = b.clone();
        tasks.push(tokio::spawn(async move {
            exec(&ssh, &format!("/disk print detail where slot=b{i}")).await
        }));
    }
    s.rds.wait_for_commands(15).await;
    assert_eq!(s.rds.max_concurrent_sessions_total(), 15);
    assert_eq!(s.rds.max_concurrent_sessions_per_connection(), 12);
    assert!(s.rds.commands().iter().all(|c| c.output.is_none()));

    s.rds.hang(false);
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(
            (answer.stdout.as_str(), answer.exit_status),
            (LEGEND, Some(0))
        );
    }
    s.rds
        .wait_until("sessions closed", || s.rds.open_sessions() == 0)
        .await;

    // Maxima restart from what is open now; one session at a time stays at one.
    s.rds.reset_max_concurrency();
    assert_eq!(s.rds.max_concurrent_sessions_total(), 0);
    for _ in 0..3 {
        run(&a, "/disk print detail where slot=x").await;
    }
    assert_eq!(s.rds.max_concurrent_sessions_per_connection(), 1);
    assert_eq!(s.rds.connections_accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_write_the_model_consistently() {
    let s = setup().await;
    let mut conns = vec![];
    for _ in 0..8 {
        conns.push(connect(&s.rds, &s.key).await);
    }
    let mut tasks = vec![];
    for (c, ssh) in conns.iter().enumerate() {
        for i in 0..8 {
            let ssh = ssh.clone();
            tasks.push(tokio::spawn(async move {
                let slot = format!("pvc-c{c}-v{i}");
                run(&ssh, &add_volume_cmd(&slot, "1G")).await
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), "");
    }
    assert_eq!(s.rds.disks().len(), 64);
    assert_eq!(
        s.rds.pool_free_bytes(),
        fake_rds::DEFAULT_POOL_FREE - 64 * GIB
    );
    let listing = run(&conns[0], r#"/disk print detail where slot~"pvc""#).await;
    assert_eq!(listing.matches("type=file").count(), 64);
    assert!(listing.contains("\r\n63  B     t    type=file"));
    assert_eq!(s.rds.connections_accepted(), 8);
    let connections: std::collections::BTreeSet<u64> =
        s.rds.commands().iter().map(|r| r.connection).collect();
    assert_eq!(connections.len(), 8);
    assert!(s.rds.max_concurrent_sessions_per_connection() <= 8);
}

#[tokio::test]
async fn a_session_limit_refuses_extra_channels() {
    let s = setup_with(|c| c.max_sessions_per_connection = Some(2)).await;
    let ssh = connect(&s.rds, &s.key).await;
    let first = ssh.channel_open_session().await.unwrap();
    let _second = ssh.channel_open_session().await.unwrap();
    assert!(ssh.channel_open_session().await.is_err());
    assert_eq!(s.rds.max_concurrent_sessions_per_connection(), 2);
    assert_eq!((s.rds.sessions_opened(), s.rds.sessions_refused()), (2, 1));
    // Closing one frees its place.
    first.close().await.unwrap();
    let third = ssh.channel_open_session().await.unwrap();
    third
        .exec(true, "/disk print detail where slot=x")
        .await
        .unwrap();
    s.rds.wait_for_commands(1).await;
}

// ------------------------------------------------------------------------------------------
// Faults
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn latency_holds_each_command_back() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;

    // A command that arrived under a long latency is still unanswered after a later one, sent
    // with no latency, has been answered.
    s.rds.set_latency(Duration::from_secs(3600));
    let slow = {
        let ssh = ssh.clone();
        tokio::spawn(async move { exec(&ssh, "/disk print detail where slot=slow").await })
    };
    s.rds.wait_for_commands(1).await;
    s.rds.set_latency(Duration::ZERO);
    assert_eq!(
        run(&ssh, "/disk print detail where slot=fast").await,
        LEGEND
    );
    assert!(!slow.is_finished());
    assert_eq!(s.rds.commands()[0].output, None);

    // A short latency delays by at least that much (a lower bound, never flaky).
    s.rds.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    run(&ssh, "/disk print detail where slot=x").await;
    assert!(started.elapsed() >= Duration::from_millis(150));

    s.rds.drop_all_connections();
    let slow = slow.await.unwrap();
    assert_eq!(slow.exit_status, None, "{slow:?}");
}

#[tokio::test]
async fn fail_matching_answers_instead_of_running() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    let add = add_volume_cmd(V1, "10G");

    s.rds
        .fail_matching("/disk add", "failure: not enough space\r\n", 0, 1);
    let a = exec(&ssh, &add).await;
    assert_eq!(
        (a.stdout.as_str(), a.exit_status),
        ("failure: not enough space\r\n", Some(0))
    );
    assert!(s.rds.disks().is_empty(), "the command did not run");
    assert_eq!(run(&ssh, &add).await, "", "only once");
    assert_eq!(s.rds.disks().len(), 1);

    // Any exit status, and a count.
    let id = s.rds.fail_matching("print", "boom\r\n", 7, 2);
    for _ in 0..2 {
        let a = exec(&ssh, "/disk print detail where slot=x").await;
        assert_eq!((a.stdout.as_str(), a.exit_status), ("boom\r\n", Some(7)));
    }
    assert_eq!(run(&ssh, "/disk print detail where slot=x").await, LEGEND);
    s.rds.remove_fault(id);

    let log = s.rds.commands_matching("print");
    assert_eq!(log[0].output.as_deref(), Some("boom\r\n"));
    assert_eq!(log[0].exit_status, Some(7));
    assert_eq!(log[2].exit_status, Some(0));
}

#[tokio::test]
async fn drop_all_connections_cuts_live_connections() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    assert_eq!(run(&ssh, "/disk print detail where slot=x").await, LEGEND);

    s.rds.hang(true);
    let pending = {
        let ssh = ssh.clone();
        tokio::spawn(async move { exec(&ssh, &add_volume_cmd(V1, "1G")).await })
    };
    s.rds.wait_for_commands(2).await;
    assert_eq!(s.rds.live_connections(), 1);

    s.rds.drop_all_connections();
    let cut = pending.await.unwrap();
    assert_eq!(cut.exit_status, None, "never answered: {cut:?}");
    s.rds
        .wait_until("connection gone", || s.rds.live_connections() == 0)
        .await;
    assert!(try_exec(&ssh, "/disk print detail where slot=x")
        .await
        .is_err());

    // The hung command died with its connection: releasing the hang runs nothing.
    s.rds.hang(false);
    assert!(s.rds.disks().is_empty());
    assert_eq!(s.rds.commands()[1].output, None);
    assert_eq!(s.rds.open_sessions(), 0);

    let again = connect(&s.rds, &s.key).await;
    assert_eq!(run(&again, "/disk print detail where slot=x").await, LEGEND);
    assert_eq!(s.rds.connections_accepted(), 2);
}

#[tokio::test]
async fn drop_connection_on_can_lose_the_answer_after_running() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    let add = add_volume_cmd(V1, "1G");

    s.rds.drop_connection_on("/disk add", true, 1);
    let lost = exec(&ssh, &add).await;
    assert_eq!(lost.exit_status, None, "{lost:?}");
    assert_eq!(s.rds.disks().len(), 1, "it ran");

    // The driver's retry then sees the disk already there.
    let ssh = connect(&s.rds, &s.key).await;
    assert_eq!(
        run(&ssh, &add).await,
        "failure: item with such slot already exists\r\n"
    );

    // Without execute the command never runs.
    s.rds.drop_connection_on("/disk remove", false, 1);
    let lost = exec(&ssh, &format!("/disk remove [find slot={V1}]")).await;
    assert_eq!(lost.exit_status, None);
    assert_eq!(s.rds.disks().len(), 1);
}

#[tokio::test]
async fn refuse_connections_closes_new_ones_only() {
    let s = setup().await;
    let live = connect(&s.rds, &s.key).await;

    s.rds.refuse_connections(true);
    assert!(connect_as(&s.rds, &s.key, "admin").await.is_err());
    assert_eq!(s.rds.connections_refused(), 1);
    assert_eq!(s.rds.connections_accepted(), 1);
    assert_eq!(
        run(&live, "/disk print detail where slot=x").await,
        LEGEND,
        "live connections stay"
    );

    s.rds.refuse_connections(false);
    let back = connect(&s.rds, &s.key).await;
    assert_eq!(run(&back, "/disk print detail where slot=x").await, LEGEND);
    assert_eq!(s.rds.connections_accepted(), 2);
}

#[tokio::test]
async fn stop_accepting_leaves_connects_waiting_until_resumed() {
    let s = setup().await;
    s.rds.stop_accepting(true);
    let waiting = {
        let rds = s.rds.clone();
        let key = s.key.clone();
        tokio::spawn(async move { connect_as(&rds, &key, "admin").await.is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "no banner while not accepting");
    assert_eq!(s.rds.connections_accepted(), 0);

    s.rds.stop_accepting(false);
    assert!(waiting.await.unwrap());
    assert_eq!(s.rds.connections_accepted(), 1);
}

#[tokio::test]
async fn hang_holds_commands_unrun_until_released() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    s.rds.hang(true);
    let add = add_volume_cmd(V1, "1G");
    let hung = {
        let ssh = ssh.clone();
        let add = add.clone();
        tokio::spawn(async move { exec(&ssh, &add).await })
    };
    let log = s.rds.wait_for_commands(1).await;
    assert_eq!(log[0].command, add);
    assert_eq!(log[0].output, None);
    // The witness that the command reached the hang, rather than a pause that hopes so.
    s.rds
        .wait_until("the command to reach the hang", || {
            s.rds.held_commands() == 1
        })
        .await;
    assert!(!hung.is_finished(), "not answered while hung");
    assert!(s.rds.disks().is_empty(), "not run while hung");

    s.rds.hang(false);
    let answer = hung.await.unwrap();
    assert_eq!(s.rds.held_commands(), 0);
    assert_eq!((answer.stdout.as_str(), answer.exit_status), ("", Some(0)));
    assert_eq!(s.rds.disks().len(), 1);
}

// ------------------------------------------------------------------------------------------
// The command log
// ------------------------------------------------------------------------------------------

/// (seq, connection, command, output, exit status)
type LogView<'a> = (u64, u64, &'a str, Option<&'a str>, Option<u32>);

#[tokio::test]
async fn the_log_records_connection_session_command_and_answer() {
    let s = setup().await;
    let a = connect(&s.rds, &s.key).await;
    let b = connect(&s.rds, &s.key).await;
    let quoted = r#"/file remove [find name="storage-pool/metal-csi/x.img"]"#;
    run(&a, "/disk print detail where slot=one").await;
    run(&a, quoted).await;
    run(&b, "/nonsense").await;

    let log = s.rds.commands();
    let view: Vec<LogView> = log
        .iter()
        .map(|r: &CommandRecord| {
            (
                r.seq,
                r.connection,
                r.command.as_str(),
                r.output.as_deref(),
                r.exit_status,
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            (
                1,
                1,
                "/disk print detail where slot=one",
                Some(LEGEND),
                Some(0)
            ),
            (2, 1, quoted, Some(""), Some(0)),
            (
                3,
                2,
                "/nonsense",
                Some("bad command name nonsense (line 1 column 2)\r\n"),
                Some(0)
            ),
        ]
    );
    assert_ne!(log[0].channel, log[1].channel, "a session per command");
    assert_eq!(s.rds.commands_matching("/file").len(), 1);
    s.rds.clear_commands();
    assert!(s.rds.commands().is_empty());
}

/// A line RouterOS would read as two commands, or with a substitution, is answered with an
/// error, runs not at all, and is recorded; dropping the fake with a recorded violation fails
/// the test that used it, so no test can pass while the driver sends one.
///
/// Catches: the violation check removed from the fake's `Drop for Guard`, or `Shared::execute`
/// no longer recording violations.
#[tokio::test]
async fn a_violation_is_refused_and_fails_the_test_when_the_fake_is_dropped() {
    let s = setup().await;
    let ssh = connect(&s.rds, &s.key).await;
    let line = format!("{};/system reboot", add_volume_cmd("x", "1G"));
    // The column of the second command's first character.
    let col = line.find(";/system").unwrap() + 2;
    assert_eq!(
        run(&ssh, &line).await,
        format!("fake RouterOS refuses a second command in one line (line 1 column {col})\r\n")
    );
    assert_eq!(
        run(&ssh, "/disk print detail where slot=\"$x\"").await,
        "fake RouterOS refuses a `$` substitution in a quoted value (line 1 column 32)\r\n"
    );
    assert!(s.rds.disk("x").is_none(), "nothing of the line ran");
    let seen: Vec<(String, String)> = s
        .rds
        .violations()
        .into_iter()
        .map(|v| (v.command, v.what))
        .collect();
    assert_eq!(
        seen,
        [
            (line.clone(), "a second command in one line".to_string()),
            (
                "/disk print detail where slot=\"$x\"".to_string(),
                "a `$` substitution in a quoted value".to_string()
            ),
        ]
    );
    // Taken: the fake drops quietly.
    assert_eq!(s.rds.take_violations().len(), 2);
    run(&ssh, "/disk remove [find slot=$y]").await;
    drop(ssh);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(s)));
    let message = dropped.expect_err("dropping a fake with a violation fails");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("syntax the driver must never send") && message.contains("slot=$y"),
        "{message}"
    );
}

// ------------------------------------------------------------------------------------------
// The driver's RDS backend against the fake: round trips
// ------------------------------------------------------------------------------------------

mod backend {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use rds_csi::backend::rds::ssh::{HostKeys, SshConfig, SshPool};
    use rds_csi::backend::rds::values::{MadeWith, NqnPrefix, RosPath, DEFAULT_VOLUME_PATH};
    use rds_csi::backend::rds::{RdsBackend, RdsDefaults};
    use rds_csi::backend::{ContentSource, CreateRequest, SnapshotRequest, VolumeBackend};
    use rds_csi::domain::{AccessMode, Capability};
    use rds_csi::ids::SnapshotId;
    use rds_csi::metrics::Metrics;
    use rds_csi::VolumeId;

    use super::{setup, Disk, Setup, GIB};

    fn backend(s: &Setup, pool_size: usize, sessions_per_connection: usize) -> Arc<RdsBackend> {
        let key = russh::keys::load_secret_key(&s.key, None).unwrap();
        let pool = SshPool::new(
            SshConfig {
                host: s.rds.address().ip().to_string(),
                port: s.rds.address().port(),
                user: "admin".into(),
                key: Arc::new(key),
                host_keys: HostKeys::Verify(vec![s.rds.host_public_key()]),
                pool_size,
                sessions_per_connection,
                connect_timeout: Duration::from_secs(10),
                command_timeout: Duration::from_secs(60),
            },
            Arc::new(Metrics::new()),
        );
        Arc::new(RdsBackend::new(
            pool,
            RdsDefaults {
                nvme_address: Some("10.0.0.1".parse().unwrap()),
                nvme_port: 4420,
                volume_path: RosPath::parse(DEFAULT_VOLUME_PATH, "volumePath").unwrap(),
                nqn_prefix: NqnPrefix::default(),
            },
        ))
    }

    fn id(i: usize) -> VolumeId {
        VolumeId::try_from(format!("pvc-00000000-0000-4000-8000-{i:012x}").as_str()).unwrap()
    }

    /// N lookups that wait together for the one session cost one command, not N, and
    /// each gets its own volume (or none). The order is forced: the first lookup holds the only
    /// session, hung in the fake, until the others have all asked. Catches lookups not joining
    /// (N + 1 commands).
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_lookups_cost_fewer_commands_than_lookups() {
        const N: usize = 10;
        let s = setup().await;
        for i in 0..N / 2 {
            s.rds.add_disk(Disk::volume(id(i).as_str(), GIB)).unwrap();
        }
        let b = backend(&s, 1, 1);
        b.capacity().await.unwrap(); // dialled
        s.rds.clear_commands();
        s.rds.hang(true);
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.get(&id(0)).await })
        };
        s.rds
            .wait_until("the first lookup held", || s.rds.held_commands() == 1)
            .await;
        let rest: Vec<_> = (1..N)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.get(&id(i)).await) })
            })
            .collect();
        // One thread: each spawned lookup runs to its wait for the session before this goes on.
        tokio::task::yield_now().await;
        s.rds.hang(false);
        assert!(first.await.unwrap().unwrap().is_some());
        for r in rest {
            let (i, got) = r.await.unwrap();
            assert_eq!(got.unwrap().is_some(), i < N / 2, "volume {i}");
        }
        let commands: Vec<String> = s.rds.commands().into_iter().map(|c| c.command).collect();
        let rest: Vec<String> = (1..N).map(|i| id(i).to_string()).collect();
        assert_eq!(
            commands,
            [
                format!("/disk print detail where slot={}", id(0)),
                format!("/disk print detail where slot~\"{}\"", rest.join("|")),
            ],
            "{N} lookups, two commands"
        );
    }

    /// A failed listing fails every lookup that joined it, saying what failed.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_listing_fails_every_lookup_in_it() {
        let s = setup().await;
        let b = backend(&s, 1, 1);
        b.capacity().await.unwrap();
        s.rds.hang(true);
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.get(&id(0)).await })
        };
        s.rds
            .wait_until("the first lookup held", || s.rds.held_commands() == 1)
            .await;
        let rest: Vec<_> = (1..4)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.get(&id(i)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        s.rds
            .fail_matching("slot~", "failure: out of memory\r\n", 0, 1);
        s.rds.hang(false);
        assert!(first.await.unwrap().unwrap().is_none());
        for r in rest {
            let e = r.await.unwrap().unwrap_err().to_string();
            assert!(
                e.contains("looking up 3 disks at once") && e.contains("out of memory"),
                "{e}"
            );
        }
    }

    /// CreateVolume of a volume that exists with this request's record is one lookup: the
    /// disk just read is the answer. Catches a second read of the disk after the check.
    #[tokio::test]
    async fn creating_an_existing_volume_is_one_lookup() {
        let s = setup().await;
        let b = backend(&s, 1, 2);
        let request = || CreateRequest {
            id: id(1),
            name: id(1).to_string(),
            required_bytes: GIB,
            limit_bytes: 0,
            capabilities: vec![Capability::block(AccessMode::MultiNodeMultiWriter)],
            parameters: BTreeMap::new(),
            source: None,
        };
        let made = b.create(request()).await.unwrap();
        s.rds.clear_commands();
        let again = b.create(request()).await.unwrap();
        assert_eq!(
            (again.capacity_bytes, &again.parameters),
            (made.capacity_bytes, &made.parameters)
        );
        let commands: Vec<String> = s.rds.commands().into_iter().map(|c| c.command).collect();
        assert_eq!(
            commands,
            [format!("/disk print detail where slot={}", id(1))]
        );
    }

    fn request(i: usize, source: Option<ContentSource>) -> CreateRequest {
        CreateRequest {
            id: id(i),
            name: id(i).to_string(),
            required_bytes: GIB,
            limit_bytes: 0,
            capabilities: vec![Capability::block(AccessMode::MultiNodeMultiWriter)],
            parameters: BTreeMap::new(),
            source,
        }
    }

    fn commands(s: &Setup) -> Vec<String> {
        s.rds.commands().into_iter().map(|c| c.command).collect()
    }

    /// A fresh CreateVolume is one write: the Go driver's `/disk add` with the volume's record
    /// as its `comment=`, between the lookup and the read that verifies it, and the disk holds
    /// the record from the add on. Catches the record dropped from the add (`CreateVolume`'s
    /// ` comment=` in command.rs): a `/disk set … comment=` follows it, four commands.
    #[tokio::test]
    async fn a_fresh_create_is_one_write_that_carries_its_record() {
        let s = setup().await;
        let b = backend(&s, 1, 2);
        b.capacity().await.unwrap();
        s.rds.clear_commands();
        b.create(request(1, None)).await.unwrap();
        let v = id(1);
        let record = format!(
            "made-{}",
            MadeWith::of(
                &BTreeMap::new(),
                &[Capability::block(AccessMode::MultiNodeMultiWriter)]
            )
        );
        assert_eq!(
            commands(&s),
            [
                format!("/disk print detail where slot={v}"),
                format!(
                    "/disk add type=file file-path=/storage-pool/metal-csi/{v}.img \
                     file-size=1G slot={v} nvme-tcp-export=yes nvme-tcp-server-port=4420 \
                     nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:{v} comment={record}"
                ),
                format!("/disk print detail where slot={v}"),
            ]
        );
        assert_eq!(s.rds.disk(v.as_str()).unwrap().comment, record);
    }

    /// A CreateVolume whose `/disk add` ran but whose answer was lost fails, and its retry finds
    /// the disk with its record already there (no window between the add and the record):
    /// one lookup, no write.
    #[tokio::test]
    async fn a_create_retried_after_its_answer_was_lost_writes_nothing() {
        let s = setup().await;
        let b = backend(&s, 1, 2);
        b.capacity().await.unwrap();
        s.rds.drop_connection_on("/disk add", true, 1);
        b.create(request(1, None)).await.unwrap_err();
        assert!(s
            .rds
            .disk(id(1).as_str())
            .unwrap()
            .comment
            .starts_with("made-"));
        s.rds.clear_commands();
        b.create(request(1, None)).await.unwrap();
        assert_eq!(
            commands(&s),
            [format!("/disk print detail where slot={}", id(1))]
        );
    }

    /// A snapshot's add answered "already exists" (the slot was taken after this call's lookup,
    /// by a copy of another volume) is held to what is there: ALREADY_EXISTS, and the other
    /// copy's record is kept. The order is forced: the call's first lookup is answered empty.
    /// Catches the source check after the add removed (`create_snapshot`'s
    /// `if provenance(&disk)… != Some(source…)` block): the call answers the other volume's
    /// snapshot as its own.
    #[tokio::test]
    async fn a_snapshot_add_that_finds_another_copy_is_already_exists() {
        let s = setup().await;
        let b = backend(&s, 1, 2);
        b.create(request(1, None)).await.unwrap();
        b.create(request(2, None)).await.unwrap();
        let snap = SnapshotId::for_name("backup").unwrap();
        let theirs = format!("source-{}-at-1739800000", id(2));
        s.rds
            .add_disk(Disk {
                comment: theirs.clone(),
                ..Disk::snapshot(snap.as_str(), GIB)
            })
            .unwrap();
        s.rds
            .fail_matching(&format!("where slot={snap}"), super::LEGEND, 0, 1);
        s.rds.clear_commands();
        let err = backup_of_volume_1(&b).await.unwrap_err();
        assert_already_exists_after_a_refused_copy_add(&s, &err);
        assert_eq!(s.rds.disk(snap.as_str()).unwrap().comment, theirs);
    }

    /// CreateSnapshot of the snapshot named "backup" of volume 1.
    async fn backup_of_volume_1(
        b: &RdsBackend,
    ) -> Result<rds_csi::backend::SnapshotInfo, rds_csi::BackendError> {
        b.create_snapshot(SnapshotRequest {
            id: SnapshotId::for_name("backup").unwrap(),
            name: "backup".into(),
            source: id(1),
            parameters: BTreeMap::new(),
        })
        .await
    }

    /// The call answered ALREADY_EXISTS after sending one `copy-from` add, which RouterOS
    /// answered with "the slot exists".
    fn assert_already_exists_after_a_refused_copy_add(s: &Setup, err: &rds_csi::BackendError) {
        assert!(
            matches!(err, rds_csi::BackendError::AlreadyExists(_)),
            "{err:?}"
        );
        let adds: Vec<Option<String>> = s
            .rds
            .commands_matching("copy-from=")
            .into_iter()
            .map(|c| c.output)
            .collect();
        assert_eq!(
            adds,
            [Some(
                "failure: item with such slot already exists\r\n".to_string()
            )],
            "the add was sent and RouterOS answered that the slot exists"
        );
    }

    /// A restore's add answered "already exists" (the slot was taken after this call's lookup,
    /// by a clone of another volume) is held to what is there: ALREADY_EXISTS, and the other
    /// copy's record is kept. The order is forced: the call's first lookup is answered empty.
    /// Catches `check_copied` after the copy's add removed (`create_from`): the call answers
    /// the other volume's clone as its restore.
    #[tokio::test]
    async fn a_restore_add_that_finds_another_copy_is_already_exists() {
        let s = setup().await;
        let b = backend(&s, 1, 2);
        b.create(request(1, None)).await.unwrap();
        b.create(request(2, None)).await.unwrap();
        let snap = backup_of_volume_1(&b).await.unwrap();
        let theirs = format!("source-{}-at-1739800000", id(2));
        s.rds
            .add_disk(Disk {
                comment: theirs.clone(),
                ..Disk::volume(id(3).as_str(), GIB)
            })
            .unwrap();
        s.rds
            .fail_matching(&format!("where slot={}", id(3)), super::LEGEND, 0, 1);
        s.rds.clear_commands();
        let err = b
            .create(request(3, Some(ContentSource::Snapshot(snap.id))))
            .await
            .unwrap_err();
        assert_already_exists_after_a_refused_copy_add(&s, &err);
        assert_eq!(s.rds.disk(id(3).as_str()).unwrap().comment, theirs);
    }

    /// A snapshot, a restore from it and a clone are one write each: the Go driver's
    /// `copy-from` adds with the record (the source, and a volume's parameters) as their
    /// `comment=`. Catches the record dropped from `CreateSnapshot` or `CopyVolume` (a
    /// `/disk set … comment=` follows the add).
    #[tokio::test]
    async fn a_snapshot_a_restore_and_a_clone_are_one_write_each() {
        let s = setup().await;
        let b = backend(&s, 1, 2);
        b.create(request(1, None)).await.unwrap();
        let writes = |s: &Setup| -> Vec<String> {
            commands(s)
                .into_iter()
                .filter(|c| !c.starts_with("/disk print"))
                .collect()
        };

        s.rds.clear_commands();
        let snap = backup_of_volume_1(&b).await.unwrap();
        let written = writes(&s);
        assert_eq!(written.len(), 1, "{written:#?}");
        let disk = s.rds.disk(snap.id.as_str()).unwrap();
        assert!(
            written[0].starts_with("/disk add type=file copy-from=")
                && written[0].ends_with(&format!(" comment={}", disk.comment))
                && disk.comment.starts_with(&format!("source-{}-at-", id(1))),
            "{written:#?} {}",
            disk.comment
        );

        for (i, source) in [
            (2, ContentSource::Snapshot(snap.id.clone())),
            (3, ContentSource::Volume(id(1))),
        ] {
            s.rds.clear_commands();
            b.create(request(i, Some(source))).await.unwrap();
            let written = writes(&s);
            assert_eq!(written.len(), 1, "{written:#?}");
            let disk = s.rds.disk(id(i).as_str()).unwrap();
            assert!(
                written[0].starts_with("/disk add type=file copy-from=")
                    && written[0].ends_with(&format!(" comment={}", disk.comment))
                    && disk.comment.contains("-made-"),
                "{written:#?} {}",
                disk.comment
            );
        }
    }
}
