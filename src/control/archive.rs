//! The archive throttle's arithmetic behind `--max-archive-lag`: how many
//! complete WAL segments wait to be archived, from what `pg_stat_archiver`
//! says. Pure state; [`super::monitor`] reads it from the server.

/// The segment number a WAL file name stands for (`000000010000000A000000FF`
/// and names that begin with one, as `.partial` and `.backup` files do);
/// `None` for a timeline history file or anything else.
pub fn segment_of(file: &str, segment_size: u64) -> Option<u64> {
    let name = file.get(..24)?;
    if !name.bytes().all(|b| b.is_ascii_hexdigit()) || segment_size == 0 {
        return None;
    }
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    let per_log = 0x1_0000_0000_u64 / segment_size;
    log.checked_mul(per_log)?.checked_add(seg)
}

/// What `pg_stat_archiver` says, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiverState {
    /// `pg_walfile_name(pg_current_wal_lsn())`.
    pub current_wal: String,
    /// The last WAL file archived, if any since the statistics were reset.
    pub last_archived_wal: Option<String>,
    /// The last WAL file whose archiving failed.
    pub last_failed_wal: Option<String>,
    /// When it failed, as the server prints it.
    pub last_failed_time: Option<String>,
    /// Failures since the statistics were reset.
    pub failed_count: i64,
    /// Whether the last failure came after the last success: the archiver
    /// retries a failed file until it succeeds, so this means it still fails.
    pub failing: bool,
}

/// Why the archiver holds the run, if it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveLag {
    /// Caught up within the cap.
    Go,
    /// `archive_command` fails: nothing archived since the last failure.
    Failing(String),
    /// This many complete segments wait to be archived, more than the cap allows.
    Behind {
        /// Segments ready and not archived.
        segments: u64,
        /// The same in bytes.
        bytes: u64,
    },
}

/// Judges the archiver against `cap` bytes of complete segments waiting.
/// `base` is the segment the run started in: when the archiver has archived
/// nothing since its statistics were reset (or last archived a history
/// file), the lag counts from there.
pub fn archive_lag(s: &ArchiverState, segment_size: u64, base: u64, cap: u64) -> ArchiveLag {
    if s.failing {
        return ArchiveLag::Failing(format!(
            "archiving is failing: {} could not be archived (last failure {}, {} failures counted), \
             nothing archived since; holding until archive_command succeeds (see the server log)",
            s.last_failed_wal.as_deref().unwrap_or("a WAL file"),
            s.last_failed_time.as_deref().unwrap_or("unknown"),
            s.failed_count
        ));
    }
    let Some(current) = segment_of(&s.current_wal, segment_size) else {
        return ArchiveLag::Failing(format!(
            "the current WAL file name {:?} is not one rekey can read; holding",
            s.current_wal
        ));
    };
    let archived = s
        .last_archived_wal
        .as_deref()
        .and_then(|w| segment_of(w, segment_size))
        .unwrap_or_else(|| base.saturating_sub(1));
    // the current segment is still being written: only those before it can be archived
    let segments = current.saturating_sub(archived).saturating_sub(1);
    let bytes = segments.saturating_mul(segment_size);
    if bytes > cap {
        ArchiveLag::Behind { segments, bytes }
    } else {
        ArchiveLag::Go
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn wal_file_names_give_their_segment_number() {
        let mib16 = 16 * MIB;
        assert_eq!(segment_of("000000010000000000000003", mib16), Some(3));
        assert_eq!(
            segment_of("00000001000000010000000A", mib16),
            Some(256 + 10)
        );
        assert_eq!(
            segment_of("000000010000000000000003.00000028.backup", mib16),
            Some(3)
        );
        assert_eq!(segment_of("00000002.history", mib16), None);
        assert_eq!(segment_of("", mib16), None);
        assert_eq!(segment_of("0000000100000000000000ZZ", mib16), None);
    }

    fn state(current: &str, archived: Option<&str>) -> ArchiverState {
        ArchiverState {
            current_wal: current.into(),
            last_archived_wal: archived.map(Into::into),
            ..ArchiverState::default()
        }
    }

    #[test]
    fn the_archiver_is_behind_by_the_complete_segments_not_yet_archived() {
        let seg = 16 * MIB;
        let s = state("000000010000000000000010", Some("00000001000000000000000F"));
        assert_eq!(archive_lag(&s, seg, 0, seg), ArchiveLag::Go, "caught up");
        let s = state("000000010000000000000010", Some("00000001000000000000000A"));
        assert_eq!(
            archive_lag(&s, seg, 0, 64 * MIB),
            ArchiveLag::Behind {
                segments: 5,
                bytes: 5 * seg
            }
        );
        assert_eq!(archive_lag(&s, seg, 0, 80 * MIB), ArchiveLag::Go);
        assert!(matches!(
            archive_lag(&s, seg, 0, 1),
            ArchiveLag::Behind { .. }
        ));
    }

    #[test]
    fn nothing_archived_yet_counts_from_where_the_run_started() {
        let seg = 16 * MIB;
        let s = state("000000010000000000000010", None);
        assert_eq!(archive_lag(&s, seg, 0x10, seg), ArchiveLag::Go);
        assert_eq!(
            archive_lag(&s, seg, 0x0E, seg),
            ArchiveLag::Behind {
                segments: 2,
                bytes: 2 * seg
            }
        );
    }

    #[test]
    fn a_failing_archiver_holds_whatever_the_lag() {
        let mut s = state("000000010000000000000010", Some("00000001000000000000000F"));
        s.failing = true;
        s.failed_count = 3;
        s.last_failed_wal = Some("000000010000000000000010".into());
        match archive_lag(&s, 16 * MIB, 0, u64::MAX) {
            ArchiveLag::Failing(why) => assert!(why.contains("archiving is failing"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
