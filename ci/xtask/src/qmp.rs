//! A small synchronous QMP client (QEMU's JSON control protocol) over the
//! unix socket each test VM gets.
//!
//! QMP interleaves asynchronous events (`RESET`, `SHUTDOWN`, `POWERDOWN`, ...)
//! with command replies. [`Qmp`] records every event it reads, so a test can
//! ask afterwards whether the guest reset or shut down ([`Qmp::saw_event`]),
//! or wait for the next one of a kind ([`Qmp::wait_event`]). Commands carry an
//! `id`, so a late reply to a command given up on is never taken for the
//! reply to the next one.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use airlock_test_agent::lines::LineReader;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

/// How long a command may take before [`Qmp::execute`] gives up.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between attempts to connect to a socket QEMU has not created yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// A command QEMU answered with an error. Returned inside `anyhow::Error`;
/// `downcast_ref::<QmpError>()` gives the class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("QMP command `{command}` failed: {desc} ({class})")]
pub struct QmpError {
    pub command: String,
    pub class: String,
    pub desc: String,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// `RESET`, `SHUTDOWN`, `POWERDOWN`, `STOP`, ...
    pub name: String,
    /// The event's `data` (`Null` if it has none).
    pub data: Value,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmStatus {
    /// `running`, `paused`, `shutdown`, `guest-panicked`, ...
    pub status: String,
    pub running: bool,
}

/// What a screendump was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    /// QEMU built without libpng.
    Ppm,
}

/// One line from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
enum Incoming {
    Greeting {
        version: String,
    },
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

fn parse_line(line: &[u8]) -> Result<Incoming> {
    let v: Value = serde_json::from_slice(line)?;
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(greeting) = v.get("QMP") {
        let q = &greeting["version"]["qemu"];
        let version = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
        Ok(Incoming::Greeting { version })
    } else if let Some(value) = v.get("return") {
        Ok(Incoming::Return {
            id,
            value: value.clone(),
        })
    } else if let Some(error) = v.get("error") {
        let text = |k: &str| {
            error
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(Incoming::Error {
            id,
            class: text("class"),
            desc: text("desc"),
        })
    } else if let Some(name) = v.get("event").and_then(Value::as_str) {
        Ok(Incoming::Event(QmpEvent {
            name: name.to_owned(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        }))
    } else {
        bail!("unexpected QMP message")
    }
}

/// The `send-key` arguments for keys pressed together (QEMU qcodes such as
/// `ctrl`, `alt`, `delete`, `f2`, `ret`, `a`).
fn send_key_args(keys: &[&str]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "type": "qcode", "data": k }))
        .collect();
    json!({ "keys": keys })
}

/// Whether a failed PNG screendump means "this QEMU cannot write PNG".
fn png_unsupported(error: &QmpError) -> bool {
    let desc = error.desc.to_ascii_lowercase();
    desc.contains("png") || desc.contains("format")
}

/// A connected QMP session, past capability negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: LineReader,
    writer: UnixStream,
    next_id: u64,
    version: String,
    events: Vec<QmpEvent>,
    /// Events before this index were returned by `wait_event` or skipped by it.
    event_cursor: usize,
    png: bool,
}

