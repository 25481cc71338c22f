//! RouterOS CLI output, parsed into values. Pure functions: text in, typed entries or a typed
//! error out, no I/O, never a panic (property-tested with random input).
//!
//! `print detail` output looks like this (RouterOS 7):
//!
//! ```text
//! Flags: X - disabled; B - block-device; M - mounted
//!  0 B  type=file slot="pvc-1" slot-default="" parent="" fs=-
//!       model="/storage-pool/metal-csi/pvc-1.img" size=10 737 418 240
//!       nvme-tcp-export=yes nvme-tcp-server-port=4420
//!       nvme-tcp-server-nqn="nqn.2000-02.com.mikrotik:pvc-1"
//!       file-path=/storage-pool/metal-csi/pvc-1.img file-size=10.0GiB
//! ```
//!
//! A `Flags:` header (and its wrapped lines), numbered entries with flag letters, `key=value`
//! and `key="quoted value"` pairs, continuation lines, numbers grouped by spaces
//! (`7 681 574 174 720`), human sizes (`50.0GiB`), keys with a space (`file size=` in `/file
//! print`), `;;;` comments and free text. Unknown keys are kept and ignored by callers.

use std::collections::BTreeMap;

/// One entry of a `print detail` listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub number: Option<u32>,
    /// Flag letters printed after the number (`X` disabled, `B`, `M`, ...).
    pub flags: String,
    pub comment: Option<String>,
    pub fields: BTreeMap<String, String>,
}

impl Entry {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unexpected RouterOS output (line {line}): {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// How RouterOS said a command failed. It says so in text, often with exit status 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `no such item`: what the command names does not exist.
    NoSuchItem(String),
    /// `not enough space`.
    NoSpace(String),
    /// The command was refused as written: `input does not match any value`, `bad command
    /// name`, `syntax error`, `expected end of command`, `invalid value`, ...
    Rejected(String),
    /// Any other `failure: ...` line.
    Other(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Self::NoSuchItem(m) | Self::NoSpace(m) | Self::Rejected(m) | Self::Other(m) => m,
        }
    }
}

/// Finds RouterOS's failure text in a command's output (stdout and stderr together).
pub fn failure(output: &str) -> Option<Failure> {
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        let text = line.to_string();
        if lower.contains("no such item") {
            return Some(Failure::NoSuchItem(text));
        }
        if lower.contains("not enough space") {
            return Some(Failure::NoSpace(text));
        }
        const REJECTED: [&str; 8] = [
            "input does not match any value",
            "bad command name",
            "syntax error",
            "expected end of command",
            "invalid value",
            "ambiguous value",
            "missing value",
            "expected command name",
        ];
        if REJECTED.iter().any(|r| lower.contains(r)) {
            return Some(Failure::Rejected(text));
        }
        if lower.starts_with("failure:") || lower.starts_with("error:") {
            return Some(Failure::Other(text));
        }
    }
    None
}

/// Parses a `print detail` listing. An output that is only a `Flags:` header (or nothing) is
/// an empty list: what `where` prints when nothing matches.
///
/// RouterOS wraps long values across lines, cutting them anywhere; [`join`] decides whether
/// a continuation line carries the rest of a value or new pairs.
pub fn print_detail(text: &str) -> Result<Vec<Entry>, ParseError> {
    let mut entries: Vec<Entry> = Vec::new();
    // The entry being read, its first line number, and its logical text so far.
    let mut current: Option<(Entry, usize, String)> = None;
    let mut in_header = false;
    let finish = |current: Option<(Entry, usize, String)>, entries: &mut Vec<Entry>| {
        if let Some((mut entry, line, logical)) = current {
            fields(&logical, &mut entry, line)?;
            entries.push(entry);
        }
        Ok::<(), ParseError>(())
    };
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        if indent == 0 && (trimmed.starts_with("Flags:") || trimmed.starts_with("Columns:")) {
            in_header = true;
            continue;
        }
        if let Some((number, rest)) = numbered(line) {
            in_header = false;
            finish(current.take(), &mut entries)?;
            let mut entry = Entry {
                number: Some(number),
                ..Entry::default()
            };
            let rest = take_flags(rest, &mut entry.flags);
            let logical = match rest.trim().strip_prefix(";;;") {
                Some(comment) => {
                    entry.comment = Some(comment.trim().to_string());
                    String::new()
                }
                None => rest.trim().to_string(),
            };
            current = Some((entry, line_no, logical));
            continue;
        }
        if indent == 0 {
            in_header = false;
            if !trimmed.contains('=') && !trimmed.starts_with(";;;") {
                // Free text outside an entry (a wrapped legend, a note): nothing to keep.
                continue;
            }
            finish(current.take(), &mut entries)?;
            current = Some((Entry::default(), line_no, trimmed.trim_end().to_string()));
            continue;
        }
        if in_header {
            continue;
        }
        match current.as_mut() {
            Some((entry, _, logical)) => {
                let piece = trimmed.trim_end();
                if let Some(comment) = piece.strip_prefix(";;;") {
                    entry.comment = Some(comment.trim().to_string());
                } else {
                    join(logical, piece);
                }
            }
            None => {
                return Err(ParseError {
                    line: line_no,
                    reason: format!("an indented line before any entry: {:?}", clip(trimmed)),
                })
            }
        }
    }
    finish(current, &mut entries)?;
    Ok(entries)
}

