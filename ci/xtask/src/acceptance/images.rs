//! The images the suite boots, built (or reused when their inputs did not
//! change) with the real builder, and the checks that need only the image
//! file: tools we did not write agree with it, the production image lacks
//! the test agent, the same inputs give the same root hash.

use std::path::{Path, PathBuf};
use std::time::Instant;

use airlock::build::{BuildOptions, Profile, Report};
use anyhow::{bail, ensure, Context, Result};
use xshell::{cmd, Shell};

use super::{AcceptanceOptions, Suite};

/// The manifest CI builds.
pub const MANIFEST: &str = "examples/debian.toml";

/// Built images and their reports.
pub struct Images {
    pub test: PathBuf,
    pub test_report: Report,
    pub production: PathBuf,
    pub production_report: Report,
    /// Seconds each build took in this run (0 when reused unchanged).
    pub build_seconds: Vec<(String, f64)>,
}

pub fn source_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// An overlay with the nested test guests' kernel and initramfs
/// (`/usr/lib/airlock/test-guest/`, named by the test profile's
/// `/etc/airlock/appliance.toml`), made by `ci/test-guest`.
fn test_guest_overlay(opts: &AcceptanceOptions) -> Result<PathBuf> {
    let root = opts.work_dir.join("test-guest-overlay");
    let dir = root.join("usr/lib/airlock/test-guest");
    std::fs::create_dir_all(&dir)?;
    let image = airlock_test_guest::image::prepare(&dir)
        .map_err(|e| anyhow::anyhow!("making the test guest: {e}"))?;
    std::fs::copy(&image.kernel.vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", image.kernel.vmlinuz.display()))?;
    println!(
        "acceptance: test guest: kernel {} ({}), modules {:?}",
        image.kernel.vmlinuz.display(),
        image.kernel.source,
        image.modules
    );
    Ok(root)
}

/// The suite's Secure Boot keys (`airlock genkeys --secure-boot`, made on
/// the first run and kept in the work directory: never committed). The
/// production image is signed with their db key; the production machine's
/// firmware has them enrolled.
pub fn secure_boot_keys(opts: &AcceptanceOptions) -> Result<PathBuf> {
    let dir = std::path::absolute(opts.work_dir.join("secure-boot-keys"))?;
    let complete = airlock::secureboot::ROLES
        .iter()
        .all(|r| dir.join(format!("{r}.key")).is_file() && dir.join(format!("{r}.crt")).is_file())
        && dir.join(airlock::secureboot::GUID_FILE).is_file()
        && dir.join(airlock::secureboot::PCR_PRIVATE_KEY).is_file();
    if !complete {
        // A run killed half-way through genkeys: start again.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        airlock::secureboot::genkeys(&dir, "airlock acceptance")
            .context("making the suite's Secure Boot keys")?;
    }
    Ok(dir)
}

/// The suite's update signing key (ed25519, made with `ssh-keygen` on the
/// first run and kept in the work directory: never committed) and the
/// `allowed_signers` file that the test image trusts.
pub struct UpdateKey {
    pub private: PathBuf,
    pub allowed_signers: PathBuf,
}

pub fn update_key(opts: &AcceptanceOptions) -> Result<UpdateKey> {
    let dir = std::path::absolute(opts.work_dir.join("update-key"))?;
    let key = UpdateKey {
        private: dir.join("id_ed25519"),
        allowed_signers: dir.join("allowed_signers"),
    };
    if key.private.is_file() && key.allowed_signers.is_file() {
        return Ok(key);
    }
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(&key.private);
    let _ = std::fs::remove_file(dir.join("id_ed25519.pub"));
    let sh = sh()?;
    let private = &key.private;
    cmd!(
        sh,
        "ssh-keygen -q -t ed25519 -N '' -C airlock-acceptance -f {private}"
    )
    .quiet()
    .run()
    .context("making the suite's update key (ssh-keygen)")?;
    let public = std::fs::read_to_string(dir.join("id_ed25519.pub"))?;
    let mut fields = public.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        bail!("ssh-keygen wrote an odd public key: {public}")
    };
    std::fs::write(
        &key.allowed_signers,
        format!("airlock-acceptance@ci {kind} {blob}\n"),
    )?;
    Ok(key)
}

