//! The SSH link to RouterOS: a small pool of connections, one exec channel per command.
//!
//! Owns connecting (public-key auth, host-key verification on by default), the pool, the
//! per-command timeout and reconnection with capped, jittered backoff. It knows nothing of
//! disks: it runs a rendered [`RosCommand`] and returns what RouterOS printed.
//!
//! RouterOS serializes the opening of sessions on one connection, so each connection opens its
//! channels one at a time and carries at most `sessions_per_connection` commands at once; the
//! pool spreads commands over `pool_size` connections. A connection that breaks is dropped and
//! re-dialled on next use, no sooner than its backoff allows; while no connection can be made,
//! commands fail at once with [`SshError::Unavailable`] rather than waiting.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::sync::Semaphore;

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
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() % 10_000) as f64 / 10_000.0
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

    fn set_connected(&self, up: bool) {
        self.inner.connected.store(up, Ordering::Release);
        let c = &self.inner.config;
        self.inner
            .metrics
            .rds
            .connection_state
            .with_label_values(&[&c.address(), c.host_keys.label()])
            .set(i64::from(up));
    }

    /// The health check: forgets connections that have closed, and when none is left, dials
    /// one (within its backoff). Keeps `connected()` true to the link's state, so readiness
    /// follows the RDS even when no command is running.
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
        self.handle(0).await.map(drop)
    }

    /// Runs one command, within `command_timeout` overall.
    pub async fn run(&self, command: &RosCommand) -> Result<CommandOutput, SshError> {
        let started = Instant::now();
        let timeout = self.inner.config.command_timeout;
        let result = match tokio::time::timeout(timeout, self.run_inner(command)).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Unavailable(format!(
                "the RDS did not answer `{}` within {}s",
                command.label(),
                timeout.as_secs_f64()
            ))),
        };
        let label = match &result {
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
        result
    }

    async fn run_inner(&self, command: &RosCommand) -> Result<CommandOutput, SshError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| SshError::Unavailable("the SSH pool is closed".into()))?;
        let index = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let (index, _) = in_flight
                .iter()
                .enumerate()
                .min_by_key(|(_, n)| **n)
                .expect("at least one connection");
            in_flight[index] += 1;
            index
        };
        let result = self.exec(index, command).await;
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())[index] -= 1;
        result
    }

    async fn exec(&self, index: usize, command: &RosCommand) -> Result<CommandOutput, SshError> {
        let handle = self.handle(index).await?;
        let conn = &self.inner.connections[index];
        let opened = {
            let _one_at_a_time = conn.opening.lock().await;
            handle.channel_open_session().await
        };
        let mut channel = match opened {
            Ok(c) => c,
            Err(e) => {
                return Err(self
                    .broken(index, &handle, format!("opening a session: {e}"))
                    .await)
            }
        };
        if let Err(e) = channel.exec(true, command.to_string()).await {
            return Err(self
                .broken(index, &handle, format!("sending the command: {e}"))
                .await);
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
            return Err(self
                .broken(
                    index,
                    &handle,
                    "the connection closed during the command".into(),
                )
                .await);
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

    async fn handle(&self, index: usize) -> Result<Arc<Handle<Verifier>>, SshError> {
        let conn = &self.inner.connections[index];
        let mut slot = conn.handle.lock().await;
        if let Some(h) = slot.as_ref() {
            if !h.is_closed() {
                return Ok(h.clone());
            }
            *slot = None;
        }
        {
            let backoff = conn.backoff.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = backoff.not_before.filter(|at| *at > Instant::now()) {
                return Err(SshError::Unavailable(format!(
                    "the RDS at {} is unreachable ({}); next attempt in {:.1}s",
                    self.inner.config.address(),
                    backoff.last_error.as_deref().unwrap_or("unknown error"),
                    at.saturating_duration_since(Instant::now()).as_secs_f64()
                )));
            }
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
                Ok(h)
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
                Err(e)
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
