//! Bad input gets a documented code and never panics the server.

use std::collections::HashMap;

use rds_csi::csi::*;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn documented_codes_for_bad_ids_capabilities_and_nodes() {
    let d = Driver::start(&[], &[]).await;
    d.create("real", rwo()).await;
    let cases: Vec<(&str, String, String, Option<VolumeCapability>, Code)> = vec![
        (
            "empty volume id",
            "".into(),
            "n1".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
        (
            "oversized volume id",
            "a".repeat(4096),
            "n1".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
        (
            "traversal ../",
            "../../etc/passwd".into(),
            "n1".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
        (
            "traversal /",
            "a/b".into(),
            "n1".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
        (
            "dot-dot",
            "..".into(),
            "n1".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
        (
            "NUL",
            "a\0b".into(),
            "n1".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
        (
            "missing capability",
            "real".into(),
            "n1".into(),
            None,
            Code::InvalidArgument,
        ),
        (
            "unknown node",
            "real".into(),
            "stranger".into(),
            Some(rwo()),
            Code::NotFound,
        ),
        (
            "empty node",
            "real".into(),
            "".into(),
            Some(rwo()),
            Code::InvalidArgument,
        ),
    ];
    for (what, volume_id, node_id, volume_capability, want) in cases {
        let got = d
            .controller()
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id,
                node_id,
                volume_capability,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(got.code(), want, "{what}: {}", got.message());
    }
    // CSI allows any name without control characters; one that is not a valid id becomes a
    // hashed id, so a traversal name never reaches a path as written. Delete takes ids, which
    // are validated before any path is built.
    for name in ["../escape", "/abs", "a/../../b", ".hidden"] {
        let created = d
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(
            created.volume_id.starts_with("vol-") && !created.volume_id.contains(['/', '.']),
            "create {name:?} -> {}",
            created.volume_id
        );
        assert!(
            d.dir
                .path()
                .join(format!("volumes/{}.img", created.volume_id))
                .exists(),
            "{name:?}: the image is inside the file root, under its hashed id"
        );
        for bad in [format!("{name}\u{1}"), "x".repeat(129)] {
            let err = d
                .controller()
                .create_volume(CreateVolumeRequest {
                    name: bad.clone(),
                    volume_capabilities: vec![rwo()],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "create {bad:?}");
            assert!(err.message().starts_with("name "), "{}", err.message());
        }
        let err = d
            .controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "delete {name:?}");
    }
    let outside: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        outside
            .iter()
            .all(|n| n == "volumes" || n == "csi.sock" || n == "driver.log" || n == "node-state"),
        "{outside:?}"
    );
    let records: Vec<_> = std::fs::read_dir(d.dir.path().join("node-state"))
        .unwrap()
        .collect();
    assert!(
        records.is_empty(),
        "bad ids never became node records: {records:?}"
    );
}

/// xorshift64*: deterministic random bytes without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn string(&mut self) -> String {
        let len = (self.next() % 300) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| self.next() as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_random_ids_never_panic_the_server() {
    let d = Driver::start(&[], &[]).await;
    d.create("real", rwx()).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen: HashMap<Code, usize> = HashMap::new();
    for i in 0..3000 {
        let id = rng.string();
        let node = if i % 3 == 0 {
            "n1".to_string()
        } else {
            rng.string()
        };
        let mut c = d.controller();
        let codes = [
            c.controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.clone(),
                volume_capability: Some(rwx()),
                ..Default::default()
            })
            .await
            .map(drop),
            c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node,
                ..Default::default()
            })
            .await
            .map(drop),
            c.delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
            c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: id,
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await
            .map(drop),
        ];
        for r in codes {
            let code = r.map_or_else(|s| s.code(), |_| Code::Ok);
            assert!(
                matches!(code, Code::InvalidArgument | Code::NotFound | Code::Ok),
                "random id gave {code:?}"
            );
            *seen.entry(code).or_default() += 1;
        }
    }
    assert!(seen[&Code::InvalidArgument] > 1000, "{seen:?}");
    // Still alive and still correct.
    let ready = d
        .identity()
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(ready, Some(true));
    d.publish("real", "n1", rwx()).await.unwrap();
    assert!(!d.log().contains("panicked"), "server log shows a panic");
}
