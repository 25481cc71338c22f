//! The hardware source of the storage poller: one SNMPv2c GET of the MIKROTIK-MIB health
//! objects the Go driver reads, turned into the `rds_hardware_*` gauges' units.
//!
//! Owns the OID table, the decoding of each value by its MIB type and display hint, and the
//! SNMP target (`--snmp-address`, `--snmp-community`). The wire protocol is the `snmp2`
//! crate's. Sends only GET requests.
//!
//! The OIDs are the Go driver's, so a switch keeps every series on the same object. Some of
//! them are not what the gauge's name says (the Go driver's mapping, kept for drop-in; the
//! help text of each gauge names the MIB object it really reads):
//!
//! | gauge | OID under mtxrHealth | MIB object, type | conversion |
//! | --- | --- | --- | --- |
//! | cpu_temperature_celsius | .10 | mtxrHlTemperature, Integer32 `d-1` | ÷ 10 |
//! | board_temperature_celsius | .11 | mtxrHlProcessorTemperature, Integer32 `d-1` | ÷ 10 |
//! | fan1_speed_rpm | .17 | mtxrHlFanSpeed1, Gauge32 rpm | as is |
//! | fan2_speed_rpm | .18 | mtxrHlFanSpeed2, Gauge32 rpm | as is |
//! | psu1_power_watts | .8 | mtxrHlVoltage, Integer32 `d-1` volts | volts × 10 A (Go's estimate) |
//! | psu2_power_watts | .9 | mtxrHlActiveFan, DisplayString | × 10 when the text is a number |
//! | psu1_temperature_celsius | .12 | mtxrHlPower, Integer32 `d-1` watts | ÷ 10 |
//! | psu2_temperature_celsius | .13 | mtxrHlCurrent, Integer32 mA | as is |
//!
//! The Go driver exported the raw integers, so its temperatures were ten times too high; here
//! each value is in the unit the gauge's name promises, as far as the MIB object allows. An
//! object the agent lacks (noSuchObject) or whose value is not a number leaves its gauge as
//! it was.

use std::net::IpAddr;
use std::time::Duration;

use snmp2::{AsyncSession, Oid, Value};

use super::monitor::{PollError, Source};
use crate::metrics::StorageMetrics;

/// MIKROTIK-MIB `mtxrHealth`: 1.3.6.1.4.1.14988.1.1.3.
const MTXR_HEALTH: [u64; 10] = [1, 3, 6, 1, 4, 1, 14988, 1, 1, 3];

/// How a raw value becomes the gauge's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conversion {
    /// A `d-1` display hint: tenths.
    Tenths,
    AsIs,
    /// Volts (tenths on the wire) times 10 A: the Go driver's power estimate.
    VoltsTimesTenAmps,
    /// The Go driver's `× 10` on a value that is text; only a numeric text counts.
    TextTimesTen,
}

/// Which gauge a reading feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gauge {
    CpuTemperature,
    BoardTemperature,
    Fan1Speed,
    Fan2Speed,
    Psu1Power,
    Psu2Power,
    Psu1Temperature,
    Psu2Temperature,
}

/// The Go driver's GET, in its order: (gauge, last arc under `mtxrHealth`, conversion).
const HEALTH: [(Gauge, u64, Conversion); 8] = [
    (Gauge::CpuTemperature, 10, Conversion::Tenths),
    (Gauge::BoardTemperature, 11, Conversion::Tenths),
    (Gauge::Fan1Speed, 17, Conversion::AsIs),
    (Gauge::Fan2Speed, 18, Conversion::AsIs),
    (Gauge::Psu1Power, 8, Conversion::VoltsTimesTenAmps),
    (Gauge::Psu2Power, 9, Conversion::TextTimesTen),
    (Gauge::Psu1Temperature, 12, Conversion::Tenths),
    (Gauge::Psu2Temperature, 13, Conversion::AsIs),
];

/// The OIDs one poll asks for, as dotted text (for logs, tests and the fake agent).
pub fn health_oids() -> Vec<String> {
    HEALTH
        .iter()
        .map(|(_, arc, _)| {
            oid_arcs(*arc)
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect()
}

fn oid_arcs(last: u64) -> Vec<u64> {
    // Scalars are read at instance `.0`.
    MTXR_HEALTH.iter().copied().chain([last, 0]).collect()
}

/// A value as the agent sent it, reduced to what the conversion needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// INTEGER / Integer32.
    Integer(i64),
    /// Gauge32 (Unsigned32), Counter32, Counter64, TimeTicks.
    Unsigned(u64),
    /// OCTET STRING.
    Text(Vec<u8>),
    /// noSuchObject, noSuchInstance, endOfMibView, or a type no conversion reads.
    Absent,
}

impl From<&Value<'_>> for Reading {
    fn from(v: &Value<'_>) -> Self {
        match v {
            Value::Integer(n) => Self::Integer(*n),
            Value::Unsigned32(n) | Value::Counter32(n) | Value::Timeticks(n) => {
                Self::Unsigned(u64::from(*n))
            }
            Value::Counter64(n) => Self::Unsigned(*n),
            Value::OctetString(s) => Self::Text(s.to_vec()),
            _ => Self::Absent,
        }
    }
}

