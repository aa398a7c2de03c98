//! The transfer audit log: one line per transfer attempt, appended to a
//! file opened with `O_APPEND` (its SELinux type allows append only), never
//! the content, only its size and the SHA-256 of what was delivered.
//!
//! `2026-11-26T01:02:03.456Z transfer=7 direction=general->classified
//! type=utf8-text size_in=12 size_out=14 sha256=<hex> result=accepted
//! reason="-"` (one line).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Which way an attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    GeneralToClassified,
    ClassifiedToGeneral,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::GeneralToClassified => "general->classified",
            Direction::ClassifiedToGeneral => "classified->general",
        }
    }
}

/// One audit record.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub transfer: u64,
    pub direction: Direction,
    /// The clipboard type(s) offered, e.g. `utf8-text` or `png`.
    pub ty: &'a str,
    pub size_in: usize,
    /// What was delivered: its size and hash are logged. `None` if rejected.
    pub delivered: Option<&'a [u8]>,
    /// `None` for accepted.
    pub rejected: Option<&'a str>,
}

/// Where audit lines go.
pub struct AuditLog {
    sink: Sink,
}

enum Sink {
    File(File),
    Stderr,
}

impl AuditLog {
    /// Opens (creating, mode 0640) `path` for appending only.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        Ok(AuditLog {
            sink: Sink::File(file),
        })
    }

    /// Audit lines on standard error (no `--audit-log` given).
    pub fn stderr() -> AuditLog {
        AuditLog { sink: Sink::Stderr }
    }

    /// Appends one record; a failure to write is reported, never fatal to
    /// the transfer decision (which has already been made).
    pub fn record(&mut self, r: &Record<'_>) {
        let line = format_line(SystemTime::now(), r);
        let res = match &mut self.sink {
            Sink::File(f) => f.write_all(line.as_bytes()),
            Sink::Stderr => std::io::stderr().write_all(format!("audit: {line}").as_bytes()),
        };
        if let Err(e) = res {
            eprintln!("airlock-gateway: error: writing the audit log: {e}");
        }
    }
}

/// The line for `r` at time `now` (ends with a newline).
pub fn format_line(now: SystemTime, r: &Record<'_>) -> String {
    let (size_out, sha) = match r.delivered {
        Some(d) => (d.len().to_string(), hex::encode(Sha256::digest(d))),
        None => ("0".to_string(), "-".to_string()),
    };
    let (result, reason) = match r.rejected {
        None => ("accepted", "-".to_string()),
        Some(why) => ("rejected", quote(why)),
    };
    format!(
        "{} transfer={} direction={} type={} size_in={} size_out={} sha256={} result={} reason=\"{}\"\n",
        rfc3339_utc(now),
        r.transfer,
        r.direction.as_str(),
        quote(r.ty),
        r.size_in,
        size_out,
        sha,
        result,
        reason
    )
}

/// Escapes quotes, backslashes and anything not printable ASCII, and caps
/// the length, so one record stays one line whatever a reason holds.
fn quote(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(300) {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_795_652_655)),
            "2026-11-26T00:24:15.000Z"
        );
    }

    #[test]
    fn lines_carry_hash_never_content() {
        let t = UNIX_EPOCH;
        let line = format_line(
            t,
            &Record {
                transfer: 3,
                direction: Direction::GeneralToClassified,
                ty: "utf8-text",
                size_in: 5,
                delivered: Some(b"secret"),
                rejected: None,
            },
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z transfer=3 direction=general->classified type=utf8-text size_in=5 size_out=6 \
             sha256=2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b result=accepted reason=\"-\"\n"
        );
        assert!(!line.contains("secret"));
        let line = format_line(
            t,
            &Record {
                transfer: 4,
                direction: Direction::ClassifiedToGeneral,
                ty: "png",
                size_in: 0,
                delivered: None,
                rejected: Some("a \"quoted\"\nreason"),
            },
        );
        assert!(
            line.ends_with(
                "size_out=0 sha256=- result=rejected reason=\"a \\\"quoted\\\"\\u{a}reason\"\n"
            ),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn file_is_opened_for_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clipboard.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        let r = Record {
            transfer: 1,
            direction: Direction::GeneralToClassified,
            ty: "utf8-text",
            size_in: 1,
            delivered: None,
            rejected: Some("x"),
        };
        log.record(&r);
        log.record(&r);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("earlier line\n"));
        assert_eq!(text.lines().count(), 3);
    }
}
