//! Booting a built image under QEMU: the pure decision of which arguments to
//! pass (`qemu_args`), the accelerator probe, and OVMF discovery.
//!
//! Used by `airlock qemu` and by the acceptance suite in `ci/xtask`, so both
//! boot images the same way: q35, OVMF, one virtio disk, nothing else unless
//! asked for (`-nodefaults`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Name of the virtio-serial port the test agent listens on inside test images.
pub const TEST_AGENT_PORT: &str = "org.airlock.test.0";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Where the guest's first serial port (the kernel console) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// Interactive: serial and QEMU's stdio multiplexed (`airlock qemu`).
    Stdio,
    /// Appended to a file (tests read it).
    File(PathBuf),
}

/// Emulated graphics card. `None` keeps the VM headless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graphics {
    None,
    /// Standard VGA (bochs-drm in the guest): `screendump` captures it.
    Std,
}

/// The OVMF firmware pair. `vars` must be a private, writable copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars: PathBuf,
    /// The Secure Boot build of OVMF: its flash is writable from SMM only
    /// (QEMU `cfi.pflash01` `secure=on`), so the OS cannot change the keys.
    pub secure_boot: bool,
}

/// Everything that decides a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub disk: PathBuf,
    /// Discard all writes to the disk (QEMU `snapshot=on`).
    pub snapshot: bool,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub firmware: Firmware,
    pub serial: Serial,
    pub graphics: Graphics,
    /// QMP control socket (server, no wait).
    pub qmp_socket: Option<PathBuf>,
    /// Unix socket bridged to the in-guest test agent's virtio-serial port.
    pub agent_socket: Option<PathBuf>,
    /// Fixed SMBIOS system UUID, so the guest keeps one machine ID across boots.
    pub uuid: Option<String>,
    /// Further raw disks, attached as virtio block devices.
    pub extra_disks: Vec<PathBuf>,
    /// Further NICs, each a `virtio-net-pci` on a QEMU `-netdev` whose id
    /// is `netN`.
    pub extra_netdevs: Vec<Nic>,
    /// An empty USB 3 controller (`qemu-xhci`, id `usb`), for USB disks
    /// plugged in later through QMP (bus `usb.0`).
    pub usb_controller: bool,
    /// A TPM 2.0 (`tpm-crb`, as on PCs) backed by the swtpm whose control
    /// socket this is (`swtpm socket --tpm2 --ctrl type=unixio,path=…`).
    pub tpm_socket: Option<PathBuf>,
}

/// One NIC: its `-netdev` backend (without `id=`), and a fixed MAC address
/// (the guest's udev names a NIC by it) or QEMU's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub netdev: String,
    pub mac: Option<String>,
}

impl VmConfig {
    /// A headless VM with sensible defaults for this image.
    pub fn new(disk: PathBuf, firmware: Firmware, accel: Accel) -> Self {
        VmConfig {
            disk,
            snapshot: false,
            accel,
            memory_mib: 2048,
            cpus: 2,
            firmware,
            serial: Serial::Stdio,
            graphics: Graphics::None,
            qmp_socket: None,
            agent_socket: None,
            uuid: None,
            extra_disks: Vec::new(),
            extra_netdevs: Vec::new(),
            usb_controller: false,
            tpm_socket: None,
        }
    }
}

fn arg(list: &mut Vec<OsString>, items: &[&str]) {
    list.extend(items.iter().map(OsString::from));
}

fn path_opt(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.as_os_str());
    s
}

