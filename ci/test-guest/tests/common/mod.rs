//! Booting the test guest under QEMU (TCG, no root) for the integration
//! tests: one [`Guest`] per boot, killed when dropped; its serial console is
//! printed when a test panics with the guest still held.

#![allow(dead_code)] // each test file uses its own part

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use airlock_test_guest::client::Client;
use airlock_test_guest::image;

/// A running test guest.
pub struct Guest {
    qemu: Child,
    pub dir: tempfile::TempDir,
    pub serial: PathBuf,
    /// The test port's socket (`org.airlock.test.0`).
    pub test_socket: PathBuf,
    pub started: Instant,
}

impl Guest {
    /// Builds the image and starts QEMU with the serial console, the test
    /// port and `extra` arguments (made from the guest's scratch directory).
    pub fn boot(extra: impl FnOnce(&Path) -> Vec<OsString>) -> Guest {
        Guest::boot_with_cmdline("", extra)
    }

    /// As [`boot`](Self::boot), with `cmdline` added to the kernel's
    /// command line.
    pub fn boot_with_cmdline(cmdline: &str, extra: impl FnOnce(&Path) -> Vec<OsString>) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let img = image::prepare(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "test guest: kernel {} (from {}), initramfs {} bytes, modules {:?}",
            img.kernel.vmlinuz.display(),
            img.kernel.source,
            std::fs::metadata(&img.initrd).unwrap().len(),
            img.modules
        );
        let test_socket = dir.path().join("test.sock");
        let serial = dir.path().join("serial.log");
        let extra = extra(dir.path());
        let started = Instant::now();
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-nodefaults",
                "-no-user-config",
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                "192",
                "-smp",
                "1",
            ])
            .args(["-no-reboot", "-display", "none", "-kernel"])
            .arg(&img.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&img.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet {cmdline}").trim_end())
            .arg("-chardev")
            .arg(format!("file,id=con,path={}", serial.display()))
            .args([
                "-serial",
                "chardev:con",
                "-device",
                "virtio-serial-pci,id=vser0",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=test,path={},server=on,wait=off",
                test_socket.display()
            ))
            .args([
                "-device",
                "virtserialport,bus=vser0.0,chardev=test,name=org.airlock.test.0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 runs (install qemu-system-x86)");
        Guest {
            qemu,
            dir,
            serial,
            test_socket,
            started,
        }
    }

    /// A client of the test port, once the guest answers ping.
    pub fn client(&self) -> Client {
        let mut client = Client::connect(&self.test_socket, Duration::from_secs(10)).unwrap();
        let pong = client.wait_alive(Duration::from_secs(90)).unwrap();
        eprintln!(
            "alive after {:.1} s: {pong}",
            self.started.elapsed().as_secs_f64()
        );
        client
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// QEMU's exit status once it has exited by itself, within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.qemu.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if std::thread::panicking() {
            eprintln!("serial console of the test guest:\n{}", self.console());
        }
    }
}

/// Sends `command` until the reply satisfies `done` or `timeout` passes
/// (the guest handles its two ports on two threads); returns the last reply.
pub fn poll(
    client: &mut Client,
    command: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = client.command(command, Duration::from_secs(10)).unwrap();
        if done(&reply) || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A QMP client: one command, one `return` (events are skipped).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves
    /// capabilities negotiation mode.
    pub fn connect(socket: &Path) -> io::Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        if !greeting.contains("\"QMP\"") {
            return Err(io::Error::other(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute(r#"{"execute": "qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    /// Sends one command (JSON) and returns its `return` line.
    pub fn execute(&mut self, json: &str) -> io::Result<String> {
        self.writer.write_all(json.as_bytes())?;
        self.writer.write_all(b"\n")?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
            }
            if line.contains("\"return\"") {
                return Ok(line);
            }
            if line.contains("\"error\"") {
                return Err(io::Error::other(format!("QMP {json}: {line}")));
            }
        }
    }
}

/// A binary PPM (`P6`, maxval 255), as QMP `screendump` writes it.
pub struct Ppm {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Ppm {
    pub fn parse(bytes: &[u8]) -> Result<Ppm, String> {
        // Header: four whitespace-separated fields ("P6 w h 255"), then one
        // whitespace byte, then the pixels. QEMU writes no comments.
        let mut fields = Vec::new();
        let mut at = 0;
        while fields.len() < 4 {
            while at < bytes.len() && bytes[at].is_ascii_whitespace() {
                at += 1;
            }
            let start = at;
            while at < bytes.len() && !bytes[at].is_ascii_whitespace() {
                at += 1;
            }
            if start == at {
                return Err("short PPM header".into());
            }
            fields.push(String::from_utf8_lossy(&bytes[start..at]).into_owned());
        }
        let num = |i: usize| {
            fields[i]
                .parse::<usize>()
                .map_err(|e| format!("PPM header {fields:?}: {e}"))
        };
        if fields[0] != "P6" || num(3)? != 255 {
            return Err(format!("not a P6/255 PPM: {fields:?}"));
        }
        let (width, height) = (num(1)?, num(2)?);
        let rgb = bytes.get(at + 1..).unwrap_or_default().to_vec();
        if rgb.len() != width * height * 3 {
            return Err(format!(
                "PPM {width}x{height} has {} pixel bytes",
                rgb.len()
            ));
        }
        Ok(Ppm { width, height, rgb })
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}
