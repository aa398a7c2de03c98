//! Integration test (QEMU, TCG, no root): the production firmware path of
//! the command line (OVMF pflash, secure boot with SMM, VGA + VNC on a unix
//! socket, vdagent port, virtio disk with throttling, and the general
//! guest's USB, CD and sound) is accepted by the real QEMU, which then runs
//! the firmware. Only the accelerator differs from production (TCG here).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlockd::config::{self, Side};
use airlockd::qemu::{command_line, GuestPaths};

#[test]
fn qemu_runs_the_firmware_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let fw = |side: &str, secure: bool| {
        let (code, vars) = if secure {
            (
                "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
            )
        } else {
            (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            )
        };
        format!("[guest.{side}.firmware]\ncode = \"{code}\"\nvars_template = \"{vars}\"\nsecure_boot = {secure}\n")
    };
    let text = format!(
        r#"
[supervisor]
test_mode = true
run_dir = "{d}/run"
state_dir = "{d}/state"
log_dir = "{d}/log"
[guest.classified]
disk = "{d}/state/classified/disk/disk.raw"
disk_format = "raw"
memory_mib = 256
vcpus = 1
accel = "tcg"
devices = ["tablet"]
[guest.classified.network]
enabled = false
{fw_c}
[guest.general]
disk = "{d}/state/general/disk/disk.raw"
disk_format = "raw"
memory_mib = 256
vcpus = 1
accel = "tcg"
devices = ["tablet", "usb", "cdrom", "sound"]
[guest.general.limits]
io_read_bps = 1048576
io_write_iops = 100
[guest.general.network]
enabled = false
{fw_g}
"#,
        fw_c = fw("classified", true),
        fw_g = fw("general", false),
    );
    let cfg = config::parse("test.toml", &text).unwrap();
    for side in Side::ALL {
        let guest = cfg.guest(side);
        let paths = GuestPaths::new(&cfg.supervisor, side);
        for p in [
            &paths.run_dir,
            &paths.log_dir,
            &guest.disk.parent().unwrap().to_path_buf(),
        ] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(&guest.disk, vec![0u8; 1 << 20]).unwrap();
        let config::Boot::Firmware(fw) = &guest.boot else {
            panic!("firmware boot expected")
        };
        std::fs::copy(&fw.vars_template, &fw.vars).unwrap_or_else(|e| {
            panic!("{}: {e} (Debian package ovmf)", fw.vars_template.display())
        });
        let args = command_line(guest, &cfg.supervisor).unwrap();
        let log = std::fs::File::create(&paths.qemu_log).unwrap();
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let result = (|| -> Result<String, String> {
            // The supervisor's QMP socket answers and the VM runs.
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                if let Ok(Some(status)) = qemu.try_wait() {
                    return Err(format!("QEMU exited: {status}"));
                }
                match UnixStream::connect(&paths.qmp) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(format!("QMP: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
                .unwrap();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 {
                    return Err("QMP closed".into());
                }
                if line.contains("\"status\"") {
                    return Ok(line);
                }
            }
        })();
        // The display and agent sockets exist for the kiosk and the gateway.
        let sockets_ok = paths.display.exists() && paths.vdagent.exists();
        let _ = qemu.kill();
        let _ = qemu.wait();
        let log = std::fs::read_to_string(&paths.qemu_log).unwrap_or_default();
        match result {
            Ok(status) => assert!(status.contains("\"running\""), "{side}: {status}\n{log}"),
            Err(e) => panic!("{side}: {e}\nQEMU said:\n{log}\nargs: {}", args.join(" ")),
        }
        assert!(
            sockets_ok,
            "{side}: display.sock and vdagent.sock must exist"
        );
    }
}
