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

/// The real runner: `tokio::process`, stdin closed. The child runs in a task of its own, so it
/// is never killed because its caller went away (a dropped RPC): a SIGKILLed `mkfs` leaves a
/// half-written superblock, a killed check a volume that never stages. It is killed only when
/// its own timeout passes, and the error says so.
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
            .kill_on_drop(false);
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
        let cmd = cmd.clone();
        tokio::spawn(run_to_end(spawned, cmd))
            .await
            .unwrap_or_else(|e| {
                Err(CommandError::Spawn {
                    command: "a node tool".into(),
                    source: std::io::Error::other(e),
                })
            })
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

/// All a pipe yields until it closes; a read error ends it with what was read so far.
async fn read_all<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        if let Err(e) = p.read_to_end(&mut buf).await {
            tracing::debug!(error = %e, "reading a tool's output");
        }
    }
    buf
}

/// Waits for `child` and collects what it printed; kills it (and reaps it) when `cmd`'s timeout
/// passes first. Runs in its own task: nothing but that timeout ends the child.
async fn run_to_end(mut child: tokio::process::Child, cmd: Cmd) -> Result<Output, CommandError> {
    let started = std::time::Instant::now();
    let out = tokio::spawn(read_all(child.stdout.take()));
    let err = tokio::spawn(read_all(child.stderr.take()));
    let status = match tokio::time::timeout(cmd.timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            return Err(CommandError::Spawn {
                command: cmd.to_string(),
                source,
            })
        }
        Err(_) => {
            // SIGKILL and reap: when the error is returned, the tool is gone.
            if let Err(e) = child.kill().await {
                tracing::warn!(command = %cmd, error = %e, "could not kill a tool past its timeout");
            }
            tracing::warn!(command = %cmd, seconds = cmd.timeout.as_secs(), "killed a tool past its timeout");
            return Err(CommandError::Timeout {
                command: cmd.to_string(),
                timeout: cmd.timeout,
            });
        }
    };
    let collect = |h: tokio::task::JoinHandle<Vec<u8>>| async move { h.await.unwrap_or_default() };
    let output = Output {
        code: status.code(),
        stdout: String::from_utf8_lossy(&collect(out).await).into_owned(),
        stderr: String::from_utf8_lossy(&collect(err).await).into_owned(),
    };
    tracing::debug!(command = %cmd, code = ?output.code, seconds = started.elapsed().as_secs_f64(), "ran");
    Ok(output)
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

    /// `sh -c script`: test scripts carry temporary paths, which no [`CommandArg`] admits.
    fn sh(script: String) -> Cmd {
        Cmd {
            program: "sh",
            args: vec!["-c".into(), script.into()],
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Test helpers: FIFOs to order a real child against the test without sleeping, and a
    /// pidfd to wait for a process that is not the test's own child.
    mod proc {
        use std::ffi::CString;
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        use std::path::Path;

        pub fn mkfifo(path: &Path) {
            let c = CString::new(path.as_os_str().as_bytes()).unwrap();
            assert_eq!(
                unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
                0,
                "mkfifo {path:?}"
            );
        }

        /// Reads the pid the child wrote to the FIFO `path` (blocks until it does).
        pub async fn read_pid(path: &Path) -> i32 {
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || {
                std::fs::read_to_string(&path)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            })
            .await
            .unwrap()
        }

        /// A pidfd of `pid`, taken while it is known to be alive.
        pub fn pidfd(pid: i32) -> OwnedFd {
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            assert!(
                fd >= 0,
                "pidfd_open {pid}: {}",
                std::io::Error::last_os_error()
            );
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        }

        /// Blocks until the process of `fd` has exited (killed or not).
        pub async fn exited(fd: OwnedFd) {
            use std::os::fd::AsRawFd;
            tokio::task::spawn_blocking(move || {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                assert_eq!(unsafe { libc::poll(&mut p, 1, -1) }, 1);
            })
            .await
            .unwrap()
        }

        /// Whether the process of `fd` has exited, without waiting.
        pub fn has_exited(fd: &OwnedFd) -> bool {
            use std::os::fd::AsRawFd;
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        }
    }

    /// A tool whose caller went away (the kubelet's deadline passed, tonic dropped the RPC)
    /// runs to the end: a SIGKILLed mkfs leaves a half-written superblock. Catches
    /// `kill_on_drop(true)`, or the child awaited in the caller's future instead of its own task.
    #[tokio::test]
    async fn a_tool_outlives_the_caller_that_went_away() {
        let dir = tempfile::tempdir().unwrap();
        let (started, go, done) = (
            dir.path().join("started"),
            dir.path().join("go"),
            dir.path().join("done"),
        );
        proc::mkfifo(&started);
        proc::mkfifo(&go);
        let script = format!(
            "echo $$ > {started}; read x < {go}; echo finished > {done}",
            started = started.display(),
            go = go.display(),
            done = done.display()
        );
        let caller = tokio::spawn(async move { SystemRunner.run(&sh(script)).await });
        let pid = proc::read_pid(&started).await;
        let child = proc::pidfd(pid);
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // O_RDWR opens a FIFO without waiting for a reader, so a killed child cannot hang this.
        let mut gate = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&go)
            .unwrap();
        std::io::Write::write_all(&mut gate, b"go\n").unwrap();
        proc::exited(child).await;
        assert_eq!(
            std::fs::read_to_string(&done).ok().as_deref(),
            Some("finished\n"),
            "the tool was killed when its caller went away"
        );
    }

    /// A tool past its own timeout is killed, and the error says so. Catches a timeout that
    /// only stops waiting (with `kill_on_drop(false)`, nothing else kills the child). The clock
    /// is paused: it cannot advance to the timeout before the child has reported its pid (a
    /// blocking task is in flight until then).
    #[tokio::test(start_paused = true)]
    async fn a_tool_past_its_own_timeout_is_killed_and_the_error_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let started = dir.path().join("started");
        proc::mkfifo(&started);
        let script = format!("echo $$ > {}; exec sleep 1000", started.display());
        let run = tokio::spawn(async move {
            SystemRunner
                .run(&sh(script).timeout(Duration::from_secs(30)))
                .await
        });
        let child = proc::pidfd(proc::read_pid(&started).await);
        let err = run.await.unwrap().unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("was killed"), "{err}");
        assert!(
            proc::has_exited(&child),
            "the child still runs after its timeout"
        );
    }
}
