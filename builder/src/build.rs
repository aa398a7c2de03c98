//! `airlock build`: the pipeline, as a flat list of named stages.
//!
//! Everything is made in a private scratch directory and a staging
//! directory inside the output directory; only a complete build is renamed
//! into place, so a failed build leaves nothing half-written behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use walkdir::WalkDir;
use xshell::cmd;

use crate::disk::{self, Content};
use crate::doctor::{self, Need};
use crate::exec::Runner;
use crate::manifest::{Distro, Manifest};
use crate::progress::{StageTiming, Stages};
use crate::rootfs::{self, Cache};
use crate::seal;
use crate::tree::{self, BinarySpec, DistFile};

/// Which variant of the image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// What ships to PCs.
    Production,
    /// Production plus the in-guest test agent (acceptance suite only).
    Test,
}

/// Appliance binaries every image carries (the daemons arrive with later work).
const APPLIANCE_BINARIES: &[BinarySpec] = &[
    BinarySpec {
        package: "airlockd",
        binary: "airlockd",
        destination: "/usr/bin/airlockd",
    },
    // The same binary for the network set-up at boot (airlock-network.service):
    // its own file, so that it enters its own SELinux domain (airlock_network_t).
    BinarySpec {
        package: "airlockd",
        binary: "airlockd",
        destination: "/usr/lib/airlock/airlock-network",
    },
    // And a third time for the host name (airlock-hostname.service): its
    // own domain, airlock_hostname_t, the only one with CAP_SYS_ADMIN.
    BinarySpec {
        package: "airlockd",
        binary: "airlockd",
        destination: "/usr/lib/airlock/airlock-hostname",
    },
    // Started by the supervisor; the gateway starts the sanitiser per item.
    BinarySpec {
        package: "airlock-gateway",
        binary: "airlock-gateway",
        destination: "/usr/lib/airlock/airlock-gateway",
    },
    BinarySpec {
        package: "airlock-gateway",
        binary: "airlock-sanitiser",
        destination: "/usr/lib/airlock/airlock-sanitiser",
    },
    // The screen, keyboard and pointer (airlock-kiosk.service). Pure Rust on
    // /dev/dri and /dev/input: no package of its own in the image.
    BinarySpec {
        package: "airlock-kiosk",
        binary: "airlock-kiosk",
        destination: "/usr/lib/airlock/airlock-kiosk",
    },
    // The update agent: the health gate of a counted boot
    // (airlock-update-health.service), the drop directory, `apply` by IT.
    BinarySpec {
        package: "airlock-update",
        binary: "airlock-update",
        destination: "/usr/lib/airlock/airlock-update",
    },
];

/// Files a run-time crate ships next to its code (its `dist/`: units,
/// tmpfiles, settings), installed before the overlays, so that a profile's
/// overlay may replace one. Enabled by links in `overlay/`.
const APPLIANCE_FILES: &[DistFile] = &[
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update-health.service",
        destination: "/usr/lib/systemd/system/airlock-update-health.service",
    },
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update-drop.path",
        destination: "/usr/lib/systemd/system/airlock-update-drop.path",
    },
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update-drop.service",
        destination: "/usr/lib/systemd/system/airlock-update-drop.service",
    },
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update-fetch.service",
        destination: "/usr/lib/systemd/system/airlock-update-fetch.service",
    },
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update-fetch.timer",
        destination: "/usr/lib/systemd/system/airlock-update-fetch.timer",
    },
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update-stick@.service",
        destination: "/usr/lib/systemd/system/airlock-update-stick@.service",
    },
    DistFile {
        source: "appliance-daemon/update/dist/90-airlock-update-stick.rules",
        destination: "/usr/lib/udev/rules.d/90-airlock-update-stick.rules",
    },
    DistFile {
        source: "appliance-daemon/update/dist/airlock-update.tmpfiles.conf",
        destination: "/usr/lib/tmpfiles.d/airlock-update.conf",
    },
    DistFile {
        source: "appliance-daemon/update/dist/update.toml",
        destination: "/etc/airlock/update.toml",
    },
];

