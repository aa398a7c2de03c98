//! `airlock-test-attack`: the acceptance suite's stand-in for a guest's
//! QEMU gone rogue (a VM escape, P16). The suite starts it in a VM domain
//! with `runcon`; test images only (its entrypoint rule is in the test
//! profile's policy, `ci/test-agent/policy/airlock_test_attack.te`).
//!
//! `listen DIR`: bind the three sockets a side's QEMU creates in DIR
//! (`qmp.sock`, `display.sock`, `vdagent.sock`), as QEMU would, and wait
//! (at most 15 minutes) so the other side can try to reach them.
//!
//! `probe OWN OTHER DISK SLOT [ATTEMPT]`: try what a compromised QEMU of
//! side OWN might (only ATTEMPT, if given, so that the suite can tell
//! which audit records each attempt caused), and print one JSON line per
//! attempt with its outcome. Nothing is judged here; the suite compares
//! the outcomes and the audit log.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    match argv.as_slice() {
        ["listen", dir] => listen(Path::new(dir)),
        ["probe", own, other, disk, slot, only @ ..] => {
            probe(own, other, disk, slot, only.first().copied());
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: airlock-test-attack listen DIR | probe OWN OTHER DISK-DEVICE SLOT-DEVICE [ATTEMPT]");
            ExitCode::from(2)
        }
    }
}

fn listen(dir: &Path) -> ExitCode {
    let mut listeners = Vec::new();
    for name in ["qmp.sock", "display.sock", "vdagent.sock"] {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        match UnixListener::bind(&path) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("airlock-test-attack: binding {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(900));
    ExitCode::SUCCESS
}

/// One attempt's outcome: "ok", or the error the kernel gave.
fn outcome<T>(result: std::io::Result<T>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(code) => format!("{} ({e})", errno_name(code)),
            None => e.to_string(),
        },
    }
}

fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EROFS => "EROFS",
        libc::ENOENT => "ENOENT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => "other",
    }
}

fn report(only: Option<&str>, attempt: &str, target: &str, result: impl FnOnce() -> String) {
    if only.is_some_and(|o| o != attempt) {
        return;
    }
    let result = result();
    let line = serde_json::json!({ "attempt": attempt, "target": target, "result": result });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

fn open_rw(path: &str) -> std::io::Result<std::fs::File> {
    OpenOptions::new().read(true).write(true).open(path)
}

fn probe(own: &str, other: &str, disk: &str, slot: &str, only: Option<&str>) {
    // Control: its own side's disk image opens, so a denial below is the
    // policy at work, not a missing file or a broken harness.
    let own_disk = format!("/var/lib/airlock/{own}/disk/disk.img");
    report(only, "own-disk-open-rw", &own_disk, || {
        outcome(open_rw(&own_disk))
    });

    let other_disk = format!("/var/lib/airlock/{other}/disk/disk.img");
    report(only, "other-disk-open-rw", &other_disk, || {
        outcome(open_rw(&other_disk))
    });
    for socket in ["vdagent", "qmp", "display"] {
        let path = format!("/run/airlock/{other}/{socket}.sock");
        report(only, &format!("other-{socket}-connect"), &path, || {
            outcome(UnixStream::connect(&path))
        });
    }
    // /usr is on the read-only erofs root, so the kernel may refuse writes
    // there before SELinux is asked; the suite mounts a writable tmpfs
    // labelled usr_t on /usr/local so that the policy itself is tested.
    report(only, "usr-create", "/usr/local/airlock-attack", || {
        outcome(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open("/usr/local/airlock-attack"),
        )
    });
    report(only, "usr-bin-write", "/usr/bin/sh", || {
        outcome(OpenOptions::new().write(true).open("/usr/bin/sh"))
    });
    report(only, "exec-shell", "/bin/sh", || {
        outcome(Command::new("/bin/sh").args(["-c", "true"]).status())
    });
    report(only, "load-module", "init_module", || {
        outcome(load_empty_module())
    });
    report(only, "inet-socket", "127.0.0.1:0", || {
        outcome(std::net::TcpListener::bind("127.0.0.1:0"))
    });
    report(only, "disk-device-write", disk, || outcome(open_rw(disk)));
    report(only, "slot-device-write", slot, || outcome(open_rw(slot)));
}

/// init_module(2) with an empty image: the capability check (sys_module)
/// comes before the kernel looks at the image.
#[allow(unsafe_code)]
fn load_empty_module() -> std::io::Result<()> {
    let image: [u8; 0] = [];
    let params = c"";
    // SAFETY: the pointers are valid for the given (zero) length and the
    // parameter string is NUL-terminated; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            0usize,
            params.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
