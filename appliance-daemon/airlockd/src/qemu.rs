//! The QEMU command line of a guest, as a pure function of the validated
//! configuration ([`command_line`]), and where each guest's sockets and logs
//! live ([`GuestPaths`], the run-time contract in `../README.md`).
//!
//! What every guest gets: no default devices, no human monitor, no serial or
//! parallel port (a logged serial console only in test mode), QEMU's seccomp
//! sandbox with everything it can deny denied, QMP on `qmp.sock` for the
//! supervisor, the display as VNC (RFB) on the unix socket `display.sock` for
//! the kiosk, the SPICE agent port `com.redhat.spice.0` as a socket for the
//! clipboard gateway, one virtio disk, one virtio NIC on `tap-<side>`. A
//! device beyond that appears only if the side's allow-list names it, and a
//! device the side may never have is an error here too (defence in depth:
//! the configuration already refuses it).
//!
//! Display protocol: VNC on a unix socket. QEMU has it built in (SPICE needs
//! the separate `qemu-system-modules-spice` package and the kiosk would need
//! spice-gtk); RFB is small enough for the kiosk to speak in Rust without a
//! GUI toolkit; and QEMU's VNC server has no clipboard path into the guest
//! unless a `qemu-vdagent` chardev exists, which we never create, so the
//! only clipboard path is the gateway's. No password: only the kiosk can
//! reach the socket (directory permissions and the SELinux type
//! `airlock_<side>_display_sock_t`).

use std::path::{Path, PathBuf};

use crate::config::{Accel, Boot, Device, Guest, Rtc, Side, Supervisor};

/// Name of the SPICE agent's virtio-serial port (the Windows agent opens it).
pub const VDAGENT_PORT: &str = "com.redhat.spice.0";
/// Name of the test agent's virtio-serial port (test mode only).
pub const TEST_PORT: &str = "org.airlock.test.0";

/// QEMU's seccomp sandbox: every optional deny set on.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Mode of a side's run directory (`/run/airlock/<side>/`, owned by the
/// side's user): its user, its group, and passage (not listing) for the
/// clients of the sockets handed over to them (gateway, kiosk).
pub const SIDE_RUN_DIR_MODE: u32 = 0o751;
/// Mode of a socket of a side's QEMU once handed to the group of its one
/// client (QEMU creates them `0770`, umask 007, for the side's user).
pub const HANDED_SOCKET_MODE: u32 = 0o660;

/// Files and sockets of one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPaths {
    /// `/run/airlock/<side>/`: QEMU creates its sockets here.
    pub run_dir: PathBuf,
    pub qmp: PathBuf,
    pub display: PathBuf,
    pub vdagent: PathBuf,
    /// Test agent port socket (test mode).
    pub test: PathBuf,
    /// A second QMP monitor for tests to inspect the VM (test mode).
    pub qmp_test: PathBuf,
    pub swtpm: PathBuf,
    /// swtpm's state, next to the disk (`/var/lib/airlock/<side>/disk/tpm/`).
    pub tpm_state: PathBuf,
    /// swtpm's stdout and stderr.
    pub swtpm_log: PathBuf,
    /// `/run/airlock/<side>/config/`: the command line, for audit.
    pub config_dir: PathBuf,
    /// `/var/log/airlock/<side>/`.
    pub log_dir: PathBuf,
    /// QEMU's own stdout and stderr, appended.
    pub qemu_log: PathBuf,
    /// The guest's serial console (test mode).
    pub serial_log: PathBuf,
}