/// The argument list (without the program name) for `qemu-system-x86_64`.
pub fn qemu_args(cfg: &VmConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    arg(
        &mut a,
        &["-nodefaults", "-no-user-config", "-machine", MACHINE],
    );
    match cfg.accel {
        // `-cpu max` under TCG emulates AMD SVM, so the appliance's own guests
        // get nested KVM even when the outer VM is emulated.
        Accel::Tcg => arg(&mut a, &["-accel", "tcg", "-cpu", "max"]),
        Accel::Kvm => arg(&mut a, &["-accel", "kvm", "-cpu", "host"]),
    }
    arg(
        &mut a,
        &[
            "-m",
            &cfg.memory_mib.to_string(),
            "-smp",
            &cfg.cpus.to_string(),
        ],
    );
    if cfg.firmware.secure_boot {
        arg(
            &mut a,
            &["-global", "driver=cfi.pflash01,property=secure,value=on"],
        );
    }
    a.push("-drive".into());
    a.push(path_opt(
        "if=pflash,format=raw,unit=0,readonly=on,file=",
        &cfg.firmware.code,
    ));
    a.push("-drive".into());
    a.push(path_opt(
        "if=pflash,format=raw,unit=1,file=",
        &cfg.firmware.vars,
    ));
    a.push("-drive".into());
    let mut disk = path_opt("if=none,id=disk0,format=raw,file=", &cfg.disk);
    if cfg.snapshot {
        disk.push(",snapshot=on");
    }
    a.push(disk);
    arg(
        &mut a,
        &["-device", "virtio-blk-pci,drive=disk0,bootindex=1"],
    );
    for (i, extra) in cfg.extra_disks.iter().enumerate() {
        a.push("-drive".into());
        a.push(path_opt(
            &format!("if=none,id=extra{i},format=raw,file="),
            extra,
        ));
        arg(
            &mut a,
            &["-device", &format!("virtio-blk-pci,drive=extra{i}")],
        );
    }
    if cfg.usb_controller {
        arg(&mut a, &["-device", "qemu-xhci,id=usb"]);
    }
    if let Some(socket) = &cfg.tpm_socket {
        a.push("-chardev".into());
        a.push(path_opt("socket,id=chrtpm,path=", socket));
        arg(
            &mut a,
            &[
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-crb,tpmdev=tpm0",
            ],
        );
    }
    for (i, nic) in cfg.extra_netdevs.iter().enumerate() {
        arg(&mut a, &["-netdev", &format!("{},id=net{i}", nic.netdev)]);
        let mac = nic
            .mac
            .as_ref()
            .map_or(String::new(), |m| format!(",mac={m}"));
        arg(
            &mut a,
            &["-device", &format!("virtio-net-pci,netdev=net{i}{mac}")],
        );
    }
    match &cfg.serial {
        // No multiplexing: the human monitor (Ctrl-A c) is never reachable.
        Serial::Stdio => arg(
            &mut a,
            &[
                "-chardev",
                "stdio,id=con0,signal=off",
                "-serial",
                "chardev:con0",
            ],
        ),
        Serial::File(path) => {
            a.push("-chardev".into());
            a.push(path_opt("file,id=con0,append=on,path=", path));
            arg(&mut a, &["-serial", "chardev:con0"]);
        }
    }
    match cfg.graphics {
        Graphics::None => arg(&mut a, &["-display", "none"]),
        Graphics::Std => arg(&mut a, &["-display", "none", "-vga", "std"]),
    }
    if let Some(qmp) = &cfg.qmp_socket {
        a.push("-chardev".into());
        a.push(path_opt("socket,id=qmp0,server=on,wait=off,path=", qmp));
        arg(&mut a, &["-mon", "chardev=qmp0,mode=control"]);
    }
    if let Some(agent) = &cfg.agent_socket {
        a.push("-chardev".into());
        a.push(path_opt("socket,id=agent0,server=on,wait=off,path=", agent));
        arg(
            &mut a,
            &[
                "-device",
                "virtio-serial-pci,id=vser0",
                "-device",
                &format!("virtserialport,bus=vser0.0,chardev=agent0,name={TEST_AGENT_PORT}"),
            ],
        );
    }
    if let Some(uuid) = &cfg.uuid {
        arg(&mut a, &["-uuid", uuid]);
    }
    // Entropy for the guest's early boot (systemd-random-seed, dm-verity setup).
    arg(&mut a, &["-device", "virtio-rng-pci"]);
    a
}

/// Well-known places of the OVMF pair (Debian `ovmf`, Fedora `edk2-ovmf`).
const OVMF_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// The installed OVMF pair: (code, variable-store template).
pub fn find_ovmf() -> Result<(PathBuf, PathBuf)> {
    find_firmware(OVMF_CANDIDATES, "OVMF firmware")
}

