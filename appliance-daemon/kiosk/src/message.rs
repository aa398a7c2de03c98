//! Messages for IT: what the guest area says, in an amber box
//! ([`crate::layout::MESSAGE_RGB`]), when this PC lacks something only IT
//! can give it — never a console.
//!
//! Every word comes from the fixed texts below; the one thing taken from
//! outside is a file's path, made printable ASCII and cut short
//! ([`sanitise_path`]).

use std::path::Path;

use crate::Side;

/// Where provisioning writes the machine settings (`airlock flash
/// --machine`); the kiosk only ever `stat`s it.
pub const MACHINE_FILE: &str = "/var/lib/airlock/provision/appliance.toml";

/// Longest path shown (characters); a longer one keeps its end.
pub const PATH_MAX_CHARS: usize = 96;

/// The prefix of each journal line about a message ([`Message::log_line`]).
pub const LOG_PREFIX: &str = "airlock-kiosk: message for IT: ";

/// A message for IT, from a fixed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The supervisor reports the guest's disk image missing (`no-disk`);
    /// `path` is already sanitised.
    NoDisk { path: String },
    /// No supervisor answers and the machine settings file is absent.
    NotProvisioned,
    /// No supervisor answers and `/var` is the empty stand-in of
    /// `airlock-var-locked.service`: the data partition stayed closed.
    DataLocked,
    /// The info page IT asks for (Ctrl + the switch key): what this PC
    /// runs and what its last update did ([`crate::info::page`]); the lines
    /// are already printable ASCII.
    Info { lines: Vec<String> },
}

/// How IT provisions a PC (`docs/it-guide.md`, section 6). Flashing again
/// erases the data partition, so both guests are always given.
const FLASH: [&str; 3] = [
    "airlock flash IMAGE DISK --machine FILE",
    "    --guest classified=FILE --guest general=FILE",
    "(IT guide, section 6: Flash and provision a PC)",
];

/// Why /var stays closed, and what IT does (`docs/it-guide.md`, "Data locked").
const LOCKED: [&str; 7] = [
    "This PC's data partition did not open, so no guest",
    "starts. Its disk was moved to another PC, the system",
    "was changed, or it was written without airlock flash.",
    "",
    "IT: open it with the recovery key airlock flash",
    "printed, or flash the PC again",
    "(IT guide, section 10: Data locked)",
];

/// statfs(2)'s magic number of a tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `/var` (`path`) is a tmpfs: the stand-in that
/// `airlock-var-locked.service` mounts when the data partition stays
/// closed. The real /var is ext4 on the opened LUKS2 container.
pub fn var_is_locked(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == TMPFS_MAGIC)
}

impl Message {
    /// The message for `side` from the supervisor's state word and the
    /// `path` it reported; `None` for every other state.
    pub fn from_state(state: &str, path: Option<&str>) -> Option<Message> {
        (state == "no-disk").then(|| Message::NoDisk {
            path: sanitise_path(path.unwrap_or("")),
        })
    }

    /// The first line, in large letters.
    pub fn headline(&self) -> &'static str {
        match self {
            Message::NoDisk { .. } => "NO GUEST DISK",
            Message::NotProvisioned => "THIS PC IS NOT PROVISIONED",
            Message::DataLocked => "DATA LOCKED",
            Message::Info { .. } => "THIS PC",
        }
    }

    /// The lines below the headline, for the guest of `side`.
    pub fn lines(&self, side: Side) -> Vec<String> {
        let mut lines = match self {
            Message::NoDisk { path } => vec![
                format!(
                    "This PC has no disk for the {} guest:",
                    side.name().to_ascii_uppercase()
                ),
                path.clone(),
                String::new(),
                "IT: flash it again with its guest disks:".to_owned(),
            ],
            Message::NotProvisioned => vec![
                "It has no machine settings, so no guest starts:".to_owned(),
                MACHINE_FILE.to_owned(),
                String::new(),
                "IT: flash it with its machine file and guest disks:".to_owned(),
            ],
            Message::Info { lines } => return lines.clone(),
            Message::DataLocked => return LOCKED.iter().map(|l| (*l).to_owned()).collect(),
        };
        lines.extend(FLASH.iter().map(|l| (*l).to_owned()));
        lines
    }

    /// The journal line (the same for both sides when not provisioned).
    pub fn log_line(&self, side: Side) -> String {
        match self {
            Message::NoDisk { path } => {
                format!("{LOG_PREFIX}{}: no guest disk at {path}", side.name())
            }
            Message::NotProvisioned => {
                format!(
                    "{LOG_PREFIX}this PC is not provisioned: no machine settings at {MACHINE_FILE}"
                )
            }
            Message::Info { lines } => format!("{LOG_PREFIX}info page: {}", lines.join(" | ")),
            Message::DataLocked => format!(
                "{LOG_PREFIX}data locked: /var did not open (TPM refused or not flashed); no guest starts"
            ),
        }
    }
}

/// The journal lines of the messages in `now` that `before` did not show,
/// each once (`[classified, general]`).
pub fn new_log_lines(before: [Option<&Message>; 2], now: [Option<&Message>; 2]) -> Vec<String> {
    let lines = |messages: [Option<&Message>; 2]| -> Vec<String> {
        let mut lines: Vec<String> = [Side::Classified, Side::General]
            .into_iter()
            .zip(messages)
            .filter_map(|(side, m)| Some(m?.log_line(side)))
            .collect();
        lines.dedup();
        lines
    };
    let old = lines(before);
    lines(now)
        .into_iter()
        .filter(|l| !old.contains(l))
        .collect()
}

