//! The storage-side metric families (`rds_disk_*`, `rds_hardware_*`) of `rds-csi --backend rds`,
//! polled in the background from the fake RouterOS (SSH) and the fake SNMP agent (UDP): the
//! Go driver's names, types and labels, the values converted to their units, and a scrape that
//! never waits on a hung or refusing RDS.

use crate::fake_rds::Traffic;
use crate::fake_snmp::{FakeSnmp, SnmpValue, MTXR_HEALTH};
use crate::rds::Rds;
use crate::support::*;

const COMMUNITY: &str = "rds-s3cret";

/// The nine `rds_disk_*` and ten `rds_hardware_*` gauges, with the Go driver's names.
const DISK: [&str; 9] = [
    "rds_disk_read_ops_per_second",
    "rds_disk_write_ops_per_second",
    "rds_disk_read_bytes_per_second",
    "rds_disk_write_bytes_per_second",
    "rds_disk_read_latency_milliseconds",
    "rds_disk_write_latency_milliseconds",
    "rds_disk_wait_latency_milliseconds",
    "rds_disk_in_flight_operations",
    "rds_disk_active_time_milliseconds",
];
const HARDWARE: [&str; 10] = [
    "rds_hardware_cpu_temperature_celsius",
    "rds_hardware_board_temperature_celsius",
    "rds_hardware_fan1_speed_rpm",
    "rds_hardware_fan2_speed_rpm",
    "rds_hardware_psu1_power_watts",
    "rds_hardware_psu2_power_watts",
    "rds_hardware_psu1_temperature_celsius",
    "rds_hardware_psu2_temperature_celsius",
    "rds_hardware_disk_pool_size_bytes",
    "rds_hardware_disk_pool_used_bytes",
];

async fn start(snmp: &FakeSnmp, community: &str) -> Rds {
    let address = snmp.address().to_string();
    Rds::start(&[
        "--storage-poll-interval",
        "100ms",
        "--storage-poll-timeout",
        "1s",
        "--snmp-address",
        &address,
        "--snmp-community",
        community,
    ])
    .await
}

/// The poller fills every gauge from the fakes: monitor-traffic's sample of the pool's slot
/// (taken from `--rds-volume-path`), the pool's size and use, and the SNMP values in their
/// units. Catches a family missing or misnamed, a wrong type or label, the bits/bytes and
/// tenths conversions, and a poller that never starts.
#[tokio::test]
async fn the_poller_fills_the_go_drivers_gauges_from_the_rds() {
    let snmp = FakeSnmp::start(COMMUNITY).await;
    let rds = start(&snmp, COMMUNITY).await;
    rds.fake.set_traffic(
        "storage-pool",
        Traffic {
            read_ops_per_second: 1500,
            write_ops_per_second: 76,
            read_rate_bps: 1_500_000_000,
            write_rate_bps: 12_800_000,
            read_time_ms: 2,
            write_time_ms: 1200,
            wait_time_ms: 1,
            in_flight_ops: 8,
            active_time_ms: 10,
            ..Traffic::go_sample()
        },
    );
    let slot = "{slot=\"storage-pool\"}";
    eventually("the disk and hardware gauges are filled", || async {
        let s = rds.d.scrape().await;
        sample_or_absent(&s, &format!("rds_disk_in_flight_operations{slot}")) == Some(8.0)
            && sample_or_absent(&s, "rds_hardware_fan1_speed_rpm") == Some(5400.0)
    })
    .await;
    let s = rds.d.scrape().await;
    for family in DISK.iter().chain(&HARDWARE) {
        assert!(
            s.contains(&format!("# TYPE {family} gauge\n")),
            "{family} is not served as a gauge"
        );
    }
    let disk = |name: &str| sample(&s, &format!("{name}{slot}"));
    assert_eq!(disk("rds_disk_read_ops_per_second"), 1500.0);
    assert_eq!(disk("rds_disk_write_ops_per_second"), 76.0);
    assert_eq!(disk("rds_disk_read_bytes_per_second"), 187_500_000.0);
    assert_eq!(disk("rds_disk_write_bytes_per_second"), 1_600_000.0);
    assert_eq!(disk("rds_disk_read_latency_milliseconds"), 2.0);
    assert_eq!(disk("rds_disk_write_latency_milliseconds"), 1200.0);
    assert_eq!(disk("rds_disk_wait_latency_milliseconds"), 1.0);
    assert_eq!(disk("rds_disk_active_time_milliseconds"), 10.0);
    assert_eq!(sample(&s, "rds_hardware_cpu_temperature_celsius"), 38.5);
    assert_eq!(sample(&s, "rds_hardware_board_temperature_celsius"), 52.7);
    assert_eq!(sample(&s, "rds_hardware_fan2_speed_rpm"), 5520.0);
    assert_eq!(sample(&s, "rds_hardware_psu1_power_watts"), 121.0);
    assert_eq!(sample(&s, "rds_hardware_psu1_temperature_celsius"), 123.4);
    assert_eq!(sample(&s, "rds_hardware_psu2_temperature_celsius"), 5150.0);
    let total = rds.fake.pool_total_bytes();
    assert_eq!(
        sample(&s, "rds_hardware_disk_pool_size_bytes"),
        total as f64
    );
    assert_eq!(
        sample(&s, "rds_hardware_disk_pool_used_bytes"),
        (total - rds.fake.pool_free_bytes()) as f64
    );
    assert_eq!(
        sample(&s, "rds_csi_storage_poll_failures_total{source=\"disk\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &s,
            "rds_csi_storage_poll_failures_total{source=\"hardware\"}"
        ),
        0.0
    );
    // The fakes saw the commands the Go driver sends, and GETs with the configured community.
    assert!(!rds
        .fake
        .commands_matching("/disk monitor-traffic storage-pool once")
        .is_empty());
    let gets = snmp.requests();
    assert!(gets
        .iter()
        .all(|r| r.community == COMMUNITY && r.pdu == 0xa0));
    assert!(gets[0].oids.contains(&format!("{MTXR_HEALTH}.10.0")));
    // A new value on the agent shows up on a later scrape.
    snmp.set(&format!("{MTXR_HEALTH}.10"), SnmpValue::Integer(-15));
    eventually("the new temperature is scraped", || async {
        sample_or_absent(
            &rds.d.scrape().await,
            "rds_hardware_cpu_temperature_celsius",
        ) == Some(-1.5)
    })
    .await;
}