/// The test image's manifest: [`MANIFEST`] (with `version` replaced, if
/// given) and an `[update]` table trusting the suite's update key, written
/// next to the key.
pub fn test_manifest(opts: &AcceptanceOptions, version: Option<&str>) -> Result<PathBuf> {
    let key = update_key(opts)?;
    let text = std::fs::read_to_string(source_dir().join(MANIFEST))
        .with_context(|| format!("reading {MANIFEST}"))?;
    let mut replaced = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("version =") && replaced == 0 {
                replaced += 1;
                version
                    .map(|v| format!("version = \"{v}\""))
                    .unwrap_or_else(|| l.to_owned())
            } else {
                l.to_owned()
            }
        })
        .collect();
    ensure!(
        replaced == 1,
        "{MANIFEST} has no top-level `version =` line"
    );
    let name = key
        .allowed_signers
        .file_name()
        .context("key file name")?
        .to_string_lossy()
        .into_owned();
    let out = format!(
        "# Made by the acceptance suite from {MANIFEST}: the test image trusts the suite's update key.\n{}\n\n[update]\nallowed_signers = \"{name}\"\nthreshold = 1\n",
        lines.join("\n")
    );
    let path = key.allowed_signers.with_file_name(match version {
        Some(v) => format!("test-{v}.toml"),
        None => "test.toml".into(),
    });
    // Rewritten only when it changes: the image's input digest covers it.
    if std::fs::read_to_string(&path).ok().as_deref() != Some(out.as_str()) {
        std::fs::write(&path, out)?;
    }
    Ok(path)
}

/// Builds the test image of `version` (the suite's manifest copy) into
/// `images/test-<version>` (reused when its inputs did not change).
pub fn build_test_version(
    opts: &AcceptanceOptions,
    version: &str,
) -> Result<(PathBuf, Report, f64)> {
    let manifest = test_manifest(opts, Some(version))?;
    let output = opts.work_dir.join("images").join(format!("test-{version}"));
    let (report, seconds) = build(opts, Profile::Test, &manifest, &output, false)?;
    Ok((output, report, seconds))
}

fn build(
    opts: &AcceptanceOptions,
    profile: Profile,
    manifest: &Path,
    output: &Path,
    fresh: bool,
) -> Result<(Report, f64)> {
    let start = Instant::now();
    // A sabotaged run lays a flawed overlay over both images.
    let mut extra_overlays = match &opts.sabotage {
        Some(flaw) => vec![source_dir().join("ci/xtask/sabotage").join(flaw)],
        None => Vec::new(),
    };
    if profile == Profile::Test {
        extra_overlays.push(test_guest_overlay(opts)?);
    }
    let report = airlock::build::build(&BuildOptions {
        manifest_path: manifest.to_path_buf(),
        output: output.to_path_buf(),
        cache: opts.cache_dir.clone(),
        source: source_dir(),
        profile,
        reuse_trees: !fresh,
        reuse_output: !fresh,
        extra_overlays,
        extra_policy_dirs: Vec::new(),
        // Both signed for Secure Boot: every machine of the suite boots as
        // a PC set up by IT does (Secure Boot on, kernel lockdown).
        secure_boot: {
            let keys = secure_boot_keys(opts)?;
            Some((keys.join("db.key"), keys.join("db.crt")))
        },
        // Both profiles: the test machine checks the signed policy.
        tpm_policy_key: Some(secure_boot_keys(opts)?.join(airlock::secureboot::PCR_PRIVATE_KEY)),
        verbose: false,
    })
    .with_context(|| format!("building the {profile:?} image"))?;
    Ok((report, start.elapsed().as_secs_f64()))
}