/// The first of `candidates` (code, variable-store template) installed.
fn find_firmware(candidates: &[(&str, &str)], what: &str) -> Result<(PathBuf, PathBuf)> {
    candidates
        .iter()
        .find(|(code, vars)| Path::new(code).exists() && Path::new(vars).exists())
        .map(|(code, vars)| (PathBuf::from(code), PathBuf::from(vars)))
        .with_context(|| {
            format!(
                "no {what} found (looked for {}); install Debian package `ovmf` or Fedora package `edk2-ovmf`",
                candidates.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
            )
        })
}

/// Finds OVMF and gives `vars` a variable store: a fresh copy of the
/// template, unless `vars` already exists (a machine booted before keeps its
/// firmware variables, e.g. boot counting, across boots).
pub fn prepare_firmware(vars: &Path) -> Result<Firmware> {
    let (code, template) = find_ovmf()?;
    if !vars.exists() {
        std::fs::copy(&template, vars).with_context(|| {
            format!(
                "copying OVMF variables {} to {}",
                template.display(),
                vars.display()
            )
        })?;
    }
    Ok(Firmware {
        code,
        vars: vars.to_path_buf(),
        secure_boot: false,
    })
}

/// Well-known places of OVMF's Secure Boot build and its empty variable
/// store (no keys enrolled: setup mode).
const OVMF_SECURE_BOOT_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
];

