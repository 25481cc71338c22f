//! Boot seeding against the fake API server: N PersistentVolumes of this driver, each with one
//! attached VolumeAttachment (every tenth RWX block), shaped like real objects (labels,
//! annotations, finalizers, managedFields). Starts the real `rds-csi` binary with
//! `--kubernetes on`, and measures the wall time from spawning it to Probe answering ready, and
//! its peak RSS (VmHWM) once ready.
//!
//! Not criterion: each sample is a process start. `cargo bench --bench boot_seeding` runs it;
//! `BOOT_SEED_VOLUMES` (comma-separated sizes, default 100000) and `BOOT_SEED_RUNS` (default 3)
//! choose what; `BOOT_SEED_DRIVER` runs another build of the driver (e.g. one for profiling).
//! `BOOT_SEED_REFERENCE=/path/to/rds-csi` also boots that build (the previous tree) in every
//! measured run, interleaved with the one under test (reference, new, reference, new, ...) so
//! the machine's noise hits both alike, and prints the two side by side.
//! `BOOT_SEED_FLOOR=0` skips timing the fake alone (the uncached list floor costs half a
//! minute at 100k).
//! `-- --test` (as criterion benches take it) checks that the bench works: 1,000 volumes, one
//! measured run, unless the variables say otherwise.
//!
//! The fake API server runs in this process on one tokio thread, on the same two cores as the
//! driver. Serializing 300 MiB of lists takes it far longer than the driver needs to read them,
//! so the first boot ("run 0") fills the fake's list cache and the measured runs are served from
//! it: their time is the driver's. The fake's own cost is printed as the "list floor": kube-rs
//! paging through the same objects, 500 per page, with no driver running, uncached and cached.

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::ListParams;
use kube::Api;
use rds_csi::csi::identity_client::IdentityClient;
use rds_csi::csi::ProbeRequest;

use fleet::{cpu_seconds, load, median, status_kib};

const BIN: &str = env!("CARGO_BIN_EXE_rds-csi");

/// Pages through `path` 500 at a time as raw text: what serving the list costs, with no
/// deserialization on the client side. Returns the bytes received.
async fn page_raw(client: &kube::Client, path: &str) -> usize {
    let mut token = String::new();
    let mut bytes = 0;
    loop {
        let uri = format!("{path}?limit=500&continue={token}");
        let req = tonic::codegen::http::Request::get(uri)
            .body(Vec::new())
            .expect("request");
        let text = client.request_text(req).await.expect("list");
        bytes += text.len();
        match text
            .split("\"continue\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        {
            Some(next) if !next.is_empty() => token = next.to_string(),
            _ => return bytes,
        }
    }
}

/// Pages through every object of `api` as typed objects, 500 per page.
async fn page_typed<K>(api: &Api<K>) -> usize
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().limit(500);
    let mut n = 0;
    loop {
        let page = api.list(&params).await.expect("list");
        n += page.items.len();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => return n,
        }
    }
}

/// What the API side costs alone, PVs and VAs paged in parallel as the driver does: as raw
/// text, then deserialized into k8s-openapi types (as kube-rs watchers do).
async fn list_floor(kubeconfig: &Path) -> (Duration, usize, Duration) {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig"),
        &Default::default(),
    )
    .await
    .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let start = Instant::now();
    let (a, b) = tokio::join!(
        page_raw(&client, "/api/v1/persistentvolumes"),
        page_raw(&client, "/apis/storage.k8s.io/v1/volumeattachments"),
    );
    let raw = start.elapsed();
    let start = Instant::now();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let vas: Api<VolumeAttachment> = Api::all(client);
    let (n_pvs, n_vas) = tokio::join!(page_typed(&pvs), page_typed(&vas));
    assert_eq!(n_pvs, n_vas);
    (raw, a + b, start.elapsed())
}

struct Sample {
    to_socket: Duration,
    to_ready: Duration,
    driver_reported_s: Option<f64>,
    hwm_mib: f64,
    rss_mib: f64,
    cpu_s: f64,
}

