//! Host integration test (root; QEMU under TCG): `airlockd run` supervises
//! two real tiny guests (`ci/test-guest`: a Debian kernel and our static
//! `/init`) through the production launch path, in test mode.
//!
//! - `crash_restart_and_power_off`: both guests come up as an unprivileged
//!   user, in their own cgroups, with the sandbox on; killing one QEMU gets
//!   it restarted (with a new pid, counted on the control socket); a guest
//!   that powers itself off stays off; when both have, the power-off hook
//!   runs and the supervisor exits 0.
//! - `sigterm_powers_guests_down`: SIGTERM presses both guests' ACPI power
//!   buttons; the guests power off by themselves before the timeout, the
//!   hook does not run (the host is already going down), exit 0.
//! - `clipboard_through_the_gateway`: the supervisor also runs the clipboard
//!   gateway (as another unprivileged user, in its own cgroup); text copied
//!   in the general guest is pasted, sanitised, in the classified guest;
//!   nothing copied in the classified guest reaches the general guest; the
//!   audit log has every attempt; a killed gateway is restarted, a restarted
//!   guest is reconnected; SIGTERM stops it. Each guest's vdagent socket is
//!   handed to the gateway's group and its display socket to the kiosk's
//!   (`supervisor.display_group`), after every start.
//!
//! The tests take turns (four TCG guests at once on two cores would only
//! measure contention). The first two run without the gateway.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use airlock_test_guest::client::Client;
use airlock_test_guest::image::{self, GuestImage};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The capabilities the systemd unit gives the supervisor
/// (`overlay/usr/lib/systemd/system/airlockd.service`, `CapabilityBoundingSet=`); the test runs it
/// with exactly these, so a missing one fails here. (Without dac_override
/// root cannot enter the side's run directory, which belongs to the side's
/// user, to reach QMP.)
const CAPABILITIES: &str = "-all,+setuid,+setgid,+chown,+fowner,+dac_override,+kill";

/// How long two TCG guests on two cores may take to answer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const USER: &str = "nobody";
/// The gateway runs as another user than the guests, so the test sees the
/// vdagent sockets handed to it (and nothing else).
const GATEWAY_USER: &str = "daemon";
/// Stands in for the kiosk's group (`airlock-kiosk` in the image): each
/// guest's display socket is handed to it.
const KIOSK_GROUP: &str = "users";

fn require_root() {
    assert!(airlockd::users::is_root(), "the supervisor integration test needs root (QEMU runs as {USER}, cgroups); CI runs it as root");
    assert!(Path::new("/usr/bin/swtpm").exists(), "the supervisor integration test needs swtpm (Debian package swtpm) for the general guest's vTPM");
}

/// A cgroup v2 directory for this test: the unified hierarchy wherever it is mounted.
fn test_cgroup(name: &str) -> PathBuf {
    for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(base).join("cgroup.controllers").exists() {
            return Path::new(base).join(name);
        }
    }
    panic!("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
}

struct Harness {
    dir: tempfile::TempDir,
    child: Child,
    run_dir: PathBuf,
    cgroup: PathBuf,
    hook_file: PathBuf,
    log_file: PathBuf,
}

impl Harness {
    fn start(name: &str, img: &GuestImage) -> Harness {
        Self::start_with(name, img, 60, None)
    }

