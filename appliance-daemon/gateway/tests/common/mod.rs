//! Test harness: the gateway as a child process and fake guest agents
//! (unix-socket listeners standing in for QEMU's `server=on` chardevs),
//! speaking the protocol through the codec.
#![allow(dead_code)]

use airlock_vdagent::{encode, Capabilities, ClipboardType, Decoder, Message};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(15);

/// A running gateway; killed on drop. Its stderr goes to `log`.
pub struct Gateway {
    child: Child,
    pub log: PathBuf,
    pub audit: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, extra: &[&str]) -> Gateway {
        Self::start_with_sockets(
            dir,
            &dir.join("general.sock"),
            &dir.join("classified.sock"),
            extra,
        )
    }

    pub fn start_with_sockets(
        dir: &Path,
        general: &Path,
        classified: &Path,
        extra: &[&str],
    ) -> Gateway {
        let log = dir.join("gateway.stderr");
        let audit = dir.join("clipboard.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_airlock-gateway"));
        cmd.arg("--classified")
            .arg(classified)
            .arg("--general")
            .arg(general)
            .arg("--audit-log")
            .arg(&audit);
        if !extra.contains(&"--sanitiser") {
            cmd.arg("--sanitiser")
                .arg(env!("CARGO_BIN_EXE_airlock-sanitiser"));
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting airlock-gateway");
        Gateway { child, log, audit }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn audit_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Waits until the audit log has more than `n` lines; returns line `n`.
    pub fn audit_line_after(&self, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.audit_lines();
            if lines.len() > n {
                return lines[n].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no audit line {n}; gateway log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the gateway has logged `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "gateway never logged {needle:?}; log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "gateway exited; log:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--max-bytes` unless a test gives its own.
pub const LIMIT: &str = "65536";

/// A scratch directory, both fake ports, the gateway started with `extra`
/// arguments, and both agents connected (capabilities exchanged).
pub fn setup(
    extra: &[&str],
) -> (
    tempfile::TempDir,
    Gateway,
    FakePort,
    FakePort,
    FakeAgent,
    FakeAgent,
) {
    let dir = tempfile::tempdir().unwrap();
    let gport = FakePort::bind(dir.path(), "general");
    let cport = FakePort::bind(dir.path(), "classified");
    let mut args = extra.to_vec();
    if !extra.contains(&"--max-bytes") {
        args.extend(["--max-bytes", LIMIT]);
    }
    let gw = Gateway::start(dir.path(), &args);
    let general = gport.accept();
    let classified = cport.accept();
    (dir, gw, gport, cport, general, classified)
}

/// A fake agent's listening socket (QEMU's side of the chardev).
pub struct FakePort {
    listener: UnixListener,
    pub name: &'static str,
}

impl FakePort {
    pub fn bind(dir: &Path, name: &'static str) -> FakePort {
        let listener = UnixListener::bind(dir.join(format!("{name}.sock"))).unwrap();
        listener.set_nonblocking(true).unwrap();
        FakePort { listener, name }
    }

    /// Accepts the gateway's next connection and does the agent's side of
    /// the capability exchange (like the Linux agent: announce with
    /// request=1, expect the answer).
    pub fn accept(&self) -> FakeAgent {
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "{}: gateway never connected",
                        self.name
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut agent = FakeAgent {
            stream,
            decoder: Decoder::new(64 << 20),
            inbox: vec![],
            raw: vec![],
            name: self.name,
        };
        let first = agent.expect(|m| matches!(m, Message::AnnounceCapabilities { .. }));
        assert_eq!(
            first,
            Message::AnnounceCapabilities {
                request: true,
                caps: Capabilities::from_bits(&[
                    airlock_vdagent::cap::CLIPBOARD_BY_DEMAND,
                    airlock_vdagent::cap::MAX_CLIPBOARD
                ])
            }
        );
        agent.send(&Message::AnnounceCapabilities {
            request: false,
            caps: Capabilities(vec![0x0000_0420]),
        });
        agent
    }
}

/// One connection from the gateway, seen from the agent.
pub struct FakeAgent {
    pub stream: UnixStream,
    decoder: Decoder,
    inbox: Vec<Message>,
    /// Every byte the gateway ever sent on this connection.
    pub raw: Vec<u8>,
    pub name: &'static str,
}

impl FakeAgent {
    pub fn send(&mut self, msg: &Message) {
        self.stream.write_all(&encode(msg)).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn pump(&mut self, until: Instant) -> bool {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.stream
            .set_read_timeout(Some(left.min(Duration::from_millis(50))))
            .unwrap();
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                for r in self.decoder.feed(&buf[..n]) {
                    self.inbox.push(
                        r.unwrap_or_else(|e| panic!("{}: gateway sent bad bytes: {e}", self.name)),
                    );
                }
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(_) => false,
        }
    }

    /// Waits for a message matching `pred` (earlier non-matching messages
    /// are kept) and returns it.
    pub fn expect(&mut self, pred: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.inbox.iter().position(&pred) {
                return self.inbox.remove(i);
            }
            assert!(
                self.pump(deadline),
                "{}: expected message never came; inbox {:?}",
                self.name,
                self.inbox
            );
        }
    }

    /// Everything that arrives within `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<Message> {
        let deadline = Instant::now() + d;
        while self.pump(deadline) {}
        std::mem::take(&mut self.inbox)
    }

    /// True once the gateway has closed this connection.
    pub fn closed_within(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            self.stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }
}

/// General copies `data` as `ty`; the gateway must request it at once.
pub fn general_copies(general: &mut FakeAgent, ty: ClipboardType, data: &[u8]) {
    general.send(&Message::ClipboardGrab(vec![ty]));
    assert_eq!(
        general.expect(|m| matches!(m, Message::ClipboardRequest(_))),
        Message::ClipboardRequest(ty)
    );
    general.send(&Message::Clipboard {
        ty,
        data: data.to_vec(),
    });
}

/// Classified sees a grab, pastes, and gets the data: returns (type, data).
pub fn classified_pastes(classified: &mut FakeAgent) -> (ClipboardType, Vec<u8>) {
    let Message::ClipboardGrab(types) =
        classified.expect(|m| matches!(m, Message::ClipboardGrab(_)))
    else {
        unreachable!()
    };
    assert_eq!(types.len(), 1, "gateway offers exactly one type");
    classified.send(&Message::ClipboardRequest(types[0]));
    match classified.expect(|m| matches!(m, Message::Clipboard { .. })) {
        Message::Clipboard { ty, data } => (ty, data),
        _ => unreachable!(),
    }
}

/// A PNG of `w`×`h` with a gradient.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// One chunk holding one message, with any header values.
pub fn raw_frame(port: u32, protocol: u32, msg_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [
        port,
        20 + data.len() as u32,
        protocol,
        msg_type,
        0,
        0,
        data.len() as u32,
    ] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(data);
    v
}
