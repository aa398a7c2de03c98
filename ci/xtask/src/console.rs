//! Reading a VM's serial console log as a person would: without terminal
//! escape sequences (systemd colours `[  OK  ]`, the firmware positions its
//! cursor) and carriage returns, searched for a pattern, and quoted by its
//! last lines in error messages.
//!
//! Positions are byte offsets into the raw log file, so a caller can wait for
//! one message and then for the next one *after* it.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};

/// `raw` without escape sequences and `\r`, and for each byte kept, its
/// offset in `raw`.
pub fn strip_escapes(raw: &[u8]) -> (Vec<u8>, Vec<usize>) {
    const ESC: u8 = 0x1b;
    let (mut text, mut origin) = (Vec::with_capacity(raw.len()), Vec::with_capacity(raw.len()));
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1)) {
            // CSI: ESC [ parameters intermediates final-byte
            (ESC, Some(b'[')) => {
                i += 2;
                while i < raw.len() && (0x20..0x40).contains(&raw[i]) {
                    i += 1;
                }
                i += 1; // the final byte
            }
            // OSC: ESC ] ... terminated by BEL or ESC \
            (ESC, Some(b']')) => {
                i += 2;
                while i < raw.len()
                    && raw[i] != 0x07
                    && !(raw[i] == ESC && raw.get(i + 1) == Some(&b'\\'))
                {
                    i += 1;
                }
                i += if raw.get(i) == Some(&ESC) { 2 } else { 1 };
            }
            // Two-byte sequences (ESC c, ESC 7, ...), or a lone ESC at the end.
            (ESC, _) => i += 2,
            (b'\r', _) => i += 1,
            (byte, _) => {
                text.push(byte);
                origin.push(i);
                i += 1;
            }
        }
    }
    (text, origin)
}

/// Searches the log `raw` (which starts at file offset `base`) for `pattern`
/// in its stripped text; gives the file offset just past the match.
pub fn find(raw: &[u8], base: u64, pattern: &str) -> Option<u64> {
    let pattern = pattern.as_bytes();
    if pattern.is_empty() {
        return Some(base);
    }
    let (text, origin) = strip_escapes(raw);
    let start = text.windows(pattern.len()).position(|w| w == pattern)?;
    let last = origin[start + pattern.len() - 1];
    Some(base + last as u64 + 1)
}

/// The last `n` lines of the stripped log, as text.
pub fn tail(raw: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(&strip_escapes(raw).0).into_owned();
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The log file's bytes from `offset` on (empty if it does not exist yet).
pub fn read_from(path: &Path, offset: u64) -> Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("seeking in {}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripped(raw: &[u8]) -> String {
        String::from_utf8(strip_escapes(raw).0).unwrap()
    }

    #[test]
    fn strips_escapes_and_carriage_returns() {
        let cases: &[(&[u8], &str)] = &[
            (b"plain\r\n", "plain\n"),
            (
                b"[\x1b[0;32m  OK  \x1b[0m] Started foo.",
                "[  OK  ] Started foo.",
            ),
            (b"\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: x", "BdsDxe: x"),
            (b"\x1b]8;;file://x\x07link\x1b]8;;\x1b\\ text", "link text"),
            (b"a\x1bcb\x1b", "ab"),
            (b"cut \x1b[0;3", "cut "),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                stripped(raw),
                *expected,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn finds_patterns_split_by_colour_codes() {
        let raw = b"boot\r\n[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[1mMulti-User\x1b[0m.\r\nlogin: ";
        let end = find(raw, 0, "OK  ] Reached target Multi-User.").unwrap();
        assert_eq!(&raw[end as usize..], b"\r\nlogin: ");
        assert_eq!(find(raw, 100, "login:"), Some(100 + raw.len() as u64 - 1));
        assert_eq!(find(raw, 0, "emergency"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"1\r\n2\r\n\x1b[1m3\x1b[0m\r\n", 2), "2\n3");
        assert_eq!(tail(b"", 5), "");
    }

    #[test]
    fn read_from_an_offset_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        assert!(read_from(&path, 0).unwrap().is_empty());
        std::fs::write(&path, b"hello world").unwrap();
        assert_eq!(read_from(&path, 6).unwrap(), b"world");
    }
}
