//! Stage and publish latency of a volume that already holds a filesystem (issue 21): the node
//! service's NodeStageVolume, NodePublishVolume, NodeUnpublishVolume and NodeUnstageVolume,
//! each timed on its own, against the kernel doing the same work by hand in the same run.
//!
//! The driver is the real `rds-csi` binary (standalone, file backend, `--kubernetes off`),
//! spawned on a unix socket in a temporary directory and called through the generated CSI
//! client, as the kubelet calls it. The gRPC surface, not `NodePlugin`, so the numbers include
//! what a kubelet waits for (the socket, the handler, the per-volume lock) and so the bench keeps
//! building while the node's internal types change.
//!
//! One 1 GiB ext4 volume is created, attached to the node and staged once (the driver's mkfs,
//! timed once and reported apart), and a marker file is written through its target. Then every
//! round runs four cycles over the same image, in an order that rotates each round so none
//! always runs on a warmer cache:
//! - `driver`: NodeStage (loop attach, `blkid -p`, `dumpe2fs -h`, `e2fsck -n`, mount(2)),
//!   NodePublish (bind mount + remount `nosuid,nodev,noexec`), NodeUnpublish, NodeUnstage;
//! - `mount(8)`: `losetup --find --show` + `mount -t ext4 -o nosuid,nodev`; `mount --bind -o
//!   nosuid,nodev,noexec`; `umount`; `umount` + `losetup --detach`;
//! - `mount(8)+checks`: the same with the driver's three probes (`blkid -p -o export`,
//!   `dumpe2fs -h`, `e2fsck -n`) before the mount, so the rest of the gap is the driver's own;
//! - `mount(2)`: the kernel alone, no tools: `LOOP_CTL_GET_FREE` + `LOOP_SET_FD`, mount(2),
//!   bind mount(2) + remount, umount2(2), umount2(2) + `LOOP_CLR_FD`.
//!
//! The by-hand cycles create their directories once, outside the timed part; the driver
//! creates and removes its target directory inside NodePublish/NodeUnpublish, as it must.
//! After every phase the mount table is checked (the staging mount holds the marker, the target
//! is mounted, then neither is), outside the timed part: a bench that times failures times the
//! wrong thing.
//!
//! Reports p50, p99 and max of each phase per cycle, and the ratio of the driver's p50 to each
//! by-hand p50. Needs root (loop devices and mounts); without root it says so and exits 0.
//! Everything lives under one temporary directory whose guard unmounts and detaches what is
//! left even on a panic; the run ends by asserting nothing is.
//!
//! Not criterion: a percentile over interleaved cycles is the claim, and each sample is a loop
//! device's life. `cargo bench --bench stage_publish` runs it (`STAGE_BENCH_ROUNDS`, default
//! 200, stopping early after 100 s); `-- --test`, or running it without cargo bench's `--bench`
//! (`cargo test --all-targets`), does 3 rounds to check the bench works.

#[allow(dead_code)]
#[path = "../tests/support/host.rs"]
mod host;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rds_csi::csi::controller_client::ControllerClient;
use rds_csi::csi::identity_client::IdentityClient;
use rds_csi::csi::node_client::NodeClient;
use rds_csi::csi::volume_capability::access_mode::Mode;
use rds_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use rds_csi::csi::*;
use rds_csi::node::mountinfo;
use rustix::mount::{MountFlags, UnmountFlags};
use tonic::transport::Channel;

use host::Host;

const BIN: &str = env!("CARGO_BIN_EXE_rds-csi");
const VOLUME_BYTES: i64 = 1 << 30;
const MARKER: &str = "stage-bench-marker";
/// How long the whole measured part may take before it stops early (the sample count says so).
const BUDGET: Duration = Duration::from_secs(100);

const PHASES: [&str; 4] = ["stage", "publish", "unpublish", "unstage"];

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Cycle {
    Driver,
    Tools,
    ToolsChecked,
    Syscalls,
}

const CYCLES: [Cycle; 4] = [
    Cycle::Driver,
    Cycle::Tools,
    Cycle::ToolsChecked,
    Cycle::Syscalls,
];

impl Cycle {
    fn name(self) -> &'static str {
        match self {
            Cycle::Driver => "driver (gRPC)",
            Cycle::Tools => "mount(8)",
            Cycle::ToolsChecked => "mount(8)+checks",
            Cycle::Syscalls => "mount(2)",
        }
    }
}

