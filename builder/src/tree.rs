//! Stages *overlay*, *policy* and *label*: everything done to the image tree
//! before it is sealed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use walkdir::WalkDir;
use xshell::cmd;

use crate::exec::Runner;

/// Copies each overlay directory over the tree, in order. Symlinks are kept
/// as symlinks (units are masked with `-> /dev/null` links).
pub fn apply_overlays(runner: &Runner, tree: &Path, overlays: &[PathBuf]) -> Result<()> {
    for dir in overlays {
        if !dir.is_dir() {
            bail!("overlay directory {} does not exist", dir.display());
        }
        let sh = runner.sh();
        let src = format!("{}/.", dir.display());
        // --no-preserve=ownership: files from the git checkout belong to root in the image.
        runner.run(
            "copying overlay",
            cmd!(sh, "cp -a --no-preserve=ownership {src} {tree}"),
        )?;
    }
    Ok(())
}

/// A binary to install into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinarySpec {
    /// Cargo package that builds it.
    pub package: &'static str,
    /// Name of the binary target.
    pub binary: &'static str,
    /// Absolute path inside the image.
    pub destination: &'static str,
}

/// Builds `binaries` with cargo from `workspace` and installs them into `tree`.
pub fn install_binaries(
    runner: &Runner,
    workspace: &Path,
    tree: &Path,
    binaries: &[BinarySpec],
) -> Result<()> {
    if binaries.is_empty() {
        return Ok(());
    }
    let sh = runner.sh();
    let _dir = sh.push_dir(workspace);
    let mut args: Vec<String> = vec!["build".into(), "--release".into(), "--locked".into()];
    for b in binaries {
        args.push(format!("--package={}", b.package));
        args.push(format!("--bin={}", b.binary));
    }
    runner.run(
        "building appliance binaries (cargo)",
        cmd!(sh, "cargo {args...}"),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    for b in binaries {
        let built = target.join("release").join(b.binary);
        let dest = tree.join(b.destination.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("absolute destination"))?;
        std::fs::copy(&built, &dest)
            .with_context(|| format!("installing {} to {}", built.display(), b.destination))?;
    }
    Ok(())
}

/// A file of the source tree to install into the image (a crate's `dist/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistFile {
    /// Relative to the source tree.
    pub source: &'static str,
    /// Absolute path inside the image.
    pub destination: &'static str,
}

/// Copies each file to its place in the tree (mode 0644).
pub fn install_files(source: &Path, tree: &Path, files: &[DistFile]) -> Result<()> {
    for f in files {
        let from = source.join(f.source);
        let dest = tree.join(f.destination.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("absolute destination"))?;
        std::fs::copy(&from, &dest)
            .with_context(|| format!("installing {} to {}", from.display(), f.destination))?;
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }
    Ok(())
}

/// Creates empty directories (mount points) in the tree.
pub fn make_mount_points(tree: &Path, dirs: &[&str]) -> Result<()> {
    for d in dirs {
        let path = tree.join(d);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating mount point {}", path.display()))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(())
}

/// The update agent's settings file in the tree.
const UPDATE_SETTINGS: &str = "etc/airlock/update.toml";

/// Installs the manifest's trusted update keys where the update agent reads
/// them, and their threshold into its settings (`/etc/airlock/update.toml`).
pub fn install_trusted_keys(tree: &Path, keys: &crate::manifest::TrustedKeys) -> Result<()> {
    let dest = tree.join(crate::manifest::TRUSTED_KEYS_PATH.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("absolute path"))?;
    std::fs::write(&dest, &keys.text).with_context(|| format!("writing {}", dest.display()))?;
    std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let settings = tree.join(UPDATE_SETTINGS);
    let text = match std::fs::read_to_string(&settings) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", settings.display())),
    };
    std::fs::write(
        &settings,
        set_top_level_key(&text, "threshold", &keys.threshold.to_string()),
    )
    .with_context(|| format!("writing {}", settings.display()))
}

