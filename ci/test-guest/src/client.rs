//! Host side of the test port: one command line out, one reply line back,
//! over the unix socket QEMU bridges to the guest's `org.airlock.test.0`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connection to one guest's test port.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to `socket`, retrying until `timeout` (QEMU creates it).
    pub fn connect(socket: &Path, timeout: Duration) -> io::Result<Client> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    let writer = stream.try_clone()?;
                    return Ok(Client {
                        reader: BufReader::new(stream),
                        writer,
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connecting to {}: {e}", socket.display()),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends `command` and returns the reply line (without the newline).
    /// Late answers to earlier pings (see [`wait_alive`](Self::wait_alive))
    /// are skipped.
    pub fn command(&mut self, command: &str, timeout: Duration) -> io::Result<String> {
        self.writer.write_all(format!("{command}\n").as_bytes())?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let line = self.read_reply(left)?;
            if command == "ping" || !line.starts_with("pong") {
                return Ok(line);
            }
        }
    }

    fn read_reply(&mut self, timeout: Duration) -> io::Result<String> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest's port closed (QEMU exited?)",
            )),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(e),
        }
    }

    /// Pings until the guest answers (it may still be booting: until then
    /// nothing reads the port), or `timeout` passes.
    pub fn wait_alive(&mut self, timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.writer.write_all(b"ping\n")?;
            match self.read_reply(Duration::from_millis(1000)) {
                Ok(line) if line.starts_with("pong") => return Ok(line),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the guest did not answer ping within {timeout:?}"),
                ));
            }
        }
    }
}

/// Runs one QMP command (`{"execute": ...}` as JSON text) on a QEMU QMP
/// socket (the supervisor's test-only `qmp-test.sock`) and returns QEMU's
/// `{"return": ...}` or `{"error": ...}` line. Events on the way are skipped.
/// Line-based on purpose: the caller parses the JSON.
pub fn qmp_execute(socket: &Path, command: &str, timeout: Duration) -> io::Result<String> {
    let mut qmp = Client::connect(socket, timeout)?;
    let greeting = qmp.read_reply(timeout)?;
    if !greeting.starts_with("{\"QMP\"") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a QMP greeting: {greeting}"),
        ));
    }
    let mut answer = |text: &str| -> io::Result<String> {
        qmp.writer.write_all(format!("{text}\n").as_bytes())?;
        loop {
            let line = qmp.read_reply(timeout)?;
            if line.starts_with("{\"return\"") || line.starts_with("{\"error\"") {
                return Ok(line);
            }
        }
    };
    let negotiated = answer(r#"{"execute": "qmp_capabilities"}"#)?;
    if !negotiated.starts_with("{\"return\"") {
        return Err(io::Error::other(format!(
            "qmp_capabilities refused: {negotiated}"
        )));
    }
    answer(command)
}

/// The `name=<number>` fields of a reply line such as `vdagent-log`'s
/// (`rx.clipboard-grab=1` → `"rx.clipboard-grab" → 1`); other words are
/// left out.
pub fn counters(line: &str) -> std::collections::BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_parsed() {
        let c = super::counters(
            "vdagent connected=yes rx.clipboard=2 tx.announce-capabilities=1 errors=0",
        );
        assert_eq!(c.len(), 3);
        assert_eq!(c["rx.clipboard"], 2);
        assert_eq!(c.get("connected"), None);
    }
}