/// The `rds-csi` process and its clients; the process is killed on drop (its mounts are the
/// [`Host`] guard's, dropped after it).
struct Driver {
    _child: Killed,
    node: NodeClient<Channel>,
    controller: ControllerClient<Channel>,
    log: PathBuf,
}

impl Driver {
    fn start(rt: &tokio::runtime::Runtime, dir: &Path, kubelet_root: &Path) -> Driver {
        let socket = dir.join("csi.sock");
        let log = dir.join("driver.log");
        let child = Command::new(BIN)
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "n1", "--kubernetes", "off"])
            .args(["--metrics-address", "127.0.0.1:0"])
            .arg("--file-root")
            .arg(dir.join("volumes"))
            .arg("--node-state-dir")
            .arg(dir.join("node-state"))
            // Where the kubelet's paths are: ignored by a driver without path confinement.
            .env("RDS_CSI_KUBELET_DIR", kubelet_root)
            .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
            .env("RDS_CSI_KNOWN_NODES", "")
            .env("RUST_LOG", "info")
            // No debug listener (an env var, so older builds run too).
            .env("RDS_CSI_DEBUG_ADDRESS", "")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn rds-csi");
        let mut child = Killed(child);
        let endpoint = format!("unix://{}", socket.display());
        let started = Instant::now();
        let channel = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("rds-csi exited during start-up ({status}):\n{}", read(&log));
            }
            let up = rt.block_on(async {
                let channel = rds_csi::ctl::connect(&endpoint).await.ok()?;
                IdentityClient::new(channel.clone())
                    .get_plugin_info(GetPluginInfoRequest {})
                    .await
                    .ok()?;
                Some(channel)
            });
            if let Some(channel) = up {
                break channel;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "rds-csi did not come up:\n{}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Driver {
            _child: child,
            node: NodeClient::new(channel.clone()),
            controller: ControllerClient::new(channel),
            log,
        }
    }

    fn log(&self) -> String {
        read(&self.log)
    }
}

/// The driver's log, for a panic message (an unreadable log is reported as such).
fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_else(|e| format!("(log {}: {e})", log.display()))
}

/// A child process killed and reaped on drop, so a panic leaves no driver behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ext4() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
    }
}

/// The kubelet's paths for one volume and one pod, under `root` (its `--root-dir`).
struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

impl Paths {
    /// Creates the staging directory and the target's parent, as the kubelet does; the target
    /// itself too when `with_target` (the by-hand cycles bind onto it; the driver makes its own).
    fn under(root: &Path, name: &str, with_target: bool) -> Paths {
        let staging = root
            .join("plugins/kubernetes.io/csi/rds.csi.srvlab.io")
            .join(name)
            .join("globalmount");
        let target = root
            .join("pods")
            .join(format!("pod-{name}"))
            .join("volumes/kubernetes.io~csi/pvc/mount");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if with_target {
            std::fs::create_dir(&target).unwrap();
        }
        Paths { staging, target }
    }
}

/// The volume through the driver: its id, its publish_context and its kubelet paths.
struct DriverVolume {
    id: String,
    publish_context: HashMap<String, String>,
    paths: Paths,
}

impl DriverVolume {
    fn stage(&self, rt: &tokio::runtime::Runtime, d: &Driver) {
        rt.block_on(d.node.clone().node_stage_volume(NodeStageVolumeRequest {
            volume_id: self.id.clone(),
            publish_context: self.publish_context.clone(),
            staging_target_path: self.paths.staging.display().to_string(),
            volume_capability: Some(ext4()),
            secrets: HashMap::new(),
            volume_context: HashMap::new(),
        }))
        .unwrap_or_else(|e| panic!("NodeStageVolume: {e}\n{}", d.log()));
    }

