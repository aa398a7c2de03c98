//! The supervisor's side of QMP (QEMU's JSON control protocol) on a guest's
//! `qmp.sock`: the handshake, reading events (the `SHUTDOWN` event says
//! whether the guest powered itself off, reset, or was stopped by the host),
//! and sending `system_powerdown` (the ACPI power button).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How long QEMU may take to greet and accept capabilities.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

impl Event {
    /// For `SHUTDOWN`: whether the guest asked for it, and QEMU's reason
    /// (`guest-shutdown`, `guest-reset`, `guest-panic`, `host-signal`, ...).
    pub fn shutdown(&self) -> Option<Shutdown> {
        (self.name == "SHUTDOWN").then(|| Shutdown {
            guest: self
                .data
                .get("guest")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            reason: self
                .data
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// The data of a `SHUTDOWN` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    pub guest: bool,
    pub reason: String,
}

/// One line from QEMU, if it is an event.
pub fn parse_event(line: &str) -> Option<Event> {
    let v: Value = serde_json::from_str(line).ok()?;
    let name = v.get("event")?.as_str()?.to_owned();
    Some(Event {
        name,
        data: v.get("data").cloned().unwrap_or(Value::Null),
    })
}

/// A QMP connection past the handshake.
pub struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Session {
    /// Connects to `socket`, retrying while `alive()` says QEMU still runs
    /// and `timeout` has not passed, and negotiates capabilities.
    pub fn connect(socket: &Path, timeout: Duration, alive: impl Fn() -> bool) -> Result<Session> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if !alive() || Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", socket.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut session = Session {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = session
            .read_line()?
            .context("QMP closed before its greeting")?;
        if !greeting.contains("\"QMP\"") {
            bail!("unexpected QMP greeting {greeting:?}");
        }
        session
            .writer
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        loop {
            let line = session
                .read_line()?
                .context("QMP closed during the handshake")?;
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                bail!("qmp_capabilities refused: {line}");
            }
        }
        session.reader.get_ref().set_read_timeout(None)?;
        Ok(session)
    }

    fn read_line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        match self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?
        {
            0 => Ok(None),
            _ => Ok(Some(line)),
        }
    }

    /// A handle for sending commands from another thread.
    pub fn commander(&self) -> Result<Commander> {
        Ok(Commander {
            stream: self.writer.try_clone()?,
        })
    }

    /// The next event; `None` when QEMU closed the socket (it exited).
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.read_line() {
                Ok(Some(line)) => {
                    if let Some(event) = parse_event(&line) {
                        return Some(event);
                    }
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// Sends commands without waiting for their replies (the event reader
/// skips replies).
#[derive(Debug)]
pub struct Commander {
    stream: UnixStream,
}

impl Commander {
    /// Presses the guest's ACPI power button.
    pub fn system_powerdown(&mut self) -> std::io::Result<()> {
        self.stream
            .write_all(b"{\"execute\":\"system_powerdown\"}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_shutdown_events() {
        let e = parse_event(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#).unwrap();
        assert_eq!(
            e.shutdown(),
            Some(Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        let e = parse_event(
            r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-signal"}}"#,
        )
        .unwrap();
        assert_eq!(
            e.shutdown(),
            Some(Shutdown {
                guest: false,
                reason: "host-signal".into()
            })
        );
        assert_eq!(
            parse_event(r#"{"event": "POWERDOWN"}"#).unwrap().shutdown(),
            None
        );
        assert!(parse_event(r#"{"return": {}}"#).is_none());
        assert!(parse_event("garbage").is_none());
    }

    #[test]
    fn handshake_then_events_then_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\n{\"event\": \"POWERDOWN\"}\n")
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("system_powerdown"), "{line}");
            s.write_all(b"{\"return\": {}}\n{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\n").unwrap();
        });
        let mut session = Session::connect(&path, Duration::from_secs(5), || true).unwrap();
        assert_eq!(session.next_event().unwrap().name, "POWERDOWN");
        session.commander().unwrap().system_powerdown().unwrap();
        assert!(session.next_event().unwrap().shutdown().unwrap().guest);
        server.join().unwrap();
        assert!(session.next_event().is_none());
    }
}