/// Sets a top-level `key = value` in TOML text (pure): replaces the
/// assignment before the first table, or adds one there. Comments and
/// everything else stay as they are.
pub fn set_top_level_key(text: &str, key: &str, value: &str) -> String {
    let line = format!("{key} = {value}");
    let mut out = Vec::new();
    let mut done = false;
    for l in text.lines() {
        let trimmed = l.trim_start();
        if !done && trimmed.starts_with('[') {
            out.push(line.clone());
            done = true;
        }
        let is_key = trimmed
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if !done && is_key {
            out.push(line.clone());
            done = true;
            continue;
        }
        out.push(l.to_owned());
    }
    if !done {
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// Removes a file or a directory tree; nothing to do if it is absent.
pub fn remove_if_present(path: &Path) -> Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.with_context(|| format!("removing {}", path.display()))
}

/// Locks every account in a shadow file: the password field becomes `!*`
/// (no password can ever match), so rescue and emergency mode give no
/// shell. The "last changed" day, which the bootstrap sets to the day it
/// ran, becomes `last_change_day` so the same inputs give the same root.
pub fn lock_all_accounts(shadow: &str, last_change_day: u64) -> String {
    let day = last_change_day.to_string();
    shadow
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 2 {
                fields[1] = "!*";
            }
            if fields.len() >= 3 && !fields[2].is_empty() {
                fields[2] = &day;
            }
            fields.join(":")
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Locks all accounts of the tree (`/etc/shadow`, and `/etc/shadow-`).
pub fn lock_accounts(tree: &Path) -> Result<()> {
    for name in ["etc/shadow", "etc/shadow-"] {
        let path = tree.join(name);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let day = crate::exec::source_date_epoch() / 86_400;
        std::fs::write(&path, lock_all_accounts(&text, day))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Sets `SELINUX=enforcing` in the tree's `/etc/selinux/config` and returns
/// the policy name (`SELINUXTYPE`).
pub fn enforce_selinux(tree: &Path) -> Result<String> {
    let path = tree.join("etc/selinux/config");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is the distro's SELinux policy installed?)",
            path.display()
        )
    })?;
    let mut policy = None;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("SELINUX=") {
            out.push_str("SELINUX=enforcing\n");
            continue;
        }
        if let Some(v) = line.trim_start().strip_prefix("SELINUXTYPE=") {
            policy = Some(v.trim().to_string());
        }
        out.push_str(line);
        out.push('\n');
    }
    if !out.contains("SELINUX=enforcing") {
        out.push_str("SELINUX=enforcing\n");
    }
    let policy = policy.with_context(|| format!("{} has no SELINUXTYPE", path.display()))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    Ok(policy)
}

/// Compiles every module (`NAME.te` with optional `.fc`/`.if`) found in
/// `policy_dirs` inside the tools tree, against the image's own policy
/// development files, then installs them and the booleans listed in each
/// directory's `booleans` file into the image tree's policy store.
///
/// Compiled modules are cached in `pp_cache`, keyed by their sources (the
/// tools tree is already fixed by the cache directory's own key).
pub fn install_policy(
    runner: &Runner,
    tools_tree: &Path,
    image_tree: &Path,
    scratch: &Path,
    policy_dirs: &[PathBuf],
    pp_cache: &Path,
) -> Result<Vec<String>> {
    let build = scratch.join("policy");
    std::fs::create_dir_all(&build)?;
    let mut modules = Vec::new();
    let mut booleans = Vec::new();
    for dir in policy_dirs {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if ["te", "fc", "if"]
                .iter()
                .any(|ext| path.extension().is_some_and(|e| e == *ext))
            {
                std::fs::copy(&path, build.join(&name))?;
                if name.ends_with(".te") {
                    modules.push(name.trim_end_matches(".te").to_string());
                }
            } else if name == "booleans" {
                let text = std::fs::read_to_string(&path)?;
                booleans.extend(crate::rootfs::parse_package_list(&text));
            }
        }
    }
    modules.sort();
    std::fs::create_dir_all(pp_cache)?;
    for module in &modules {
        let mut h = Sha256::new();
        for ext in ["te", "fc", "if"] {
            if let Ok(bytes) = std::fs::read(build.join(format!("{module}.{ext}"))) {
                h.update(ext);
                h.update(bytes.len().to_le_bytes());
                h.update(bytes);
            }
        }
        let cached = pp_cache.join(format!("{module}-{}.pp", &hex::encode(h.finalize())[..16]));
        let pp = build.join(format!("{module}.pp"));
        if cached.exists() {
            std::fs::copy(&cached, &pp)?;
            continue;
        }
        runner.in_tree(
            &format!("compiling SELinux module {module}"),
            tools_tree,
            scratch,
            [
                "make",
                "-C",
                "/run/airlock/policy",
                "-f",
                "/usr/share/selinux/devel/Makefile",
                &format!("{module}.pp"),
            ],
        )?;
        std::fs::copy(&pp, &cached)?;
    }
    // semodule runs in the image tree (without mounts): it only rebuilds the
    // tree's policy store, the binary policy and file_contexts.
    let staging = image_tree.join("tmp/airlock-policy");
    std::fs::create_dir_all(&staging)?;
    let mut argv: Vec<String> = vec!["semodule".into(), "-n".into()];
    for module in &modules {
        std::fs::copy(
            build.join(format!("{module}.pp")),
            staging.join(format!("{module}.pp")),
        )?;
        argv.push("-i".into());
        argv.push(format!("/tmp/airlock-policy/{module}.pp"));
    }
    if !modules.is_empty() {
        require_neverallow_checks(image_tree)?;
        // -n: rebuild the store, binary policy and file_contexts, but don't
        // try to load anything into the (host's) kernel.
        runner.in_tree_plain("installing SELinux modules (semodule)", image_tree, &argv).context(
            "the SELinux modules were not installed; if the output above says 'neverallow check failed', \
             it names the rule (policy/airlock.te states the isolation promises as neverallow rules) \
             and the module whose allow rule breaks it",
        )?;
    }
    if !booleans.is_empty() {
        let mut argv: Vec<String> = vec!["setsebool".into(), "-P".into(), "-N".into()];
        argv.extend(booleans.iter().cloned());
        runner.in_tree_plain("setting SELinux booleans", image_tree, &argv)?;
    }
    std::fs::remove_dir_all(&staging)?;
    Ok(modules)
}