    fn publish(&self, rt: &tokio::runtime::Runtime, d: &Driver) {
        rt.block_on(
            d.node
                .clone()
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: self.id.clone(),
                    publish_context: self.publish_context.clone(),
                    staging_target_path: self.paths.staging.display().to_string(),
                    target_path: self.paths.target.display().to_string(),
                    volume_capability: Some(ext4()),
                    readonly: false,
                    secrets: HashMap::new(),
                    volume_context: HashMap::new(),
                }),
        )
        .unwrap_or_else(|e| panic!("NodePublishVolume: {e}\n{}", d.log()));
    }

    fn unpublish(&self, rt: &tokio::runtime::Runtime, d: &Driver) {
        rt.block_on(
            d.node
                .clone()
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: self.id.clone(),
                    target_path: self.paths.target.display().to_string(),
                }),
        )
        .unwrap_or_else(|e| panic!("NodeUnpublishVolume: {e}\n{}", d.log()));
    }

    fn unstage(&self, rt: &tokio::runtime::Runtime, d: &Driver) {
        rt.block_on(
            d.node
                .clone()
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: self.id.clone(),
                    staging_target_path: self.paths.staging.display().to_string(),
                }),
        )
        .unwrap_or_else(|e| panic!("NodeUnstageVolume: {e}\n{}", d.log()));
    }
}

/// Runs a tool; panics with its stderr when it fails. Returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// <linux/loop.h>
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// Binds `image` to a free loop device with the kernel's own ioctls, as losetup does without
/// its checks and sysfs reads; retries when another process takes the free device first.
fn loop_attach(image: &File) -> PathBuf {
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .unwrap();
    for _ in 0..100 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        assert!(
            n >= 0,
            "LOOP_CTL_GET_FREE: {}",
            std::io::Error::last_os_error()
        );
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = File::options().read(true).write(true).open(&path).unwrap();
        // SAFETY: LOOP_SET_FD takes an open file descriptor, which `image` holds.
        let set = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_FD, image.as_raw_fd()) };
        if set == 0 {
            return path;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "LOOP_SET_FD: {e}");
    }
    panic!("no free loop device after 100 tries");
}

fn loop_detach(device: &Path) {
    let fd = File::open(device).unwrap();
    // SAFETY: LOOP_CLR_FD takes no argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CLR_FD) };
    assert_eq!(r, 0, "LOOP_CLR_FD: {}", std::io::Error::last_os_error());
}

/// What a by-hand cycle holds between its phases.
struct Hand<'a> {
    image: &'a Path,
    paths: &'a Paths,
    device: Option<PathBuf>,
}

const BIND_FLAGS: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

impl Hand<'_> {
    fn stage(&mut self, cycle: Cycle) {
        match cycle {
            Cycle::Tools | Cycle::ToolsChecked => {
                let device = run(Command::new("losetup")
                    .args(["--find", "--show", "--"])
                    .arg(self.image));
                if cycle == Cycle::ToolsChecked {
                    run(Command::new("blkid").args(["-p", "-o", "export", &device]));
                    run(Command::new("dumpe2fs").args(["-h", &device]));
                    run(Command::new("e2fsck").args(["-n", &device]));
                }
                self.device = Some(PathBuf::from(&device));
                run(Command::new("mount")
                    .args(["-t", "ext4", "-o", "nosuid,nodev", &device])
                    .arg(&self.paths.staging));
            }
            Cycle::Syscalls => {
                let image = File::options()
                    .read(true)
                    .write(true)
                    .open(self.image)
                    .unwrap();
                let device = loop_attach(&image);
                self.device = Some(device.clone());
                rustix::mount::mount(
                    &device,
                    &self.paths.staging,
                    "ext4",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    Some(c""),
                )
                .unwrap();
            }
            Cycle::Driver => unreachable!(),
        }
    }

    fn publish(&mut self, cycle: Cycle) {
        match cycle {
            Cycle::Tools | Cycle::ToolsChecked => {
                run(Command::new("mount")
                    .args(["--bind", "-o", "nosuid,nodev,noexec"])
                    .arg(&self.paths.staging)
                    .arg(&self.paths.target));
            }
            Cycle::Syscalls => {
                rustix::mount::mount_bind(&self.paths.staging, &self.paths.target).unwrap();
                rustix::mount::mount_remount(
                    &self.paths.target,
                    MountFlags::BIND | BIND_FLAGS,
                    c"",
                )
                .unwrap();
            }
            Cycle::Driver => unreachable!(),
        }
    }

    fn unpublish(&mut self, cycle: Cycle) {
        match cycle {
            Cycle::Tools | Cycle::ToolsChecked => {
                run(Command::new("umount").arg(&self.paths.target));
            }
            Cycle::Syscalls => {
                rustix::mount::unmount(&self.paths.target, UnmountFlags::NOFOLLOW).unwrap()
            }
            Cycle::Driver => unreachable!(),
        }
    }

    fn unstage(&mut self, cycle: Cycle) {
        let device = self.device.take().unwrap();
        match cycle {
            Cycle::Tools | Cycle::ToolsChecked => {
                run(Command::new("umount").arg(&self.paths.staging));
                run(Command::new("losetup").arg("--detach").arg(&device));
            }
            Cycle::Syscalls => {
                rustix::mount::unmount(&self.paths.staging, UnmountFlags::NOFOLLOW).unwrap();
                loop_detach(&device);
            }
            Cycle::Driver => unreachable!(),
        }
    }
}

