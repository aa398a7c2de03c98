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
use super::supervisor::guest;
use super::{AcceptanceOptions, Suite};
use crate::Vm;

pub const TESTS: &[&str] = &[
    "flash: each guest runs on the disk airlock flash provisioned for it",
    "flash: the provisioned machine settings are in effect (uplink addresses; labels and owners as flashed)",
];

/// The machine's settings, as IT writes them for one PC: this run's
/// uplinks (the far ends are `crate::outside`; mirrored in `network.rs`).
/// The test image ships the rest of `[network]`.
pub const MACHINE_SETTINGS: &str = r#"# Machine settings of the acceptance suite's test PC (airlock flash --machine).
[network.classified.uplink]
interface = "upclassified"
address = "192.168.77.2/24"
gateway = "192.168.77.1"

[network.general.uplink]
interface = "upgeneral"
address = "192.168.78.2/24"
gateway = "192.168.78.1"
"#;

/// Where the test image's configuration puts each guest's disk.
const GUEST_DISK: &str = "/var/lib/airlock/{side}/disk/test.raw";
const SIDES: [&str; 2] = ["classified", "general"];
/// Size of each provisioned guest disk (the test guest boots from its
/// kernel and initramfs and only reads this disk's first bytes).
const GUEST_DISK_BYTES: u64 = 4 << 20;

/// What the flash made.
pub struct Flashed {
    pub disk: PathBuf,
    /// Each side's marker: the first bytes of the disk provisioned for it.
    pub markers: Vec<(&'static str, String)>,
    pub seconds: f64,
}

/// Flashes `images.test` onto `dir/disk.raw`, a fresh file `extra` bytes
/// larger than the image, with both guest disks and [`MACHINE_SETTINGS`],
/// through the `airlock flash` command line the IT guide gives.
pub fn flash_test_machine(images: &Images, opts: &AcceptanceOptions, dir: &Path, extra: u64) -> Result<Flashed> {
    let inputs = opts.work_dir.join("provision");
    std::fs::create_dir_all(&inputs)?;
    std::fs::create_dir_all(dir)?;
    let run = std::process::id();
    let mut markers = Vec::new();
    let mut args: Vec<String> = vec!["airlock".into(), "flash".into()];
    for side in SIDES {
        let marker = format!("airlock-acceptance {side} guest disk, run {run}\n");
        let file = inputs.join(format!("{side}.raw"));
        // A disk as a Windows installation leaves it, as far as flash can
        // tell: a partition table's boot signature at byte 510 (an empty
        // MBR; the marker sits in its boot-code area).
        let mut bytes = marker.clone().into_bytes();
        bytes.resize(GUEST_DISK_BYTES as usize, 0);
        bytes[510] = 0x55;
        bytes[511] = 0xaa;
        std::fs::write(&file, bytes)?;
        args.push("--guest".into());
        args.push(format!("{side}={}", file.display()));
        markers.push((side, marker));
    }
    let machine = inputs.join("machine.toml");
    std::fs::write(&machine, MACHINE_SETTINGS)?;
    args.push("--machine".into());
    args.push(machine.display().to_string());

    let disk = dir.join("disk.raw");
    let _ = std::fs::remove_file(&disk);
    let image_bytes = std::fs::metadata(&images.test)?.len();
    std::fs::File::create(&disk)?.set_len(image_bytes + extra)?;
    args.push(images.test.display().to_string());
    args.push(disk.display().to_string());

    println!("acceptance: {}", args.join(" "));
    let start = Instant::now();
    let cli = <airlock::cli::Cli as clap::Parser>::try_parse_from(&args).context("the IT guide's airlock flash command line")?;
    airlock::run(cli).context("airlock flash")?;
    Ok(Flashed { disk, markers, seconds: start.elapsed().as_secs_f64() })
}

/// The checks on the booted, flashed test machine.
pub fn provision_checks(suite: &mut Suite, vm: &mut Vm, flashed: &Flashed) {
    suite.test(TESTS[0], || {
        let mut seen = Vec::new();
        for (side, marker) in &flashed.markers {
            let reply = guest(vm, side, "disk-head")?;
            let head = parse_disk_head(&reply).with_context(|| format!("{side} guest: disk-head answered {reply:?}"))?;
            ensure!(head.bytes == GUEST_DISK_BYTES, "the {side} guest's disk has {} bytes, the provisioned file {GUEST_DISK_BYTES}", head.bytes);
            ensure!(head.first.starts_with(marker.as_bytes()), "the {side} guest's disk starts with {:?}, not the marker flashed for it ({marker:?})", String::from_utf8_lossy(&head.first));
            let path = GUEST_DISK.replace("{side}", side);
            let holder = sh(vm, &format!("ls -l /proc/$(airlockd status | sed -n 's/.*\"{side}\":{{\"state\":\"running\",\"pid\":\\([0-9]*\\).*/\\1/p')/fd 2>/dev/null | grep -c '{path}' || true"))?;
            seen.push(format!("{side}: /dev/vda {} bytes, starts {:?}; its QEMU holds {path} ({} fd)", head.bytes, marker.trim_end(), holder.trim()));
        }
        Ok(seen.join("; "))
    });
    suite.test(TESTS[1], || {
        let provisioned = sh(vm, "cat /var/lib/airlock/provision/appliance.toml")?;
        ensure!(provisioned == MACHINE_SETTINGS, "the provisioning file on /var is not the machine file given to airlock flash:\n{provisioned}");
        let mut facts = Vec::new();
        for (iface, address) in [("upclassified", "192.168.77.2/24"), ("upgeneral", "192.168.78.2/24")] {
            let shown = sh(vm, &format!("ip -4 -o addr show dev {iface}"))?;
            ensure!(shown.contains(&format!("inet {address}")), "{iface} does not have the provisioned {address}: {shown}");
            facts.push(format!("{iface} {address}"));
        }
        let labels = sh(
            vm,
            "stat -c '%U:%G %a %C %n' /var/lib/airlock/provision/appliance.toml /var/lib/airlock/classified/disk/test.raw /var/lib/airlock/general/disk/test.raw",
        )?;
        for (line, owner, label) in [
            (0, "root:root", "airlock_conf_t"),
            (1, "airlock-classified:airlock-classified", "airlock_classified_disk_t"),
            (2, "airlock-general:airlock-general", "airlock_general_disk_t"),
        ] {
            let l = labels.lines().nth(line).unwrap_or("");
            ensure!(l.starts_with(owner) && l.contains(&format!(":{label}:")), "expected {owner} and {label}: {l:?}");
        }
        Ok(format!("provisioning file = the machine file; {}; {}", facts.join(", "), labels.trim().replace('\n', "; ")))
    });
}

/// The test guest's `disk-head` reply.
struct DiskHead {
    bytes: u64,
    first: Vec<u8>,
}

fn parse_disk_head(reply: &str) -> Option<DiskHead> {
    let mut words = reply.split_whitespace();
    if words.next()? != "disk" {
        return None;
    }
    let _name = words.next()?;
    let bytes = words.next()?.parse().ok()?;
    let hex = words.next()?;
    let first = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>()?;
    Some(DiskHead { bytes, first })
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_head_parses() {
        let d = super::parse_disk_head("disk vda 4194304 6169").unwrap();
        assert_eq!((d.bytes, d.first), (4194304, b"ai".to_vec()));
        assert!(super::parse_disk_head("error no virtio disk").is_none());
        assert!(super::parse_disk_head("disk vda x 00").is_none());
    }
}
