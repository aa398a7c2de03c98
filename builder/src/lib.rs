//! airlock: builds immutable two-domain appliance images.
//!
//! The pipeline (`build::build`) is a flat list of stages: rootfs →
//! overlay → policy → label → seal → uki → sign (with a Secure Boot key) →
//! disk → bundle → report.
pub mod build;
pub mod bundle;
pub mod cli;
pub mod disk;
pub mod doctor;
pub mod exec;
pub mod flash;
pub mod inspect;
pub mod manifest;
pub mod policy_query;
pub mod progress;
pub mod qemu;
pub mod rootfs;
pub mod seal;
pub mod secureboot;
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
                secure_boot: a.secure_boot_key.zip(a.secure_boot_cert),
                tpm_policy_key: a.tpm_policy_key,
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
        cli::Command::Flash(a) => {
            doctor::require(&[doctor::Need::Flash])?;
            if !doctor::is_root() {
                bail!("airlock flash needs root (block devices, loop devices, mounts)");
            }
            let report = flash::flash(&flash::FlashOptions {
                image: a.image,
                target: a.target.clone(),
                guests: a.guests,
                machine: a.machine,
                wireguard_key: a.wireguard_key,
                recovery_key_out: a.recovery_key_out,
                verbose: a.verbose,
            })?;
            for line in &report.provisioned {
                println!("airlock: provisioned {line}");
            }
            if let Some(bundle) = &report.stick {
                println!(
                    "airlock: {}: update stick with {bundle} written and verified (sha256 {}); plug it into a PC: its update agent applies it, and the new version starts at the next power-on",
                    a.target.display(),
                    report.image_sha256
                );
                return Ok(());
            }
            println!(
                "airlock: {}: flashed and verified (sha256 {}); data partition {} MiB of a {} MiB disk; slot B empty",
                a.target.display(),
                report.image_sha256,
                report.data_size >> 20,
                report.target_size >> 20
            );
            Ok(())
        }
        cli::Command::Sign(a) => {
            let signer = match (&a.key, &a.signature) {
                (Some(key), _) => bundle::Signer::Key(key),
                (None, Some(sig)) => bundle::Signer::Signature(sig),
                (None, None) => bail!("give --key or --signature"),
            };
            let (fingerprint, added) = bundle::sign_bundle(&a.bundle, signer)?;
            if added {
                println!("airlock: {}: signed by {fingerprint}", a.bundle.display());
            } else {
                println!(
                    "airlock: {}: already signed by {fingerprint}, unchanged",
                    a.bundle.display()
                );
            }
            Ok(())
        }
        cli::Command::Verify(a) => {
            let trust = bundle::load_trust(&a.keys, a.threshold)?;
            let v =
                bundle::verify_bundle(&a.bundle, &trust, &mut |line| eprintln!("airlock: {line}"))?;
            let m = &v.manifest;
            println!(
                "airlock: {}: valid: {} {} for {} (security epoch {}), signed by {} ({} of {} needed)",
                a.bundle.display(),
                m.name,
                m.version,
                m.compatible,
                m.security_epoch,
                v.signers.join(", "),
                v.signers.len(),
                trust.threshold()
            );
            Ok(())
        }
        cli::Command::Bundle(cli::BundleCommand::Manifest { bundle: path }) => {
            use std::io::Write;
            let bytes = bundle::manifest_bytes(&path)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|()| out.flush())
                .context("writing the manifest to stdout")?;
            Ok(())
        }
        cli::Command::Doctor => {
            if doctor::report() {
                Ok(())
            } else {
                bail!("some host tools are missing (see above)")
            }
        }
        cli::Command::Genkeys(a) => {
            debug_assert!(a.secure_boot);
            doctor::require(&[doctor::Need::SecureBoot])?;
            let written = secureboot::genkeys(&a.output, &a.name)?;
            for file in &written {
                println!("airlock: wrote {}", file.display());
            }
            let key =
                secureboot::load_signing_key(&a.output.join("db.key"), &a.output.join("db.crt"))?;
            println!(
                "airlock: db certificate {} (sha256 {})",
                key.subject, key.cert_sha256
            );
            println!(
                "airlock: sign builds with --secure-boot-key {0}/db.key --secure-boot-cert {0}/db.crt --tpm-policy-key {0}/tpm2-pcr-private-key.pem; enrol db.cer, KEK.cer, then PK.cer in each PC's firmware; keep PK.key and KEK.key offline",
                a.output.display()
            );
            Ok(())
        }
    }
}

fn boot(a: &cli::QemuArgs) -> Result<()> {
    doctor::require(&[doctor::Need::Boot])?;
    let qemu_bin =
        exec::find_program("qemu-system-x86_64").context("qemu-system-x86_64 not found")?;
    let dir = tempfile::tempdir().context("creating a directory for the firmware variables")?;
    let vars = dir.path().join("OVMF_VARS.fd");
    let firmware = match &a.secure_boot_keys {
        Some(keys) => {
            doctor::require(&[doctor::Need::SecureBootVm])?;
            qemu::prepare_secure_boot_firmware(&vars, keys)?
        }
        None => qemu::prepare_firmware(&vars)?,
    };
    let accel = qemu::detect_accel(&qemu_bin);
    let firmware_secure = firmware.secure_boot;
    let mut cfg = qemu::VmConfig::new(a.image.clone(), firmware, accel);
    cfg.snapshot = a.snapshot;
    cfg.memory_mib = a.memory;
    eprintln!("airlock: booting {} with {:?}{} (serial console on this terminal; quit with `poweroff` in the guest or kill QEMU)", a.image.display(), accel, if firmware_secure { ", Secure Boot on" } else { "" });
    let status = std::process::Command::new(&qemu_bin)
        .args(qemu::qemu_args(&cfg))
        .status()
        .context("starting qemu-system-x86_64")?;
    if !status.success() {
        bail!("qemu-system-x86_64 {status}");
    }
    Ok(())
}