/// One poll's values, in the gauges' units; `None` where the agent gave no number.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HardwareHealth {
    pub values: Vec<(Gauge, f64)>,
}

impl HardwareHealth {
    pub fn get(&self, gauge: Gauge) -> Option<f64> {
        self.values
            .iter()
            .find(|(g, _)| *g == gauge)
            .map(|(_, v)| *v)
    }
}

/// Converts the readings of one GET (by OID, dotted) into gauge values. Pure.
pub fn health(readings: &[(String, Reading)]) -> HardwareHealth {
    let mut values = Vec::new();
    for ((gauge, _, conversion), oid) in HEALTH.iter().zip(health_oids()) {
        let Some((_, reading)) = readings.iter().find(|(o, _)| *o == oid) else {
            continue;
        };
        let number = match reading {
            Reading::Integer(n) => Some(*n as f64),
            Reading::Unsigned(n) => Some(*n as f64),
            Reading::Text(t) if *conversion == Conversion::TextTimesTen => std::str::from_utf8(t)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite()),
            Reading::Text(_) | Reading::Absent => None,
        };
        let Some(n) = number else { continue };
        let value = match conversion {
            Conversion::Tenths => n / 10.0,
            Conversion::AsIs => n,
            Conversion::VoltsTimesTenAmps => n / 10.0 * 10.0,
            Conversion::TextTimesTen => n * 10.0,
        };
        values.push((*gauge, value));
    }
    HardwareHealth { values }
}

/// An SNMP community: 1 to 64 printable ASCII characters. Never printed (it is a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Community(String);

impl Community {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, crate::Error> {
        let ok = !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(crate::Error::InvalidArgument {
                field,
                reason: "an SNMP community is 1 to 64 printable ASCII characters without spaces"
                    .into(),
            });
        }
        Ok(Self(raw.to_string()))
    }
}

impl std::fmt::Debug for Community {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Community(<redacted>)")
    }
}

/// An SNMP agent's address: `HOST[:PORT]`, `[v6]:PORT` or a bare IP address, port 161 by
/// default. A host name is resolved at each poll (inside its timeout), so a name that does not
/// resolve yet fails polls, not the start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnmpAddress {
    host: String,
    port: u16,
}

