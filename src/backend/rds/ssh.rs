//! The SSH link to RouterOS: a small pool of connections, one exec channel per command.
//!
//! Owns connecting (public-key auth, host-key verification on by default), the pool, the
//! per-command timeout and reconnection with capped, jittered backoff. It knows nothing of
//! disks: it runs a rendered [`RosCommand`] and returns what RouterOS printed.
//!
//! RouterOS serializes the opening of sessions on one connection, so each connection opens its
//! channels one at a time and carries at most `sessions_per_connection` commands at once; the
//! pool spreads commands over `pool_size` connections. A connection that breaks is dropped and
//! re-dialled on next use, no sooner than its backoff allows.
//!
//! A command may spend until its deadline: the caller's ([`crate::deadline`]), or
//! `command_timeout` from its start, whichever is sooner. While the RDS cannot be reached, a
//! command waits for the next dial when its deadline covers it (so a call that arrives during
//! a reconnect succeeds once the RDS is back), and fails at once with
//! [`SshError::Unavailable`], saying when that dial will be, when it does not. Whatever the
//! RDS does (down, refusing, hung before or after the banner), the command answers by its
//! deadline. A command that never reached RouterOS (its connection was found dead when opening
//! its session) is tried again on a new connection, within the same deadline; one that may
//! have reached it is not, as its effect is unknown.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::command::RosCommand;
use crate::metrics::Metrics;

/// How the RDS's host key is checked.
#[derive(Clone, Debug)]
pub enum HostKeys {
    /// Accept only these keys.
    Verify(Vec<PublicKey>),
    /// `--rds-insecure-skip-verify`: accept any key (logged loudly, shown in a metric label).
    Insecure,
}

impl HostKeys {
    /// Reads `--rds-host-key`: a file of bare public keys (`ssh-ed25519 AAAA… [comment]`), or a
    /// known_hosts file, of which the lines naming `host` (port-qualified as OpenSSH writes it)
    /// are used.
    pub fn load(path: &Path, host: &str, port: u16) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--rds-host-key {}: {e}", path.display()))?;
        let bare: Vec<PublicKey> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| PublicKey::from_openssh(l).ok())
            .collect();
        if !bare.is_empty() {
            return Ok(Self::Verify(bare));
        }
        let known = russh::keys::known_hosts::known_host_keys_path(host, port, path)
            .map_err(|e| format!("--rds-host-key {}: {e}", path.display()))?;
        if known.is_empty() {
            return Err(format!(
                "--rds-host-key {} holds no public key, and no known_hosts line for {host} port {port}",
                path.display()
            ));
        }
        Ok(Self::Verify(known.into_iter().map(|(_, k)| k).collect()))
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Verify(_) => "verified",
            Self::Insecure => "insecure-skip-verify",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SshConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: Arc<PrivateKey>,
    pub host_keys: HostKeys,
    pub pool_size: usize,
    pub sessions_per_connection: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

impl SshConfig {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What one command printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_status: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The RDS cannot be reached now (down, refusing, connection lost, every session busy
    /// past the deadline, or a command that did not finish in time).
    #[error("{0}")]
    Unavailable(String),
    /// The RDS presented a host key that is not the configured one: never retried silently.
    #[error("{0}")]
    HostKey(String),
    /// Our key was refused.
    #[error("{0}")]
    Auth(String),
}

struct Verifier {
    keys: HostKeys,
    /// The key the server presented, when it did not match.
    rejected: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        presented: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some("a certificate (only plain host keys are configured)".into());
                return Ok(false);
            }
        };
        match &self.keys {
            HostKeys::Insecure => Ok(true),
            HostKeys::Verify(keys) => {
                let ok = keys.iter().any(|k| k.key_data() == key.key_data());
                if !ok {
                    *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(key.fingerprint(HashAlg::Sha256).to_string());
                }
                Ok(ok)
            }
        }
    }
}

/// Reconnection backoff: 500 ms doubling to 30 s, ±20 % jitter.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
    last_error: Option<String>,
}

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

impl Backoff {
    fn failed(&mut self, error: String) {
        self.failures = self.failures.saturating_add(1);
        let exp = BACKOFF_BASE.saturating_mul(1u32 << self.failures.min(16).saturating_sub(1));
        let delay = exp.min(BACKOFF_CAP);
        let jitter = 0.8 + 0.4 * (rand_unit());
        self.not_before = Some(Instant::now() + delay.mul_f64(jitter));
        self.last_error = Some(error);
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

/// A cheap source of jitter; not for anything that needs real randomness.
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    (h.finish() % 10_000) as f64 / 10_000.0
}

/// When a command may next dial a connection, given that connection's backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dial {
    /// Now: no backoff, or it has passed.
    Now,
    /// At this instant, before the command's deadline: wait for it.
    At(Instant),
    /// Not before this instant, which is at or past the command's deadline: fail now.
    TooLate(Instant),
}

