//! The info page for IT: Ctrl + the switch key shows, in place of the
//! guest, what this PC runs and what its last update did — the only way to
//! see either at the desk (no console, no network service).
//!
//! Everything on it is read when the page opens: the image's name and
//! version from `/usr/lib/os-release` (on the verity-protected root), the
//! host name (`uname`), and the last result the update agent wrote for the
//! screen (`/var/lib/airlock/status/update.json`, see `airlock-update`'s
//! `system::publish_last`). The update agent's text may quote a bundle or a
//! stick, so it is made printable ASCII and cut short like every other
//! outside text on the screen.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

use crate::message::printable;

/// The image's os-release (`IMAGE_ID`, `IMAGE_VERSION`).
pub const OS_RELEASE: &str = "/usr/lib/os-release";
/// The update agent's last result, for the screen.
pub const UPDATE_STATUS: &str = "/var/lib/airlock/status/update.json";

/// Longer files are not read (both are a few hundred bytes).
const MAX_FILE_BYTES: u64 = 16 * 1024;
/// Characters per line of the update agent's message, and lines of it.
const WRAP: usize = 64;
const MESSAGE_LINES: usize = 4;

/// What `airlock-update` writes for the screen (its `LastResult`).
#[derive(Debug, Deserialize)]
struct LastResult {
    action: String,
    result: String,
    message: String,
    at: u64,
}

/// The page's lines (below its headline), for [`crate::message::Message::Info`].
pub fn page(os_release: &Path, update_status: &Path, host: &str, close_hint: &str) -> Vec<String> {
    let image = match read_small(os_release) {
        Ok(text) => image_name(&text),
        Err(e) => format!("unknown ({}: {e})", os_release.display()),
    };
    let mut lines = vec![
        format!("image:       {}", clip(&image)),
        format!("host name:   {}", clip(host)),
    ];
    lines.extend(update_lines(read_small(update_status), update_status));
    lines.push(String::new());
    lines.push(close_hint.to_owned());
    lines
}

/// `airlock 1.0.1` from os-release's `IMAGE_ID` and `IMAGE_VERSION`.
fn image_name(os_release: &str) -> String {
    let field = |key: &str| {
        os_release.lines().find_map(|l| {
            let value = l.strip_prefix(key)?.strip_prefix('=')?;
            Some(
                value
                    .trim()
                    .trim_matches(|c| c == '"' || c == '\'')
                    .to_owned(),
            )
        })
    };
    match (field("IMAGE_ID"), field("IMAGE_VERSION")) {
        (Some(id), Some(version)) => format!("{id} {version}"),
        _ => "unknown (no IMAGE_ID/IMAGE_VERSION in os-release)".to_owned(),
    }
}

/// `last update: <result> (<action>) at <time>` and the agent's message,
/// wrapped; or why there is nothing to say.
fn update_lines(file: std::io::Result<String>, path: &Path) -> Vec<String> {
    let text = match file {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec!["last update: none on this PC yet".to_owned()]
        }
        Err(e) => return vec![format!("last update: unknown ({}: {e})", path.display())],
    };
    let last: LastResult = match serde_json::from_str(&text) {
        Ok(last) => last,
        Err(e) => {
            return vec![format!(
                "last update: unknown ({} unreadable: {e})",
                path.display()
            )]
        }
    };
    let when = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(last.at));
    let mut lines = vec![clip(&format!(
        "last update: {} ({}) at {when}",
        last.result, last.action
    ))];
    // A refusal starts with the staged file's path: the reason is what IT needs.
    let message = match last.message.split_once(": ") {
        Some((path, rest)) if path.starts_with('/') => rest,
        _ => last.message.as_str(),
    };
    let chars = printable(message);
    let chunks: Vec<String> = chars.chunks(WRAP).map(|c| c.iter().collect()).collect();
    for (i, chunk) in chunks.iter().enumerate().take(MESSAGE_LINES) {
        let more = i + 1 == MESSAGE_LINES && chunks.len() > MESSAGE_LINES;
        lines.push(format!("  {chunk}{}", if more { "..." } else { "" }));
    }
    lines
}

/// Printable ASCII, at most [`WRAP`] characters.
fn clip(raw: &str) -> String {
    printable(raw).into_iter().take(WRAP + 16).collect()
}

fn read_small(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// This machine's host name (`uname`: no file to read).
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_page_names_the_image_the_host_and_the_last_update() {
        let dir = tempfile::tempdir().unwrap();
        let os = write(
            dir.path(),
            "os-release",
            "ID=debian\nIMAGE_ID=airlock\nIMAGE_VERSION=\"1.0.1\"\n",
        );
        let st = write(
            dir.path(),
            "update.json",
            r#"{"action":"health","result":"healthy","message":"airlock 1.0.1 passed the health gate","at":1795464060}"#,
        );
        let lines = page(&os, &st, "desk-0042", "Ctrl+Scroll Lock: back");
        assert_eq!(
            lines,
            [
                "image:       airlock 1.0.1",
                "host name:   desk-0042",
                "last update: healthy (health) at 2026-11-23T20:01:00Z",
                "  airlock 1.0.1 passed the health gate",
                "",
                "Ctrl+Scroll Lock: back",
            ]
        );
    }

    #[test]
    fn a_refusal_shows_its_reason_printable_and_short() {
        let dir = tempfile::tempdir().unwrap();
        let os = write(
            dir.path(),
            "os-release",
            "IMAGE_ID=airlock\nIMAGE_VERSION=1.0\n",
        );
        let reason = format!("signed by no trusted key \u{1b}[2J{}", "x".repeat(400));
        let json = serde_json::json!({
            "action": "apply", "result": "refused", "at": 0,
            "message": format!("/var/lib/airlock/update/staging/sda.airlock: {reason}"),
        });
        let st = write(dir.path(), "update.json", &json.to_string());
        let lines = page(&os, &st, "pc", "hint");
        assert_eq!(
            lines[2],
            "last update: refused (apply) at 1970-01-01T00:00:00Z"
        );
        assert!(
            lines[3].starts_with("  signed by no trusted key ?[2J"),
            "{lines:?}"
        );
        assert_eq!(lines.len(), 2 + 1 + MESSAGE_LINES + 2, "{lines:?}");
        assert!(lines[2 + MESSAGE_LINES].ends_with("..."), "{lines:?}");
        for line in &lines {
            assert!(
                line.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
                "{line:?}"
            );
            assert!(line.chars().count() <= WRAP + 16, "{line:?}");
        }
    }

    #[test]
    fn missing_or_bad_files_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let lines = page(
            &dir.path().join("none"),
            &dir.path().join("none.json"),
            "pc",
            "hint",
        );
        assert!(lines[0].starts_with("image:       unknown ("), "{lines:?}");
        assert_eq!(lines[2], "last update: none on this PC yet");
        let bad = write(dir.path(), "update.json", "{\"result\":");
        let os = write(dir.path(), "os-release", "ID=debian\n");
        let lines = page(&os, &bad, "pc", "hint");
        assert_eq!(
            lines[0],
            "image:       unknown (no IMAGE_ID/IMAGE_VERSION in os-release)"
        );
        assert!(lines[2].starts_with("last update: unknown ("), "{lines:?}");
    }

    #[test]
    fn the_host_name_is_this_machines() {
        let expected = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(host_name(), expected.trim());
    }
}
