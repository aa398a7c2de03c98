//! `/init` of the test guest (static; see `lib.rs`). As PID 1 it mounts
//! `/dev`, `/proc`, `/sys`, loads the modules listed in
//! `/lib/modules/order` (the ACPI power button and evdev, so QMP
//! `system_powerdown` powers it off like a Windows guest; `virtio_input`),
//! starts reading every input device with keys (the power button, and the
//! log behind `keys`), prints the alive banner on the console, and serves
//! commands on the virtio-serial port `org.airlock.test.0` (protocol in
//! `lib.rs`). A second thread is the
//! guest's SPICE vdagent on `com.redhat.spice.0` (state machine in
//! `agent.rs`); `draw` writes to the framebuffer `/dev/fb0`; the network
//! commands are in `guest_net.rs` (it also loads `virtio_net`). Refuses to
//! run as any other PID: its `poweroff` would power off whatever runs it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use airlock_test_guest::agent::{self, Agent};
use airlock_test_guest::keys::{self, KeyLog};
use airlock_test_guest::pattern::{Layout, Pattern};
use airlock_test_guest::protocol::{self, bench_work};
use airlock_vdagent::{encode, Decoder, Message};
use base64::Engine as _;

mod guest_net;

/// Set by `ignore-power-button`.
static IGNORE_POWER_BUTTON: AtomicBool = AtomicBool::new(false);

/// The keys received since boot or the last `keys-clear`, recorded by the
/// input readers ([`watch_inputs`]).
static KEYS: Mutex<KeyLog> = Mutex::new(KeyLog::new());

