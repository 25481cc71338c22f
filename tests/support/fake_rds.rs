//! A fake MikroTik ROSE Data Server (RouterOS 7) for tests: a real SSH server on loopback that
//! runs each "exec" request as one RouterOS CLI command against an in-memory model of disks and
//! files, with a command log, concurrency counters and fault injection. The driver under test
//! talks to it exactly as it talks to the real RDS (public-key auth, one session per command).
//!
//! Include it with `#[path = "support/fake_rds.rs"] mod fake_rds;` (adjust the path).
//!
//! It owns its model; nothing outside it mutates the model except through [`FakeRds`]'s
//! helpers, which follow the same rules as the commands.
//!
//! # Commands understood
//!
//! The ones the Go driver sends (see the Go-driver facts, section 1), parsed properly: menu path
//! (`/disk add` or `/disk/add`), `key=value` arguments with unquoted or double-quoted values
//! (the escapes of RouterOS's scripting manual decoded), `[find slot=X]` /
//! `[find where name="X"]`, `where` with `=`, `!=` and `~` (regular expression, as RouterOS:
//! POSIX, so `a|b` alternates, but `{}` bounds and an empty `()` are refused) joined by
//! optional `and`.
//!
//! | command | effect |
//! | --- | --- |
//! | `/disk add type=file file-path=P file-size=S slot=X [nvme-tcp-export=yes nvme-tcp-server-port=N nvme-tcp-server-nqn=Q]` | new disk and its backing file `P` (consumes `S` bytes) |
//! | `/disk add type=file copy-from=[find slot=Y] file-path=P slot=X [file-size=S]` | copy of `Y`'s file (size and content); `S` may not be smaller |
//! | `/disk print detail [where ...]` | the pool partition and the file disks |
//! | `/disk set [find slot=X] file-size=S` | grows the backing file (shrinking is refused) |
//! | `/disk set [find slot=X] comment=C` | sets the disk's comment (`comment=C` on `/disk add` too) |
//! | `/disk remove [find slot=X]` | removes the disk, **not** its file |
//! | `/file print detail [where ...]` | the mount point, directories and files |
//! | `/disk monitor-traffic <slot> once` | one traffic sample of the pool's slot or a disk's ([`Traffic`]); an unknown slot: `no such item`; without `once` it never ends |
//! | `/file remove [find name="P"]` | removes a file (not while a disk uses it) and frees its space |
//!
//! Sizes: plain bytes or an integer with `K`, `M`, `G`, `T` (binary units, as the Go driver's
//! `formatBytes` writes them). A `file-path` must lie under the pool's mount point; missing
//! parent directories are created.
//!
//! # As strict as RouterOS's command line
//!
//! RouterOS ends a command at `;` or a line break, substitutes `$name`, `$(...)` and `$[...]`
//! in unquoted and double-quoted values alike, runs `[...]` as a command substitution, and
//! reads `(`, `{` and `"` inside an unquoted value as an expression, a scope and a string. The
//! driver sends one plain command per session and no `[...]` but `[find ...]`, so each of
//! these is a **violation**: the fake answers `fake RouterOS refuses WHAT (line 1 column N)`,
//! runs nothing of the line, and records it ([`FakeRds::violations`]); dropping the fake with a
//! violation recorded fails the test ([`FakeRds::take_violations`] clears them for a test that
//! sends one on purpose). A `\` outside a string and a `]` that closes nothing are syntax
//! errors, as in RouterOS.
//!
//! # Answers
//!
//! Everything is written to the channel's stdout with `\r\n` line ends, then exit-status, EOF
//! and close. Exit status is 0 for every answer, errors included (fault injection can send any
//! status). Error texts (each followed by `\r\n`):
//!
//! | situation | text |
//! | --- | --- |
//! | unknown menu or command word | `bad command name WORD (line 1 column N)` |
//! | unknown argument, stray word | `expected end of command (line 1 column N)` |
//! | unterminated quote or bracket, `\` outside a string | `syntax error (line 1 column N)` |
//! | a second command, a substitution (see above) | `fake RouterOS refuses WHAT (line 1 column N)` |
//! | bad value (size, yes/no, port, type) | `input does not match any value of ARG` |
//! | `/disk add` with a slot in use | `failure: item with such slot already exists` |
//! | not enough free space (add, copy, grow) | `failure: not enough space` |
//! | `copy-from` finds nothing | `failure: no such item` |
//! | copy smaller than its source | `failure: file-size is smaller than source` |
//! | `file-path` already exists (add with `file-size`, or copy) | `failure: file already exists` |
//! | `file-path` outside the mount point | `failure: invalid file-path` |
//! | no `file-path` / no size and no existing file | `failure: file-path not specified` / `failure: file-size not specified` |
//! | backing file used by another disk | `failure: file is in use` |
//! | `/disk set` finds nothing | `failure: no such item` |
//! | `/disk set` to a smaller size | `failure: shrinking not supported` |
//! | `/disk remove` finds nothing | `no such item` |
//! | `/file remove` of a file a disk uses | `failure: file is in use` |
//! | `/file remove` finds nothing | (empty output) |
//!
//! `/disk add` without `file-size` on an existing, unused file adopts the file, as RouterOS
//! does for an image file already on the pool.
//!
//! # `print detail` format
//!
//! Modelled on captured RouterOS 7 output: a `Flags:` legend for `/disk` (its groups wrapped
//! onto more lines; `/file` has none), then per entry the right-aligned index, one column per
//! flag group, two spaces and `key=value` tokens, continuation lines indented to the first
//! token's column (15 for `/disk`, 5 for `/file`, one more from the 100th entry on), a blank line
//! after every entry. Lines are filled greedily up to [`LINE_WIDTH`] columns; a token longer
//! than a whole line gets lines of its own: it is cut before its last `-` that fits (at the
//! margin if it has none), the rest continues on the next line, and the following token starts
//! a new line. So a long `file-path=` or `nvme-tcp-server-nqn="..."` arrives in two pieces that
//! must be joined without a space (the Go driver's `file-path=(\S+\s+\S+\.img)` fallback is for
//! exactly this). Checked against the Go driver's `TestParseVolumeInfo` sample (captured from
//! hardware, values shortened by hand): every line break there that no shortened value moved
//! falls where these rules put it, and the 78-column limit is the one that sample implies.
//! The legend's exact words on a ROSE build are not known; its ten groups give the captured
//! key column 15.
//! Byte counts are grouped in threes by spaces (`size=53 687 091 200`); human sizes have one
//! decimal in the largest binary unit holding at least 2 of it (`50.0GiB`, `1024.0MiB`).
//! A `where` that matches nothing prints only the legend for `/disk` and nothing for `/file`.
//! A disk with a comment prints it as RouterOS does, right after the flag columns of the entry's
//! first line (`;;; text`), its properties starting on the next line; `where comment=...`
//! matches it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use russh::keys::PublicKey;

/// The pool size of the RDS the Go driver was tested on.
pub const DEFAULT_POOL_TOTAL: u64 = 7_949_127_950_336;
/// Free space at start (25% used, as the Go mock's capacity answer).
pub const DEFAULT_POOL_FREE: u64 = 5_963_595_964_416;
/// The pool's mount point (and slot).
pub const DEFAULT_MOUNT_POINT: &str = "storage-pool";
/// The Go driver's default volume directory.
pub const GO_BASE_PATH: &str = "/storage-pool/metal-csi";
/// The Go driver's hard-coded NQN prefix.
pub const GO_NQN_PREFIX: &str = "nqn.2000-02.com.mikrotik";
/// The Go driver's default NVMe/TCP port.
pub const GO_NVME_PORT: u16 = 4420;
/// No printed line is longer than this.
pub const LINE_WIDTH: usize = 78;
/// The SSH version string RouterOS sends.
pub const SERVER_ID: &str = "SSH-2.0-ROSSSH";

// ---------------------------------------------------------------------------------------------
// Configuration and public model types
// ---------------------------------------------------------------------------------------------

/// How a [`FakeRds`] starts. `Default` authorizes no key: add one.
#[derive(Clone, Debug)]
pub struct FakeRdsConfig {
    /// Where to listen (default 127.0.0.1, any free port).
    pub listen: SocketAddr,
    /// Client public keys allowed to log in (compared without their comments).
    pub authorized_keys: Vec<PublicKey>,
    /// The only user name accepted (default `admin`, the Go driver's default).
    pub user: String,
    pub pool_total_bytes: u64,
    /// Free bytes before any file exists; files then consume from it.
    pub pool_free_bytes: u64,
    pub mount_point: String,
    /// Delay before each command runs.
    pub latency: Duration,
    /// Channel opens beyond this many open sessions on one connection are refused
    /// (`administratively prohibited`); `None`: no limit.
    pub max_sessions_per_connection: Option<usize>,
    /// `last-modified` for new files and directories; `None`: the current UTC time.
    pub fixed_time: Option<String>,
}

impl Default for FakeRdsConfig {
    fn default() -> Self {
        FakeRdsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            authorized_keys: vec![],
            user: "admin".into(),
            pool_total_bytes: DEFAULT_POOL_TOTAL,
            pool_free_bytes: DEFAULT_POOL_FREE,
            mount_point: DEFAULT_MOUNT_POINT.into(),
            latency: Duration::ZERO,
            max_sessions_per_connection: None,
            fixed_time: None,
        }
    }
}

impl FakeRdsConfig {
    /// Defaults, authorizing `key`.
    pub fn new(key: PublicKey) -> Self {
        FakeRdsConfig {
            authorized_keys: vec![key],
            ..Default::default()
        }
    }
}

/// A disk as the model holds it (the view `disks()` returns, and what `add_disk` takes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub slot: String,
    /// Absolute: `/storage-pool/metal-csi/pvc-<uuid>.img`.
    pub file_path: String,
    /// The backing file's size.
    pub file_size: u64,
    pub nvme_tcp_export: bool,
    pub nvme_tcp_server_port: u16,
    pub nvme_tcp_server_nqn: String,
    /// The disk's `comment` (empty: none).
    pub comment: String,
}

impl Disk {
    /// A volume as the Go driver's CreateVolume makes it: slot = volume id, file
    /// `/storage-pool/metal-csi/<id>.img`, NQN `nqn.2000-02.com.mikrotik:<id>`, port 4420,
    /// exported.
    pub fn volume(slot: &str, bytes: u64) -> Disk {
        Disk {
            slot: slot.into(),
            file_path: format!("{GO_BASE_PATH}/{slot}.img"),
            file_size: bytes,
            nvme_tcp_export: true,
            nvme_tcp_server_port: GO_NVME_PORT,
            nvme_tcp_server_nqn: format!("{GO_NQN_PREFIX}:{}", slot.to_lowercase()),
            comment: String::new(),
        }
    }

    /// A snapshot as the Go driver's CreateSnapshot makes it: same path scheme, not exported.
    pub fn snapshot(slot: &str, bytes: u64) -> Disk {
        Disk {
            slot: slot.into(),
            file_path: format!("{GO_BASE_PATH}/{slot}.img"),
            file_size: bytes,
            nvme_tcp_export: false,
            nvme_tcp_server_port: 0,
            nvme_tcp_server_nqn: String::new(),
            comment: String::new(),
        }
    }
}

/// A file on the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Without a leading `/`: `storage-pool/metal-csi/pvc-1.img`.
    pub name: String,
    pub size: u64,
    pub last_modified: String,
    /// Stands for the data: empty for a new file, copied by `copy-from`, set by
    /// [`FakeRds::write_content`].
    pub content: String,
}

