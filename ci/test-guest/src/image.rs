//! Putting the test guest together on the host: build the static `/init`
//! with cargo, pick a kernel, write the initramfs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::initramfs;
use crate::kernel::{self, Kernel};

/// Modules `/init` loads so that an ACPI power-button press reaches it
/// (without extension: trixie ships `.ko.xz`, bookworm plain `.ko`).
pub const POWER_BUTTON_MODULES: &[&str] =
    &["kernel/drivers/acpi/button", "kernel/drivers/input/evdev"];

/// Modules for `keys` besides `evdev` (in [`POWER_BUTTON_MODULES`]): the
/// driver of QEMU's `virtio-keyboard-pci` and `virtio-tablet-pci` (what the
/// appliance gives each guest as its pointer; no dependencies). The PS/2
/// keyboard on q35's i8042 needs none: Debian builds `i8042`, `serio`,
/// `libps2` and `atkbd` into the kernel (`CONFIG_KEYBOARD_ATKBD=y`). About
/// 8 KB compressed.
pub const INPUT_MODULES: &[&str] = &["kernel/drivers/virtio/virtio_input"];

/// Modules for `draw` on QEMU's `-device VGA`: the `bochs` DRM driver and
/// its dependencies (`modules.dep`), in load order. Debian builds them as
/// modules and has `CONFIG_DRM_FBDEV_EMULATION=y`, so once `bochs` binds
/// the card there is a `/dev/fb0`. Without a VGA card they load and bind
/// nothing. About 0.45 MB compressed.
pub const DISPLAY_MODULES: &[&str] = &[
    "kernel/drivers/gpu/drm/drm",
    "kernel/drivers/gpu/drm/drm_kms_helper",
    "kernel/drivers/gpu/drm/ttm/ttm",
    "kernel/drivers/gpu/drm/drm_ttm_helper",
    "kernel/drivers/gpu/drm/drm_vram_helper",
    "kernel/drivers/gpu/drm/tiny/bochs",
];

/// Modules for the network commands (`net-up`, `tcp-*`, `udp-*`,
/// `icmp-ping`): the `virtio_net` driver for QEMU's `-device virtio-net-pci`
/// (what the appliance gives each guest) and its dependencies
/// (`modules.dep`), in load order. IPv4, `af_packet` and virtio-PCI are
/// built into Debian's kernel. About 66 KB compressed. Without a NIC they
/// load and bind nothing.
pub const NET_MODULES: &[&str] = &[
    "kernel/net/core/failover",
    "kernel/drivers/net/net_failover",
    "kernel/drivers/net/virtio_net",
];

/// Module file name endings, in the order looked for.
const MODULE_SUFFIXES: &[&str] = &[".ko.xz", ".ko.zst", ".ko.gz", ".ko"];

/// A kernel and an initramfs ready for `-kernel` / `-initrd`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: Kernel,
    pub initrd: PathBuf,
    /// Modules that were put in the initramfs, in load order (those of
    /// [`POWER_BUTTON_MODULES`], [`INPUT_MODULES`], [`DISPLAY_MODULES`] and
    /// [`NET_MODULES`] the kernel has).
    pub modules: Vec<String>,
}

/// The workspace root (this crate is `ci/test-guest`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `/init` as a static executable (glibc, `crt-static`; no other
/// target needs installing) into its own target directory, so it never
/// waits on the lock of the cargo that runs the tests. Returns its path.
pub fn build_init() -> Result<PathBuf, String> {
    let target_dir = workspace().join("target/test-guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--release",
            "--quiet",
            "--locked",
            "-p",
            "airlock-test-guest",
            "--bin",
            "airlock-test-guest",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .map_err(|e| format!("running {}: {e}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        return Err(format!(
            "building the test guest's /init failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/airlock-test-guest"))
}

/// Builds `/init`, finds a kernel and writes `dir/initrd.cpio`.
pub fn prepare(dir: &Path) -> Result<GuestImage, String> {
    let kernel = kernel::find().ok_or_else(|| {
        format!(
            "no kernel for the test guest; looked at {}",
            kernel::SEARCHED
        )
    })?;
    let init = build_init()?;
    let init = std::fs::read(&init).map_err(|e| format!("reading {}: {e}", init.display()))?;
    let mut modules = Vec::new();
    for base in POWER_BUTTON_MODULES
        .iter()
        .chain(INPUT_MODULES)
        .chain(DISPLAY_MODULES)
        .chain(NET_MODULES)
    {
        let found = MODULE_SUFFIXES
            .iter()
            .find_map(|suffix| kernel.module(&format!("{base}{suffix}")));
        if let Some(path) = found {
            let data =
                std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let name = path
                .file_name()
                .expect("has a name")
                .to_string_lossy()
                .into_owned();
            modules.push((name, data));
        }
    }
    let initrd = dir.join("initrd.cpio");
    initramfs::test_guest(&init, &modules)
        .write_to(&initrd)
        .map_err(|e| format!("writing {}: {e}", initrd.display()))?;
    Ok(GuestImage {
        kernel,
        initrd,
        modules: modules.into_iter().map(|(n, _)| n).collect(),
    })
}
