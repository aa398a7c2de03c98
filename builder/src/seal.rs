//! Stage *seal*: the labelled erofs root, its dm-verity hash tree, the
//! initrd and the UKI, the ESP, and the data partition's filesystem.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::cmd;

use crate::disk::derived_uuid;
use crate::exec::{source_date_epoch, Runner};
use crate::manifest::Manifest;

/// Kernel command line: the builder's own part (pure). The root hash pins
/// the root; SELinux is enabled as the LSM and enforcing from the first
/// instruction of userspace; the manifest's additions come last.
pub fn kernel_cmdline(root_hash: &str, manifest: &Manifest) -> String {
    let mut args: Vec<String> = vec![
        format!("roothash={root_hash}"),
        "ro".into(),
        // Debian's kernel defaults to AppArmor and ignores selinux=1.
        "security=selinux".into(),
        "enforcing=1".into(),
        // The machine ID comes from the firmware (SMBIOS UUID), so it is
        // stable across boots on a read-only root and persistent logs stay
        // readable.
        "systemd.machine_id=firmware".into(),
        // No automatic mounting of the ESP or other discovered partitions;
        // the root is found by its hash, /var by /etc/fstab.
        "systemd.gpt_auto=0".into(),
        "rd.systemd.gpt_auto=0".into(),
        // A failing boot must not wait for a shell: there is none anyway.
        "rd.shell=0".into(),
        "rd.emergency=reboot".into(),
        "panic=10".into(),
        // No blinking text cursor on the console: the screen stays still
        // (and screendumps comparable) when nothing happens.
        "vt.global_cursor_default=0".into(),
    ];
    args.extend(manifest.kernel.cmdline.iter().cloned());
    args.join(" ")
}

/// Builds the compressed erofs root from `tree`, labels written by mkfs
/// from the tree's own file_contexts. `/boot` contents, `/var` contents and
/// API filesystems stay out.
///
/// lz4 rather than lz4hc: measured here on the trixie root, lz4hc (level 9)
/// takes ~40 s against ~6 s for a root only ~4 % smaller.
pub fn make_erofs(
    runner: &Runner,
    manifest: &Manifest,
    tree: &Path,
    file_contexts: &Path,
    out: &Path,
) -> Result<()> {
    let epoch = source_date_epoch().to_string();
    let uuid = derived_uuid(manifest, "root-fs").to_string();
    let fc = format!("--file-contexts={}", file_contexts.display());
    let sh = runner.sh();
    runner.run(
        "making the erofs root (mkfs.erofs)",
        cmd!(
            sh,
            "mkfs.erofs --quiet -zlz4 -T{epoch} -U{uuid} {fc}
             --exclude-regex=^(boot|var|tmp|run|proc|sys|dev)/.+
             {out} {tree}"
        ),
    )?;
    Ok(())
}

/// The verity hash tree of `data` into `hash`; returns the root hash.
/// Salt and UUID derive from the image identity, so the same root gives
/// the same hash.
pub fn make_verity(
    runner: &Runner,
    manifest: &Manifest,
    data: &Path,
    hash: &Path,
    scratch: &Path,
) -> Result<String> {
    let salt = hex::encode(Sha256::digest(format!(
        "airlock-verity-salt:{}:{}",
        manifest.name, manifest.version
    )));
    let uuid = derived_uuid(manifest, "verity").to_string();
    let root_hash_file = scratch.join("roothash");
    let sh = runner.sh();
    runner.run(
        "computing the dm-verity hash tree (veritysetup)",
        cmd!(
            sh,
            "veritysetup format --data-block-size=4096 --hash-block-size=4096 --salt={salt} --uuid={uuid}
             --root-hash-file={root_hash_file} {data} {hash}"
        ),
    )?;
    let root_hash = std::fs::read_to_string(&root_hash_file)
        .context("reading root hash")?
        .trim()
        .to_string();
    if root_hash.len() != 64 || !root_hash.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("veritysetup wrote an unexpected root hash {root_hash:?}");
    }
    Ok(root_hash)
}

