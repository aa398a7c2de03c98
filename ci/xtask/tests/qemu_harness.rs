//! Integration tests of the VM harness against the real QEMU and OVMF, with
//! an empty disk (no airlock image needed): OVMF finds nothing to boot and
//! ends in its shell, which is enough to exercise QMP, screendumps, the
//! serial console, process-group cleanup and persistent firmware variables.
//!
//! They need `qemu-system-x86_64` and OVMF (ci/install-host-deps.sh) and fail
//! with a message saying so when those are missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use airlock::qemu::{Accel, Graphics, VmConfig};
use xtask::qmp::ImageFormat;
use xtask::{images_differ, Machine, Vm};

/// Firmware output under TCG takes ~6 s on an idle 2-core machine; allow
/// for a loaded CI machine, the tests normally finish far sooner.
const FIRMWARE_TIMEOUT: Duration = Duration::from_secs(90);

fn require_qemu() {
    let qemu = xtask::vm::qemu_binary();
    let ok = Command::new(&qemu)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} is not installed or does not run: these tests need QEMU and OVMF (run ci/install-host-deps.sh as root)",
        qemu.display()
    );
}

/// A machine with an empty 16 MiB disk and its variable store in `dir`.
fn empty_machine(dir: &Path) -> Machine {
    require_qemu();
    let disk = dir.join("disk.raw");
    if !disk.exists() {
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    Machine::new(&disk, &dir.join("OVMF_VARS.fd")).expect("OVMF is needed (Debian package `ovmf`)")
}

/// Small and with a screen, so parallel tests stay quick. TCG always: these
/// tests are about the harness, and on some hosts KVM passes
/// `detect_accel`'s probe yet cannot run `-cpu host`.
fn small(machine: &Machine) -> VmConfig {
    let mut cfg = machine.config();
    cfg.accel = Accel::Tcg;
    cfg.memory_mib = 256;
    cfg.cpus = 1;
    cfg.graphics = Graphics::Std;
    cfg
}

fn boot(machine: &Machine) -> Vm {
    Vm::start(small(machine)).unwrap()
}

/// Pids of all processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        if after
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse::<i32>().ok())
            == Some(pgid)
        {
            members.push(entry.file_name().to_string_lossy().parse().unwrap_or(-1));
        }
    }
    members
}

#[test]
fn qemu_answers_qmp_and_is_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&empty_machine(dir.path()));
    let qmp = vm.qmp().unwrap();
    assert!(
        qmp.version().starts_with(|c: char| c.is_ascii_digit()),
        "{}",
        qmp.version()
    );
    let status = qmp.query_status().unwrap();
    assert_eq!((status.status.as_str(), status.running), ("running", true));
}

#[test]
fn screendump_writes_a_png_and_a_paused_screen_does_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&empty_machine(dir.path()));
    let qmp = vm.qmp().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    assert_eq!(qmp.screendump(&a).unwrap(), ImageFormat::Png);
    let image = xtask::screen::load_image(&a).unwrap();
    assert!(
        image.width >= 640 && image.height >= 400,
        "{}x{}",
        image.width,
        image.height
    );
    qmp.execute("stop", None).unwrap();
    qmp.screendump(&a).unwrap();
    qmp.screendump(&b).unwrap();
    assert!(!images_differ(&a, &b).unwrap());
    assert!(qmp.saw_event("STOP").unwrap());
}

#[test]
fn dropping_the_vm_kills_its_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let vm = boot(&empty_machine(dir.path()));
    let pid = vm.pid();
    assert_eq!(group_members(pid), [pid]);
    drop(vm);
    assert!(
        group_members(pid).is_empty(),
        "left behind: {:?}",
        group_members(pid)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU not reaped"
    );
}

#[test]
fn kill_is_an_immediate_power_cut() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&empty_machine(dir.path()));
    let status = vm.kill().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_eq!(vm.wait_exit(Duration::ZERO).unwrap(), Some(status));
    assert!(vm.qmp().is_err(), "no QMP after power cut");
}

#[test]
fn qmp_quit_ends_qemu_cleanly_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&empty_machine(dir.path()));
    assert!(vm.wait_exit(Duration::from_millis(200)).unwrap().is_none());
    let qmp = vm.qmp().unwrap();
    qmp.quit().unwrap();
    assert!(
        qmp.events().iter().any(|e| e.name == "SHUTDOWN"),
        "{:?}",
        qmp.events()
    );
    let status = vm
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("QEMU still running after quit");
    assert!(status.success(), "{status}");
}

#[test]
fn serial_console_shows_the_firmware_and_times_out_with_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    let vm = boot(&empty_machine(dir.path()));
    let started = Instant::now();
    // OVMF finds nothing on the empty disk and says so (escape sequences around it).
    vm.wait_for_serial("BdsDxe: failed to load Boot0001", FIRMWARE_TIMEOUT)
        .unwrap();
    eprintln!("firmware output after {:?}", started.elapsed());
    assert!(vm.serial_log().contains("BdsDxe"));
    let err = vm
        .wait_for_serial("this is never printed", Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("timed out") && err.contains("still running"),
        "{err}"
    );
    assert!(
        err.contains("BdsDxe: failed to load Boot0001"),
        "the serial tail is quoted: {err}"
    );
}

#[test]
fn waiting_for_the_console_of_a_dead_vm_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&empty_machine(dir.path()));
    vm.kill().unwrap();
    let started = Instant::now();
    let err = vm
        .wait_for_serial("login:", Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("QEMU exited") && err.contains("signal 9"),
        "{err}"
    );
}

#[test]
fn qemu_startup_errors_are_reported_with_its_output() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let machine = empty_machine(dir.path());
    let mut cfg = small(&machine);
    cfg.disk = PathBuf::from("/nonexistent/disk.raw");
    let err = format!("{:#}", Vm::start(cfg).unwrap_err());
    assert!(
        err.contains("QEMU exited") && err.contains("/nonexistent/disk.raw"),
        "{err}"
    );
    // The VM's files are kept for a failed start; this test needs them no more.
    let kept = err
        .split("VM files in ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("names the VM dir");
    assert!(Path::new(kept).join("qemu.log").exists(), "{kept}");
    std::fs::remove_dir_all(kept).unwrap();
}

#[test]
fn the_same_disk_and_firmware_variables_boot_again() {
    let dir = tempfile::tempdir().unwrap();
    let template = std::fs::read(empty_machine(dir.path()).vars()).unwrap();
    let machine = empty_machine(dir.path());
    {
        let vm = boot(&machine);
        // By now OVMF has written its boot entries to the variable store.
        vm.wait_for_serial("BdsDxe", FIRMWARE_TIMEOUT).unwrap();
    }
    let after_first_boot = std::fs::read(machine.vars()).unwrap();
    assert_ne!(after_first_boot, template, "OVMF wrote no variables");

    // A later run, even a new Machine, keeps those variables, and the
    // first VM's image locks are gone.
    let machine = empty_machine(dir.path());
    assert_eq!(std::fs::read(machine.vars()).unwrap(), after_first_boot);
    let mut vm = boot(&machine);
    assert!(vm.qmp().unwrap().query_status().unwrap().running);
}
