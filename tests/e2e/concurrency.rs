//! Many publishes of one volume at once over the real socket: the actor serializes them, so an
//! exclusive volume gets exactly one holder and a migratable one exactly two.

use tonic::Code;

use crate::support::*;

const NODES: usize = 200;

async fn race(
    d: &Driver,
    volume: &str,
    capability: rds_csi::csi::VolumeCapability,
) -> (usize, usize, Vec<String>) {
    let mut tasks = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let mut client = d.controller();
        let req = rds_csi::csi::ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: format!("node-{i}"),
            volume_capability: Some(capability.clone()),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            client.controller_publish_volume(req).await.map(drop)
        }));
    }
    let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) if s.code() == Code::FailedPrecondition => refused += 1,
            Err(s) => other.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    (ok, refused, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_publishes() {
    concurrent_publishes(&[]).await;
}

/// `--arbiters 0`: the gRPC server, the supervisor and every actor on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_publishes_on_one_thread() {
    let d = concurrent_publishes(&["--arbiters", "0"]).await;
    d.wait_for_log("arbiters=0").await;
}

async fn concurrent_publishes(args: &[&str]) -> Driver {
    let known: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let d = Driver::start(&known, args).await;
    d.create("exclusive", rwo()).await;
    d.create("migratable", rwx()).await;

    let (ok, refused, other) = race(&d, "exclusive", rwo()).await;
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!(
        (ok, refused),
        (1, NODES - 1),
        "exclusive: exactly one holder"
    );

    let (ok, refused, other) = race(&d, "migratable", rwx()).await;
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!(
        (ok, refused),
        (2, NODES - 2),
        "migratable: exactly two holders"
    );

    let m = d.scrape().await;
    assert_eq!(sample(&m, "rds_csi_migration_active_migrations"), 1.0);
    assert_eq!(
        sample(&m, "rds_csi_attachment_conflicts_total"),
        (2 * NODES - 3) as f64
    );
    d
}

/// `--max-volumes-per-node 5`: forty different volumes race for one node's five slots;
/// exactly five win, the rest get RESOURCE_EXHAUSTED, and a detach frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_at_most_max_volumes_per_node_under_a_race() {
    const VOLUMES: usize = 40;
    let d = Driver::start(&[], &["--max-volumes-per-node", "5"]).await;
    let info = d
        .node()
        .node_get_info(rds_csi::csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 5);
    for i in 0..VOLUMES {
        d.create(&format!("v{i}"), rwo()).await;
    }
    let mut tasks = Vec::new();
    for i in 0..VOLUMES {
        let mut client = d.controller();
        let req = rds_csi::csi::ControllerPublishVolumeRequest {
            volume_id: format!("v{i}"),
            node_id: "n1".into(),
            volume_capability: Some(rwo()),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            client.controller_publish_volume(req).await.map(drop)
        }));
    }
    let (mut won, mut full, mut other) = (Vec::new(), 0, Vec::new());
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(()) => won.push(i),
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message().contains("--max-volumes-per-node"),
                    "{}",
                    s.message()
                );
                full += 1
            }
            Err(s) => other.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!((won.len(), full), (5, VOLUMES - 5));
    let loser = (0..VOLUMES).find(|i| !won.contains(i)).unwrap();
    let err = d
        .publish(&format!("v{loser}"), "n1", rwo())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    d.unpublish(&format!("v{}", won[0]), "n1").await.unwrap();
    d.publish(&format!("v{loser}"), "n1", rwo())
        .await
        .expect("the detach freed a slot");
}
