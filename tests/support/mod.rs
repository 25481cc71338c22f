//! Test support: runs the real `rds-csi` binary on a temporary unix socket and talks to it with
//! the generated CSI client.

#![allow(dead_code)]

pub mod cluster;
pub mod host;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rds_csi::csi::controller_client::ControllerClient;
use rds_csi::csi::identity_client::IdentityClient;
use rds_csi::csi::node_client::NodeClient;
use rds_csi::csi::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use rds_csi::csi::*;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_rds-csi");

pub struct Driver {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub channel: Channel,
    /// Where this process's lines start in `driver.log`: a restarted driver appends to it.
    log_start: usize,
}

/// How long to wait for the driver to come up. A wait, not a timing assertion.
const STARTUP: Duration = Duration::from_secs(60);

impl Driver {
    /// Starts the driver with `--node-id n1`, extra known nodes and extra flags.
    pub async fn start(known: &[&str], extra: &[&str]) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, known, extra).await
    }

    pub async fn start_in(dir: tempfile::TempDir, known: &[&str], extra: &[&str]) -> Driver {
        Self::start_with(dir, known, extra, None).await
    }

    async fn start_with(
        dir: tempfile::TempDir,
        known: &[&str],
        extra: &[&str],
        kubeconfig: Option<&Path>,
    ) -> Driver {
        Self::start_with_env(dir, known, extra, kubeconfig, &[]).await
    }

    pub async fn start_with_env(
        dir: tempfile::TempDir,
        known: &[&str],
        extra: &[&str],
        kubeconfig: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Driver {
        let socket = dir.path().join("csi.sock");
        let log_start =
            std::fs::metadata(dir.path().join("driver.log")).map_or(0, |m| m.len() as usize);
        let mut child = Self::spawn_with_env(dir.path(), &socket, known, extra, kubeconfig, env);
        let channel = tokio::select! {
            channel = wait_for(&socket) => channel,
            status = exited(&mut child) => panic!(
                "rds-csi exited during start-up ({status:?}):\n{}",
                std::fs::read_to_string(dir.path().join("driver.log")).unwrap_or_default()
            ),
        };
        Driver {
            child: Some(child),
            dir,
            socket,
            channel,
            log_start,
        }
    }

    /// Starts the driver in Kubernetes mode against the fake API server whose kubeconfig is
    /// `kubeconfig`.
    pub async fn start_kube(kubeconfig: &Path, extra: &[&str]) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        Self::start_kube_in(dir, kubeconfig, extra).await
    }

    pub async fn start_kube_in(
        dir: tempfile::TempDir,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Driver {
        let mut args = vec!["--kubernetes", "on"];
        args.extend_from_slice(extra);
        Self::start_with(dir, &[], &args, Some(kubeconfig)).await
    }

    /// As [`Self::start_kube_in`], with extra environment variables (what a pod's downward API
    /// would set).
    pub async fn start_kube_in_env(
        dir: tempfile::TempDir,
        kubeconfig: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Driver {
        let mut args = vec!["--kubernetes", "on"];
        args.extend_from_slice(extra);
        Self::start_with_env(dir, &[], &args, Some(kubeconfig), env).await
    }

    /// SIGKILLs this driver and starts a new one in the same directory (same volumes, socket
    /// path and log file), as a crashed pod restarting would.
    pub async fn crash_and_restart(mut self, kubeconfig: &Path, extra: &[&str]) -> Driver {
        self.kill9();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_kube_in(dir, kubeconfig, extra).await
    }

    /// Kills the process with SIGKILL: no cleanup runs.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn spawn(dir: &Path, socket: &Path, known: &[&str], extra: &[&str]) -> Child {
        Self::spawn_with(dir, socket, known, extra, None)
    }

    pub fn spawn_with(
        dir: &Path,
        socket: &Path,
        known: &[&str],
        extra: &[&str],
        kubeconfig: Option<&Path>,
    ) -> Child {
        Self::spawn_with_env(dir, socket, known, extra, kubeconfig, &[])
    }

    pub fn spawn_with_env(
        dir: &Path,
        socket: &Path,
        known: &[&str],
        extra: &[&str],
        kubeconfig: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("driver.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        match kubeconfig {
            Some(path) => cmd.env("KUBECONFIG", path),
            // Never let a developer's own cluster leak into a test.
            None => cmd.env("KUBECONFIG", dir.join("no-such-kubeconfig")),
        };
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg("n1")
            .arg("--file-root")
            .arg(dir.join("volumes"))
            .arg("--node-state-dir")
            .arg(dir.join("node-state"))
            .args(if extra.contains(&"--kubernetes") {
                &[][..]
            } else {
                &["--kubernetes", "off"][..]
            })
            .args(if extra.contains(&"--metrics-address") {
                &[][..]
            } else {
                &["--metrics-address", "127.0.0.1:0"][..]
            })
            .args(if extra.contains(&"--debug-address") {
                &[][..]
            } else {
                &["--debug-address", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("RDS_CSI_KNOWN_NODES", known.join(","))
            .env("RUST_LOG", "info")
            // Confined to the driver's own directory unless a flag says otherwise (a node
            // test's `Host::kubelet_args`); never the machine's /var/lib/kubelet.
            .env("RDS_CSI_KUBELET_DIR", dir)
            // Never let the machine's own pod namespace leak into a test.
            .env_remove("POD_NAMESPACE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rds-csi")
    }

    /// The log as written so far; a log that cannot be read fails the test (an empty string
    /// would make every "the log does not say X" check pass). The driver writes its log from a
    /// background thread, so a line logged while an RPC was handled may land just after the
    /// answer: to see a line, use [`Driver::wait_for_log`]. Once the process has exited,
    /// everything it logged is here.
    pub fn log(&self) -> String {
        let path = self.dir.path().join("driver.log");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading the driver log {}: {e}", path.display()))
    }

    /// This process's part of the log (a restarted driver appends to the same file).
    fn own_log(&self) -> String {
        let log = self.log();
        log.get(self.log_start..).unwrap_or_default().to_string()
    }

    /// Waits until this process has logged `needle`, then returns the whole log. Lines land in
    /// the order they were logged, so every line logged before that one is there too: to
    /// assert that something was *not* logged, or logged only so often, first wait for a line
    /// logged after it.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_count(needle, 1).await
    }

    /// Waits until this process has logged `needle` at least `n` times; returns the whole log.
    pub async fn wait_for_log_count(&self, needle: &str, n: usize) -> String {
        eventually(&format!("{n} × {needle:?} in the driver's log"), || async {
            self.own_log().matches(needle).count() >= n
        })
        .await;
        self.log()
    }

    /// The metrics address the driver logged at start.
    pub async fn metrics_url(&self) -> String {
        self.logged_url("serving /metrics").await
    }

    /// The address of `/debug/attachments` the driver logged at start.
    pub async fn debug_url(&self) -> String {
        self.logged_url("serving /debug/attachments").await
    }

    /// `http://` and the address logged on the line saying `what`.
    async fn logged_url(&self, what: &str) -> String {
        self.wait_for_log(what).await;
        let log = self.own_log();
        let line = log
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("{what:?} logged"));
        let addr = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(json) => json["fields"]["address"].as_str().unwrap().to_string(),
            Err(_) => line
                .split("address=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string(),
        };
        format!("http://{addr}")
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and waits for the exit status, keeping the runtime free so our client's
    /// connection can close.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        // Close our connection first, as a sidecar going away would.
        self.channel = tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy();
        let mut child = self.child.take().unwrap();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        exited(&mut child).await
    }

    pub async fn create(&self, name: &str, cap: VolumeCapability) -> Volume {
        self.controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    pub async fn publish(
        &self,
        volume: &str,
        node: &str,
        cap: VolumeCapability,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        self.publish_full(volume, node, cap, false, HashMap::new())
            .await
    }

    pub async fn publish_full(
        &self,
        volume: &str,
        node: &str,
        cap: VolumeCapability,
        readonly: bool,
        volume_context: HashMap<String, String>,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        self.controller()
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                volume_capability: Some(cap),
                readonly,
                secrets: HashMap::new(),
                volume_context,
            })
            .await
            .map(|r| r.into_inner().publish_context)
    }

    pub async fn unpublish(&self, volume: &str, node: &str) -> Result<(), tonic::Status> {
        self.controller()
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                secrets: HashMap::new(),
            })
            .await
            .map(|_| ())
    }

    /// DeleteVolume.
    pub async fn delete(&self, volume: &str) -> Result<(), tonic::Status> {
        self.controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume.into(),
                secrets: HashMap::new(),
            })
            .await
            .map(|_| ())
    }

    /// Every volume id ListVolumes returns.
    pub async fn volume_ids(&self) -> Result<Vec<String>, tonic::Status> {
        let list = self
            .controller()
            .list_volumes(ListVolumesRequest::default())
            .await?
            .into_inner();
        Ok(list
            .entries
            .into_iter()
            .filter_map(|e| e.volume.map(|v| v.volume_id))
            .collect())
    }

    /// A sample of this driver's `/metrics` (see [`sample`]).
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.scrape().await, series)
    }

    pub async fn ready(&self) -> bool {
        self.identity()
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
            == Some(true)
    }

    /// Polls Probe until ready.
    pub async fn wait_ready(&self) {
        eventually("driver ready", || async { self.ready().await }).await;
    }

    pub async fn debug(&self, volume: &str) -> serde_json::Value {
        let body = http_get(&format!(
            "{}/debug/attachments?volume={volume}",
            self.debug_url().await
        ))
        .await;
        serde_json::from_str(&body).unwrap()
    }

    pub async fn scrape(&self) -> String {
        http_get(&format!("{}/metrics", self.metrics_url().await)).await
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Resolves when the child process has exited.
async fn exited(child: &mut Child) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until the socket accepts a CSI connection that answers GetPluginInfo.
pub async fn wait_for(socket: &Path) -> Channel {
    let endpoint = format!("unix://{}", socket.display());
    let deadline = tokio::time::Instant::now() + STARTUP;
    loop {
        if let Ok(channel) = rds_csi::ctl::connect(&endpoint).await {
            if IdentityClient::new(channel.clone())
                .get_plugin_info(GetPluginInfoRequest {})
                .await
                .is_ok()
            {
                return channel;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "driver did not come up on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates volumes in a file backend under `dir/volumes` before a driver starts there.
pub async fn precreate(dir: &Path, volumes: &[&str]) {
    use rds_csi::backend::{file::FileBackend, CreateRequest, VolumeBackend};
    use rds_csi::domain::{AccessMode, Capability};
    let backend = FileBackend::open(dir.join("volumes")).unwrap();
    for v in volumes {
        backend
            .create(CreateRequest {
                id: rds_csi::VolumeId::try_from(*v).unwrap(),
                name: v.to_string(),
                required_bytes: 1 << 20,
                limit_bytes: 0,
                capabilities: vec![Capability::block(AccessMode::MultiNodeMultiWriter)],
                parameters: Default::default(),
                source: None,
            })
            .await
            .unwrap();
    }
}

/// The nodes a volume's `/debug/attachments` view says hold it, in attach order.
pub fn holders(view: &serde_json::Value) -> Vec<String> {
    view["nodes"].as_array().map_or(vec![], |n| {
        n.iter()
            .map(|n| n["node"].as_str().unwrap().to_string())
            .collect()
    })
}

/// Polls `check` every 20 ms until it holds; fails after a generous deadline. A wait for
/// something asynchronous to happen, not a timing assertion.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` like [`eventually`], but answers whether it came to hold by the deadline
/// instead of failing the test.
pub async fn holds_eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.0 GET over loopback: the body.
pub async fn http_get(url: &str) -> String {
    http_get_status(url).await.1
}

/// A minimal HTTP/1.0 GET over loopback: the status code and the body.
pub async fn http_get_status(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(response);
    (status, body)
}

/// The value of one sample in a Prometheus text scrape. A series that is not there fails the
/// test, so a misspelled or missing metric can never read as 0; a test that expects absence
/// says so with [`sample_or_absent`].
pub fn sample(scrape: &str, series: &str) -> f64 {
    sample_or_absent(scrape, series).unwrap_or_else(|| {
        let family = series.split('{').next().unwrap_or(series);
        let known: Vec<&str> = scrape.lines().filter(|l| l.starts_with(family)).collect();
        panic!("series {series} is absent from the scrape; its family has: {known:#?}")
    })
}

/// The value of one sample, or None when the scrape has no such series.
pub fn sample_or_absent(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{series}: {v:?} is not a number: {e}"))
        })
}

/// The TCP addresses process `pid` listens on, from /proc: its socket inodes matched against
/// the LISTEN entries of its network namespace.
pub fn tcp_listeners(pid: i32) -> Vec<std::net::SocketAddr> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/net/{table}: {e}"));
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            let (ip, port) = f[1].split_once(':').expect("address:port");
            let port = u16::from_str_radix(port, 16).expect("hex port");
            // The address is in 32-bit words, each in host (little-endian) order.
            let bytes: Vec<u8> = (0..ip.len() / 8)
                .flat_map(|w| {
                    u32::from_str_radix(&ip[w * 8..w * 8 + 8], 16)
                        .expect("hex address")
                        .to_le_bytes()
                })
                .collect();
            let ip: std::net::IpAddr = match bytes.len() {
                4 => <[u8; 4]>::try_from(bytes).unwrap().into(),
                _ => <[u8; 16]>::try_from(bytes).unwrap().into(),
            };
            out.push(std::net::SocketAddr::new(ip, port));
        }
    }
    out
}

pub fn cap(mode: Mode, block: bool) -> VolumeCapability {
    let access_type = if block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })
    };
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(access_type),
    }
}

/// RWO filesystem: exclusive.
pub fn rwo() -> VolumeCapability {
    cap(Mode::SingleNodeWriter, false)
}

/// RWO raw block: exclusive.
pub fn rwo_block() -> VolumeCapability {
    cap(Mode::SingleNodeWriter, true)
}

/// RWX block: migratable.
pub fn rwx() -> VolumeCapability {
    cap(Mode::MultiNodeMultiWriter, true)
}

/// RWX filesystem: always refused.
pub fn rwx_mount() -> VolumeCapability {
    cap(Mode::MultiNodeMultiWriter, false)
}