/// Builds the test and production images (reusing unchanged ones).
pub fn prepare(suite: &mut Suite, opts: &AcceptanceOptions) -> Result<Images> {
    let dir = opts.work_dir.join("images");
    let mut build_seconds = Vec::new();
    let mut built = Vec::new();
    for profile in [Profile::Test, Profile::Production] {
        let name = format!(
            "builder: {} image builds from {MANIFEST}",
            format!("{profile:?}").to_lowercase()
        );
        let variant = match &opts.sabotage {
            Some(flaw) => format!("{profile:?}-sabotage-{flaw}"),
            None => format!("{profile:?}"),
        };
        let output = dir.join(variant.to_lowercase());
        let mut result = None;
        suite.prerequisite(&name, || {
            // The test image trusts the suite's update key (`update:` tests).
            let manifest = match profile {
                Profile::Test => test_manifest(opts, None)?,
                Profile::Production => source_dir().join(MANIFEST),
            };
            let (report, seconds) = build(opts, profile, &manifest, &output, false)?;
            let detail = format!(
                "{} in {seconds:.1}s, root hash {}",
                report.image,
                &report.root_hash[..16]
            );
            result = Some((report, seconds));
            Ok(detail)
        });
        let (report, seconds) = result
            .with_context(|| format!("the {profile:?} image did not build; nothing to boot"))?;
        build_seconds.push((format!("{profile:?}"), seconds));
        built.push((output.join(&report.image), report));
    }
    let (production, production_report) = built.pop().expect("two builds");
    let (test, test_report) = built.pop().expect("two builds");
    Ok(Images {
        test,
        test_report,
        production,
        production_report,
        build_seconds,
    })
}

fn sh() -> Result<Shell> {
    Ok(Shell::new()?)
}