/// Appends a continuation line to the entry's text so far. RouterOS cuts a value too long for
/// its line anywhere (before a `-`, after a `/`, inside a word or between the groups of a
/// byte count) and prints the rest on the next line, so a continuation line is the rest of
/// the value before it when a quote is still open, or when its first word is no `key=`
/// pair: it is joined without a space (between byte-count groups, with one). A line whose
/// first word is a pair starts new pairs, and so does a lowercase word right before a pair:
/// the first half of a key with a space (`file size=`), which a cut never leaves, since
/// RouterOS gives the pieces of a cut value lines of their own.
fn join(logical: &mut String, piece: &str) {
    let mut words = piece.split_whitespace();
    let first = words.next().unwrap_or_default();
    let is_pair = |w: &str| w.find('=').is_some_and(|i| i > 0);
    let new_pairs = is_pair(first)
        || (first.bytes().all(|b| b.is_ascii_lowercase()) && words.next().is_some_and(is_pair));
    if quote_open(logical) {
        logical.push_str(piece);
    } else if !new_pairs && !piece.starts_with('=') {
        if ends_in_byte_groups(logical) && is_digit_group(first, 3) {
            logical.push(' ');
        }
        logical.push_str(piece);
    } else {
        if !logical.is_empty() {
            logical.push(' ');
        }
        logical.push_str(piece);
    }
}

/// Whether `text` ends with an unquoted value of digits grouped by spaces (`size=53 687`).
fn ends_in_byte_groups(text: &str) -> bool {
    let Some((_, value)) = text.rsplit_once('=') else {
        return false;
    };
    let mut groups = value.split(' ');
    groups.next().is_some_and(|g| is_digit_group(g, 1)) && groups.all(|g| is_digit_group(g, 3))
}

/// Whether `text` ends inside a double-quoted value (escaped quotes do not count).
fn quote_open(text: &str) -> bool {
    let mut open = false;
    let mut escaped = false;
    for b in text.bytes() {
        match (escaped, b) {
            (true, _) => escaped = false,
            (false, b'\\') if open => escaped = true,
            (false, b'"') => open = !open,
            _ => {}
        }
    }
    open
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// ` 12 XB  type=...` → (12, "XB  type=..."): a number at the start of a line, indented by at
/// most four spaces (continuation lines are indented further).
fn numbered(line: &str) -> Option<(u32, &str)> {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 4 {
        return None;
    }
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 9 {
        return None;
    }
    let rest = &trimmed[digits..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some((trimmed[..digits].parse().ok()?, rest))
}

/// Flag letters right after an entry's number (`B`, `t`, `XBM`, `*`), before the first `key=`.
fn take_flags<'a>(rest: &'a str, flags: &mut String) -> &'a str {
    let mut rest = rest.trim_start();
    while let Some(word) = rest.split_whitespace().next() {
        if word.contains('=') || word.starts_with(";;;") {
            break;
        }
        if word.len() <= 8 && word.chars().all(|c| c.is_ascii_alphabetic() || c == '*') {
            flags.push_str(word);
            rest = rest[word.len()..].trim_start();
        } else {
            break;
        }
    }
    rest
}

/// Reads the `key=value` pairs of one line into `entry`.
fn fields(line: &str, entry: &mut Entry, line_no: usize) -> Result<(), ParseError> {
    let err = |reason: String| ParseError {
        line: line_no,
        reason,
    };
    let text = line.trim();
    if let Some(comment) = text.strip_prefix(";;;") {
        entry.comment = Some(comment.trim().to_string());
        return Ok(());
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut bare: Vec<&str> = Vec::new();
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let word = &text[start..i];
        if i >= bytes.len() || bytes[i] != b'=' {
            // A word without '=': free text, or the first half of a key with a space in it.
            bare.push(word);
            continue;
        }
        if word.is_empty() {
            return Err(err(format!("'=' without a key in {:?}", clip(text))));
        }
        i += 1;
        let value = if i < bytes.len() && bytes[i] == b'"' {
            let (value, end) = quoted(text, i)
                .ok_or_else(|| err(format!("an unterminated quoted value in {:?}", clip(text))))?;
            i = end;
            value
        } else {
            let vstart = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = text[vstart..i].to_string();
            // Numbers grouped by spaces: `7 681 574 174 720`.
            if is_digit_group(&value, 1) {
                loop {
                    let mut j = i;
                    while j < bytes.len() && bytes[j] == b' ' {
                        j += 1;
                    }
                    let group_end = j + 3;
                    let is_group = j > i
                        && group_end <= bytes.len()
                        && bytes[j..group_end].iter().all(u8::is_ascii_digit)
                        && (group_end == bytes.len() || bytes[group_end].is_ascii_whitespace());
                    if !is_group {
                        break;
                    }
                    value.push(' ');
                    value.push_str(&text[j..group_end]);
                    i = group_end;
                }
            }
            value
        };
        // "file size=10.0GiB": lowercase words right before a key belong to it.
        let key = match bare.last() {
            Some(w) if w.bytes().all(|b| b.is_ascii_lowercase()) && !w.is_empty() => {
                format!("{w} {word}")
            }
            _ => word.to_string(),
        };
        bare.clear();
        entry.fields.insert(key, value);
    }
    Ok(())
}

