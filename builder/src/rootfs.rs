//! Stage *rootfs*: bootstrapping the base distro with its own tool.
//!
//! One bootstrap makes the **tools tree**: the image's packages plus the
//! build-only ones (`rootfs/<distro>-tools.packages`: policy development
//! files, ukify, the stub). Policy modules, the initrd and the UKI are made
//! inside it, so they match the image's own packages exactly. The **image
//! tree** is a copy with the build-only packages purged. Both are cached,
//! keyed by a digest of everything that decides their content; downloaded
//! packages are cached separately, so even a cache miss downloads nothing
//! twice.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::cmd;

use crate::exec::Runner;
use crate::manifest::{Distro, Manifest, Repository};

/// Bump when the way trees are made changes, so old cached trees are not reused.
const TREE_FORMAT: u32 = 1;

/// Package lists of one distro, read from `rootfs/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSets {
    /// What the image ships (base list + manifest extras).
    pub image: Vec<String>,
    /// Build-only packages, never shipped.
    pub tools: Vec<String>,
}

/// Parses a package list: one name per line, `#` comments, blank lines.
pub fn parse_package_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads `rootfs/<distro>.packages` and `rootfs/<distro>-tools.packages`.
pub fn load_package_sets(rootfs_dir: &Path, manifest: &Manifest) -> Result<PackageSets> {
    let distro = manifest.distro_id();
    let read = |file: String| -> Result<Vec<String>> {
        let path = rootfs_dir.join(&file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading package list {}", path.display()))?;
        Ok(parse_package_list(&text))
    };
    let mut image = read(format!("{distro}.packages"))?;
    for extra in &manifest.packages.extra {
        if !image.contains(extra) {
            image.push(extra.clone());
        }
    }
    let tools = read(format!("{distro}-tools.packages"))?;
    Ok(PackageSets { image, tools })
}

/// Digest of everything that decides the trees' content.
pub fn tree_key(manifest: &Manifest, sets: &PackageSets) -> String {
    let mut h = Sha256::new();
    h.update(format!("format {TREE_FORMAT}\n"));
    h.update(serde_json::to_vec(&manifest.distro).expect("distro serialises"));
    h.update(format!(
        "\nimage {:?}\ntools {:?}\n",
        sets.image, sets.tools
    ));
    hex::encode(h.finalize())[..24].to_string()
}

/// Where builds keep what they can reuse.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn packages(&self, distro: &str) -> PathBuf {
        self.root.join("packages").join(distro)
    }
    pub fn trees(&self, key: &str) -> PathBuf {
        self.root.join("trees").join(key)
    }
}

/// The two trees a build works from.
#[derive(Debug, Clone)]
pub struct Trees {
    pub tools: PathBuf,
    pub image_base: PathBuf,
    /// True when both came from the cache.
    pub reused: bool,
}