/// Checks on the image files.
pub fn image_checks(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions) {
    suite.test(
        "image: systemd-dissect finds ESP, root and root-verity for the root hash",
        || {
            let sh = sh()?;
            let image = &images.production;
            let hash = &images.production_report.root_hash;
            let hash_arg = format!("--root-hash={hash}");
            let json = cmd!(sh, "systemd-dissect --json=short {hash_arg} {image}")
                .quiet()
                .read()?;
            let v: serde_json::Value =
                serde_json::from_str(&json).context("parsing systemd-dissect --json")?;
            let mounts = v["mounts"]
                .as_array()
                .context("no mounts in systemd-dissect output")?;
            let find = |d: &str| mounts.iter().find(|m| m["designator"] == d);
            let root = find("root").context("no root partition recognised")?;
            ensure!(
                root["verity"] == "yes",
                "root not verity-protected according to systemd-dissect: {root}"
            );
            ensure!(
                root["fstype"] == "erofs",
                "root is {}, expected erofs",
                root["fstype"]
            );
            find("root-verity").context("no root-verity partition recognised")?;
            find("esp").context("no ESP recognised")?;
            // A wrong root hash must be refused.
            let wrong = format!("--root-hash={}", "0".repeat(64));
            let refused = cmd!(sh, "systemd-dissect --json=short {wrong} {image}")
                .quiet()
                .ignore_stderr()
                .read()
                .is_err();
            ensure!(
                refused,
                "systemd-dissect accepted the image with a wrong root hash"
            );
            Ok("root (erofs, verity), root-verity, esp; wrong hash refused".into())
        },
    );
    suite.test(
        "image: airlock inspect reads name, distro, root hash and partitions back",
        || {
            let found = airlock::inspect::inspect(&images.production)?;
            let report = &images.production_report;
            ensure!(
                found.build.root_hash == report.root_hash,
                "inspect says root hash {}, report {}",
                found.build.root_hash,
                report.root_hash
            );
            ensure!(
                found.build.kernel_cmdline == report.kernel_cmdline,
                "command lines differ"
            );
            ensure!(
                found.build.package_count == report.packages.len(),
                "package counts differ"
            );
            ensure!(
                found.partitions.len() == report.partitions.len(),
                "partition counts differ"
            );
            for (a, b) in found.partitions.iter().zip(&report.partitions) {
                ensure!(
                    a.uuid == b.uuid && a.type_uuid == b.type_uuid && a.label == b.label,
                    "partition {} differs: {a:?} vs {b:?}",
                    b.number
                );
            }
            Ok(format!(
                "{} {} {} {}, {} partitions",
                found.build.name,
                found.build.version,
                found.build.distro,
                found.build.distro_release,
                found.partitions.len()
            ))
        },
    );
    suite.test("image: sfdisk --verify finds no error", || {
        let sh = sh()?;
        let mut out = String::new();
        for image in [&images.production, &images.test] {
            let text = cmd!(sh, "sfdisk --verify {image}").quiet().read()?;
            ensure!(
                text.contains("No errors detected"),
                "sfdisk --verify {}:\n{text}",
                image.display()
            );
            out = text.lines().next().unwrap_or("").to_string();
        }
        Ok(out)
    });
    suite.test("image: SHA256SUMS matches the image and report", || {
        let sh = sh()?;
        let dir = images
            .production
            .parent()
            .context("image has no directory")?;
        let _d = sh.push_dir(dir);
        let out = cmd!(sh, "sha256sum --check SHA256SUMS").quiet().read()?;
        Ok(out.replace('\n', "; "))
    });
    suite.test("image: the test agent is in the test image only", || {
        let in_test = image_has_file(
            &images.test,
            &images.test_report,
            "/usr/lib/airlock/airlock-test-agent",
        )?;
        let in_production = image_has_file(
            &images.production,
            &images.production_report,
            "/usr/lib/airlock/airlock-test-agent",
        )?;
        ensure!(
            in_test,
            "the test image lacks the agent: the check itself is broken"
        );
        ensure!(
            !in_production,
            "the production image contains /usr/lib/airlock/airlock-test-agent"
        );
        let unit_in_production = image_has_file(
            &images.production,
            &images.production_report,
            "/etc/systemd/system/airlock-test-agent.service",
        )?;
        ensure!(
            !unit_in_production,
            "the production image contains the test agent's unit"
        );
        Ok("test image: present; production image: absent (binary and unit)".into())
    });
    if !opts.skip_reproducibility {
        suite.test("builder: same inputs give the same root hash (fresh bootstrap, cached packages)", || {
            let output = opts.work_dir.join("images/reproducibility");
            let packages = opts.cache_dir.join("packages/debian");
            let before = count_files(&packages);
            let (report, seconds) = build(opts, Profile::Production, &source_dir().join(MANIFEST), &output, true)?;
            let after = count_files(&packages);
            ensure!(
                report.root_hash == images.production_report.root_hash,
                "root hash differs: {} (cached tree) vs {} (fresh bootstrap)",
                images.production_report.root_hash,
                report.root_hash
            );
            ensure!(after == before, "the fresh build downloaded {} packages instead of using the cache", after.saturating_sub(before));
            let rootfs = report.stages.iter().find(|s| s.stage == "rootfs").map(|s| s.seconds).unwrap_or(0.0);
            Ok(format!(
                "root hash {} both times; fresh build {seconds:.1}s (rootfs {rootfs:.1}s), 0 packages downloaded; first build {:.1}s",
                &report.root_hash[..16],
                images.production_report.total_seconds
            ))
        });
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Whether the image's root filesystem holds `path`, read with erofs-utils
/// from the root partition (no mount).
pub fn image_has_file(image: &Path, report: &Report, path: &str) -> Result<bool> {
    let root = report
        .partitions
        .iter()
        .find(|p| p.label.starts_with("root_"))
        .context("report has no root partition")?;
    let dir = tempfile::tempdir()?;
    let extracted = dir.path().join("root.erofs");
    extract(image, root.offset, root.size, &extracted)?;
    let sh = sh()?;
    let arg = format!("--path={path}");
    // dump.erofs (1.5) exits 0 either way: it describes the inode when the
    // path exists and prints "read inode failed" when it does not.
    let out = cmd!(sh, "dump.erofs {arg} {extracted}")
        .quiet()
        .ignore_status()
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains(&format!("File : {path}")) {
        return Ok(true);
    }
    if stderr.contains("read inode failed") {
        return Ok(false);
    }
    bail!("dump.erofs {arg} gave neither a file nor a lookup failure: {stdout}{stderr}")
}

fn extract(image: &Path, offset: u64, size: u64, out: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut o = std::fs::File::create(out)?;
    std::io::copy(&mut f.take(size), &mut o)?;
    Ok(())
}

/// A private, writable copy of `image` (sparse), for a machine to boot.
pub fn private_copy(image: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let target = dir.join(name);
    let sh = sh()?;
    cmd!(sh, "cp --sparse=always {image} {target}")
        .quiet()
        .run()?;
    Ok(target)
}
