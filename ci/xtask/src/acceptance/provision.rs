//! The test machine made the way IT makes a PC (issue 10, `docs/it-guide.md`
//! §4): `airlock flash` of the test image onto a disk file larger than the
//! image, with a disk for each guest (`--guest`) and the machine's settings
//! (`--machine`: the two uplinks). Nothing else provisions the test image:
//! the supervisor and the host network start only because the flash left
//! `/var/lib/airlock/provision/appliance.toml` on the data partition, and
//! each test guest is given the disk the flash placed for it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::boot::sh;
use super::images::Images;
use super::supervisor::{qemu_pid, qmp};
use super::{AcceptanceOptions, Suite};
use crate::Vm;

pub const TESTS: &[&str] = &[
    "flash: each guest runs on the disk airlock flash provisioned for it",
    "flash: the provisioned machine settings are in effect (host name, uplink addresses; labels and owners as flashed, the tunnel key too)",
];

/// The machine's settings, as IT writes them for one PC
/// (`ci/test-agent/machine.toml`): the uplinks (their far ends are
/// `crate::outside`; mirrored in `network.rs`). The test image ships the
/// rest of `[network]`.
pub const MACHINE_SETTINGS: &str = include_str!("../../../test-agent/machine.toml");

/// Where the test image's configuration puts each guest's disk.
const GUEST_DISK: &str = "/var/lib/airlock/{side}/disk/test.raw";
const SIDES: [&str; 2] = ["classified", "general"];
/// Size of each provisioned guest disk.
const GUEST_DISK_BYTES: u64 = 4 << 20;