/// Empty directories the image needs as mount points on its read-only root.
const MOUNT_POINTS: &[&str] = &[
    // The ESP (/etc/fstab), where the update agent installs boot entries.
    "efi",
];

/// The test profile's additions.
const TEST_BINARIES: &[BinarySpec] = &[
    BinarySpec {
        package: "airlock-test-agent",
        binary: "airlock-test-agent",
        destination: "/usr/lib/airlock/airlock-test-agent",
    },
    // Started in a guest's QEMU domain by the suite's attack tests.
    BinarySpec {
        package: "airlock-test-agent",
        binary: "airlock-test-attack",
        destination: "/usr/lib/airlock/airlock-test-attack",
    },
    // Drives the nested test guests' test ports.
    BinarySpec {
        package: "airlock-test-guest",
        binary: "airlock-test-guest-ctl",
        destination: "/usr/lib/airlock/airlock-test-guest-ctl",
    },
];

/// Where a profile's overlays, policy modules and binaries come from.
pub struct ProfileInputs {
    pub overlays: Vec<PathBuf>,
    pub policy_dirs: Vec<PathBuf>,
    pub binaries: Vec<BinarySpec>,
    pub files: Vec<DistFile>,
}

pub fn profile_inputs(source: &Path, profile: Profile) -> ProfileInputs {
    let mut inputs = ProfileInputs {
        overlays: vec![source.join("overlay")],
        policy_dirs: vec![source.join("policy")],
        binaries: APPLIANCE_BINARIES.to_vec(),
        files: APPLIANCE_FILES.to_vec(),
    };
    if profile == Profile::Test {
        inputs.overlays.push(source.join("ci/test-agent/overlay"));
        inputs.policy_dirs.push(source.join("ci/test-agent/policy"));
        inputs.binaries.extend_from_slice(TEST_BINARIES);
    }
    inputs
}

/// Options of one build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub manifest_path: PathBuf,
    pub output: PathBuf,
    pub cache: PathBuf,
    /// The airlock source tree (overlay/, policy/, rootfs/, the workspace).
    pub source: PathBuf,
    pub profile: Profile,
    /// Reuse cached package trees (default). `false` bootstraps afresh (the
    /// package download cache is still used).
    pub reuse_trees: bool,
    /// Skip the build when the output already holds an image of the same inputs.
    pub reuse_output: bool,
    /// Site-specific overlay directories, laid over after the profile's own.
    pub extra_overlays: Vec<PathBuf>,
    /// Further SELinux module directories, installed after the profile's.
    pub extra_policy_dirs: Vec<PathBuf>,
    /// Sign systemd-boot and the UKI for Secure Boot: (db key, db certificate).
    pub secure_boot: Option<(PathBuf, PathBuf)>,
    /// Sign the UKI's PCR 11 policy with this key (`.pcrsig`, `.pcrpkey`).
    pub tpm_policy_key: Option<PathBuf>,
    pub verbose: bool,
}

/// How the boot files were signed (`Report::secure_boot`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecureBootSigning {
    /// Subject of the db certificate that signed them.
    pub certificate_subject: String,
    /// sha256 of that certificate's DER bytes.
    pub certificate_sha256: String,
    /// The files on the ESP that carry the signature.
    pub signed: Vec<String>,
}

