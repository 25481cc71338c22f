//! Every value that can reach a RouterOS command line, validated against a strict allowlist
//! before any command string exists. A [`super::command::RosCommand`] is built only from these
//! types, so an unchecked string cannot reach the RDS.
//!
//! The allowlists are narrower than RouterOS would accept: letters, digits and a few
//! punctuation marks, never a quote, bracket, semicolon, `$`, backslash, backtick, space,
//! newline or anything outside ASCII.

use std::fmt;
use std::net::IpAddr;

use crate::ids::VolumeId;
use crate::Error;

/// RouterOS's default NQN prefix, as the Go driver uses (it is hard-coded there).
pub const DEFAULT_NQN_PREFIX: &str = "nqn.2000-02.com.mikrotik";
/// The Go driver's default directory for volume images on the RDS.
pub const DEFAULT_VOLUME_PATH: &str = "/storage-pool/metal-csi";
pub const DEFAULT_NVME_PORT: u16 = 4420;
/// Smallest and largest volume, as the Go driver enforces.
pub const MIN_VOLUME_BYTES: u64 = 1 << 30;
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// The longest NQN NVMe allows.
pub const MAX_NQN_LEN: usize = 223;

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidArgument { field, reason }
}

fn shown(raw: &str) -> String {
    let short: String = raw.chars().take(64).collect();
    let more = if raw.chars().count() > 64 { "…" } else { "" };
    format!("{:?}{more}", short)
}

/// A disk slot name: `^[A-Za-z0-9][A-Za-z0-9-]*$`, at most 128 bytes (the Go driver's rule).
/// The slot of a volume is its id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(String);

impl Slot {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, Error> {
        if raw.is_empty() || raw.len() > crate::ids::MAX_VOLUME_ID_LEN {
            return Err(invalid(
                field,
                format!("{} must be 1 to 128 bytes", shown(raw)),
            ));
        }
        let ok = raw.as_bytes()[0].is_ascii_alphanumeric()
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(invalid(
                field,
                format!(
                    "{} is not a RouterOS slot name: only letters, digits and '-' are allowed",
                    shown(raw)
                ),
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn of(volume: &VolumeId) -> Result<Self, Error> {
        Self::parse(volume.as_str(), "volume_id")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The prefix of every snapshot slot, as the Go driver makes and lists them (`slot~"snap-"`).
pub const SNAPSHOT_SLOT_PREFIX: &str = "snap-";

/// What a disk was made from and when, kept in its RouterOS `comment` (which `print detail`
/// shows as `;;; <comment>`), because RouterOS keeps nothing else that says so: a snapshot's
/// source volume, a restored volume's snapshot, a clone's volume. Rendered as
/// `source-<slot>-at-<unix seconds>`, only letters, digits and `-` (the slot allowlist), so it
/// needs no quoting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    pub source: Slot,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

impl Provenance {
    const PREFIX: &'static str = "source-";
    const AT: &'static str = "-at-";

    /// Reads a disk's comment; `None` when it is not one this driver wrote.
    pub fn parse(comment: &str) -> Option<Self> {
        let rest = comment.trim().strip_prefix(Self::PREFIX)?;
        let (source, at) = rest.rsplit_once(Self::AT)?;
        if at.is_empty() || at.len() > 12 || !at.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            source: Slot::parse(source, "comment").ok()?,
            at: at.parse().ok()?,
        })
    }

    pub fn time(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.at)
    }
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}{}", Self::PREFIX, self.source, Self::AT, self.at)
    }
}

/// A digest of what a volume was created for: its StorageClass parameters (without the
/// provisioner's per-claim `csi.storage.k8s.io/…` ones) and its capabilities, so a repeated
/// CreateVolume can be compared with the first as the file backend compares its metadata
/// (RouterOS keeps neither). 16 lowercase hex digits of a SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct MadeWith(String);

impl MadeWith {
    const LEN: usize = 16;

    pub fn of(
        parameters: &std::collections::BTreeMap<String, String>,
        capabilities: &[crate::domain::Capability],
    ) -> Self {
        use sha2::Digest;
        let parameters: Vec<(&String, &String)> = parameters
            .iter()
            .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
            .collect();
        let mut capabilities = capabilities.to_vec();
        capabilities.sort();
        capabilities.dedup();
        let text = serde_json::to_string(&(parameters, capabilities))
            .expect("strings and capabilities serialize");
        Self(hex::encode(
            &sha2::Sha256::digest(text.as_bytes())[..Self::LEN / 2],
        ))
    }