/// What the flash made.
pub struct Flashed {
    pub disk: PathBuf,
    /// Each side's provisioned guest disk: its sha256 (each file is unique
    /// to the run: a marker in its first bytes).
    pub guest_disks: Vec<(&'static str, String)>,
    /// The data partition's recovery key (`--recovery-key-out`).
    pub recovery_key: String,
    /// Each side's marker, the first bytes of its provisioned guest disk.
    pub guest_markers: Vec<(&'static str, String)>,
    pub seconds: f64,
}

/// Flashes `images.test` onto `dir/disk.raw`, a fresh file `extra` bytes
/// larger than the image, with both guest disks, [`MACHINE_SETTINGS`] and
/// the tunnel key, through the `airlock flash` command line the IT guide gives.
/// `tunnel_key` is the PC's WireGuard private key (`--wireguard-key`): the
/// outside world's tunnel peer knows its public half.
pub fn flash_test_machine(
    images: &Images,
    opts: &AcceptanceOptions,
    dir: &Path,
    extra: u64,
    tunnel_key: &Path,
) -> Result<Flashed> {
    let inputs = opts.work_dir.join("provision");
    std::fs::create_dir_all(&inputs)?;
    std::fs::create_dir_all(dir)?;
    let run = std::process::id();
    let mut guest_disks = Vec::new();
    let mut guest_markers = Vec::new();
    let mut args: Vec<String> = vec!["airlock".into(), "flash".into()];
    for side in SIDES {
        let marker = format!("airlock-acceptance {side} guest disk, run {run}\n");
        guest_markers.push((side, marker.trim_end().to_owned()));
        let file = inputs.join(format!("{side}.raw"));
        // A disk as a Windows installation leaves it, as far as flash can
        // tell: a partition table's boot signature at byte 510 (an empty
        // MBR; the marker sits in its boot-code area).
        let mut bytes = marker.into_bytes();
        bytes.resize(GUEST_DISK_BYTES as usize, 0);
        bytes[510] = 0x55;
        bytes[511] = 0xaa;
        std::fs::write(&file, bytes)?;
        args.push("--guest".into());
        args.push(format!("{side}={}", file.display()));
        let sh = xshell::Shell::new()?;
        let sum = xshell::cmd!(sh, "sha256sum {file}").quiet().read()?;
        guest_disks.push((
            side,
            sum.split_whitespace().next().unwrap_or_default().to_owned(),
        ));
    }
    // The repository's file itself, as IT would pass theirs.
    let machine =
        std::path::absolute(super::images::source_dir().join("ci/test-agent/machine.toml"))?;
    args.push("--machine".into());
    args.push(machine.display().to_string());
    args.push("--wireguard-key".into());
    args.push(tunnel_key.display().to_string());

    let start = Instant::now();
    let (disk, recovery_key) = flash(&images.test, dir, extra, args)?;
    Ok(Flashed {
        disk,
        guest_disks,
        recovery_key,
        guest_markers,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `airlock flash` (`args`: the command line up to the options) of `image`
/// onto `dir/disk.raw`, a fresh file `extra` bytes larger than the image,
/// the recovery key written to a file of IT's (`--recovery-key-out`), never
/// the PC's. Returns the disk and the recovery key.
pub fn flash(
    image: &Path,
    dir: &Path,
    extra: u64,
    mut args: Vec<String>,
) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(dir)?;
    let recovery_key_file = dir.join("recovery.key");
    let _ = std::fs::remove_file(&recovery_key_file);
    args.push("--recovery-key-out".into());
    args.push(recovery_key_file.display().to_string());
    let disk = dir.join("disk.raw");
    let _ = std::fs::remove_file(&disk);
    let image_bytes = std::fs::metadata(image)?.len();
    std::fs::File::create(&disk)?.set_len(image_bytes + extra)?;
    args.push(image.display().to_string());
    args.push(disk.display().to_string());
    println!("acceptance: {}", args.join(" "));
    let cli = <airlock::cli::Cli as clap::Parser>::try_parse_from(&args)
        .context("the IT guide's airlock flash command line")?;
    airlock::run(cli).context("airlock flash")?;
    let recovery_key = std::fs::read_to_string(&recovery_key_file)
        .context("the recovery key airlock flash wrote")?
        .trim()
        .to_owned();
    Ok((disk, recovery_key))
}

/// The checks on the booted, flashed test machine.
pub fn provision_checks(suite: &mut Suite, vm: &mut Vm, flashed: &Flashed) {
    suite.test(TESTS[0], || {
        // Seen from the appliance (the nested test guest boots from its
        // kernel and initramfs and has no block driver: its virtio disk is
        // the one QEMU opened): the guest's QEMU has the provisioned file as
        // its one disk, and that file is, byte for byte, what was given to
        // `airlock flash --guest`.
        let mut seen = Vec::new();
        for (side, sha256) in &flashed.guest_disks {
            let path = GUEST_DISK.replace("{side}", side);
            let blocks = qmp(vm, side, "query-block")?;
            let files: Vec<&str> = blocks.as_array().into_iter().flatten().filter_map(|b| b["inserted"]["file"].as_str()).collect();
            ensure!(files == [path.as_str()], "the {side} QEMU's disks are {files:?}, not the provisioned {path}");
            let pid = qemu_pid(vm, side)?;
            let held = sh(vm, &format!("ls -l /proc/{pid}/fd | grep -c ' {path}$' || true"))?;
            ensure!(held.trim() != "0", "the {side} QEMU (pid {pid}) has no descriptor open on {path}");
            let on_appliance = sh(vm, &format!("sha256sum {path}"))?;
            ensure!(on_appliance.starts_with(sha256.as_str()), "{path} on the appliance is {on_appliance:?}, the file given to airlock flash has sha256 {sha256}");
            seen.push(format!("{side}: QEMU pid {pid} has {path} as its one disk (query-block), open; sha256 {} = the --guest file's", &sha256[..16]));
        }
        Ok(seen.join("; "))
    });
    suite.test(TESTS[1], || {
        let provisioned = sh(vm, "cat /var/lib/airlock/provision/appliance.toml")?;
        ensure!(provisioned == MACHINE_SETTINGS, "the provisioning file on /var is not the machine file given to airlock flash:\n{provisioned}");
        let mut facts = Vec::new();
        // The host name is set at boot by airlock-hostname.service (the
        // image's own /etc/hostname says "airlock").
        let hostname = sh(vm, "uname -n")?;
        ensure!(hostname.trim() == "airlock-test-pc", "the host name is {:?}, not the provisioned \"airlock-test-pc\"", hostname.trim());
        let image_hostname = sh(vm, "cat /etc/hostname")?;
        facts.push(format!("host name {} (the image's /etc/hostname: {})", hostname.trim(), image_hostname.trim()));
        for (iface, address) in [("upclassified", "192.168.77.2/24"), ("upgeneral", "192.168.78.2/24")] {
            let shown = sh(vm, &format!("ip -4 -o addr show dev {iface}"))?;
            ensure!(shown.contains(&format!("inet {address}")), "{iface} does not have the provisioned {address}: {shown}");
            facts.push(format!("{iface} {address}"));
        }
        let labels = sh(
            vm,
            "stat -c '%U:%G %a %C %n' /var/lib/airlock/provision/appliance.toml /var/lib/airlock/classified/disk/test.raw /var/lib/airlock/general/disk/test.raw /var/lib/airlock/provision/wg-classified.key",
        )?;
        for (line, owner, label) in [
            (0, "root:root 600", "airlock_conf_t"),
            (1, "airlock-classified:airlock-classified 600", "airlock_classified_disk_t"),
            (2, "airlock-general:airlock-general 600", "airlock_general_disk_t"),
            (3, "root:root 600", "airlock_wg_key_t"),
        ] {
            let l = labels.lines().nth(line).unwrap_or("");
            ensure!(l.starts_with(owner) && l.contains(&format!(":{label}:")), "expected {owner} and {label}: {l:?}");
        }
        Ok(format!("provisioning file = the machine file; {}; {}", facts.join(", "), labels.trim().replace('\n', "; ")))
    });
}
