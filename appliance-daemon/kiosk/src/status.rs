//! The supervisor's status, from its control socket
//! (`/run/airlock/control.sock`, JSON lines, server to client only; see
//! `airlockd`'s `control` module): each guest's state for the label.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::thread;
use std::time::Duration;

use crate::message::{self, Message};
use crate::{Event, Side};

/// What the label shows for a guest while no supervisor answers.
pub const NO_SUPERVISOR: &str = "not started";

/// Failed connections in a row (one a second) before a PC without its
/// machine settings file is called not provisioned: at boot the kiosk
/// starts before the supervisor, and a test image runs its supervisor
/// without that file.
pub const NOT_PROVISIONED_AFTER: u32 = 5;

/// One guest as the supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestReport {
    /// Its state word, for the strip.
    pub state: String,
    /// A message for IT in its area.
    pub message: Option<Message>,
}

impl GuestReport {
    pub fn new(state: &str, message: Option<Message>) -> GuestReport {
        GuestReport {
            state: state.into(),
            message,
        }
    }
}

/// Each guest's state word and message, from one status line; `None` if
/// the line is not a status event.
pub fn parse_status(line: &str) -> Option<(GuestReport, GuestReport)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("event")?.as_str()? != "status" {
        return None;
    }
    let report = |side: Side| -> GuestReport {
        let guest = &value["guests"][side.name()];
        let raw = guest["state"].as_str().unwrap_or("unknown");
        // Only a short word from a fixed alphabet reaches the screen.
        let state = raw
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        GuestReport {
            state,
            message: Message::from_state(raw, guest["path"].as_str()),
        }
    };
    Some((report(Side::Classified), report(Side::General)))
}

/// What both guests show while no supervisor answers, after `failures`
/// failed connections in a row: [`NO_SUPERVISOR`], and once that lasts,
/// [`Message::DataLocked`] if `var_locked` says /var stayed closed, else
/// [`Message::NotProvisioned`] if `machine_file` is absent.
pub fn without_supervisor(
    failures: u32,
    machine_file: &Path,
    var_locked: impl Fn() -> bool,
) -> GuestReport {
    let message = if failures < NOT_PROVISIONED_AFTER {
        None
    } else if var_locked() {
        Some(Message::DataLocked)
    } else {
        message::machine_file_absent(machine_file).then_some(Message::NotProvisioned)
    };
    GuestReport::new(NO_SUPERVISOR, message)
}

/// Follows the control socket for ever, sending each status to `updates`
/// as [`Event::Status`] (and [`without_supervisor`] for both while it
/// cannot connect). Returns when the receiver is gone.
pub fn follow(socket: &Path, machine_file: &Path, updates: Sender<Event>) {
    let mut failures = 0u32;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => {
                failures = 0;
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(states) = parse_status(&line) {
                        if updates.send(Event::Status(states.0, states.1)).is_err() {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                if failures == 0 {
                    eprintln!(
                        "airlock-kiosk: no supervisor status on {}: {e}",
                        socket.display()
                    );
                }
                failures = failures.saturating_add(1);
            }
        }
        let report = without_supervisor(failures, machine_file, || {
            message::var_is_locked(Path::new("/var"))
        });
        if updates.send(Event::Status(report.clone(), report)).is_err() {
            return;
        }
        thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(reports: Option<(GuestReport, GuestReport)>) -> Option<(String, String)> {
        reports.map(|(c, g)| (c.state, g.state))
    }

    #[test]
    fn states_come_from_the_status_event() {
        let line = r#"{"event":"status","phase":"running","ready":false,"both_off":false,
            "guests":{"classified":{"state":"running","pid":812,"restarts":0},
                      "general":{"state":"restarting","delay_ms":2000,"reason":"crashed","restarts":1}},
            "gateway":{"state":"running","pid":830,"restarts":0}}"#
            .replace('\n', "");
        assert_eq!(
            parse_status(&line),
            Some((
                GuestReport::new("running", None),
                GuestReport::new("restarting", None)
            ))
        );
    }

    #[test]
    fn a_missing_disk_is_a_message_with_its_path() {
        let line = r#"{"event":"status","phase":"running","ready":false,"both_off":false,"guests":{"classified":{"state":"no-disk","path":"/var/lib/airlock/classified/disk/windows.qcow2","restarts":0},"general":{"state":"running","pid":9,"restarts":0}},"gateway":{"state":"disabled","restarts":0}}"#;
        let (c, g) = parse_status(line).unwrap();
        assert_eq!(
            c,
            GuestReport::new(
                "no-disk",
                Some(Message::NoDisk {
                    path: "/var/lib/airlock/classified/disk/windows.qcow2".into()
                })
            )
        );
        assert_eq!(g, GuestReport::new("running", None));
        // A hostile path is made printable; a path with another state is ignored.
        let line = r#"{"event":"status","guests":{"classified":{"state":"no-disk","path":"/a\u001b[2J\nb"},"general":{"state":"off","path":"/x"}}}"#;
        let (c, g) = parse_status(line).unwrap();
        assert_eq!(
            c.message,
            Some(Message::NoDisk {
                path: "/a?[2J?b".into()
            })
        );
        assert_eq!(g.message, None);
    }

    #[test]
    fn anything_else_is_ignored_or_made_harmless() {
        assert_eq!(parse_status("not json"), None);
        assert_eq!(parse_status(r#"{"event":"other"}"#), None);
        let hostile = r#"{"event":"status","guests":{"classified":{"state":"run\u001b[2Jning very long state word indeed"}}}"#;
        assert_eq!(
            words(parse_status(hostile)),
            Some(("run2Jningverylongstatewo".into(), "unknown".into()))
        );
        // Only the exact word makes a message.
        let near =
            r#"{"event":"status","guests":{"classified":{"state":"no-disk\u001b","path":"/x"}}}"#;
        assert_eq!(parse_status(near).unwrap().0.message, None);
    }

    #[test]
    fn not_provisioned_needs_a_lasting_absence_and_no_machine_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("appliance.toml");
        for failures in 0..NOT_PROVISIONED_AFTER {
            assert_eq!(
                without_supervisor(failures, &file, || true),
                GuestReport::new(NO_SUPERVISOR, None)
            );
        }
        assert_eq!(
            without_supervisor(NOT_PROVISIONED_AFTER, &file, || false),
            GuestReport::new(NO_SUPERVISOR, Some(Message::NotProvisioned))
        );
        assert_eq!(
            without_supervisor(NOT_PROVISIONED_AFTER, &file, || true),
            GuestReport::new(NO_SUPERVISOR, Some(Message::DataLocked))
        );
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            without_supervisor(100, &file, || false),
            GuestReport::new(NO_SUPERVISOR, None)
        );
    }
}