impl SnmpAddress {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, crate::Error> {
        let bad = |why: &str| crate::Error::InvalidArgument {
            field,
            reason: format!("{raw:?} {why}"),
        };
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(Self {
                host: ip.to_string(),
                port: 161,
            });
        }
        if let Ok(a) = raw.parse::<std::net::SocketAddr>() {
            return Ok(Self {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        let (host, port) = match raw.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("has a bad port"))?,
            ),
            None => (raw, 161),
        };
        let name = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !name {
            return Err(bad(
                "is not HOST[:PORT] (an IPv6 address with a port is [v6]:PORT)",
            ));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for SnmpAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The hardware source: one SNMPv2c GET per poll, bounded by `timeout` (one attempt; the next
/// poll is the retry).
pub struct HardwareSource {
    pub address: SnmpAddress,
    pub community: Community,
    pub timeout: Duration,
}

impl HardwareSource {
    async fn get(&self) -> Result<Vec<(String, Reading)>, PollError> {
        let snmp = |e: snmp2::Error| PollError::Snmp(format!("{e:?}"));
        let arcs: Vec<Vec<u64>> = HEALTH.iter().map(|(_, a, _)| oid_arcs(*a)).collect();
        let oids = arcs
            .iter()
            .map(|a| Oid::from(a).map_err(|e| PollError::Snmp(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Oid> = oids.iter().collect();
        let mut session = AsyncSession::new_v2c(
            (self.address.host.as_str(), self.address.port),
            self.community.0.as_bytes(),
            1,
        )
        .await
        .map_err(|e| PollError::Snmp(format!("{}: {e}", self.address)))?;
        let pdu = session.get_many(&refs).await.map_err(snmp)?;
        if pdu.error_status != 0 {
            return Err(PollError::Snmp(format!(
                "{} answered error-status {} (index {})",
                self.address, pdu.error_status, pdu.error_index
            )));
        }
        Ok(pdu
            .varbinds
            .map(|(oid, value)| {
                let dotted = oid
                    .iter()
                    .map(|it| it.map(|a| a.to_string()).collect::<Vec<_>>().join("."))
                    .unwrap_or_default();
                (dotted, Reading::from(&value))
            })
            .collect())
    }
}

impl Source for HardwareSource {
    type Sample = HardwareHealth;
    const NAME: &'static str = "hardware";

    async fn poll(&self) -> Result<HardwareHealth, PollError> {
        let readings = tokio::time::timeout(self.timeout, self.get())
            .await
            .map_err(|_| {
                PollError::Snmp(format!(
                    "no answer from {} within {:?} (an agent ignores a wrong community)",
                    self.address, self.timeout
                ))
            })??;
        Ok(health(&readings))
    }

    fn record(sample: &HardwareHealth, metrics: &StorageMetrics) {
        let Some(h) = &metrics.hardware else { return };
        for (gauge, value) in &sample.values {
            let g = match gauge {
                Gauge::CpuTemperature => &h.cpu_temperature_celsius,
                Gauge::BoardTemperature => &h.board_temperature_celsius,
                Gauge::Fan1Speed => &h.fan1_speed_rpm,
                Gauge::Fan2Speed => &h.fan2_speed_rpm,
                Gauge::Psu1Power => &h.psu1_power_watts,
                Gauge::Psu2Power => &h.psu2_power_watts,
                Gauge::Psu1Temperature => &h.psu1_temperature_celsius,
                Gauge::Psu2Temperature => &h.psu2_temperature_celsius,
            };
            g.set(*value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_go_drivers_oids() {
        assert_eq!(
            health_oids(),
            [
                "1.3.6.1.4.1.14988.1.1.3.10.0",
                "1.3.6.1.4.1.14988.1.1.3.11.0",
                "1.3.6.1.4.1.14988.1.1.3.17.0",
                "1.3.6.1.4.1.14988.1.1.3.18.0",
                "1.3.6.1.4.1.14988.1.1.3.8.0",
                "1.3.6.1.4.1.14988.1.1.3.9.0",
                "1.3.6.1.4.1.14988.1.1.3.12.0",
                "1.3.6.1.4.1.14988.1.1.3.13.0",
            ]
        );
    }

    /// Catches exporting the MIB's tenths as they are (the Go driver's 10× temperatures) and
    /// reading a text or an absent object as zero.
    #[test]
    fn values_in_the_gauges_units() {
        let o = health_oids();
        let readings = vec![
            (o[0].clone(), Reading::Integer(415)),
            (o[1].clone(), Reading::Integer(-52)),
            (o[2].clone(), Reading::Unsigned(5400)),
            (o[3].clone(), Reading::Absent),
            (o[4].clone(), Reading::Integer(240)),
            (o[5].clone(), Reading::Text(b"fan1".to_vec())),
            (o[6].clone(), Reading::Integer(1234)),
            (o[7].clone(), Reading::Integer(1800)),
        ];
        let h = health(&readings);
        assert_eq!(h.get(Gauge::CpuTemperature), Some(41.5));
        assert_eq!(h.get(Gauge::BoardTemperature), Some(-5.2));
        assert_eq!(h.get(Gauge::Fan1Speed), Some(5400.0));
        assert_eq!(h.get(Gauge::Fan2Speed), None);
        assert_eq!(h.get(Gauge::Psu1Power), Some(240.0));
        assert_eq!(h.get(Gauge::Psu2Power), None);
        assert_eq!(h.get(Gauge::Psu1Temperature), Some(123.4));
        assert_eq!(h.get(Gauge::Psu2Temperature), Some(1800.0));
        let numeric = vec![(o[5].clone(), Reading::Text(b"24".to_vec()))];
        assert_eq!(health(&numeric).get(Gauge::Psu2Power), Some(240.0));
    }

    #[test]
    fn snmp_addresses() {
        let ok = |raw: &str| SnmpAddress::parse(raw, "a").unwrap().to_string();
        assert_eq!(ok("10.42.68.1"), "10.42.68.1:161");
        assert_eq!(ok("10.42.68.1:1161"), "10.42.68.1:1161");
        assert_eq!(ok("fd00::1"), "[fd00::1]:161");
        assert_eq!(ok("[fd00::1]:162"), "[fd00::1]:162");
        assert_eq!(ok("rds.lan"), "rds.lan:161");
        assert_eq!(ok("rds.lan:9161"), "rds.lan:9161");
        for bad in [
            "",
            "rds.lan:0",
            "rds.lan:x",
            "a b",
            "rds;rm",
            "[fd00::1]",
            ":161",
        ] {
            assert!(SnmpAddress::parse(bad, "a").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn community_is_validated_and_never_printed() {
        let c = Community::parse("s3cret!", "--snmp-community").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        for bad in ["", "has space", "tab\t", "é"] {
            assert!(
                Community::parse(bad, "--snmp-community").is_err(),
                "{bad:?}"
            );
        }
    }
}