/// A wrong community gets no answer from the agent (as a real one): each poll times out and is
/// counted under `hardware`, the hardware gauges stay at zero, and the disk side is unharmed.
/// Catches a poller that waits for an answer forever (no failure counted) or that lets the
/// SNMP failure spill into the disk source.
#[tokio::test]
async fn a_wrong_community_is_counted_and_leaves_the_disk_side_alone() {
    let snmp = FakeSnmp::start(COMMUNITY).await;
    let rds = start(&snmp, "wrong-community").await;
    eventually("two hardware polls failed", || async {
        sample_or_absent(
            &rds.d.scrape().await,
            "rds_csi_storage_poll_failures_total{source=\"hardware\"}",
        )
        .is_some_and(|n| n >= 2.0)
    })
    .await;
    let s = rds.d.scrape().await;
    assert_eq!(sample(&s, "rds_hardware_fan1_speed_rpm"), 0.0);
    assert!(sample(&s, "rds_csi_storage_poll_age_seconds{source=\"hardware\"}") >= 1.0);
    assert!(snmp.requests().iter().all(|r| !r.answered));
    assert_eq!(
        sample(&s, "rds_csi_storage_poll_failures_total{source=\"disk\"}"),
        0.0
    );
    assert!(
        rds.d.log().contains("storage poll failed"),
        "the failure is logged"
    );
}

/// A hung RDS: scrapes still answer while every command on the RDS hangs (they would never
/// return if a scrape waited on the RDS), the disk poll is counted as failed, and the age of
/// the disk metrics grows from scrape to scrape.
#[tokio::test]
async fn a_hung_or_refusing_rds_never_holds_a_scrape() {
    let snmp = FakeSnmp::start(COMMUNITY).await;
    let rds = start(&snmp, COMMUNITY).await;
    let url = format!("{}/metrics", rds.d.metrics_url().await);
    eventually("a first disk sample", || async {
        sample_or_absent(
            &http_get(&url).await,
            "rds_csi_storage_poll_age_seconds{source=\"disk\"}",
        )
        .is_some_and(|age| age < 1.0)
            && !rds.fake.commands_matching("monitor-traffic").is_empty()
    })
    .await;
    rds.fake.hang(true);
    eventually("a disk poll timed out while the RDS hangs", || async {
        sample(
            &http_get(&url).await,
            "rds_csi_storage_poll_failures_total{source=\"disk\"}",
        ) >= 1.0
    })
    .await;
    let first = sample(
        &http_get(&url).await,
        "rds_csi_storage_poll_age_seconds{source=\"disk\"}",
    );
    eventually("the disk age grows while the RDS hangs", || async {
        sample(
            &http_get(&url).await,
            "rds_csi_storage_poll_age_seconds{source=\"disk\"}",
        ) > first
    })
    .await;
    assert!(
        first >= 1.0,
        "a timed-out poll does not reset the age ({first})"
    );
    rds.fake.hang(false);
}