fn is_digit_group(s: &str, min: usize) -> bool {
    (min..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// A double-quoted value starting at `start` (the quote): its text with `\"`, `\\` and `\xx`
/// escapes undone, and the index after the closing quote.
fn quoted(text: &str, start: usize) -> Option<(String, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Some((String::from_utf8_lossy(&out).into_owned(), i + 1)),
            b'\\' if i + 1 < bytes.len() => {
                let next = bytes[i + 1];
                let hex = text
                    .get(i + 1..i + 3)
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(byte) if !matches!(next, b'"' | b'\\') => {
                        out.push(byte);
                        i += 3;
                    }
                    _ => {
                        out.push(next);
                        i += 2;
                    }
                }
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    None
}

/// A RouterOS size: raw bytes, possibly grouped by spaces (`53 687 091 200`), or a number with
/// a unit (`50.0GiB`, `1024.0MiB`, `512.0KiB`, `5.5TiB`, `50GB`, `10G`). Decimal units are
/// read as binary ones, as RouterOS prints binary sizes.
pub fn size(raw: &str) -> Option<u64> {
    let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.is_empty() {
        return None;
    }
    if compact.bytes().all(|b| b.is_ascii_digit()) {
        return compact.parse().ok();
    }
    let split = compact
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(compact.len());
    let (number, unit) = compact.split_at(split);
    let number: f64 = number.parse().ok()?;
    let shift = match unit {
        "B" => 0,
        "K" | "KB" | "KiB" | "k" | "kB" | "kiB" => 10,
        "M" | "MB" | "MiB" => 20,
        "G" | "GB" | "GiB" => 30,
        "T" | "TB" | "TiB" => 40,
        "P" | "PB" | "PiB" => 50,
        _ => return None,
    };
    let bytes = number * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then(|| bytes.round() as u64)
}

/// A file disk as `/disk print detail` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub slot: String,
    pub kind: String,
    pub file_path: Option<String>,
    /// Exact bytes from `size=`, else from the rounded `file-size=`.
    pub size: Option<u64>,
    pub nvme_export: bool,
    pub nvme_port: Option<u16>,
    pub nqn: Option<String>,
    pub disabled: bool,
    /// The `;;; comment` RouterOS prints above the entry's properties.
    pub comment: Option<String>,
}

impl Disk {
    pub fn from_entry(entry: &Entry) -> Option<Disk> {
        let slot = entry.get("slot")?.to_string();
        Some(Disk {
            slot,
            kind: entry.get("type").unwrap_or_default().to_string(),
            file_path: entry.get("file-path").map(str::to_string),
            size: entry
                .get("size")
                .and_then(size)
                .or_else(|| entry.get("file-size").and_then(size)),
            nvme_export: entry.get("nvme-tcp-export") == Some("yes"),
            nvme_port: entry
                .get("nvme-tcp-server-port")
                .and_then(|p| p.parse().ok()),
            nqn: entry.get("nvme-tcp-server-nqn").map(str::to_string),
            disabled: entry.flags.contains('X'),
            comment: entry.comment.clone(),
        })
    }
}

/// Every disk of a `/disk print detail` listing (entries without a slot are skipped).
pub fn disks(text: &str) -> Result<Vec<Disk>, ParseError> {
    Ok(print_detail(text)?
        .iter()
        .filter_map(Disk::from_entry)
        .collect())
}

/// `(total, free)` bytes of the storage pool from `/disk print detail where mount-point=...`.
pub fn capacity(text: &str) -> Result<Option<(u64, u64)>, ParseError> {
    Ok(print_detail(text)?.iter().find_map(|e| {
        let total = e.get("size").and_then(size)?;
        let free = e.get("free").and_then(size)?;
        Some((total, free))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The Go driver's test sample of one disk, described there as real RouterOS output.
    const ONE_DISK: &str = "type=file slot=\"pvc-test-123\" slot-default=\"\" parent=\"\" fs=-
               model=\"/storage-pool/test.img\"
               size=53 687 091 200 mount-filesystem=yes mount-read-only=no
               compress=no sector-size=512 raid-master=none
               nvme-tcp-export=yes nvme-tcp-server-port=4420
               nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-test-123\"
               nvme-tcp-server-allow-host-name=\"\" iscsi-export=no
               nfs-sharing=no smb-sharing=no media-sharing=no
               media-interface=none swap=no
               file-path=/storage-pool/test.img
               file-size=50.0GiB file-offset=0
";

    const LISTING: &str = "Flags: X - disabled; B - block-device; M - mounted
 0 B  type=file slot=\"pvc-test-1\" size=53 687 091 200
               file-path=/storage-pool/test1.img file-size=50.0GiB
               nvme-tcp-export=yes nvme-tcp-server-port=4420
               nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-test-1\"

 1 XB ;;; kept for later
      type=file slot=\"pvc-test-2\" size=107 374 182 400
               file-path=/storage-pool/test2.img file-size=100.0GiB
               nvme-tcp-export=no
";

    #[test]
    fn one_disk_in_the_go_drivers_sample() {
        let d = disks(ONE_DISK).unwrap();
        assert_eq!(d.len(), 1);
        let d = &d[0];
        assert_eq!(d.slot, "pvc-test-123");
        assert_eq!(d.kind, "file");
        assert_eq!(d.file_path.as_deref(), Some("/storage-pool/test.img"));
        assert_eq!(d.size, Some(53_687_091_200));
        assert!(d.nvme_export);
        assert_eq!(d.nvme_port, Some(4420));
        assert_eq!(
            d.nqn.as_deref(),
            Some("nqn.2000-02.com.mikrotik:pvc-test-123")
        );
        let e = &print_detail(ONE_DISK).unwrap()[0];
        assert_eq!(e.get("slot-default"), Some(""));
        assert_eq!(e.get("model"), Some("/storage-pool/test.img"));
        assert_eq!(e.get("sector-size"), Some("512"));
    }

    #[test]
    fn a_listing_with_header_flags_comments_and_continuations() {
        let entries = print_detail(LISTING).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].number, entries[0].flags.as_str()),
            (Some(0), "B")
        );
        assert_eq!(
            (entries[1].number, entries[1].flags.as_str()),
            (Some(1), "XB")
        );
        assert_eq!(entries[1].comment.as_deref(), Some("kept for later"));
        let d = disks(LISTING).unwrap();
        assert_eq!(d[1].slot, "pvc-test-2");
        assert_eq!(d[1].size, Some(107_374_182_400));
        assert!(d[1].disabled && !d[1].nvme_export);
    }

    /// RouterOS 7's layout at 78 columns: a legend wrapped over several lines, flag letters
    /// in columns, long values cut before a '-' onto the next line, quoted ones included.
    const WRAPPED: &str = "Flags: X - DISABLED; A - ACQUIRED, E - EMPTY, B - BLOCK-DEVICE;\r
M - MOUNTED, F - FORMATTING, S - SWAP-ENABLED; p - PARTITION;\r
f - RAID-MEMBER-FAILED, r - RAID-MEMBER; c - ENCRYPTED;\r
g - GUID-PARTITION-TABLE; t - NVME-TCP-EXPORT; i - ISCSI-EXPORT;\r
s - SMB-EXPORT, n - NFS-EXPORT;\r
 0  B     t    type=file slot=\"pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f\"\r
               slot-default=\"\" parent=\"\" fs=-\r
               model=\"/storage-pool/metal-csi/pvc-ccdecfad-a8bf-572e-9120\r
               -464c4d99f12f.img\"\r
               size=10 737 418 240 mount-filesystem=yes mount-read-only=no\r
               nvme-tcp-export=yes nvme-tcp-server-port=4420\r
               nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-ccdecfad-a8bf\r
               -572e-9120-464c4d99f12f\"\r
               file-path=/storage-pool/metal-csi/pvc-ccdecfad-a8bf-572e-9120\r
               -464c4d99f12f.img\r
               file-size=10.0GiB file-offset=0\r
\r
";

    #[test]
    fn wrapped_values_and_lowercase_flags() {
        let entries = print_detail(WRAPPED).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].flags, "Bt");
        assert_eq!(entries[0].get("slot-default"), Some(""));
        let d = Disk::from_entry(&entries[0]).unwrap();
        assert_eq!(d.slot, "pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f");
        assert_eq!(
            d.file_path.as_deref(),
            Some("/storage-pool/metal-csi/pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f.img")
        );
        assert_eq!(
            d.nqn.as_deref(),
            Some("nqn.2000-02.com.mikrotik:pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f")
        );
        assert_eq!(
            entries[0].get("model"),
            Some("/storage-pool/metal-csi/pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f.img")
        );
        assert_eq!(
            (d.size, d.nvme_port, d.nvme_export),
            (Some(10 << 30), Some(4420), true)
        );
    }

    /// The Go driver's recorded one-disk sample (`TestParseVolumeInfo`) with its long values
    /// lengthened to real ones and wrapped where no `-` is: inside a slot's digits, after a
    /// `/`, inside `.img`, and a byte count cut between its groups. The Go driver re-joins
    /// `file-path=` with `(\S+\s+\S+\.img)`; every value here must come back whole. Catches
    /// a continuation line that is not `-…` being read as new pairs (the value truncated,
    /// the rest dropped as free text).
    const WRAPPED_ANYWHERE: &str = "Flags: X - disabled; B - block-device; M - mounted\r
 0 B  type=file slot=\"pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8\" slot-default=\"\"\r
               parent=\"\" fs=-\r
               model=\"/storage-pool/metal-csi/pvc-0f923194-922a-5dd8-b376-c2c6ccb5\r
               6dd8.img\"\r
               size=53 687\r
               091 200 mount-filesystem=yes mount-read-only=no\r
               nvme-tcp-export=yes nvme-tcp-server-port=4420\r
               nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-0f923194-922a-5dd8-b3\r
               76-c2c6ccb56dd8\"\r
               file-path=/storage-pool/metal-csi/pvc-0f923194-922a-5dd8-b376-c2c6ccb56\r
               dd8.im\r
               g\r
               file-size=50.0GiB file-offset=0\r