    fn parse(raw: &str) -> Option<Self> {
        (raw.len() == Self::LEN && raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(raw.to_string()))
    }
}

/// What this driver keeps in a disk's `comment`: where the disk was copied from
/// ([`Provenance`]) and what a volume was created for ([`MadeWith`]), rendered as
/// `source-<slot>-at-<secs>`, `made-<hex>` or `source-<slot>-at-<secs>-made-<hex>`: only
/// letters, digits and `-`, so it needs no quoting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub provenance: Option<Provenance>,
    pub made: Option<MadeWith>,
}

impl Record {
    const MADE: &'static str = "made-";

    /// Reads a disk's comment; an empty record when it is not one this driver wrote.
    pub fn parse(comment: &str) -> Self {
        let comment = comment.trim();
        if let Some(made) = comment.strip_prefix(Self::MADE).and_then(MadeWith::parse) {
            return Self {
                provenance: None,
                made: Some(made),
            };
        }
        if let Some((rest, made)) = comment.rsplit_once("-made-") {
            if let (Some(provenance), Some(made)) = (Provenance::parse(rest), MadeWith::parse(made))
            {
                return Self {
                    provenance: Some(provenance),
                    made: Some(made),
                };
            }
        }
        Self {
            provenance: Provenance::parse(comment),
            made: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.provenance.is_none() && self.made.is_none()
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.provenance, &self.made) {
            (Some(p), Some(m)) => write!(f, "{p}-{}{m}", Self::MADE),
            (Some(p), None) => write!(f, "{p}"),
            (None, Some(m)) => write!(f, "{}{m}", Self::MADE),
            (None, None) => Ok(()),
        }
    }
}

/// An absolute path on the RDS: `/` then segments of `[A-Za-z0-9._-]`, none of them `.` or
/// `..`, no empty segment, at most 255 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RosPath(String);

