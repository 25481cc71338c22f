//! Where the node's blocking work runs: syscalls (mount, umount, mknod, statvfs), record files,
//! sysfs and device reads. A bounded pool over tokio's blocking threads, every job with a
//! timeout, so no RPC blocks an async worker and a mount on a dead NVMe path cannot wedge the
//! plugin.
//!
//! Owns the pool's slots, the job timeouts and `rds_csi_node_blocking_stuck`; knows nothing of
//! what the jobs do beyond the label that says it.
//!
//! **A stuck job keeps its slot.** A thread in uninterruptible sleep in the kernel (a mount or
//! a read on an NVMe path whose controller is gone) cannot be killed. When a job passes its
//! timeout its caller gets an error at once, the job is counted in
//! `rds_csi_node_blocking_stuck` and logged once with what it was doing, and its slot (and
//! whatever the call holds, see [`holding`]) stays taken until it really returns: so wedged
//! jobs never exceed the pool's size, and a retry cannot stack a second mount on the first.

use std::any::Any;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::NodeError;

/// Blocking jobs that may run at once, unless configured.
pub const DEFAULT_JOBS: usize = 16;
/// How long a job may run, or wait for a slot, before its caller gets an error.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `rds_csi_node_blocking_stuck`: jobs past their timeout that still run. Registered by
/// [`crate::metrics::Metrics`]; one for the process, as the pool is.
pub static STUCK: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::with_opts(
        prometheus::Opts::new(
            "blocking_stuck",
            "Blocking jobs of the node plugin (mount, unmount, sysfs and device reads) past their timeout that have not returned: a syscall stuck in the kernel, such as a mount on a dead NVMe path.",
        )
        .namespace("rds_csi")
        .subsystem("node"),
    )
    .expect("valid metric")
});

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the process's pool (from the node's flags). Only the first call counts; `false` when
/// the pool was already in use.
pub fn configure(jobs: usize, timeout: Duration) -> bool {
    POOL.set(Pool::new(jobs, timeout, STUCK.clone())).is_ok()
}

/// The process's pool: [`DEFAULT_JOBS`] and [`DEFAULT_TIMEOUT`] unless [`configure`]d first.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(DEFAULT_JOBS, DEFAULT_TIMEOUT, STUCK.clone()))
}

/// Runs `f` on the process's pool; `what` says what it does, for the stuck log line and the
/// error ("mount /dev/nvme1n1 at /var/lib/kubelet/...").
pub async fn blocking<T: Send + 'static>(
    what: impl Into<String>,
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    pool().run(what, f).await
}

/// What a call keeps until its blocking jobs have returned (see [`holding`]).
pub type Hold = Arc<dyn Any + Send + Sync>;

tokio::task_local! {
    static HOLD: Hold;
}

/// Runs `f` with `hold` (e.g. the volume's lock) kept alive by every blocking job `f` starts
/// until that job really returns, even past its timeout: what the job works on stays locked
/// while a syscall on it may still complete.
pub async fn holding<F: Future>(hold: Hold, f: F) -> F::Output {
    HOLD.scope(hold, f).await
}

/// A job's progress, shared by its caller and the thread running it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Progress {
    Running,
    /// Its caller gave up on it; it is counted in the gauge.
    Stuck,
    Done,
}

/// A bounded set of slots over tokio's blocking threads; see the module docs.
pub struct Pool {
    slots: Arc<Semaphore>,
    jobs: usize,
    timeout: Duration,
    stuck: IntGauge,
}

impl Pool {
    pub fn new(jobs: usize, timeout: Duration, stuck: IntGauge) -> Self {
        let jobs = jobs.max(1);
        Self {
            slots: Arc::new(Semaphore::new(jobs)),
            jobs,
            timeout,
            stuck,
        }
    }

