//! Stopping on SIGINT and SIGTERM, and at the end of a run's window: the
//! first signal asks the run to stop cleanly (batches in flight commit), a
//! second exits at once, which is still safe (every committed batch is
//! checkpointed).

use std::time::Instant;

use tokio::task::JoinHandle;

use super::stop::{Stop, StopBy};

/// The exit code of a second signal: stopped before finishing, resumable.
const EXIT_STOPPED: i32 = 130;

/// Watches for signals and `deadline` until dropped, triggering `stop`.
pub struct SignalWatch(JoinHandle<()>);

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a command says as a second signal exits it at once (`--json`: the
/// one object its stdout promises), before the exit.
pub type AtOnce = Box<dyn Fn() + Send + 'static>;

/// Starts watching: `stop` is triggered by the first SIGINT or SIGTERM, or
/// at `deadline`; a second signal calls `at_once` and exits the process.
pub fn stop_on_signals(stop: &Stop, deadline: Option<Instant>, at_once: AtOnce) -> SignalWatch {
    let stop = stop.clone();
    SignalWatch(tokio::spawn(async move {
        if let Some(deadline) = deadline {
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {
                    tracing::info!("the run's window is over; stopping after the batches in flight commit");
                    stop.trigger_by(StopBy::RunTime);
                }
                () = signalled() => first_signal(&stop),
            }
        } else {
            signalled().await;
            first_signal(&stop);
        }
        signalled().await;
        tracing::warn!("stopping now; run the same command again to resume");
        at_once();
        std::process::exit(EXIT_STOPPED);
    }))
}

fn first_signal(stop: &Stop) {
    tracing::info!("stopping after the batches in flight commit (signal again to stop at once; both are safe to resume)");
    stop.trigger_by(StopBy::Signal);
}

/// Completes at the next SIGINT or SIGTERM.
async fn signalled() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(t) => t.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
}