/// Whether the machine settings file is known to be absent. Only "not
/// found" counts: a `stat` that is refused (policy, sandbox) says nothing.
pub fn machine_file_absent(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(_) => false,
        Err(e) => {
            e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
        }
    }
}

/// `raw` with anything but printable ASCII replaced by `?`.
pub fn printable(raw: &str) -> Vec<char> {
    raw.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// `raw` as printable ASCII (anything else becomes `?`), at most
/// [`PATH_MAX_CHARS`] characters: a longer one keeps its end, after `...`.
pub fn sanitise_path(raw: &str) -> String {
    let clean = printable(raw);
    if clean.is_empty() {
        return "(no path given)".to_owned();
    }
    if clean.len() <= PATH_MAX_CHARS {
        return clean.into_iter().collect();
    }
    let tail: String = clean[clean.len() - (PATH_MAX_CHARS - 3)..].iter().collect();
    format!("...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_no_disk_makes_a_message() {
        assert_eq!(
            Message::from_state("no-disk", Some("/var/lib/airlock/general/disk/w.qcow2")),
            Some(Message::NoDisk {
                path: "/var/lib/airlock/general/disk/w.qcow2".into()
            })
        );
        for state in ["running", "off", "restarting", "no-disk ", "No-Disk", ""] {
            assert_eq!(Message::from_state(state, Some("/x")), None, "{state:?}");
        }
        assert_eq!(
            Message::from_state("no-disk", None),
            Some(Message::NoDisk {
                path: "(no path given)".into()
            })
        );
    }

    #[test]
    fn paths_are_printable_ascii_and_short() {
        assert_eq!(sanitise_path("/var/lib/a b"), "/var/lib/a b");
        assert_eq!(sanitise_path("/x\u{1b}[2J\n\u{e9}"), "/x?[2J??");
        let long = format!("/{}", "d/".repeat(100));
        let shown = sanitise_path(&long);
        assert_eq!(shown.chars().count(), PATH_MAX_CHARS);
        assert!(
            shown.starts_with("...") && long.ends_with(&shown[3..]),
            "{shown}"
        );
    }

    #[test]
    fn the_texts_name_the_side_the_path_and_the_command() {
        let m = Message::NoDisk {
            path: "/var/lib/airlock/classified/disk/w.qcow2".into(),
        };
        let lines = m.lines(Side::Classified);
        assert!(lines[0].contains("CLASSIFIED"), "{lines:?}");
        assert!(lines.contains(&"/var/lib/airlock/classified/disk/w.qcow2".to_owned()));
        assert!(lines.iter().any(|l| l.contains("--guest classified=FILE")));
        let locked = Message::DataLocked.lines(Side::General);
        assert!(
            locked.iter().any(|l| l.contains("recovery key")),
            "{locked:?}"
        );
        let lines = Message::NotProvisioned.lines(Side::General);
        assert!(lines.contains(&MACHINE_FILE.to_owned()));
        assert!(lines
            .iter()
            .any(|l| l.contains("airlock flash") && l.contains("--machine FILE")));
        for line in Message::NotProvisioned
            .lines(Side::General)
            .iter()
            .chain(&locked)
            .chain(&m.lines(Side::General))
        {
            assert!(
                line.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
                "{line:?}"
            );
        }
    }

    #[test]
    fn each_message_is_logged_once() {
        let disk = Message::NoDisk {
            path: "/var/lib/airlock/classified/disk/w.qcow2".into(),
        };
        let np = Message::NotProvisioned;
        assert_eq!(
            new_log_lines([None, None], [Some(&disk), None]),
            ["airlock-kiosk: message for IT: classified: no guest disk at /var/lib/airlock/classified/disk/w.qcow2"]
        );
        assert!(new_log_lines([Some(&disk), None], [Some(&disk), None]).is_empty());
        assert_eq!(
            new_log_lines([None, None], [Some(&np), Some(&np)]),
            ["airlock-kiosk: message for IT: this PC is not provisioned: no machine settings at /var/lib/airlock/provision/appliance.toml"]
        );
        assert!(new_log_lines([Some(&np), Some(&np)], [Some(&np), Some(&np)]).is_empty());
        // Gone and back: said again.
        assert_eq!(
            new_log_lines([None, None], [Some(&disk), Some(&disk)]).len(),
            2
        );
        assert_eq!(
            new_log_lines([Some(&disk), None], [Some(&disk), Some(&disk)]),
            ["airlock-kiosk: message for IT: general: no guest disk at /var/lib/airlock/classified/disk/w.qcow2"]
        );
    }

    #[test]
    fn only_a_missing_file_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("appliance.toml");
        assert!(machine_file_absent(&file));
        assert!(machine_file_absent(&file.join("below")));
        std::fs::write(&file, "").unwrap();
        assert!(!machine_file_absent(&file));
        assert!(machine_file_absent(&file.join("below")), "ENOTDIR");
        assert!(!machine_file_absent(dir.path()));
    }
}