/// The slot comes from `--rds-volume-path`; a pool RouterOS does not know is refused
/// (`no such item`) and each refusal counted, never shown as an idle disk. Without
/// `--snmp-address` SNMP is off and the SNMP-only families are not served at all.
#[tokio::test]
async fn an_unknown_pool_is_counted_and_snmp_is_off_without_an_address() {
    let rds = Rds::start(&[
        "--rds-volume-path",
        "/no-such-pool/csi",
        "--storage-poll-interval",
        "100ms",
    ])
    .await;
    eventually("two disk polls refused", || async {
        sample_or_absent(
            &rds.d.scrape().await,
            "rds_csi_storage_poll_failures_total{source=\"disk\"}",
        )
        .is_some_and(|n| n >= 2.0)
    })
    .await;
    let refused = rds
        .fake
        .commands_matching("/disk monitor-traffic no-such-pool once");
    assert!(refused
        .iter()
        .any(|c| c.output.as_deref() == Some("no such item\r\n")));
    let s = rds.d.scrape().await;
    assert_eq!(
        sample(&s, "rds_disk_read_ops_per_second{slot=\"no-such-pool\"}"),
        0.0
    );
    for family in &HARDWARE[..8] {
        assert!(!s.contains(family), "{family} is served with SNMP off");
    }
    assert_eq!(
        sample_or_absent(
            &s,
            "rds_csi_storage_poll_failures_total{source=\"hardware\"}"
        ),
        None
    );
}

/// The fake agent answers as a real one, through an independent SNMP client (the `snmp2`
/// crate): the MIB's value types, `noSuchInstance` for a scalar read without its `.0` (as the
/// Go driver's OIDs are written), `noSuchObject` for what it does not have, and nothing at all
/// for a wrong community.
#[tokio::test]
async fn the_fake_agent_answers_as_routeros_does() {
    use snmp2::{AsyncSession, Oid, Value};
    let snmp = FakeSnmp::start(COMMUNITY).await;
    let oid = |s: &str| {
        Oid::from(
            &s.split('.')
                .map(|a| a.parse().unwrap())
                .collect::<Vec<u64>>()[..],
        )
        .unwrap()
    };
    let oids = [
        oid(&format!("{MTXR_HEALTH}.10.0")),
        oid(&format!("{MTXR_HEALTH}.17.0")),
        oid(&format!("{MTXR_HEALTH}.9.0")),
        oid(&format!("{MTXR_HEALTH}.10")),
        oid(&format!("{MTXR_HEALTH}.99.0")),
    ];
    let refs: Vec<&Oid> = oids.iter().collect();
    let mut session = AsyncSession::new_v2c(snmp.address(), COMMUNITY.as_bytes(), 7)
        .await
        .unwrap();
    let pdu = session.get_many(&refs).await.unwrap();
    assert_eq!(pdu.error_status, 0);
    let values: Vec<String> = pdu
        .varbinds
        .map(|(_, v)| match v {
            Value::Integer(n) => format!("Integer {n}"),
            Value::Unsigned32(n) => format!("Gauge32 {n}"),
            Value::OctetString(s) => format!("OctetString {}", String::from_utf8_lossy(s)),
            Value::NoSuchInstance => "noSuchInstance".into(),
            Value::NoSuchObject => "noSuchObject".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        values,
        [
            "Integer 385",
            "Gauge32 5400",
            "OctetString fan1",
            "noSuchInstance",
            "noSuchObject"
        ]
    );
    // A wrong community: the request arrives and is never answered.
    let wrong = tokio::spawn({
        let address = snmp.address();
        let oid = oids[0].to_owned();
        async move {
            let mut s = AsyncSession::new_v2c(address, b"public", 1).await.unwrap();
            s.get(&oid).await.map(|_| ()).map_err(|e| format!("{e:?}"))
        }
    });
    eventually("the wrong-community request arrives", || async {
        snmp.requests().iter().any(|r| r.community == "public")
    })
    .await;
    let req = snmp
        .requests()
        .into_iter()
        .find(|r| r.community == "public")
        .unwrap();
    assert!(!req.answered);
    assert!(!wrong.is_finished(), "the client got an answer");
    wrong.abort();
}

/// The community is a password: `--help` shows that the env var exists, never its value (clap
/// prints env values by default; catches dropping `hide_env_values` on `--snmp-community`).
#[test]
fn help_never_prints_the_community() {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .env("RDS_CSI_SNMP_COMMUNITY", "topsecret-community")
        .output()
        .expect("rds-csi --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("RDS_CSI_SNMP_COMMUNITY"), "{help}");
    assert!(!help.contains("topsecret-community"), "{help}");
}
