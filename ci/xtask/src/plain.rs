//! A plain Debian disk image for the boot-time comparison: the same package
//! tree and kernel as the appliance (the builder's cached image base, before
//! any overlay or policy), the same initrd, boot loader and UKI machinery —
//! but an ext4 root mounted read-write, no dm-verity, no SELinux (the
//! kernel's default LSMs), no lockdown (a getty on the serial console).
//! Only the differences the appliance adds remain between the two.

use std::path::{Path, PathBuf};

use airlock::disk::{self, Content, Layout, Partition};
use airlock::exec::Runner;
use airlock::manifest::load_manifest;
use airlock::rootfs::{self, Cache};
use airlock::seal;
use anyhow::{Context, Result};
use xshell::cmd;

const MIB: u64 = 1024 * 1024;

/// Builds `plain.raw` in `dir` from `manifest`'s cached trees; returns its path.
pub fn build_plain_image(
    source: &Path,
    manifest_path: &Path,
    cache_dir: &Path,
    dir: &Path,
) -> Result<PathBuf> {
    let manifest = load_manifest(manifest_path)?;
    let runner = Runner::new(false)?;
    let sets = rootfs::load_package_sets(&source.join("rootfs"), &manifest)?;
    let cache = Cache {
        root: cache_dir.to_path_buf(),
    };
    std::fs::create_dir_all(dir)?;
    let scratch = tempfile::Builder::new().prefix("plain-").tempdir_in(dir)?;
    let scratch = scratch.path();
    let trees = rootfs::prepare_trees(&runner, &manifest, &sets, &cache, scratch, true)?;
    let (kernel_version, kernel) = rootfs::find_kernel(&trees.image_base)?;
    let cached_initrd = cache
        .trees(&rootfs::tree_key(&manifest, &sets))
        .join(format!("initrd-{}.img", seal::initrd_recipe_digest()));
    seal::make_initrd(
        &runner,
        &trees.tools,
        scratch,
        &kernel_version,
        &cached_initrd,
    )?;

    let root_uuid = disk::derived_uuid(&manifest, "plain-root");
    let root_img = scratch.join("root.ext4");
    let sh = runner.sh();
    let tree = &trees.image_base;
    let size = format!("{}M", manifest.partitions.root_mib + 512);
    runner.run(
        "making the plain ext4 root",
        cmd!(sh, "mkfs.ext4 -q -F -d {tree} {root_img} {size}"),
    )?;
    let cmdline = format!("root=PARTUUID={root_uuid} rw console=ttyS0,115200");
    let os_release = std::fs::read_to_string(tree.join("usr/lib/os-release"))?;
    let uki = seal::make_uki(
        &runner,
        &trees.tools,
        scratch,
        &seal::UkiInputs {
            kernel: &kernel,
            kernel_version: &kernel_version,
            cmdline: &cmdline,
            os_release: &os_release,
            pcr_policy_key: None,
        },
    )?
    .path;
    let esp_img = scratch.join("esp.img");
    let boot_efi = trees
        .tools
        .join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    let esp = seal::EspContents {
        boot_efi: &boot_efi,
        uki: &uki,
        build_info: "{}",
    };
    seal::make_esp(&runner, &manifest, &esp, scratch, &esp_img)?;

    let esp_size = manifest.partitions.esp_mib * MIB;
    let root_size = std::fs::metadata(&root_img)?.len().div_ceil(MIB) * MIB;
    let layout = Layout {
        disk_uuid: disk::derived_uuid(&manifest, "plain-disk").to_string(),
        size: MIB + esp_size + root_size + MIB,
        partitions: vec![
            Partition {
                number: 1,
                label: "esp".into(),
                type_uuid: disk::types::ESP.into(),
                uuid: disk::derived_uuid(&manifest, "plain-esp").to_string(),
                offset: MIB,
                size: esp_size,
            },
            Partition {
                number: 2,
                label: "root".into(),
                type_uuid: disk::types::ROOT_X86_64.into(),
                uuid: root_uuid.to_string(),
                offset: MIB + esp_size,
                size: root_size,
            },
        ],
    };
    let out = dir.join("plain.raw");
    let contents = [
        Content {
            partition: &layout.partitions[0],
            image: &esp_img,
        },
        Content {
            partition: &layout.partitions[1],
            image: &root_img,
        },
    ];
    disk::assemble(&runner, &layout, &contents, &out).context("assembling the plain image")?;
    Ok(out)
}
