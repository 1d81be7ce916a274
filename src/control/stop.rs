//! A request to stop a run cleanly, shared by everything that may ask
//! (signals, the run window, `rekey stop`, the control file, a failed stage)
//! and everything that must obey: sources read no further page, batches
//! already read still commit, and waits end at once.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Who asked a run to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopBy {
    /// SIGINT or SIGTERM.
    #[serde(rename = "signal")]
    Signal,
    /// The end of the run's window (`--run-time`, `--until`).
    #[serde(rename = "run-time")]
    RunTime,
    /// `rekey stop`.
    #[serde(rename = "rekey stop")]
    RekeyStop,
    /// The control file.
    #[serde(rename = "control file")]
    ControlFile,
}

impl StopBy {
    /// How logs and reports name it.
    pub fn as_str(self) -> &'static str {
        match self {
            StopBy::Signal => "signal",
            StopBy::RunTime => "run-time",
            StopBy::RekeyStop => "rekey stop",
            StopBy::ControlFile => "control file",
        }
    }
}

/// A stop request; cloned handles share it.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// Cancelled once a stop is asked for.
    token: CancellationToken,
    /// Who asked first, when someone said.
    by: Arc<Mutex<Option<StopBy>>>,
}

impl Stop {
    /// Asks every pipeline holding this handle to stop (a failed stage: nobody to name).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Asks to stop, saying who asked.
    pub fn trigger_by(&self, who: StopBy) {
        if let Ok(mut by) = self.by.lock() {
            by.get_or_insert(who);
        }
        self.trigger();
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Who asked first, if they said.
    pub fn by(&self) -> Option<StopBy> {
        self.by.lock().ok().and_then(|b| *b)
    }

    /// Completes when a stop is asked for.
    pub async fn asked(&self) {
        self.token.cancelled().await;
    }

    /// Sleeps for `d`, or until a stop is asked for: whether the whole
    /// sleep passed (`false`: stopped).
    pub async fn sleep(&self, d: std::time::Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.asked() => false,
        }
    }
}
