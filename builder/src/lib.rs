//! airlock: builds immutable two-domain appliance images.
//!
//! The pipeline (`build::build`) is a flat list of stages: rootfs →
//! overlay → policy → label → seal → uki → disk → report.
pub mod build;
pub mod cli;
pub mod disk;
pub mod doctor;
pub mod exec;
pub mod inspect;
pub mod manifest;
pub mod policy_query;
pub mod progress;
pub mod qemu;
pub mod rootfs;
pub mod seal;
pub mod tree;

use anyhow::{bail, Context, Result};

/// Runs one parsed command line.
pub fn run(cli: cli::Cli) -> Result<()> {
    match cli.command {
        cli::Command::Build(a) => {
            build::build(&build::BuildOptions {
                manifest_path: a.manifest,
                output: a.output,
                cache: a.cache_dir,
                source: a.source,
                profile: a.profile,
                reuse_trees: !a.fresh,
                reuse_output: a.reuse,
                extra_overlays: a.extra_overlays,
                extra_policy_dirs: a.extra_policy_dirs,
                verbose: a.verbose,
            })?;
            Ok(())
        }
        cli::Command::Inspect(a) => {
            let inspection = inspect::inspect(&a.image)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&inspection)?);
            } else {
                inspect::print_human(&inspection);
            }
            Ok(())
        }
        cli::Command::Qemu(a) => boot(&a),
        cli::Command::Doctor => {
            if doctor::report() {
                Ok(())
            } else {
                bail!("some host tools are missing (see above)")
            }
        }
    }
}

fn boot(a: &cli::QemuArgs) -> Result<()> {
    doctor::require(&[doctor::Need::Boot])?;
    let qemu_bin = exec::find_program("qemu-system-x86_64").context("qemu-system-x86_64 not found")?;
    let dir = tempfile::tempdir().context("creating a directory for the firmware variables")?;
    let firmware = qemu::prepare_firmware(&dir.path().join("OVMF_VARS.fd"))?;
    let accel = qemu::detect_accel(&qemu_bin);
    let mut cfg = qemu::VmConfig::new(a.image.clone(), firmware, accel);
    cfg.snapshot = a.snapshot;
    cfg.memory_mib = a.memory;
    eprintln!("airlock: booting {} with {:?} (serial console on this terminal; quit with `poweroff` in the guest or kill QEMU)", a.image.display(), accel);
    let status = std::process::Command::new(&qemu_bin)
        .args(qemu::qemu_args(&cfg))
        .status()
        .context("starting qemu-system-x86_64")?;
    if !status.success() {
        bail!("qemu-system-x86_64 {status}");
    }
    Ok(())
}