/// The build report, `<name>_<version>.report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub name: String,
    pub version: String,
    pub distro: String,
    pub distro_release: String,
    pub profile: Profile,
    pub input_digest: String,
    pub image: String,
    pub image_sha256: String,
    /// The update bundle (unsigned) made from the same root, verity and UKI.
    #[serde(default)]
    pub bundle: String,
    #[serde(default)]
    pub bundle_sha256: String,
    #[serde(default)]
    pub compatible: String,
    #[serde(default)]
    pub security_epoch: u32,
    pub root_hash: String,
    /// Size of the erofs root filesystem and of its verity hash tree.
    pub root_fs_bytes: u64,
    pub root_verity_bytes: u64,
    pub kernel_version: String,
    pub kernel_cmdline: String,
    pub selinux_policy: String,
    pub selinux_modules: Vec<String>,
    pub partitions: Vec<ReportPartition>,
    pub packages: BTreeMap<String, String>,
    pub labels: BTreeMap<String, usize>,
    pub trees_reused: bool,
    /// `None`: the boot files are unsigned (Secure Boot refuses them).
    #[serde(default)]
    pub secure_boot: Option<SecureBootSigning>,
    /// sha256 of the public key whose signature of the PCR 11 policy the
    /// UKI carries (`.pcrsig`); `None`: no signed policy.
    #[serde(default)]
    pub tpm_policy_public_key_sha256: Option<String>,
    /// PCR 11 (sha256) after each boot phase, as a TPM will hold it when
    /// this image's UKI boots (`ukify --measure`; what a TPM policy on
    /// PCR 11 must match).
    #[serde(default)]
    pub pcr11: Vec<crate::seal::PhasePcr>,
    pub stages: Vec<StageTiming>,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportPartition {
    pub number: u32,
    pub label: String,
    pub type_uuid: String,
    pub uuid: String,
    pub offset: u64,
    pub size: u64,
    pub sha256: String,
}

/// Small summary written onto the ESP (`/airlock/build.json`) so that
/// `airlock inspect` can describe a bare disk image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildInfo {
    pub name: String,
    pub version: String,
    pub distro: String,
    pub distro_release: String,
    pub profile: Profile,
    pub root_hash: String,
    pub kernel_cmdline: String,
    pub package_count: usize,
}

/// Output file names of a build.
pub struct Outputs {
    pub image: String,
    /// The update bundle, `<name>_<version>.airlock`.
    pub bundle: String,
    pub report: String,
    pub selinux_dir: String,
}

pub fn outputs(manifest: &Manifest) -> Outputs {
    let stem = manifest.artifact_stem();
    Outputs {
        image: format!("{stem}.raw"),
        bundle: format!("{stem}.airlock"),
        report: format!("{stem}.report.json"),
        selinux_dir: format!("{stem}.selinux"),
    }
}