/// One command as received, and its answer once sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRecord {
    /// Order of arrival, from 1.
    pub seq: u64,
    /// The SSH connection, from 1 in order of acceptance.
    pub connection: u64,
    /// The server-side channel number of the session within its connection.
    pub channel: u32,
    /// Exactly as received.
    pub command: String,
    /// `None` while hung or delayed, or if the connection went before an answer.
    pub output: Option<String>,
    pub exit_status: Option<u32>,
}

/// A line the fake refused because RouterOS would have read syntax in it that the driver must
/// never send (a second command, a substitution); see [`CliError::Violation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The line exactly as received.
    pub command: String,
    pub what: String,
    /// 1-based column of the offending character.
    pub col: usize,
}

/// What a fault rule does to a matching command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this text and exit status instead of running the command.
    Fail { output: String, exit_status: u32 },
    /// Close the command's connection without answering; `execute`: run the command first
    /// (its answer is lost).
    DropConnection { execute: bool },
}

#[derive(Clone, Debug)]
struct FaultRule {
    id: u64,
    substring: String,
    action: FaultAction,
    remaining: usize,
}

/// One `/disk monitor-traffic <slot> once` sample: the totals since boot and the rates of the
/// last second, as RouterOS 7 prints them. Rates are bits per second, times milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub read_ops: u64,
    pub read_ops_per_second: u64,
    pub read_bytes: u64,
    pub read_rate_bps: u64,
    pub read_merges: u64,
    pub read_time_ms: u64,
    pub write_ops: u64,
    pub write_ops_per_second: u64,
    pub write_bytes: u64,
    pub write_rate_bps: u64,
    pub write_merges: u64,
    pub write_time_ms: u64,
    pub in_flight_ops: u64,
    pub active_time_ms: u64,
    pub wait_time_ms: u64,
    pub discard_ops: u64,
    pub discard_bytes: u64,
    pub discard_merges: u64,
    pub discard_time_ms: u64,
    pub flush_ops: u64,
    pub flush_time_ms: u64,
}

impl Traffic {
    /// The Go driver's captured sample (its `TestParseDiskMetrics`, first case).
    pub fn go_sample() -> Traffic {
        Traffic {
            read_ops: 243_401,
            read_bytes: 33_131_503_616,
            write_ops: 17_667_231,
            write_ops_per_second: 76,
            write_bytes: 515_659_673_600,
            write_rate_bps: 12_800_000,
            ..Default::default()
        }
    }

    /// The printout: one `key: value` line per field, the key right-aligned in 22 columns,
    /// the value right-aligned in 15 after `": "` (the layout of the captured sample), counts
    /// grouped by thousands, rates as `0bps` / `12.8Mbps`, times as `0ms` / `1s200ms`.
    fn render(&self, slot: &str) -> String {
        let lines: Vec<(&str, String)> = vec![
            ("slot", slot.to_string()),
            ("read-ops", group_thousands(self.read_ops)),
            (
                "read-ops-per-second",
                group_thousands(self.read_ops_per_second),
            ),
            ("read-bytes", group_thousands(self.read_bytes)),
            ("read-rate", rate_text(self.read_rate_bps)),
            ("read-merges", group_thousands(self.read_merges)),
            ("read-time", time_text(self.read_time_ms)),
            ("write-ops", group_thousands(self.write_ops)),
            (
                "write-ops-per-second",
                group_thousands(self.write_ops_per_second),
            ),
            ("write-bytes", group_thousands(self.write_bytes)),
            ("write-rate", rate_text(self.write_rate_bps)),
            ("write-merges", group_thousands(self.write_merges)),
            ("write-time", time_text(self.write_time_ms)),
            ("in-flight-ops", group_thousands(self.in_flight_ops)),
            ("active-time", time_text(self.active_time_ms)),
            ("wait-time", time_text(self.wait_time_ms)),
            ("discard-ops", group_thousands(self.discard_ops)),
            ("discard-bytes", group_thousands(self.discard_bytes)),
            ("discard-merges", group_thousands(self.discard_merges)),
            ("discard-time", time_text(self.discard_time_ms)),
            ("flush-ops", group_thousands(self.flush_ops)),
            ("flush-time", time_text(self.flush_time_ms)),
        ];
        lines
            .iter()
            .map(|(k, v)| format!("{k:>22}: {v:>15}\r\n"))
            .collect()
    }
}

/// Bits per second as RouterOS prints a rate: `0bps`, `999bps`, `12.8kbps`, `12.8Mbps`,
/// `1.5Gbps` (powers of 1000, one decimal).
pub fn rate_text(bps: u64) -> String {
    match bps {
        0..=999 => format!("{bps}bps"),
        1_000..=999_999 => format!("{:.1}kbps", bps as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}Mbps", bps as f64 / 1e6),
        _ => format!("{:.1}Gbps", bps as f64 / 1e9),
    }
}

