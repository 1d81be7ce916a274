//! `rekey rotate`, and what the lifecycle commands (`rotate`, `secrets`)
//! share: the audit settings, the rotation options, the report.

use std::time::Duration;

use crate::cli::args::{LifecycleArgs, RotateArgs, Who};
use crate::cli::exit::{EXIT_LEFT_ON_OLD_KEYS, EXIT_STOPPED, EXIT_WAITING};
use crate::cli::out::out;
use crate::cli::{default_lanes, open, print_json, Opened};
use crate::engine::pipeline::Settings;
use crate::job::JobSpec;
use crate::lifecycle::audit::{self, Audit};
use crate::lifecycle::rotation::{self, Ended, Intent, Progressed, RotateOptions};
use crate::observe::metrics;
use crate::Error;

/// The audit settings of a lifecycle command.
pub(crate) fn audit_for(args: &LifecycleArgs, spec: &JobSpec) -> Audit {
    audit_of(&args.who(), &args.common.job, spec)
}

/// The audit settings of any command that records events (`run` too).
pub(crate) fn audit_of(who: &Who, job_file: &std::path::Path, spec: &JobSpec) -> Audit {
    let name = spec.name.clone().unwrap_or_else(|| "rekey".into());
    let path = who
        .audit_log
        .clone()
        .unwrap_or_else(|| job_file.with_file_name(format!("{name}.audit.jsonl")));
    Audit {
        path,
        // empty: the event records the session's role
        operator: audit::operator(who.operator.as_deref()).unwrap_or_default(),
        reason: who.reason.as_ref().map(|r| r.name().to_string()),
        chain: name,
        incident_id: who.incident.clone(),
        operator_notes: who.notes.clone(),
        keys: None,
    }
}

/// How a lifecycle command runs a rotation's steps.
pub(crate) fn rotate_options(
    life: &LifecycleArgs,
    spec: &JobSpec,
    lanes: usize,
    batch_size: usize,
    grace: Duration,
    quiet: bool,
) -> RotateOptions {
    RotateOptions {
        audit: audit_for(life, spec),
        grace: Some(grace),
        reveal: life.reveal,
        settings: Settings {
            lanes,
            batch_size,
            ..Settings::default()
        },
        quiet: quiet || life.common.json,
        compromised: life.is_compromise(),
        no_wait: false,
        intent: Intent::Continue,
        accept_unverified: Vec::new(),
        wait_for_writers: Duration::from_secs(120),
        wait_for_replicas: Duration::from_secs(120),
        never_current: false,
    }
}

/// Prints what a lifecycle command did and returns its exit code.
pub(crate) fn report(life: &LifecycleArgs, spec: &JobSpec, p: &Progressed) -> u8 {
    if life.common.json {
        print_json(&p.json(spec.name.as_deref().unwrap_or_default()));
    } else {
        for l in &p.lines {
            out!("{l}");
        }
    }
    match p.ended {
        Ended::Done => 0,
        Ended::Waiting(_) => EXIT_WAITING,
        Ended::Stopped => EXIT_STOPPED,
        Ended::NotVerified => EXIT_LEFT_ON_OLD_KEYS,
    }
}

/// `rekey rotate`.
pub async fn rotate(args: &RotateArgs) -> Result<u8, Error> {
    crate::cli::run::check_online(&args.online)?;
    if let Some(addr) = args.online.metrics_addr {
        metrics::serve(addr)?;
    }
    let Opened {
        spec,
        db,
        mut client,
    } = open(&args.life.common).await?;
    let lanes = match args.workers {
        Some(w) => usize::from(w),
        None => crate::engine::plan::lanes_for_server(&client, default_lanes()).await?,
    };
    let mut opts = rotate_options(
        &args.life,
        &spec,
        lanes,
        args.batch_size as usize,
        Duration::ZERO,
        args.quiet,
    );
    let stop = opts.settings.stop.clone();
    opts.settings = crate::cli::run::settings_from(
        lanes,
        args.batch_size,
        args.max_rows_per_sec,
        &args.online,
        stop,
    );
    opts.grace = args.grace;
    opts.no_wait = args.no_wait;
    opts.wait_for_writers = args.wait_for_writers;
    opts.wait_for_replicas = args.wait_for_replicas;
    opts.intent = if args.abort {
        Intent::Abort
    } else if args.new {
        Intent::New
    } else {
        Intent::Continue
    };
    if args.dry_run {
        let p = crate::lifecycle::preview::preview(&spec, &client, &opts).await?;
        return Ok(report(&args.life, &spec, &p));
    }
    let _signals = crate::control::signals::stop_on_signals(
        &opts.settings.stop,
        None,
        crate::cli::said_at_once(args.life.common.json),
    );
    let p = rotation::rotate(&spec, &db, &mut client, &opts).await?;
    Ok(report(&args.life, &spec, &p))
}