/// dracut modules of the initrd: enough to find the disk, open verity and
/// switch root. No SELinux config in the initrd (the real root loads the
/// policy; an initrd with /etc/selinux but no policy freezes the boot).
/// `systemd-pcrphase` measures the initrd's boot phases into PCR 11
/// (`enter-initrd`, `leave-initrd`); `tpm2-tss` brings the TPM drivers and
/// libraries it needs.
const DRACUT_MODULES: &str = "systemd systemd-initrd systemd-udevd systemd-journald systemd-tmpfiles systemd-modules-load systemd-sysctl systemd-veritysetup systemd-pcrphase tpm2-tss dracut-systemd udev-rules dm kernel-modules base fs-lib rootfs-block shutdown";
const DRACUT_DRIVERS: &str = "virtio_blk virtio_pci virtio_scsi nvme ahci sd_mod erofs ext4 dm-verity dm-mod bochs virtio_gpu";

/// Digest of what decides the initrd besides the tools tree itself.
pub fn initrd_recipe_digest() -> String {
    hex::encode(Sha256::digest(format!("{DRACUT_MODULES}|{DRACUT_DRIVERS}")))[..16].to_string()
}

/// Builds the initrd in the tools tree into `scratch/initrd.img`, or reuses
/// `cached` when it exists; returns the initrd's path.
pub fn make_initrd(
    runner: &Runner,
    tools_tree: &Path,
    scratch: &Path,
    kernel_version: &str,
    cached: &Path,
) -> Result<PathBuf> {
    let out = scratch.join("initrd.img");
    if cached.exists() {
        runner.note(&format!("reusing initrd {}", cached.display()));
        std::fs::copy(cached, &out).context("copying cached initrd")?;
        return Ok(out);
    }
    runner.in_tree(
        "making the initrd (dracut)",
        tools_tree,
        scratch,
        [
            "dracut",
            "--quiet",
            "--no-hostonly",
            "--reproducible",
            "--force",
            "--no-early-microcode",
            "--kver",
            kernel_version,
            "-m",
            DRACUT_MODULES,
            "--drivers",
            DRACUT_DRIVERS,
            "--omit",
            "selinux",
            "/run/airlock/initrd.img",
        ],
    )?;
    let tmp = cached.with_extension("partial");
    std::fs::copy(&out, &tmp).context("caching initrd")?;
    std::fs::rename(&tmp, cached).context("caching initrd")?;
    Ok(out)
}

/// The PCR 11 value a TPM will hold after each boot phase of a UKI, as
/// `ukify build --measure` predicts it (sha256 bank): systemd-stub measures
/// the UKI's sections, then systemd-pcrphase extends the phase names
/// (`enter-initrd`, `…:leave-initrd`, `…:sysinit`, `…:ready`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhasePcr {
    /// The phases measured so far, colon-separated.
    pub phase: String,
    /// PCR 11, sha256 bank, lower-case hex.
    pub sha256: String,
}

/// A UKI made by [`make_uki`], and its predicted PCR 11 values.
pub struct Uki {
    pub path: PathBuf,
    pub pcr11: Vec<PhasePcr>,
}

/// What goes into a UKI besides the initrd (`scratch/initrd.img`).
pub struct UkiInputs<'a> {
    pub kernel: &'a Path,
    pub kernel_version: &'a str,
    pub cmdline: &'a str,
    pub os_release: &'a str,
    /// Signs the PCR 11 policy (`.pcrsig`, `.pcrpkey`) when given.
    pub pcr_policy_key: Option<&'a crate::secureboot::PcrPolicyKey>,
}