/// OVMF with Secure Boot on and the keys of `airlock genkeys --secure-boot`
/// (directory `keys`) enrolled: PK, KEK and db, with the directory's owner
/// GUID, written into `vars` by `virt-fw-vars` (python3-virt-firmware) —
/// unless `vars` exists, as for [`prepare_firmware`]. A PC's firmware set
/// up the same way boots only what the db key signed.
pub fn prepare_secure_boot_firmware(vars: &Path, keys: &Path) -> Result<Firmware> {
    let (code, template) = find_firmware(OVMF_SECURE_BOOT_CANDIDATES, "Secure Boot OVMF")?;
    if !vars.exists() {
        let guid = crate::secureboot::read_guid(keys)?.to_string();
        let cert = |role: &str| keys.join(format!("{role}.crt"));
        let (pk, kek, db) = (cert("PK"), cert("KEK"), cert("db"));
        let partial = vars.with_extension("partial");
        let sh = xshell::Shell::new()?;
        // virt-fw-vars logs every step on stderr: shown only if it fails.
        let out = xshell::cmd!(
            sh,
            "virt-fw-vars --input {template} --set-pk {guid} {pk} --add-kek {guid} {kek} --add-db {guid} {db} --sb --output {partial}"
        )
        .quiet()
        .ignore_status()
        .output()
        .context("running virt-fw-vars (Debian package python3-virt-firmware from bookworm-backports, or `pip install virt-firmware`)")?;
        if !out.status.success() {
            anyhow::bail!(
                "enrolling the Secure Boot keys of {} into {}: virt-fw-vars {}: {}",
                keys.display(),
                vars.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&partial, vars)?;
    }
    Ok(Firmware {
        code,
        vars: vars.to_path_buf(),
        secure_boot: true,
    })
}

/// A 64 KiB firmware image whose reset vector writes 0x2a to the
/// `isa-debug-exit` port and halts: QEMU then exits with status 85.
fn probe_firmware() -> Vec<u8> {
    let mut rom = vec![0xf4u8; 64 * 1024]; // hlt everywhere
                                           // At the reset vector (0xFFFF0, i.e. 16 bytes before the end):
                                           // mov al,0x2a ; mov dx,0x501 ; out dx,al ; hlt
    let code = [0xb0, 0x2a, 0xba, 0x01, 0x05, 0xee, 0xf4];
    let at = rom.len() - 16;
    rom[at..at + code.len()].copy_from_slice(&code);
    rom
}

/// Exit status QEMU reports when the probe firmware ran to its end.
const PROBE_EXIT_STATUS: i32 = (0x2a << 1) | 1;

/// The machine model of every boot: q35 with System Management Mode, which
/// OVMF's variable store needs (and the Secure Boot firmware insists on).
const MACHINE: &str = "q35,smm=on";

/// KVM when it can really run a guest here, TCG otherwise.
///
/// `/dev/kvm` existing is not enough (on the build machines it exists but
/// fails: "KVM internal error", or an MSR assertion with `-cpu host`; on
/// one, a bare q35 ran under KVM but "System Management Mode not supported
/// by this hypervisor" refused the real machine), so this boots a
/// 7-instruction firmware with the same accelerator, CPU and machine model
/// as a real boot and checks that it ran. `AIRLOCK_ACCEL=kvm|tcg`
/// overrides.
pub fn detect_accel(qemu: &Path) -> Accel {
    match std::env::var("AIRLOCK_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let Ok(dir) = tempfile::tempdir() else {
        return Accel::Tcg;
    };
    let rom = dir.path().join("probe.rom");
    if std::fs::write(&rom, probe_firmware()).is_err() {
        return Accel::Tcg;
    }
    let status = std::process::Command::new(qemu)
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-machine",
            MACHINE,
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=1",
            "-bios",
        ])
        .arg(&rom)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.code() == Some(PROBE_EXIT_STATUS) => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig::new(
            "/img/a.raw".into(),
            Firmware {
                code: "/fw/code.fd".into(),
                vars: "/tmp/vars.fd".into(),
                secure_boot: false,
            },
            Accel::Tcg,
        )
    }

    fn joined(cfg: &VmConfig) -> String {
        qemu_args(cfg)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_uses_cpu_max_for_nested_virtualisation() {
        assert!(joined(&base()).contains("-accel tcg -cpu max"));
    }

    #[test]
    fn no_default_devices_and_no_human_monitor() {
        let args = joined(&base());
        assert!(args.starts_with("-nodefaults"));
        assert!(!args.contains("mux=on"));
        assert!(!args.contains("mode=readline"));
    }

    #[test]
    fn snapshot_only_when_asked() {
        assert!(!joined(&base()).contains("snapshot=on"));
        let mut cfg = base();
        cfg.snapshot = true;
        assert!(joined(&cfg).contains("file=/img/a.raw,snapshot=on"));
    }

    #[test]
    fn agent_port_has_the_agreed_name() {
        let mut cfg = base();
        cfg.agent_socket = Some("/run/a.sock".into());
        assert!(joined(&cfg).contains("name=org.airlock.test.0"));
    }

    #[test]
    fn extra_nics_get_numbered_netdevs_and_their_macs() {
        let mut cfg = base();
        assert!(
            !joined(&cfg).contains("virtio-net-pci"),
            "no NIC unless asked for"
        );
        cfg.extra_netdevs = vec![
            Nic {
                netdev: "tap,ifname=a,script=no,downscript=no".into(),
                mac: Some("52:54:00:77:00:02".into()),
            },
            Nic {
                netdev: "user".into(),
                mac: None,
            },
        ];
        let args = joined(&cfg);
        assert!(args.contains("-netdev tap,ifname=a,script=no,downscript=no,id=net0 -device virtio-net-pci,netdev=net0,mac=52:54:00:77:00:02 "), "{args}");
        assert!(
            args.contains("-netdev user,id=net1 -device virtio-net-pci,netdev=net1 "),
            "{args}"
        );
    }

    #[test]
    fn secure_boot_firmware_locks_its_flash_to_smm() {
        assert!(!joined(&base()).contains("secure=on"));
        let mut cfg = base();
        cfg.firmware.secure_boot = true;
        let args = joined(&cfg);
        assert!(args.contains("-machine q35,smm=on"), "{args}");
        assert!(
            args.contains("-global driver=cfi.pflash01,property=secure,value=on -drive if=pflash"),
            "{args}"
        );
    }

    #[test]
    fn a_tpm_only_when_asked_and_then_on_the_crb_interface() {
        assert!(!joined(&base()).contains("tpm"));
        let mut cfg = base();
        cfg.tpm_socket = Some("/run/t/swtpm.sock".into());
        assert!(joined(&cfg).contains("-chardev socket,id=chrtpm,path=/run/t/swtpm.sock -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0"));
    }

    #[test]
    fn probe_firmware_has_reset_vector_code() {
        let rom = probe_firmware();
        assert_eq!(rom.len(), 65536);
        assert_eq!(
            &rom[0xfff0..0xfff7],
            &[0xb0, 0x2a, 0xba, 0x01, 0x05, 0xee, 0xf4]
        );
    }
}
