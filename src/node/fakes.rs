//! Recording fakes of the node's seams, for unit tests: a command runner that logs every
//! command line and answers from a script.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::command::{Cmd, CommandError, CommandRunner, Output};

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