/// Builds the UKI (systemd-stub + kernel + initrd + command line +
/// os-release) with the tools tree's ukify, which also predicts PCR 11
/// (`--measure`).
pub fn make_uki(
    runner: &Runner,
    tools_tree: &Path,
    scratch: &Path,
    inputs: &UkiInputs,
) -> Result<Uki> {
    let UkiInputs {
        kernel,
        kernel_version,
        cmdline,
        os_release,
        pcr_policy_key,
    } = *inputs;
    std::fs::copy(kernel, scratch.join("vmlinuz")).context("copying kernel")?;
    std::fs::write(scratch.join("os-release"), os_release)?;
    let mut argv: Vec<String> = [
        "ukify",
        "build",
        "--linux=/run/airlock/vmlinuz",
        "--initrd=/run/airlock/initrd.img",
        &format!("--cmdline={cmdline}"),
        &format!("--uname={kernel_version}"),
        "--os-release=@/run/airlock/os-release",
        "--measure",
        "--pcr-banks=sha256",
        "--output=/run/airlock/uki.efi",
    ]
    .map(String::from)
    .to_vec();
    let ukify =
        |argv: &[String]| runner.in_tree_both("making the UKI (ukify)", tools_tree, scratch, argv);
    // With a policy key: `.pcrpkey` (its public half) and `.pcrsig` (PCR 11
    // signed for each boot phase).
    let (values, phases) = match pcr_policy_key {
        Some(key) => {
            let private = std::fs::read(&key.key).context("reading the PCR policy key")?;
            let files: [(&str, &[u8]); 2] = [
                ("private.pem", &private),
                ("public.pem", key.public_pem.as_bytes()),
            ];
            crate::secureboot::with_private_files(scratch, "pcr-policy-key", &files, |_| {
                argv.push("--pcr-private-key=/run/airlock/pcr-policy-key/private.pem".into());
                argv.push("--pcr-public-key=/run/airlock/pcr-policy-key/public.pem".into());
                ukify(&argv)
            })?
        }
        None => ukify(&argv)?,
    };
    let pcr11 = parse_measure(&phases, &values)?;
    Ok(Uki {
        path: scratch.join("uki.efi"),
        pcr11,
    })
}

/// Reads `ukify --measure`'s output: its `systemd-measure` writes one
/// `# PCR[11] Phase <PHASES>` line per phase to stderr and that phase's
/// `11:sha256=HEX` to stdout, in the same order (the streams are read
/// separately, so the n-th value belongs to the n-th phase line).
pub fn parse_measure(stderr: &str, stdout: &str) -> Result<Vec<PhasePcr>> {
    let phases: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# PCR[11] Phase <"))
        .map(|p| p.trim_end_matches('>'))
        .collect();
    let values: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("11:sha256="))
        .collect();
    anyhow::ensure!(
        !phases.is_empty() && phases.len() == values.len(),
        "ukify --measure printed {} phase(s) and {} sha256 value(s) for PCR 11:\n{stderr}\n{stdout}",
        phases.len(),
        values.len()
    );
    phases
        .into_iter()
        .zip(values)
        .map(|(phase, hex)| {
            anyhow::ensure!(
                hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                "ukify --measure printed {hex:?} for phase {phase}: not a sha256"
            );
            Ok(PhasePcr {
                phase: phase.to_owned(),
                sha256: hex.to_ascii_lowercase(),
            })
        })
        .collect()
}

/// The image's os-release: the distro's, plus IMAGE_ID and IMAGE_VERSION
/// (systemd shows them; updates compare IMAGE_VERSION), and the update
/// bundle's compatible string and security epoch for the update agent.
pub fn image_os_release(distro_os_release: &str, manifest: &Manifest) -> String {
    const OURS: &[&str] = &[
        "IMAGE_ID=",
        "IMAGE_VERSION=",
        "AIRLOCK_COMPATIBLE=",
        "AIRLOCK_SECURITY_EPOCH=",
    ];
    let mut out: String = distro_os_release
        .lines()
        .filter(|l| !OURS.iter().any(|k| l.starts_with(k)))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!(
        "IMAGE_ID={}\nIMAGE_VERSION={}\nAIRLOCK_COMPATIBLE={}\nAIRLOCK_SECURITY_EPOCH={}\n",
        manifest.name,
        manifest.version,
        manifest.compatible(),
        manifest.security_epoch
    ));
    out
}

/// Writes the image fields into the tree's own `usr/lib/os-release` (what
/// `/etc/os-release` points at), so that the running system knows its image,
/// version, compatible string and epoch (the update agent reads them there),
/// as the UKI's `.osrel` does.
pub fn stamp_os_release(tree: &Path, manifest: &Manifest) -> Result<()> {
    let path = tree.join("usr/lib/os-release");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    std::fs::write(&path, image_os_release(&text, manifest))
        .with_context(|| format!("writing {}", path.display()))
}

