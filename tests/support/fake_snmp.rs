//! A fake SNMP agent of a MikroTik RDS for tests: a real UDP socket on 127.0.0.1 that answers
//! SNMPv2c GET requests (RFC 3416, BER per X.690) from a table of MIKROTIK-MIB health objects,
//! with a request log and fault injection. The driver under test talks to it exactly as to
//! RouterOS's agent.
//!
//! Written from the MIB and the RFCs, and as strict as a real agent where it matters:
//! - a request with another community gets **no answer at all** (RFC 3584's community check;
//!   RouterOS drops it silently, it sends no error);
//! - only version 2c (`1`) is served; SNMPv1 and v3 messages are dropped;
//! - a GET of an object the agent does not have answers `noSuchObject`; of a known object at
//!   an instance other than `.0` (a scalar read without its `.0`, as the Go driver's OIDs are
//!   written) answers `noSuchInstance`;
//! - values carry the MIB's types: `Temperature`, `Voltage` and `Power` are Integer32 in
//!   tenths (display hint `d-1`), `mtxrHlCurrent` Integer32 mA, the fan speeds Gauge32 rpm,
//!   `mtxrHlActiveFan` a DisplayString (OCTET STRING);
//! - GETNEXT, GETBULK and SET are not served (the driver sends none); they are logged and
//!   dropped.
//!
//! Include it with `#[path = "support/fake_snmp.rs"] mod fake_snmp;` (adjust the path).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// MIKROTIK-MIB `mtxrHealth`.
pub const MTXR_HEALTH: &str = "1.3.6.1.4.1.14988.1.1.3";

/// A value with its SNMP type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnmpValue {
    Integer(i64),
    OctetString(Vec<u8>),
    Gauge32(u32),
    Counter32(u32),
}

/// One datagram received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub community: String,
    /// The PDU tag (`0xa0` GET, `0xa1` GETNEXT, `0xa5` GETBULK, `0xa3` SET).
    pub pdu: u8,
    /// The OIDs asked for, dotted.
    pub oids: Vec<String>,
    /// Whether it was answered.
    pub answered: bool,
}

struct Shared {
    community: String,
    /// Object OID (dotted, without instance) -> value at instance `.0`.
    objects: Mutex<BTreeMap<String, SnmpValue>>,
    log: Mutex<Vec<Request>>,
    silent: AtomicBool,
}

pub struct FakeSnmp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeSnmp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The health objects of an RDS, with plausible values in the MIB's types and units.
pub fn rds_health() -> BTreeMap<String, SnmpValue> {
    let o = |arc: u32| format!("{MTXR_HEALTH}.{arc}");
    BTreeMap::from([
        (o(8), SnmpValue::Integer(121)), // mtxrHlVoltage: 12.1 V
        (o(9), SnmpValue::OctetString(b"fan1".to_vec())), // mtxrHlActiveFan
        (o(10), SnmpValue::Integer(385)), // mtxrHlTemperature: 38.5 °C
        (o(11), SnmpValue::Integer(527)), // mtxrHlProcessorTemperature: 52.7 °C
        (o(12), SnmpValue::Integer(1234)), // mtxrHlPower: 123.4 W
        (o(13), SnmpValue::Integer(5150)), // mtxrHlCurrent: 5150 mA
        (o(14), SnmpValue::Integer(2000)), // mtxrHlProcessorFrequency: MHz
        (o(17), SnmpValue::Gauge32(5400)), // mtxrHlFanSpeed1: rpm
        (o(18), SnmpValue::Gauge32(5520)), // mtxrHlFanSpeed2: rpm
    ])
}

impl FakeSnmp {
    /// An agent on 127.0.0.1 (any free port) with [`rds_health`], answering `community`.
    pub async fn start(community: &str) -> FakeSnmp {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        let addr = socket.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            community: community.to_string(),
            objects: Mutex::new(rds_health()),
            log: Mutex::new(vec![]),
            silent: AtomicBool::new(false),
        });
        let task = tokio::spawn(serve(socket, shared.clone()));
        FakeSnmp { addr, shared, task }
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// Sets an object's value (`oid` dotted, without the `.0` instance).
    pub fn set(&self, oid: &str, value: SnmpValue) {
        lock(&self.shared.objects).insert(oid.to_string(), value);
    }

    /// Removes an object: GETs of it answer `noSuchObject`.
    pub fn remove(&self, oid: &str) {
        lock(&self.shared.objects).remove(oid);
    }

    /// While on, requests are logged and never answered (an agent that is down or filtered).
    pub fn set_silent(&self, on: bool) {
        self.shared.silent.store(on, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.log).clone()
    }
}

async fn serve(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(msg) = decode_message(&buf[..n]) else {
            continue; // not SNMP, or malformed: agents drop it
        };
        let mut request = Request {
            community: String::from_utf8_lossy(&msg.community).into_owned(),
            pdu: msg.pdu,
            oids: msg.oids.iter().map(|o| dotted(o)).collect(),
            answered: false,
        };
        let answer = msg.version == 1
            && msg.community == shared.community.as_bytes()
            && msg.pdu == 0xa0
            && !shared.silent.load(Ordering::SeqCst);
        if answer {
            let objects = lock(&shared.objects).clone();
            let reply = encode_response(msg.request_id, &msg.community, &msg.oids, &objects);
            request.answered = socket.send_to(&reply, peer).await.is_ok();
        }
        lock(&shared.log).push(request);
    }
}

