//! `rekey report`: writes the evidence of a rotation (JSON, and a Markdown
//! or HTML page) into a directory, or with `--check` verifies the job's audit
//! chain in `rekey.audit` and its JSON lines file; either exits 7 when the
//! chain does not check, naming the first bad event.

use serde_json::json;

use crate::cli::args::{ReportArgs, ReportFormat, Who};
use crate::cli::exit::EXIT_EVIDENCE_BROKEN;
use crate::cli::out::{eout, out};
use crate::cli::rotate::audit_of;
use crate::cli::{open, print_json, Opened};
use crate::lifecycle::evidence::{self, check::Checked, page};
use crate::Error;

/// Prints what the check found.
fn tell(args: &ReportArgs, checked: &Checked) {
    if args.common.json && args.check {
        print_json(&json!({ "ok": checked.ok(), "check": checked }));
        return;
    }
    let say = |s: String| {
        if checked.ok() {
            out!("{s}")
        } else {
            eout!("rekey: {s}")
        }
    };
    if let Some(b) = &checked.table_broken {
        say(format!("audit chain broken in rekey.audit: {b}"));
    }
    if let Some(b) = &checked.file_broken {
        say(format!("audit chain broken in the JSON file: {b}"));
    }
    if checked.ok() && args.check {
        out!(
            "audit chain of job {} intact: {} events in rekey.audit, {} in {}",
            checked.chain,
            checked.table_events,
            checked
                .file_events
                .map_or("no file".into(), |n| n.to_string()),
            checked.file
        );
        if checked.file_other_databases > 0 {
            out!(
                "{} lines of the file are job {}'s events in other databases (the file serves several): checked against their own hashes only",
                checked.file_other_databases,
                checked.chain
            );
        }
        if !checked.adopted.is_empty() {
            let listed: Vec<String> = checked
                .adopted
                .iter()
                .map(|(seq, t)| format!("{seq} ({t})"))
                .collect();
            out!(
                "{} events were recorded in rekey.audit from their lines in the file, after a crash between a line and its commit \
                 (not by the invocation that wrote them): {}. The file alone vouches for them, and a line appended to it by anyone \
                 who may write it would be recorded so too: confirm each against what happened",
                checked.adopted.len(),
                listed.join(", ")
            );
        }
        if checked.file_cut_short > 0 {
            out!(
                "{} lines of the file were cut short by a crash while rekey wrote them: their events never committed",
                checked.file_cut_short
            );
        }
    }
}

/// `rekey report`.
pub async fn report(args: &ReportArgs) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    if !crate::state::schema_exists(&client).await? {
        return Err(Error::Config(
            "this database has no rekey engine schema, so no audit trail: nothing to report".into(),
        ));
    }
    let who = Who {
        audit_log: args.audit_log.clone(),
        ..Who::default()
    };
    let audit = audit_of(&who, &args.common.job, &spec);
    let checked =
        evidence::check::check(&client, &audit.chain, &audit.path, &audit.written_to()).await?;
    tell(args, &checked);
    let code = if checked.ok() {
        0
    } else {
        EXIT_EVIDENCE_BROKEN
    };
    if args.check {
        return Ok(code);
    }
    let doc = evidence::gather(&client, &audit.chain, args.rotation, &checked).await?;
    let dir = args.out.clone().unwrap_or_else(|| ".".into());
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::Config(format!(
            "cannot create the report directory {}: {e}",
            dir.display()
        ))
    })?;
    let stem = format!("{}-rotation-{}", audit.chain, doc["rotation_id"]);
    let mut written = vec![dir.join(format!("{stem}.json"))];
    let pretty = serde_json::to_string_pretty(&doc)
        .map_err(|e| Error::Runtime(format!("encoding the report: {e}")))?;
    let page = match args.format {
        ReportFormat::Json => None,
        ReportFormat::Markdown => Some(("md", page::markdown(&doc))),
        ReportFormat::Html => Some(("html", page::html(&doc))),
    };
    let write = |path: &std::path::Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|e| Error::Runtime(format!("writing {}: {e}", path.display())))
    };
    write(&written[0], &pretty)?;
    if let Some((ext, text)) = page {
        let path = dir.join(format!("{stem}.{ext}"));
        write(&path, &text)?;
        written.push(path);
    }
    if args.common.json {
        print_json(&json!({
            "ok": checked.ok(),
            "rotation_id": doc["rotation_id"],
            "files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "check": checked,
        }));
    } else {
        for p in &written {
            out!("wrote {}", p.display());
        }
    }
    Ok(code)
}