/// systemd-boot settings: no menu, no editor (so the command line in the
/// UKI cannot be changed at boot), no automatic firmware or OS entries.
pub const LOADER_CONF: &str =
    "timeout menu-disabled\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n";

/// File name of the UKI on the ESP.
pub fn uki_name(manifest: &Manifest) -> String {
    format!("{}.efi", manifest.artifact_stem())
}

/// What goes onto the ESP.
pub struct EspContents<'a> {
    /// systemd-boot, installed as the removable-media loader `BOOTX64.EFI`.
    pub boot_efi: &'a Path,
    pub uki: &'a Path,
    /// `/airlock/build.json`, read by `airlock inspect`.
    pub build_info: &'a str,
}

/// Makes the FAT32 ESP image (no mount: mkfs.vfat + mtools).
pub fn make_esp(
    runner: &Runner,
    manifest: &Manifest,
    contents: &EspContents<'_>,
    scratch: &Path,
    out: &Path,
) -> Result<()> {
    let EspContents {
        boot_efi,
        uki,
        build_info,
    } = contents;
    let size_mib = manifest.partitions.esp_mib;
    let sh = runner.sh();
    let volume_id = &hex::encode(derived_uuid(manifest, "esp-volume").as_bytes())[..8];
    let kib = (size_mib * 1024).to_string();
    // 512-byte sectors: with 4 KiB sectors a 256 MiB FAT32 has too few
    // clusters and OVMF cannot read it.
    runner.run(
        "formatting the ESP (mkfs.vfat)",
        cmd!(
            sh,
            "mkfs.vfat -C -F 32 -S 512 -n ESP -i {volume_id} --invariant {out} {kib}"
        ),
    )?;
    let loader = scratch.join("loader.conf");
    std::fs::write(&loader, LOADER_CONF)?;
    let info = scratch.join("build.json");
    std::fs::write(&info, build_info)?;
    let uki_target = format!("::/EFI/Linux/{}", uki_name(manifest));
    let _env = sh.push_env("MTOOLS_SKIP_CHECK", "1");
    runner.run(
        "populating the ESP (mtools)",
        cmd!(
            sh,
            "mmd -i {out} ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader ::/airlock"
        ),
    )?;
    runner.run(
        "populating the ESP (mtools)",
        cmd!(sh, "mcopy -i {out} {boot_efi} ::/EFI/BOOT/BOOTX64.EFI"),
    )?;
    runner.run(
        "populating the ESP (mtools)",
        cmd!(sh, "mcopy -i {out} {uki} {uki_target}"),
    )?;
    runner.run(
        "populating the ESP (mtools)",
        cmd!(sh, "mcopy -i {out} {loader} ::/loader/loader.conf"),
    )?;
    runner.run(
        "populating the ESP (mtools)",
        cmd!(sh, "mcopy -i {out} {info} ::/airlock/build.json"),
    )?;
    Ok(())
}

/// Paths under `/var` that belong to the build, not to the appliance's
/// persistent state: package databases and caches, the policy store (the
/// policy is fixed in the read-only root), build-time logs.
const VAR_EXCLUDED: &[&str] = &[
    "lib/dpkg",
    "lib/apt",
    "cache/apt",
    "cache/debconf",
    "lib/selinux",
    "lib/dnf",
    "lib/rpm",
    "cache/dnf",
    "cache/ldconfig",
    "log/apt",
    "log/dpkg.log",
    "log/alternatives.log",
    "log/bootstrap.log",
    "log/dnf.log",
    "log/dnf.librepo.log",
    "log/dnf.rpm.log",
    "log/hawkey.log",
];

