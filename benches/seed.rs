//! Boot seeding without the API server: from an in-memory list of N attached VolumeAttachments
//! (one per PV; every tenth PV RWX block) to N seeded volumes. A volume with one holder is
//! parked (a compact record; its actor starts on its first message), so in this fixture no
//! actor starts at seeding. Timed from the start of `kube::seed::plan` until every arbiter has
//! run whatever the supervisor queued on it. The list and PV map are built before timing; a fresh
//! supervisor and arbiters are made for each iteration and torn down outside it. The memory
//! printout also wakes every volume, to show what N live actors cost.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rds_csi::actors::messages::Describe;
use rds_csi::actors::messages::Seed;
use rds_csi::actors::volume::VolumeActor;
use rds_csi::domain::AccessClass;
use rds_csi::kube::seed::{plan, PvView, VaView};
use rds_csi::role::Term;
use rds_csi::VolumeId;
use support::{cores, system, Actors};

/// What a PV projection would hold: handle and class, by PV name.
pub type Pvs = HashMap<String, (String, AccessClass)>;

/// Seeding's lookup into `pvs`.
pub fn lookup<'p>(pvs: &'p Pvs) -> impl Fn(&str) -> Option<PvView<'p>> {
    move |name: &str| {
        pvs.get(name).map(|(handle, class)| PvView {
            handle: Some(handle),
            class: *class,
            migration_timeout: None,
        })
    }
}

/// N VolumeAttachments on N PVs, spread over 100 nodes, created an hour ago.
pub fn fixture(n: usize) -> (Vec<VaView>, Pvs) {
    let created = SystemTime::now() - Duration::from_secs(3600);
    let vas = (0..n)
        .map(|i| VaView {
            name: format!("csi-{i:064x}").into(),
            pv_name: Some(format!("pvc-{i:08}").into()),
            inline_handle: None,
            node: format!("node-{}", i % 100).into(),
            attached: true,
            created,
            attached_at: None,
        })
        .collect();
    let pvs = (0..n)
        .map(|i| {
            let class = if i % 10 == 0 {
                AccessClass::Migratable
            } else {
                AccessClass::Exclusive
            };
            (format!("pvc-{i:08}"), (format!("vol-{i:08}"), class))
        })
        .collect();
    (vas, pvs)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Memory, not time: how much resident memory 100k seeded volumes add, parked and then with
/// every one woken into its actor (printed, not asserted).
fn actor_memory() {
    const N: usize = 100_000;
    let (vas, pvs) = fixture(N);
    let system = system();
    let before = rss_kib();
    let per_volume = |kib: u64| {
        format!(
            "{:.1} MiB resident, {} bytes per volume",
            kib as f64 / 1024.0,
            kib * 1024 / N as u64
        )
    };
    let actors = system.block_on(async {
        let actors = Actors::start(cores());
        let plan = plan(&vas, std::time::SystemTime::now(), lookup(&pvs));
        let seeded = actors
            .supervisor
            .send(Seed {
                term: Term::FIRST,
                volumes: plan.volumes,
            })
            .await
            .expect("seed");
        actors.drain_arbiters().await;
        assert_eq!(seeded, N);
        let parked = rss_kib();
        eprintln!(
            "seed: {N} seeded volumes, parked (and the supervisor's map) add {}",
            per_volume(parked.saturating_sub(before))
        );
        // The first message for a volume starts its actor.
        let router = &actors.router;
        for chunk in (0..N).collect::<Vec<_>>().chunks(1024) {
            futures::future::join_all(chunk.iter().map(|&i| async move {
                let id = VolumeId::try_from(format!("vol-{i:08}").as_str()).unwrap();
                let view = router.send(&id, Describe).await.expect("describe");
                assert!(view.is_some(), "volume {i} is attached");
            }))
            .await;
        }
        actors.drain_arbiters().await;
        let woken = rss_kib();
        eprintln!(
            "seed: the same {N} volumes, each woken into its actor by a first message, add {}",
            per_volume(woken.saturating_sub(before))
        );
        actors
    });
    eprintln!(
        "seed: size_of VolumeActor {} B, of its ContextFut (actor + context + mailbox, boxed in its task) {} B, of one Attachment {} B",
        std::mem::size_of::<VolumeActor>(),
        std::mem::size_of::<actix::dev::ContextFut<VolumeActor, actix::Context<VolumeActor>>>(),
        std::mem::size_of::<rds_csi::actors::state::Attachment>(),
    );
    actors.stop();
}

fn seeding(c: &mut Criterion) {
    actor_memory();
    let mut group = c.benchmark_group("seed");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    for n in [1_000usize, 10_000, 100_000] {
        group.measurement_time(Duration::from_secs(if n >= 100_000 { 15 } else { 5 }));
        group.throughput(Throughput::Elements(n as u64));
        let (vas, pvs) = fixture(n);
        group.bench_function(BenchmarkId::new("plan", n), |b| {
            b.iter(|| {
                plan(
                    std::hint::black_box(&vas),
                    std::time::SystemTime::now(),
                    lookup(&pvs),
                )
            })
        });
        group.bench_function(BenchmarkId::new("plan+Seed", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let system = system();
                    let (elapsed, actors) = system.block_on(async {
                        let actors = Actors::start(cores());
                        let start = Instant::now();
                        let seeded = actors
                            .supervisor
                            .send(Seed {
                                term: Term::FIRST,
                                volumes: plan(&vas, std::time::SystemTime::now(), lookup(&pvs))
                                    .volumes,
                            })
                            .await
                            .expect("seed");
                        actors.drain_arbiters().await;
                        let elapsed = start.elapsed();
                        assert_eq!(seeded, n);
                        (elapsed, actors)
                    });
                    total += elapsed;
                    actors.stop();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, seeding);
criterion_main!(benches);
