//! `cargo xtask bench boot`: boot-time figures of the test image, printed,
//! never asserted. Each run is a fresh power-on of a private copy of the
//! image; the medians are what to quote (these machines are noisy).
//!
//! Measured per boot: wall time from QEMU's start to the kernel's first
//! line on the serial console (firmware + boot loader + UKI), systemd's own
//! `kernel`, `initrd` and `userspace` split (`systemd-analyze time` through
//! the agent), and wall time until the agent answers (airlock.target).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::acceptance::images::private_copy;
use crate::Machine;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchBootOptions {
    /// The test-profile image to boot (`cargo xtask acceptance` builds one).
    #[arg(long, default_value = "target/acceptance/images/test/airlock_1.0.raw")]
    pub image: PathBuf,
    /// Number of boots.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// One boot's figures, in seconds.
#[derive(Debug, Default, Clone)]
struct BootFigures {
    to_kernel: f64,
    kernel: f64,
    initrd: f64,
    userspace: f64,
    to_agent: f64,
}

/// Parses systemd-analyze's "Startup finished in 7.4s (kernel) + 17.0s (initrd) + 26.7s (userspace) = …".
fn parse_analyze(line: &str) -> Option<(f64, f64, f64)> {
    let body = line.lines().next()?.split('=').next()?;
    let mut found = std::collections::HashMap::new();
    for piece in body.split(" + ") {
        let piece = piece.trim();
        let piece = piece.rsplit_once(" in ").map(|(_, rest)| rest).unwrap_or(piece);
        let (duration, name) = piece.rsplit_once(" (")?;
        found.insert(name.trim_end_matches(')').to_string(), parse_duration(duration)?);
    }
    Some((*found.get("kernel")?, *found.get("initrd")?, *found.get("userspace")?))
}

/// "1min 2.5s", "26.715s", "850ms" → seconds.
fn parse_duration(text: &str) -> Option<f64> {
    let mut total = 0.0;
    for piece in text.split_whitespace() {
        total += if let Some(v) = piece.strip_suffix("min") {
            v.parse::<f64>().ok()? * 60.0
        } else if let Some(v) = piece.strip_suffix("ms") {
            v.parse::<f64>().ok()? / 1000.0
        } else {
            piece.strip_suffix('s')?.parse::<f64>().ok()?
        };
    }
    Some(total)
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

pub fn boot(opts: &BenchBootOptions) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("airlock-bench-").tempdir_in("/var/tmp")?;
    let mut figures = Vec::new();
    for run in 1..=opts.runs {
        let disk = private_copy(&opts.image, dir.path(), "disk.raw")?;
        let vars = dir.path().join("OVMF_VARS.fd");
        let _ = std::fs::remove_file(&vars);
        let machine = Machine::new(&disk, &vars)?;
        let start = Instant::now();
        let mut vm = machine.boot()?;
        vm.wait_for_serial("Linux version", Duration::from_secs(300)).context("waiting for the kernel")?;
        let to_kernel = start.elapsed().as_secs_f64();
        vm.agent()?.wait_ready(Duration::from_secs(600))?;
        let to_agent = start.elapsed().as_secs_f64();
        let out = vm.agent()?.run(&["systemd-analyze", "time"], Duration::from_secs(60))?;
        let (kernel, initrd, userspace) = parse_analyze(&out.stdout)
            .with_context(|| format!("unexpected systemd-analyze output: {}", out.stdout))?;
        let f = BootFigures { to_kernel, kernel, initrd, userspace, to_agent };
        println!(
            "bench boot: run {run}: QEMU start → kernel {:.1}s; kernel {:.1}s + initrd {:.1}s + userspace {:.1}s; QEMU start → airlock.target (agent) {:.1}s",
            f.to_kernel, f.kernel, f.initrd, f.userspace, f.to_agent
        );
        figures.push(f);
    }
    let m = |get: fn(&BootFigures) -> f64| median(figures.iter().map(get).collect());
    println!(
        "bench boot: median of {} ({:?}): QEMU start → kernel {:.1}s; kernel {:.1}s; initrd {:.1}s; userspace {:.1}s; QEMU start → airlock.target {:.1}s",
        figures.len(),
        Machine::new(&opts.image, &dir.path().join("probe-vars.fd"))?.accel(),
        m(|f| f.to_kernel),
        m(|f| f.kernel),
        m(|f| f.initrd),
        m(|f| f.userspace),
        m(|f| f.to_agent)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_systemd_analyze_time() {
        let line = "Startup finished in 7.436s (kernel) + 17.052s (initrd) + 26.715s (userspace) = 51.204s\n";
        assert_eq!(parse_analyze(line), Some((7.436, 17.052, 26.715)));
        let long = "Startup finished in 9.9s (kernel) + 1min 2.5s (initrd) + 850ms (userspace) = 1min 13s";
        let (k, i, u) = parse_analyze(long).unwrap();
        assert_eq!((k, u), (9.9, 0.85));
        assert!((i - 62.5).abs() < 1e-9);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
