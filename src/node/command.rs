//! Running external tools (losetup, blkid, mkfs, fsck, resize2fs, ...): an argument vector,
//! never a shell string; a timeout on every command; stdout, stderr and the exit code captured.
//!
//! Owns process spawning and nothing else. Arguments are only static text or validated values
//! (see [`CommandArg`]), so a command cannot carry an unchecked string from a request.

use std::ffi::OsString;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use super::paths::CommandArg;

/// Default time a tool may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for tools whose work grows with the volume (mkfs, fsck, resize).
pub const LONG_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// One command: a program found on `PATH`, its arguments and how long it may take.
#[derive(Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: &'static str,
    pub args: Vec<OsString>,
    pub timeout: Duration,
}

impl Cmd {
    pub fn new(program: &'static str) -> Self {
        Self {
            program,
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, arg: impl CommandArg) -> Self {
        self.args.push(arg.to_arg());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program)?;
        for a in &self.args {
            write!(f, " {}", a.to_string_lossy())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a finished command printed and how it exited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The most useful text to show a human: stderr, else stdout, trimmed and bounded.
    pub fn message(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            self.stdout.trim()
        } else {
            self.stderr.trim()
        };
        let mut text: String = text.chars().take(600).collect();
        if text.len() < self.stderr.trim().len().max(self.stdout.trim().len()) {
            text.push_str(" …");
        }
        text
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{program} is not installed on this node (not found on PATH)")]
    NotInstalled { program: &'static str },
    #[error("`{command}` did not finish within {}s and was killed", timeout.as_secs())]
    Timeout { command: String, timeout: Duration },
    #[error("`{command}` could not be run: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// Runs commands. A non-zero exit is not an error here: callers decide what each code means
/// (`blkid` exits 2 when it finds nothing, which is an answer, not a failure).
#[async_trait]
pub trait CommandRunner: Send + Sync + 'static {
    async fn run(&self, cmd: &Cmd) -> Result<Output, CommandError>;
    /// Whether `program` can be run here (e.g. `mkfs.xfs`).
    fn installed(&self, program: &'static str) -> bool;
}

/// The real runner: `tokio::process`, stdin closed, the child killed when the timeout passes.
#[derive(Clone, Debug, Default)]
pub struct SystemRunner;

#[async_trait]
impl CommandRunner for SystemRunner {
    async fn run(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        let mut child = tokio::process::Command::new(cmd.program);
        child
            .args(&cmd.args)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let started = std::time::Instant::now();
        let spawned = match child.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CommandError::NotInstalled {
                    program: cmd.program,
                })
            }
            Err(source) => {
                return Err(CommandError::Spawn {
                    command: cmd.to_string(),
                    source,
                })
            }
        };
        let out = match tokio::time::timeout(cmd.timeout, spawned.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(CommandError::Spawn {
                    command: cmd.to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(CommandError::Timeout {
                    command: cmd.to_string(),
                    timeout: cmd.timeout,
                })
            }
        };
        let output = Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        tracing::debug!(command = %cmd, code = ?output.code, seconds = started.elapsed().as_secs_f64(), "ran");
        Ok(output)
    }

    fn installed(&self, program: &'static str) -> bool {
        let Some(path) = std::env::var_os("PATH") else {
            return false;
        };
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(program))
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_exit_codes() {
        let out = SystemRunner
            .run(
                &Cmd::new("sh")
                    .arg("-c")
                    .arg("echo out; echo err >&2; exit 3"),
            )
            .await
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.message(), "err");
    }

    #[tokio::test]
    async fn a_missing_program_is_not_installed() {
        let err = SystemRunner
            .run(&Cmd::new("rds-csi-no-such-tool"))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::NotInstalled { .. }), "{err}");
        assert!(!SystemRunner.installed("rds-csi-no-such-tool"));
        assert!(SystemRunner.installed("sh"));
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let err = SystemRunner
            .run(
                &Cmd::new("sleep")
                    .arg("30")
                    .timeout(Duration::from_millis(100)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
    }
}