/// Makes semodule check every neverallow rule when it links the policy.
/// Distros ship `expand-check=0` (faster module installs); airlock's
/// isolation promises are neverallow rules, so a build must never skip them.
pub fn require_neverallow_checks(tree: &Path) -> Result<()> {
    let path = tree.join("etc/selinux/semanage.conf");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("expand-check"))
        .flat_map(|line| [line, "\n"])
        .collect();
    out.push_str("# airlock: neverallow rules are the isolation promises; always check them.\nexpand-check=1\n");
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
}

/// Path of the tree's file_contexts for policy `policy`.
pub fn file_contexts(tree: &Path, policy: &str) -> PathBuf {
    tree.join("etc/selinux")
        .join(policy)
        .join("contexts/files/file_contexts")
}

/// Labels the tree on disk (xattrs) from its own file_contexts: the data
/// partition keeps these, and the label gate reads them.
pub fn label_tree(runner: &Runner, tree: &Path, policy: &str) -> Result<()> {
    let fc = format!("/etc/selinux/{policy}/contexts/files/file_contexts");
    // -F force, -m don't read mounts (none in a plain chroot anyway); the
    // binary policy validates every context.
    let policy_file = find_policy_file(tree, policy)?;
    let policy_in_tree = format!(
        "/{}",
        policy_file
            .strip_prefix(tree)
            .expect("inside tree")
            .display()
    );
    runner.in_tree_plain(
        "labelling the tree (setfiles)",
        tree,
        ["setfiles", "-F", "-m", "-c", &policy_in_tree, &fc, "/"],
    )?;
    Ok(())
}

/// The compiled policy file (`policy.NN`) of the tree.
pub fn find_policy_file(tree: &Path, policy: &str) -> Result<PathBuf> {
    let dir = tree.join("etc/selinux").join(policy).join("policy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("policy."))
        })
        .collect();
    files.sort();
    files
        .pop()
        .with_context(|| format!("no compiled policy in {}", dir.display()))
}

/// Mount points of API filesystems: mounted over at boot (their labels come
/// from the mount), and setfiles leaves them alone. `/boot` stays out of the
/// image.
const GATE_SKIP: &[&str] = &["proc", "sys", "dev", "run", "tmp", "boot"];

