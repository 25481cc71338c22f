//! Recording fakes of the node's seams, for unit tests: a command runner that logs every
//! command line and answers from a script; and the record a staged and published volume
//! leaves, shared by the plugin's and the reconciler's tests. The mounter is
//! [`super::fake_sysfs::FakeMounter`], beside the `/proc` whose mount table it keeps.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::command::{Cmd, CommandError, CommandRunner, Output};
use super::device::Backing;
use super::paths::{AbsPath, BlockDevice};
use super::records::{Origin, PublishRecord, StageRecord};
use crate::domain::fixtures::rwo_ext4;
use crate::domain::FsType;
use crate::ids::VolumeId;

/// The record NodeStageVolume then NodePublishVolume leave for `volume`: staged as [`rwo_ext4`]
/// at `staging` on `device` (its first and only device), published read-write at `target`.
pub fn staged_ext4(
    volume: &str,
    backing: Backing,
    staging: &AbsPath,
    target: &AbsPath,
    device: &BlockDevice,
) -> StageRecord {
    let mut record = StageRecord {
        volume: VolumeId::try_from(volume).unwrap(),
        staging: staging.clone(),
        capability: rwo_ext4(),
        fs: Some(FsType::parse("ext4").unwrap()),
        readonly: false,
        backing,
        device: None,
        devices: Vec::new(),
        publishes: [(
            target.clone(),
            PublishRecord {
                capability: rwo_ext4(),
                readonly: false,
            },
        )]
        .into(),
        origin: Origin::Staged,
    };
    record.saw(device);
    record
}

type Handler = Arc<dyn Fn(&Cmd) -> Result<Output, CommandError> + Send + Sync>;

/// Answers commands whose line starts with a registered prefix (the latest registration
/// first). A command no rule covers fails the test: the panic names its line, so a test states
/// every command it expects the code to run. Every command line is recorded, answered or not.
#[derive(Clone, Default)]
pub struct RecordingRunner {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<String>,
    handlers: Vec<(String, Handler)>,
    missing: Vec<&'static str>,
    /// Lines no rule covered. Each already panicked where it ran; the last clone's drop fails
    /// the test again in case that panic was caught on the way (a task's JoinError turned into
    /// an error the test expected).
    unexpected: Vec<String>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.unexpected.is_empty() && !std::thread::panicking() {
            panic!(
                "the RecordingRunner was asked to run commands no rule covers: {:?}",
                self.unexpected
            );
        }
    }
}

/// Exit 0 with no output: what a tool that did its job quietly answers.
pub fn exit_0() -> Result<Output, CommandError> {
    Ok(Output {
        code: Some(0),
        ..Output::default()
    })
}

impl RecordingRunner {
    /// Commands whose line starts with `prefix` are answered by `handler`.
    pub fn on(
        &self,
        prefix: &str,
        handler: impl Fn(&Cmd) -> Result<Output, CommandError> + Send + Sync + 'static,
    ) {
        self.inner
            .lock()
            .unwrap()
            .handlers
            .push((prefix.to_string(), Arc::new(handler)));
    }

    /// Commands whose line starts with `prefix` exit 0 with no output.
    pub fn ok(&self, prefix: &str) {
        self.on(prefix, |_| exit_0());
    }

    /// `nvme disconnect -n <nqn>` deletes every controller of `<nqn>` from `sysfs`, as the
    /// kernel does, and exits 0.
    pub fn disconnects_in(&self, sysfs: &super::fake_sysfs::FakeSysfs) {
        let sysfs = sysfs.clone();
        self.on("nvme disconnect -n ", move |cmd| {
            let line = cmd.to_string();
            let nqn = line.rsplit(' ').next().unwrap_or_default();
            for ctrl in sysfs.controllers_of(nqn) {
                sysfs.delete_controller(ctrl);
            }
            exit_0()
        });
    }

    /// Pretends `program` is not installed.
    pub fn without(self, program: &'static str) -> Self {
        self.inner.lock().unwrap().missing.push(program);
        self
    }

    pub fn calls(&self) -> Vec<String> {
        self.inner.lock().unwrap().calls.clone()
    }
}

#[async_trait]
impl CommandRunner for RecordingRunner {
    async fn run(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        let line = cmd.to_string();
        let handler = {
            let mut inner = self.inner.lock().unwrap();
            inner.calls.push(line.clone());
            if inner.missing.contains(&cmd.program) {
                return Err(CommandError::NotInstalled {
                    program: cmd.program,
                });
            }
            let found = inner
                .handlers
                .iter()
                .rev()
                .find(|(prefix, _)| line.starts_with(prefix.as_str()))
                .map(|(_, h)| h.clone());
            if found.is_none() {
                inner.unexpected.push(line.clone());
            }
            found
        };
        match handler {
            Some(h) => h(cmd),
            None => panic!(
                "unexpected command `{line}`: no rule of this test's RecordingRunner covers it \
                 (declare it with `on` or `ok`)"
            ),
        }
    }

    fn installed(&self, program: &'static str) -> bool {
        !self.inner.lock().unwrap().missing.contains(&program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfs() -> Cmd {
        Cmd::new("mkfs.xfs")
            .arg("-q")
            .arg(AbsPath::try_from(std::path::PathBuf::from("/dev/loop3")).unwrap())
    }

    /// Catches: the runner answering exit 0 to a command no rule covers (the `None` arm of
    /// `run`), which let a test pass while the code ran commands it never declared.
    #[tokio::test]
    #[should_panic(expected = "unexpected command `mkfs.xfs -q /dev/loop3`")]
    async fn a_command_no_rule_covers_fails_the_test() {
        let runner = RecordingRunner::default();
        runner.ok("mkfs.ext4");
        runner.run(&mkfs()).await.unwrap_err();
    }

    /// A panic the code under test swallows (a spawned task's JoinError turned into an
    /// error) still fails the test when the runner goes. Catches: dropping the check in
    /// `Drop for Inner`.
    #[tokio::test]
    #[should_panic(expected = "commands no rule covers: [\"mkfs.xfs -q /dev/loop3\"]")]
    async fn a_swallowed_unexpected_command_fails_the_test_when_the_runner_goes() {
        let runner = RecordingRunner::default();
        let r = runner.clone();
        let joined = tokio::spawn(async move { r.run(&mkfs()).await }).await;
        assert!(joined.is_err(), "the task panicked");
        assert_eq!(runner.calls(), vec!["mkfs.xfs -q /dev/loop3"]);
        drop(runner);
    }

    #[tokio::test]
    async fn declared_commands_are_answered_and_recorded() {
        let runner = RecordingRunner::default();
        runner.ok("mkfs.xfs -q ");
        let out = runner.run(&mkfs()).await.unwrap();
        assert_eq!(out.code, Some(0));
        assert_eq!(runner.calls(), vec!["mkfs.xfs -q /dev/loop3"]);
    }
}
