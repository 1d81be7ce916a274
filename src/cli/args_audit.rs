//! The audit options the command line takes (`--reason`, `--operator`,
//! `--incident`, `--notes`, `--audit-log`), checked as typed: what the audit
//! events of `rotate`, `secrets` and `run` record. Re-exported by [`super::args`].

use std::path::PathBuf;

use clap::Args;

/// Why a key is rotated (recorded in the audit trail): free text as the
/// procedures write it (`scheduled`, `scheduled_annual`, `emergency`,
/// `compromise`, `suspected_key_compromise`, ...), checked by [`Reason::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(std::borrow::Cow<'static, str>);

/// The longest reason accepted, in bytes.
pub const MAX_REASON_LEN: usize = 64;

#[allow(non_upper_case_globals)]
impl Reason {
    /// The regular schedule (the default).
    pub const Scheduled: Reason = Reason(std::borrow::Cow::Borrowed("scheduled"));
    /// Unplanned, e.g. an employee leaving.
    pub const Emergency: Reason = Reason(std::borrow::Cow::Borrowed("emergency"));
    /// The key is known or suspected to be exposed (the broken-glass runbook).
    pub const Compromise: Reason = Reason(std::borrow::Cow::Borrowed("compromise"));

    /// Checks a reason as typed: 1 to 64 letters, digits, `_`, `-`, `.` or `:`.
    pub fn parse(text: &str) -> Result<Reason, String> {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
        if text.is_empty() || text.len() > MAX_REASON_LEN || !text.chars().all(ok) {
            return Err(format!(
                "{text:?} is not a reason: write 1 to {MAX_REASON_LEN} letters, digits, '_', '-', '.' or ':', \
                 e.g. scheduled, scheduled_annual, emergency, compromise"
            ));
        }
        Ok(Reason(std::borrow::Cow::Owned(text.to_ascii_lowercase())))
    }

    /// The name recorded in the audit trail.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Whether this is a compromise rotation: `compromise`, or a reason
    /// ending in `_compromise` / `-compromise` (the quarterly procedure's
    /// `suspected_key_compromise`).
    pub fn is_compromise(&self) -> bool {
        crate::lifecycle::audit::is_compromise_reason(self.name())
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks `--incident`: 1 to 128 characters, none of them a control character.
pub fn parse_incident(text: &str) -> Result<String, String> {
    if text.trim().is_empty() || text.len() > 128 || text.chars().any(char::is_control) {
        return Err(format!(
            "{text:?} is not an incident id: write 1 to 128 printable characters, e.g. INC-2026-001"
        ));
    }
    Ok(text.to_string())
}

/// Checks `--notes`: at most 2000 characters, no control character but newlines and tabs.
pub fn parse_notes(text: &str) -> Result<String, String> {
    if text.len() > 2000
        || text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(
            "--notes takes at most 2000 characters of text (no control characters but newlines and tabs)"
                .into(),
        );
    }
    Ok(text.to_string())
}

/// Checks `--operator`: 1 to 256 characters, none of them a control character.
pub fn parse_operator(text: &str) -> Result<String, String> {
    if text.trim().is_empty() || text.len() > 256 || text.chars().any(char::is_control) {
        return Err(format!(
            "{text:?} is not an operator: write who runs rekey (1 to 256 printable characters), e.g. alice@example.com"
        ));
    }
    Ok(text.to_string())
}

/// Who runs a command that changes keys or values, and why: what its audit
/// events record.
#[derive(Debug, Clone, Default)]
pub struct Who {
    /// `--reason`.
    pub reason: Option<Reason>,
    /// `--operator`.
    pub operator: Option<String>,
    /// `--incident`.
    pub incident: Option<String>,
    /// `--notes`.
    pub notes: Option<String>,
    /// `--audit-log`.
    pub audit_log: Option<PathBuf>,
}

/// What `rekey run`'s audit events record.
#[derive(Debug, Args, Clone)]
pub struct RunAuditArgs {
    /// Why (audit trail): scheduled, scheduled_annual, emergency, compromise, ... Default: the rotation's in progress, else scheduled.
    #[arg(long, value_parser = Reason::parse)]
    pub reason: Option<Reason>,
    /// Who (audit trail); default: REKEY_OPERATOR, else the OS user, else the database role.
    #[arg(long, value_parser = parse_operator)]
    pub operator: Option<String>,
    /// The incident this run answers (audit trail).
    #[arg(long, value_name = "ID", value_parser = parse_incident)]
    pub incident: Option<String>,
    /// The operator's notes (audit trail).
    #[arg(long, value_name = "TEXT", value_parser = parse_notes)]
    pub notes: Option<String>,
    /// The JSON lines audit log; default: <job name>.audit.jsonl beside the job file.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
}

impl RunAuditArgs {
    /// What the audit events record.
    pub fn who(&self) -> Who {
        Who {
            reason: self.reason.clone(),
            operator: self.operator.clone(),
            incident: self.incident.clone(),
            notes: self.notes.clone(),
            audit_log: self.audit_log.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_reasons_are_accepted_and_compromise_is_recognised() {
        for r in [
            "scheduled",
            "scheduled_annual",
            "emergency",
            "compromise",
            "suspected_key_compromise",
        ] {
            assert_eq!(
                Reason::parse(r).map(|r| r.name().to_string()),
                Ok(r.to_string())
            );
        }
        assert!(Reason::parse("compromise").unwrap().is_compromise());
        assert!(Reason::parse("suspected_key_compromise")
            .unwrap()
            .is_compromise());
        assert!(!Reason::parse("scheduled_annual").unwrap().is_compromise());
        assert_eq!(Reason::parse("Compromise").unwrap(), Reason::Compromise);
    }

    #[test]
    fn a_reason_that_is_empty_too_long_or_odd_is_refused_with_a_hint() {
        for bad in ["", "a b", "x;drop", &"a".repeat(65), "naïve"] {
            let err = Reason::parse(bad).unwrap_err();
            assert!(err.contains("e.g. scheduled"), "{bad}: {err}");
        }
        assert!(parse_incident("").is_err() && parse_incident("INC\n1").is_err());
        assert!(parse_incident("INC-2026-001").is_ok());
        assert!(parse_operator(" ").is_err() && parse_operator("alice@example.com").is_ok());
        assert!(parse_notes("line one\nline two").is_ok() && parse_notes("\u{7}").is_err());
    }
}