/// The vdagent's state, shared by its thread and the test port.
static AGENT: Mutex<Agent> = Mutex::new(Agent::new());
/// The vdagent port for writing, while the host is connected.
static AGENT_WRITER: Mutex<Option<File>> = Mutex::new(None);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "airlock-test-guest: this is a test guest's /init; refusing to run as pid {}",
            std::process::id()
        );
        std::process::exit(2);
    }
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    load_modules();
    guest_net::allow_ping_sockets();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("{} (kernel {})", protocol::ALIVE_BANNER, release.trim());
    watch_inputs();
    std::thread::spawn(run_vdagent);
    loop {
        match find_port(protocol::PORT_NAME) {
            Some(port) => serve(&port),
            None => println!(
                "airlock-test-guest: port {} not found yet",
                protocol::PORT_NAME
            ),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

#[allow(unsafe_code)]
fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            cstr(source).as_ptr(),
            cstr(target).as_ptr(),
            cstr(fstype).as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        println!(
            "airlock-test-guest: mount {target}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `finit_module` each module named in `/lib/modules/order`.
#[allow(unsafe_code)]
fn load_modules() {
    const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;
    let order = std::fs::read_to_string("/lib/modules/order").unwrap_or_default();
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}");
        let Ok(file) = File::open(&path) else {
            println!("airlock-test-guest: {path} missing");
            continue;
        };
        let flags = if name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz") {
            MODULE_INIT_COMPRESSED_FILE
        } else {
            0
        };
        use std::os::fd::AsRawFd;
        let empty = cstr("");
        // SAFETY: a valid open descriptor and NUL-terminated parameters.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                empty.as_ptr(),
                flags,
            )
        };
        if rc != 0 {
            println!(
                "airlock-test-guest: loading {name}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `/dev/vportNpM` whose `/sys/class/virtio-ports/*/name` is `name`.
fn find_port(name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Reads command lines from the port and answers each.
fn serve(port: &Path) {
    let Ok(mut dev) = OpenOptions::new().read(true).write(true).open(port) else {
        println!("airlock-test-guest: cannot open {}", port.display());
        return;
    };
    println!("airlock-test-guest: serving on {}", port.display());
    let mut pending = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match dev.read(&mut buf) {
            // The host side is not connected: nothing to read yet.
            Ok(0) => std::thread::sleep(Duration::from_millis(100)),
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line).trim().to_owned();
                    let reply = handle(&line);
                    let _ = dev.write_all(format!("{reply}\n").as_bytes());
                    if line == protocol::POWEROFF {
                        power_off();
                    }
                    if line == protocol::REBOOT {
                        reboot();
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn handle(line: &str) -> String {
    let mut words = line.split_whitespace();
    match words.next() {
        Some(protocol::PING) => {
            let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
            let secs: f64 = uptime
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            format!("pong uptime_ms={}", (secs * 1000.0) as u64)
        }
        Some(protocol::POWEROFF) => "ok powering off".into(),
        Some(protocol::REBOOT) => "ok rebooting".into(),
        Some(protocol::IGNORE_POWER_BUTTON) => {
            IGNORE_POWER_BUTTON.store(true, Ordering::SeqCst);
            "ok ignoring the power button".into()
        }
        Some(protocol::PCI) => {
            let mut found: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| {
                    let read = |f: &str| {
                        std::fs::read_to_string(e.path().join(f))
                            .unwrap_or_default()
                            .trim()
                            .trim_start_matches("0x")
                            .to_owned()
                    };
                    format!("{}:{}:{}", read("class"), read("vendor"), read("device"))
                })
                .collect();
            found.sort();
            format!("pci {}", found.join(" "))
        }

        Some(protocol::BENCH) => {
            let iterations: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(50_000_000);
            let start = Instant::now();
            let result = bench_work(iterations);
            format!(
                "bench iterations={iterations} elapsed_us={} result={result:x}",
                start.elapsed().as_micros()
            )
        }
        Some(protocol::HOG) => {
            let n = |w: Option<&str>, d: u64| w.and_then(|w| w.parse().ok()).unwrap_or(d);
            let threads = n(words.next(), 1);
            let mib = n(words.next(), 0);
            let secs = n(words.next(), 10);
            hog(threads, mib, Duration::from_secs(secs));
            format!("ok hog threads={threads} mib={mib} seconds={secs}")
        }
        Some(protocol::CLIP_SET) => {
            let (Some(ty), Some(b64), None) = (words.next(), words.next(), words.next()) else {
                return "error usage: clip-set <type> <base64>".into();
            };
            let Some(ty) = protocol::parse_clip_type(ty) else {
                return format!("error unknown clipboard type {ty:?}");
            };
            let Ok(data) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                return "error bad base64".into();
            };
            let len = data.len();
            let grab = lock(&AGENT).grab(ty, data);
            match grab.and_then(|msgs| send_to_host(&msgs)) {
                Ok(()) => format!("ok grabbed {} {len} bytes", protocol::clip_type_name(ty)),
                Err(e) => format!("error not sent: {e}"),
            }
        }
        Some(protocol::CLIP_REQUEST) => {
            let (Some(name), None) = (words.next(), words.next()) else {
                return "error usage: clip-request <type>".into();
            };
            let Some(ty) = protocol::parse_clip_type(name) else {
                return format!("error unknown clipboard type {name:?}");
            };
            let request = lock(&AGENT).request(ty);
            match request.and_then(|msgs| send_to_host(&msgs)) {
                Ok(()) => format!("ok requested {}", protocol::clip_type_name(ty)),
                Err(e) => format!("error not sent: {e}"),
            }
        }
        Some(protocol::CLIP_RECEIVED) => lock(&AGENT).received_line(),
        Some(protocol::CLIP_GRABS) => lock(&AGENT).grabs_line(),
        Some(protocol::VDAGENT_LOG) => {
            let connected = lock(&AGENT_WRITER).is_some();
            lock(&AGENT).log_line(connected)
        }
        Some(protocol::DRAW) => {
            let words: Vec<&str> = words.collect();
            match Pattern::parse(&words).and_then(draw) {
                Ok(reply) => reply,
                Err(e) => format!("error {e}"),
            }
        }
        Some(protocol::KEYS) => lock(&KEYS).line(),
        Some(protocol::KEYS_CLEAR) => {
            lock(&KEYS).clear();
            "ok keys-clear".into()
        }
        _ => guest_net::handle(line).unwrap_or_else(|| format!("error unknown command {line:?}")),
    }
}

/// The guest's vdagent: finds `com.redhat.spice.0`, announces itself
/// (the write waits until the host connects), answers the host until it
/// disconnects, and announces again on the next connection.
fn run_vdagent() {
    // Not every boot has the port; this thread then just waits.
    let port = loop {
        match find_port(protocol::VDAGENT_PORT_NAME) {
            Some(port) => break port,
            None => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    let Ok(mut dev) = OpenOptions::new().read(true).write(true).open(&port) else {
        println!("airlock-test-guest: cannot open {}", port.display());
        return;
    };
    println!("airlock-test-guest: vdagent on {}", port.display());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(mut writer) = dev.try_clone() else {
            return;
        };
        let hello = lock(&AGENT).start();
        // Blocks until the host side connects.
        if hello
            .iter()
            .try_for_each(|m| writer.write_all(&encode(m)))
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        hello.iter().for_each(|m| lock(&AGENT).sent(m));
        *lock(&AGENT_WRITER) = Some(writer);
        let mut decoder = Decoder::new(agent::MAX_INBOUND_MESSAGE);
        loop {
            let n = match dev.read(&mut buf) {
                Ok(0) | Err(_) => break, // the host disconnected
                Ok(n) => n,
            };
            for item in decoder.feed(&buf[..n]) {
                match item {
                    Ok(msg) => {
                        let answers = lock(&AGENT).on_message(msg);
                        let _ = send_to_host(&answers);
                    }
                    Err(e) => {
                        println!("airlock-test-guest: vdagent input refused: {e}");
                        lock(&AGENT).on_refused(&e);
                        if e.is_fatal() {
                            // No boundary to resync on; start afresh.
                            decoder = Decoder::new(agent::MAX_INBOUND_MESSAGE);
                        }
                    }
                }
            }
        }
        *lock(&AGENT_WRITER) = None;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `msgs` to the host (chunks of at most 2048 payload bytes, by
/// [`encode`]) and counts them.
fn send_to_host(msgs: &[Message]) -> Result<(), String> {
    let mut writer = lock(&AGENT_WRITER);
    let Some(w) = writer.as_mut() else {
        return Err("the host is not connected".into());
    };
    for m in msgs {
        w.write_all(&encode(m))
            .map_err(|e| format!("writing to the host: {e}"))?;
        lock(&AGENT).sent(m);
    }
    Ok(())
}

/// `FBIOGET_VSCREENINFO`, `FBIOGET_FSCREENINFO` (`linux/fb.h`), `KDSETMODE`
/// and `KD_GRAPHICS` (`linux/kd.h`).
const FBIOGET_VSCREENINFO: libc::c_ulong = 0x4600;
const FBIOGET_FSCREENINFO: libc::c_ulong = 0x4602;
const KDSETMODE: libc::c_ulong = 0x4B3A;
const KD_GRAPHICS: libc::c_ulong = 1;

/// Fills `/dev/fb0` with `pattern`, after switching the console to graphics
/// mode (fbcon then leaves the screen alone: no cursor, no text).
#[allow(unsafe_code)]
fn draw(pattern: Pattern) -> Result<String, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fb0")
        .map_err(|e| format!("no framebuffer: /dev/fb0: {e}"))?;
    // struct fb_var_screeninfo is 160 bytes, struct fb_fix_screeninfo 80 on x86-64.
    let mut var = [0u8; 160];
    let mut fix = [0u8; 80];
    // SAFETY: each buffer is as large as the structure the ioctl fills.
    let rc = unsafe {
        libc::ioctl(fb.as_raw_fd(), FBIOGET_VSCREENINFO, var.as_mut_ptr())
            | libc::ioctl(fb.as_raw_fd(), FBIOGET_FSCREENINFO, fix.as_mut_ptr())
    };
    if rc != 0 {
        return Err(format!(
            "framebuffer ioctl: {}",
            std::io::Error::last_os_error()
        ));
    }
    let u = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let layout = Layout {
        width: u(&var, 0),
        height: u(&var, 4),
        bits_per_pixel: u(&var, 24),
        line_length: u(&fix, 48),
        red: (u(&var, 32), u(&var, 36)),
        green: (u(&var, 44), u(&var, 48)),
        blue: (u(&var, 56), u(&var, 60)),
    };
    let (xoffset, yoffset) = (u(&var, 16), u(&var, 20));
    let pixels = layout.render(pattern)?;
    if let Ok(tty) = File::open("/dev/tty0") {
        // SAFETY: KDSETMODE takes an integer argument.
        unsafe { libc::ioctl(tty.as_raw_fd(), KDSETMODE, KD_GRAPHICS) };
    }
    let start = u64::from(yoffset) * u64::from(layout.line_length)
        + u64::from(xoffset * layout.bits_per_pixel / 8);
    fb.write_all_at(&pixels, start)
        .map_err(|e| format!("writing /dev/fb0: {e}"))?;
    Ok(format!(
        "ok drew {} {}x{}",
        pattern.name(),
        layout.width,
        layout.height
    ))
}

/// Busy threads and touched memory for `duration`, in the background.
fn hog(threads: u64, mib: u64, duration: Duration) {
    let end = Instant::now() + duration;
    for i in 0..threads {
        std::thread::spawn(move || {
            let mut memory = if i == 0 {
                vec![0u8; (mib * 1024 * 1024) as usize]
            } else {
                Vec::new()
            };
            let mut x = i;
            while Instant::now() < end {
                x = std::hint::black_box(bench_work(100_000).wrapping_add(x));
                // Keep every page of the hog's memory in use.
                for page in memory.chunks_mut(4096) {
                    page[0] = page[0].wrapping_add(x as u8);
                }
            }
        });
    }
}

/// Every `/dev/input/event*` being read, by path (a reader removes its own
/// when the device goes away, so a node made again is read again).
static INPUTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Reads every input device with keys from now on: at once for those that
/// exist (the i8042 keyboard, the ACPI power button), then every 500 ms for
/// new ones (virtio keyboard or tablet, once bound). Each device gets a
/// thread that records its key events in [`KEYS`] and powers off on a press
/// of the ACPI power button (QMP `system_powerdown`).
fn watch_inputs() {
    scan_inputs();
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(500));
        scan_inputs();
    });
}

/// Starts a reader for each `/dev/input/event*` with keys not read yet.
/// Others (no `EV_KEY`, or capabilities not readable yet) are looked at
/// again next time.
fn scan_inputs() {
    for entry in std::fs::read_dir("/dev/input")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.starts_with("event") || lock(&INPUTS).contains(&path) {
            continue;
        }
        let Ok(ev) =
            std::fs::read_to_string(format!("/sys/class/input/{name}/device/capabilities/ev"))
        else {
            continue;
        };
        if !keys::has_keys(&ev) {
            continue;
        }
        let Ok(dev) = File::open(&path) else { continue };
        let device = std::fs::read_to_string(format!("/sys/class/input/{name}/device/name"))
            .unwrap_or_default();
        println!(
            "airlock-test-guest: reading keys from {} ({})",
            path.display(),
            device.trim()
        );
        lock(&INPUTS).push(path.clone());
        std::thread::spawn(move || {
            read_keys(dev);
            println!("airlock-test-guest: {} gone", path.display());
            lock(&INPUTS).retain(|p| *p != path);
        });
    }
}

/// Records the key events of one input device until it goes away.
fn read_keys(mut dev: File) {
    const KEY_POWER: u16 = 116;
    let mut raw = [0u8; keys::INPUT_EVENT_SIZE];
    while dev.read_exact(&mut raw).is_ok() {
        let Some(event) = keys::decode(&raw) else {
            continue;
        };
        lock(&KEYS).record(event);
        if event.code == KEY_POWER && event.value == keys::PRESSED {
            if IGNORE_POWER_BUTTON.load(Ordering::SeqCst) {
                println!("airlock-test-guest: power button pressed, ignored");
                continue;
            }
            println!("airlock-test-guest: power button pressed");
            power_off();
        }
    }
}

#[allow(unsafe_code)]
fn reboot() -> ! {
    println!("airlock-test-guest: rebooting");
    // SAFETY: as in power_off.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    }
    println!(
        "airlock-test-guest: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[allow(unsafe_code)]
fn power_off() -> ! {
    println!("airlock-test-guest: powering off");
    // SAFETY: sync and reboot take no pointers; we are PID 1 in a guest.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // reboot() only returns on failure.
    println!(
        "airlock-test-guest: power-off failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