impl RosPath {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, Error> {
        let bad = |why: &str| invalid(field, format!("{} {why}", shown(raw)));
        if raw.len() > 255 {
            return Err(bad("is longer than 255 bytes"));
        }
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(bad("must be an absolute path on the RDS"));
        };
        if rest.is_empty() {
            return Err(bad("must name a directory below /"));
        }
        for segment in rest.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("must not contain empty, '.' or '..' segments"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(bad(
                    "may contain only letters, digits, '.', '_', '-' and '/'",
                ));
            }
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<self>/<slot>.img`: a volume's or snapshot's image in this directory.
    pub fn image(&self, slot: &Slot) -> Result<RosPath, Error> {
        Self::parse(&format!("{}/{}.img", self.0, slot.as_str()), "volumePath")
    }

    /// The first path component, which RouterOS names the disk's mount point
    /// (`/storage-pool/metal-csi` → `storage-pool`).
    pub fn mount_point(&self) -> &str {
        self.0[1..].split('/').next().unwrap_or_default()
    }

    /// The path as `/file` commands name it: without the leading `/`.
    pub fn file_name(&self) -> &str {
        &self.0[1..]
    }
}

/// An NQN prefix such as `nqn.2000-02.com.mikrotik`: `nqn.YYYY-MM.` then a lowercase
/// reverse domain.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NqnPrefix(String);

impl NqnPrefix {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, Error> {
        let bad = || {
            invalid(
                field,
                format!(
                    "{} is not an NQN prefix like {DEFAULT_NQN_PREFIX} (lowercase nqn.YYYY-MM.domain)",
                    shown(raw)
                ),
            )
        };
        let rest = raw.strip_prefix("nqn.").ok_or_else(bad)?;
        let date = rest.get(..8).ok_or_else(bad)?;
        let date_ok = date.as_bytes()[4] == b'-'
            && date[..4].bytes().all(|b| b.is_ascii_digit())
            && date[5..7].bytes().all(|b| b.is_ascii_digit())
            && date.as_bytes()[7] == b'.';
        let domain = &rest[8..];
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
        if !date_ok || !domain_ok || raw.len() > 96 {
            return Err(bad());
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The NQN of a volume: `<prefix>:<slot in lowercase>`, as the Go driver makes it.
    pub fn nqn(&self, slot: &Slot) -> Result<Nqn, Error> {
        Nqn::parse(
            &format!("{}:{}", self.0, slot.as_str().to_ascii_lowercase()),
            "nqn",
        )
    }

    /// Whether `nqn` is one of this prefix's (`<prefix>:...`).
    pub fn owns(&self, nqn: &Nqn) -> bool {
        nqn.0
            .strip_prefix(self.0.as_str())
            .is_some_and(|rest| rest.starts_with(':'))
    }
}

impl Default for NqnPrefix {
    fn default() -> Self {
        Self(DEFAULT_NQN_PREFIX.to_string())
    }
}

/// An NVMe Qualified Name: `nqn.YYYY-MM.domain:name`, lowercase letters, digits and `.:_-`,
/// at most 223 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nqn(String);

impl Nqn {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, Error> {
        let bad = |why: &str| invalid(field, format!("{} {why}", shown(raw)));
        if raw.len() > MAX_NQN_LEN {
            return Err(bad("is longer than 223 bytes"));
        }
        let Some((prefix, name)) = raw.split_once(':') else {
            return Err(bad("is not an NQN (nqn.YYYY-MM.domain:name)"));
        };
        NqnPrefix::parse(prefix, field)?;
        if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            || !name.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-' | b':')
            })
        {
            return Err(bad(
                "has a name part with characters other than lowercase letters, digits and '.:_-'",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A TCP port, 1–65535.
pub fn port(raw: &str, field: &'static str) -> Result<u16, Error> {
    raw.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("{} is not a TCP port (1-65535)", shown(raw))))
}

/// A StorageClass's `nvmePort` read as the Go driver reads it (`fmt.Sscanf(value, "%d")`):
/// the integer at the start of the value, after spaces, with an optional sign. `None` when
/// there is none (or it overflows): the Go driver then uses its default port, so a
/// StorageClass that provisioned with it still does. An integer that is no TCP port is
/// refused (RouterOS would refuse it in `nvme-tcp-server-port=`).
pub fn leading_port(raw: &str, field: &'static str) -> Result<Option<u16>, Error> {
    let text = raw.trim_start();
    let sign = usize::from(text.starts_with(['+', '-']));
    let digits = text[sign..].bytes().take_while(u8::is_ascii_digit).count();
    let Ok(n) = text[..sign + digits].parse::<i64>() else {
        return Ok(None);
    };
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .map(Some)
        .ok_or_else(|| invalid(field, format!("{} is not a TCP port (1-65535)", shown(raw))))
}

/// An IP address literal (what `nvme connect -a` takes for TCP).
pub fn ip(raw: &str, field: &'static str) -> Result<IpAddr, Error> {
    raw.trim()
        .parse::<IpAddr>()
        .map_err(|_| invalid(field, format!("{} is not an IP address", shown(raw))))
}

/// A host a StorageClass's `rdsAddress` may name: an IP address literal, or a DNS name (at
/// most 253 bytes of letters, digits, `-` and `.`, no empty label). The Go driver only echoes
/// it into the volume context (and dials it when no `nvmeAddress` is set), so any real address
/// goes; a value that is no address at all is refused.
pub fn host(raw: &str, field: &'static str) -> Result<String, Error> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(invalid(
            field,
            format!("{} is neither an IP address nor a host name", shown(raw)),
        ));
    }
    Ok(raw.to_string())
}

/// A size RouterOS accepts in `file-size=`: whole GiB (`10G`), else whole MiB (`1536M`). A
/// request is rounded *up* to the next MiB, never down (the Go driver truncates, which could
/// make a volume smaller than asked for); whole-GiB sizes render exactly as the Go driver's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RosSize(u64);

impl RosSize {
    /// The volume size for a request: at least 1 GiB, at most 16 TiB, rounded up to a MiB.
    pub fn for_request(required: u64, limit: u64) -> Result<Self, crate::BackendError> {
        use crate::BackendError::OutOfRange;
        let wanted = required.max(MIN_VOLUME_BYTES);
        let rounded = wanted.div_ceil(1 << 20) << 20;
        if rounded > MAX_VOLUME_BYTES {
            return Err(OutOfRange(format!(
                "{required} bytes is more than the RDS maximum of {MAX_VOLUME_BYTES} (16 TiB)"
            )));
        }
        if limit != 0 && rounded > limit {
            return Err(OutOfRange(format!(
                "a volume of {required} bytes is {rounded} bytes on the RDS (at least 1 GiB, in \
                 whole MiB), more than limit_bytes {limit}"
            )));
        }
        Ok(Self(rounded))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RosSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const GIB: u64 = 1 << 30;
        const MIB: u64 = 1 << 20;
        if self.0.is_multiple_of(1 << 40) {
            write!(f, "{}T", self.0 >> 40)
        } else if self.0.is_multiple_of(GIB) {
            write!(f, "{}G", self.0 / GIB)
        } else {
            write!(f, "{}M", self.0 / MIB)
        }
    }
}

/// How a node reaches a volume over NVMe/TCP, from its volume context (the keys the Go driver
/// writes, so its PVs work unchanged).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NvmeTarget {
    #[serde(with = "as_string")]
    pub nqn: Nqn,
    /// `None` when only the NQN is known (unstage after a restart: enough to disconnect).
    pub address: Option<IpAddr>,
    pub port: u16,
    /// `nvme connect -l`: -1 retries forever (the Go driver's default).
    pub ctrl_loss_tmo: i32,
    /// `nvme connect -c`, seconds.
    pub reconnect_delay: u32,
    /// `nvme connect -k`, seconds; 0 leaves the kernel's default.
    pub keep_alive_tmo: u32,
}

pub const DEFAULT_CTRL_LOSS_TMO: i32 = -1;
pub const DEFAULT_RECONNECT_DELAY: u32 = 5;
pub const DEFAULT_KEEP_ALIVE_TMO: u32 = 0;

/// The three NVMe timing parameters, validated as the Go driver validates them.
pub fn nvme_timings(get: impl Fn(&str) -> Option<String>) -> Result<(i32, u32, u32), Error> {
    use crate::domain::rds_keys::{CTRL_LOSS_TMO, KEEP_ALIVE_TMO, RECONNECT_DELAY};
    let int = |key: &'static str| -> Result<Option<i64>, Error> {
        get(key)
            .map(|raw| {
                raw.trim()
                    .parse::<i64>()
                    .map_err(|_| invalid(key, format!("{} is not an integer", shown(&raw))))
            })
            .transpose()
    };
    let ctrl = int(CTRL_LOSS_TMO)?.unwrap_or(i64::from(DEFAULT_CTRL_LOSS_TMO));
    if !(-1..=i64::from(i32::MAX)).contains(&ctrl) {
        return Err(invalid(
            CTRL_LOSS_TMO,
            format!("must be -1 (forever), 0 (kernel default) or positive; got {ctrl}"),
        ));
    }
    let delay = int(RECONNECT_DELAY)?.unwrap_or(i64::from(DEFAULT_RECONNECT_DELAY));
    if !(1..=86_400).contains(&delay) {
        return Err(invalid(
            RECONNECT_DELAY,
            format!("must be positive; got {delay}"),
        ));
    }
    let keep = int(KEEP_ALIVE_TMO)?.unwrap_or(i64::from(DEFAULT_KEEP_ALIVE_TMO));
    if !(0..=86_400).contains(&keep) {
        return Err(invalid(
            KEEP_ALIVE_TMO,
            format!("must be non-negative; got {keep}"),
        ));
    }
    Ok((ctrl as i32, delay as u32, keep as u32))
}

impl NvmeTarget {
    /// Reads a volume context: `nqn` (else `fallback`), `nvmeAddress` (else `rdsAddress`),
    /// `nvmePort` (else 4420) and the timings. Every value is validated.
    pub fn from_context(
        context: &std::collections::HashMap<String, String>,
        fallback: impl FnOnce() -> Result<Nqn, Error>,
    ) -> Result<Self, Error> {
        use crate::domain::rds_keys::{NQN, NVME_ADDRESS, NVME_PORT, RDS_ADDRESS};
        let nqn = match context.get(NQN) {
            Some(raw) => Nqn::parse(raw, "volume_context[nqn]")?,
            None => fallback()?,
        };
        let address = match (context.get(NVME_ADDRESS), context.get(RDS_ADDRESS)) {
            (Some(a), _) => Some(ip(a, "volume_context[nvmeAddress]")?),
            (None, Some(a)) => Some(ip(a, "volume_context[rdsAddress]")?),
            (None, None) => None,
        };
        let port = match context.get(NVME_PORT) {
            Some(p) => port(p, "volume_context[nvmePort]")?,
            None => DEFAULT_NVME_PORT,
        };
        let (ctrl_loss_tmo, reconnect_delay, keep_alive_tmo) =
            nvme_timings(|k| context.get(k).cloned())?;
        Ok(Self {
            nqn,
            address,
            port,
            ctrl_loss_tmo,
            reconnect_delay,
            keep_alive_tmo,
        })
    }
}

mod as_string {
    use super::Nqn;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nqn: &Nqn, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(nqn.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Nqn, D::Error> {
        let raw = String::deserialize(d)?;
        Nqn::parse(&raw, "nqn").map_err(serde::de::Error::custom)
    }
}

macro_rules! displayed {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    )*};
}
displayed!(Slot, RosPath, NqnPrefix, Nqn, MadeWith);

/// Hostile values every validator above must refuse: RouterOS and shell metacharacters,
/// quotes, newlines, NUL, look-alike unicode, huge strings. Shared by the tests.
pub fn hostile_corpus() -> Vec<String> {
    let mut v: Vec<String> = [
        "a;b",
        "a[find]",
        "a]b",
        "x\"y",
        "x'y",
        "a\nb",
        "a\rb",
        "$x",
        "`id`",
        "a\\b",
        "a\0b",
        "a b",
        "pvc-1;/system reboot",
        "pvc-1\n/disk remove 0",
        "pvc-1 nvme-tcp-export=no",
        "pvc‐1",
        "pvc–1",
        "ｐvc-1",
        "pvc-1\u{200b}",
        "pvc-\u{0430}",
        "{a}",
        "a|b",
        "a&b",
        "a>b",
        "a<b",
        "a*b",
        "a?b",
        "~",
        "=",
        "a=b",
        "/../etc",
        "..",
        ".",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(10_000));
    v.push(format!("/storage-pool/{}", "b".repeat(10_000)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_paths_and_nqns_accept_the_go_drivers_names() {
        let slot = Slot::parse("pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8", "name").unwrap();
        let dir = RosPath::parse(DEFAULT_VOLUME_PATH, "volumePath").unwrap();
        assert_eq!(
            dir.image(&slot).unwrap().as_str(),
            "/storage-pool/metal-csi/pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8.img"
        );
        assert_eq!(dir.mount_point(), "storage-pool");
        assert_eq!(
            NqnPrefix::default().nqn(&slot).unwrap().as_str(),
            "nqn.2000-02.com.mikrotik:pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8"
        );
        let upper = Slot::parse("PVC-ABC", "name").unwrap();
        assert_eq!(
            NqnPrefix::default().nqn(&upper).unwrap().as_str(),
            "nqn.2000-02.com.mikrotik:pvc-abc",
            "lowercased, as the Go driver does"
        );
        assert!(NqnPrefix::default().owns(&NqnPrefix::default().nqn(&slot).unwrap()));
        let foreign = Nqn::parse("nqn.2014-08.org.nvmexpress:uuid:1234", "nqn").unwrap();
        assert!(!NqnPrefix::default().owns(&foreign));
        let lookalike = Nqn::parse("nqn.2000-02.com.mikrotikx:pvc-1", "nqn").unwrap();
        assert!(!NqnPrefix::default().owns(&lookalike));
    }

    #[test]
    fn every_hostile_value_is_refused_by_every_validator() {
        for bad in hostile_corpus() {
            assert!(Slot::parse(&bad, "f").is_err(), "slot {bad:?}");
            assert!(
                RosPath::parse(&format!("/storage-pool/{bad}"), "f").is_err(),
                "path {bad:?}"
            );
            assert!(
                Nqn::parse(&format!("nqn.2000-02.com.mikrotik:{bad}"), "f").is_err(),
                "nqn {bad:?}"
            );
            assert!(NqnPrefix::parse(&bad, "f").is_err(), "prefix {bad:?}");
            assert!(port(&bad, "f").is_err(), "port {bad:?}");
            assert!(ip(&bad, "f").is_err(), "ip {bad:?}");
            assert!(host(&bad, "f").is_err(), "host {bad:?}");
        }
    }

    /// `nvmePort` as the Go driver's `Sscanf("%d")` reads it. Catches a value the Go driver
    /// provisioned with (as its default port) being refused.
    #[test]
    fn nvme_ports_are_read_as_the_go_driver_reads_them() {
        let p = |raw| leading_port(raw, "nvmePort");
        assert_eq!(p("4420").unwrap(), Some(4420));
        assert_eq!(p(" 4421").unwrap(), Some(4421));
        assert_eq!(p("+4422").unwrap(), Some(4422));
        assert_eq!(p("4423abc").unwrap(), Some(4423));
        for none in ["", " ", "abc", "a;b", "-", "99999999999999999999"] {
            assert_eq!(p(none).unwrap(), None, "{none:?}");
        }
        for bad in ["0", "-1", "65536", "70000"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    /// `rdsAddress` takes what the Go driver's StorageClasses hold (it only echoes it): an IP
    /// address or a host name. Catches a host name refused.
    #[test]
    fn hosts_are_ip_addresses_or_host_names() {
        for good in [
            "10.42.68.1",
            "fd00::1",
            "rds",
            "rds.storage.example.com",
            "rds-1.lan",
        ] {
            assert!(host(good, "f").is_ok(), "{good:?}");
        }
        assert_eq!(host("fd00:0::1", "f").unwrap(), "fd00::1");
        for bad in [
            "-rds",
            "rds..lan",
            "rds.",
            "rds_1",
            "10.42.68.1:22",
            "http://rds",
        ] {
            assert!(host(bad, "f").is_err(), "{bad:?}");
        }
    }

    /// A disk's comment holds where it was copied from and what it was created for, in
    /// either order of writing, and reads back exactly. Catches the digest lost from (or
    /// misread into) a provenance.
    #[test]
    fn records_round_trip() {
        let caps = [crate::domain::Capability::new(
            crate::domain::AccessMode::SingleNodeWriter,
            crate::domain::AccessType::Block,
        )
        .unwrap()];
        let params =
            std::collections::BTreeMap::from([("nvmePort".to_string(), "4420".to_string())]);
        let made = MadeWith::of(&params, &caps);
        assert_eq!(made.to_string().len(), 16);
        assert_ne!(made, MadeWith::of(&params, &[]), "capabilities count");
        let mut claim = params.clone();
        claim.insert("csi.storage.k8s.io/pvc/name".into(), "claim-1".into());
        assert_eq!(
            made,
            MadeWith::of(&claim, &caps),
            "the provisioner's keys do not"
        );
        let provenance = Provenance {
            source: Slot::parse("pvc-made-1-at-2", "s").unwrap(),
            at: 1_739_800_000,
        };
        for record in [
            Record {
                provenance: Some(provenance.clone()),
                made: Some(made.clone()),
            },
            Record {
                provenance: Some(provenance.clone()),
                made: None,
            },
            Record {
                provenance: None,
                made: Some(made.clone()),
            },
            Record::default(),
        ] {
            let text = record.to_string();
            assert!(
                text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{text}"
            );
            assert_eq!(Record::parse(&text), record, "{text}");
        }
        assert!(Record::parse("an operator's note").is_empty());
        assert!(Record::parse("made-xyz").is_empty());
    }

    #[test]
    fn provenance_round_trips_and_refuses_anything_else() {
        let p = Provenance {
            source: Slot::parse("pvc-1-at-2", "s").unwrap(),
            at: 1_739_800_000,
        };
        let text = p.to_string();
        assert_eq!(text, "source-pvc-1-at-2-at-1739800000");
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_eq!(Provenance::parse(&text), Some(p));
        for other in [
            "",
            "an operator's note",
            "source-",
            "source-pvc-1",
            "source-pvc-1-at-",
            "source-pvc-1-at-x1",
            "source-pvc;1-at-5",
            "pvc-1-at-5",
        ] {
            assert_eq!(Provenance::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn sizes_round_up_to_what_routeros_accepts() {
        let s = |r, l| RosSize::for_request(r, l);
        assert_eq!(s(0, 0).unwrap().to_string(), "1G", "at least 1 GiB");
        assert_eq!(s(50 << 30, 0).unwrap().to_string(), "50G");
        assert_eq!(s(1 << 40, 0).unwrap().to_string(), "1T");
        assert_eq!(s((3 << 30) / 2, 0).unwrap().to_string(), "1536M");
        let odd = s((5 << 30) + 1, 0).unwrap();
        assert_eq!(odd.to_string(), "5121M");
        assert!(odd.bytes() > (5 << 30), "never smaller than asked");
        assert!(s(17 << 40, 0).is_err());
        assert!(s(2 << 30, 1 << 30).is_err(), "above the limit");
        assert!(
            s(1, 512 << 20).is_err(),
            "the 1 GiB floor is above the limit"
        );
    }
}