fn mounted(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo::parse(&text)
        .unwrap()
        .into_iter()
        .find(|m| m.mount_point == path)
        .map(|m| m.fs_type)
}

/// The state after each phase, checked outside the timed part.
fn check(phase: usize, paths: &Paths, cycle: Cycle) {
    let staged = mounted(&paths.staging);
    let published = mounted(&paths.target);
    let (want_staged, want_published) = match phase {
        0 => (true, false),
        1 => (true, true),
        2 => (true, false),
        _ => (false, false),
    };
    assert_eq!(
        (staged.is_some(), published.is_some()),
        (want_staged, want_published),
        "{} after {}: staging {staged:?}, target {published:?}",
        cycle.name(),
        PHASES[phase]
    );
    if want_staged {
        assert_eq!(staged.as_deref(), Some("ext4"));
        assert!(
            paths.staging.join(MARKER).exists(),
            "{}: the staged filesystem is not the one made at the start",
            cycle.name()
        );
    }
    if want_published {
        assert!(paths.target.join(MARKER).exists());
    }
}

/// Samples of one cycle, one vector per phase.
#[derive(Default)]
struct Samples([Vec<Duration>; 4]);

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn report(results: &HashMap<Cycle, Samples>, rounds: usize) {
    println!(
        "\n{rounds} rounds; milliseconds (p50 / p99 / max); ratio = the driver's p50 / that \
         p50, and p99 / p99"
    );
    // One phase's samples, sorted; phase 4 is stage + publish of the same cycle.
    let sorted = |cycle: Cycle, phase: usize| {
        let r = &results[&cycle].0;
        let mut s: Vec<Duration> = if phase == 4 {
            r[0].iter().zip(&r[1]).map(|(a, b)| *a + *b).collect()
        } else {
            r[phase].clone()
        };
        s.sort();
        s
    };
    for (phase, name) in PHASES.iter().enumerate().chain([(4, &"stage+publish")]) {
        println!("\n{name}");
        let driver = sorted(Cycle::Driver, phase);
        for cycle in CYCLES {
            let s = sorted(cycle, phase);
            let ratio = if cycle == Cycle::Driver {
                String::new()
            } else {
                let r = |p| percentile(&driver, p).as_secs_f64() / percentile(&s, p).as_secs_f64();
                format!("x{:.1} / x{:.1}", r(50.0), r(99.0))
            };
            println!(
                "  {:<16} {:>8} / {:>8} / {:>8}  {ratio}",
                cycle.name(),
                ms(percentile(&s, 50.0)),
                ms(percentile(&s, 99.0)),
                ms(*s.last().unwrap()),
            );
        }
    }
}

fn main() {
    // As criterion decides: `cargo bench` passes `--bench`; without it (`cargo test
    // --all-targets`) or with `--test`, a short run that checks the bench works.
    let args: Vec<String> = std::env::args().collect();
    let test = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "stage_publish: skipped: it makes loop devices and mounts and needs root \
             (run `cargo bench --bench stage_publish` as root)"
        );
        return;
    }
    let rounds: usize = if test {
        3
    } else {
        std::env::var("STAGE_BENCH_ROUNDS")
            .map(|v| v.parse().expect("STAGE_BENCH_ROUNDS is a number"))
            .unwrap_or(200)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host = Host::new();
    // The kubelet's root exists before the driver starts, as on a node.
    let kubelet = host.path().join("kubelet");
    std::fs::create_dir(&kubelet).unwrap();
    let dir = host.driver_dir();
    let results = {
        let driver = Driver::start(&rt, dir.path(), &kubelet);
        let results = measure(&rt, &driver, &kubelet, rounds);
        drop(driver);
        results
    };
    // A loop device detached while something still had it open goes when that closes.
    let settled = Instant::now();
    while !host.loops().is_empty() && settled.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    host.assert_clean();
    let done = results[&Cycle::Driver].0[0].len();
    report(&results, done);
}

