//! Integration tests (root, no network): the Fedora rootfs stage against the
//! local RPM repository that `ci/fixtures/rpm/build-repo.sh` builds.
//!
//! The fixture repository holds four tiny noarch packages shaped like a
//! Fedora base: `airlock-fixture-base` (epoch 1, Requires the release
//! package, Recommends `airlock-fixture-recommended`),
//! `fedora-release-airlock-fixture` (os-release with ID=fedora,
//! VERSION_ID=41) and `filesystem-fixture`. The tests drive the library's
//! `prepare_trees` with the same dnf invocation a real Fedora build uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use airlock::exec::{find_program, Runner};
use airlock::manifest::{parse_manifest, Manifest};
use airlock::rootfs::{self, Cache, PackageSets};
use walkdir::WalkDir;

/// A second `prepare_trees` of the same inputs only checks a marker file.
const REUSE_LIMIT: Duration = Duration::from_secs(2);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("builder/ has a parent")
        .to_path_buf()
}

/// Fails (never skips) when the host cannot run these tests.
fn require_host() {
    assert!(
        airlock::doctor::is_root(),
        "fedora_fixture tests need root (dnf --installroot and rpm --root); CI runs them as root"
    );
    for (program, package) in [
        ("rpmbuild", "rpm"),
        ("createrepo_c", "createrepo-c"),
        ("dnf", "dnf"),
        ("rpm", "rpm"),
    ] {
        assert!(
            find_program(program).is_some(),
            "fedora_fixture tests need `{program}` on PATH: apt-get install {package} (see ci/install-host-deps.sh)"
        );
    }
}

/// Runs `ci/fixtures/rpm/build-repo.sh` into `dir`.
fn build_fixture_repo(dir: &Path) {
    let script = workspace().join("ci/fixtures/rpm/build-repo.sh");
    let out = Command::new(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {dir:?} failed ({}):\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.join("repodata/repomd.xml").is_file(),
        "build-repo.sh made no repodata in {}",
        dir.display()
    );
}

fn fixture_manifest(repo: &Path) -> Manifest {
    let text = format!(
        r#"name = "airlock-fixture"
version = "1.0"

[distro]
name = "fedora"
release = 41

[[distro.repositories]]
id = "airlock-fixture"
baseurl = "file://{}"
gpgcheck = false
"#,
        repo.display()
    );
    parse_manifest(&text, "fixture.toml")
        .unwrap_or_else(|e| panic!("fixture manifest refused: {e:#}\n{text}"))
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Every path in `tree` (relative, sorted) that lies under `rel`.
fn paths_under(tree: &Path, rel: &str) -> Vec<String> {
    let dir = tree.join(rel);
    if !dir.exists() {
        return Vec::new();
    }
    let mut paths: Vec<String> = WalkDir::new(&dir)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.expect("walking the tree")
                .path()
                .strip_prefix(tree)
                .expect("under tree")
                .display()
                .to_string()
        })
        .collect();
    paths.sort();
    paths
}

/// Paths in `tree` that no installed package owns, minus the rpm database.
fn unowned_paths(tree: &Path) -> Vec<String> {
    let out = Command::new("rpm")
        .arg(format!("--root={}", tree.display()))
        .args([
            "--dbpath",
            rootfs::RPM_DBPATH,
            "-qa",
            "--queryformat",
            "[%{FILENAMES}\\n]",
        ])
        .output()
        .expect("starting rpm");
    assert!(
        out.status.success(),
        "rpm -qa in {} failed: {}",
        tree.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let owned: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut unowned: Vec<String> = WalkDir::new(tree)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            format!(
                "/{}",
                e.expect("walking the tree")
                    .path()
                    .strip_prefix(tree)
                    .expect("under tree")
                    .display()
            )
        })
        .filter(|p| !owned.contains(p) && !Path::new(p).starts_with("/usr/lib/sysimage"))
        .collect();
    unowned.sort();
    unowned
}

