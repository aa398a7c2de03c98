//! Interop with agents we did not write: Debian's real `spice-vdagentd` +
//! `spice-vdagent` (0.22.1), one pair per side, each on its own Xvfb
//! display, with a raw-mode pseudo-terminal standing in for the virtio
//! port and a unix socket (what QEMU's `server=on` chardev gives the
//! gateway) bridged to the pty master. Clipboards are set and read with
//! `xclip`. Recipe: shared/HOST-NOTES.md, "The real Linux vdagent without
//! a VM".
//!
//! Needs the Debian packages `spice-vdagent xvfb xclip`. With `CI=true`
//! the test installs them if missing and fails if it cannot; elsewhere it
//! is skipped with a loud message.

mod common;

use airlock_vdagent::{Decoder, Message};
use common::png;
use rustix::fs::{Mode, OFlags};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOOLS: [&str; 4] = ["spice-vdagentd", "spice-vdagent", "Xvfb", "xclip"];
const PACKAGES: [&str; 3] = ["spice-vdagent", "xvfb", "xclip"];

fn find_tool(name: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

/// True if the tools are present (installing them under CI=true).
fn tools_available() -> bool {
    if TOOLS.iter().all(|t| find_tool(t)) {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ci {
        eprintln!("interop: installing {PACKAGES:?} (CI=true)");
        let st = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        eprintln!("interop: apt-get: {st:?}");
        assert!(
            TOOLS.iter().all(|t| find_tool(t)),
            "interop: {TOOLS:?} missing after apt-get install {PACKAGES:?}; add them to ci/install-host-deps.sh"
        );
        return true;
    }
    eprintln!("\n################################################################");
    eprintln!("## SKIPPED: interop test with the real spice-vdagent needs the");
    eprintln!(
        "## Debian packages {PACKAGES:?}: apt-get install {}",
        PACKAGES.join(" ")
    );
    eprintln!("################################################################\n");
    false
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One fake guest: Xvfb, pty, bridge socket, vdagentd, vdagent.
struct RealGuest {
    name: &'static str,
    dir: PathBuf,
    display: String,
    /// Every byte the gateway wrote towards this guest.
    to_guest: Arc<Mutex<Vec<u8>>>,
    /// Every byte this guest's agent wrote towards the gateway.
    from_guest: Arc<Mutex<Vec<u8>>>,
    procs: Vec<Proc>,
    _slave: OwnedFd,
    pub socket: PathBuf,
}

impl RealGuest {
    fn start(base: &Path, name: &'static str) -> RealGuest {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut procs = vec![];

        // Xvfb on a free display; it tells us which on stdout.
        let mut xvfb = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1024x768x24",
                "-nolisten",
                "tcp",
                "-noreset",
            ])
            .stdout(Stdio::piped())
            .stderr(File::create(dir.join("xvfb.log")).unwrap())
            .spawn()
            .expect("starting Xvfb");
        let mut line = String::new();
        BufReader::new(xvfb.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let display = format!(":{}", line.trim());
        assert!(display.len() > 1, "{name}: Xvfb gave no display number");
        procs.push(Proc(xvfb));

        // The pty: the slave (raw mode) is the agent's "virtio port".
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let slave_path =
            PathBuf::from(ptsname(&master, Vec::new()).unwrap().into_string().unwrap());
        let slave = rustix::fs::open(
            &slave_path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let mut t = rustix::termios::tcgetattr(&slave).unwrap();
        t.make_raw();
        rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t).unwrap();

        // The socket the gateway connects to, bridged to the pty master.
        let socket = dir.join("port.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let to_guest = Arc::new(Mutex::new(Vec::new()));
        let from_guest = Arc::new(Mutex::new(Vec::new()));
        let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let master = File::from(master);
        {
            // guest -> gateway
            let mut m = master.try_clone().unwrap();
            let current = Arc::clone(&current);
            let from_guest = Arc::clone(&from_guest);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    let n = match m.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Ok(n) => n,
                    };
                    from_guest.lock().unwrap().extend_from_slice(&buf[..n]);
                    if let Some(s) = current.lock().unwrap().as_mut() {
                        let _ = s.write_all(&buf[..n]);
                    }
                }
            });
        }
        {
            // gateway -> guest, one connection at a time
            let current = Arc::clone(&current);
            let to_guest = Arc::clone(&to_guest);
            let m = master.try_clone().unwrap();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    *current.lock().unwrap() = Some(conn.try_clone().unwrap());
                    let mut m = m.try_clone().unwrap();
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        to_guest.lock().unwrap().extend_from_slice(&buf[..n]);
                        if m.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    *current.lock().unwrap() = None;
                }
            });
        }

        let daemon_sock = dir.join("vdagentd.sock");
        // `-f`: a plain file stands in for /dev/uinput; it must exist.
        File::create(dir.join("uinput")).unwrap();
        let log = |f: &str| File::create(dir.join(f)).unwrap();
        let vdagentd = Command::new("spice-vdagentd")
            .args(["-x", "-X", "-f", "-d", "-u"])
            .arg(dir.join("uinput"))
            .arg("-s")
            .arg(&slave_path)
            .arg("-S")
            .arg(&daemon_sock)
            .stdout(log("vdagentd.out"))
            .stderr(log("vdagentd.log"))
            .spawn()
            .expect("starting spice-vdagentd");
        procs.push(Proc(vdagentd));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon_sock.exists() {
            assert!(
                Instant::now() < deadline,
                "{name}: spice-vdagentd made no socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let vdagent = Command::new("spice-vdagent")
            .args(["-x", "-d", "-s"])
            .arg(&slave_path)
            .arg("-S")
            .arg(&daemon_sock)
            .arg(format!("--display={display}"))
            .env("XDG_RUNTIME_DIR", &dir)
            .env("DISPLAY", &display)
            .stdout(log("vdagent.out"))
            .stderr(log("vdagent.log"))
            .spawn()
            .expect("starting spice-vdagent");
        procs.push(Proc(vdagent));
        RealGuest {
            name,
            dir,
            display,
            to_guest,
            from_guest,
            procs,
            _slave: slave,
            socket,
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["vdagentd.log", "vdagent.log", "xvfb.log"] {
            s += &format!(
                "--- {} {f}:\n{}\n",
                self.name,
                std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
            );
        }
        s
    }

    fn xclip(&self) -> Command {
        let mut c = Command::new("xclip");
        c.env("DISPLAY", &self.display)
            .args(["-selection", "clipboard"]);
        c
    }

    /// Sets the guest clipboard (xclip keeps serving it in the background).
    fn copy(&mut self, mime: &str, data: &[u8]) {
        let file = self.dir.join(format!("copy-{}", self.procs.len()));
        std::fs::write(&file, data).unwrap();
        let child = self
            .xclip()
            .args(["-quiet", "-t", mime, "-i"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.push(Proc(child));
    }

    /// Reads the guest clipboard as `mime` (None if it does not offer it).
    fn paste(&self, mime: &str, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        loop {
            let targets = self
                .xclip()
                .args(["-o", "-t", "TARGETS"])
                .stderr(Stdio::null())
                .output()
                .unwrap();
            if String::from_utf8_lossy(&targets.stdout)
                .lines()
                .any(|l| l.trim() == mime)
            {
                let out = self
                    .xclip()
                    .args(["-o", "-t", mime])
                    .stderr(Stdio::null())
                    .output()
                    .unwrap();
                if out.status.success() {
                    return Some(out.stdout);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for_agent_announce(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let bytes = self.from_guest.lock().unwrap().clone();
            let msgs = Decoder::new(1 << 24).feed(&bytes);
            if msgs
                .iter()
                .any(|m| matches!(m, Ok(Message::AnnounceCapabilities { .. })))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the agent never announced\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn real_linux_agents_copy_general_to_classified_only() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut general = RealGuest::start(dir.path(), "general");
    let mut classified = RealGuest::start(dir.path(), "classified");
    let gw =
        common::Gateway::start_with_sockets(dir.path(), &general.socket, &classified.socket, &[]);
    general.wait_for_agent_announce();
    classified.wait_for_agent_announce();
    let diag = |g: &RealGuest, c: &RealGuest| {
        format!("{}{}--- gateway:\n{}", g.logs(), c.logs(), gw.stderr())
    };

    // Text.
    general.copy("UTF8_STRING", "interop text ✓\nline two".as_bytes());
    let got = classified.paste("UTF8_STRING", Duration::from_secs(20));
    assert_eq!(
        got.as_deref(),
        Some("interop text ✓\r\nline two".as_bytes()),
        "text did not arrive\n{}",
        diag(&general, &classified)
    );

    // Image.
    let input = png(64, 48);
    general.copy("image/png", &input);
    let got = classified.paste("image/png", Duration::from_secs(20));
    let got =
        got.unwrap_or_else(|| panic!("image did not arrive\n{}", diag(&general, &classified)));
    let want = image::load_from_memory(&input).unwrap().to_rgb8();
    let got = image::load_from_memory_with_format(&got, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    assert_eq!(got, want, "image pixels differ");

    // Nothing flows back.
    let secret = b"CLASSIFIED-ONLY-8841";
    classified.copy("UTF8_STRING", secret);
    // The classified agent does grab (its message reaches the gateway)...
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = gw.audit_lines();
        if lines
            .iter()
            .any(|l| l.contains("direction=classified->general"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "classified grab never reached the gateway\n{}",
            diag(&general, &classified)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...and general never sees it: not on the wire, not in its clipboard.
    std::thread::sleep(Duration::from_secs(1));
    let to_general = general.to_guest.lock().unwrap().clone();
    assert!(
        !to_general.windows(secret.len()).any(|w| w == secret),
        "classified data reached general's port"
    );
    for m in Decoder::new(1 << 24).feed(&to_general) {
        let m = m.expect("gateway sent general a malformed stream");
        assert!(
            !matches!(m, Message::ClipboardGrab(_))
                && !matches!(&m, Message::Clipboard { data, .. } if !data.is_empty()),
            "gateway offered general something: {m:?}"
        );
    }
    let general_clip = general
        .paste("UTF8_STRING", Duration::from_millis(500))
        .unwrap_or_default();
    assert!(!general_clip.windows(secret.len()).any(|w| w == secret));

    let audit = gw.audit_lines();
    assert_eq!(
        audit
            .iter()
            .filter(|l| l.contains("result=accepted"))
            .count(),
        2,
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("type=utf8-text->utf8-text")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|l| l.contains("type=png->png")),
        "{audit:#?}"
    );
}