fn measure(
    rt: &tokio::runtime::Runtime,
    driver: &Driver,
    kubelet: &Path,
    rounds: usize,
) -> HashMap<Cycle, Samples> {
    let volume = rt
        .block_on(
            driver
                .controller
                .clone()
                .create_volume(CreateVolumeRequest {
                    name: "stage-bench".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: VOLUME_BYTES,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![ext4()],
                    ..Default::default()
                }),
        )
        .unwrap_or_else(|e| panic!("CreateVolume: {e}\n{}", driver.log()))
        .into_inner()
        .volume
        .unwrap();
    let publish_context = rt
        .block_on(driver.controller.clone().controller_publish_volume(
            ControllerPublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: "n1".into(),
                volume_capability: Some(ext4()),
                readonly: false,
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            },
        ))
        .unwrap_or_else(|e| panic!("ControllerPublishVolume: {e}\n{}", driver.log()))
        .into_inner()
        .publish_context;
    let vol = DriverVolume {
        id: volume.volume_id,
        publish_context,
        paths: Paths::under(kubelet, "driver", false),
    };

    // The first stage makes the filesystem; the marker written through the target proves every
    // later stage (the driver's and by hand) mounts that one, never a new one.
    let started = Instant::now();
    vol.stage(rt, driver);
    let first_stage = started.elapsed();
    let loops = host_loops(kubelet);
    assert_eq!(
        loops.len(),
        1,
        "one loop device for the staged image: {loops:?}"
    );
    let image = PathBuf::from(
        std::fs::read_to_string(format!("/sys/block/{}/loop/backing_file", loops[0]))
            .unwrap()
            .trim(),
    );
    vol.publish(rt, driver);
    std::fs::write(vol.paths.target.join(MARKER), b"made by the first stage\n").unwrap();
    vol.unpublish(rt, driver);
    vol.unstage(rt, driver);
    println!(
        "first NodeStageVolume (mkfs.ext4 of {} MiB): {} ms; image {}",
        VOLUME_BYTES >> 20,
        ms(first_stage),
        image.display()
    );

    let hand_paths = Paths::under(kubelet, "by-hand", true);
    let mut results: HashMap<Cycle, Samples> =
        CYCLES.iter().map(|c| (*c, Samples::default())).collect();
    let began = Instant::now();
    for round in 0..rounds {
        if round > 0 && began.elapsed() > BUDGET {
            println!("(stopped after {round} rounds: the {BUDGET:?} budget is spent)");
            break;
        }
        for i in 0..CYCLES.len() {
            let cycle = CYCLES[(round + i) % CYCLES.len()];
            let samples = results.get_mut(&cycle).unwrap();
            match cycle {
                Cycle::Driver => {
                    for phase in 0..4 {
                        let started = Instant::now();
                        match phase {
                            0 => vol.stage(rt, driver),
                            1 => vol.publish(rt, driver),
                            2 => vol.unpublish(rt, driver),
                            _ => vol.unstage(rt, driver),
                        }
                        samples.0[phase].push(started.elapsed());
                        check(phase, &vol.paths, cycle);
                    }
                }
                _ => {
                    let mut hand = Hand {
                        image: &image,
                        paths: &hand_paths,
                        device: None,
                    };
                    for phase in 0..4 {
                        let started = Instant::now();
                        match phase {
                            0 => hand.stage(cycle),
                            1 => hand.publish(cycle),
                            2 => hand.unpublish(cycle),
                            _ => hand.unstage(cycle),
                        }
                        samples.0[phase].push(started.elapsed());
                        check(phase, &hand_paths, cycle);
                    }
                }
            }
        }
    }
    results
}

/// Loop devices whose backing file lies under `dir`'s temporary tree.
fn host_loops(dir: &Path) -> Vec<String> {
    let root = dir.parent().unwrap().to_path_buf();
    host::loops_backed_by(|backing| backing.starts_with(&root))
}