/// Moves the tree's labelled `/var` to `dest` (minus build-only state) and
/// leaves an empty, labelled `/var` mount point in the tree.
pub fn split_var(tree: &Path, dest: &Path) -> Result<()> {
    let var = tree.join("var");
    let label = xattr::get(&var, "security.selinux")
        .context("reading /var label")?
        .context("/var has no SELinux label")?;
    std::fs::rename(&var, dest)
        .with_context(|| format!("moving {} to {}", var.display(), dest.display()))?;
    std::fs::create_dir(&var)?;
    xattr::set(&var, "security.selinux", &label).context("labelling /var mount point")?;
    for rel in VAR_EXCLUDED {
        crate::tree::remove_if_present(&dest.join(rel))?;
    }
    Ok(())
}

/// The data partition's ext4 filesystem, populated from `var_dir` without
/// mounting (`mkfs.ext4 -d` keeps the SELinux xattrs).
pub fn make_data(runner: &Runner, manifest: &Manifest, var_dir: &Path, out: &Path) -> Result<()> {
    let uuid = derived_uuid(manifest, "data-fs").to_string();
    let size = format!("{}M", manifest.partitions.data_mib);
    let extended = format!("root_owner=0:0,hash_seed={uuid}");
    let sh = runner.sh();
    let _time = sh.push_env("E2FSPROGS_FAKE_TIME", source_date_epoch().to_string());
    runner.run(
        "making the data filesystem (mkfs.ext4)",
        cmd!(
            sh,
            "mkfs.ext4 -q -F -L data -U {uuid} -E {extended} -d {var_dir} {out} {size}"
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> Manifest {
        crate::manifest::parse_manifest(
            &format!("name=\"a\"\nversion=\"2.1\"\n[distro]\nname=\"debian\"\n{extra}"),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn measure_output_gives_one_value_per_phase() {
        let stderr = "Using config file: none\n+ /usr/lib/systemd/systemd-measure calculate …\n# PCR[11] Phase <enter-initrd>\n# PCR[11] Phase <enter-initrd:leave-initrd>\n";
        let stdout = "11:sha256=851524836F4FB8A19D3EAA563ACE1418EEDD37AA41E9490ACB13A2553C6F175B\n11:sha256=b24a0126bb34aa72e201ffd8238328a03885ecc251357e4b3af22830aa960c5c\nWrote unsigned /run/airlock/uki.efi\n";
        let values = parse_measure(stderr, stdout).unwrap();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0].phase, "enter-initrd");
        assert_eq!(
            values[0].sha256,
            "851524836f4fb8a19d3eaa563ace1418eedd37aa41e9490acb13a2553c6f175b"
        );
        assert_eq!(values[1].phase, "enter-initrd:leave-initrd");
        // A value missing, a value that is no sha256, nothing at all.
        assert!(parse_measure(
            stderr,
            "11:sha256=851524836f4fb8a19d3eaa563ace1418eedd37aa41e9490acb13a2553c6f175b\n"
        )
        .is_err());
        assert!(parse_measure("# PCR[11] Phase <enter-initrd>\n", "11:sha256=00\n").is_err());
        assert!(parse_measure("", "").is_err());
    }

    #[test]
    fn cmdline_pins_root_and_enforces_selinux_before_manifest_extras() {
        let m = manifest("[kernel]\ncmdline=[\"quiet\"]\n");
        let c = kernel_cmdline("ab", &m);
        assert!(c.starts_with("roothash=ab ro security=selinux enforcing=1 "));
        assert!(c.ends_with(" quiet"));
        assert!(!c.contains("rw") && !c.contains("enforcing=0"));
    }

    #[test]
    fn loader_conf_disables_the_editor_and_the_menu() {
        assert!(LOADER_CONF.lines().any(|l| l == "editor no"));
        assert!(LOADER_CONF.lines().any(|l| l == "timeout menu-disabled"));
    }

    #[test]
    fn os_release_gains_image_fields_once() {
        let m = manifest("");
        let out = image_os_release("ID=debian\nIMAGE_VERSION=old\n", &m);
        assert_eq!(out, "ID=debian\nIMAGE_ID=a\nIMAGE_VERSION=2.1\nAIRLOCK_COMPATIBLE=a-debian-x86_64\nAIRLOCK_SECURITY_EPOCH=0\n");
    }
}