fn dotted(oid: &[u64]) -> String {
    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

// ----- BER (X.690), the subset SNMP uses -----

struct Message {
    version: i64,
    community: Vec<u8>,
    pdu: u8,
    request_id: i64,
    oids: Vec<Vec<u64>>,
}

/// One TLV: (tag, content, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | *x as usize);
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

fn int(content: &[u8]) -> Option<i64> {
    if content.is_empty() || content.len() > 8 {
        return None;
    }
    let mut v: i64 = if content[0] & 0x80 != 0 { -1 } else { 0 };
    for b in content {
        v = (v << 8) | *b as i64;
    }
    Some(v)
}

fn oid(content: &[u8]) -> Option<Vec<u64>> {
    let (&first, rest) = content.split_first()?;
    let mut arcs = vec![u64::from(first / 40), u64::from(first % 40)];
    let mut acc: u64 = 0;
    for b in rest {
        acc = acc.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            arcs.push(acc);
            acc = 0;
        }
    }
    (acc == 0).then_some(arcs)
}

fn decode_message(b: &[u8]) -> Option<Message> {
    let (0x30, body, _) = tlv(b)? else {
        return None;
    };
    let (0x02, version, rest) = tlv(body)? else {
        return None;
    };
    let (0x04, community, rest) = tlv(rest)? else {
        return None;
    };
    let (pdu, pdu_body, _) = tlv(rest)?;
    let (0x02, request_id, rest) = tlv(pdu_body)? else {
        return None;
    };
    let (0x02, _, rest) = tlv(rest)? else {
        return None;
    };
    let (0x02, _, rest) = tlv(rest)? else {
        return None;
    };
    let (0x30, mut binds, _) = tlv(rest)? else {
        return None;
    };
    let mut oids = vec![];
    while !binds.is_empty() {
        let (0x30, bind, rest) = tlv(binds)? else {
            return None;
        };
        let (0x06, o, _) = tlv(bind)? else {
            return None;
        };
        oids.push(oid(o)?);
        binds = rest;
    }
    Some(Message {
        version: int(version)?,
        community: community.to_vec(),
        pdu,
        request_id: int(request_id)?,
        oids,
    })
}

fn enc(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn enc_int(tag: u8, v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 7
        && ((bytes[start] == 0 && bytes[start + 1] & 0x80 == 0)
            || (bytes[start] == 0xff && bytes[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    enc(tag, &bytes[start..])
}

/// Unsigned application types (Gauge32, Counter32): a leading zero byte keeps them positive.
fn enc_uint(tag: u8, v: u32) -> Vec<u8> {
    enc_int(tag, i64::from(v))
}

fn enc_oid(arcs: &[u64]) -> Vec<u8> {
    let mut content = vec![(arcs[0] * 40 + arcs[1]) as u8];
    for &a in &arcs[2..] {
        let mut groups = vec![(a & 0x7f) as u8];
        let mut rest = a >> 7;
        while rest > 0 {
            groups.push(0x80 | (rest & 0x7f) as u8);
            rest >>= 7;
        }
        content.extend(groups.into_iter().rev());
    }
    enc(0x06, &content)
}

fn encode_value(v: &SnmpValue) -> Vec<u8> {
    match v {
        SnmpValue::Integer(n) => enc_int(0x02, *n),
        SnmpValue::OctetString(s) => enc(0x04, s),
        SnmpValue::Counter32(n) => enc_uint(0x41, *n),
        SnmpValue::Gauge32(n) => enc_uint(0x42, *n),
    }
}

fn encode_response(
    request_id: i64,
    community: &[u8],
    oids: &[Vec<u64>],
    objects: &BTreeMap<String, SnmpValue>,
) -> Vec<u8> {
    let mut binds = vec![];
    for o in oids {
        let value = match o.split_last() {
            Some((&0, object)) => objects.get(&dotted(object)).map(encode_value),
            _ => None,
        }
        .unwrap_or_else(|| {
            // A known object at another instance: noSuchInstance; else noSuchObject.
            let known = (1..=o.len()).any(|n| objects.contains_key(&dotted(&o[..n])));
            enc(if known { 0x81 } else { 0x80 }, &[])
        });
        binds.extend(enc(0x30, &[enc_oid(o), value].concat()));
    }
    let pdu = [
        enc_int(0x02, request_id),
        enc_int(0x02, 0),
        enc_int(0x02, 0),
        enc(0x30, &binds),
    ]
    .concat();
    enc(
        0x30,
        &[enc_int(0x02, 1), enc(0x04, community), enc(0xa2, &pdu)].concat(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ber_round_trips() {
        for v in [
            0i64,
            1,
            127,
            128,
            255,
            256,
            -1,
            -128,
            -129,
            5400,
            i32::MAX as i64,
        ] {
            let e = enc_int(0x02, v);
            let (_, c, _) = tlv(&e).unwrap();
            assert_eq!(int(c), Some(v), "{v}");
        }
        let arcs = vec![1, 3, 6, 1, 4, 1, 14988, 1, 1, 3, 10, 0];
        let e = enc_oid(&arcs);
        let (_, c, _) = tlv(&e).unwrap();
        assert_eq!(oid(c), Some(arcs));
        assert_eq!(
            enc_uint(0x42, 0xffff_ffff),
            vec![0x42, 5, 0, 0xff, 0xff, 0xff, 0xff]
        );
    }
}
