//! Finding a Debian kernel (and its modules) to boot the test guest with.
//!
//! In order: `AIRLOCK_TEST_KERNEL` (a vmlinuz path), the kernels in the
//! builder's cached image trees (`/var/cache/airlock/trees/*/image/boot/`,
//! newest first), the host's own `/boot/vmlinuz-*`. Modules come from the
//! `lib/modules/<release>/` next to the kernel's `boot/`, when present.

use std::path::{Path, PathBuf};

/// A kernel to boot, and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` matching it, if it exists.
    pub modules: Option<PathBuf>,
    /// How it was chosen, for test logs.
    pub source: String,
}

impl Kernel {
    fn at(vmlinuz: PathBuf, source: String) -> Kernel {
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .map(str::to_owned);
        let root = vmlinuz.parent().and_then(Path::parent);
        let modules = match (root, release) {
            (Some(root), Some(rel)) => {
                Some(root.join("lib/modules").join(rel)).filter(|p| p.is_dir())
            }
            _ => None,
        };
        Kernel {
            vmlinuz,
            modules,
            source,
        }
    }

    /// A module's file (e.g. `kernel/drivers/acpi/button.ko.xz`), if present.
    pub fn module(&self, relative: &str) -> Option<PathBuf> {
        self.modules
            .as_ref()
            .map(|m| m.join(relative))
            .filter(|p| p.is_file())
    }
}

fn readable(path: &Path) -> bool {
    std::fs::File::open(path).is_ok()
}

/// `vmlinuz-*` files in `dir`, newest first.
fn kernels_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .filter(|e| readable(&e.path()))
        .map(|e| {
            (
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                e.path(),
            )
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The places looked at, in order, for error messages.
pub const SEARCHED: &str =
    "$AIRLOCK_TEST_KERNEL, /var/cache/airlock/trees/*/image/boot/vmlinuz-* (made by `airlock build`), /boot/vmlinuz-*";

/// The first usable kernel, or `None` (the caller says what was searched).
pub fn find() -> Option<Kernel> {
    if let Some(path) = std::env::var_os("AIRLOCK_TEST_KERNEL") {
        let path = PathBuf::from(path);
        if readable(&path) {
            return Some(Kernel::at(path, "$AIRLOCK_TEST_KERNEL".into()));
        }
    }
    let mut trees: Vec<PathBuf> = std::fs::read_dir("/var/cache/airlock/trees")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("image/boot"))
        .filter(|p| p.is_dir())
        .collect();
    trees.sort();
    let mut candidates: Vec<PathBuf> = trees.iter().flat_map(|d| kernels_in(d)).collect();
    if let Some(k) = candidates.drain(..).next() {
        return Some(Kernel::at(k, "the builder's cached image tree".into()));
    }
    kernels_in(Path::new("/boot"))
        .into_iter()
        .next()
        .map(|k| Kernel::at(k, "the host's /boot".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_found_next_to_boot() {
        let dir = tempfile_dir();
        let boot = dir.join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::create_dir_all(dir.join("lib/modules/6.1.0-x/kernel/drivers/acpi")).unwrap();
        std::fs::write(
            dir.join("lib/modules/6.1.0-x/kernel/drivers/acpi/button.ko.xz"),
            b"x",
        )
        .unwrap();
        std::fs::write(boot.join("vmlinuz-6.1.0-x"), b"k").unwrap();
        let k = Kernel::at(boot.join("vmlinuz-6.1.0-x"), "t".into());
        assert_eq!(k.modules, Some(dir.join("lib/modules/6.1.0-x")));
        assert!(k.module("kernel/drivers/acpi/button.ko.xz").is_some());
        assert!(k.module("kernel/drivers/input/evdev.ko.xz").is_none());
        assert_eq!(kernels_in(&boot), vec![boot.join("vmlinuz-6.1.0-x")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("airlock-test-guest-kernel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
