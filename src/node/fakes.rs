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

/// Answers commands whose line starts with a registered prefix; anything else exits 0 with no
/// output. Every command line is recorded.
#[derive(Clone, Default)]
pub struct RecordingRunner {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<String>,
    handlers: Vec<(String, Handler)>,
    missing: Vec<&'static str>,
}

impl RecordingRunner {
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
            inner
                .handlers
                .iter()
                .rev()
                .find(|(prefix, _)| line.starts_with(prefix.as_str()))
                .map(|(_, h)| h.clone())
        };
        match handler {
            Some(h) => h(cmd),
            None => Ok(Output {
                code: Some(0),
                ..Output::default()
            }),
        }
    }

    fn installed(&self, program: &'static str) -> bool {
        !self.inner.lock().unwrap().missing.contains(&program)
    }
}
