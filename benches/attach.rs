//! The cost of the pure attachment rules per publish/unpublish, with no actors or I/O.

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use rds_csi::actors::state::{AccessMode, Capability, PublishRequest, VolumeState};
use rds_csi::NodeId;
use tokio::time::Instant;

fn state_machine(c: &mut Criterion) {
    let a = NodeId::try_from("node-a").unwrap();
    let b = NodeId::try_from("node-b").unwrap();
    let rwo = PublishRequest {
        node: a.clone(),
        capability: Capability::block(AccessMode::SingleNodeWriter),
        readonly: false,
        migration_timeout: Duration::from_secs(300),
    };
    let rwx = |node: &NodeId| PublishRequest {
        node: node.clone(),
        capability: Capability::block(AccessMode::MultiNodeMultiWriter),
        readonly: false,
        migration_timeout: Duration::from_secs(300),
    };
    let now = Instant::now();
    let wall = SystemTime::now();

    c.bench_function("state/publish+unpublish exclusive", |bench| {
        let mut state = VolumeState::new(Duration::from_secs(30));
        bench.iter(|| {
            state
                .publish(std::hint::black_box(&rwo), now, wall)
                .unwrap();
            state.unpublish(Some(&a), now)
        })
    });
    c.bench_function("state/migration start+complete", |bench| {
        let mut state = VolumeState::new(Duration::from_secs(30));
        let (to_b, to_a) = (rwx(&b), rwx(&a));
        state.publish(&to_a, now, wall).unwrap();
        bench.iter(|| {
            state.publish(&to_b, now, wall).unwrap();
            state.unpublish(Some(&a), now);
            state.publish(&to_a, now, wall).unwrap();
            state.unpublish(Some(&b), now)
        })
    });
}

criterion_group!(benches, state_machine);
criterion_main!(benches);