/// Milliseconds as RouterOS prints a short duration: `0ms`, `950ms`, `1s`, `1s200ms`.
pub fn time_text(ms: u64) -> String {
    let (s, rest) = (ms / 1000, ms % 1000);
    match (s, rest) {
        (0, r) => format!("{r}ms"),
        (s, 0) => format!("{s}s"),
        (s, r) => format!("{s}s{r}ms"),
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct DiskEntry {
    slot: String,
    file_path: String,
    export: bool,
    port: u16,
    nqn: String,
    comment: String,
}

#[derive(Debug)]
struct Model {
    total: u64,
    /// Bytes used by things other than the model's files.
    base_used: u64,
    mount_point: String,
    mount_modified: String,
    disks: Vec<DiskEntry>,
    files: BTreeMap<String, FileEntry>,
    /// Directory name -> last-modified.
    dirs: BTreeMap<String, String>,
    next_auto_slot: u64,
    /// `/disk monitor-traffic` samples by slot; a known slot without one reads all zeros.
    traffic: BTreeMap<String, Traffic>,
}

impl Model {
    fn new(config: &FakeRdsConfig, now: &str) -> Model {
        Model {
            total: config.pool_total_bytes,
            base_used: config
                .pool_total_bytes
                .saturating_sub(config.pool_free_bytes),
            mount_point: config.mount_point.clone(),
            mount_modified: now.into(),
            disks: vec![],
            files: BTreeMap::new(),
            dirs: BTreeMap::new(),
            next_auto_slot: 1,
            traffic: BTreeMap::new(),
        }
    }

    fn free(&self) -> u64 {
        let files: u64 = self.files.values().map(|f| f.size).sum();
        self.total
            .saturating_sub(self.base_used)
            .saturating_sub(files)
    }

    fn file_name(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    fn disk_index(&self, slot: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.slot == slot)
    }

    fn file_in_use(&self, name: &str) -> bool {
        self.disks
            .iter()
            .any(|d| Self::file_name(&d.file_path) == name)
    }

    fn public_disk(&self, d: &DiskEntry) -> Disk {
        Disk {
            slot: d.slot.clone(),
            file_path: d.file_path.clone(),
            file_size: self.disk_size(d),
            nvme_tcp_export: d.export,
            nvme_tcp_server_port: d.port,
            nvme_tcp_server_nqn: d.nqn.clone(),
            comment: d.comment.clone(),
        }
    }

    fn disk_size(&self, d: &DiskEntry) -> u64 {
        self.files
            .get(&Self::file_name(&d.file_path))
            .map(|f| f.size)
            .unwrap_or(0)
    }

    /// Checks a path for a new file: under the mount point, not a directory.
    fn valid_file_name(&self, name: &str) -> bool {
        let prefix = format!("{}/", self.mount_point);
        name.starts_with(&prefix)
            && !name.ends_with('/')
            && !name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            && !self.dirs.contains_key(name)
    }

    fn make_parents(&mut self, name: &str, now: &str) {
        let mut parent = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
            if i > 0 {
                parent.push('/');
            }
            parent.push_str(part);
            if i > 0 && !self.dirs.contains_key(&parent) {
                self.dirs.insert(parent.clone(), now.into());
            }
        }
    }

    fn create_file(&mut self, name: &str, size: u64, content: String, now: &str) {
        self.make_parents(name, now);
        self.files.insert(
            name.into(),
            FileEntry {
                name: name.into(),
                size,
                last_modified: now.into(),
                content,
            },
        );
    }

    /// Adds a disk (and its file when missing), as `/disk add` would.
    fn add_disk(&mut self, disk: &Disk, now: &str) -> Result<(), String> {
        if self.disk_index(&disk.slot).is_some() || disk.slot == self.mount_point {
            return Err("failure: item with such slot already exists".into());
        }
        let name = Self::file_name(&disk.file_path);
        if !self.valid_file_name(&name) {
            return Err("failure: invalid file-path".into());
        }
        if self.file_in_use(&name) {
            return Err("failure: file is in use".into());
        }
        if !self.files.contains_key(&name) {
            if disk.file_size > self.free() {
                return Err("failure: not enough space".into());
            }
            self.create_file(&name, disk.file_size, String::new(), now);
        }
        self.disks.push(DiskEntry {
            slot: disk.slot.clone(),
            file_path: format!("/{name}"),
            export: disk.nvme_tcp_export,
            port: disk.nvme_tcp_server_port,
            nqn: disk.nvme_tcp_server_nqn.clone(),
            comment: disk.comment.clone(),
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The RouterOS command line: lexing and parsing
// ---------------------------------------------------------------------------------------------

/// How a command fails, printed as RouterOS prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CliError {
    BadCommand {
        word: String,
        col: usize,
    },
    EndExpected {
        col: usize,
    },
    Syntax {
        col: usize,
    },
    BadValue {
        arg: String,
    },
    Failure(String),
    /// A bare message (`no such item`).
    Plain(String),
    /// Syntax RouterOS would act on and the driver must never send: a second command, a
    /// `$` substitution, a `[...]` command substitution other than the driver's own
    /// `[find ...]`. Answered as an error, run not at all, and recorded as a violation
    /// ([`FakeRds::violations`]).
    Violation {
        what: String,
        col: usize,
    },
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::BadCommand { word, col } => {
                write!(f, "bad command name {word} (line 1 column {col})")
            }
            CliError::EndExpected { col } => {
                write!(f, "expected end of command (line 1 column {col})")
            }
            CliError::Syntax { col } => write!(f, "syntax error (line 1 column {col})"),
            CliError::BadValue { arg } => write!(f, "input does not match any value of {arg}"),
            CliError::Failure(m) => write!(f, "failure: {m}"),
            CliError::Plain(m) => f.write_str(m),
            CliError::Violation { what, col } => {
                write!(f, "fake RouterOS refuses {what} (line 1 column {col})")
            }
        }
    }
}

fn failure(m: &str) -> CliError {
    CliError::Failure(m.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Match,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    key: String,
    op: Op,
    value: String,
    col: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Text(String),
    Find(Vec<Cond>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// A word on its own (`detail`, `where`, `and`, a slot name).
    Bare { word: String, col: usize },
    Pair {
        key: String,
        op: Op,
        value: Value,
        col: usize,
    },
    /// A positional `[find ...]`.
    Find { conds: Vec<Cond>, col: usize },
}

impl Item {
    fn col(&self) -> usize {
        match self {
            Item::Bare { col, .. } | Item::Pair { col, .. } | Item::Find { col, .. } => *col,
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(s: &'a str) -> Self {
        Lexer {
            s: s.as_bytes(),
            pos: 0,
        }
    }

    /// 1-based column of the next character.
    fn col(&self) -> usize {
        self.pos + 1
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Whether the command ends here: the line's end, or a `;` or line break, which end a
    /// RouterOS command line.
    fn at_command_end(&self) -> bool {
        matches!(self.peek(), None | Some(b';' | b'\r' | b'\n'))
    }

    fn violation(&self, what: impl Into<String>, col: usize) -> CliError {
        CliError::Violation {
            what: what.into(),
            col,
        }
    }

    /// After the first command: only separators and blanks may follow. Anything else is a
    /// second command, which RouterOS would run and the driver never sends.
    fn end_of_line(&mut self) -> Result<(), CliError> {
        while matches!(self.peek(), Some(b' ' | b'\t' | b';' | b'\r' | b'\n')) {
            self.pos += 1;
        }
        if self.at_end() {
            return Ok(());
        }
        Err(self.violation("a second command in one line", self.col()))
    }

    fn word(&mut self) -> String {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }

    /// A double-quoted string, its escapes decoded as RouterOS's scripting manual lists them:
    /// `\"`, `\\`, `\$`, `\?`, `\n`, `\r`, `\t`, `\_` (space), `\a`, `\b`, `\f`, `\v` and
    /// `\XX` (two upper-case hex digits). Any other escaped character stands for itself (the
    /// manual does not say RouterOS refuses it). An unescaped `$` substitutes a variable or
    /// (`$(...)`, `$[...]`) an expression even inside quotes: a violation.
    fn quoted(&mut self) -> Result<String, CliError> {
        let open = self.col();
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(CliError::Syntax { col: open }),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'$') => {
                    return Err(self.violation("a `$` substitution in a quoted value", self.col()))
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let Some(c) = self.peek() else {
                        return Err(CliError::Syntax { col: open });
                    };
                    let hex = |b: Option<&u8>| match b {
                        Some(d @ b'0'..=b'9') => Some(d - b'0'),
                        Some(d @ b'A'..=b'F') => Some(d - b'A' + 10),
                        _ => None,
                    };
                    if let (Some(hi), Some(lo)) =
                        (hex(self.s.get(self.pos)), hex(self.s.get(self.pos + 1)))
                    {
                        out.push(hi * 16 + lo);
                        self.pos += 2;
                        continue;
                    }
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'_' => b' ',
                        b'a' => 0x07,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'v' => 0x0b,
                        other => other,
                    });
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// A value: quoted, a `[find ...]`, or unquoted up to a blank, a command's end or (inside
    /// brackets) the closing `]`. In an unquoted value RouterOS reads `$` as a substitution,
    /// `[` as a command substitution, `(`/`)` as an expression, `{`/`}` as a scope and `"` as
    /// the start of a string: all violations here. A `\` outside a string is illegal in
    /// RouterOS (a syntax error), as is a `]` that closes nothing.
    fn value(&mut self, nested: bool) -> Result<Value, CliError> {
        match self.peek() {
            Some(b'"') => Ok(Value::Text(self.quoted()?)),
            Some(b'[') => Ok(Value::Find(self.find()?)),
            _ => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if matches!(c, b' ' | b'\t') || self.at_command_end() || (nested && c == b']') {
                        break;
                    }
                    let what = match c {
                        b'$' => "a `$` substitution in an unquoted value",
                        b'[' => "a `[...]` command substitution inside a value",
                        b'(' | b')' => "an expression `(...)` in an unquoted value",
                        b'{' | b'}' => "a scope `{...}` in an unquoted value",
                        b'"' => "a quote inside an unquoted value",
                        b'\\' | b']' => return Err(CliError::Syntax { col: self.col() }),
                        _ => "",
                    };
                    if !what.is_empty() {
                        return Err(self.violation(what, self.col()));
                    }
                    self.pos += 1;
                }
                Ok(Value::Text(
                    String::from_utf8_lossy(&self.s[start..self.pos]).into_owned(),
                ))
            }
        }
    }

    /// `[find ...]` or `[/disk find where ...]`: returns the conditions. Any other command in
    /// brackets is a command substitution RouterOS would run: a violation.
    fn find(&mut self) -> Result<Vec<Cond>, CliError> {
        let open = self.col();
        self.pos += 1;
        loop {
            self.skip_ws();
            if self.peek() == Some(b'/') {
                self.pos += 1;
                continue;
            }
            let col = self.col();
            let word = self.word();
            match word.as_str() {
                "find" => break,
                "disk" | "file" => continue,
                "" => return Err(CliError::Syntax { col }),
                _ => {
                    return Err(self.violation(
                        format!("the command substitution `[{word} ...]` (only `[find ...]`)"),
                        col,
                    ))
                }
            }
        }
        let items = self.items(true)?;
        if self.peek() != Some(b']') {
            return Err(CliError::Syntax { col: open });
        }
        self.pos += 1;
        conditions(&items)
    }

    /// Arguments up to the end (or the closing `]` when `nested`).
    fn items(&mut self, nested: bool) -> Result<Vec<Item>, CliError> {
        let mut items = vec![];
        loop {
            self.skip_ws();
            let col = self.col();
            match self.peek() {
                None => break,
                Some(b';' | b'\r' | b'\n') if nested => {
                    return Err(self.violation("a second command inside `[...]`", col))
                }
                Some(b';' | b'\r' | b'\n') => break,
                Some(b']') if nested => break,
                Some(b'$') => return Err(self.violation("a `$` substitution as an argument", col)),
                Some(b'[') => {
                    let conds = self.find()?;
                    items.push(Item::Find { conds, col });
                    continue;
                }
                _ => {}
            }
            let key = self.word();
            if key.is_empty() {
                return Err(CliError::EndExpected { col });
            }
            let op = match self.peek() {
                Some(b'=') => {
                    self.pos += 1;
                    Some(Op::Eq)
                }
                Some(b'~') => {
                    self.pos += 1;
                    Some(Op::Match)
                }
                Some(b'!') if self.s.get(self.pos + 1) == Some(&b'=') => {
                    self.pos += 2;
                    Some(Op::Ne)
                }
                _ => None,
            };
            match op {
                Some(op) => {
                    let value = self.value(nested)?;
                    items.push(Item::Pair {
                        key,
                        op,
                        value,
                        col,
                    });
                }
                None => {
                    let ends = matches!(self.peek(), Some(b' ' | b'\t'))
                        || self.at_command_end()
                        || (nested && self.peek() == Some(b']'));
                    if !ends {
                        return Err(CliError::EndExpected { col: self.col() });
                    }
                    items.push(Item::Bare { word: key, col });
                }
            }
        }
        Ok(items)
    }
}

/// Conditions from `where`/`find` items: `key=value`, `key~value`, `key!=value`, `and`, `where`.
fn conditions(items: &[Item]) -> Result<Vec<Cond>, CliError> {
    let mut conds = vec![];
    for item in items {
        match item {
            Item::Bare { word, .. } if word == "and" || word == "where" => {}
            Item::Pair {
                key,
                op,
                value: Value::Text(value),
                col,
            } => conds.push(Cond {
                key: key.clone(),
                op: *op,
                value: value.clone(),
                col: *col,
            }),
            other => return Err(CliError::EndExpected { col: other.col() }),
        }
    }
    Ok(conds)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Menu {
    Disk,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Add,
    Print,
    Set,
    Remove,
    MonitorTraffic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    menu: Option<Menu>,
    verb: Option<Verb>,
    items: Vec<Item>,
}

fn parse(line: &str) -> Result<Parsed, CliError> {
    let mut lx = Lexer::new(line);
    let mut menu = None;
    let verb;
    loop {
        lx.skip_ws();
        while lx.peek() == Some(b'/') {
            lx.pos += 1;
            lx.skip_ws();
        }
        if lx.at_command_end() {
            lx.end_of_line()?;
            // A bare menu path only changes the current menu: no output.
            return Ok(Parsed {
                menu,
                verb: None,
                items: vec![],
            });
        }
        let col = lx.col();
        let word = lx.word();
        if word.is_empty() {
            return Err(CliError::Syntax { col });
        }
        match (menu, word.as_str()) {
            (None, "disk") => menu = Some(Menu::Disk),
            (None, "file") => menu = Some(Menu::File),
            (Some(Menu::Disk), "add") => {
                verb = Verb::Add;
                break;
            }
            (Some(_), "print") => {
                verb = Verb::Print;
                break;
            }
            (Some(Menu::Disk), "set") => {
                verb = Verb::Set;
                break;
            }
            (Some(_), "remove") => {
                verb = Verb::Remove;
                break;
            }
            (Some(Menu::Disk), "monitor-traffic") => {
                verb = Verb::MonitorTraffic;
                break;
            }
            _ => return Err(CliError::BadCommand { word, col }),
        }
    }
    let items = lx.items(false)?;
    lx.end_of_line()?;
    Ok(Parsed {
        menu,
        verb: Some(verb),
        items,
    })
}

// ---------------------------------------------------------------------------------------------
// Values: sizes, numbers, regular expressions
// ---------------------------------------------------------------------------------------------

/// `10G`, `512M`, `1T`, `1024K`, `1073741824` (binary units).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        b'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// `53687091200` -> `53 687 091 200`.
pub fn group_thousands(n: u64) -> String {
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

/// RouterOS's human size: one decimal in the largest binary unit that holds at least 2 of it
/// (`50.0GiB`, `1024.0MiB`, `1924.1KiB`), plain bytes below 2 KiB.
pub fn human_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if n >= 2 * unit {
            return format!("{:.1}{name}", n as f64 / unit as f64);
        }
    }
    n.to_string()
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn parse_yes_no(arg: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(CliError::BadValue { arg: arg.into() }),
    }
}

fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One property of a printed item: the value `where` compares, and its printed token.
struct Prop {
    key: &'static str,
    raw: String,
    token: String,
}

fn prop(key: &'static str, raw: impl Into<String>) -> Prop {
    let raw = raw.into();
    let token = format!("{key}={raw}");
    Prop { key, raw, token }
}

fn qprop(key: &'static str, raw: impl Into<String>) -> Prop {
    let raw = raw.into();
    let token = format!("{key}={}", quote(&raw));
    Prop { key, raw, token }
}

fn bytes_prop(key: &'static str, n: u64) -> Prop {
    Prop {
        key,
        raw: n.to_string(),
        token: format!("{key}={}", group_thousands(n)),
    }
}

/// A compiled `where`/`find` condition.
enum Matcher {
    Eq(&'static str, String),
    Ne(&'static str, String),
    Re(&'static str, regex::Regex),
}

fn compile(conds: &[Cond], known: &[&'static str]) -> Result<Vec<Matcher>, CliError> {
    conds
        .iter()
        .map(|c| {
            let key = *known
                .iter()
                .find(|k| **k == c.key)
                .ok_or(CliError::EndExpected { col: c.col })?;
            Ok(match c.op {
                Op::Eq => Matcher::Eq(key, c.value.clone()),
                Op::Ne => Matcher::Ne(key, c.value.clone()),
                // RouterOS's regular expressions are POSIX ones without `{}` bounds and
                // without empty `()` (its Regular Expressions manual).
                Op::Match if c.value.contains('{') || c.value.contains("()") => {
                    return Err(failure("invalid regular expression"))
                }
                Op::Match => Matcher::Re(
                    key,
                    regex::Regex::new(&c.value)
                        .map_err(|_| failure("invalid regular expression"))?,
                ),
            })
        })
        .collect()
}

/// All conditions hold; an absent property equals the empty string and matches no regex.
fn matches(matchers: &[Matcher], props: &[Prop]) -> bool {
    let value = |key: &str| props.iter().find(|p| p.key == key).map(|p| p.raw.as_str());
    matchers.iter().all(|m| match m {
        Matcher::Eq(k, v) => value(k).unwrap_or("") == v,
        Matcher::Ne(k, v) => value(k).unwrap_or("") != v,
        Matcher::Re(k, re) => value(k).is_some_and(|v| re.is_match(v)),
    })
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

/// `/disk` flag groups: one column each, in this order.
const DISK_FLAG_GROUPS: [&str; 10] = [
    "X - DISABLED",
    "A - ACQUIRED, E - EMPTY, B - BLOCK-DEVICE",
    "M - MOUNTED, F - FORMATTING, S - SWAP-ENABLED",
    "p - PARTITION",
    "f - RAID-MEMBER-FAILED, r - RAID-MEMBER",
    "c - ENCRYPTED",
    "g - GUID-PARTITION-TABLE",
    "t - NVME-TCP-EXPORT",
    "i - ISCSI-EXPORT",
    "s - SMB-EXPORT, n - NFS-EXPORT",
];

/// Properties `where`/`find` accept on `/disk` (those printed, plus a few real ones).
const DISK_KEYS: &[&str] = &[
    "type",
    "slot",
    "slot-default",
    "parent",
    "fs",
    "fs-label",
    "model",
    "serial",
    "comment",
    "size",
    "free",
    "use",
    "mount-point",
    "mount-filesystem",
    "mount-read-only",
    "compress",
    "sector-size",
    "raid-master",
    "nvme-tcp-export",
    "nvme-tcp-server-port",
    "nvme-tcp-server-nqn",
    "nvme-tcp-server-allow-host-name",
    "iscsi-export",
    "nfs-sharing",
    "smb-sharing",
    "media-sharing",
    "media-interface",
    "swap",
    "file-path",
    "file-size",
    "file-offset",
];

const FILE_KEYS: &[&str] = &["name", "type", "size", "last-modified", "contents"];

/// The `Flags:` legend, wrapped by group.
fn disk_legend() -> Vec<String> {
    let mut lines = vec![];
    let mut cur = String::from("Flags:");
    let mut first = true;
    for group in DISK_FLAG_GROUPS {
        let piece = format!("{group};");
        if first || cur.len() + 1 + piece.len() <= LINE_WIDTH {
            cur.push(' ');
            cur.push_str(&piece);
            first = false;
        } else {
            lines.push(std::mem::replace(&mut cur, piece));
        }
    }
    lines.push(cur);
    lines
}

/// Where a token longer than `room` is cut: before its last `-` that leaves a piece of at most
/// `room` bytes, else at `room`.
fn cut(token: &str, room: usize) -> usize {
    let dash = token
        .char_indices()
        .rev()
        .find(|&(i, c)| c == '-' && i > 0 && i <= room)
        .map(|(i, _)| i);
    let mut at = dash.unwrap_or(room.min(token.len()));
    while at > 1 && !token.is_char_boundary(at) {
        at -= 1;
    }
    at.max(1)
}

/// One entry: index, flag columns, tokens filled up to [`LINE_WIDTH`].
fn entry_lines(index: usize, index_width: usize, flags: &str, tokens: &[String]) -> Vec<String> {
    let prefix = format!("{index:>index_width$} {flags}  ");
    let indent = " ".repeat(prefix.len());
    let mut lines = vec![];
    let mut cur = prefix;
    let mut has_content = false;
    for token in tokens {
        let mut token = token.as_str();
        if has_content {
            if cur.len() + 1 + token.len() <= LINE_WIDTH {
                cur.push(' ');
                cur.push_str(token);
                continue;
            }
            lines.push(std::mem::replace(&mut cur, indent.clone()));
            has_content = false;
        }
        let mut was_cut = false;
        while indent.len() + token.len() > LINE_WIDTH {
            let at = cut(token, LINE_WIDTH - indent.len());
            cur.push_str(&token[..at]);
            lines.push(std::mem::replace(&mut cur, indent.clone()));
            token = &token[at..];
            was_cut = true;
        }
        cur.push_str(token);
        if was_cut {
            // A cut token keeps its lines to itself.
            lines.push(std::mem::replace(&mut cur, indent.clone()));
        } else {
            has_content = true;
        }
    }
    if has_content {
        lines.push(cur);
    }
    lines
}

fn index_width(count: usize) -> usize {
    count.saturating_sub(1).to_string().len().max(2)
}

fn crlf(lines: &[String]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out
}

/// A printed row: the disk's index in `Model::disks` (`None`: the pool), flag columns, props.
type DiskRow = (Option<usize>, String, Vec<Prop>);

/// An `=` condition on `slot`, if any: rows with another slot cannot match, so they need not
/// be rendered.
fn slot_hint(conds: &[Cond]) -> Option<&str> {
    conds
        .iter()
        .find(|c| c.key == "slot" && c.op == Op::Eq)
        .map(|c| c.value.as_str())
}

/// The printed rows of `/disk`: the pool partition, then the file disks in creation order
/// (only those with slot `only` when given).
fn disk_rows(model: &Model, only: Option<&str>) -> Vec<DiskRow> {
    let wanted = |slot: &str| only.is_none_or(|o| o == slot);
    let mut rows = vec![];
    let total = model.total;
    let free = model.free();
    let used = total - free.min(total);
    let use_pct = if total == 0 {
        0
    } else {
        ((used as u128 * 100 + total as u128 / 2) / total as u128) as u64
    };
    let mut flags = [' '; 10];
    flags[1] = 'B';
    flags[2] = 'M';
    rows.push((
        None,
        flags.iter().collect(),
        vec![
            prop("type", "partition"),
            qprop("slot", model.mount_point.clone()),
            qprop("slot-default", ""),
            qprop("parent", "raid1"),
            qprop("fs-label", model.mount_point.clone()),
            prop("fs", "btrfs"),
            bytes_prop("size", total),
            bytes_prop("free", free),
            prop("use", format!("{use_pct}%")),
            qprop("mount-point", model.mount_point.clone()),
            prop("mount-filesystem", "yes"),
            prop("mount-read-only", "no"),
            prop("compress", "no"),
            prop("sector-size", "512"),
            prop("raid-master", "none"),
            prop("nvme-tcp-export", "no"),
            prop("iscsi-export", "no"),
            prop("nfs-sharing", "no"),
            prop("smb-sharing", "no"),
            prop("media-sharing", "no"),
            prop("media-interface", "none"),
            prop("swap", "no"),
        ],
    ));
    if !wanted(&model.mount_point) {
        rows.clear();
    }
    for (i, d) in model.disks.iter().enumerate() {
        if !wanted(&d.slot) {
            continue;
        }
        let size = model.disk_size(d);
        let mut flags = [' '; 10];
        flags[1] = 'B';
        if d.export {
            flags[7] = 't';
        }
        let mut props = vec![];
        if !d.comment.is_empty() {
            // Not a key=value token: print_rows puts it on the entry's first line.
            props.push(Prop {
                key: "comment",
                raw: d.comment.clone(),
                token: format!(";;; {}", d.comment),
            });
        }
        props.extend([
            prop("type", "file"),
            qprop("slot", d.slot.clone()),
            qprop("slot-default", ""),
            qprop("parent", ""),
            prop("fs", "-"),
            qprop("model", d.file_path.clone()),
            bytes_prop("size", size),
            prop("mount-filesystem", "yes"),
            prop("mount-read-only", "no"),
            prop("compress", "no"),
            prop("sector-size", "512"),
            prop("raid-master", "none"),
            prop("nvme-tcp-export", yes_no(d.export)),
        ]);
        if d.export {
            props.push(prop("nvme-tcp-server-port", d.port.to_string()));
            props.push(qprop("nvme-tcp-server-nqn", d.nqn.clone()));
            props.push(qprop("nvme-tcp-server-allow-host-name", ""));
        }
        props.extend([
            prop("iscsi-export", "no"),
            prop("nfs-sharing", "no"),
            prop("smb-sharing", "no"),
            prop("media-sharing", "no"),
            prop("media-interface", "none"),
            prop("swap", "no"),
            prop("file-path", d.file_path.clone()),
            Prop {
                key: "file-size",
                raw: size.to_string(),
                token: format!("file-size={}", human_size(size)),
            },
            prop("file-offset", "0"),
        ]);
        rows.push((Some(i), flags.iter().collect(), props));
    }
    rows
}

/// The printed rows of `/file`: the mount point, directories and files, by name.
fn file_rows(model: &Model) -> Vec<Vec<Prop>> {
    let mut rows: BTreeMap<String, Vec<Prop>> = BTreeMap::new();
    rows.insert(
        model.mount_point.clone(),
        vec![
            prop("name", model.mount_point.clone()),
            prop("type", "disk"),
            prop("last-modified", model.mount_modified.clone()),
        ],
    );
    for (name, modified) in &model.dirs {
        rows.insert(
            name.clone(),
            vec![
                prop("name", name.clone()),
                prop("type", "directory"),
                prop("last-modified", modified.clone()),
            ],
        );
    }
    for f in model.files.values() {
        let base = f.name.rsplit('/').next().unwrap_or(&f.name);
        let ty = match base.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!(".{ext} file"),
            _ => "file".to_string(),
        };
        rows.insert(
            f.name.clone(),
            vec![
                prop("name", f.name.clone()),
                prop("type", ty),
                Prop {
                    key: "size",
                    raw: f.size.to_string(),
                    token: format!("size={}", human_size(f.size)),
                },
                prop("last-modified", f.last_modified.clone()),
            ],
        );
    }
    rows.into_values().collect()
}

fn print_rows(
    legend: &[String],
    rows: Vec<DiskRow>,
    conds: &[Cond],
    known: &[&'static str],
) -> Result<String, CliError> {
    let matchers = compile(conds, known)?;
    let selected: Vec<_> = rows
        .into_iter()
        .filter(|(_, _, props)| matches(&matchers, props))
        .collect();
    let width = index_width(selected.len());
    let mut out = crlf(legend);
    for (i, (_, flags, props)) in selected.iter().enumerate() {
        let tokens: Vec<String> = props
            .iter()
            .filter(|p| p.key != "comment")
            .map(|p| p.token.clone())
            .collect();
        let mut lines = entry_lines(i, width, flags, &tokens);
        if let Some(comment) = props.iter().find(|p| p.key == "comment") {
            // `;;; text` after the flag columns; the properties start on the next line.
            let first = format!("{i:>width$} {flags}  ");
            let indent = " ".repeat(first.len());
            for line in &mut lines {
                if let Some(rest) = line.strip_prefix(&first) {
                    *line = format!("{indent}{rest}");
                }
            }
            lines.insert(0, format!("{first}{}", comment.token));
        }
        out.push_str(&crlf(&lines));
        out.push_str("\r\n");
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Executing a command against the model
// ---------------------------------------------------------------------------------------------

/// Runs one command line; returns its output (RouterOS text, `\r\n` line ends).
fn execute(model: &mut Model, line: &str, now: &str) -> String {
    answer(run(model, line, now))
}

/// A command's output (RouterOS text, `\r\n` line ends), its error included.
fn answer(result: Result<String, CliError>) -> String {
    match result {
        Ok(out) => out,
        Err(e) => format!("{e}\r\n"),
    }
}

fn run(model: &mut Model, line: &str, now: &str) -> Result<String, CliError> {
    let parsed = parse(line)?;
    let (Some(menu), Some(verb)) = (parsed.menu, parsed.verb) else {
        return Ok(String::new());
    };
    let items = parsed.items;
    match (menu, verb) {
        (Menu::Disk, Verb::Add) => disk_add(model, &items, now),
        (Menu::Disk, Verb::Print) => {
            let conds = print_conditions(&items)?;
            let rows = disk_rows(model, slot_hint(&conds));
            print_rows(&disk_legend(), rows, &conds, DISK_KEYS)
        }
        (Menu::File, Verb::Print) => {
            let conds = print_conditions(&items)?;
            let rows = file_rows(model)
                .into_iter()
                .map(|p| (None, String::new(), p))
                .collect();
            print_rows(&[], rows, &conds, FILE_KEYS)
        }
        (Menu::Disk, Verb::Set) => disk_set(model, &items, now),
        (Menu::Disk, Verb::Remove) => disk_remove(model, &items),
        (Menu::File, Verb::Remove) => file_remove(model, &items),
        (Menu::Disk, Verb::MonitorTraffic) => monitor_traffic(model, &items),
        (Menu::File, Verb::Add | Verb::Set | Verb::MonitorTraffic) => unreachable!("not parsed"),
    }
}

/// `/disk monitor-traffic <slot> once`: one sample, as RouterOS prints it (see [`Traffic`]).
/// Without `once` RouterOS keeps printing until interrupted; the fake then never answers (see
/// [`endless`]).
fn monitor_traffic(model: &Model, items: &[Item]) -> Result<String, CliError> {
    let mut slot = None;
    for item in items {
        match item {
            Item::Bare { word, .. } if word == "once" || word == "without-paging" => {}
            Item::Bare { word, .. } if slot.is_none() => slot = Some(word.as_str()),
            other => return Err(CliError::EndExpected { col: other.col() }),
        }
    }
    let Some(slot) = slot else {
        return Err(CliError::Plain(
            "missing value(s) of argument(s) numbers".into(),
        ));
    };
    let known = slot == model.mount_point || model.disk_index(slot).is_some();
    if !known {
        return Err(CliError::Plain("no such item".into()));
    }
    let t = model.traffic.get(slot).cloned().unwrap_or_default();
    Ok(t.render(slot))
}

/// Whether a command never ends on its own (`monitor-traffic` without `once`).
fn endless(line: &str) -> bool {
    match parse(line) {
        Ok(Parsed {
            menu: Some(Menu::Disk),
            verb: Some(Verb::MonitorTraffic),
            items,
        }) => !items
            .iter()
            .any(|i| matches!(i, Item::Bare { word, .. } if word == "once")),
        _ => false,
    }
}

/// `detail`, `without-paging`, then `where` and conditions.
fn print_conditions(items: &[Item]) -> Result<Vec<Cond>, CliError> {
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Bare { word, .. } if word == "detail" || word == "without-paging" => {}
            Item::Bare { word, .. } if word == "where" => return conditions(&items[i + 1..]),
            other => return Err(CliError::EndExpected { col: other.col() }),
        }
    }
    Ok(vec![])
}

/// Disks selected by a `[find ...]` (indexes into `model.disks`; `None` for the pool).
fn find_disks(model: &Model, conds: &[Cond]) -> Result<Vec<Option<usize>>, CliError> {
    let matchers = compile(conds, DISK_KEYS)?;
    Ok(disk_rows(model, slot_hint(conds))
        .into_iter()
        .filter(|(_, _, props)| matches(&matchers, props))
        .map(|(i, _, _)| i)
        .collect())
}

/// The target of `set`/`remove`: a positional `[find ...]`, a name, or `numbers=`.
fn target(items: &[Item]) -> Result<(Option<&Item>, Vec<&Item>), CliError> {
    let mut target = None;
    let mut rest = vec![];
    for item in items {
        match item {
            Item::Find { .. } | Item::Bare { .. } if target.is_none() => target = Some(item),
            Item::Pair { key, .. } if key == "numbers" && target.is_none() => target = Some(item),
            Item::Pair { .. } => rest.push(item),
            other => return Err(CliError::EndExpected { col: other.col() }),
        }
    }
    Ok((target, rest))
}

fn target_conds(target: Option<&Item>, name_key: &str) -> Result<Vec<Cond>, CliError> {
    let named = |name: &str, col: usize| {
        vec![Cond {
            key: name_key.into(),
            op: Op::Eq,
            value: name.into(),
            col,
        }]
    };
    match target {
        None => Err(CliError::Plain(
            "missing value(s) of argument(s) numbers".into(),
        )),
        Some(Item::Find { conds, .. }) => Ok(conds.clone()),
        Some(Item::Bare { word, col }) => Ok(named(word, *col)),
        Some(Item::Pair {
            value: Value::Find(conds),
            ..
        }) => Ok(conds.clone()),
        Some(Item::Pair {
            value: Value::Text(name),
            col,
            ..
        }) => Ok(named(name, *col)),
    }
}

fn text_args<'a>(
    items: &[&'a Item],
    allowed: &[&str],
) -> Result<HashMap<&'a str, &'a Value>, CliError> {
    let mut args = HashMap::new();
    for item in items {
        match item {
            Item::Pair {
                key,
                op: Op::Eq,
                value,
                col,
            } => {
                if !allowed.contains(&key.as_str()) {
                    return Err(CliError::EndExpected { col: *col });
                }
                args.insert(key.as_str(), value);
            }
            other => return Err(CliError::EndExpected { col: other.col() }),
        }
    }
    Ok(args)
}

fn text<'a>(args: &HashMap<&str, &'a Value>, key: &str) -> Result<Option<&'a str>, CliError> {
    match args.get(key) {
        None => Ok(None),
        Some(Value::Text(t)) => Ok(Some(t.as_str())),
        Some(Value::Find(_)) => Err(CliError::BadValue { arg: key.into() }),
    }
}

fn port(args: &HashMap<&str, &Value>) -> Result<Option<u16>, CliError> {
    text(args, "nvme-tcp-server-port")?
        .map(|p| {
            p.parse::<u16>().map_err(|_| CliError::BadValue {
                arg: "nvme-tcp-server-port".into(),
            })
        })
        .transpose()
}

const DISK_ADD_ARGS: &[&str] = &[
    "type",
    "file-path",
    "file-size",
    "slot",
    "copy-from",
    "nvme-tcp-export",
    "nvme-tcp-server-port",
    "nvme-tcp-server-nqn",
    "comment",
];

fn disk_add(model: &mut Model, items: &[Item], now: &str) -> Result<String, CliError> {
    let refs: Vec<&Item> = items.iter().collect();
    let args = text_args(&refs, DISK_ADD_ARGS)?;
    match text(&args, "type")? {
        Some("file") => {}
        Some(_) => return Err(CliError::BadValue { arg: "type".into() }),
        None => return Err(failure("type not specified")),
    }
    let size = text(&args, "file-size")?
        .map(|s| {
            parse_size(s).ok_or(CliError::BadValue {
                arg: "file-size".into(),
            })
        })
        .transpose()?;
    let export = text(&args, "nvme-tcp-export")?
        .map(|v| parse_yes_no("nvme-tcp-export", v))
        .transpose()?
        .unwrap_or(false);
    let port = port(&args)?.unwrap_or(GO_NVME_PORT);
    let copy_from = match args.get("copy-from") {
        None => None,
        Some(Value::Find(conds)) => Some(conds.clone()),
        Some(Value::Text(slot)) => Some(vec![Cond {
            key: "slot".into(),
            op: Op::Eq,
            value: slot.clone(),
            col: 0,
        }]),
    };
    let slot = match text(&args, "slot")? {
        Some(s) => s.to_string(),
        None => loop {
            let s = format!("file{}", model.next_auto_slot);
            model.next_auto_slot += 1;
            if model.disk_index(&s).is_none() {
                break s;
            }
        },
    };
    let nqn = text(&args, "nvme-tcp-server-nqn")?
        .map(str::to_string)
        .unwrap_or_else(|| slot.clone());
    if model.disk_index(&slot).is_some() || slot == model.mount_point {
        return Err(failure("item with such slot already exists"));
    }
    let source = match copy_from {
        None => None,
        Some(conds) => {
            let found = find_disks(model, &conds)?;
            match found.as_slice() {
                [Some(i)] => {
                    let d = &model.disks[*i];
                    let file = model
                        .files
                        .get(&Model::file_name(&d.file_path))
                        .cloned()
                        .ok_or_else(|| failure("no such item"))?;
                    Some(file)
                }
                _ => return Err(failure("no such item")),
            }
        }
    };
    let Some(path) = text(&args, "file-path")? else {
        return Err(failure("file-path not specified"));
    };
    let name = Model::file_name(path);
    if !model.valid_file_name(&name) {
        return Err(failure("invalid file-path"));
    }
    let existing = model.files.get(&name).cloned();
    let (file_size, content) = match (&source, existing) {
        (Some(_), Some(_)) => return Err(failure("file already exists")),
        (Some(src), None) => {
            let size = size.unwrap_or(src.size);
            if size < src.size {
                return Err(failure("file-size is smaller than source"));
            }
            (size, src.content.clone())
        }
        (None, Some(_)) if size.is_some() => return Err(failure("file already exists")),
        (None, Some(file)) => {
            if model.file_in_use(&name) {
                return Err(failure("file is in use"));
            }
            (file.size, file.content)
        }
        (None, None) => match size {
            Some(size) => (size, String::new()),
            None => return Err(failure("file-size not specified")),
        },
    };
    if !model.files.contains_key(&name) {
        if file_size > model.free() {
            return Err(failure("not enough space"));
        }
        model.create_file(&name, file_size, content, now);
    }
    let comment = text(&args, "comment")?.unwrap_or_default().to_string();
    model.disks.push(DiskEntry {
        slot,
        file_path: format!("/{name}"),
        export,
        port,
        nqn,
        comment,
    });
    Ok(String::new())
}

fn disk_set(model: &mut Model, items: &[Item], now: &str) -> Result<String, CliError> {
    let (target, rest) = target(items)?;
    let conds = target_conds(target, "slot")?;
    let args = text_args(
        &rest,
        &[
            "file-size",
            "nvme-tcp-export",
            "nvme-tcp-server-port",
            "nvme-tcp-server-nqn",
            "comment",
        ],
    )?;
    let size = text(&args, "file-size")?
        .map(|s| {
            parse_size(s).ok_or(CliError::BadValue {
                arg: "file-size".into(),
            })
        })
        .transpose()?;
    let export = text(&args, "nvme-tcp-export")?
        .map(|v| parse_yes_no("nvme-tcp-export", v))
        .transpose()?;
    let port = port(&args)?;
    let nqn = text(&args, "nvme-tcp-server-nqn")?.map(str::to_string);
    let comment = text(&args, "comment")?.map(str::to_string);
    let found = find_disks(model, &conds)?;
    if found.is_empty() {
        return Err(failure("no such item"));
    }
    if found.contains(&None) {
        return Err(failure("can not change partition"));
    }
    let found: Vec<usize> = found.into_iter().flatten().collect();
    if let Some(size) = size {
        let mut growth = 0u64;
        for &i in &found {
            let current = model.disk_size(&model.disks[i]);
            if size < current {
                return Err(failure("shrinking not supported"));
            }
            growth += size - current;
        }
        if growth > model.free() {
            return Err(failure("not enough space"));
        }
        for &i in &found {
            let name = Model::file_name(&model.disks[i].file_path);
            if let Some(f) = model.files.get_mut(&name) {
                if f.size != size {
                    f.size = size;
                    f.last_modified = now.into();
                }
            }
        }
    }
    for &i in &found {
        let d = &mut model.disks[i];
        if let Some(e) = export {
            d.export = e;
        }
        if let Some(p) = port {
            d.port = p;
        }
        if let Some(n) = &nqn {
            d.nqn = n.clone();
        }
        if let Some(c) = &comment {
            d.comment = c.clone();
        }
    }
    Ok(String::new())
}

fn disk_remove(model: &mut Model, items: &[Item]) -> Result<String, CliError> {
    let (target, rest) = target(items)?;
    if let Some(extra) = rest.first() {
        return Err(CliError::EndExpected { col: extra.col() });
    }
    let conds = target_conds(target, "slot")?;
    let found = find_disks(model, &conds)?;
    if found.is_empty() {
        return Err(CliError::Plain("no such item".into()));
    }
    if found.contains(&None) {
        return Err(failure("can not remove partition"));
    }
    let mut remove: Vec<usize> = found.into_iter().flatten().collect();
    remove.sort_unstable();
    for i in remove.into_iter().rev() {
        model.disks.remove(i);
    }
    Ok(String::new())
}

fn file_remove(model: &mut Model, items: &[Item]) -> Result<String, CliError> {
    let (target, rest) = target(items)?;
    if let Some(extra) = rest.first() {
        return Err(CliError::EndExpected { col: extra.col() });
    }
    let conds = target_conds(target, "name")?;
    let matchers = compile(&conds, FILE_KEYS)?;
    let names: Vec<String> = file_rows(model)
        .iter()
        .filter(|props| matches(&matchers, props))
        .map(|props| props[0].raw.clone())
        .collect();
    let removing: HashSet<&str> = names.iter().map(String::as_str).collect();
    for name in &names {
        if *name == model.mount_point {
            return Err(failure("can not remove disk"));
        }
        if model.file_in_use(name) {
            return Err(failure("file is in use"));
        }
        let prefix = format!("{name}/");
        if model.dirs.contains_key(name)
            && model
                .files
                .keys()
                .chain(model.dirs.keys())
                .any(|n| n.starts_with(&prefix) && !removing.contains(n.as_str()))
        {
            return Err(failure("directory is not empty"));
        }
    }
    for name in &names {
        model.files.remove(name);
        model.dirs.remove(name);
    }
    Ok(String::new())
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Generates an ed25519 client key; writes the OpenSSH private key (unencrypted, mode 0600) to
/// `dir/id_ed25519` and the public line to `dir/id_ed25519.pub`. Returns the private key's path
/// (for `--rds-key-file`) and the public key (for [`FakeRdsConfig::authorized_keys`]).
pub fn client_keypair(dir: &Path) -> (PathBuf, PublicKey) {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("ed25519 key");
    key.set_comment("rds-csi-test");
    let pem = key.to_openssh(LineEnding::LF).expect("encode key");
    std::fs::create_dir_all(dir).expect("create key dir");
    let path = dir.join("id_ed25519");
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .expect("create private key file");
    file.write_all(pem.as_bytes()).expect("write private key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod private key");
    let public = key.public_key().clone();
    std::fs::write(
        dir.join("id_ed25519.pub"),
        format!("{}\n", public.to_openssh().expect("encode public key")),
    )
    .expect("write public key");
    (path, public)
}

/// Parses one `ssh-ed25519 AAAA... [comment]` line.
pub fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(line.trim()).map_err(|e| e.to_string())
}

/// Every key in an authorized_keys-style text (blank lines and `#` comments skipped).
pub fn parse_authorized_keys(text: &str) -> Result<Vec<PublicKey>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_public_key)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Server state
// ---------------------------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Stats {
    accepted: u64,
    refused: u64,
    authenticated: u64,
    open_total: usize,
    max_total: usize,
    max_per_connection: usize,
    /// Sessions ever opened (accepted channel opens).
    opened: u64,
    /// Channel opens refused for `max_sessions_per_connection`.
    sessions_refused: u64,
}

/// One live TCP connection.
struct Conn {
    id: u64,
    /// A duplicate of the socket, to shut it down from outside; taken when the stream drops.
    sock: Mutex<Option<std::net::TcpStream>>,
    killed: watch::Sender<bool>,
    /// Open session channels.
    open: Mutex<HashSet<u32>>,
}

impl Conn {
    /// Shuts the socket down both ways (the client sees the connection close without an SSH
    /// disconnect message) and ends the connection's pending commands.
    fn kill(&self) {
        self.killed.send_replace(true);
        if let Some(sock) = lock(&self.sock).as_ref() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct Shared {
    addr: SocketAddr,
    host_key: PrivateKey,
    user: String,
    authorized: Mutex<Vec<PublicKey>>,
    ssh_config: Arc<russh::server::Config>,
    max_sessions_per_connection: Option<usize>,
    fixed_time: Option<String>,
    model: Mutex<Model>,
    latency: Mutex<Duration>,
    hang: watch::Sender<bool>,
    /// Commands waiting on [`FakeRds::hang`] right now.
    held: AtomicUsize,
    refuse: AtomicBool,
    paused: watch::Sender<bool>,
    faults: Mutex<Vec<FaultRule>>,
    next_fault: AtomicU64,
    log: Mutex<Vec<CommandRecord>>,
    violations: Mutex<Vec<Violation>>,
    next_seq: AtomicU64,
    stats: Mutex<Stats>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
}

fn now_string(fixed: &Option<String>) -> String {
    if let Some(t) = fixed {
        return t.clone();
    }
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

impl Shared {
    fn now(&self) -> String {
        now_string(&self.fixed_time)
    }

    fn authorized(&self, key: &PublicKey) -> bool {
        lock(&self.authorized)
            .iter()
            .any(|k| k.key_data() == key.key_data())
    }

    fn log_received(&self, conn: u64, channel: u32, command: &str) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        lock(&self.log).push(CommandRecord {
            seq,
            connection: conn,
            channel,
            command: command.into(),
            output: None,
            exit_status: None,
        });
        seq
    }

    fn log_answered(&self, seq: u64, output: &str, exit_status: u32) {
        let mut log = lock(&self.log);
        if let Some(r) = log.iter_mut().rev().find(|r| r.seq == seq) {
            r.output = Some(output.into());
            r.exit_status = Some(exit_status);
        }
    }

    fn take_fault(&self, command: &str) -> Option<FaultAction> {
        let mut faults = lock(&self.faults);
        let i = faults
            .iter()
            .position(|f| f.remaining > 0 && command.contains(&f.substring))?;
        let action = faults[i].action.clone();
        faults[i].remaining -= 1;
        if faults[i].remaining == 0 {
            faults.remove(i);
        }
        Some(action)
    }

    fn execute(&self, command: &str) -> String {
        let now = self.now();
        let result = run(&mut lock(&self.model), command, &now);
        if let Err(CliError::Violation { what, col }) = &result {
            lock(&self.violations).push(Violation {
                command: command.into(),
                what: what.clone(),
                col: *col,
            });
        }
        answer(result)
    }

    fn session_opened(&self, conn: &Conn, channel: u32) {
        let per_conn = {
            let mut open = lock(&conn.open);
            open.insert(channel);
            open.len()
        };
        let mut stats = lock(&self.stats);
        stats.opened += 1;
        stats.open_total += 1;
        stats.max_total = stats.max_total.max(stats.open_total);
        stats.max_per_connection = stats.max_per_connection.max(per_conn);
    }

    fn session_closed(&self, conn: &Conn, channel: u32) {
        if lock(&conn.open).remove(&channel) {
            lock(&self.stats).open_total -= 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SSH plumbing
// ---------------------------------------------------------------------------------------------

/// The connection's TCP stream; dropping it releases the duplicate kept for `kill`.
struct TrackedStream {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        lock(&self.conn.sock).take();
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One connection's russh handler.
struct ConnHandler {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    /// Channels that already got their exec request.
    started: HashSet<u32>,
}

impl Drop for ConnHandler {
    fn drop(&mut self) {
        self.conn.killed.send_replace(true);
        let open: Vec<u32> = lock(&self.conn.open).drain().collect();
        if !open.is_empty() {
            lock(&self.shared.stats).open_total -= open.len();
        }
        lock(&self.shared.conns).remove(&self.conn.id);
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            if user == self.shared.user && self.shared.authorized(offer.public_key) {
                Auth::Accept
            } else {
                Auth::reject()
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            if user == self.shared.user && self.shared.authorized(key.public_key) {
                Auth::Accept
            } else {
                Auth::reject()
            },
        )
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        lock(&self.shared.stats).authenticated += 1;
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id().number();
        // Commands never read stdin: drop our end so nothing queues behind it.
        drop(channel);
        if let Some(max) = self.shared.max_sessions_per_connection {
            if lock(&self.conn.open).len() >= max {
                lock(&self.shared.stats).sessions_refused += 1;
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            }
        }
        self.shared.session_opened(&self.conn, id);
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared.session_closed(&self.conn, channel.number());
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.started.insert(channel.number()) {
            session.channel_failure(channel)?;
            return Ok(());
        }
        session.channel_success(channel)?;
        let command = String::from_utf8_lossy(data).into_owned();
        tokio::spawn(serve_command(
            self.shared.clone(),
            self.conn.clone(),
            channel,
            command,
            session.handle(),
        ));
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }
}

/// Counts one command in a counter while it lives (also when its connection is killed).
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn count(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs one exec: waits out latency and hangs, applies faults, answers.
async fn serve_command(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    channel: ChannelId,
    command: String,
    handle: russh::server::Handle,
) {
    let seq = shared.log_received(conn.id, channel.number(), &command);
    let fault = shared.take_fault(&command);
    let latency = *lock(&shared.latency);
    let mut killed = conn.killed.subscribe();
    let mut hang = shared.hang.subscribe();
    let forever = endless(&command);
    let wait = async {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if *hang.borrow_and_update() {
            let _held = Held::count(&shared.held);
            let _ = hang.wait_for(|h| !*h).await;
        }
        if forever {
            // A monitor without `once` prints until interrupted: no end, no exit status.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = wait => {}
        _ = killed.wait_for(|k| *k) => return,
    }
    if *conn.killed.borrow() {
        return;
    }
    let (output, exit_status) = match fault {
        Some(FaultAction::Fail {
            output,
            exit_status,
        }) => (output, exit_status),
        Some(FaultAction::DropConnection { execute }) => {
            if execute {
                shared.execute(&command);
            }
            conn.kill();
            return;
        }
        None => (shared.execute(&command), 0),
    };
    shared.log_answered(seq, &output, exit_status);
    if !output.is_empty() {
        let _ = handle.data(channel, output).await;
    }
    let _ = handle.exit_status_request(channel, exit_status).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
    shared.session_closed(&conn, channel.number());
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut paused = shared.paused.subscribe();
    loop {
        if *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            r = paused.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        if shared.refuse.load(Ordering::SeqCst) {
            lock(&shared.stats).refused += 1;
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let Ok(dup) = dup_socket(&stream) else {
            continue;
        };
        lock(&shared.stats).accepted += 1;
        let conn = Arc::new(Conn {
            id: shared.next_conn.fetch_add(1, Ordering::SeqCst),
            sock: Mutex::new(Some(dup)),
            killed: watch::channel(false).0,
            open: Mutex::new(HashSet::new()),
        });
        lock(&shared.conns).insert(conn.id, conn.clone());
        let handler = ConnHandler {
            shared: shared.clone(),
            conn: conn.clone(),
            started: HashSet::new(),
        };
        let stream = TrackedStream {
            inner: stream,
            conn,
        };
        let config = shared.ssh_config.clone();
        tokio::spawn(async move {
            if let Ok(session) = russh::server::run_stream(config, stream, handler).await {
                let _ = session.await;
            }
        });
    }
}

/// A second descriptor for the same socket (`dup`), so `kill` can shut it down.
fn dup_socket(stream: &TcpStream) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd;
    let fd = stream.as_fd().try_clone_to_owned()?;
    Ok(std::net::TcpStream::from(fd))
}

// ---------------------------------------------------------------------------------------------
// FakeRds
// ---------------------------------------------------------------------------------------------

struct Guard {
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Drop for Guard {
    /// Stops serving and fails the test that used this fake if a line it was sent had syntax
    /// the driver must never send ([`FakeRds::violations`]), unless that test already failed.
    fn drop(&mut self) {
        self.task.abort();
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns).values().cloned().collect();
        for conn in conns {
            conn.kill();
        }
        let violations = std::mem::take(&mut *lock(&self.shared.violations));
        if !violations.is_empty() && !std::thread::panicking() {
            panic!("the fake RouterOS was sent syntax the driver must never send: {violations:#?}");
        }
    }
}

/// The fake RDS. Cloning shares it; it stops (and drops every connection) when the last clone
/// is dropped, or with the runtime it was started on.
#[derive(Clone)]
pub struct FakeRds {
    shared: Arc<Shared>,
    guard: Arc<Guard>,
}

impl fmt::Debug for FakeRds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeRds")
            .field("addr", &self.shared.addr)
            .finish()
    }
}

impl FakeRds {
    /// Starts on `config.listen` with a new ed25519 host key, serving on the current tokio
    /// runtime. Panics if it cannot bind.
    pub async fn start(config: FakeRdsConfig) -> FakeRds {
        Self::try_start(config).await.expect("bind the fake RDS")
    }

    pub async fn try_start(config: FakeRdsConfig) -> std::io::Result<FakeRds> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .map_err(std::io::Error::other)?;
        let ssh_config = russh::server::Config {
            server_id: russh::SshId::Standard(SERVER_ID.into()),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: Duration::ZERO,
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key.clone()],
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        };
        let now = now_string(&config.fixed_time);
        let shared = Arc::new(Shared {
            addr,
            host_key,
            user: config.user.clone(),
            authorized: Mutex::new(config.authorized_keys.clone()),
            ssh_config: Arc::new(ssh_config),
            max_sessions_per_connection: config.max_sessions_per_connection,
            fixed_time: config.fixed_time.clone(),
            model: Mutex::new(Model::new(&config, &now)),
            latency: Mutex::new(config.latency),
            hang: watch::channel(false).0,
            held: AtomicUsize::new(0),
            refuse: AtomicBool::new(false),
            paused: watch::channel(false).0,
            faults: Mutex::new(vec![]),
            next_fault: AtomicU64::new(1),
            log: Mutex::new(vec![]),
            violations: Mutex::new(vec![]),
            next_seq: AtomicU64::new(1),
            stats: Mutex::new(Stats::default()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        let guard = Arc::new(Guard {
            task,
            shared: shared.clone(),
        });
        Ok(FakeRds { shared, guard })
    }

    pub fn address(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The host key as one `ssh-ed25519 AAAA...` line (no comment), the shape of a
    /// `--rds-host-key` file.
    pub fn host_public_key_openssh(&self) -> String {
        self.shared
            .host_key
            .public_key()
            .to_openssh()
            .expect("encode host key")
    }

    pub fn host_public_key(&self) -> PublicKey {
        self.shared.host_key.public_key().clone()
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA...`
    pub fn known_hosts_line(&self) -> String {
        format!(
            "[{}]:{} {}",
            self.shared.addr.ip(),
            self.shared.addr.port(),
            self.host_public_key_openssh()
        )
    }

    /// Writes the host key line to `dir/rds_host_key.pub` and returns the path.
    pub fn write_host_key(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create host key dir");
        let path = dir.join("rds_host_key.pub");
        std::fs::write(&path, format!("{}\n", self.host_public_key_openssh()))
            .expect("write host key");
        path
    }

    /// Writes [`known_hosts_line`](Self::known_hosts_line) to `dir/known_hosts` and returns the
    /// path.
    pub fn write_known_hosts(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create known_hosts dir");
        let path = dir.join("known_hosts");
        std::fs::write(&path, format!("{}\n", self.known_hosts_line())).expect("write known_hosts");
        path
    }

    /// Allows one more client key from now on.
    /// Types `command` at the RDS's own terminal, as an administrator (or another client of
    /// the RDS, such as the Go driver) would: the model executes it exactly as it executes
    /// a command that arrives over SSH, but nothing is logged in [`Self::commands`], which
    /// records what the driver under test sent. Returns RouterOS's output.
    pub fn console(&self, command: &str) -> String {
        self.shared.execute(command)
    }

    pub fn authorize_key(&self, key: PublicKey) {
        lock(&self.shared.authorized).push(key);
    }

    // ----- fault injection -----

    /// Delay before every command received from now on runs.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// The next `times` commands containing `substring` get `output` (sent verbatim, add your
    /// own `\r\n`) and `exit_status` instead of running. Returns the rule's id.
    pub fn fail_matching(
        &self,
        substring: &str,
        output: &str,
        exit_status: u32,
        times: usize,
    ) -> u64 {
        self.add_fault(
            substring,
            FaultAction::Fail {
                output: output.into(),
                exit_status,
            },
            times,
        )
    }

    /// The next `times` commands containing `substring` close their connection without an
    /// answer; with `execute` the command runs first (its effect stays, its answer is lost).
    pub fn drop_connection_on(&self, substring: &str, execute: bool, times: usize) -> u64 {
        self.add_fault(substring, FaultAction::DropConnection { execute }, times)
    }

    pub fn add_fault(&self, substring: &str, action: FaultAction, times: usize) -> u64 {
        let id = self.shared.next_fault.fetch_add(1, Ordering::SeqCst);
        lock(&self.shared.faults).push(FaultRule {
            id,
            substring: substring.into(),
            action,
            remaining: times,
        });
        id
    }

    pub fn remove_fault(&self, id: u64) {
        lock(&self.shared.faults).retain(|f| f.id != id);
    }

    /// Removes every fault rule, releases a hang, resumes accepting and sets latency to 0.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
        self.hang(false);
        self.refuse_connections(false);
        self.stop_accepting(false);
        self.set_latency(Duration::ZERO);
    }

    /// Closes every live connection at the TCP level (no SSH disconnect message); their
    /// pending commands are never answered.
    pub fn drop_all_connections(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns).values().cloned().collect();
        for conn in conns {
            conn.kill();
        }
    }

    /// While on, new TCP connections are accepted and closed at once, before the SSH banner
    /// (as a host whose SSH service is down). Live connections are untouched.
    pub fn refuse_connections(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Starts a restart, as RouterOS rebooting looks from outside: every live connection
    /// closes at once and new ones are refused (closed before the banner) until
    /// [`end_restart`](Self::end_restart). The test, not a timer, decides when it ends.
    pub fn begin_restart(&self) {
        self.refuse_connections(true);
        self.drop_all_connections();
    }

    /// Ends a restart: connections are served again (the disks are as they were).
    pub fn end_restart(&self) {
        self.refuse_connections(false);
    }

    /// While on, new connections are not accepted: they wait in the listen backlog with no
    /// banner (as a wedged host); when turned off they are served.
    pub fn stop_accepting(&self, on: bool) {
        self.shared.paused.send_replace(on);
    }

    /// While on, commands are received and logged but not run or answered; turning it off
    /// runs and answers them.
    pub fn hang(&self, on: bool) {
        self.shared.hang.send_replace(on);
    }

    /// How many commands are held by [`hang`](Self::hang) right now: the witness that a
    /// command reached the hang (and so can be neither run nor answered until it lifts).
    pub fn held_commands(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    // ----- observability -----

    /// Every command received, in order of arrival.
    pub fn commands(&self) -> Vec<CommandRecord> {
        lock(&self.shared.log).clone()
    }

    pub fn commands_matching(&self, substring: &str) -> Vec<CommandRecord> {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.command.contains(substring))
            .cloned()
            .collect()
    }

    pub fn clear_commands(&self) {
        lock(&self.shared.log).clear();
    }

    /// The lines refused as violations so far. Each is also a test failure when the fake is
    /// dropped, unless taken with [`FakeRds::take_violations`] first.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.shared.violations).clone()
    }

    /// The violations so far, cleared: for a test that sends a violating line on purpose.
    pub fn take_violations(&self) -> Vec<Violation> {
        std::mem::take(&mut *lock(&self.shared.violations))
    }

    /// Waits until at least `n` commands have been received (fails after a generous
    /// deadline; a wait, not a timing assertion).
    pub async fn wait_for_commands(&self, n: usize) -> Vec<CommandRecord> {
        self.wait_until(&format!("{n} commands received"), || {
            lock(&self.shared.log).len() >= n
        })
        .await;
        self.commands()
    }

    /// Polls `check` until it holds (generous deadline).
    pub async fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fake RDS: timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The most sessions open at once on any one connection.
    pub fn max_concurrent_sessions_per_connection(&self) -> usize {
        lock(&self.shared.stats).max_per_connection
    }

    /// The most sessions open at once over all connections.
    pub fn max_concurrent_sessions_total(&self) -> usize {
        lock(&self.shared.stats).max_total
    }

    /// Sessions opened since the fake started.
    pub fn sessions_opened(&self) -> u64 {
        lock(&self.shared.stats).opened
    }

    /// Session opens refused because the connection already had
    /// [`FakeRdsConfig::max_sessions_per_connection`] open: a client that asked RouterOS for
    /// more than it allows.
    pub fn sessions_refused(&self) -> u64 {
        lock(&self.shared.stats).sessions_refused
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        lock(&self.shared.stats).open_total
    }

    /// Restarts both maxima from the sessions open now.
    pub fn reset_max_concurrency(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns).values().cloned().collect();
        let per_conn = conns.iter().map(|c| lock(&c.open).len()).max().unwrap_or(0);
        let mut stats = lock(&self.shared.stats);
        stats.max_total = stats.open_total;
        stats.max_per_connection = per_conn;
    }

    /// TCP connections served (SSH banner sent), refused ones not counted.
    pub fn connections_accepted(&self) -> u64 {
        lock(&self.shared.stats).accepted
    }

    /// Connections closed at once by [`refuse_connections`](Self::refuse_connections).
    pub fn connections_refused(&self) -> u64 {
        lock(&self.shared.stats).refused
    }

    /// Successful logins.
    pub fn connections_authenticated(&self) -> u64 {
        lock(&self.shared.stats).authenticated
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    // ----- the model -----

    pub fn disks(&self) -> Vec<Disk> {
        let model = lock(&self.shared.model);
        model.disks.iter().map(|d| model.public_disk(d)).collect()
    }

    pub fn disk(&self, slot: &str) -> Option<Disk> {
        let model = lock(&self.shared.model);
        model
            .disk_index(slot)
            .map(|i| model.public_disk(&model.disks[i]))
    }

    pub fn files(&self) -> Vec<FileEntry> {
        lock(&self.shared.model).files.values().cloned().collect()
    }

    /// A file by name or path (a leading `/` is ignored).
    pub fn file(&self, path: &str) -> Option<FileEntry> {
        lock(&self.shared.model)
            .files
            .get(&Model::file_name(path))
            .cloned()
    }

    /// Directory names (no leading `/`), the mount point excluded.
    pub fn directories(&self) -> Vec<String> {
        lock(&self.shared.model).dirs.keys().cloned().collect()
    }

    /// Adds a disk as `/disk add` would (its file created when missing, adopted when present):
    /// [`Disk::volume`] and [`Disk::snapshot`] build the Go driver's shapes. The error is the
    /// RouterOS failure text.
    pub fn add_disk(&self, disk: Disk) -> Result<(), String> {
        let now = self.shared.now();
        lock(&self.shared.model).add_disk(&disk, &now)
    }

    /// Adds a file with no disk (an orphan), consuming space; parent directories are created.
    pub fn add_file(&self, path: &str, size: u64) -> Result<(), String> {
        let now = self.shared.now();
        let mut model = lock(&self.shared.model);
        let name = Model::file_name(path);
        if !model.valid_file_name(&name) {
            return Err("failure: invalid file-path".into());
        }
        if model.files.contains_key(&name) {
            return Err("failure: file already exists".into());
        }
        if size > model.free() {
            return Err("failure: not enough space".into());
        }
        model.create_file(&name, size, String::new(), &now);
        Ok(())
    }

    /// Sets the content marker of a file (by path), standing for data written to it.
    pub fn write_content(&self, path: &str, content: &str) {
        let mut model = lock(&self.shared.model);
        let file = model
            .files
            .get_mut(&Model::file_name(path))
            .expect("no such file");
        file.content = content.into();
    }

    /// What `/disk monitor-traffic <slot> once` prints for `slot` from now on (the pool's
    /// slot or a disk's; other slots still answer `no such item`).
    pub fn set_traffic(&self, slot: &str, traffic: Traffic) {
        lock(&self.shared.model)
            .traffic
            .insert(slot.to_string(), traffic);
    }

    /// Free bytes on the pool now.
    pub fn pool_free_bytes(&self) -> u64 {
        lock(&self.shared.model).free()
    }

    pub fn pool_total_bytes(&self) -> u64 {
        lock(&self.shared.model).total
    }

    /// Runs one command against the model directly (no SSH, no log, no faults) and returns
    /// what the command would print.
    pub fn run_local(&self, command: &str) -> String {
        self.shared.execute(command)
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests of the pure parts
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    // A bench that includes this file is built with cfg(test) but without its #[test]s.
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        for bad in ["", "G", "1.5G", "10GiB", "-1G", "10X", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(group_thousands(53_687_091_200), "53 687 091 200");
        assert_eq!(group_thousands(512), "512");
        assert_eq!(group_thousands(1000), "1 000");
        assert_eq!(human_size(50 << 30), "50.0GiB");
        assert_eq!(human_size(1 << 30), "1024.0MiB");
        assert_eq!(human_size(1_970_278), "1924.1KiB");
        assert_eq!(human_size(10_000_000_000), "9.3GiB");
        assert_eq!(human_size(5 << 40), "5.0TiB");
        assert_eq!(human_size(0), "0");
    }

    #[test]
    fn wrapping_cuts_long_tokens_before_a_dash() {
        let token =
            "file-path=/storage-pool/metal-csi/pvc-ccdecfad-a8bf-572e-9120-464c4d99f12f.img";
        let tokens = ["type=file".into(), token.into(), "file-offset=0".into()];
        let lines = entry_lines(0, 2, "          ", &tokens);
        assert_eq!(
            lines,
            vec![
                " 0             type=file",
                "               file-path=/storage-pool/metal-csi/pvc-ccdecfad-a8bf-572e-9120",
                "               -464c4d99f12f.img",
                "               file-offset=0",
            ]
        );
        assert!(lines.iter().all(|l| l.len() <= LINE_WIDTH));
        // No dash: cut at the margin.
        let long = "x".repeat(100);
        let lines = entry_lines(0, 2, "", std::slice::from_ref(&long));
        assert_eq!(lines[0].len(), LINE_WIDTH);
        assert_eq!(lines.concat().replace(' ', "").len(), 101);
    }

    /// The Go driver's captured monitor-traffic sample, byte for byte (its lines, `\r\n`).
    #[test]
    fn monitor_traffic_prints_the_captured_sample() {
        let mut m = Model::new(&FakeRdsConfig::default(), "2025-01-01 00:00:00");
        m.traffic
            .insert("storage-pool".into(), Traffic::go_sample());
        let want = [
            "                  slot:    storage-pool",
            "              read-ops:         243 401",
            "   read-ops-per-second:               0",
            "            read-bytes:  33 131 503 616",
            "             read-rate:            0bps",
            "           read-merges:               0",
            "             read-time:             0ms",
            "             write-ops:      17 667 231",
            "  write-ops-per-second:              76",
            "           write-bytes: 515 659 673 600",
            "            write-rate:        12.8Mbps",
            "          write-merges:               0",
            "            write-time:             0ms",
            "         in-flight-ops:               0",
            "           active-time:             0ms",
            "             wait-time:             0ms",
            "           discard-ops:               0",
            "         discard-bytes:               0",
            "        discard-merges:               0",
            "          discard-time:             0ms",
            "             flush-ops:               0",
            "            flush-time:             0ms",
        ]
        .map(|l| format!("{l}\r\n"))
        .concat();
        let now = "2025-01-01 00:00:00";
        assert_eq!(
            execute(&mut m, "/disk monitor-traffic storage-pool once", now),
            want
        );
        assert_eq!(
            execute(&mut m, "/disk monitor-traffic nope once", now),
            "no such item\r\n"
        );
        assert_eq!(
            execute(
                &mut m,
                "/disk monitor-traffic storage-pool once bogus=1",
                now
            ),
            "expected end of command (line 1 column 41)\r\n"
        );
        assert!(endless("/disk monitor-traffic storage-pool"));
        assert!(!endless("/disk monitor-traffic storage-pool once"));
        assert_eq!(rate_text(1_500_000_000), "1.5Gbps");
        assert_eq!(rate_text(500_000), "500.0kbps");
        assert_eq!(time_text(1200), "1s200ms");
    }

    fn violation_of(line: &str) -> (String, usize) {
        match parse(line) {
            Err(CliError::Violation { what, col }) => (what, col),
            other => panic!("{line:?} is no violation: {other:?}"),
        }
    }

    fn text_of(line: &str, key: &str) -> String {
        let parsed = parse(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        parsed
            .items
            .iter()
            .find_map(|i| match i {
                Item::Pair {
                    key: k,
                    value: Value::Text(v),
                    ..
                } if k == key => Some(v.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{line:?} has no {key}=: {parsed:?}"))
    }

    /// RouterOS's scripting manual: a command line ends at `;` or a line break, so `a;b` is
    /// two commands. The driver sends one per session, so a second is a violation wherever it
    /// hides: after a value, after a bare menu, inside `[...]`; a trailing `;` is no second
    /// command.
    #[test]
    fn a_semicolon_or_line_break_starts_a_second_command() {
        for (line, col) in [
            ("/disk print;/system reboot", 13),
            ("/disk print detail where slot=a;/system reboot", 33),
            ("/disk remove [find slot=a];/disk remove 0", 28),
            ("/disk print detail where slot=pvc-1\n/disk remove 0", 37),
            ("/disk print detail where slot=pvc-1\r/disk remove 0", 37),
            ("/disk; /file remove 0", 8),
        ] {
            let (what, at) = violation_of(line);
            assert_eq!(
                (what.as_str(), at),
                ("a second command in one line", col),
                "{line:?}"
            );
        }
        assert_eq!(
            violation_of("/disk remove [find slot=a;/system reboot]").0,
            "a second command inside `[...]`"
        );
        assert!(parse("/disk print detail where slot=a;").is_ok());
        assert!(parse("/disk print detail where slot=a ; ").is_ok());
        assert!(parse("/disk print detail where slot=a\r\n").is_ok());
    }

    /// `$` links a variable (`$x`) or substitutes an expression (`$(...)`, `$[...]`) in an
    /// unquoted value and inside double quotes alike; `\$` is a literal `$`. `[...]` other
    /// than the driver's `[find ...]` is a command substitution, also inside a value; `(` and
    /// `{` open an expression and a scope.
    #[test]
    fn substitutions_are_violations_in_unquoted_and_quoted_values() {
        for (line, what, col) in [
            (
                "/disk print detail where slot=$x",
                "a `$` substitution in an unquoted value",
                31,
            ),
            (
                "/disk print detail where slot=a$x",
                "a `$` substitution in an unquoted value",
                32,
            ),
            (
                "/disk print detail where slot=\"$x\"",
                "a `$` substitution in a quoted value",
                32,
            ),
            (
                "/disk print detail where slot=\"a$[/system reboot]\"",
                "a `$` substitution in a quoted value",
                33,
            ),
            (
                "/disk print detail where slot=\"$(1+1)\"",
                "a `$` substitution in a quoted value",
                32,
            ),
            (
                "/disk print detail where slot=a[find]",
                "a `[...]` command substitution inside a value",
                32,
            ),
            (
                "/disk print detail where slot=a(1)",
                "an expression `(...)` in an unquoted value",
                32,
            ),
            (
                "/disk print detail where slot=a{b}",
                "a scope `{...}` in an unquoted value",
                32,
            ),
            (
                "/disk print detail where slot=a\"b\"",
                "a quote inside an unquoted value",
                32,
            ),
            ("/disk remove $x", "a `$` substitution as an argument", 14),
            (
                "/disk remove [/system reboot]",
                "the command substitution `[system ...]` (only `[find ...]`)",
                16,
            ),
            (
                "/disk add copy-from=[/system/script/run x]",
                "the command substitution `[system ...]` (only `[find ...]`)",
                23,
            ),
        ] {
            assert_eq!(violation_of(line), (what.to_string(), col), "{line:?}");
        }
        // `[find ...]` is the one command substitution the driver sends.
        assert!(matches!(
            parse("/disk remove [find slot=a]").unwrap().items[..],
            [Item::Find { .. }]
        ));
        // A backslash outside a string, or a `]` that closes nothing, is a syntax error.
        assert_eq!(
            parse("/disk print detail where slot=a\\b"),
            Err(CliError::Syntax { col: 32 })
        );
        assert_eq!(
            parse("/disk print detail where slot=a]"),
            Err(CliError::Syntax { col: 32 })
        );
    }

    /// Inside double quotes the manual's escapes decode: `\"`, `\\`, `\$`, `\?`, `\n`, `\r`,
    /// `\t`, `\_` (space), `\a`, `\b`, `\f`, `\v` and `\XX` in upper-case hex; `;`, `[` and
    /// `]` are plain text there.
    #[test]
    fn quoted_values_decode_routeros_escapes() {
        for (quoted, text) in [
            (r#""a\$b""#, "a$b"),
            (r#""a\"b""#, "a\"b"),
            (r#""a\\b""#, "a\\b"),
            (r#""a\?b""#, "a?b"),
            (r#""a\nb\rc\td""#, "a\nb\rc\td"),
            (r#""a\_b""#, "a b"),
            (r#""\a\b\f\v""#, "\x07\x08\x0c\x0b"),
            (r#""\48\45\4C\4C\4F""#, "HELLO"),
            (r#""a;b[find]c""#, "a;b[find]c"),
            (r#""a b""#, "a b"),
        ] {
            let line = format!("/disk set [find slot=x] comment={quoted}");
            assert_eq!(text_of(&line, "comment"), text, "{quoted}");
        }
        assert_eq!(
            text_of("/disk set [find slot=x] comment=a-b.c_d/e:f", "comment"),
            "a-b.c_d/e:f",
            "unquoted text without syntax is itself"
        );
    }

    #[test]
    fn parse_errors_have_columns() {
        let mut m = Model::new(&FakeRdsConfig::default(), "2025-01-01 00:00:00");
        let now = "2025-01-01 00:00:00";
        assert_eq!(
            execute(&mut m, "/dsk print", now),
            "bad command name dsk (line 1 column 2)\r\n"
        );
        assert_eq!(
            execute(&mut m, "/disk frob", now),
            "bad command name frob (line 1 column 7)\r\n"
        );
        assert_eq!(
            execute(&mut m, "/disk add type=file bogus=1", now),
            "expected end of command (line 1 column 21)\r\n"
        );
        assert_eq!(
            execute(&mut m, "/disk print detail where slot=\"x", now),
            "syntax error (line 1 column 31)\r\n"
        );
        assert_eq!(execute(&mut m, "/disk", now), "");
    }
}
