//! The cost of the pure attachment rules per publish/unpublish, with no actors or I/O, and of
//! the gRPC layer's translation of a ControllerPublishVolumeRequest into a validated message.

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use rds_csi::actors::state::{PublishRequest, VolumeState};
use rds_csi::domain::{AccessMode, Capability};
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

fn translation(c: &mut Criterion) {
    use rds_csi::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    use rds_csi::csi::{ControllerPublishVolumeRequest, VolumeCapability};
    use rds_csi::grpc::controller::PublishCall;
    let request = ControllerPublishVolumeRequest {
        volume_id: "pvc-0a1b2c3d-4e5f-6789-abcd-ef0123456789".into(),
        node_id: "worker-node-17".into(),
        volume_capability: Some(VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }),
        readonly: false,
        secrets: Default::default(),
        volume_context: [("migrationTimeoutSeconds".to_string(), "120".to_string())].into(),
    };
    c.bench_function("grpc/validate ControllerPublishVolumeRequest", |bench| {
        bench.iter_batched(
            || request.clone(),
            |req| PublishCall::try_from(req).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, state_machine, translation);
criterion_main!(benches);