    /// Runs `f` on a blocking thread once a slot is free. Errors: [`NodeError::Busy`] when no
    /// slot frees within the timeout (nothing ran); [`NodeError::Stuck`] when `f` runs past
    /// it (it goes on running, holding its slot, counted in the gauge until it returns).
    pub async fn run<T: Send + 'static>(
        &self,
        what: impl Into<String>,
        f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let what = what.into();
        let slot =
            match tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) | Err(_) => {
                    return Err(NodeError::Busy(format!(
                    "{what}: none of the node's {} blocking slots freed within {}s ({} jobs are \
                     stuck in the kernel)",
                    self.jobs,
                    self.timeout.as_secs(),
                    self.stuck.get()
                )))
                }
            };
        let hold = HOLD.try_with(Arc::clone).ok();
        let progress = Arc::new(Mutex::new(Progress::Running));
        let (gauge, started) = (self.stuck.clone(), Instant::now());
        let job = {
            let (progress, what) = (progress.clone(), what.clone());
            tokio::task::spawn_blocking(move || {
                let result = f();
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                if *p == Progress::Stuck {
                    gauge.dec();
                    tracing::warn!(job = %what, seconds = started.elapsed().as_secs_f64(),
                        "a blocking job that was stuck has returned");
                }
                *p = Progress::Done;
                drop((slot, hold));
                result
            })
        };
        tokio::pin!(job);
        let joined = match tokio::time::timeout(self.timeout, &mut job).await {
            Ok(joined) => joined,
            Err(_) => {
                let gave_up = {
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    let running = *p == Progress::Running;
                    if running {
                        *p = Progress::Stuck;
                        self.stuck.inc();
                    }
                    running
                };
                if gave_up {
                    tracing::warn!(job = %what, seconds = self.timeout.as_secs(),
                        "{what} still running after {}s (stuck in the kernel?); it keeps its slot until it returns",
                        self.timeout.as_secs());
                    return Err(NodeError::Stuck(format!(
                        "{what} still running after {}s; the node keeps waiting for it, retry \
                         later",
                        self.timeout.as_secs()
                    )));
                }
                // It returned as the timer fired: its answer is ready.
                job.await
            }
        };
        joined.map_err(|e| NodeError::Io {
            action: what,
            source: std::io::Error::other(e),
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::poll;
    use std::sync::mpsc;

    fn gauge() -> IntGauge {
        IntGauge::new("stuck", "test").unwrap()
    }

    /// A job that blocks until the test lets it go; `started` says it is running.
    fn wedged() -> (
        impl FnOnce() -> Result<(), NodeError> + Send + 'static,
        tokio::sync::oneshot::Receiver<()>,
        mpsc::Sender<()>,
    ) {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (release, wait) = mpsc::channel::<()>();
        let job = move || {
            started_tx.send(()).unwrap();
            wait.recv().unwrap();
            Ok(())
        };
        (job, started, release)
    }

    /// A job past its timeout answers its caller with an error naming what it was doing, is
    /// counted in the gauge while it runs on, and keeps its slot: the next job finds the pool
    /// full rather than a free thread. Catches the slot released at the timeout (the permit
    /// dropped with the caller's future) and a missing gauge increment or decrement.
    #[tokio::test(start_paused = true)]
    async fn a_job_past_its_timeout_errors_keeps_its_slot_and_shows_in_the_gauge() {
        let pool = Arc::new(Pool::new(1, Duration::from_secs(30), gauge()));
        let (job, started, release) = wedged();
        let first = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run("mount /dev/nvme1n1 at /staging", job).await })
        };
        started.await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        let err = first.await.unwrap().unwrap_err();
        assert!(matches!(err, NodeError::Stuck(_)), "{err}");
        assert!(
            err.to_string()
                .contains("mount /dev/nvme1n1 at /staging still running after 30s"),
            "{err}"
        );
        assert_eq!(pool.stuck.get(), 1);

        let next = pool.run("statvfs /target", || Ok(()));
        tokio::pin!(next);
        assert!(poll!(&mut next).is_pending());
        tokio::time::advance(Duration::from_secs(31)).await;
        let err = next.await.unwrap_err();
        assert!(matches!(err, NodeError::Busy(_)), "{err}");
        assert!(err.to_string().contains("1 jobs are stuck"), "{err}");

        release.send(()).unwrap();
        pool.run("statvfs /target", || Ok(())).await.unwrap();
        assert_eq!(pool.stuck.get(), 0, "the job returned: no longer stuck");
    }

    /// What [`holding`] holds is kept by a job that outlives its caller until the job returns.
    /// Catches the hold not moved into the job (the volume's lock would be free while its
    /// mount still runs, and a retry could stack a second mount).
    #[tokio::test(start_paused = true)]
    async fn a_stuck_job_keeps_what_its_call_holds_until_it_returns() {
        let pool = Arc::new(Pool::new(2, Duration::from_secs(30), gauge()));
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let guard: Hold = Arc::new(lock.clone().try_lock_owned().unwrap());
        let (job, started, release) = wedged();
        let call = {
            let pool = pool.clone();
            tokio::spawn(holding(guard, async move { pool.run("mount", job).await }))
        };
        started.await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(call.await.unwrap(), Err(NodeError::Stuck(_))));
        assert!(lock.try_lock().is_err(), "released while the mount runs");
        release.send(()).unwrap();
        // Released when the job's thread returns.
        drop(lock.lock().await);
    }

    /// A job within its timeout answers as it returned; a panic is an error, not a crash.
    #[tokio::test]
    async fn a_job_answers_with_its_own_result() {
        let pool = Pool::new(2, Duration::from_secs(30), gauge());
        assert_eq!(pool.run("add", || Ok(1 + 1)).await.unwrap(), 2);
        let err = pool
            .run("refuse", || -> Result<(), _> {
                Err(NodeError::NotFound("gone".into()))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::NotFound(_)));
        let err = pool
            .run("panic", || -> Result<(), NodeError> { panic!("boom") })
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::Io { .. }), "{err}");
        assert_eq!(pool.stuck.get(), 0);
    }
}