impl GuestPaths {
    pub fn new(sup: &Supervisor, side: Side) -> GuestPaths {
        let run_dir = sup.run_dir.join(side.name());
        let log_dir = sup.log_dir.join(side.name());
        GuestPaths {
            qmp: run_dir.join("qmp.sock"),
            display: run_dir.join("display.sock"),
            vdagent: run_dir.join("vdagent.sock"),
            test: run_dir.join("test.sock"),
            qmp_test: run_dir.join("qmp-test.sock"),
            swtpm: run_dir.join("swtpm.sock"),
            config_dir: run_dir.join("config"),
            qemu_log: log_dir.join("qemu.log"),
            swtpm_log: log_dir.join("swtpm.log"),
            tpm_state: sup.state_dir.join(side.name()).join("disk").join("tpm"),
            serial_log: log_dir.join("serial.log"),
            run_dir,
            log_dir,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandLineError {
    #[error("the {side} guest may not have device \"{device}\": {why}")]
    ForbiddenDevice {
        side: Side,
        device: &'static str,
        why: &'static str,
    },
    #[error("the {side} guest: {what} is only allowed in test mode")]
    TestOnly { side: Side, what: &'static str },
}

fn p(path: &Path) -> String {
    // Paths were validated as UTF-8 without commas by the configuration.
    path.to_string_lossy().into_owned()
}

/// swtpm's arguments: TPM 2.0, state in the side's disk directory, control
/// socket for QEMU, exits when QEMU goes away.
pub fn swtpm_command_line(paths: &GuestPaths) -> Vec<String> {
    vec![
        "socket".into(),
        "--tpm2".into(),
        "--tpmstate".into(),
        format!("dir={},mode=0600", p(&paths.tpm_state)),
        "--ctrl".into(),
        format!("type=unixio,path={},mode=0600", p(&paths.swtpm)),
        "--terminate".into(),
        "--seccomp".into(),
        "action=kill".into(),
    ]
}

/// The argument list (without the program) for `qemu-system-x86_64`.
pub fn command_line(guest: &Guest, sup: &Supervisor) -> Result<Vec<String>, CommandLineError> {
    let side = guest.side;
    for device in &guest.devices {
        if let Some(why) = device.refusal(side) {
            return Err(CommandLineError::ForbiddenDevice {
                side,
                device: device.name(),
                why,
            });
        }
    }
    if !sup.test_mode {
        if guest.accel == Accel::Tcg {
            return Err(CommandLineError::TestOnly {
                side,
                what: "TCG emulation",
            });
        }
        if matches!(guest.boot, Boot::Kernel { .. }) {
            return Err(CommandLineError::TestOnly {
                side,
                what: "direct kernel boot",
            });
        }
    }
    let paths = GuestPaths::new(sup, side);
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));

    push(&["-name", &format!("airlock-{side},process=qemu-{side}")]);
    push(&["-nodefaults", "-no-user-config"]);
    let machine = match guest.boot {
        Boot::Firmware(_) => "q35,smm=on",
        Boot::Kernel { .. } => "q35",
    };
    push(&["-machine", machine]);
    match guest.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&[
        "-m",
        &guest.memory_mib.to_string(),
        "-smp",
        &guest.vcpus.to_string(),
    ]);
    // A guest reboot ends this QEMU; the supervisor starts a fresh one.
    push(&["-no-reboot"]);
    push(&["-sandbox", SANDBOX]);
    push(&["-msg", "timestamp=on"]);
    push(&["-monitor", "none", "-parallel", "none"]);
    if sup.test_mode {
        push(&[
            "-chardev",
            &format!("file,id=serial0,append=on,path={}", p(&paths.serial_log)),
            "-serial",
            "chardev:serial0",
        ]);
    } else {
        push(&["-serial", "none"]);
    }
    push(&[
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", p(&paths.qmp)),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    match guest.rtc {
        Rtc::Localtime => push(&["-rtc", "base=localtime"]),
        Rtc::Utc => push(&["-rtc", "base=utc"]),
    }

    match &guest.boot {
        Boot::Firmware(fw) => {
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    p(&fw.code)
                ),
            ]);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", p(&fw.vars)),
            ]);
            if fw.secure_boot {
                // Only SMM code may write the variable store (secure-boot OVMF requires it).
                push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            }
        }
        Boot::Kernel {
            kernel,
            initrd,
            append,
        } => {
            push(&[
                "-kernel",
                &p(kernel),
                "-initrd",
                &p(initrd),
                "-append",
                append,
            ]);
        }
    }

    if guest.tpm {
        // swtpm, started by the supervisor just before QEMU.
        push(&[
            "-chardev",
            &format!("socket,id=swtpm,path={}", p(&paths.swtpm)),
        ]);
        push(&[
            "-tpmdev",
            "emulator,id=tpm0,chardev=swtpm",
            "-device",
            "tpm-crb,tpmdev=tpm0",
        ]);
    }

    // The disk, throttled by QEMU itself (the cgroup's io.max is the limit
    // that still holds if QEMU is compromised).
    let mut drive = format!(
        "if=none,id=disk0,format={},file={},discard=unmap",
        guest.disk_format.name(),
        p(&guest.disk)
    );
    let io = &guest.limits.io;
    for (name, value) in [
        ("bps-read", io.read_bps),
        ("bps-write", io.write_bps),
        ("iops-read", io.read_iops),
        ("iops-write", io.write_iops),
    ] {
        if let Some(v) = value {
            drive.push_str(&format!(",throttling.{name}={v}"));
        }
    }
    push(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
    ]);

    if let Some(net) = &guest.network {
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
        ]);
        let mut nic = "virtio-net-pci,netdev=net0".to_owned();
        if let Some(mac) = &net.mac {
            nic.push_str(&format!(",mac={mac}"));
        }
        push(&["-device", &nic]);
    }

    // Display: a standard VGA card, exported only as VNC on a unix socket.
    let audio = guest
        .devices
        .iter()
        .any(|d| matches!(d, Device::Sound | Device::SoundCapture));
    if audio {
        // Sound goes to the kiosk over the VNC audio extension, nowhere else.
        push(&["-audiodev", "none,id=audio0"]);
    }
    let mut vnc = format!("unix:{}", p(&paths.display));
    if audio {
        vnc.push_str(",audiodev=audio0");
    }
    push(&[
        "-display", "none", "-vga", "none", "-device", "VGA", "-vnc", &vnc,
    ]);

    // The SPICE agent port for the clipboard gateway (and the test port).
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=vdagent,path={},server=on,wait=off",
            p(&paths.vdagent)
        ),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,chardev=vdagent,name={VDAGENT_PORT}"),
    ]);
    if sup.test_mode {
        push(&[
            "-chardev",
            &format!("socket,id=test,path={},server=on,wait=off", p(&paths.test)),
        ]);
        push(&[
            "-device",
            &format!("virtserialport,bus=vser0.0,chardev=test,name={TEST_PORT}"),
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmptest,path={},server=on,wait=off",
                p(&paths.qmp_test)
            ),
        ]);
        push(&["-mon", "chardev=qmptest,mode=control"]);
    }

    for device in &guest.devices {
        match device {
            Device::Tablet => push(&["-device", "virtio-tablet-pci"]),
            Device::Usb => push(&[
                "-device",
                "qemu-xhci,id=usb",
                "-device",
                "usb-tablet,bus=usb.0",
            ]),
            Device::Cdrom => push(&[
                "-drive",
                "if=none,id=cd0,media=cdrom,readonly=on",
                "-device",
                "ide-cd,drive=cd0,bus=ide.2",
            ]),
            Device::Sound => push(&[
                "-device",
                "ich9-intel-hda,id=sound0",
                "-device",
                "hda-output,bus=sound0.0,audiodev=audio0",
            ]),
            Device::SoundCapture => push(&[
                "-device",
                "ich9-intel-hda,id=sound0",
                "-device",
                "hda-duplex,bus=sound0.0,audiodev=audio0",
            ]),
            Device::Floppy | Device::Parallel | Device::Serial | Device::SharedFolder => {
                unreachable!("refused above for every side")
            }
        }
    }
    // Entropy for the guest's early boot.
    push(&["-device", "virtio-rng-pci"]);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, IoLimits};

    const ALL_DEVICES: [Device; 9] = [
        Device::Tablet,
        Device::Usb,
        Device::Cdrom,
        Device::Sound,
        Device::SoundCapture,
        Device::Floppy,
        Device::Parallel,
        Device::Serial,
        Device::SharedFolder,
    ];

    fn shipped() -> config::Config {
        config::parse("appliance.toml", crate::SHIPPED_CONFIG_TEXT).unwrap()
    }

    fn joined(guest: &Guest, sup: &Supervisor) -> String {
        command_line(guest, sup).unwrap().join(" ")
    }

    /// Words that would reveal a USB, removable-media, printer or sound device.
    const CLASSIFIED_NEVER: &[&str] = &[
        "usb",
        "xhci",
        "ehci",
        "uhci",
        "ohci",
        "cdrom",
        "ide-cd",
        "scsi-cd",
        "floppy",
        "fdc",
        "isa-parallel",
        "parallel,",
        "hda",
        "intel-hda",
        "ac97",
        "sb16",
        "es1370",
        "audiodev",
        "isa-serial",
        "pci-serial",
        "virtfs",
        "virtiofs",
        "9p",
        "fsdev",
        "usb-storage",
        "mass-storage",
        "sd-card",
        "sdhci",
    ];

    #[test]
    fn classified_never_gets_forbidden_devices_whatever_the_config_asks() {
        let cfg = shipped();
        // Every subset of the device vocabulary, bypassing configuration
        // validation: either refused, or nothing forbidden on the line.
        for mask in 0u32..(1 << ALL_DEVICES.len()) {
            let mut guest = cfg.classified.clone();
            guest.devices = ALL_DEVICES
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, d)| *d)
                .collect();
            match command_line(&guest, &cfg.supervisor) {
                Err(CommandLineError::ForbiddenDevice {
                    side: Side::Classified,
                    ..
                }) => {
                    assert!(guest
                        .devices
                        .iter()
                        .any(|d| d.refusal(Side::Classified).is_some()));
                }
                Err(e) => panic!("unexpected error {e}"),
                Ok(args) => {
                    let line = args.join(" ").to_ascii_lowercase();
                    for word in CLASSIFIED_NEVER {
                        assert!(!line.contains(word), "{word:?} in {line}");
                    }
                    assert!(
                        guest.devices.iter().all(|d| *d == Device::Tablet),
                        "only the tablet may pass: {:?}",
                        guest.devices
                    );
                }
            }
        }
        // And through the configuration: every forbidden device is refused.
        for device in ALL_DEVICES
            .iter()
            .filter(|d| d.refusal(Side::Classified).is_some())
        {
            let text = crate::SHIPPED_CONFIG_TEXT.replacen(
                "devices = [\"tablet\"]",
                &format!("devices = [\"tablet\", \"{}\"]", device.name()),
                1,
            );
            assert!(
                config::parse("a", &text).is_err(),
                "{device:?} accepted for classified"
            );
        }
    }

    #[test]
    fn every_guest_has_the_lockdown_options() {
        let cfg = shipped();
        for side in Side::ALL {
            let args = command_line(cfg.guest(side), &cfg.supervisor).unwrap();
            let line = args.join(" ");
            for needle in [
                "-nodefaults",
                "-no-user-config",
                "-monitor none",
                "-serial none",
                "-parallel none",
                "-no-reboot",
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                "-accel kvm -cpu host",
                &format!("socket,id=qmp,path=/run/airlock/{side}/qmp.sock,server=on,wait=off"),
                "-mon chardev=qmp,mode=control",
                &format!("-vnc unix:/run/airlock/{side}/display.sock"),
                &format!(
                    "socket,id=vdagent,path=/run/airlock/{side}/vdagent.sock,server=on,wait=off"
                ),
                "virtserialport,bus=vser0.0,chardev=vdagent,name=com.redhat.spice.0",
                &format!("tap,id=net0,ifname=tap-{side},script=no,downscript=no"),
                "virtio-net-pci,netdev=net0",
                &format!("format=qcow2,file=/var/lib/airlock/{side}/disk/windows.qcow2"),
                "virtio-blk-pci,drive=disk0,bootindex=1",
                &format!(
                    "if=pflash,format=raw,unit=1,file=/var/lib/airlock/{side}/disk/OVMF_VARS.fd"
                ),
            ] {
                assert!(
                    line.contains(needle),
                    "{side}: {needle:?} missing from {line}"
                );
            }
            for never in [
                "readline",
                "mux=on",
                "stdio",
                "-runas",
                "-daemonize",
                "tcp:",
                "telnet",
                "qemu-vdagent",
                "spicevmc",
                TEST_PORT,
                "qmp-test",
                "-kernel",
            ] {
                assert!(!line.contains(never), "{side}: {never:?} in {line}");
            }
            assert_eq!(args.iter().filter(|a| *a == "-serial").count(), 1);
            assert_eq!(
                args.iter().filter(|a| *a == "-mon").count(),
                1,
                "one QMP monitor, the supervisor's"
            );
        }
    }

    #[test]
    fn io_limits_appear_as_configured_on_the_drive() {
        let cfg = shipped();
        let line = joined(&cfg.general, &cfg.supervisor);
        assert!(line.contains(
            "throttling.bps-read=104857600,throttling.bps-write=52428800,throttling.iops-read=2000,throttling.iops-write=1000"
        ), "{line}");
        let mut g = cfg.general.clone();
        g.limits.io = IoLimits {
            write_iops: Some(7),
            ..IoLimits::default()
        };
        let line = joined(&g, &cfg.supervisor);
        assert!(
            line.contains("discard=unmap,throttling.iops-write=7 "),
            "{line}"
        );
        assert!(!joined(&cfg.classified, &cfg.supervisor).contains("throttling"));
    }

    #[test]
    fn memory_and_vcpus_appear_as_configured() {
        let text = crate::SHIPPED_CONFIG_TEXT.replacen(
            "memory_mib = 4096\nvcpus = 2",
            "memory_mib = 3000\nvcpus = 3",
            1,
        );
        let cfg = config::parse("a", &text).unwrap();
        assert!(joined(&cfg.classified, &cfg.supervisor).contains("-m 3000 -smp 3 "));
    }

    #[test]
    fn general_devices_only_when_listed() {
        let cfg = shipped();
        let line = joined(&cfg.general, &cfg.supervisor);
        assert!(
            line.contains("hda-output,bus=sound0.0,audiodev=audio0")
                && line.contains(",audiodev=audio0 "),
            "{line}"
        );
        assert!(!line.contains("xhci") && !line.contains("ide-cd") && !line.contains("hda-duplex"));
        let mut g = cfg.general.clone();
        g.devices = vec![Device::Usb, Device::Cdrom];
        let line = joined(&g, &cfg.supervisor);
        assert!(
            line.contains("qemu-xhci")
                && line.contains("ide-cd,drive=cd0")
                && !line.contains("hda"),
            "{line}"
        );
    }

    #[test]
    fn test_mode_adds_serial_log_and_test_port_and_allows_tcg_kernel_boot() {
        let text = r#"
[supervisor]
test_mode = true
run_dir = "/tmp/t/run"
state_dir = "/tmp/t/state"
log_dir = "/tmp/t/log"
[guest.classified]
disk = "/tmp/t/state/classified/disk/d.raw"
disk_format = "raw"
accel = "tcg"
user = "nobody"
[guest.classified.network]
enabled = false
[guest.classified.test_boot]
kernel = "/k/vmlinuz"
initrd = "/k/initrd"
append = "console=ttyS0 panic=-1"
[guest.general]
disk = "/tmp/t/state/general/disk/d.raw"
user = "nobody"
"#;
        let cfg = config::parse("t", text).unwrap();
        let line = joined(&cfg.classified, &cfg.supervisor);
        assert!(line.contains("-chardev file,id=serial0,append=on,path=/tmp/t/log/classified/serial.log -serial chardev:serial0"), "{line}");
        assert!(!line.contains("-serial none"));
        assert!(line.contains("name=org.airlock.test.0"));
        assert!(line.contains("path=/tmp/t/run/classified/qmp-test.sock,server=on,wait=off -mon chardev=qmptest,mode=control"));
        assert!(
            line.contains("-accel tcg -cpu max")
                && line.contains(
                    "-kernel /k/vmlinuz -initrd /k/initrd -append console=ttyS0 panic=-1"
                )
        );
        assert!(
            !line.contains("pflash") && !line.contains("-netdev"),
            "{line}"
        );
        // The same guest outside test mode is refused, not quietly changed.
        let mut sup = cfg.supervisor.clone();
        sup.test_mode = false;
        assert!(matches!(
            command_line(&cfg.classified, &sup),
            Err(CommandLineError::TestOnly { .. })
        ));
    }

    #[test]
    fn secure_boot_locks_the_flash_to_smm() {
        let cfg = shipped();
        assert!(!joined(&cfg.general, &cfg.supervisor).contains("cfi.pflash01"));
        let text = crate::SHIPPED_CONFIG_TEXT.replacen(
            "secure_boot = false\ntpm = false",
            "secure_boot = true\ntpm = true",
            1,
        );
        let cfg = config::parse("a", &text).unwrap();
        let line = joined(&cfg.classified, &cfg.supervisor);
        assert!(
            line.contains("-machine q35,smm=on")
                && line.contains("-global driver=cfi.pflash01,property=secure,value=on"),
            "{line}"
        );
        assert!(line.contains("tpm-crb"), "{line}");
    }

    #[test]
    fn tpm_only_when_configured() {
        let cfg = shipped();
        assert!(!joined(&cfg.classified, &cfg.supervisor).contains("tpm"));
        let mut g = cfg.classified.clone();
        g.tpm = true;
        assert!(joined(&g, &cfg.supervisor)
            .contains("-tpmdev emulator,id=tpm0,chardev=swtpm -device tpm-crb,tpmdev=tpm0"));
    }
}
