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