    /// `gateway_bin`: where `airlock-gateway` and `airlock-sanitiser` are;
    /// `None` runs without the clipboard gateway.
    fn start_with(
        name: &str,
        img: &GuestImage,
        shutdown_timeout_secs: u32,
        gateway_bin: Option<&Path>,
    ) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("airlockd-it-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = airlockd::users::lookup_user(USER).unwrap();
        let state = dir.path().join("state");
        for side in ["classified", "general"] {
            let disk_dir = state.join(side).join("disk");
            fs::create_dir_all(&disk_dir).unwrap();
            let disk = disk_dir.join("disk.raw");
            fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            std::os::unix::fs::chown(&disk, Some(nobody.uid), Some(nobody.gid)).unwrap();
        }
        // The initramfs must be readable by the guests' user.
        let initrd = dir.path().join("initrd.cpio");
        fs::copy(&img.initrd, &initrd).unwrap();
        fs::set_permissions(&initrd, fs::Permissions::from_mode(0o644)).unwrap();
        let run_dir = dir.path().join("run");
        let cgroup = test_cgroup(&format!("airlockd-it-{name}-{}", std::process::id()));
        let hook_file = dir.path().join("host-powered-off");
        let guest = |side: &str| {
            format!(
                r#"
[guest.{side}]
disk = "{state}/{side}/disk/disk.raw"
disk_format = "raw"
memory_mib = 192
vcpus = 1
accel = "tcg"
user = "{USER}"
devices = {devices}
[guest.{side}.limits]
cpu_percent = 100
memory_max_mib = 512
io_write_bps = 10485760
[guest.{side}.network]
enabled = false
[guest.{side}.firmware]
tpm = {tpm}
[guest.{side}.test_boot]
kernel = "{kernel}"
initrd = "{initrd}"
append = "console=ttyS0 panic=-1 quiet"
"#,
                state = state.display(),
                // The general guest gets what the classified one may not, so
                // the device checks below are seen to find them.
                devices = if side == "general" {
                    r#"["tablet", "usb", "cdrom", "sound"]"#
                } else {
                    r#"["tablet"]"#
                },
                // The general guest also gets a vTPM (swtpm), restarted with it.
                tpm = side == "general",
                kernel = img.kernel.vmlinuz.display(),
                initrd = initrd.display(),
            )
        };
        let clipboard = match gateway_bin {
            None => "[clipboard]\nenabled = false\n".to_owned(),
            Some(bin) => format!(
                "gateway = \"{}\"\n[clipboard]\nuser = \"{GATEWAY_USER}\"\nmax_bytes = 1048576\nrequest_timeout_ms = 10000\n\
                 [clipboard.limits]\nmemory_max_mib = 1024\n",
                bin.join("airlock-gateway").display()
            ),
        };
        let config = format!(
            r#"
[supervisor]
test_mode = true
run_dir = "{run}"
state_dir = "{state}"
log_dir = "{log}"
cgroup = "{cgroup}"
strict_limits = false
poweroff_command = ["/usr/bin/touch", "{hook}"]
shutdown_timeout_secs = {shutdown_timeout_secs}
display_group = "{KIOSK_GROUP}"
{clipboard}
{classified}
{general}
"#,
            run = run_dir.display(),
            state = state.display(),
            log = dir.path().join("log").display(),
            cgroup = cgroup.display(),
            hook = hook_file.display(),
            classified = guest("classified"),
            general = guest("general"),
        );
        let config_path = dir.path().join("appliance.toml");
        fs::write(&config_path, config).unwrap();
        let log_file = dir.path().join("airlockd.log");
        let child = Command::new("setpriv")
            .args(["--bounding-set", CAPABILITIES, "--inh-caps", "-all", "--"])
            .arg(env!("CARGO_BIN_EXE_airlockd"))
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--provision")
            .arg(dir.path().join("no-provisioning.toml"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.path().join("airlockd.out")).unwrap())
            .stderr(fs::File::create(&log_file).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Harness {
            dir,
            child,
            run_dir,
            cgroup,
            hook_file,
            log_file,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let serial = |side: &str| {
            fs::read_to_string(self.dir.path().join("log").join(side).join("serial.log"))
                .unwrap_or_default()
        };
        let qemu = |side: &str| {
            fs::read_to_string(self.dir.path().join("log").join(side).join("qemu.log"))
                .unwrap_or_default()
        };
        panic!(
            "{what}\n--- airlockd log:\n{}\n--- classified qemu.log:\n{}\n--- general qemu.log:\n{}\n--- classified serial (tail):\n{}\n--- general serial (tail):\n{}",
            self.log(),
            tail(&qemu("classified")),
            tail(&qemu("general")),
            tail(&serial("classified")),
            tail(&serial("general"))
        );
    }

    fn control(&self) -> Control {
        let path = self.run_dir.join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => {
                    return Control {
                        reader: BufReader::new(s),
                        last: Value::Null,
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    self.fail(format!("control socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn test_port(&self, side: &str) -> Client {
        Client::connect(
            &self.run_dir.join(side).join("test.sock"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| self.fail(format!("{side} test port: {e}")))
    }

    fn wait_alive(&self, side: &str) -> Client {
        let mut client = self.test_port(side);
        if let Err(e) = client.wait_alive(BOOT_TIMEOUT) {
            self.fail(format!("{side} guest not alive: {e}"));
        }
        client
    }

    /// Waits for the supervisor to exit; its status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.fail(format!("airlockd still runs after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // The supervisor, and the QEMUs in its process group and cgroups.
        #[allow(unsafe_code)]
        // SAFETY: killpg has no memory-safety preconditions; the group is ours.
        unsafe {
            libc::killpg(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
        for name in ["guest-classified", "guest-general", "gateway"] {
            let _ = fs::write(self.cgroup.join(name).join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(300));
        for name in ["guest-classified", "guest-general", "gateway"] {
            let _ = fs::remove_dir(self.cgroup.join(name));
        }
        let _ = fs::remove_dir(&self.cgroup);
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("test files kept in {}", self.dir.path().display());
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The control socket, read line by line.
struct Control {
    reader: BufReader<UnixStream>,
    last: Value,
}

impl Control {
    /// Reads status lines until `want` holds for one; returns it.
    fn wait(
        &mut self,
        h: &Harness,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if want(&self.last) {
                return self.last.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                h.fail(format!(
                    "timed out after {timeout:?} waiting for {what}; last status {}",
                    self.last
                ));
            }
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => h.fail(format!(
                    "control socket closed waiting for {what}; last status {}",
                    self.last
                )),
                Ok(_) => {
                    self.last = serde_json::from_str(&line)
                        .unwrap_or_else(|e| h.fail(format!("bad status line {line:?}: {e}")))
                }
                Err(e) => h.fail(format!(
                    "waiting for {what}: {e}; last status {}",
                    self.last
                )),
            }
        }
    }
}

/// One QMP command on the test-mode monitor (`qmp-test.sock`).
fn qmp_test(h: &Harness, side: &str, command: &str) -> Value {
    use std::io::Write;
    let path = h.run_dir.join(side).join("qmp-test.sock");
    let stream =
        UnixStream::connect(&path).unwrap_or_else(|e| h.fail(format!("{}: {e}", path.display())));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut read = || {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| h.fail(format!("QMP said {line:?}: {e}")))
    };
    read(); // greeting
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    while read().get("return").is_none() {}
    writer
        .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .unwrap();
    loop {
        let v = read();
        if let Some(r) = v.get("return") {
            return r.clone();
        }
        if v.get("error").is_some() {
            h.fail(format!("QMP {command}: {v}"));
        }
    }
}

/// PCI class codes (class << 8 | subclass) of every device QEMU emulates.
fn pci_classes(h: &Harness, side: &str) -> Vec<(u64, String)> {
    let buses = qmp_test(h, side, "query-pci");
    let mut out = Vec::new();
    for bus in buses.as_array().unwrap() {
        for dev in bus["devices"].as_array().unwrap() {
            let id = format!(
                "{:04x}:{:04x}",
                dev["id"]["vendor"].as_u64().unwrap(),
                dev["id"]["device"].as_u64().unwrap()
            );
            out.push((dev["class_info"]["class"].as_u64().unwrap(), id));
        }
    }
    out
}

/// Block devices QEMU gives the guest (`query-block` device names).
fn block_devices(h: &Harness, side: &str) -> Vec<String> {
    qmp_test(h, side, "query-block")
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["device"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// USB controllers (0x0c03), audio (0x0401, 0x0403), IDE (0x0101), floppy (0x0102).
const CLASS_USB: u64 = 0x0c03;
const REMOVABLE_OR_SOUND: [u64; 5] = [CLASS_USB, 0x0401, 0x0403, 0x0101, 0x0102];

/// The pids in a guest's cgroup, by command name.
fn cgroup_comms(h: &Harness, side: &str) -> Vec<(i32, String)> {
    let procs =
        fs::read_to_string(h.cgroup.join(format!("guest-{side}/cgroup.procs"))).unwrap_or_default();
    procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .map(|pid| {
            (
                pid,
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

/// The general guest's vTPM: QEMU has it, swtpm runs as the guest's user in
/// the guest's cgroup, and keeps its state next to the disk. Returns swtpm's pid.
fn check_vtpm(h: &Harness, uid: u32) -> i32 {
    let tpm = qmp_test(h, "general", "query-tpm");
    assert_eq!(tpm[0]["model"], "tpm-crb", "{tpm}");
    assert_eq!(tpm[0]["options"]["type"], "emulator", "{tpm}");
    let comms = cgroup_comms(h, "general");
    let swtpm: Vec<i32> = comms
        .iter()
        .filter(|(_, c)| c == "swtpm")
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(
        swtpm.len(),
        1,
        "one swtpm in the general guest's cgroup: {comms:?}"
    );
    assert_eq!(uid_of(swtpm[0]), uid, "swtpm runs as {USER}");
    assert!(
        cgroup_comms(h, "classified")
            .iter()
            .all(|(_, c)| c != "swtpm"),
        "the classified guest has no vTPM"
    );
    let state = h.dir.path().join("state/general/disk/tpm");
    let files: Vec<String> = fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.starts_with("tpm2-")),
        "no TPM state in {}: {files:?}",
        state.display()
    );
    swtpm[0]
}

fn state(status: &Value, side: &str) -> String {
    status["guests"][side]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn pid(status: &Value, side: &str) -> i32 {
    status["guests"][side]["pid"]
        .as_i64()
        .expect("running guest has a pid") as i32
}

fn prepare_image() -> (tempfile::TempDir, GuestImage) {
    let dir = tempfile::tempdir().unwrap();
    let img = image::prepare(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "test guest kernel: {} (from {}); power-button modules: {:?}",
        img.kernel.vmlinuz.display(),
        img.kernel.source,
        img.modules
    );
    (dir, img)
}

/// `Uid:` of a process (real uid).
fn uid_of(pid: i32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn crash_restart_and_power_off() {
    require_root();
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (_img_dir, img) = prepare_image();
    let started = Instant::now();
    let mut h = Harness::start("crash", &img);
    let mut control = h.control();
    let ready = control.wait(&h, "both guests running", Duration::from_secs(60), |s| {
        s["ready"] == true
    });
    let mut classified = h.wait_alive("classified");
    let _general = h.wait_alive("general");
    eprintln!(
        "both guests alive {:.1} s after the supervisor started",
        started.elapsed().as_secs_f64()
    );

    // Launched as the contract says: unprivileged, own cgroup, sandboxed.
    let nobody = airlockd::users::lookup_user(USER).unwrap();
    for side in ["classified", "general"] {
        let pid = pid(&ready, side);
        assert_eq!(uid_of(pid), nobody.uid, "{side} QEMU runs as {USER}");
        let procs =
            fs::read_to_string(h.cgroup.join(format!("guest-{side}/cgroup.procs"))).unwrap();
        assert!(
            procs.split_whitespace().any(|p| p == pid.to_string()),
            "{side} QEMU {pid} not in its cgroup: {procs:?}"
        );
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{cmdline}"
        );
        assert!(
            cmdline.contains("throttling.bps-write=10485760"),
            "{cmdline}"
        );
        assert!(
            h.log().contains(&format!(
                "{side}: cgroup {}",
                h.cgroup.join(format!("guest-{side}")).display()
            )),
            "limits are logged"
        );
    }
    // What QEMU really emulates (QMP on the test monitor): the classified
    // guest has its disk and nothing removable, USB or sound; the general
    // guest, given them, shows each, so the check can see them.
    let classified_pci = pci_classes(&h, "classified");
    eprintln!("classified PCI (class, vendor:device): {classified_pci:04x?}");
    for (class, id) in &classified_pci {
        assert!(
            !REMOVABLE_OR_SOUND.contains(class),
            "classified guest has PCI device {id} of class {class:#06x}"
        );
        // Mass storage: only the virtio disk, and q35's built-in AHCI controller (no drive on it).
        if class >> 8 == 0x01 {
            assert!(
                id == "1af4:1001" || id == "1af4:1042" || id == "8086:2922",
                "classified storage controller {id}"
            );
        }
    }
    assert_eq!(
        block_devices(&h, "classified"),
        ["disk0"],
        "classified block devices"
    );
    let general_pci = pci_classes(&h, "general");
    assert!(
        general_pci.iter().any(|(c, _)| *c == CLASS_USB),
        "general guest lacks its USB controller: {general_pci:04x?}"
    );
    assert!(
        general_pci.iter().any(|(c, _)| *c == 0x0403),
        "general guest lacks its sound device: {general_pci:04x?}"
    );
    assert!(
        block_devices(&h, "general").contains(&"cd0".to_owned()),
        "general guest lacks its CD drive"
    );
    let old_swtpm = check_vtpm(&h, nobody.uid);
    assert!(
        qmp_test(&h, "classified", "query-tpm")
            .as_array()
            .unwrap()
            .is_empty(),
        "classified has no TPM"
    );
    // The guest's own view agrees.
    let seen = classified.command("pci", Duration::from_secs(10)).unwrap();
    assert!(
        seen.starts_with("pci ") && !seen.contains(" 0c03") && !seen.contains(" 0403"),
        "{seen}"
    );

    let log = h.log();
    assert!(
        log.contains("limits applied:") && log.contains("not applied:"),
        "{log}"
    );
    for line in log.lines().filter(|l| l.contains("limits applied:")) {
        eprintln!("{line}");
    }
    let rss = fs::read_to_string(format!("/proc/{}/status", h.child.id())).unwrap();
    // chown 0, dac_override 1, fowner 3, kill 5, setgid 6, setuid 7.
    assert!(
        rss.contains("CapBnd:\t00000000000000eb"),
        "the supervisor runs with the unit's capabilities only:\n{rss}"
    );
    eprintln!(
        "supervisor {}",
        rss.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );

    // A crash: kill the general guest's QEMU.
    let old = pid(&ready, "general");
    airlockd::launch::kill(old);
    let restarting = control.wait(&h, "general restarting", Duration::from_secs(20), |s| {
        state(s, "general") == "restarting"
    });
    assert!(
        restarting["guests"]["general"]["reason"]
            .as_str()
            .unwrap()
            .contains("signal 9"),
        "{restarting}"
    );
    assert_eq!(
        state(&restarting, "classified"),
        "running",
        "the other guest is untouched"
    );
    let back = control.wait(&h, "general running again", Duration::from_secs(30), |s| {
        state(s, "general") == "running"
    });
    assert_ne!(pid(&back, "general"), old);
    assert_eq!(back["guests"]["general"]["restarts"], 1);
    let mut general = h.wait_alive("general");
    let new_swtpm = check_vtpm(&h, nobody.uid);
    assert_ne!(new_swtpm, old_swtpm, "the vTPM restarts with its guest");
    assert!(
        !Path::new(&format!("/proc/{old_swtpm}")).exists(),
        "the crashed guest's swtpm is gone"
    );
    eprintln!(
        "general guest restarted and alive {:.1} s after the supervisor started",
        started.elapsed().as_secs_f64()
    );

    // A guest reboot (QEMU exits with -no-reboot) is a fresh start at once, not a crash.
    let before = pid(&control.last, "classified");
    assert_eq!(
        classified
            .command("reboot", Duration::from_secs(10))
            .unwrap(),
        "ok rebooting"
    );
    let rebooted = control.wait(
        &h,
        "classified running again after its reboot",
        Duration::from_secs(30),
        |s| {
            state(s, "classified") == "running"
                && s["guests"]["classified"]["pid"].as_i64() != Some(before as i64)
        },
    );
    assert_eq!(
        rebooted["guests"]["classified"]["restarts"], 0,
        "a reboot is not counted as a crash"
    );
    let mut classified = h.wait_alive("classified");
    assert!(
        h.log()
            .contains("classified: the guest rebooted; starting it again"),
        "{}",
        h.log()
    );

    // The classified guest powers itself off: it stays off, the host does not.
    assert_eq!(
        classified
            .command("poweroff", Duration::from_secs(10))
            .unwrap(),
        "ok powering off"
    );
    let one_off = control.wait(&h, "classified off", Duration::from_secs(30), |s| {
        state(s, "classified") == "off"
    });
    assert_eq!(one_off["both_off"], false);
    assert_eq!(one_off["ready"], false);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        state(&control.last, "classified"),
        "off",
        "a guest that powered off is not restarted"
    );
    assert!(
        !h.hook_file.exists(),
        "the host must not power off while the general guest runs"
    );

    // Then the general guest: both off, the power-off hook runs.
    let off_at = Instant::now();
    assert_eq!(
        general
            .command("poweroff", Duration::from_secs(10))
            .unwrap(),
        "ok powering off"
    );
    let both = control.wait(&h, "both off", Duration::from_secs(30), |s| {
        s["both_off"] == true
    });
    assert_eq!(both["phase"], "powering-off");
    let status = h.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "airlockd exited with {status}");
    assert!(
        h.hook_file.exists(),
        "the power-off hook did not run:\n{}",
        h.log()
    );
    for side in ["classified", "general"] {
        assert!(
            !h.cgroup.join(format!("guest-{side}")).exists(),
            "guest-{side} cgroup left behind"
        );
    }
    eprintln!(
        "power-off hook ran {:.1} s after the second guest's poweroff; whole test {:.1} s",
        off_at.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let log = h.log();
    assert!(
        log.contains("classified: the guest powered itself off; it stays off"),
        "{log}"
    );
    assert!(
        log.contains("general: guest crashed: QEMU was killed by signal 9"),
        "{log}"
    );
}

#[test]
fn sigterm_powers_guests_down() {
    require_root();
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (_img_dir, img) = prepare_image();
    // (The initramfs also carries display and network modules.)
    for module in image::POWER_BUTTON_MODULES {
        assert!(
            img.modules.iter().any(|m| m.starts_with(&format!("{}.ko", module.rsplit('/').next().unwrap_or(module)))),
            "the kernel's tree lacks {module}, so the guest cannot see an ACPI power-button press: {:?}",
            img.modules
        );
    }
    const TIMEOUT_SECS: u32 = 8;
    let mut h = Harness::start_with("sigterm", &img, TIMEOUT_SECS, None);
    let mut control = h.control();
    let ready = control.wait(&h, "both guests running", Duration::from_secs(60), |s| {
        s["ready"] == true
    });
    let qemu_pids = [pid(&ready, "classified"), pid(&ready, "general")];
    // The classified guest hangs (ignores its power button); the general one obeys.
    let mut classified = h.wait_alive("classified");
    h.wait_alive("general");
    assert_eq!(
        classified
            .command("ignore-power-button", Duration::from_secs(10))
            .unwrap(),
        "ok ignoring the power button"
    );
    let stop_at = Instant::now();
    #[allow(unsafe_code)]
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(h.child.id() as i32, libc::SIGTERM);
    }
    let status = h.wait_exit(Duration::from_secs(60));
    let took = stop_at.elapsed();
    assert!(status.success(), "airlockd exited with {status}");
    let log = h.log();
    eprintln!(
        "host shutdown took {:.1} s (timeout {TIMEOUT_SECS} s, one guest ignoring ACPI)",
        took.as_secs_f64()
    );
    for side in ["classified", "general"] {
        assert!(
            log.contains(&format!("{side}: ACPI power-down sent")),
            "{log}"
        );
    }
    assert!(
        log.contains("general: QMP SHUTDOWN (guest: true, reason: guest-shutdown)"),
        "general did not power itself down:\n{log}"
    );
    assert!(
        !log.contains("classified: QMP SHUTDOWN (guest: true"),
        "classified was to ignore the button:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "guests still running {TIMEOUT_SECS}s after ACPI power-down: killing them"
        )),
        "{log}"
    );
    assert!(
        took >= Duration::from_secs(u64::from(TIMEOUT_SECS)),
        "waited the full timeout before killing"
    );
    assert!(
        took < Duration::from_secs(u64::from(TIMEOUT_SECS) + 10),
        "bounded: {took:?}"
    );
    for p in qemu_pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "QEMU {p} left running"
        );
    }
    assert!(
        !h.hook_file.exists(),
        "a host shutdown must not run the power-off action"
    );
}

/// Benchmark, not a check (run on demand: `cargo test -p airlockd --test
/// supervisor -- --ignored --nocapture hog`): the classified guest's CPU
/// benchmark alone, then while the general guest runs a CPU and memory hog;
/// prints the ratio. On a host without the cgroup v2 cpu controller (these
/// build machines) it measures plain contention, not the configured cap.
#[test]
#[ignore = "benchmark; prints figures"]
fn hog_ratio() {
    require_root();
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (_img_dir, img) = prepare_image();
    let h = Harness::start("hog", &img);
    let mut control = h.control();
    control.wait(&h, "both guests running", Duration::from_secs(60), |s| {
        s["ready"] == true
    });
    let mut classified = h.wait_alive("classified");
    let mut general = h.wait_alive("general");
    let bench = |c: &mut Client| -> f64 {
        let reply = c
            .command("bench 300000000", Duration::from_secs(300))
            .unwrap();
        let us: f64 = reply
            .split_whitespace()
            .find_map(|w| w.strip_prefix("elapsed_us="))
            .unwrap()
            .parse()
            .unwrap();
        us / 1e6
    };
    bench(&mut classified); // warm-up
    let alone: Vec<f64> = (0..3).map(|_| bench(&mut classified)).collect();
    let reply = general
        .command("hog 2 96 120", Duration::from_secs(10))
        .unwrap();
    assert!(reply.starts_with("ok hog"), "{reply}");
    std::thread::sleep(Duration::from_secs(2));
    let hogged: Vec<f64> = (0..3).map(|_| bench(&mut classified)).collect();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cap = h
        .log()
        .lines()
        .find(|l| l.contains("general: cgroup"))
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "classified bench (s): alone {alone:.2?}, with general hog {hogged:.2?}; median ratio {:.2}\n{cap}",
        median(&hogged) / median(&alone)
    );
}

/// Builds `airlock-gateway` and `airlock-sanitiser` (in their own target
/// directory, so this never waits on the cargo that runs the tests) and
/// copies them into `dir/bin`, where the gateway's user may run them.
fn gateway_binaries(dir: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = workspace.join("target/airlockd-it");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--quiet",
            "--locked",
            "-p",
            "airlock-gateway",
            "--bins",
            "--target-dir",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "building the gateway failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("bin");
    fs::create_dir(&bin).unwrap();
    for name in ["airlock-gateway", "airlock-sanitiser"] {
        fs::copy(target.join("debug").join(name), bin.join(name)).unwrap();
        fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Asks a guest's test port `command` until the reply satisfies `want`.
fn poll(
    h: &Harness,
    client: &mut Client,
    command: &str,
    what: &str,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = client
            .command(command, Duration::from_secs(10))
            .unwrap_or_else(|e| h.fail(format!("{command}: {e}")));
        if want(&reply) {
            return reply;
        }
        if Instant::now() > deadline {
            h.fail(format!(
                "timed out after {timeout:?} waiting for {what}; `{command}` says {reply:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The vdagent counters a guest reports.
fn vdagent_counters(h: &Harness, client: &mut Client) -> std::collections::BTreeMap<String, u64> {
    let line = client
        .command("vdagent-log", Duration::from_secs(10))
        .unwrap_or_else(|e| h.fail(format!("vdagent-log: {e}")));
    airlock_test_guest::client::counters(&line)
}

/// Waits until the gateway has announced itself to the guest more than
/// `seen` times since the guest booted (so its clipboard commands reach
/// the host); returns the count.
fn wait_announced(h: &Harness, client: &mut Client, side: &str, seen: u64) -> u64 {
    let line = poll(
        h,
        client,
        "vdagent-log",
        &format!("the gateway's announce in the {side} guest"),
        Duration::from_secs(30),
        |l| {
            airlock_test_guest::client::counters(l)
                .get("rx.announce-capabilities")
                .is_some_and(|n| *n > seen)
        },
    );
    airlock_test_guest::client::counters(&line)["rx.announce-capabilities"]
}

/// A copy of `text` in the general guest, then pastes in the classified
/// guest until `expected` arrives there. Returns how long it took.
fn copy_and_paste(
    h: &Harness,
    general: &mut Client,
    classified: &mut Client,
    text: &str,
    expected: &str,
) -> Duration {
    let start = Instant::now();
    let reply = general
        .command(
            &format!("clip-set utf8 {}", b64(text)),
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        reply.starts_with("ok grabbed utf8"),
        "general clip-set: {reply}"
    );
    let want = format!("clip utf8 {}", b64(expected));
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        // The gateway offers the sanitised text with a grab; a paste is a request.
        poll(
            h,
            classified,
            "clip-grabs",
            "the gateway's offer in the classified guest",
            Duration::from_secs(30),
            |l| l == "grabs utf8",
        );
        let reply = classified
            .command("clip-request utf8", Duration::from_secs(10))
            .unwrap();
        assert_eq!(reply, "ok requested utf8");
        let until = Instant::now() + Duration::from_secs(3);
        let mut last = String::new();
        while Instant::now() < until {
            last = classified
                .command("clip-received", Duration::from_secs(10))
                .unwrap();
            if last == want {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if Instant::now() > deadline {
            h.fail(format!("{expected:?} did not arrive in the classified guest; it last received {last:?} (want {want:?})"));
        }
    }
}

#[test]
fn clipboard_through_the_gateway() {
    require_root();
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (_img_dir, img) = prepare_image();
    let bin_dir = tempfile::Builder::new()
        .prefix("airlockd-it-gw-")
        .tempdir()
        .unwrap();
    let bin = gateway_binaries(bin_dir.path());
    let started = Instant::now();
    let mut h = Harness::start_with("clip", &img, 60, Some(&bin));
    let mut control = h.control();
    let ready = control.wait(
        &h,
        "both guests and the gateway running",
        Duration::from_secs(60),
        |s| s["ready"] == true && s["gateway"]["state"] == "running",
    );
    let gateway_pid = ready["gateway"]["pid"].as_i64().unwrap() as i32;
    assert_eq!(ready["gateway"]["restarts"], 0);

    // Placement: its own user, its own cgroup, the configured limits, no NoNewPrivileges.
    let gw_user = airlockd::users::lookup_user(GATEWAY_USER).unwrap();
    let guest_user = airlockd::users::lookup_user(USER).unwrap();
    assert_eq!(
        uid_of(gateway_pid),
        gw_user.uid,
        "the gateway runs as {GATEWAY_USER}"
    );
    assert!(cgroup_comms(&h, "classified")
        .iter()
        .all(|(p, _)| *p != gateway_pid));
    let procs = fs::read_to_string(h.cgroup.join("gateway/cgroup.procs")).unwrap();
    assert!(
        procs
            .split_whitespace()
            .any(|p| p == gateway_pid.to_string()),
        "gateway {gateway_pid} not in its cgroup: {procs:?}"
    );
    let status = fs::read_to_string(format!("/proc/{gateway_pid}/status")).unwrap();
    assert!(
        status.contains("NoNewPrivs:\t0"),
        "the gateway must be able to exec the sanitiser into its domain:\n{status}"
    );
    let cmdline =
        String::from_utf8_lossy(&fs::read(format!("/proc/{gateway_pid}/cmdline")).unwrap())
            .replace('\0', " ");
    let audit_log = h.dir.path().join("log/clipboard.log");
    for want in [
        format!(
            "--classified {}",
            h.run_dir.join("classified/vdagent.sock").display()
        ),
        format!(
            "--general {}",
            h.run_dir.join("general/vdagent.sock").display()
        ),
        format!("--audit-log {}", audit_log.display()),
        format!("--sanitiser {}", bin.join("airlock-sanitiser").display()),
        "--max-bytes 1048576".to_owned(),
        "--request-timeout-ms 10000".to_owned(),
    ] {
        assert!(
            cmdline.contains(&want),
            "gateway command line lacks {want:?}: {cmdline}"
        );
    }
    assert!(
        !cmdline.contains("--confirm-socket"),
        "confirm mode is off: {cmdline}"
    );
    assert!(
        h.log().contains("clipboard gateway: cgroup"),
        "the gateway's limits are logged:\n{}",
        h.log()
    );

    let mut classified = h.wait_alive("classified");
    let mut general = h.wait_alive("general");
    eprintln!(
        "both guests alive {:.1} s after the supervisor started",
        started.elapsed().as_secs_f64()
    );

    // DAC: each vdagent socket, and only it, is the gateway's group's; each
    // display socket, and only it, the kiosk's; QMP stays the guest's.
    use std::os::unix::fs::MetadataExt;
    let kiosk_gid = airlockd::users::lookup_group(KIOSK_GROUP)
        .unwrap()
        .expect("the kiosk's stand-in group exists");
    for side in ["classified", "general"] {
        let dir = fs::metadata(h.run_dir.join(side)).unwrap();
        assert_eq!(dir.mode() & 0o777, 0o751, "{side} run directory");
        let vdagent = fs::metadata(h.run_dir.join(side).join("vdagent.sock")).unwrap();
        assert_eq!(
            (vdagent.uid(), vdagent.gid(), vdagent.mode() & 0o777),
            (guest_user.uid, gw_user.gid, 0o660),
            "{side} vdagent.sock"
        );
        let display = fs::metadata(h.run_dir.join(side).join("display.sock")).unwrap();
        assert_eq!(
            (display.uid(), display.gid(), display.mode() & 0o777),
            (guest_user.uid, kiosk_gid, 0o660),
            "{side} display.sock"
        );
        let qmp = fs::metadata(h.run_dir.join(side).join("qmp.sock")).unwrap();
        assert!(
            ![gw_user.gid, kiosk_gid].contains(&qmp.gid()) && qmp.mode() & 0o007 == 0,
            "{side} qmp.sock must stay the guest's: {:o} gid {}",
            qmp.mode(),
            qmp.gid()
        );
    }
    let announced_general = wait_announced(&h, &mut general, "general", 0);
    let announced_classified = wait_announced(&h, &mut classified, "classified", 0);

    // General → classified: arrives with Windows line ends.
    let took = copy_and_paste(
        &h,
        &mut general,
        &mut classified,
        "hello from general\nline two",
        "hello from general\r\nline two",
    );
    eprintln!(
        "text general -> classified in {:.2} s (TCG)",
        took.as_secs_f64()
    );
    // A right-to-left override and an isolate are removed on the way.
    copy_and_paste(
        &h,
        &mut general,
        &mut classified,
        "invoice\u{202E}fdp.exe\u{2066} ok",
        "invoicefdp.exe ok",
    );

    // Classified → general: nothing arrives, not even a grab.
    let before = vdagent_counters(&h, &mut general);
    for never in ["rx.clipboard-grab", "rx.clipboard", "rx.clipboard-release"] {
        assert_eq!(
            before.get(never),
            None,
            "the general guest received {never} before the reverse test: {before:?}"
        );
    }
    let reply = classified
        .command(
            &format!("clip-set utf8 {}", b64("classified secret")),
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        reply.starts_with("ok grabbed utf8"),
        "classified clip-set: {reply}"
    );
    // The gateway's refusal shows in the audit log; give it a moment more to do anything wrong.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&audit_log)
        .unwrap_or_default()
        .contains("direction=classified->general")
    {
        if Instant::now() > deadline {
            h.fail(format!(
                "no classified->general audit record:\n{}",
                fs::read_to_string(&audit_log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        general
            .command("clip-grabs", Duration::from_secs(10))
            .unwrap(),
        "grabs none"
    );
    assert_eq!(
        general
            .command("clip-received", Duration::from_secs(10))
            .unwrap(),
        "clip none"
    );
    let after = vdagent_counters(&h, &mut general);
    assert_eq!(
        before, after,
        "the general guest received something after the copy in classified"
    );
    // A paste in general gets an empty answer, nothing of classified's.
    assert_eq!(
        general
            .command("clip-request utf8", Duration::from_secs(10))
            .unwrap(),
        "ok requested utf8"
    );
    poll(
        &h,
        &mut general,
        "vdagent-log",
        "the gateway's empty answer",
        Duration::from_secs(20),
        |l| airlock_test_guest::client::counters(l).get("rx.clipboard") == Some(&1),
    );
    assert_eq!(
        general
            .command("clip-received", Duration::from_secs(10))
            .unwrap(),
        "clip none",
        "the answer must be empty"
    );

    // The audit log: every attempt, hashes of what was delivered, never content.
    let audit = fs::read_to_string(&audit_log).unwrap();
    eprintln!("audit log:\n{audit}");
    let accepted: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("direction=general->classified") && l.contains("result=accepted"))
        .collect();
    assert_eq!(accepted.len(), 2, "{audit}");
    assert!(
        accepted[0].contains(&format!(
            "sha256={}",
            sha256_hex(b"hello from general\r\nline two")
        )),
        "{audit}"
    );
    assert!(
        accepted[1].contains(&format!(
            "sha256={}",
            sha256_hex("invoicefdp.exe ok".as_bytes())
        )),
        "{audit}"
    );
    assert_eq!(audit.lines().filter(|l| l.contains("direction=classified->general") && l.contains("result=rejected")).count(), 1, "{audit}");
    for secret in ["hello", "invoice", "secret"] {
        assert!(!audit.contains(secret), "content in the audit log: {audit}");
    }
    let meta = fs::metadata(&audit_log).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (gw_user.uid, 0o640),
        "audit log owner and mode"
    );

    // The gateway dies: restarted with back-off, and copies work again.
    airlockd::launch::kill(gateway_pid);
    let restarting = control.wait(&h, "gateway restarting", Duration::from_secs(20), |s| {
        s["gateway"]["state"] == "restarting"
    });
    assert!(
        restarting["gateway"]["reason"]
            .as_str()
            .unwrap()
            .contains("signal 9"),
        "{restarting}"
    );
    assert_eq!(
        state(&restarting, "general"),
        "running",
        "the guests are untouched"
    );
    let back = control.wait(&h, "gateway running again", Duration::from_secs(30), |s| {
        s["gateway"]["state"] == "running"
    });
    let new_gateway = back["gateway"]["pid"].as_i64().unwrap() as i32;
    assert_ne!(new_gateway, gateway_pid);
    assert_eq!(back["gateway"]["restarts"], 1);
    // The new gateway connects to both guests and announces itself again.
    wait_announced(&h, &mut general, "general", announced_general);
    wait_announced(&h, &mut classified, "classified", announced_classified);
    copy_and_paste(
        &h,
        &mut general,
        &mut classified,
        "after the gateway restarted",
        "after the gateway restarted",
    );

    // The general guest's QEMU dies: its new vdagent socket is handed to the
    // gateway again and the gateway reconnects by itself.
    let old_qemu = pid(&control.last, "general");
    airlockd::launch::kill(old_qemu);
    control.wait(&h, "general restarting", Duration::from_secs(20), |s| {
        state(s, "general") == "restarting"
    });
    control.wait(&h, "general running again", Duration::from_secs(30), |s| {
        state(s, "general") == "running"
    });
    let mut general = h.wait_alive("general");
    // The new QEMU's display socket is the kiosk's again.
    let display = fs::metadata(h.run_dir.join("general/display.sock")).unwrap();
    assert_eq!(
        (display.gid(), display.mode() & 0o777),
        (kiosk_gid, 0o660),
        "display.sock of the restarted general guest"
    );
    wait_announced(&h, &mut general, "restarted general", 0);
    let took = copy_and_paste(
        &h,
        &mut general,
        &mut classified,
        "after the guest restarted",
        "after the guest restarted",
    );
    eprintln!(
        "copy after the general guest's restart in {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(
        control.last["gateway"]["pid"].as_i64(),
        Some(i64::from(new_gateway)),
        "the same gateway serves the new guest"
    );

    // Host shutdown: the gateway is stopped, its cgroup removed.
    #[allow(unsafe_code)]
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(h.child.id() as i32, libc::SIGTERM);
    }
    let status = h.wait_exit(Duration::from_secs(90));
    assert!(status.success(), "airlockd exited with {status}");
    let log = h.log();
    assert!(
        log.contains(&format!("clipboard gateway (pid {new_gateway}) stopped")),
        "{log}"
    );
    assert!(
        !Path::new(&format!("/proc/{new_gateway}")).exists(),
        "the gateway outlived the supervisor"
    );
    assert!(
        !h.cgroup.join("gateway").exists(),
        "gateway cgroup left behind"
    );
    assert!(log.contains("clipboard gateway: the gateway (pid"), "{log}");
    eprintln!("whole test {:.1} s", started.elapsed().as_secs_f64());
}