#[test]
fn prepare_trees_installs_from_fixture_repository_and_reuses_cache() {
    require_host();
    let tmp = tempfile::tempdir().expect("temp dir");
    let repo = tmp.path().join("repo");
    build_fixture_repo(&repo);
    let cache = Cache {
        root: tmp.path().join("cache"),
    };
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch dir");

    let manifest = fixture_manifest(&repo);
    let sets = PackageSets {
        image: vec!["airlock-fixture-base".into()],
        tools: vec!["airlock-fixture-recommended".into()],
    };
    let runner = Runner::new(false).expect("runner");

    let started = Instant::now();
    let trees = rootfs::prepare_trees(&runner, &manifest, &sets, &cache, &scratch, true)
        .unwrap_or_else(|e| panic!("prepare_trees from the fixture repository failed: {e:#}"));
    eprintln!("prepare_trees (fresh): {:.1?}", started.elapsed());
    assert!(!trees.reused, "an empty cache cannot be reused");

    // Packages, with epoch:version-release as the report shows them.
    let base = ("airlock-fixture-base", "1:1.0-1.airlock");
    let recommended = ("airlock-fixture-recommended", "1.0-1.airlock");
    let release = ("fedora-release-airlock-fixture", "41-1.airlock");
    let filesystem = ("filesystem-fixture", "3.18-1.airlock");
    let tools = rootfs::installed_packages(&runner, &manifest, &trees.tools)
        .expect("listing the tools tree");
    assert_eq!(
        tools,
        owned(&[base, recommended, release, filesystem]),
        "packages in the tools tree"
    );
    let image = rootfs::installed_packages(&runner, &manifest, &trees.image_base)
        .expect("listing the image tree");
    assert_eq!(
        image,
        owned(&[base, release, filesystem]),
        "packages in the image tree (build-only package purged)"
    );
    assert!(
        !trees
            .image_base
            .join("etc/airlock/fixture-recommended")
            .exists(),
        "the purged build-only package left its file in the image tree"
    );

    for tree in [&trees.tools, &trees.image_base] {
        let os_release = std::fs::read_to_string(tree.join("usr/lib/os-release"))
            .unwrap_or_else(|e| panic!("{}/usr/lib/os-release: {e}", tree.display()));
        assert!(
            os_release.lines().any(|l| l == "ID=fedora"),
            "os-release in {} lacks ID=fedora:\n{os_release}",
            tree.display()
        );
        assert!(
            os_release.lines().any(|l| l == "VERSION_ID=41"),
            "os-release in {} lacks VERSION_ID=41:\n{os_release}",
            tree.display()
        );

        // Fedora's rpmdb location, not Debian rpm's default ~/.rpmdb.
        assert!(
            tree.join("usr/lib/sysimage/rpm/rpmdb.sqlite").is_file(),
            "no rpm database at usr/lib/sysimage/rpm in {}",
            tree.display()
        );
        assert!(
            !tree.join("root/.rpmdb").exists(),
            "{}/root/.rpmdb exists: Debian's default dbpath leaked",
            tree.display()
        );

        // Nothing of the build left in the tree.
        let logs: Vec<String> = paths_under(tree, "var/log");
        assert!(
            logs.is_empty(),
            "dnf left files in var/log of {}: {logs:?}",
            tree.display()
        );
        assert!(
            !tree.join("var/cache/dnf").exists(),
            "dnf left var/cache/dnf in {}",
            tree.display()
        );
        assert!(
            !tree.join("var/lib/dnf").exists(),
            "dnf's persistdir leaked into {}",
            tree.display()
        );
        let cache_in_tree = tree.join(tmp.path().strip_prefix("/").expect("absolute temp dir"));
        assert!(
            !cache_in_tree.exists(),
            "dnf's cachedir path was recreated inside the tree: {:?}",
            paths_under(
                tree,
                &tmp.path().strip_prefix("/").unwrap().display().to_string()
            )
        );
        let unowned = unowned_paths(tree);
        assert!(
            unowned.is_empty(),
            "paths in {} that no package owns (build leftovers): {unowned:?}",
            tree.display()
        );
        // %doc files are not installed (tsflags=nodocs).
        assert!(
            !tree.join("usr/share/doc/airlock-fixture-base").exists(),
            "%doc files installed in {}",
            tree.display()
        );
    }

    // Same inputs again: the cached trees are taken as they are.
    let started = Instant::now();
    let again = rootfs::prepare_trees(&runner, &manifest, &sets, &cache, &scratch, true)
        .unwrap_or_else(|e| panic!("second prepare_trees failed: {e:#}"));
    let took = started.elapsed();
    assert!(
        again.reused,
        "second prepare_trees with reuse=true did not reuse the cached trees"
    );
    assert_eq!(
        (again.tools, again.image_base),
        (trees.tools, trees.image_base),
        "reused trees are at other paths"
    );
    assert!(
        took < REUSE_LIMIT,
        "reusing cached trees took {took:.1?} (limit {REUSE_LIMIT:?})"
    );
}

#[test]
fn repository_without_gpgkey_needs_explicit_gpgcheck_false() {
    let text = r#"name = "airlock-fixture"
version = "1.0"

[distro]
name = "fedora"
release = 41

[[distro.repositories]]
id = "airlock-fixture"
baseurl = "file:///srv/repo"
"#;
    let err = format!(
        "{:#}",
        parse_manifest(text, "fixture.toml").expect_err("a repository without gpgkey was accepted")
    );
    assert!(
        err.contains("gpgkey"),
        "error does not name `gpgkey`: {err}"
    );
    assert!(
        err.contains("gpgcheck = false"),
        "error does not say how to opt out: {err}"
    );
    assert!(
        err.contains("airlock-fixture"),
        "error does not name the repository: {err}"
    );
}
