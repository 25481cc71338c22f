//! The RDS SSH pool under load: 64 concurrent CreateVolume + DeleteVolume against the fake
//! RouterOS with a fixed latency injected per command, for pool sizes 1, 2, 4 and 8 (two
//! sessions per connection, the default), beside the serialized bound: every command one
//! after another, as the Go driver's design amounts to under load (its commands share one
//! connection). Reports wall time, commands, the speed-up over the serialized bound, and the
//! most sessions the fake saw open on one connection, which must never exceed the configured
//! number.
//!
//! Not criterion: each sample is a whole batch. `cargo bench --bench rds_pool` runs it;
//! `RDS_POOL_LATENCY_MS` (default 20), `RDS_POOL_OPS` (default 64) and `RDS_POOL_RUNS` (default
//! 3, the median is reported) choose what. `-- --test` checks the bench and the session bound
//! quickly (8 operations, 2 ms, one run).

// A bench without the test harness compiles the fake's `cfg(test)` module without its tests.
#[allow(unused_imports)]
#[path = "../tests/support/fake_rds.rs"]
mod fake_rds;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_rds::{client_keypair, FakeRds, FakeRdsConfig};
use rds_csi::backend::rds::ssh::{HostKeys, SshConfig, SshPool};
use rds_csi::backend::rds::values::{NqnPrefix, RosPath, DEFAULT_VOLUME_PATH};
use rds_csi::backend::rds::{RdsBackend, RdsDefaults};
use rds_csi::backend::{CreateRequest, VolumeBackend};
use rds_csi::domain::{AccessMode, Capability};
use rds_csi::metrics::Metrics;
use rds_csi::VolumeId;

const SESSIONS_PER_CONNECTION: usize = 2;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

struct Sample {
    wall: Duration,
    commands: usize,
    max_per_connection: usize,
    max_total: usize,
}

async fn batch(pool_size: usize, ops: usize, latency: Duration) -> Sample {
    let keys = tempfile::tempdir().unwrap();
    let (key_path, public) = client_keypair(keys.path());
    let mut config = FakeRdsConfig::new(public);
    config.latency = latency;
    let fake = FakeRds::start(config).await;
    let key = russh::keys::load_secret_key(&key_path, None).unwrap();
    let pool = SshPool::new(
        SshConfig {
            host: fake.address().ip().to_string(),
            port: fake.address().port(),
            user: "admin".into(),
            key: Arc::new(key),
            host_keys: HostKeys::Verify(vec![fake.host_public_key()]),
            pool_size,
            sessions_per_connection: SESSIONS_PER_CONNECTION,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(120),
        },
        Arc::new(Metrics::new()),
    );
    let backend = Arc::new(RdsBackend::new(
        pool,
        RdsDefaults {
            nvme_address: Some("10.0.0.1".parse().unwrap()),
            nvme_port: 4420,
            volume_path: RosPath::parse(DEFAULT_VOLUME_PATH, "volumePath").unwrap(),
            nqn_prefix: NqnPrefix::default(),
        },
    ));
    // Connections are dialled before the clock starts: the batch measures commands.
    let warm: Vec<_> = (0..pool_size * SESSIONS_PER_CONNECTION)
        .map(|_| {
            let backend = backend.clone();
            tokio::spawn(async move { backend.capacity().await.unwrap() })
        })
        .collect();
    for w in warm {
        w.await.unwrap();
    }
    fake.clear_commands();
    fake.reset_max_concurrency();
    let started = Instant::now();
    let tasks: Vec<_> = (0..ops)
        .map(|i| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let id = VolumeId::try_from(format!("pvc-bench-{i:04}").as_str()).unwrap();
                backend
                    .create(CreateRequest {
                        id: id.clone(),
                        name: id.to_string(),
                        required_bytes: 1 << 30,
                        limit_bytes: 0,
                        capabilities: vec![Capability::block(AccessMode::MultiNodeMultiWriter)],
                        parameters: BTreeMap::new(),
                        source: None,
                    })
                    .await
                    .expect("create");
                backend.delete(&id).await.expect("delete");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let wall = started.elapsed();
    assert!(fake.disks().is_empty(), "every volume was deleted");
    Sample {
        wall,
        commands: fake.commands().len(),
        max_per_connection: fake.max_concurrent_sessions_per_connection(),
        max_total: fake.max_concurrent_sessions_total(),
    }
}

fn main() {
    let test_mode = std::env::args().any(|a| a == "--test");
    let (ops, latency_ms, runs) = if test_mode {
        (8, 2, 1)
    } else {
        (
            env("RDS_POOL_OPS", 64) as usize,
            env("RDS_POOL_LATENCY_MS", 20),
            env("RDS_POOL_RUNS", 3) as usize,
        )
    };
    let latency = Duration::from_millis(latency_ms);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "rds_pool: {ops} concurrent CreateVolume+DeleteVolume, {latency_ms} ms per command, \
         {SESSIONS_PER_CONNECTION} sessions per connection, median of {runs}"
    );
    println!("pool  wall_ms  commands  serialized_ms  speedup  max_sessions/conn  max_sessions");
    for pool_size in [1usize, 2, 4, 8] {
        let mut samples: Vec<Sample> = (0..runs)
            .map(|_| rt.block_on(batch(pool_size, ops, latency)))
            .collect();
        samples.sort_by_key(|s| s.wall);
        let s = &samples[samples.len() / 2];
        let serialized = latency * s.commands as u32;
        let speedup = serialized.as_secs_f64() / s.wall.as_secs_f64();
        println!(
            "{pool_size:>4}  {:>7.0}  {:>8}  {:>13.0}  {speedup:>6.2}x  {:>17}  {:>12}",
            s.wall.as_secs_f64() * 1e3,
            s.commands,
            serialized.as_secs_f64() * 1e3,
            s.max_per_connection,
            s.max_total,
        );
        for s in &samples {
            assert!(
                s.max_per_connection <= SESSIONS_PER_CONNECTION,
                "pool {pool_size}: {} sessions open on one connection, configured {SESSIONS_PER_CONNECTION}",
                s.max_per_connection
            );
            assert!(
                s.max_total <= pool_size * SESSIONS_PER_CONNECTION,
                "pool {pool_size}: {} sessions open at once",
                s.max_total
            );
        }
    }
}