impl Qmp {
    /// Connects to `socket` (retrying while QEMU has not created it yet),
    /// reads the greeting and enters command mode, all within `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP socket {}", socket.display()))
                }
                Err(_) => thread::sleep(CONNECT_RETRY),
            }
        };
        Self::handshake(stream, deadline)
            .with_context(|| format!("QMP handshake on {}", socket.display()))
    }

    /// Greeting and `qmp_capabilities` on a connected stream.
    pub fn handshake(stream: UnixStream, deadline: Instant) -> Result<Qmp> {
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut qmp = Qmp {
            reader: LineReader::new(stream),
            writer,
            next_id: 1,
            version: String::new(),
            events: Vec::new(),
            event_cursor: 0,
            png: true,
        };
        // QEMU serves one QMP client at a time: a second one gets no greeting.
        let line = qmp
            .read_line(deadline)
            .context("waiting for the QMP greeting (is another client connected?)")?;
        match parse_line(&line)? {
            Incoming::Greeting { version } => qmp.version = version,
            other => bail!("expected the QMP greeting, got {other:?}"),
        }
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        qmp.execute_with_timeout("qmp_capabilities", None, remaining)?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting, e.g. `10.0.2`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(command, arguments, COMMAND_TIMEOUT)
    }

    /// [`execute`](Self::execute) with an explicit timeout.
    pub fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.exchange(command, arguments, timeout)?.ok_or_else(|| {
            anyhow!("QMP socket closed while waiting for the reply to `{command}` (QEMU exited?)")
        })
    }

    /// Sends `command` and waits for its reply; `None` if QEMU closed the
    /// socket first.
    fn exchange(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Option<Value>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&message)?;
        line.push(b'\n');
        match self.writer.write_all(&line) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("sending QMP command `{command}`")),
        }
        let deadline = Instant::now() + timeout;
        loop {
            let line = match self.reader.read_line(deadline) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    bail!("no reply to QMP command `{command}` within {timeout:?}")
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading the reply to QMP command `{command}`"))
                }
            };
            match parse_line(&line)
                .with_context(|| format!("QMP sent {:?}", String::from_utf8_lossy(&line)))?
            {
                Incoming::Event(event) => self.events.push(event),
                Incoming::Return {
                    id: Some(got),
                    value,
                } if got == id => return Ok(Some(value)),
                // Errors about unparsable input carry no id; ours is the only command in flight.
                Incoming::Error {
                    id: got,
                    class,
                    desc,
                } if got == Some(id) || got.is_none() => {
                    return Err(QmpError {
                        command: command.to_owned(),
                        class,
                        desc,
                    }
                    .into())
                }
                _ => {} // a late reply to a command given up on
            }
        }
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        match self.reader.read_line(deadline) {
            Ok(Some(line)) => Ok(line),
            Ok(None) => bail!("QMP socket closed (QEMU exited?)"),
            Err(e) => Err(e).context("reading from the QMP socket"),
        }
    }

    /// Every event read so far, oldest first.
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    /// Reads the events QEMU has sent since the last command, without waiting.
    pub fn poll_events(&mut self) -> Result<&[QmpEvent]> {
        // A no-op command flushes everything queued before its reply.
        self.execute("query-status", None)?;
        Ok(&self.events)
    }

    /// Whether an event called `name` has arrived (polls first).
    pub fn saw_event(&mut self, name: &str) -> Result<bool> {
        Ok(self.poll_events()?.iter().any(|e| e.name == name))
    }

    /// Waits for the next event called `name` that no earlier `wait_event`
    /// returned or passed over, and returns it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(offset) = self.events[self.event_cursor..]
                .iter()
                .position(|e| e.name == name)
            {
                let index = self.event_cursor + offset;
                self.event_cursor = index + 1;
                return Ok(self.events[index].clone());
            }
            self.event_cursor = self.events.len();
            let line = match self.reader.read_line(deadline) {
                Ok(Some(line)) => line,
                Ok(None) => {
                    bail!("QMP socket closed while waiting for event {name} (QEMU exited?)")
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    bail!("no QMP event {name} within {timeout:?}")
                }
                Err(e) => return Err(e).context("reading QMP events"),
            };
            if let Incoming::Event(event) = parse_line(&line)? {
                self.events.push(event);
            }
        }
    }

    /// Presses `keys` together and releases them, e.g. `&["ctrl", "alt", "f2"]`.
    pub fn send_key(&mut self, keys: &[&str]) -> Result<()> {
        self.execute("send-key", Some(send_key_args(keys)))
            .map(drop)
    }

    /// Writes the guest's screen to `path` as PNG, or as PPM if this QEMU
    /// cannot write PNG; says which. Needs a display device (`Graphics::Std`).
    pub fn screendump(&mut self, path: &Path) -> Result<ImageFormat> {
        let path =
            std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
        let filename = path
            .to_str()
            .with_context(|| format!("screendump path {} is not UTF-8", path.display()))?;
        if self.png {
            match self.execute(
                "screendump",
                Some(json!({ "filename": filename, "format": "png" })),
            ) {
                Ok(_) => return Ok(ImageFormat::Png),
                Err(e) if e.downcast_ref::<QmpError>().is_some_and(png_unsupported) => {
                    self.png = false
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("taking a screendump to {filename}"))
                }
            }
        }
        self.execute("screendump", Some(json!({ "filename": filename })))
            .with_context(|| format!("taking a screendump to {filename}"))?;
        Ok(ImageFormat::Ppm)
    }

    /// Presses the machine's reset button (the guest does not shut down).
    pub fn system_reset(&mut self) -> Result<()> {
        self.execute("system_reset", None).map(drop)
    }

    /// Presses the ACPI power button; the guest decides what to do.
    pub fn system_powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", None).map(drop)
    }

    /// Makes QEMU exit at once (like pulling the plug, but QEMU flushes its
    /// disk caches). QEMU may close the socket before replying; that is fine.
    pub fn quit(&mut self) -> Result<()> {
        self.exchange("quit", None, COMMAND_TIMEOUT).map(drop)
    }

    pub fn query_status(&mut self) -> Result<VmStatus> {
        let value = self.execute("query-status", None)?;
        serde_json::from_value(value).context("decoding the query-status reply")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_line() {
        let cases: &[(&str, Incoming)] = &[
            (
                r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#,
                Incoming::Greeting {
                    version: "10.0.2".into(),
                },
            ),
            (
                r#"{"return": {}, "id": 5}"#,
                Incoming::Return {
                    id: Some(5),
                    value: json!({}),
                },
            ),
            (
                r#"{"return": {"status": "running", "running": true}}"#,
                Incoming::Return {
                    id: None,
                    value: json!({"status": "running", "running": true}),
                },
            ),
            (
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'format' does not accept value 'bmp'"}, "id": 2}"#,
                Incoming::Error {
                    id: Some(2),
                    class: "GenericError".into(),
                    desc: "Parameter 'format' does not accept value 'bmp'".into(),
                },
            ),
            (
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#,
                Incoming::Event(QmpEvent {
                    name: "SHUTDOWN".into(),
                    data: json!({"guest": false, "reason": "host-qmp-quit"}),
                }),
            ),
            (
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESET"}"#,
                Incoming::Event(QmpEvent {
                    name: "RESET".into(),
                    data: Value::Null,
                }),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(&parse_line(line.as_bytes()).unwrap(), expected, "{line}");
        }
        assert!(parse_line(br#"{"something": 1}"#).is_err());
        assert!(parse_line(b"{not json").is_err());
    }

    #[test]
    fn send_key_uses_qcodes() {
        assert_eq!(
            send_key_args(&["ctrl", "alt", "f1"]),
            json!({"keys": [{"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "f1"}]})
        );
    }

    #[test]
    fn png_fallback_only_for_format_errors() {
        let err = |desc: &str| QmpError {
            command: "screendump".into(),
            class: "GenericError".into(),
            desc: desc.into(),
        };
        assert!(png_unsupported(&err(
            "Parameter 'format' does not accept value 'png'"
        )));
        assert!(png_unsupported(&err("PNG support is disabled")));
        assert!(!png_unsupported(&err(
            "There is no QemuConsole I can screendump from."
        )));
    }

    /// A fake QEMU on the other end of a socketpair, answering from a script.
    fn fake_qemu(script: impl FnOnce(&mut LineReader, &mut UnixStream) + Send + 'static) -> Qmp {
        let (host, qemu) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut writer = qemu.try_clone().unwrap();
            let mut reader = LineReader::new(qemu);
            writer.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}}}}\n").unwrap();
            let caps = reader
                .read_line(Instant::now() + Duration::from_secs(5))
                .unwrap()
                .unwrap();
            assert!(String::from_utf8(caps)
                .unwrap()
                .contains("qmp_capabilities"));
            writer.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
            script(&mut reader, &mut writer);
        });
        Qmp::handshake(host, Instant::now() + Duration::from_secs(5)).unwrap()
    }

    fn next_request(reader: &mut LineReader) -> Value {
        serde_json::from_slice(
            &reader
                .read_line(Instant::now() + Duration::from_secs(5))
                .unwrap()
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn execute_skips_events_and_late_replies_but_records_events() {
        let mut qmp = fake_qemu(|reader, writer| {
            let request = next_request(reader);
            assert_eq!(request["execute"], "system_reset");
            writer.write_all(b"{\"return\": {}, \"id\": 999}\n{\"event\": \"RESET\", \"data\": {\"guest\": false}}\n").unwrap();
            writer
                .write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]).as_bytes())
                .unwrap();
        });
        assert_eq!(qmp.version(), "10.0.0");
        qmp.system_reset().unwrap();
        assert_eq!(
            qmp.events()
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["RESET"]
        );
        assert_eq!(
            qmp.wait_event("RESET", Duration::from_secs(1))
                .unwrap()
                .data["guest"],
            false
        );
        assert!(
            qmp.wait_event("RESET", Duration::from_millis(100)).is_err(),
            "each event is waited for once"
        );
    }

    #[test]
    fn command_errors_keep_their_class() {
        let mut qmp = fake_qemu(|reader, writer| {
            let id = next_request(reader)["id"].clone();
            writer.write_all(format!("{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"nope\"}}, \"id\": {id}}}\n").as_bytes()).unwrap();
        });
        let err = qmp
            .execute("device_del", Some(json!({"id": "x"})))
            .unwrap_err();
        let qmp_err = err.downcast_ref::<QmpError>().unwrap();
        assert_eq!(
            (qmp_err.class.as_str(), qmp_err.desc.as_str()),
            ("DeviceNotFound", "nope")
        );
    }

    #[test]
    fn quit_accepts_qemu_hanging_up_first() {
        let mut qmp = fake_qemu(|reader, _writer| {
            next_request(reader);
        });
        qmp.quit().unwrap();
    }
}