/// Decides whether a command with `deadline` waits for the dial its backoff allows at
/// `not_before`. Waiting is worth it only when the dial can start before the deadline; a dial
/// that then hangs is ended by the deadline all the same.
fn when_to_dial(not_before: Option<Instant>, now: Instant, deadline: Instant) -> Dial {
    match not_before {
        Some(at) if at > now && at < deadline => Dial::At(at),
        Some(at) if at > now => Dial::TooLate(at),
        _ => Dial::Now,
    }
}

/// Why one try of a command failed.
enum TryError {
    /// Nothing reached RouterOS (the connection was found dead opening the session): the
    /// command may go again on a new connection.
    NotSent(SshError),
    /// The command may have run, or the link cannot be had at all: final.
    Final(SshError),
}

/// A command's place on the least busy connection, given back when dropped, so a command cut
/// off by its deadline (its future dropped mid-wait) does not count against the connection.
struct InFlight<'a> {
    counts: &'a Mutex<Vec<usize>>,
    index: usize,
}

impl<'a> InFlight<'a> {
    fn take(counts: &'a Mutex<Vec<usize>>) -> Self {
        let mut n = counts.lock().unwrap_or_else(|p| p.into_inner());
        let (index, _) = n
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| **n)
            .expect("at least one connection");
        n[index] += 1;
        Self { counts, index }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())[self.index] -= 1;
    }
}

struct Connection {
    handle: tokio::sync::Mutex<Option<Arc<Handle<Verifier>>>>,
    /// Channels are opened one at a time per connection.
    opening: tokio::sync::Mutex<()>,
    backoff: Mutex<Backoff>,
}

/// The pool. Cheap to clone.
#[derive(Clone)]
pub struct SshPool {
    inner: Arc<Inner>,
}

struct Inner {
    config: SshConfig,
    connections: Vec<Connection>,
    /// Commands in flight per connection; never above `sessions_per_connection`.
    in_flight: Mutex<Vec<usize>>,
    /// `pool_size * sessions_per_connection` permits.
    permits: Semaphore,
    metrics: Arc<Metrics>,
    connected: AtomicBool,
    /// Since when no connection has been up, after one was: the start of an outage, which
    /// `rds_csi_rds_reconnect_duration_seconds` measures to the next connection made.
    down_since: Mutex<Option<Instant>>,
}

impl SshPool {
    pub fn new(config: SshConfig, metrics: Arc<Metrics>) -> Self {
        let pool = config.pool_size.max(1);
        let per = config.sessions_per_connection.max(1);
        let connections = (0..pool)
            .map(|_| Connection {
                handle: tokio::sync::Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
                backoff: Mutex::new(Backoff::default()),
            })
            .collect();
        let pool = Self {
            inner: Arc::new(Inner {
                permits: Semaphore::new(pool * per),
                in_flight: Mutex::new(vec![0; pool]),
                connections,
                config,
                metrics,
                connected: AtomicBool::new(false),
                down_since: Mutex::new(None),
            }),
        };
        pool.set_connected(false);
        pool
    }

    pub fn config(&self) -> &SshConfig {
        &self.inner.config
    }

