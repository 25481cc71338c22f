//! One row per rule of ATTACHMENT_RULES.md's Publish and Unpublish sections that applies without
//! a cluster. Every row gets its own volume on one shared driver; it asserts the gRPC code, what
//! the message must name, the side effects the rule promises (counters, the migration timeout
//! used, a warning in the log), and where a rule changes state, a follow-up that proves the
//! change.

use std::collections::HashMap;

use rds_csi::csi::volume_capability::access_mode::Mode;
use rds_csi::csi::{ControllerPublishVolumeRequest, VolumeCapability};
use tonic::Code;

use crate::support::*;

#[derive(Clone)]
enum Step {
    Pub(&'static str, VolumeCapability),
    PubRo(&'static str, VolumeCapability),
    PubWith(&'static str, VolumeCapability, &'static str),
    Unpub(&'static str),
    /// A raw request for the validation rows: (volume_id, node_id, capability).
    Raw(String, String, Option<VolumeCapability>),
    UnpubRaw(String, &'static str),
}

/// A side effect the act must have.
#[derive(Clone)]
enum Effect {
    /// This series moves by exactly this much over the act (it must exist before and after).
    Counts(&'static str, f64),
    /// The migration the act started uses this timeout, as `/debug/attachments` shows it.
    Timeout(u64),
    /// The act logs a warning containing this text and the row's volume id.
    Warns(&'static str),
}

struct Row {
    rule: &'static str,
    setup: Vec<Step>,
    act: Step,
    code: Code,
    /// Text the status message must contain (the field, or the other node).
    names: &'static str,
    /// What the act must do besides answering.
    effects: Vec<Effect>,
    /// Follow-up steps and the code each must give, proving the state the rule leaves.
    then: Vec<(Step, Code)>,
}

fn row(rule: &'static str, setup: Vec<Step>, act: Step, code: Code, names: &'static str) -> Row {
    Row {
        rule,
        setup,
        act,
        code,
        names,
        effects: vec![],
        then: vec![],
    }
}

const ATTACHED: &str = r#"rds_csi_attachment_attach_total{status="success"}"#;
const DETACHED: &str = r#"rds_csi_attachment_detach_total{status="success"}"#;
const HANDOFFS: &str = "rds_csi_attachment_grace_period_used_total";
const CONFLICTS: &str = "rds_csi_attachment_conflicts_total";
const ACTIVE: &str = "rds_csi_migration_active_migrations";
const SUCCEEDED: &str = r#"rds_csi_migration_migrations_total{result="success"}"#;
const FAILED: &str = r#"rds_csi_migration_migrations_total{result="failed"}"#;
const TIMED: &str = "rds_csi_migration_duration_seconds_count";

use Step::*;

fn rows() -> Vec<Row> {
    let long_vol = "v".repeat(129);
    let long_node = "n".repeat(254);
    vec![
        // Publish 1: validation.
        row(
            "1 volume_id empty",
            vec![],
            Raw("".into(), "n1".into(), Some(rwo())),
            Code::InvalidArgument,
            "volume_id",
        ),
        row(
            "1 volume_id longer than 128 bytes",
            vec![],
            Raw(long_vol, "n1".into(), Some(rwo())),
            Code::InvalidArgument,
            "volume_id",
        ),
        row(
            "1 volume_id bad characters",
            vec![],
            Raw("../etc/passwd".into(), "n1".into(), Some(rwo())),
            Code::InvalidArgument,
            "volume_id",
        ),
        row(
            "1 node_id empty",
            vec![],
            Raw("VOL".into(), "".into(), Some(rwo())),
            Code::InvalidArgument,
            "node_id",
        ),
        row(
            "1 node_id longer than 253 bytes",
            vec![],
            Raw("VOL".into(), long_node, Some(rwo())),
            Code::InvalidArgument,
            "node_id",
        ),
        row(
            "1 capability missing",
            vec![],
            Raw("VOL".into(), "n1".into(), None),
            Code::InvalidArgument,
            "volume_capability",
        ),
        row(
            "1 capability unsupported (MULTI_NODE_READER_ONLY)",
            vec![],
            Pub("n1", cap(Mode::MultiNodeReaderOnly, true)),
            Code::InvalidArgument,
            "MULTI_NODE_READER_ONLY",
        ),
        row(
            "1 capability unsupported (MULTI_NODE_SINGLE_WRITER)",
            vec![],
            Pub("n1", cap(Mode::MultiNodeSingleWriter, true)),
            Code::InvalidArgument,
            "MULTI_NODE_SINGLE_WRITER",
        ),
        row(
            "1 RWX with mount access type",
            vec![],
            Pub("n1", rwx_mount()),
            Code::InvalidArgument,
            "RWX requires volumeMode: Block",
        ),
        // Publish 2: existence.
        row(
            "2 volume unknown to the backend",
            vec![],
            Raw("no-such-volume".into(), "n1".into(), Some(rwo())),
            Code::NotFound,
            "no-such-volume",
        ),
        row(
            "2 node unknown",
            vec![],
            Pub("ghost", rwo()),
            Code::NotFound,
            "ghost",
        ),
        // Publish 3: already on node_id.
        Row {
            effects: vec![Effect::Counts(ATTACHED, 0.0), Effect::Counts(HANDOFFS, 0.0)],
            ..row(
                "3 same capability and readonly: idempotent, no side effects",
                vec![Pub("n1", rwo())],
                Pub("n1", rwo()),
                Code::Ok,
                "",
            )
        },
        row(
            "3 other capability: ALREADY_EXISTS",
            vec![Pub("n1", rwo())],
            Pub("n1", rwo_block()),
            Code::AlreadyExists,
            "n1",
        ),
        row(
            "3 other readonly: ALREADY_EXISTS",
            vec![Pub("n1", rwo())],
            PubRo("n1", rwo()),
            Code::AlreadyExists,
            "readonly",
        ),
        // Publish 4: on no node.
        Row {
            effects: vec![Effect::Counts(ATTACHED, 1.0), Effect::Counts(HANDOFFS, 0.0)],
            then: vec![(Pub("n2", rwo()), Code::FailedPrecondition)],
            ..row(
                "4 never attached: attach as primary",
                vec![],
                Pub("n1", rwo()),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![Effect::Counts(ATTACHED, 1.0), Effect::Counts(HANDOFFS, 1.0)],
            then: vec![(Pub("n3", rwo()), Code::FailedPrecondition)],
            ..row(
                "4 detached inside the grace window, other node: handoff",
                vec![Pub("n1", rwo()), Unpub("n1")],
                Pub("n2", rwo()),
                Code::Ok,
                "",
            )
        },
        // Publish 5.3: exclusive, or another access class.
        Row {
            effects: vec![
                Effect::Counts(CONFLICTS, 1.0),
                Effect::Counts(ATTACHED, 0.0),
            ],
            then: vec![(Pub("n1", rwo()), Code::Ok)],
            ..row(
                "5.3 exclusive volume on another node",
                vec![Pub("n1", rwo())],
                Pub("n2", rwo()),
                Code::FailedPrecondition,
                "n1",
            )
        },
        Row {
            effects: vec![Effect::Counts(CONFLICTS, 1.0)],
            ..row(
                "5.3 request of a different access class",
                vec![Pub("n1", rwx())],
                Pub("n2", rwo_block()),
                Code::FailedPrecondition,
                "n1",
            )
        },
        // Publish 5.4 and 5.5: migratable.
        Row {
            effects: vec![Effect::Counts(CONFLICTS, 1.0), Effect::Counts(ACTIVE, 0.0)],
            ..row(
                "5.4 migratable already on two nodes",
                vec![Pub("n1", rwx()), Pub("n2", rwx())],
                Pub("n3", rwx()),
                Code::FailedPrecondition,
                "migration limit: attached to n1 and n2",
            )
        },
        Row {
            effects: vec![
                Effect::Counts(ACTIVE, 1.0),
                Effect::Counts(ATTACHED, 1.0),
                Effect::Timeout(300),
            ],
            then: vec![(Pub("n3", rwx()), Code::FailedPrecondition)],
            ..row(
                "5.5 migratable on one node: second node allowed, default timeout 300 s",
                vec![Pub("n1", rwx())],
                Pub("n2", rwx()),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![
                Effect::Timeout(300),
                Effect::Warns("unparsable migrationTimeoutSeconds"),
            ],
            ..row(
                "5.5 unparsable migrationTimeoutSeconds takes the default and warns",
                vec![Pub("n1", rwx())],
                PubWith("n2", rwx(), "soon"),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![Effect::Timeout(120)],
            ..row(
                "5.5 migrationTimeoutSeconds is used",
                vec![Pub("n1", rwx())],
                PubWith("n2", rwx(), "120"),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![Effect::Timeout(30)],
            ..row(
                "5.5 migrationTimeoutSeconds below 30 s is clamped to 30 s",
                vec![Pub("n1", rwx())],
                PubWith("n2", rwx(), "5"),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![Effect::Timeout(3600)],
            ..row(
                "5.5 migrationTimeoutSeconds above 3600 s is clamped to 3600 s",
                vec![Pub("n1", rwx())],
                PubWith("n2", rwx(), "99999"),
                Code::Ok,
                "",
            )
        },
        // Unpublish.
        row(
            "U validate volume_id",
            vec![],
            UnpubRaw("bad/id".into(), "n1"),
            Code::InvalidArgument,
            "volume_id",
        ),
        Row {
            effects: vec![
                Effect::Counts(DETACHED, 2.0),
                Effect::Counts(FAILED, 1.0),
                Effect::Counts(ACTIVE, -1.0),
            ],
            then: vec![(Pub("n3", rwo_block()), Code::Ok)],
            ..row(
                "U empty node_id detaches every node",
                vec![Pub("n1", rwx()), Pub("n2", rwx())],
                Unpub(""),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![Effect::Counts(DETACHED, 0.0)],
            then: vec![(Pub("n2", rwo()), Code::FailedPrecondition)],
            ..row(
                "U not attached to node_id: OK, no side effects",
                vec![Pub("n1", rwo())],
                Unpub("n2"),
                Code::Ok,
                "",
            )
        },
        row(
            "U volume never published: OK",
            vec![],
            Unpub("n1"),
            Code::Ok,
            "",
        ),
        Row {
            effects: vec![Effect::Counts(DETACHED, 1.0)],
            then: vec![(Pub("n2", rwo()), Code::Ok)],
            ..row(
                "U attached only to node_id: detached",
                vec![Pub("n1", rwo())],
                Unpub("n1"),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![
                Effect::Counts(SUCCEEDED, 1.0),
                Effect::Counts(FAILED, 0.0),
                Effect::Counts(TIMED, 1.0),
                Effect::Counts(ACTIVE, -1.0),
                Effect::Counts(DETACHED, 1.0),
            ],
            // The target n2 is now primary: a new migration to n3 may start, n1 is gone.
            then: vec![
                (Pub("n3", rwx()), Code::Ok),
                (Pub("n1", rwx()), Code::FailedPrecondition),
            ],
            ..row(
                "U migrating, node_id is the source: success",
                vec![Pub("n1", rwx()), Pub("n2", rwx())],
                Unpub("n1"),
                Code::Ok,
                "",
            )
        },
        Row {
            effects: vec![
                Effect::Counts(FAILED, 1.0),
                Effect::Counts(SUCCEEDED, 0.0),
                Effect::Counts(TIMED, 0.0),
                Effect::Counts(ACTIVE, -1.0),
            ],
            then: vec![(Pub("n1", rwx()), Code::Ok), (Pub("n3", rwx()), Code::Ok)],
            ..row(
                "U migrating, node_id is the target: rolled back",
                vec![Pub("n1", rwx()), Pub("n2", rwx())],
                Unpub("n2"),
                Code::Ok,
                "",
            )
        },
    ]
}

async fn run(d: &Driver, volume: &str, step: &Step) -> Result<(), tonic::Status> {
    match step {
        Pub(node, c) => d.publish(volume, node, c.clone()).await.map(drop),
        PubRo(node, c) => d
            .publish_full(volume, node, c.clone(), true, HashMap::new())
            .await
            .map(drop),
        PubWith(node, c, timeout) => {
            let ctx = HashMap::from([("migrationTimeoutSeconds".to_string(), timeout.to_string())]);
            d.publish_full(volume, node, c.clone(), false, ctx)
                .await
                .map(drop)
        }
        Unpub(node) => d.unpublish(volume, node).await,
        Raw(v, n, c) => {
            let v = if v == "VOL" {
                volume.to_string()
            } else {
                v.clone()
            };
            d.controller()
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: v,
                    node_id: n.clone(),
                    volume_capability: c.clone(),
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        UnpubRaw(v, n) => d.unpublish(v, n).await,
    }
}

/// Checks one side effect of the act; `Some` says what is wrong.
async fn check(
    d: &Driver,
    volume: &str,
    effect: &Effect,
    before: &str,
    after: &str,
    log_before: usize,
) -> Option<String> {
    match effect {
        Effect::Counts(series, delta) => {
            let moved = sample(after, series) - sample(before, series);
            (moved != *delta).then(|| format!("{series} moved by {moved}, want {delta}"))
        }
        Effect::Timeout(secs) => {
            let view = d.debug(volume).await;
            (view["migration"]["timeout_seconds"] != *secs).then(|| {
                format!(
                    "the migration's timeout should be {secs} s: {}",
                    view["migration"]
                )
            })
        }
        Effect::Warns(text) => {
            // The log is written from a background thread: wait for the line, don't race it.
            let warned = holds_eventually(|| async {
                d.log()[log_before..].lines().any(|l| {
                    l.contains("WARN")
                        && l.contains(text)
                        && l.contains(&format!("volume_id={volume}"))
                })
            })
            .await;
            (!warned).then(|| format!("no warning {text:?} for {volume} in the log"))
        }
    }
}

fn code_of(r: &Result<(), tonic::Status>) -> (Code, String) {
    match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test]
async fn every_publish_and_unpublish_rule() {
    let d = Driver::start(&["n2", "n3"], &[]).await;
    let mut failures = Vec::new();
    for (i, row) in rows().into_iter().enumerate() {
        let volume = format!("rule-{i}");
        d.create(&volume, rwo()).await;
        for step in &row.setup {
            run(&d, &volume, step)
                .await
                .unwrap_or_else(|e| panic!("{}: setup failed: {e:?}", row.rule));
        }
        let metrics_before = d.scrape().await;
        let log_before = d.log().len();
        let (code, message) = code_of(&run(&d, &volume, &row.act).await);
        if code != row.code || !message.contains(row.names) {
            failures.push(format!(
                "{}: got {code:?} {message:?}, want {:?} naming {:?}",
                row.rule, row.code, row.names
            ));
            continue;
        }
        let metrics_after = d.scrape().await;
        for effect in &row.effects {
            if let Some(failure) = check(
                &d,
                &volume,
                effect,
                &metrics_before,
                &metrics_after,
                log_before,
            )
            .await
            {
                failures.push(format!("{}: {failure}", row.rule));
            }
        }
        for (step, want) in &row.then {
            let (got, message) = code_of(&run(&d, &volume, step).await);
            if got != *want {
                failures.push(format!(
                    "{}: follow-up got {got:?} {message:?}, want {want:?}",
                    row.rule
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "rule violations:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn idempotent_republish_returns_the_same_context_and_counts_nothing() {
    let d = Driver::start(&["n2"], &[]).await;
    d.create("v", rwo()).await;
    let first = d.publish("v", "n1", rwo()).await.unwrap();
    let before = d.scrape().await;
    let again = d.publish("v", "n1", rwo()).await.unwrap();
    let after = d.scrape().await;
    assert_eq!(first, again);
    // The attach instant is the attach's, not the repeat's.
    let instant = &first["rds.csi.srvlab.io/attached-at"];
    assert!(
        humantime::parse_rfc3339(instant).is_ok(),
        "{instant:?} is RFC 3339"
    );
    let series = r#"rds_csi_attachment_attach_total{status="success"}"#;
    assert_eq!(sample(&before, series), 1.0);
    assert_eq!(
        sample(&after, series),
        1.0,
        "an idempotent re-publish has no side effects"
    );
}

#[tokio::test]
async fn readonly_publish_is_recorded_in_the_publish_context() {
    let d = Driver::start(&[], &[]).await;
    d.create("v", rwo()).await;
    let ctx = d
        .publish_full("v", "n1", rwo(), true, HashMap::new())
        .await
        .unwrap();
    assert_eq!(ctx.get("readonly").map(String::as_str), Some("true"));
}

#[tokio::test]
async fn migrations_and_conflicts_are_counted_once_in_metrics() {
    let d = Driver::start(&["n2", "n3"], &[]).await;
    d.create("ok", rwx()).await;
    d.create("back", rwx()).await;
    d.create("rwo", rwo()).await;
    d.publish("ok", "n1", rwx()).await.unwrap();
    d.publish("ok", "n2", rwx()).await.unwrap();
    d.unpublish("ok", "n1").await.unwrap();
    d.publish("back", "n1", rwx()).await.unwrap();
    d.publish("back", "n2", rwx()).await.unwrap();
    d.unpublish("back", "n2").await.unwrap();
    d.publish("rwo", "n1", rwo()).await.unwrap();
    assert_eq!(
        d.publish("rwo", "n2", rwo()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    d.unpublish("rwo", "n1").await.unwrap();
    d.publish("rwo", "n3", rwo()).await.unwrap();
    let m = d.scrape().await;
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_migration_migrations_total{result="success"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&m, r#"rds_csi_migration_migrations_total{result="failed"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_migration_migrations_total{result="timeout"}"#
        ),
        0.0
    );
    assert_eq!(sample(&m, "rds_csi_migration_duration_seconds_count"), 1.0);
    assert_eq!(sample(&m, "rds_csi_migration_active_migrations"), 0.0);
    assert_eq!(sample(&m, "rds_csi_attachment_conflicts_total"), 1.0);
    assert_eq!(
        sample(&m, "rds_csi_attachment_grace_period_used_total"),
        1.0
    );
    assert_eq!(sample(&m, "rds_csi_nvme_connections_active"), 3.0);
}
