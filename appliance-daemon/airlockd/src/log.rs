//! Log lines on stderr. Under systemd (`JOURNAL_STREAM` set) each line starts
//! with its syslog priority (`<3>` error, `<4>` warning, `<6>` info), which
//! journald turns into the entry's priority.

use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
    Info,
}

fn write(level: Level, message: &str) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let line = if journal {
        let prio = match level {
            Level::Error => 3,
            Level::Warning => 4,
            Level::Info => 6,
        };
        format!("<{prio}>{message}\n")
    } else {
        let tag = match level {
            Level::Error => "error: ",
            Level::Warning => "warning: ",
            Level::Info => "",
        };
        format!("airlockd: {tag}{message}\n")
    };
    // One write per line, so lines from several threads do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn info(message: impl AsRef<str>) {
    write(Level::Info, message.as_ref());
}

pub fn warn(message: impl AsRef<str>) {
    write(Level::Warning, message.as_ref());
}

pub fn error(message: impl AsRef<str>) {
    write(Level::Error, message.as_ref());
}