    /// Whether the last attempt to reach the RDS succeeded.
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }

    /// Records the link's state; a change from up to down starts an outage, and the next
    /// change to up ends it (one `reconnect_duration` sample). The first connection after
    /// start is not a reconnect.
    fn set_connected(&self, up: bool) {
        let was = self.inner.connected.swap(up, Ordering::AcqRel);
        {
            let mut down_since = self
                .inner
                .down_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match (was, up) {
                (true, false) => *down_since = Some(Instant::now()),
                (false, true) => {
                    if let Some(since) = down_since.take() {
                        self.inner
                            .metrics
                            .rds
                            .reconnect_duration
                            .observe(since.elapsed().as_secs_f64());
                    }
                }
                _ => {}
            }
        }
        let c = &self.inner.config;
        self.inner
            .metrics
            .rds
            .connection_state
            // `address` is the host alone, as the Go driver labels it.
            .with_label_values(&[&c.host, c.host_keys.label()])
            .set(i64::from(up));
    }

    /// The health check: forgets connections that have closed, and when none is left, dials
    /// one (if its backoff allows now; it never waits). Keeps `connected()` true to the link's
    /// state, so readiness follows the RDS even when no command is running.
    pub async fn check(&self) -> Result<(), SshError> {
        let mut up = false;
        for c in &self.inner.connections {
            let mut slot = c.handle.lock().await;
            if slot.as_ref().is_some_and(|h| h.is_closed()) {
                *slot = None;
            }
            up |= slot.is_some();
        }
        if up {
            self.set_connected(true);
            return Ok(());
        }
        if self.connected() {
            tracing::warn!(rds = %self.inner.config.address(), "every SSH connection to the RDS has closed");
        }
        self.set_connected(false);
        self.handle(0, Instant::now()).await.map(drop)
    }

    /// Runs one command by its deadline: the caller's ([`crate::deadline::current`]) or
    /// `command_timeout` from now, whichever is sooner. Waiting for a connection (a session,
    /// a backoff, a dial) counts against it.
    pub async fn run(&self, command: &RosCommand) -> Result<CommandOutput, SshError> {
        let started = Instant::now();
        let (deadline, whose) = self.deadline(started);
        let result = match tokio::time::timeout_at(deadline, async {
            let _permit = self.session().await?;
            self.run_held(command, deadline).await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Self::late(command, started, deadline, whose)),
        };
        self.count(command, started, &result);
        result
    }

    /// Runs the command `choose` picks at the moment a session is free, by the same deadline
    /// as [`Self::run`]: for a caller that decides what to send only once it can be sent (a
    /// lookup that others may still join until then). `choose` is not called when no session
    /// comes by the deadline or the pool is closed.
    pub async fn run_chosen(
        &self,
        choose: impl FnOnce() -> RosCommand,
    ) -> Result<(RosCommand, CommandOutput), SshError> {
        let started = Instant::now();
        let (deadline, whose) = self.deadline(started);
        let permit = match tokio::time::timeout_at(deadline, self.session()).await {
            Ok(p) => p?,
            Err(_) => {
                return Err(SshError::Unavailable(format!(
                    "every session to the RDS stayed busy for {:.1}s ({whose})",
                    deadline.saturating_duration_since(started).as_secs_f64()
                )))
            }
        };
        let command = choose();
        let result =
            match tokio::time::timeout_at(deadline, self.run_held(&command, deadline)).await {
                Ok(r) => r,
                Err(_) => Err(Self::late(&command, started, deadline, whose)),
            };
        drop(permit);
        self.count(&command, started, &result);
        result.map(|out| (command, out))
    }

    /// The caller's deadline or `command_timeout` from `started`, whichever is sooner, and
    /// whose it is.
    fn deadline(&self, started: Instant) -> (Instant, &'static str) {
        let own = started + self.inner.config.command_timeout;
        match crate::deadline::current() {
            Some(caller) if caller < own => (caller, "this call's deadline"),
            _ => (own, "--rds-command-timeout"),
        }
    }

    fn late(command: &RosCommand, started: Instant, deadline: Instant, whose: &str) -> SshError {
        SshError::Unavailable(format!(
            "the RDS did not answer `{}` within {:.1}s ({whose})",
            command.label(),
            deadline.saturating_duration_since(started).as_secs_f64()
        ))
    }

    fn count(
        &self,
        command: &RosCommand,
        started: Instant,
        result: &Result<CommandOutput, SshError>,
    ) {
        let label = match result {
            Ok(_) => "ok",
            Err(SshError::Unavailable(_)) => "unavailable",
            Err(SshError::HostKey(_)) => "host_key",
            Err(SshError::Auth(_)) => "auth",
        };
        let m = &self.inner.metrics;
        m.rds
            .commands_total
            .with_label_values(&[command.label(), label])
            .inc();
        m.rds
            .command_duration
            .with_label_values(&[command.label()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// One of the pool's `pool_size * sessions_per_connection` sessions, held until dropped.
    async fn session(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SshError> {
        self.inner
            .permits
            .acquire()
            .await
            .map_err(|_| SshError::Unavailable("the SSH pool is closed".into()))
    }

    /// Runs `command` on the least busy connection; the caller holds a session.
    async fn run_held(
        &self,
        command: &RosCommand,
        deadline: Instant,
    ) -> Result<CommandOutput, SshError> {
        let place = InFlight::take(&self.inner.in_flight);
        loop {
            match self.exec(place.index, command, deadline).await {
                Ok(out) => return Ok(out),
                Err(TryError::Final(e)) => return Err(e),
                // The broken connection is forgotten and its backoff set: the next try waits
                // for the re-dial or fails saying when it will be.
                Err(TryError::NotSent(e)) => {
                    tracing::debug!(error = %e, command = command.label(), "trying the command again on a new connection");
                }
            }
        }
    }

    async fn exec(
        &self,
        index: usize,
        command: &RosCommand,
        deadline: Instant,
    ) -> Result<CommandOutput, TryError> {
        let handle = self
            .handle(index, deadline)
            .await
            .map_err(TryError::Final)?;
        let conn = &self.inner.connections[index];
        let opened = {
            let _one_at_a_time = conn.opening.lock().await;
            handle.channel_open_session().await
        };
        let mut channel = match opened {
            Ok(c) => c,
            Err(e) => {
                return Err(TryError::NotSent(
                    self.broken(index, &handle, format!("opening a session: {e}"))
                        .await,
                ))
            }
        };
        if let Err(e) = channel.exec(true, command.to_string()).await {
            return Err(TryError::Final(
                self.broken(index, &handle, format!("sending the command: {e}"))
                    .await,
            ));
        }
        let mut out = CommandOutput::default();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        if handle.is_closed() && out.exit_status.is_none() {
            return Err(TryError::Final(
                self.broken(
                    index,
                    &handle,
                    "the connection closed during the command".into(),
                )
                .await,
            ));
        }
        out.stdout = String::from_utf8_lossy(&stdout).into_owned();
        out.stderr = String::from_utf8_lossy(&stderr).into_owned();
        Ok(out)
    }

    /// Forgets a broken connection; the next command re-dials it (after its backoff).
    async fn broken(&self, index: usize, handle: &Arc<Handle<Verifier>>, why: String) -> SshError {
        let conn = &self.inner.connections[index];
        let mut slot = conn.handle.lock().await;
        if slot.as_ref().is_some_and(|h| Arc::ptr_eq(h, handle)) {
            *slot = None;
            tracing::warn!(rds = %self.inner.config.address(), error = %why, "lost the SSH connection to the RDS");
            conn.backoff
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .failed(why.clone());
        }
        let any_up = self.any_connection_up().await;
        self.set_connected(any_up);
        SshError::Unavailable(format!(
            "lost the connection to the RDS at {}: {why}",
            self.inner.config.address()
        ))
    }

    async fn any_connection_up(&self) -> bool {
        for c in &self.inner.connections {
            if let Ok(slot) = c.handle.try_lock() {
                if slot.as_ref().is_some_and(|h| !h.is_closed()) {
                    return true;
                }
            } else {
                return true;
            }
        }
        false
    }

    /// A live connection at `index`: the one there, or a new one dialled when its backoff
    /// allows. Waits for that dial when it comes before `deadline`, and dials again after a
    /// failure while the next dial still does; otherwise fails at once, saying when the next
    /// dial will be. A host key or key refusal is final.
    async fn handle(
        &self,
        index: usize,
        deadline: Instant,
    ) -> Result<Arc<Handle<Verifier>>, SshError> {
        let conn = &self.inner.connections[index];
        loop {
            let mut slot = conn.handle.lock().await;
            if let Some(h) = slot.as_ref() {
                if !h.is_closed() {
                    return Ok(h.clone());
                }
                *slot = None;
            }
            let now = Instant::now();
            let next = {
                let backoff = conn.backoff.lock().unwrap_or_else(|p| p.into_inner());
                match when_to_dial(backoff.not_before, now, deadline) {
                    Dial::TooLate(at) => {
                        return Err(SshError::Unavailable(format!(
                            "the RDS at {} is unreachable ({}); next attempt in {:.1}s, later \
                             than this call can wait ({:.1}s left)",
                            self.inner.config.address(),
                            backoff.last_error.as_deref().unwrap_or("unknown error"),
                            at.saturating_duration_since(now).as_secs_f64(),
                            deadline.saturating_duration_since(now).as_secs_f64()
                        )))
                    }
                    next => next,
                }
            };
            if let Dial::At(at) = next {
                drop(slot);
                tokio::time::sleep_until(at).await;
                continue;
            }
            match self.connect().await {
                Ok(h) => {
                    let h = Arc::new(h);
                    *slot = Some(h.clone());
                    conn.backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .succeeded();
                    if !self.connected() {
                        tracing::info!(rds = %self.inner.config.address(), "connected to the RDS");
                    }
                    self.inner
                        .metrics
                        .rds
                        .reconnect_total
                        .with_label_values(&["success"])
                        .inc();
                    self.set_connected(true);
                    return Ok(h);
                }
                Err(e) => {
                    conn.backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failed(e.to_string());
                    self.inner
                        .metrics
                        .rds
                        .reconnect_total
                        .with_label_values(&["failure"])
                        .inc();
                    drop(slot);
                    let any_up = self.any_connection_up().await;
                    self.set_connected(any_up);
                    if !matches!(e, SshError::Unavailable(_)) {
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Handle<Verifier>, SshError> {
        let c = &self.inner.config;
        let rejected = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            keys: c.host_keys.clone(),
            rejected: rejected.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let address = c.address();
        let dial = client::connect(config, (c.host.as_str(), c.port), verifier);
        let mut handle = match tokio::time::timeout(c.connect_timeout, dial).await {
            Err(_) => {
                return Err(SshError::Unavailable(format!(
                    "connecting to the RDS at {address} timed out after {}s",
                    c.connect_timeout.as_secs_f64()
                )))
            }
            Ok(Err(e)) => {
                if let Some(got) = rejected.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(SshError::HostKey(format!(
                        "the RDS at {address} presented host key {got}, which is not the one \
                         configured in --rds-host-key; refusing to connect"
                    )));
                }
                return Err(SshError::Unavailable(format!(
                    "cannot connect to the RDS at {address}: {e}"
                )));
            }
            Ok(Ok(h)) => h,
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| SshError::Unavailable(format!("SSH negotiation with {address}: {e}")))?
            .flatten();
        let auth = handle
            .authenticate_publickey(
                c.user.clone(),
                PrivateKeyWithHashAlg::new(c.key.clone(), hash),
            )
            .await
            .map_err(|e| SshError::Unavailable(format!("authenticating to {address}: {e}")))?;
        if !auth.success() {
            return Err(SshError::Auth(format!(
                "the RDS at {address} refused the key in --rds-key-file for user {}",
                c.user
            )));
        }
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per branch of [`when_to_dial`]: removing the wait (`At`) makes a call arriving
    /// during a reconnect fail although its deadline covers the dial; removing `TooLate` makes
    /// a short call wait past its deadline.
    #[test]
    fn a_call_waits_for_a_dial_its_deadline_covers_and_only_then() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let cases = [
            ("no backoff", None, now + s(1), Dial::Now),
            ("backoff passed", Some(now - s(1)), now + s(1), Dial::Now),
            ("backoff ends now", Some(now), now + s(1), Dial::Now),
            (
                "dial before the deadline",
                Some(now + s(1)),
                now + s(30),
                Dial::At(now + s(1)),
            ),
            (
                "dial at the deadline",
                Some(now + s(5)),
                now + s(5),
                Dial::TooLate(now + s(5)),
            ),
            (
                "dial after the deadline",
                Some(now + s(8)),
                now + s(5),
                Dial::TooLate(now + s(8)),
            ),
            (
                "no time left at all",
                Some(now + s(1)),
                now,
                Dial::TooLate(now + s(1)),
            ),
        ];
        for (what, not_before, deadline, want) in cases {
            assert_eq!(when_to_dial(not_before, now, deadline), want, "{what}");
        }
    }

    /// Catches a command's connection count not given back when its future is dropped (cut off
    /// by its deadline): the connection would look busy for good.
    #[test]
    fn a_commands_place_on_a_connection_is_given_back_however_it_ends() {
        let counts = Mutex::new(vec![0, 0]);
        let a = InFlight::take(&counts);
        let b = InFlight::take(&counts);
        assert_eq!(
            (a.index, b.index),
            (0, 1),
            "the least busy connection first"
        );
        drop(a);
        assert_eq!(*counts.lock().unwrap(), vec![0, 1]);
        let c = InFlight::take(&counts);
        assert_eq!(c.index, 0);
        drop((b, c));
        assert_eq!(*counts.lock().unwrap(), vec![0, 0]);
    }

    /// The backoff doubles from 0.5 s to its 30 s cap, each delay jittered by at most 20 %, and
    /// a success forgets it.
    #[tokio::test(start_paused = true)]
    async fn the_backoff_doubles_to_its_cap_within_its_jitter() {
        let mut b = Backoff::default();
        for (failures, nominal) in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (40, 30.0)] {
            while b.failures < failures {
                b.failed("refused".into());
            }
            let delay = b
                .not_before
                .expect("a failure sets a backoff")
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            assert!(
                (nominal * 0.8..=nominal * 1.2).contains(&delay),
                "after {failures} failures: {delay}s, nominal {nominal}s"
            );
        }
        b.succeeded();
        assert_eq!(b.not_before, None);
    }
}