/// Digest of every input of a build: manifest, profile, overlays, policy,
/// package lists, and the builder itself.
pub fn input_digest(
    opts: &BuildOptions,
    manifest_text: &str,
    inputs: &ProfileInputs,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(manifest_text);
    h.update(format!("{:?}", opts.profile));
    let mut dirs: Vec<PathBuf> = inputs.overlays.clone();
    dirs.extend(inputs.policy_dirs.iter().cloned());
    dirs.push(opts.source.join("rootfs"));
    for b in &inputs.binaries {
        dirs.push(
            opts.source
                .join("ci")
                .join(b.package.trim_start_matches("airlock-")),
        );
    }
    dirs.push(opts.source.join("appliance-daemon"));
    for dir in dirs.iter().filter(|d| d.exists()) {
        let mut files: Vec<PathBuf> = WalkDir::new(dir)
            .into_iter()
            .filter_map(|e| e.ok())
            // Skip cargo's build output inside an input directory (e.g. a
            // fuzz crate's target/), judged below the directory itself: an
            // input directory may well live under some target/ (the suite
            // makes the test guest's overlay in target/acceptance/).
            .filter(|e| {
                !e.path()
                    .strip_prefix(dir)
                    .is_ok_and(|rel| rel.components().any(|c| c.as_os_str() == "target"))
            })
            .map(|e| e.into_path())
            .collect();
        files.sort();
        for f in files {
            h.update(
                f.strip_prefix(&opts.source)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .as_bytes(),
            );
            let meta = std::fs::symlink_metadata(&f)?;
            if meta.file_type().is_symlink() {
                h.update(std::fs::read_link(&f)?.to_string_lossy().as_bytes());
            } else if meta.is_file() {
                h.update(std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?);
            }
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Ok(bytes) = std::fs::read(exe) {
            h.update(bytes);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Free bytes on the filesystem holding `dir`.
fn free_bytes(runner: &Runner, dir: &Path) -> Result<u64> {
    let sh = runner.sh();
    let out = runner.run(
        "checking free space",
        cmd!(sh, "df --output=avail -B1 {dir}"),
    )?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("parsing df output")
}

/// Builds the image. Returns the report.
pub fn build(opts: &BuildOptions) -> Result<Report> {
    let manifest_text = std::fs::read_to_string(&opts.manifest_path)
        .with_context(|| format!("reading manifest {}", opts.manifest_path.display()))?;
    let manifest =
        crate::manifest::parse_manifest(&manifest_text, &opts.manifest_path.display().to_string())?;
    let trusted_keys =
        crate::manifest::load_trusted_keys(&manifest, &opts.manifest_path, &manifest_text)?;
    let distro_need = match manifest.distro {
        Distro::Debian { .. } => Need::Debian,
        Distro::Fedora { .. } => Need::Fedora,
    };
    doctor::require(&[Need::Build, distro_need])?;
    if !doctor::is_root() {
        bail!("airlock build must run as root (mmdebstrap --mode=root and chroots need it)");
    }
    let mut inputs = profile_inputs(&opts.source, opts.profile);
    inputs.overlays.extend(opts.extra_overlays.iter().cloned());
    inputs
        .policy_dirs
        .extend(opts.extra_policy_dirs.iter().cloned());
    let names = outputs(&manifest);
    let mut digest_text = manifest_text.clone();
    if let Some(keys) = &trusted_keys {
        // The keys are an input too (the manifest only names their file).
        digest_text.push_str(&keys.text);
    }
    let signing_key = match &opts.secure_boot {
        Some((key, cert)) => {
            doctor::require(&[Need::SecureBoot])?;
            Some(crate::secureboot::load_signing_key(key, cert)?)
        }
        None => None,
    };
    if let Some(key) = &signing_key {
        // Which key signs is an input (the same image signed by another key
        // is another image); the key itself is not written anywhere.
        digest_text.push_str(&format!(
            "\nsecure-boot-certificate-sha256={}\n",
            key.cert_sha256
        ));
    }
    let pcr_policy_key = match &opts.tpm_policy_key {
        Some(key) => {
            doctor::require(&[Need::SecureBoot])?;
            Some(crate::secureboot::load_pcr_policy_key(key)?)
        }
        None => None,
    };
    if let Some(key) = &pcr_policy_key {
        digest_text.push_str(&format!(
            "\ntpm-policy-public-key-sha256={}\n",
            key.public_sha256
        ));
    }
    let digest = input_digest(opts, &digest_text, &inputs)?;

    if opts.reuse_output {
        if let Some(report) = reusable_report(&opts.output, &names, &digest) {
            println!(
                "airlock: {} is up to date (inputs {}), not rebuilding",
                names.image,
                &digest[..12]
            );
            return Ok(report);
        }
    }

    let runner = Runner::new(opts.verbose)?;
    // Output directory: must be creatable, writable, and have room.
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("creating output directory {}", opts.output.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".airlock-staging-")
        .tempdir_in(&opts.output)
        .with_context(|| format!("output directory {} is not writable", opts.output.display()))?;
    let needed_p = &manifest.partitions;
    let needed =
        (needed_p.esp_mib + needed_p.root_mib + needed_p.root_verity_mib + needed_p.data_mib)
            * 1024
            * 1024;
    let free = free_bytes(&runner, &opts.output)?;
    if free < needed {
        bail!(
            "output directory {} has {} MiB free; the image needs up to {} MiB",
            opts.output.display(),
            free / 1024 / 1024,
            needed / 1024 / 1024
        );
    }
    std::fs::create_dir_all(&opts.cache)
        .with_context(|| format!("creating cache directory {}", opts.cache.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("airlock-build-")
        .tempdir_in(scratch_parent(&opts.cache))
        .context("creating scratch directory")?;
    let scratch = scratch.path();
    // The log lives in the cache while building, so it survives a failure.
    let logs = opts.cache.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("{}.build.log", manifest.artifact_stem()));
    runner.log_to(&log_path)?;
    run_stages(
        opts,
        &manifest,
        trusted_keys.as_ref(),
        signing_key.as_ref(),
        pcr_policy_key.as_ref(),
        &inputs,
        &names,
        &digest,
        &runner,
        staging.path(),
        scratch,
        &log_path,
    )
    .with_context(|| {
        format!(
            "build failed; every command and its output: {}",
            log_path.display()
        )
    })
}

/// The stages proper, once the inputs are checked and the directories exist.
#[allow(clippy::too_many_arguments)]
fn run_stages(
    opts: &BuildOptions,
    manifest: &Manifest,
    trusted_keys: Option<&crate::manifest::TrustedKeys>,
    signing_key: Option<&crate::secureboot::SigningKey>,
    pcr_policy_key: Option<&crate::secureboot::PcrPolicyKey>,
    inputs: &ProfileInputs,
    names: &Outputs,
    digest: &str,
    runner: &Runner,
    staging: &Path,
    scratch: &Path,
    log_path: &Path,
) -> Result<Report> {
    let manifest = manifest.clone();
    let digest = digest.to_string();
    let cache = Cache {
        root: opts.cache.clone(),
    };
    let mut stages = Stages::new();
    println!(
        "airlock: building {} ({} profile, {}) into {}",
        names.image,
        match opts.profile {
            Profile::Production => "production",
            Profile::Test => "test",
        },
        manifest.distro_id(),
        opts.output.display()
    );

    // rootfs
    let sets = rootfs::load_package_sets(&opts.source.join("rootfs"), &manifest)?;
    let trees = stages.run(
        "rootfs",
        &format!(
            "{} packages + {} build-only",
            sets.image.len(),
            sets.tools.len()
        ),
        || rootfs::prepare_trees(runner, &manifest, &sets, &cache, scratch, opts.reuse_trees),
    )?;
    let image_tree = scratch.join("tree");
    stages.run("copy", "image tree from the base tree", || {
        rootfs::copy_tree(runner, &trees.image_base, &image_tree)
    })?;
    let packages = rootfs::installed_packages(runner, &manifest, &image_tree)?;
    let (kernel_version, kernel_image) = rootfs::find_kernel(&image_tree)?;

    // overlay
    stages.run(
        "overlay",
        "overlay files, binaries, locked accounts",
        || {
            tree::install_files(&opts.source, &image_tree, &inputs.files)?;
            tree::apply_overlays(runner, &image_tree, &inputs.overlays)?;
            tree::install_binaries(runner, &opts.source, &image_tree, &inputs.binaries)?;
            tree::make_mount_points(&image_tree, MOUNT_POINTS)?;
            seal::stamp_os_release(&image_tree, &manifest)?;
            if let Some(keys) = trusted_keys {
                tree::install_trusted_keys(&image_tree, keys)?;
            }
            // /etc is read-only on the appliance: system users exist from the build.
            runner.in_tree_plain(
                "creating system users (systemd-sysusers)",
                &image_tree,
                ["systemd-sysusers"],
            )?;
            tree::lock_accounts(&image_tree)
        },
    )?;

    // policy
    let policy_name = tree::enforce_selinux(&image_tree)?;
    let modules = stages.run("policy", "compile and install SELinux modules", || {
        let pp_cache = cache
            .trees(&rootfs::tree_key(&manifest, &sets))
            .join("policy");
        tree::install_policy(
            runner,
            &trees.tools,
            &image_tree,
            scratch,
            &inputs.policy_dirs,
            &pp_cache,
        )
    })?;

    // label
    let labels = stages.run("label", "label the tree and run the label gate", || {
        // mkfs.ext4 would create /var's lost+found without a label; one that
        // exists in the source (labelled here) is taken over as it is.
        let lost_found = image_tree.join("var/lost+found");
        std::fs::create_dir_all(&lost_found)?;
        std::fs::set_permissions(
            &lost_found,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        tree::label_tree(runner, &image_tree, &policy_name)?;
        tree::label_gate(&image_tree)
    })?;

    // seal
    let var_dir = scratch.join("var");
    let root_img = scratch.join("root.erofs");
    let verity_img = scratch.join("root.verity");
    let root_hash = stages.run("seal", "erofs root + dm-verity", || {
        seal::split_var(&image_tree, &var_dir)?;
        seal::make_erofs(
            runner,
            &manifest,
            &image_tree,
            &tree::file_contexts(&image_tree, &policy_name),
            &root_img,
        )?;
        seal::make_verity(runner, &manifest, &root_img, &verity_img, scratch)
    })?;
    let cmdline = seal::kernel_cmdline(&root_hash, &manifest);
    let os_release_path = image_tree.join("usr/lib/os-release");
    let os_release = seal::image_os_release(
        &std::fs::read_to_string(&os_release_path)
            .with_context(|| format!("reading {}", os_release_path.display()))?,
        &manifest,
    );
    let uki = stages.run("uki", "initrd + unified kernel image", || {
        let cached_initrd = cache
            .trees(&rootfs::tree_key(&manifest, &sets))
            .join(format!("initrd-{}.img", seal::initrd_recipe_digest()));
        seal::make_initrd(
            runner,
            &trees.tools,
            scratch,
            &kernel_version,
            &cached_initrd,
        )?;
        seal::make_uki(
            runner,
            &trees.tools,
            scratch,
            &seal::UkiInputs {
                kernel: &kernel_image,
                kernel_version: &kernel_version,
                cmdline: &cmdline,
                os_release: &os_release,
                pcr_policy_key,
            },
        )
    })?;
    let unsigned_boot_efi = trees
        .tools
        .join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    let pcr11 = uki.pcr11;
    let uki = uki.path;
    let (boot_efi, uki) = match signing_key {
        Some(key) => stages.run(
            "sign",
            &format!(
                "Secure Boot: systemd-boot and the UKI, signed by {}",
                key.subject
            ),
            || {
                let signed = crate::secureboot::sign_efi_binaries(
                    runner,
                    &trees.tools,
                    scratch,
                    key,
                    &[
                        (&unsigned_boot_efi, "BOOTX64.signed.efi"),
                        (&uki, "uki.signed.efi"),
                    ],
                )?;
                Ok((signed[0].clone(), signed[1].clone()))
            },
        )?,
        None => {
            println!("airlock: not signed for Secure Boot (no --secure-boot-key): a PC with Secure Boot on will refuse this image");
            (unsigned_boot_efi, uki)
        }
    };

    // disk
    let layout = disk::plan_layout(&manifest, &root_hash)?;
    let image_path = staging.join(&names.image);
    let distro_release = match &manifest.distro {
        Distro::Debian { suite, .. } => suite.clone(),
        Distro::Fedora { release, .. } => release.to_string(),
    };
    let info = BuildInfo {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        distro: manifest.distro_id().into(),
        distro_release: distro_release.clone(),
        profile: opts.profile,
        root_hash: root_hash.clone(),
        kernel_cmdline: cmdline.clone(),
        package_count: packages.len(),
    };
    let esp_img = scratch.join("esp.img");
    let data_img = scratch.join("data.img");
    let root_label = disk::labels::root(&manifest.artifact_stem());
    let verity_label = disk::labels::verity(&manifest.artifact_stem());
    let part = |label: &str| {
        layout
            .by_label(label)
            .with_context(|| format!("layout has no partition {label}"))
    };
    let contents = [
        Content {
            partition: part(disk::labels::ESP)?,
            image: &esp_img,
        },
        Content {
            partition: part(&root_label)?,
            image: &root_img,
        },
        Content {
            partition: part(&verity_label)?,
            image: &verity_img,
        },
        Content {
            partition: part(disk::labels::DATA)?,
            image: &data_img,
        },
    ];
    stages.run("disk", "ESP, data filesystem, GPT", || {
        let build_info = serde_json::to_string_pretty(&info)?;
        let esp = seal::EspContents {
            boot_efi: &boot_efi,
            uki: &uki,
            build_info: &build_info,
        };
        seal::make_esp(runner, &manifest, &esp, scratch, &esp_img)?;
        seal::make_data(runner, &manifest, &var_dir, &data_img)?;
        disk::assemble(runner, &layout, &contents, &image_path)
    })?;

    // bundle: the update from the very files the disk image holds
    let bundle_path = staging.join(&names.bundle);
    stages.run(
        "bundle",
        "update bundle (root, verity, UKI; unsigned)",
        || {
            let inputs = crate::bundle::BundleInputs {
                name: &manifest.name,
                version: &manifest.version,
                security_epoch: manifest.security_epoch,
                compatible: manifest.compatible(),
                build_id: Some(digest.clone()),
                root_hash: &root_hash,
                root: &root_img,
                verity: &verity_img,
                uki: &uki,
            };
            crate::bundle::write_bundle(&inputs, &bundle_path).map(|_| ())
        },
    )?;

    // report
    let report = stages.run("report", "hashes, package list, SELinux policy", || {
        let selinux_out = staging.join(&names.selinux_dir);
        std::fs::create_dir_all(&selinux_out)?;
        let policy_file = tree::find_policy_file(&image_tree, &policy_name)?;
        std::fs::copy(
            &policy_file,
            selinux_out.join(policy_file.file_name().expect("name")),
        )?;
        std::fs::copy(
            tree::file_contexts(&image_tree, &policy_name),
            selinux_out.join("file_contexts"),
        )?;
        let (image_sha256, partition_sha256) = disk::hash_image(&layout, &image_path, &contents)?;
        let partitions = layout
            .partitions
            .iter()
            .zip(partition_sha256)
            .map(|(p, sha256)| ReportPartition {
                number: p.number,
                label: p.label.clone(),
                type_uuid: p.type_uuid.clone(),
                uuid: p.uuid.clone(),
                offset: p.offset,
                size: p.size,
                sha256,
            })
            .collect();
        Ok(Report {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            distro: manifest.distro_id().into(),
            distro_release: distro_release.clone(),
            profile: opts.profile,
            input_digest: digest.clone(),
            image: names.image.clone(),
            image_sha256,
            bundle: names.bundle.clone(),
            bundle_sha256: hex::encode(crate::bundle::sha256_file(&bundle_path)?),
            compatible: manifest.compatible(),
            security_epoch: manifest.security_epoch,
            root_hash: root_hash.clone(),
            root_fs_bytes: std::fs::metadata(&root_img)?.len(),
            root_verity_bytes: std::fs::metadata(&verity_img)?.len(),
            kernel_version: kernel_version.clone(),
            kernel_cmdline: cmdline.clone(),
            selinux_policy: policy_name.clone(),
            selinux_modules: modules.clone(),
            partitions,
            packages: packages.iter().cloned().collect(),
            labels: labels.clone(),
            trees_reused: trees.reused,
            pcr11: pcr11.clone(),
            tpm_policy_public_key_sha256: pcr_policy_key.map(|k| k.public_sha256.clone()),
            secure_boot: signing_key.map(|key| SecureBootSigning {
                certificate_subject: key.subject.clone(),
                certificate_sha256: key.cert_sha256.clone(),
                signed: vec![
                    "/EFI/BOOT/BOOTX64.EFI".into(),
                    format!("/EFI/Linux/{}", seal::uki_name(&manifest)),
                ],
            }),
            stages: Vec::new(),
            total_seconds: 0.0,
        })
    })?;
    let mut report = report;
    report.stages = stages.timings().to_vec();
    report.total_seconds = (stages.total().as_secs_f64() * 1000.0).round() / 1000.0;
    std::fs::write(
        staging.join(&names.report),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    publish(staging, log_path, &opts.output, names, &report)?;
    print_summary(&report, &opts.output);
    Ok(report)
}

/// Scratch space: next to the cache (same filesystem, so copies of cached
/// trees can be reflinks), never in /tmp (often a small tmpfs).
fn scratch_parent(cache: &Path) -> PathBuf {
    let dir = cache.join("scratch");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Moves the finished build from staging into the output directory and
/// writes `SHA256SUMS`.
fn publish(
    staging: &Path,
    log: &Path,
    output: &Path,
    names: &Outputs,
    report: &Report,
) -> Result<()> {
    let report_sha = hex::encode(Sha256::digest(std::fs::read(staging.join(&names.report))?));
    std::fs::write(
        staging.join("SHA256SUMS"),
        format!(
            "{}  {}\n{}  {}\n{}  {}\n",
            report.image_sha256,
            names.image,
            report.bundle_sha256,
            names.bundle,
            report_sha,
            names.report
        ),
    )?;
    let log_name = format!("{}.build.log", report.image.trim_end_matches(".raw"));
    std::fs::copy(log, staging.join(&log_name)).context("copying the build log")?;
    for name in [
        names.image.as_str(),
        names.bundle.as_str(),
        names.report.as_str(),
        names.selinux_dir.as_str(),
        "SHA256SUMS",
        log_name.as_str(),
    ] {
        let target = output.join(name);
        if target.is_dir() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(staging.join(name), &target)
            .with_context(|| format!("moving {name} into {}", output.display()))?;
    }
    Ok(())
}

/// The existing report, if the output already holds a build of these inputs.
fn reusable_report(output: &Path, names: &Outputs, digest: &str) -> Option<Report> {
    let text = std::fs::read_to_string(output.join(&names.report)).ok()?;
    let report: Report = serde_json::from_str(&text).ok()?;
    let image = std::fs::metadata(output.join(&names.image)).ok()?;
    let bundle = std::fs::metadata(output.join(&names.bundle)).ok()?;
    (report.input_digest == digest && image.is_file() && bundle.is_file()).then_some(report)
}

fn print_summary(report: &Report, output: &Path) {
    println!(
        "airlock: built {} in {:.1}s",
        output.join(&report.image).display(),
        report.total_seconds
    );
    println!(
        "airlock:   root hash {} (root filesystem {} MiB + verity {} MiB)",
        report.root_hash,
        report.root_fs_bytes / 1024 / 1024,
        report.root_verity_bytes / 1024 / 1024
    );
    println!(
        "airlock:   update bundle {} (unsigned: airlock sign --key KEY …)",
        output.join(&report.bundle).display()
    );
    match &report.secure_boot {
        Some(sb) => println!(
            "airlock:   Secure Boot: {} signed by {} (certificate sha256 {})",
            sb.signed.join(" and "),
            sb.certificate_subject,
            sb.certificate_sha256
        ),
        None => println!("airlock:   Secure Boot: NOT signed (a PC with Secure Boot on refuses this image; --secure-boot-key)"),
    }
    if let Some(last) = report.pcr11.last() {
        println!(
            "airlock:   TPM PCR 11 once booted ({}): {}",
            last.phase, last.sha256
        );
    }
    match &report.tpm_policy_public_key_sha256 {
        Some(key) => println!(
            "airlock:   PCR 11 policy signed for each boot phase by the key with sha256 {key}"
        ),
        None => println!("airlock:   PCR 11 policy: NOT signed (--tpm-policy-key)"),
    }
    println!(
        "airlock:   {} packages, kernel {}, SELinux policy {} (enforcing)",
        report.packages.len(),
        report.kernel_version,
        report.selinux_policy
    );
    let timings: Vec<String> = report
        .stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
        .collect();
    println!("airlock:   stages: {}", timings.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dist_file_exists_and_units_are_enabled_by_links_in_the_overlay() {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in APPLIANCE_FILES {
            assert!(source.join(f.source).is_file(), "{} is missing", f.source);
        }
        for link in [
            "overlay/etc/systemd/system/boot-complete.target.requires/airlock-update-health.service",
            "overlay/etc/systemd/system/airlock.target.wants/airlock-update-drop.path",
            "overlay/etc/systemd/system/airlock.target.wants/airlock-update-fetch.timer",
        ] {
            let target = std::fs::read_link(source.join(link)).unwrap_or_else(|e| panic!("{link}: {e}"));
            let name = target.file_name().unwrap().to_string_lossy().into_owned();
            assert!(APPLIANCE_FILES.iter().any(|f| f.destination == target.to_string_lossy() && f.destination.ends_with(&name)), "{link} -> {} is not an installed unit", target.display());
        }
    }
}