async fn boot_once(bin: &str, kubeconfig: &Path, dir: &Path) -> Sample {
    let socket = dir.join("csi.sock");
    let log = std::fs::File::create(dir.join("driver.log")).expect("log");
    let start = Instant::now();
    let mut child = Command::new(bin)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-id", "node-0", "--metrics-address", "127.0.0.1:0"])
        .args(["--kubernetes", "on"])
        .arg("--file-root")
        .arg(dir.join("volumes"))
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        // No debug listener (an env var, so older builds run too).
        .env("RDS_CSI_DEBUG_ADDRESS", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn rds-csi");
    let pid = child.id();
    let endpoint = format!("unix://{}", socket.display());
    let mut to_socket = None;
    let deadline = start + Duration::from_secs(300);
    let to_ready = loop {
        assert!(Instant::now() < deadline, "driver not ready after 300 s");
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "rds-csi exited ({status}):\n{}",
                std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default()
            );
        }
        if let Ok(channel) = rds_csi::ctl::connect(&endpoint).await {
            to_socket.get_or_insert_with(|| start.elapsed());
            let mut identity = IdentityClient::new(channel);
            let ready = loop {
                match identity.probe(ProbeRequest {}).await {
                    Ok(r) if r.get_ref().ready == Some(true) => break true,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                    Err(_) => break false,
                }
            };
            if ready {
                break start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let cpu_s = cpu_seconds(pid).unwrap_or(f64::NAN);
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default();
    let driver_reported_s = log
        .lines()
        .find(|l| l.contains("ready") && l.contains("seconds="))
        .and_then(|l| l.split("seconds=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    Sample {
        to_socket: to_socket.unwrap_or(to_ready),
        to_ready,
        driver_reported_s,
        hwm_mib: hwm as f64 / 1024.0,
        rss_mib: rss as f64 / 1024.0,
        cpu_s,
    }
}

fn print_sample(label: &str, s: &Sample) {
    println!(
        "  {label}: socket up {:.3?}, Ready {:.3?} (driver's own seconds_to_ready {}), driver CPU {:.2} s, peak RSS {:.1} MiB, RSS at ready {:.1} MiB",
        s.to_socket,
        s.to_ready,
        s.driver_reported_s.map_or("-".into(), |v| format!("{v:.3} s")),
        s.cpu_s,
        s.hwm_mib,
        s.rss_mib
    );
}

/// The builds to boot: the reference (if `BOOT_SEED_REFERENCE` names one) first, then the one
/// under test (`BOOT_SEED_DRIVER`, else this tree's).
fn builds() -> Vec<(&'static str, String)> {
    let reference = std::env::var("BOOT_SEED_REFERENCE")
        .ok()
        .filter(|r| !r.is_empty());
    let new = std::env::var("BOOT_SEED_DRIVER").unwrap_or_else(|_| BIN.to_string());
    reference
        .map(|r| ("reference", r))
        .into_iter()
        .chain([("new", new)])
        .collect()
}

/// One line per build: medians, then the raw runs.
fn print_summary(n: usize, builds: &[(&str, String)], samples: &[Vec<Sample>]) {
    println!("boot_seeding {n}: | build | Ready | driver CPU to Ready | peak RSS (VmHWM) | RSS at Ready |");
    for ((label, bin), runs) in builds.iter().zip(samples) {
        let col = |f: &dyn Fn(&Sample) -> f64, unit: &str, digits: usize| {
            let raw: Vec<String> = runs
                .iter()
                .map(|s| format!("{:.*}", digits, f(s)))
                .collect();
            format!(
                "{:.*} {unit} ({})",
                digits,
                median(runs.iter().map(f).collect()),
                raw.join(", ")
            )
        };
        println!(
            "boot_seeding {n}: | {label} ({bin}) | {} | {} | {} | {} |",
            col(&|s| s.to_ready.as_secs_f64(), "s", 3),
            col(&|s| s.cpu_s, "s", 2),
            col(&|s| s.hwm_mib, "MiB", 1),
            col(&|s| s.rss_mib, "MiB", 1),
        );
    }
}

fn main() {
    let (sizes, runs) = fleet::sizes_and_runs("BOOT_SEED", "100000");
    let floor = std::env::var("BOOT_SEED_FLOOR").map_or(true, |v| v != "0");
    let builds = builds();
    let runtime = fleet::runtime();
    runtime.block_on(async {
        for n in sizes {
            let api = FakeApiServer::start().await;
            let loaded = Instant::now();
            load(&api, n);
            let loaded = loaded.elapsed();
            let dir = tempfile::tempdir().expect("tempdir");
            let kubeconfig = api.write_kubeconfig(&dir.path().join("kube"));
            println!("boot_seeding: {n} PVs + {n} VolumeAttachments loaded in {loaded:.2?}");
            if floor {
                let (raw, bytes, typed) = list_floor(&kubeconfig).await;
                println!(
                    "  list floor, 500/page, PVs and VAs in parallel: raw text {raw:.2?} ({:.0} MiB), typed (k8s-openapi) {typed:.2?}",
                    bytes as f64 / (1 << 20) as f64
                );
            }
            // Run 0 of each build boots against the fake serializing every page it asks for
            // and fills the fake's list cache; the measured runs are then served from memory,
            // so their time is the driver's own.
            api.cache_lists(true);
            for (label, bin) in &builds {
                let run_dir = tempfile::tempdir().expect("tempdir");
                let s = boot_once(bin, &kubeconfig, run_dir.path()).await;
                print_sample(&format!("{label} run 0 (fills the fake's list cache)"), &s);
            }
            if floor {
                let (raw, _, typed) = list_floor(&kubeconfig).await;
                println!(
                    "  list floor from the fake's cache: raw text {raw:.2?}, typed (k8s-openapi) {typed:.2?}"
                );
            }
            let mut samples: Vec<Vec<Sample>> = builds.iter().map(|_| Vec::new()).collect();
            for run in 0..runs {
                for ((label, bin), samples) in builds.iter().zip(&mut samples) {
                    let run_dir = tempfile::tempdir().expect("tempdir");
                    let s = boot_once(bin, &kubeconfig, run_dir.path()).await;
                    print_sample(&format!("{label} run {}", run + 1), &s);
                    samples.push(s);
                }
            }
            print_summary(n, &builds, &samples);
        }
    });
}