/// Makes (or reuses) the tools tree and the image base tree.
pub fn prepare_trees(
    runner: &Runner,
    manifest: &Manifest,
    sets: &PackageSets,
    cache: &Cache,
    scratch: &Path,
    reuse: bool,
) -> Result<Trees> {
    let key = tree_key(manifest, sets);
    let dir = cache.trees(&key);
    let tools = dir.join("tools");
    let image_base = dir.join("image");
    let complete = dir.join("complete");
    if reuse && complete.exists() {
        runner.note(&format!("reusing cached trees {}", dir.display()));
        return Ok(Trees {
            tools,
            image_base,
            reused: true,
        });
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale tree cache {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let all: Vec<String> = sets.image.iter().chain(&sets.tools).cloned().collect();
    let packages = cache.packages(manifest.distro_id());
    std::fs::create_dir_all(&packages)
        .with_context(|| format!("creating package cache {}", packages.display()))?;
    match &manifest.distro {
        Distro::Debian { suite, mirrors } => {
            debian_bootstrap(runner, suite, mirrors, &all, &tools, &packages)?
        }
        Distro::Fedora {
            release,
            repositories,
        } => fedora_install(
            runner,
            *release,
            repositories,
            &all,
            &tools,
            &packages,
            scratch,
        )?,
    }
    copy_tree(runner, &tools, &image_base)?;
    match &manifest.distro {
        Distro::Debian { .. } => debian_purge(runner, &image_base, &sets.tools, scratch)?,
        Distro::Fedora { .. } => fedora_purge(runner, &image_base, &sets.tools)?,
    }
    std::fs::write(&complete, &key).context("marking tree cache complete")?;
    Ok(Trees {
        tools,
        image_base,
        reused: false,
    })
}

/// `cp -a`, preserving xattrs and hard links; reflinks where the filesystem can.
pub fn copy_tree(runner: &Runner, from: &Path, to: &Path) -> Result<()> {
    let sh = runner.sh();
    runner.run("copying tree", cmd!(sh, "cp -a --reflink=auto {from} {to}"))?;
    Ok(())
}

fn debian_bootstrap(
    runner: &Runner,
    suite: &str,
    mirrors: &[String],
    packages: &[String],
    tree: &Path,
    cache: &Path,
) -> Result<()> {
    let sh = runner.sh();
    let include = format!("--include={}", packages.join(","));
    let mkdir_hook = r#"--setup-hook=mkdir -p "$1"/var/cache/apt/archives"#;
    let sync_in_hook = format!(
        "--setup-hook=sync-in {} /var/cache/apt/archives/",
        cache.display()
    );
    // INITRD=No: the kernel package's hooks must not build an initrd; the
    // builder makes its own. Downloaded .deb files are kept in the tree
    // (--skip=…) and moved to the cache afterwards.
    let _env = sh.push_env("INITRD", "No");
    runner.run(
        "bootstrapping the Debian tree (mmdebstrap)",
        cmd!(
            sh,
            "mmdebstrap --mode=root --variant=minbase --format=directory {include}
              --skip=essential/unlink --skip=cleanup/apt/cache
              {mkdir_hook} {sync_in_hook}
              {suite} {tree} {mirrors...}"
        ),
    )?;
    // Move the downloaded packages into the cache.
    let archives = tree.join("var/cache/apt/archives");
    for entry in
        std::fs::read_dir(&archives).with_context(|| format!("reading {}", archives.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            let target = cache.join(path.file_name().expect("file name"));
            if std::fs::rename(&path, &target).is_err() {
                std::fs::copy(&path, &target)
                    .with_context(|| format!("caching {}", path.display()))?;
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

fn debian_purge(runner: &Runner, tree: &Path, tools: &[String], scratch: &Path) -> Result<()> {
    let mut argv: Vec<String> = [
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "purge",
        "-y",
        "-q",
        "--autoremove",
    ]
    .map(String::from)
    .to_vec();
    argv.extend(tools.iter().cloned());
    runner.in_tree(
        "removing build-only packages from the image tree",
        tree,
        scratch,
        argv,
    )?;
    Ok(())
}

/// The `.repo` file for the manifest's repositories (pure; see `fedora_install`).
pub fn dnf_repo_file(repositories: &[Repository]) -> String {
    let mut out = String::new();
    for repo in repositories {
        // metadata_expire=0: one repomd.xml request per build, never stale
        // metadata that points at packages the mirror has removed.
        out.push_str(&format!(
            "[{}]\nname={}\nbaseurl={}\nenabled=1\nmetadata_expire=0\nskip_if_unavailable=0\n",
            repo.id, repo.id, repo.baseurl
        ));
        match (&repo.gpgkey, repo.gpgcheck) {
            (Some(key), true) => {
                out.push_str(&format!("gpgcheck=1\nrepo_gpgcheck=0\ngpgkey={key}\n"))
            }
            (Some(key), false) => out.push_str(&format!("gpgcheck=0\ngpgkey={key}\n")),
            (None, _) => out.push_str("gpgcheck=0\n"),
        }
        out.push('\n');
    }
    out
}

/// Where Fedora keeps its package database; Debian's rpm defaults to
/// `~/.rpmdb`, so every rpm/dnf call names it explicitly.
pub const RPM_DBPATH: &str = "/usr/lib/sysimage/rpm";

/// Private configuration for one dnf run, outside the tree.
pub struct DnfConfig {
    /// `[main]` only: without `--config` the host's dnf.conf applies (which
    /// may set skip_if_unavailable=True and silently skip a broken repo).
    pub config: PathBuf,
    pub reposdir: PathBuf,
    pub varsdir: PathBuf,
    pub persistdir: PathBuf,
    /// HOME whose `.rpmmacros` sets `%_dbpath` (dnf has no option for it).
    pub home: PathBuf,
}

impl DnfConfig {
    pub fn under(dir: &Path) -> Self {
        DnfConfig {
            config: dir.join("dnf.conf"),
            reposdir: dir.join("repos.d"),
            varsdir: dir.join("vars"),
            persistdir: dir.join("state"),
            home: dir.join("home"),
        }
    }

    fn write(&self, repositories: &[Repository]) -> Result<()> {
        for d in [&self.reposdir, &self.varsdir, &self.persistdir, &self.home] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(&self.config, "[main]\n")?;
        std::fs::write(
            self.home.join(".rpmmacros"),
            format!("%_dbpath {RPM_DBPATH}\n"),
        )?;
        std::fs::write(
            self.reposdir.join("airlock.repo"),
            dnf_repo_file(repositories),
        )
        .context("writing dnf repository file")?;
        Ok(())
    }
}

/// The `dnf` arguments that install `packages` into `tree` from only the
/// manifest's repositories (pure, unit-tested).
pub fn dnf_install_args(
    release: u32,
    conf: &DnfConfig,
    tree: &Path,
    cache: &Path,
    packages: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--assumeyes".into(),
        "--quiet".into(),
        format!("--installroot={}", tree.display()),
        format!("--releasever={release}"),
        format!("--config={}", conf.config.display()),
        // Only our repositories: nothing from the host's /etc/yum.repos.d.
        format!("--setopt=reposdir={}", conf.reposdir.display()),
        format!("--setopt=varsdir={}", conf.varsdir.display()),
        format!("--setopt=persistdir={}", conf.persistdir.display()),
        format!("--setopt=cachedir={}", cache.display()),
        "--setopt=keepcache=True".into(),
        "--setopt=install_weak_deps=False".into(),
        "--setopt=tsflags=nodocs".into(),
        // dnf's built-in default is off; each repository may opt out only
        // through the manifest's explicit `gpgcheck = false`.
        "--setopt=gpgcheck=True".into(),
        "--setopt=best=True".into(),
        "--noplugins".into(),
        "install".into(),
    ];
    args.extend(packages.iter().cloned());
    args
}

/// Files dnf leaves in the installroot that belong to the build, not the image.
const DNF_LEFTOVERS: &[&str] = &[
    "var/log/dnf.log",
    "var/log/dnf.librepo.log",
    "var/log/dnf.rpm.log",
    "var/log/hawkey.log",
    "var/cache/dnf",
];

fn fedora_install(
    runner: &Runner,
    release: u32,
    repositories: &[Repository],
    packages: &[String],
    tree: &Path,
    cache: &Path,
    scratch: &Path,
) -> Result<()> {
    let conf = DnfConfig::under(&scratch.join("dnf"));
    conf.write(repositories)?;
    std::fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    let args = dnf_install_args(release, &conf, tree, cache, packages);
    let sh = runner.sh();
    let home = conf.home.display().to_string();
    // A clean environment; KERNEL_INSTALL_BYPASS keeps kernel-core's
    // scriptlets from running kernel-install/dracut inside the tree.
    runner.run(
        "installing the Fedora tree (dnf --installroot)",
        cmd!(sh, "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME={home} KERNEL_INSTALL_BYPASS=1 dnf {args...}"),
    )?;
    for rel in DNF_LEFTOVERS {
        crate::tree::remove_if_present(&tree.join(rel))?;
    }
    remove_unowned_dnf_dirs(runner, tree, cache)?;
    Ok(())
}

/// Directories dnf 4.14 makes in the installroot that no package may own:
/// the cachedir's whole path (its persistor writes `expired_repos.json`
/// there before `--setopt=cachedir` applies) and libdnf's empty
/// `/etc/dnf/modules.d`. Removed unless a package owns them (an image with
/// dnf in it owns `/etc/dnf`).
fn remove_unowned_dnf_dirs(runner: &Runner, tree: &Path, cache: &Path) -> Result<()> {
    let root = format!("--root={}", tree.display());
    let sh = runner.sh();
    let format = "[%{FILENAMES}\n]";
    let out = runner.run(
        "listing files owned by packages",
        cmd!(
            sh,
            "rpm {root} --dbpath {RPM_DBPATH} -qa --queryformat {format}"
        ),
    )?;
    let owned: std::collections::HashSet<&Path> = out.lines().map(Path::new).collect();
    // The first component of the cachedir's path that no package owns holds
    // nothing but dnf's file (the tree was empty before dnf ran).
    let mut abs = PathBuf::from("/");
    let relative = cache.strip_prefix("/").unwrap_or(Path::new(""));
    for component in relative.components() {
        if !matches!(component, std::path::Component::Normal(_)) {
            break; // never step out of the tree
        }
        abs.push(component);
        let path = tree.join(abs.strip_prefix("/").expect("absolute"));
        // Stop at a symlink too: an absolute link would lead out of the tree.
        if !path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            break;
        }
        if !owned.contains(abs.as_path()) {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            break;
        }
    }
    for dir in ["/etc/dnf/modules.d", "/etc/dnf"] {
        let path = tree.join(&dir[1..]);
        if !owned.contains(Path::new(dir)) && path.is_dir() {
            // Only when empty; anything inside came from a package.
            let _ = std::fs::remove_dir(&path);
        }
    }
    Ok(())
}

fn fedora_purge(runner: &Runner, tree: &Path, tools: &[String]) -> Result<()> {
    // rpm -e of packages that are not installed fails; only remove what is there.
    let installed = installed_packages_rpm(runner, tree)?;
    let remove: Vec<&String> = tools
        .iter()
        .filter(|t| installed.iter().any(|(n, _)| n == *t))
        .collect();
    if remove.is_empty() {
        return Ok(());
    }
    let root = format!("--root={}", tree.display());
    let sh = runner.sh();
    runner.run(
        "removing build-only packages from the image tree",
        cmd!(
            sh,
            "rpm {root} --dbpath {RPM_DBPATH} -e --nodeps --noscripts {remove...}"
        ),
    )?;
    Ok(())
}

/// `(name, version)` of every package installed in `tree`.
pub fn installed_packages(
    runner: &Runner,
    manifest: &Manifest,
    tree: &Path,
) -> Result<Vec<(String, String)>> {
    match manifest.distro {
        Distro::Debian { .. } => {
            let admindir = tree.join("var/lib/dpkg");
            let sh = runner.sh();
            let format = "${Package}\t${Version}\n";
            let out = runner.run(
                "listing installed packages",
                cmd!(sh, "dpkg-query --admindir={admindir} -W -f {format}"),
            )?;
            Ok(parse_name_version(&out))
        }
        Distro::Fedora { .. } => installed_packages_rpm(runner, tree),
    }
}

fn installed_packages_rpm(runner: &Runner, tree: &Path) -> Result<Vec<(String, String)>> {
    let root = format!("--root={}", tree.display());
    let sh = runner.sh();
    let format = "%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n";
    let out = runner.run(
        "listing installed packages",
        cmd!(
            sh,
            "rpm {root} --dbpath {RPM_DBPATH} -qa --queryformat {format}"
        ),
    )?;
    // gpg-pubkey entries are imported keys, not packages.
    Ok(parse_name_version(&out)
        .into_iter()
        .filter(|(n, _)| n != "gpg-pubkey")
        .collect())
}

fn parse_name_version(text: &str) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    list.sort();
    list
}

/// The kernel in a tree: its version and image file.
pub fn find_kernel(tree: &Path) -> Result<(String, PathBuf)> {
    let modules = tree.join("usr/lib/modules");
    let mut versions: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("modules.dep").exists() || e.path().join("vmlinuz").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    let Some(version) = versions.pop() else {
        bail!("no kernel installed in {}", modules.display())
    };
    if !versions.is_empty() {
        bail!(
            "more than one kernel in {}: {versions:?} and {version}",
            modules.display()
        );
    }
    for candidate in [
        modules.join(&version).join("vmlinuz"),
        tree.join("boot").join(format!("vmlinuz-{version}")),
    ] {
        if candidate.exists() {
            return Ok((version, candidate));
        }
    }
    bail!("kernel {version} has no vmlinuz in {}", tree.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_skips_comments_and_blanks() {
        let text = "# header\nsystemd\n\n  udev  # inline comment\n#gone\nkmod\n";
        assert_eq!(parse_package_list(text), vec!["systemd", "udev", "kmod"]);
    }

    #[test]
    fn shipped_package_lists_are_not_empty_and_disjoint() {
        for (image, tools) in [
            (
                include_str!("../../rootfs/debian.packages"),
                include_str!("../../rootfs/debian-tools.packages"),
            ),
            (
                include_str!("../../rootfs/fedora.packages"),
                include_str!("../../rootfs/fedora-tools.packages"),
            ),
        ] {
            let image = parse_package_list(image);
            let tools = parse_package_list(tools);
            assert!(!image.is_empty() && !tools.is_empty());
            assert!(
                image.iter().all(|p| !tools.contains(p)),
                "a package is both shipped and build-only"
            );
        }
    }

    #[test]
    fn dnf_uses_only_our_repositories_and_cache() {
        let conf = DnfConfig::under(Path::new("/w/dnf"));
        let args = dnf_install_args(
            41,
            &conf,
            Path::new("/w/tree"),
            Path::new("/c/dnf"),
            &["systemd".into()],
        );
        assert!(args.contains(&"--setopt=reposdir=/w/dnf/repos.d".to_string()));
        assert!(args.contains(&"--config=/w/dnf/dnf.conf".to_string()));
        assert!(args.contains(&"--setopt=gpgcheck=True".to_string()));
        assert!(args.contains(&"--installroot=/w/tree".to_string()));
        assert!(args.contains(&"--releasever=41".to_string()));
        assert!(args.contains(&"--setopt=keepcache=True".to_string()));
        assert_eq!(args.last().unwrap(), "systemd");
    }

    #[test]
    fn repo_file_requires_gpg_when_key_given() {
        let repos = [
            Repository {
                id: "fedora".into(),
                baseurl: "https://m/f/".into(),
                gpgkey: Some("https://k".into()),
                gpgcheck: true,
            },
            Repository {
                id: "local".into(),
                baseurl: "file:///r".into(),
                gpgkey: None,
                gpgcheck: false,
            },
        ];
        let text = dnf_repo_file(&repos);
        assert!(text.contains("[fedora]\nname=fedora\nbaseurl=https://m/f/\n"));
        assert!(text.contains("gpgcheck=1\nrepo_gpgcheck=0\ngpgkey=https://k\n"));
        assert!(text.contains("[local]") && text.contains("baseurl=file:///r\nenabled=1\nmetadata_expire=0\nskip_if_unavailable=0\ngpgcheck=0\n"));
    }

    #[test]
    fn tree_key_changes_with_packages() {
        let m = crate::manifest::parse_manifest(
            "name=\"a\"\nversion=\"1\"\n[distro]\nname=\"debian\"\n",
            "t",
        )
        .unwrap();
        let a = PackageSets {
            image: vec!["systemd".into()],
            tools: vec!["make".into()],
        };
        let mut b = a.clone();
        b.image.push("vim".into());
        assert_ne!(tree_key(&m, &a), tree_key(&m, &b));
        assert_eq!(tree_key(&m, &a), tree_key(&m, &a.clone()));
    }
}
