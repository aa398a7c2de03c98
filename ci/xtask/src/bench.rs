//! `cargo xtask bench boot`: boot-time figures, printed, never asserted.
//! The production image and a plain Debian image (same package tree,
//! kernel, initrd and boot loader; no SELinux, no verity, no lockdown — see
//! `plain.rs`) are each powered on `--runs` times from a fresh copy, and
//! the serial console gives the wall time from QEMU's start to the kernel,
//! to the real root's userspace (its systemd's "Welcome to"), and to the
//! boot target. Medians and ratios are what to quote (these machines are
//! noisy).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::acceptance::images::private_copy;
use crate::Machine;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchBootOptions {
    /// The production image (`cargo xtask acceptance` builds one).
    #[arg(
        long,
        default_value = "target/acceptance/images/production/airlock_1.0.raw"
    )]
    pub image: PathBuf,
    /// Manifest whose cached package tree the plain image is made from.
    #[arg(long, default_value = "examples/debian.toml")]
    pub manifest: PathBuf,
    #[arg(long, default_value = airlock::cli::DEFAULT_CACHE)]
    pub cache_dir: PathBuf,
    /// Boots per image.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// One boot's figures: seconds from QEMU's start.
#[derive(Debug, Default, Clone)]
struct BootFigures {
    kernel: f64,
    userspace: f64,
    target: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn measure(
    image: &std::path::Path,
    target_marker: &str,
    dir: &std::path::Path,
) -> Result<BootFigures> {
    let disk = private_copy(image, dir, "disk.raw")?;
    let vars = dir.join("OVMF_VARS.fd");
    let _ = std::fs::remove_file(&vars);
    let machine = Machine::new(&disk, &vars)?;
    let start = Instant::now();
    let vm = machine.boot()?;
    let at = vm
        .wait_for_serial_from(0, "Linux version", BOOT_TIMEOUT)
        .context("waiting for the kernel")?;
    let kernel = start.elapsed().as_secs_f64();
    // The initrd stays silent; "Welcome to …" comes from the real root's systemd.
    vm.wait_for_serial_from(at, "Welcome to", BOOT_TIMEOUT)
        .context("waiting for the real root's systemd")?;
    let userspace = start.elapsed().as_secs_f64();
    vm.wait_for_serial_from(0, target_marker, BOOT_TIMEOUT)
        .with_context(|| format!("waiting for `{target_marker}`"))?;
    let target = start.elapsed().as_secs_f64();
    Ok(BootFigures {
        kernel,
        userspace,
        target,
    })
}

pub fn boot(opts: &BenchBootOptions) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("airlock-bench-")
        .tempdir_in("/var/tmp")?;
    let source = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    println!("bench boot: making the plain Debian image from the cached tree");
    let plain = crate::plain::build_plain_image(
        &source,
        &opts.manifest,
        &opts.cache_dir,
        &dir.path().join("plain"),
    )?;
    let accel = Machine::new(&opts.image, &dir.path().join("probe-vars.fd"))?.accel();
    let kinds = [
        (
            "airlock",
            opts.image.clone(),
            "Reached target airlock.target",
        ),
        ("plain Debian", plain, "Reached target multi-user.target"),
    ];
    let mut medians = Vec::new();
    for (name, image, marker) in &kinds {
        let mut figures = Vec::new();
        for run in 1..=opts.runs {
            let f = measure(image, marker, &dir.path().join("machine"))?;
            println!(
                "bench boot: {name} run {run}: kernel {:.1}s, userspace {:.1}s, target {:.1}s",
                f.kernel, f.userspace, f.target
            );
            figures.push(f);
        }
        let m = |get: fn(&BootFigures) -> f64| median(figures.iter().map(get).collect());
        let med = BootFigures {
            kernel: m(|f| f.kernel),
            userspace: m(|f| f.userspace),
            target: m(|f| f.target),
        };
        println!(
            "bench boot: {name}: median of {} ({accel:?}) from QEMU start: kernel {:.1}s, userspace {:.1}s, `{marker}` {:.1}s",
            figures.len(),
            med.kernel,
            med.userspace,
            med.target
        );
        medians.push(med);
    }
    let (ours, plain) = (&medians[0], &medians[1]);
    println!(
        "bench boot: ratio airlock / plain Debian: kernel {:.2}, userspace {:.2}, target {:.2}",
        ours.kernel / plain.kernel,
        ours.userspace / plain.userspace,
        ours.target / plain.target
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchSealedOptions {
    /// The test image (`cargo xtask acceptance` builds one, signed with the
    /// suite's Secure Boot and PCR policy keys in `--keys`).
    #[arg(long, default_value = "target/acceptance/images/test/airlock_1.0.raw")]
    pub image: PathBuf,
    /// The suite's Secure Boot keys (`airlock genkeys --secure-boot`).
    #[arg(long, default_value = "target/acceptance/secure-boot-keys")]
    pub keys: PathBuf,
    /// Boots after the first (each one opens /var with the TPM).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// MiB read and written by each throughput figure.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
}

/// Seconds a unit took to start in this boot (inactive → active), from
/// systemd's monotonic timestamps; `None` if it did not start.
fn unit_start_seconds(vm: &mut crate::Vm, unit: &str) -> Result<Option<f64>> {
    let out = crate::acceptance::boot_sh(
        vm,
        &format!("systemctl show -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic --value {unit}"),
    )?;
    let values: Vec<u64> = out
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    Ok(match values.as_slice() {
        [exit, enter] if *exit > 0 && *enter >= *exit => Some((enter - exit) as f64 / 1e6),
        _ => None,
    })
}

/// `dd`'s throughput line (the last line of its stderr, merged), in MB/s.
fn dd_mb_per_s(vm: &mut crate::Vm, args: &str) -> Result<f64> {
    let out = crate::acceptance::boot_sh(
        vm,
        &format!("dd {args} status=none; dd {args} 2>&1 | tail -n 1"),
    )?;
    let line = out.lines().last().unwrap_or_default();
    // "268435456 bytes (268 MB, 256 MiB) copied, 1.23 s, 218 MB/s"
    let seconds: f64 = line
        .split(", ")
        .find_map(|f| f.strip_suffix(" s"))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("dd printed {line:?}"))?;
    let bytes: f64 = line
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .with_context(|| format!("dd printed {line:?}"))?;
    anyhow::ensure!(bytes > 0.0, "dd copied nothing: {line:?}");
    Ok(bytes / seconds / 1e6)
}

/// `cargo xtask bench sealed`: the cost of the sealed /var under this
/// emulator. The test image is flashed (`airlock flash`, no provisioning)
/// and booted with Secure Boot and a fresh TPM: the first boot opens /var
/// with the one-time empty passphrase (no TPM step) and seals it; each
/// later boot opens it with the TPM. Printed: systemd-cryptsetup@var's
/// start time per boot, airlock-seal's, their medians; then, in the last
/// boot, reads and writes of the same blocks through dm-crypt and of the
/// raw partition under it (O_DIRECT), and the ratios. Nothing is asserted.
pub fn sealed(opts: &BenchSealedOptions) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("airlock-bench-sealed-")
        .tempdir_in("/var/tmp")?;
    let (disk, _recovery) = crate::acceptance::flash_unprovisioned(&opts.image, dir.path())?;
    let vars = dir.path().join("OVMF_VARS.fd");
    let keys = std::path::absolute(&opts.keys)?;
    let tpm = dir.path().join("tpm");
    std::fs::create_dir_all(&tpm)?;
    let machine = Machine::with_secure_boot(&disk, &vars, &keys)?.with_tpm(&tpm);
    let accel = machine.accel();
    let mut vm = machine.boot()?;
    let mut boot_id = vm.agent()?.wait_ready(BOOT_TIMEOUT)?;
    let first = unit_start_seconds(&mut vm, "systemd-cryptsetup@var.service")?
        .context("systemd-cryptsetup@var did not start in the first boot")?;
    let seal = unit_start_seconds(&mut vm, "airlock-seal.service")?
        .context("airlock-seal did not run in the first boot")?;
    println!("bench sealed: boot 1 (empty passphrase, no TPM step): systemd-cryptsetup@var {first:.2}s; airlock-seal (enrol the TPM) {seal:.2}s");
    let mut tpm_unlocks = Vec::new();
    for run in 1..=opts.runs {
        let _ = vm
            .agent()?
            .run(&["systemctl", "reboot"], Duration::from_secs(20));
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(!left.is_zero(), "no new boot after the reboot");
            match vm.agent()?.wait_ready(left) {
                Ok(id) if id != boot_id => {
                    boot_id = id;
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        let t = unit_start_seconds(&mut vm, "systemd-cryptsetup@var.service")?
            .context("systemd-cryptsetup@var did not start")?;
        println!(
            "bench sealed: boot {} (TPM): systemd-cryptsetup@var {t:.2}s",
            run + 1
        );
        tpm_unlocks.push(t);
    }
    let tpm_median = median(tpm_unlocks.clone());
    println!(
        "bench sealed: systemd-cryptsetup@var ({accel:?}): empty passphrase {first:.2}s (one boot), TPM median {tpm_median:.2}s of {}; TPM / empty {:.2}",
        tpm_unlocks.len(),
        tpm_median / first
    );
    let mib = opts.mib;
    // Reads: the same bytes, decrypted by dm-crypt or raw (the data segment
    // starts 16 MiB into the partition).
    let crypt_read = dd_mb_per_s(
        &mut vm,
        &format!("if=/dev/mapper/var of=/dev/null bs=1M count={mib} iflag=direct"),
    )?;
    let raw_read = dd_mb_per_s(
        &mut vm,
        &format!(
            "if=/dev/disk/by-partlabel/data of=/dev/null bs=1M count={mib} skip=16 iflag=direct"
        ),
    )?;
    println!("bench sealed: read {mib} MiB: dm-crypt {crypt_read:.0} MB/s, raw partition {raw_read:.0} MB/s; encrypted / plain {:.2}", crypt_read / raw_read);
    // Writes: the same blocks, through dm-crypt and raw, 64 MiB into the
    // segment (this throwaway disk's /var is overwritten: the last step).
    // Slot B is no plain target: only the update agent may write it.
    let crypt_write = dd_mb_per_s(
        &mut vm,
        &format!(
            "if=/dev/zero of=/dev/mapper/var bs=1M count={mib} seek=64 oflag=direct conv=fsync"
        ),
    )?;
    let raw_write = dd_mb_per_s(&mut vm, &format!("if=/dev/zero of=/dev/disk/by-partlabel/data bs=1M count={mib} seek=80 oflag=direct conv=fsync"))?;
    println!("bench sealed: write {mib} MiB: dm-crypt {crypt_write:.0} MB/s, raw partition {raw_write:.0} MB/s; encrypted / plain {:.2}", crypt_write / raw_write);
    println!("bench sealed: each dd ran twice (the first warms the cache); figures from the second; one machine, {accel:?}; quote ratios, not absolutes");
    Ok(())
}