\r
 1    type=file slot=\"pvc-test-2\" file-path=/storage-pool/kubernetes-volumes/\r
               pvc-test-2.img file-size=1.0GiB\r
";

    #[test]
    fn values_wrapped_anywhere_are_rejoined() {
        let d = disks(WRAPPED_ANYWHERE).unwrap();
        assert_eq!(d.len(), 2);
        let id = "pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8";
        assert_eq!(d[0].slot, id);
        assert_eq!(
            d[0].file_path.as_deref(),
            Some(format!("/storage-pool/metal-csi/{id}.img").as_str())
        );
        assert_eq!(
            d[0].nqn.as_deref(),
            Some(format!("nqn.2000-02.com.mikrotik:{id}").as_str())
        );
        assert_eq!(d[0].size, Some(53_687_091_200));
        assert_eq!((d[0].nvme_port, d[0].nvme_export), (Some(4420), true));
        let e = &print_detail(WRAPPED_ANYWHERE).unwrap()[0];
        assert_eq!(
            e.get("model"),
            Some(format!("/storage-pool/metal-csi/{id}.img").as_str())
        );
        assert_eq!(e.get("file-size"), Some("50.0GiB"));
        assert_eq!(e.get("parent"), Some(""));
        assert_eq!(
            d[1].file_path.as_deref(),
            Some("/storage-pool/kubernetes-volumes/pvc-test-2.img")
        );
        assert_eq!(d[1].size, Some(1 << 30));
    }

    #[test]
    fn nothing_after_the_header_is_an_empty_listing() {
        assert!(print_detail("Flags: X - disabled; B - block-device\n")
            .unwrap()
            .is_empty());
        assert!(
            print_detail("Flags: X - DISABLED, I - INVALID\n   B - BLOCK-DEVICE\n\n")
                .unwrap()
                .is_empty()
        );
        assert!(print_detail("").unwrap().is_empty());
    }

    #[test]
    fn capacity_and_file_listings() {
        let pool = "Flags: M - mounted\n 0 M  type=partition slot=\"storage-pool\" mount-point=\"storage-pool\" file-system=btrfs\n      size=7 949 127 950 336 free=5 963 595 964 416 use=25%\n";
        assert_eq!(
            capacity(pool).unwrap(),
            Some((7_949_127_950_336, 5_963_595_964_416))
        );
        let go_sample = "name=/storage-pool type=directory size=7 681 574 174 720\n               free=5 632 440 000 000 use=27%\n               creation-time=jan/01/2025 00:00:00\n";
        assert_eq!(
            capacity(go_sample).unwrap(),
            Some((7_681_574_174_720, 5_632_440_000_000))
        );
        let files = " 0   name=storage-pool/metal-csi type=directory\n     last-modified=2025-11-11 16:47:07\n\n 1   name=storage-pool/metal-csi/pvc-1.img\n     type=.img file size=10.0GiB last-modified=2025-11-11 14:32:41\n";
        let e = print_detail(files).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].get("file size").and_then(size), Some(10 << 30));
        assert_eq!(
            e[1].get("last-modified"),
            Some("2025-11-11"),
            "free text after a value is ignored"
        );
    }

    #[test]
    fn sizes() {
        for (raw, want) in [
            ("53 687 091 200", Some(53_687_091_200)),
            ("50.0GiB", Some(50 << 30)),
            ("1024.0MiB", Some(1 << 30)),
            ("5.5TiB", Some(11 << 39)),
            ("512.0KiB", Some(512 << 10)),
            ("50GB", Some(50 << 30)),
            ("10G", Some(10 << 30)),
            ("0", Some(0)),
            ("", None),
            ("-1", None),
            ("12XB", None),
            ("1e400GiB", None),
        ] {
            assert_eq!(size(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn quoted_values_keep_spaces_and_escapes() {
        let e = print_detail("slot=\"a b\" model=\"say \\\"hi\\\" \\\\ \\41\" x=1\n").unwrap();
        assert_eq!(e[0].get("slot"), Some("a b"));
        assert_eq!(e[0].get("model"), Some("say \"hi\" \\ A"));
        assert_eq!(e[0].get("x"), Some("1"));
    }

    #[test]
    fn malformed_output_is_an_error_not_a_guess() {
        assert!(print_detail("slot=\"unterminated\n").is_err());
        assert!(
            print_detail("      model=x\n").is_err(),
            "a continuation with no entry"
        );
        assert!(print_detail("type=file =oops\n").is_err());
    }

    #[test]
    fn failures_are_recognised_in_text() {
        assert!(matches!(
            failure("failure: not enough space\n"),
            Some(Failure::NoSpace(_))
        ));
        assert!(matches!(
            failure("no such item\n"),
            Some(Failure::NoSuchItem(_))
        ));
        assert!(matches!(
            failure("input does not match any value of file-size\n"),
            Some(Failure::Rejected(_))
        ));
        assert!(matches!(
            failure("bad command name dsk (line 1 column 2)"),
            Some(Failure::Rejected(_))
        ));
        assert!(matches!(
            failure("expected end of command (line 1 column 40)"),
            Some(Failure::Rejected(_))
        ));
        assert!(matches!(
            failure("failure: item with such slot already exists"),
            Some(Failure::Other(_))
        ));
        assert_eq!(failure(LISTING), None);
        assert_eq!(failure(""), None);
    }

    /// The case count a property runs: `PARSER_CASES` when set, else `default`.
    fn cases(default: u32) -> u32 {
        let raw = std::env::var("PARSER_CASES");
        match case_count(raw.as_deref().ok(), default) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        }
    }

    /// `PARSER_CASES` read strictly: a positive integer, or absent. A value that is neither
    /// is an error, so a typo cannot silently run the default count.
    fn case_count(raw: Option<&str>, default: u32) -> Result<u32, String> {
        let Some(raw) = raw else {
            return Ok(default);
        };
        match raw.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "PARSER_CASES={raw:?} is not a positive number of cases"
            )),
        }
    }

    /// Catches: `case_count` falling back to the default on a value it cannot read.
    #[test]
    fn an_unreadable_case_count_is_an_error() {
        assert_eq!(case_count(None, 7), Ok(7));
        assert_eq!(case_count(Some("250"), 7), Ok(250));
        for bad in ["garbage", "", "0", "-3", "1e5", "10 000"] {
            let err = case_count(Some(bad), 7).unwrap_err();
            assert!(err.contains("PARSER_CASES"), "{bad:?}: {err}");
        }
    }

    /// One token of a `print detail` entry and how RouterOS may cut it: never inside its
    /// `key=` (and opening quote) nor inside a number, and a byte count only between its
    /// groups, where the line break takes the place of the space.
    struct Token {
        text: String,
        /// The shortest first piece when the token is cut.
        unit: usize,
        grouped: bool,
    }

    fn pair(key: &str, value: &str, quoted: bool) -> Token {
        let text = if quoted {
            format!("{key}=\"{value}\"")
        } else {
            format!("{key}={value}")
        };
        let number = !quoted && !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        let unit = if number {
            text.len()
        } else {
            (key.len() + 2 + usize::from(quoted)).min(text.len())
        };
        Token {
            text,
            unit,
            grouped: false,
        }
    }

    fn bytes_pair(key: &str, n: u64) -> Token {
        let text = format!("{key}={}", group_thousands(n));
        let unit = text.find(' ').unwrap_or(text.len());
        Token {
            text,
            unit,
            grouped: true,
        }
    }

    /// A disk's properties in the order and quoting of the recorded `/disk print detail`
    /// output (the Go driver's `TestParseVolumeInfo`): slot, model and NQN quoted, file-path
    /// not, the exact size as grouped bytes, the rounded one as `file-size`.
    fn disk_tokens(d: &Disk) -> Vec<Token> {
        let path = d.file_path.as_deref().unwrap_or_default();
        let mut t = vec![
            pair("type", &d.kind, false),
            pair("slot", &d.slot, true),
            pair("slot-default", "", true),
            pair("parent", "", true),
            pair("fs", "-", false),
            pair("model", path, true),
            bytes_pair("size", d.size.unwrap_or_default()),
            pair("mount-filesystem", "yes", false),
            pair("mount-read-only", "no", false),
            pair("compress", "no", false),
            pair("sector-size", "512", false),
            pair("raid-master", "none", false),
            pair(
                "nvme-tcp-export",
                if d.nvme_export { "yes" } else { "no" },
                false,
            ),
        ];
        if let Some(port) = d.nvme_port {
            t.push(pair("nvme-tcp-server-port", &port.to_string(), false));
        }
        if let Some(nqn) = &d.nqn {
            t.push(pair("nvme-tcp-server-nqn", nqn, true));
        }
        t.extend([
            pair("nvme-tcp-server-allow-host-name", "", true),
            pair("iscsi-export", "no", false),
            pair("nfs-sharing", "no", false),
            pair("swap", "no", false),
            pair("file-path", path, false),
            pair("file-size", "50.0GiB", false),
            pair("file-offset", "0", false),
        ]);
        t
    }

    /// The pieces of a token longer than a line's `room`: cut before its last `-` that fits,
    /// at the margin if none does (as the recorded outputs wrap `model=`, `file-path=` and
    /// `nvme-tcp-server-nqn=`), never inside its unit; a byte count between groups.
    fn pieces(t: &Token, room: usize) -> Vec<String> {
        if t.grouped {
            let mut out: Vec<String> = vec![];
            let mut cur = String::new();
            for group in t.text.split(' ') {
                if !cur.is_empty() && cur.len() + 1 + group.len() > room {
                    out.push(std::mem::take(&mut cur));
                }
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(group);
            }
            out.push(cur);
            return out;
        }
        let mut out = vec![];
        let mut rest = t.text.as_str();
        let mut lo = t.unit;
        while rest.len() > room && lo < rest.len() {
            let at = (lo..=room)
                .rev()
                .find(|&i| rest.as_bytes()[i] == b'-')
                .unwrap_or(room.max(lo));
            out.push(rest[..at].to_string());
            rest = &rest[at..];
            lo = 1;
        }
        out.push(rest.to_string());
        out
    }

    /// One entry as RouterOS prints it `width` columns wide: the right-aligned index, ten
    /// flag columns (`X` disabled, `B`, `t` exported), two spaces, then the tokens filled
    /// greedily; continuation lines are indented to the first token's column (15, or 16 from
    /// index 100 on); a cut token has its lines to itself. A comment goes on the first line
    /// as `;;; text`, the properties below it.
    fn entry(
        index: u32,
        index_width: usize,
        flags: [char; 3],
        comment: Option<&str>,
        tokens: &[Token],
        width: usize,
    ) -> Vec<String> {
        let [x, b, t] = flags;
        let prefix = format!("{index:>index_width$} {x}{b}     {t}    ");
        let indent = " ".repeat(prefix.len());
        let room = width.saturating_sub(indent.len()).max(1);
        let mut lines = vec![];
        let mut cur = prefix;
        if let Some(comment) = comment {
            cur.push_str(";;; ");
            cur.push_str(comment);
            lines.push(std::mem::replace(&mut cur, indent.clone()));
        }
        let mut has_content = false;
        for token in tokens {
            if has_content {
                if cur.len() + 1 + token.text.len() <= width {
                    cur.push(' ');
                    cur.push_str(&token.text);
                    continue;
                }
                lines.push(std::mem::replace(&mut cur, indent.clone()));
                has_content = false;
            }
            if token.text.len() <= room {
                cur.push_str(&token.text);
                has_content = true;
                continue;
            }
            for piece in pieces(token, room) {
                cur.push_str(&piece);
                lines.push(std::mem::replace(&mut cur, indent.clone()));
            }
        }
        if has_content {
            lines.push(cur);
        }
        lines
    }

    /// A `/disk print detail` listing: the legend, the pool's partition, then the disks,
    /// each entry followed by a blank line, `\r\n` line ends.
    fn listing(pool: (u64, u64), disks: &[Disk], first: u32, width: usize) -> String {
        let last = first + disks.len() as u32;
        let index_width = last.to_string().len().max(2);
        let mut lines: Vec<String> = WRAPPED.lines().take(5).map(str::to_string).collect();
        let pool_tokens = [
            pair("type", "partition", false),
            pair("slot", "storage-pool", true),
            pair("mount-point", "storage-pool", true),
            pair("file-system", "btrfs", false),
            bytes_pair("size", pool.0),
            bytes_pair("free", pool.1),
            pair("use", "25%", false),
        ];
        lines.extend(entry(
            first,
            index_width,
            [' ', 'B', ' '],
            None,
            &pool_tokens,
            width,
        ));
        lines.push(String::new());
        for (i, d) in disks.iter().enumerate() {
            let flags = [
                if d.disabled { 'X' } else { ' ' },
                'B',
                if d.nvme_export { 't' } else { ' ' },
            ];
            let index = first + 1 + i as u32;
            let tokens = disk_tokens(d);
            lines.extend(entry(
                index,
                index_width,
                flags,
                d.comment.as_deref(),
                &tokens,
                width,
            ));
            lines.push(String::new());
        }
        lines
            .iter()
            .map(|l| format!("{}\r\n", l.trim_end_matches('\r')))
            .collect()
    }

    /// A file disk as the driver makes or finds them: slots of volumes, snapshots and other
    /// names RouterOS allows, paths under the pool, any size, exported or not, a comment or
    /// none.
    fn listed_disk() -> impl Strategy<Value = Disk> {
        let slot = prop_oneof![
            "pvc-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "snap-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-at-[0-9a-f]{10}",
            "[A-Za-z0-9][A-Za-z0-9-]{0,127}",
        ];
        let dir = "/storage-pool(/[A-Za-z0-9._-]{1,24}){0,3}";
        let comment = proptest::option::of("[a-z0-9][a-z0-9-]{0,60}( [a-z0-9-]{1,20})?");
        (
            slot,
            dir,
            1u64..=16 << 40,
            any::<bool>(),
            proptest::option::of(1u16..),
            any::<bool>(),
            any::<bool>(),
            comment,
        )
            .prop_map(
                |(slot, dir, size, nvme_export, nvme_port, nqn, disabled, comment)| Disk {
                    kind: "file".into(),
                    file_path: Some(format!("{dir}/{slot}.img")),
                    size: Some(size),
                    nvme_export,
                    nvme_port,
                    nqn: nqn.then(|| format!("nqn.2000-02.com.mikrotik:{}", slot.to_lowercase())),
                    disabled,
                    comment,
                    slot,
                },
            )
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z-]{1,12}=[a-zA-Z0-9/._:-]{0,20}",
            "[a-z-]{1,12}=\"[ -~]{0,20}\"",
            "size=[0-9]{1,3}( [0-9]{3}){0,4}",
            "file-size=[0-9]{1,4}\\.[0-9](KiB|MiB|GiB|TiB)",
            Just("\n".to_string()),
            Just("\n      ".to_string()),
            Just("\n 0 XB ".to_string()),
            Just("Flags: X - disabled\n".to_string()),
            Just(";;; note".to_string()),
            Just("\"".to_string()),
            Just("=".to_string()),
            "[ -~]{0,8}",
            "\\PC{0,4}",
        ]
    }

    /// One entry's pairs, as RouterOS would hold them: a slot, then unquoted values (paths,
    /// NQNs, ports, words), quoted ones (which may be empty or hold `=`), and byte counts.
    fn entry_fields() -> impl Strategy<Value = Vec<(String, String, bool)>> {
        let value = prop_oneof![
            "[A-Za-z0-9/._:-]{1,90}".prop_map(|v| (v, false)),
            "[A-Za-z0-9/._:=-]{0,90}".prop_map(|v| (v, true)),
            (1u64..u64::MAX).prop_map(|n| (group_thousands(n), false)),
            "[0-9]{1,5}".prop_map(|v| (v, false)),
        ];
        proptest::collection::btree_map("[a-z][a-z-]{0,14}", value, 0..12).prop_map(|m| {
            m.into_iter()
                .filter(|(k, _)| k != "slot")
                .map(|(k, (v, q))| (k, v, q))
                .collect()
        })
    }

    fn group_thousands(n: u64) -> String {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(' ');
            }
            out.push(c);
        }
        out
    }

    /// Renders entries as `print detail` does: the index and flags, then `key=value` tokens
    /// filled up to `width` columns, a token longer than a whole line cut at the given
    /// places (anywhere, not only before `-`) with each piece on a line of its own.
    fn render(entries: &[Vec<(String, String, bool)>], width: usize, cuts: &[usize]) -> String {
        let indent = " ".repeat(6);
        let mut out = String::from("Flags: X - disabled; B - block-device\r\n");
        let mut next_cut = cuts.iter().cycle();
        for (i, fields) in entries.iter().enumerate() {
            let mut cur = format!("{i:>2} B  ");
            let mut has_content = false;
            for (k, v, quoted) in fields {
                let token = if *quoted {
                    format!("{k}=\"{v}\"")
                } else {
                    format!("{k}={v}")
                };
                let mut token = token.as_str();
                if has_content {
                    if cur.len() + 1 + token.len() <= width {
                        cur.push(' ');
                        cur.push_str(token);
                        continue;
                    }
                    out.push_str(&cur);
                    out.push_str("\r\n");
                    cur = indent.clone();
                    has_content = false;
                }
                let room = width - indent.len();
                let mut was_cut = false;
                // The first piece holds the key, its `=` and the value's first character (a
                // line has room for a key); later pieces are cut anywhere in the line's room,
                // never next to a space (RouterOS's padding would hide it).
                let mut lo = k.len() + 2;
                while token.len() > room {
                    let bytes = token.as_bytes();
                    let clean = |at: usize| bytes[at - 1] != b' ' && bytes[at] != b' ';
                    let at = lo + next_cut.next().unwrap() % (room + 1 - lo);
                    let at = (lo..=at)
                        .rev()
                        .chain(at + 1..token.len())
                        .find(|&a| clean(a))
                        .unwrap();
                    lo = 1;
                    cur.push_str(&token[..at]);
                    out.push_str(&cur);
                    out.push_str("\r\n");
                    cur = indent.clone();
                    token = &token[at..];
                    was_cut = true;
                }
                cur.push_str(token);
                if was_cut {
                    out.push_str(&cur);
                    out.push_str("\r\n");
                    cur = indent.clone();
                } else {
                    has_content = true;
                }
            }
            if has_content || !cur.trim().is_empty() {
                out.push_str(&cur);
                out.push_str("\r\n");
            }
            out.push_str("\r\n");
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(10_000)))]
        /// Whatever RouterOS wraps, and wherever, the parser reads back exactly the pairs
        /// that were printed. Catches a wrapped piece read as a new pair or as free text.
        #[test]
        fn print_detail_round_trips_wrapped_output(
            entries in proptest::collection::vec(entry_fields(), 1..4),
            width in 40usize..120,
            cuts in proptest::collection::vec(0usize..1000, 1..8),
        ) {
            let text = render(&entries, width, &cuts);
            let parsed = print_detail(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(parsed.len(), entries.len(), "{}", text);
            for (got, want) in parsed.iter().zip(&entries) {
                let want: BTreeMap<String, String> =
                    want.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(&got.fields, &want, "{}", text);
                prop_assert_eq!(got.flags.as_str(), "B");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(48)))]
        /// Records rendered as RouterOS prints `/disk print detail` and wrapped at every width
        /// from 20 to 200 columns read back as exactly those records: every disk's slot,
        /// path, size, export, port, NQN, disabled flag and comment, and the pool's capacity.
        /// Catches: a continuation line joined with a space (`join`), a field dropped by
        /// `Disk::from_entry`, an index of three digits read as a continuation.
        #[test]
        fn listings_read_back_their_records_at_every_width(
            total in 1u64..=1 << 50,
            used in 0u64..=100,
            disks_in in proptest::collection::vec(listed_disk(), 0..4),
            first in prop_oneof![0u32..3, 95u32..105, 995u32..1005],
        ) {
            let pool = (total, total / 100 * (100 - used));
            let mut want = vec![Disk {
                slot: "storage-pool".into(),
                kind: "partition".into(),
                file_path: None,
                size: Some(pool.0),
                nvme_export: false,
                nvme_port: None,
                nqn: None,
                disabled: false,
                comment: None,
            }];
            want.extend(disks_in.iter().cloned());
            for width in 20..=200 {
                let text = listing(pool, &disks_in, first, width);
                let got = disks(&text)
                    .map_err(|e| TestCaseError::fail(format!("width {width}: {e}\n{text}")))?;
                prop_assert_eq!(&got, &want, "width {}:\n{}", width, text);
                prop_assert_eq!(capacity(&text), Ok(Some(pool)), "width {}:\n{}", width, text);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(100_000)))]
        #[test]
        fn random_text_never_panics(text in "\\PC{0,300}") {
            let _ = print_detail(&text);
            let _ = disks(&text);
            let _ = capacity(&text);
            let _ = failure(&text);
            let _ = size(&text);
        }

        #[test]
        fn routeros_shaped_noise_never_panics(tokens in proptest::collection::vec(token(), 0..40)) {
            let text = tokens.join(" ");
            let _ = print_detail(&text);
            let _ = disks(&text);
            let _ = capacity(&text);
        }
    }
}
