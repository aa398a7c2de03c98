//! The supervisor's status, from its control socket
//! (`/run/airlock/control.sock`, JSON lines, server to client only; see
//! `airlockd`'s `control` module): each guest's state for the label.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::thread;
use std::time::Duration;

use crate::{Event, Side};

/// What the label shows for a guest while no supervisor answers.
pub const NO_SUPERVISOR: &str = "not started";

/// Each guest's state word, from one status line; `None` if the line is
/// not a status event.
pub fn parse_status(line: &str) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("event")?.as_str()? != "status" {
        return None;
    }
    let state = |side: Side| -> String {
        let word = value["guests"][side.name()]["state"]
            .as_str()
            .unwrap_or("unknown");
        // Only a short word from a fixed alphabet reaches the screen.
        word.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect()
    };
    Some((state(Side::Classified), state(Side::General)))
}

/// Follows the control socket for ever, sending each status to `updates`
/// as [`Event::Status`] (and [`NO_SUPERVISOR`] for both while it cannot
/// connect). Returns when the receiver is gone.
pub fn follow(socket: &Path, updates: Sender<Event>) {
    let mut connected_before = true;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => {
                connected_before = true;
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
                if connected_before {
                    eprintln!(
                        "airlock-kiosk: no supervisor status on {}: {e}",
                        socket.display()
                    );
                    connected_before = false;
                }
            }
        }
        if updates
            .send(Event::Status(NO_SUPERVISOR.into(), NO_SUPERVISOR.into()))
            .is_err()
        {
            return;
        }
        thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_come_from_the_status_event() {
        let line = r#"{"event":"status","phase":"running","ready":false,"both_off":false,
            "guests":{"classified":{"state":"running","pid":812,"restarts":0},
                      "general":{"state":"restarting","delay_ms":2000,"reason":"crashed","restarts":1}},
            "gateway":{"state":"running","pid":830,"restarts":0}}"#
            .replace('\n', "");
        assert_eq!(
            parse_status(&line),
            Some(("running".into(), "restarting".into()))
        );
    }

    #[test]
    fn anything_else_is_ignored_or_made_harmless() {
        assert_eq!(parse_status("not json"), None);
        assert_eq!(parse_status(r#"{"event":"other"}"#), None);
        let hostile = r#"{"event":"status","guests":{"classified":{"state":"run\u001b[2Jning very long state word indeed"}}}"#;
        assert_eq!(
            parse_status(hostile),
            Some(("run2Jningverylongstatewo".into(), "unknown".into()))
        );
    }
}
