//! The actor layer's cost, with no gRPC in front: a publish then unpublish round trip through
//! the router against the number of arbiters, and the routing cost at 10, 10k and 100k live
//! volume actors. The backend is in memory and the cluster standalone, so only the actors,
//! their mailboxes and the thread hops are measured. No tracing subscriber is installed: the
//! driver's per-attach log lines are not part of these numbers.

mod support;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rds_csi::actors::messages::Route;
use rds_csi::actors::Router;
use rds_csi::role::Term;
use support::{arbiter_counts, cores, cycle, node, rwo_publish, system, unpublish, volume, Actors};

/// Publish then unpublish of one volume, one at a time (latency), and with 64 cycles in flight
/// on 64 volumes from tasks on the tokio workers, as tonic's handlers run (throughput).
fn round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("actors/round_trip");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    let a = node("node-a");
    for arbiters in arbiter_counts() {
        let system = system();
        let actors = system.block_on(async { Actors::start(arbiters) });
        let vol = volume(0);
        system.block_on(cycle(&actors.router, &vol, &a));
        group.bench_function(
            BenchmarkId::new(
                "publish+unpublish 1 in flight",
                format!("arbiters={arbiters}"),
            ),
            |b| {
                b.iter_custom(|iters| {
                    system.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            cycle(&actors.router, &vol, &a).await;
                        }
                        start.elapsed()
                    })
                })
            },
        );
        const IN_FLIGHT: u64 = 64;
        group.bench_function(
            BenchmarkId::new(
                "publish+unpublish 64 in flight",
                format!("arbiters={arbiters}"),
            ),
            |b| {
                b.iter_custom(|iters| {
                    system.block_on(async {
                        let per_task = iters.div_ceil(IN_FLIGHT);
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..IN_FLIGHT as usize)
                            .map(|w| {
                                let router = actors.router.clone();
                                let node = node(if w % 2 == 0 { "node-a" } else { "node-b" });
                                let vol = volume(w);
                                tokio::spawn(async move {
                                    for _ in 0..per_task {
                                        cycle(&router, &vol, &node).await;
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("cycle task");
                        }
                        // Time per cycle, scaled back to the `iters` criterion asked for.
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per_task * IN_FLIGHT) as f64)
                    })
                })
            },
        );
        actors.stop();
    }
    group.finish();
}

/// Reaching an existing volume's actor with `live` actors alive (each attached to node-a):
/// through the router's address cache (the hot path), through the supervisor's `Route` alone,
/// and through a router with an empty cache (first use after start: `Route` then the message).
/// The message is an unpublish from node-b, which does not hold the volume: a no-op for the
/// state, so what is measured is the delivery.
fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("supervisor/routing");
    group.throughput(Throughput::Elements(1));
    let (a, b) = (node("node-a"), node("node-b"));
    for live in [10usize, 10_000, 100_000] {
        if live >= 100_000 {
            group.sample_size(20);
        }
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_secs(1));
        let system = system();
        let actors = system.block_on(async { Actors::start(cores()) });
        let volumes: Vec<_> = (0..live).map(volume).collect();
        let populated = Instant::now();
        system.block_on(async {
            for chunk in volumes.chunks(1024) {
                let sends = chunk.iter().map(|v| actors.router.send(v, rwo_publish(&a)));
                for r in futures::future::join_all(sends).await {
                    r.expect("publish");
                }
            }
        });
        eprintln!(
            "supervisor/routing: {live} volume actors attached in {:.2?}",
            populated.elapsed()
        );
        let noop = unpublish(&b);
        // A stride that is coprime with `live` visits every volume in a scattered order.
        let stride = 7919 % live.max(2);
        let mut next = 0usize;
        let mut pick = || {
            next = (next + stride) % live;
            &volumes[next]
        };
        group.bench_function(BenchmarkId::new("router (cached address)", live), |bench| {
            bench.iter_custom(|iters| {
                system.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        actors
                            .router
                            .send(pick(), noop.clone())
                            .await
                            .expect("noop");
                    }
                    start.elapsed()
                })
            })
        });
        group.bench_function(BenchmarkId::new("supervisor Route only", live), |bench| {
            bench.iter_custom(|iters| {
                system.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        actors
                            .supervisor
                            .send(Route {
                                volume: pick().clone(),
                                term: Some(Term::FIRST),
                                caller: None,
                            })
                            .await
                            .expect("route")
                            .expect("a live volume");
                    }
                    start.elapsed()
                })
            })
        });
        group.bench_function(BenchmarkId::new("router (empty cache)", live), |bench| {
            bench.iter_custom(|iters| {
                system.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let fresh = Router::new(actors.supervisor.clone(), Duration::from_secs(30));
                        fresh.send(pick(), noop.clone()).await.expect("noop");
                    }
                    start.elapsed()
                })
            })
        });
        actors.stop();
    }
    group.finish();
}

criterion_group!(benches, round_trip, routing);
criterion_main!(benches);
