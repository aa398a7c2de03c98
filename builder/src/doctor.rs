//! `airlock doctor`: which host tools are missing, and which package gives them.
//!
//! `build` runs the same check first and stops before doing any work.

use std::path::Path;

use anyhow::{bail, Result};

use crate::exec::find_program;

/// What a tool is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Every build.
    Build,
    /// Building a Debian image.
    Debian,
    /// Building a Fedora image.
    Fedora,
    /// `airlock qemu` and the acceptance suite.
    Boot,
    /// `airlock flash` (with `sfdisk`, listed for builds).
    Flash,
    /// `airlock genkeys --secure-boot` and signed builds.
    SecureBoot,
    /// `airlock qemu --secure-boot-keys` and the acceptance suite: an OVMF
    /// variable store with the keys enrolled.
    SecureBootVm,
}

/// A host tool and the packages that provide it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub debian_package: &'static str,
    pub fedora_package: &'static str,
    pub need: Need,
}

const fn tool(
    program: &'static str,
    debian_package: &'static str,
    fedora_package: &'static str,
    need: Need,
) -> Tool {
    Tool {
        program,
        debian_package,
        fedora_package,
        need,
    }
}

/// Every external program the builder calls.
pub const TOOLS: &[Tool] = &[
    tool("mmdebstrap", "mmdebstrap", "mmdebstrap", Need::Debian),
    tool("dpkg-query", "dpkg", "dpkg", Need::Debian),
    tool("dnf", "dnf", "dnf", Need::Fedora),
    tool("rpm", "rpm", "rpm", Need::Fedora),
    tool("mkfs.erofs", "erofs-utils", "erofs-utils", Need::Build),
    tool("veritysetup", "cryptsetup-bin", "cryptsetup", Need::Build),
    tool("mkfs.vfat", "dosfstools", "dosfstools", Need::Build),
    tool("mmd", "mtools", "mtools", Need::Build),
    tool("mcopy", "mtools", "mtools", Need::Build),
    tool("sfdisk", "fdisk", "util-linux", Need::Build),
    tool("mkfs.ext4", "e2fsprogs", "e2fsprogs", Need::Build),
    tool("unshare", "util-linux", "util-linux", Need::Build),
    tool("chroot", "coreutils", "coreutils", Need::Build),
    tool("losetup", "mount", "util-linux", Need::Flash),
    tool("mount", "mount", "util-linux", Need::Flash),
    tool("blockdev", "util-linux", "util-linux", Need::Flash),
    tool("e2fsck", "e2fsprogs", "e2fsprogs", Need::Flash),
    tool("resize2fs", "e2fsprogs", "e2fsprogs", Need::Flash),
    tool("dumpe2fs", "e2fsprogs", "e2fsprogs", Need::Flash),
    tool("cryptsetup", "cryptsetup-bin", "cryptsetup", Need::Flash),
    tool("qemu-img", "qemu-utils", "qemu-img", Need::Flash),
    tool("openssl", "openssl", "openssl", Need::SecureBoot),
    tool(
        "virt-fw-vars",
        "python3-virt-firmware (from bookworm-backports on Debian 12)",
        "python3-virt-firmware",
        Need::SecureBootVm,
    ),
    tool(
        "qemu-system-x86_64",
        "qemu-system-x86 (from bookworm-backports on Debian 12)",
        "qemu-system-x86-core",
        Need::Boot,
    ),
];

/// Firmware files `airlock qemu` needs (any one pair).
const OVMF_CODE: &[&str] = &[
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/edk2/ovmf/OVMF_CODE.fd",
    "/usr/share/OVMF/OVMF_CODE.fd",
];

/// A missing tool, as a line for the user.
pub fn describe_missing(tool: &Tool) -> String {
    format!(
        "missing `{}`: install Debian package `{}` (Fedora: `{}`)",
        tool.program, tool.debian_package, tool.fedora_package
    )
}

/// Tools needed for `needs` that are not on this host.
pub fn missing_tools(needs: &[Need]) -> Vec<&'static Tool> {
    TOOLS
        .iter()
        .filter(|t| needs.contains(&t.need) && find_program(t.program).is_none())
        .collect()
}

/// Fails with every missing tool named, or returns Ok.
pub fn require(needs: &[Need]) -> Result<()> {
    let missing = missing_tools(needs);
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|t| format!("  {}", describe_missing(t)))
        .collect();
    bail!(
        "host tools missing (run `airlock doctor`):\n{}",
        lines.join("\n")
    )
}

/// True when running as root (needed for the root-mode bootstrap and chroots).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The report printed by `airlock doctor`; returns whether all is well.
pub fn report() -> bool {
    let mut ok = true;
    for t in TOOLS {
        let found = find_program(t.program);
        let scope = match t.need {
            Need::Build => "build",
            Need::Debian => "debian",
            Need::Fedora => "fedora",
            Need::Boot => "boot",
            Need::Flash => "flash",
            Need::SecureBoot => "sboot",
            Need::SecureBootVm => "sb-vm",
        };
        match found {
            Some(path) => println!("ok       {:<20} {:<7} {}", t.program, scope, path.display()),
            None => {
                ok = false;
                println!(
                    "MISSING  {:<20} {:<7} {}",
                    t.program,
                    scope,
                    describe_missing(t)
                );
            }
        }
    }
    match OVMF_CODE.iter().find(|p| Path::new(p).exists()) {
        Some(p) => println!("ok       {:<20} {:<7} {p}", "OVMF", "boot"),
        None => {
            ok = false;
            println!(
                "MISSING  {:<20} {:<7} install Debian package `ovmf` (Fedora: `edk2-ovmf`)",
                "OVMF", "boot"
            );
        }
    }
    if !is_root() {
        println!("note     building needs root (mmdebstrap --mode=root, chroot)");
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_message_names_both_packages() {
        let t = tool(
            "mkfs.erofs",
            "erofs-utils",
            "erofs-utils-fedora",
            Need::Build,
        );
        let m = describe_missing(&t);
        assert!(
            m.contains("`mkfs.erofs`")
                && m.contains("`erofs-utils`")
                && m.contains("`erofs-utils-fedora`")
        );
    }
}