/// The label gate: every file of the tree must carry an SELinux label, and
/// none may be `unlabeled_t`. Returns a count of labels per type.
pub fn label_gate(tree: &Path) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    let mut problems = Vec::new();
    let mut checked = 0usize;
    let walker = WalkDir::new(tree)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| {
            let rel = e.path().strip_prefix(tree).unwrap_or(e.path());
            match rel.components().next() {
                Some(first) => !GATE_SKIP.contains(&first.as_os_str().to_string_lossy().as_ref()),
                None => true,
            }
        });
    for entry in walker {
        let entry = entry.with_context(|| format!("walking {}", tree.display()))?;
        checked += 1;
        let rel = entry.path().strip_prefix(tree).unwrap_or(entry.path());
        match xattr::get(entry.path(), "security.selinux") {
            Ok(Some(raw)) => {
                let label = String::from_utf8_lossy(&raw)
                    .trim_end_matches('\0')
                    .to_string();
                let ty = label.split(':').nth(2).unwrap_or("").to_string();
                if ty.is_empty() || ty == "unlabeled_t" {
                    problems.push(format!("/{}: {label}", rel.display()));
                }
                *counts.entry(ty).or_insert(0) += 1;
            }
            Ok(None) => problems.push(format!("/{}: no label", rel.display())),
            Err(e) => problems.push(format!("/{}: {e}", rel.display())),
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(20).collect();
        bail!(
            "label gate: {} of {checked} files are unlabelled or unlabeled_t (file_contexts has no rule for them):\n  {}",
            problems.len(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
        );
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neverallow_checks_are_switched_on_whatever_the_distro_ships() {
        for shipped in [
            "module-store = direct\nexpand-check=0\n",
            "module-store = direct\n",
            "expand-check = 0\nexpand-check=1\n",
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("etc/selinux")).unwrap();
            std::fs::write(dir.path().join("etc/selinux/semanage.conf"), shipped).unwrap();
            require_neverallow_checks(dir.path()).unwrap();
            let text =
                std::fs::read_to_string(dir.path().join("etc/selinux/semanage.conf")).unwrap();
            let settings: Vec<&str> = text
                .lines()
                .filter(|l| l.trim_start().starts_with("expand-check"))
                .collect();
            assert_eq!(settings, ["expand-check=1"], "from {shipped:?}");
            assert_eq!(
                text.contains("module-store"),
                shipped.contains("module-store")
            );
        }
    }

    #[test]
    fn remove_if_present_takes_files_dirs_and_absence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let sub = dir.path().join("d/e");
        std::fs::write(&file, "x").unwrap();
        std::fs::create_dir_all(&sub).unwrap();
        remove_if_present(&file).unwrap();
        remove_if_present(&dir.path().join("d")).unwrap();
        remove_if_present(&dir.path().join("missing")).unwrap();
        assert!(!file.exists() && !dir.path().join("d").exists());
    }

    #[test]
    fn every_account_is_locked() {
        let shadow = "root:*:20000:0:99999:7:::\nsystemd-network:!*:20000::::::\nalice:$y$j9T$abc:20000:0:99999:7:::";
        let locked = lock_all_accounts(shadow, 20089);
        for line in locked.lines() {
            assert_eq!(line.split(':').nth(1), Some("!*"), "{line}");
            assert_eq!(line.split(':').nth(2), Some("20089"), "{line}");
        }
        assert_eq!(locked.lines().count(), 3);
        assert!(locked.starts_with("root:!*:20089:0:99999:7:::\n"));
    }

    #[test]
    fn selinux_config_becomes_enforcing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/selinux")).unwrap();
        std::fs::write(
            dir.path().join("etc/selinux/config"),
            "# c\nSELINUX=permissive\nSELINUXTYPE=default\n",
        )
        .unwrap();
        assert_eq!(enforce_selinux(dir.path()).unwrap(), "default");
        let text = std::fs::read_to_string(dir.path().join("etc/selinux/config")).unwrap();
        assert!(text.contains("SELINUX=enforcing\n") && !text.contains("permissive"));
    }

    #[test]
    fn top_level_key_is_replaced_or_added_before_the_first_table() {
        let shipped =
            "# keys\nallowed_signers = \"/k\"\nthreshold = 1\n\n[health]\nthreshold_x = 3\n";
        assert_eq!(
            set_top_level_key(shipped, "threshold", "2"),
            "# keys\nallowed_signers = \"/k\"\nthreshold = 2\n\n[health]\nthreshold_x = 3\n"
        );
        assert_eq!(
            set_top_level_key("[health]\nx = 1\n", "threshold", "2"),
            "threshold = 2\n[health]\nx = 1\n"
        );
        assert_eq!(set_top_level_key("", "threshold", "2"), "threshold = 2\n");
        // A key of the same name inside a table is not the top-level one.
        assert_eq!(
            set_top_level_key("a = 1\n[t]\nthreshold = 5\n", "threshold", "2"),
            "a = 1\nthreshold = 2\n[t]\nthreshold = 5\n"
        );
    }

    #[test]
    fn label_gate_refuses_unlabelled_files() {
        // Needs a filesystem with user xattrs; security.* needs root, so
        // this checks the "no label" path, which needs neither.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        let err = label_gate(dir.path()).unwrap_err().to_string();
        assert!(err.contains("/file: no label"), "{err}");
    }
}
