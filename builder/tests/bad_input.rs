//! Integration tests (root): `airlock build` refuses bad input with a message
//! that names the problem, exits non-zero, and leaves the output directory
//! exactly as it was (no `.airlock-staging-*` directory, no partial files).
//!
//! Each test runs the real binary with a private `--cache-dir`. Most fail
//! before any work; `unknown_debian_package_*` runs mmdebstrap against
//! deb.debian.org and fails during apt's resolution (needs the network).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use airlock::doctor::{Need, TOOLS};
use airlock::exec::find_program;
use walkdir::WalkDir;

const VALID_DEBIAN: &str = r#"name = "airlock-test"
version = "1.0"

[distro]
name = "debian"
"#;

/// Fails (never skips) when not root: the builder itself refuses to run
/// otherwise, and the mount tests need it.
fn require_root() {
    assert!(
        airlock::doctor::is_root(),
        "bad_input tests need root (airlock build refuses to run without it); CI runs them as root"
    );
}

/// A temporary directory with a manifest, an output directory that already
/// holds a previous build's file, and a private cache.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new(manifest: &str) -> Scene {
        require_root();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("manifest.toml"), manifest).expect("writing manifest");
        let output = dir.path().join("output");
        std::fs::create_dir(&output).expect("output dir");
        std::fs::write(output.join("previous.report.json"), "{}\n").expect("previous file");
        Scene { dir }
    }

    fn output(&self) -> PathBuf {
        self.dir.path().join("output")
    }

    /// `airlock build` of the scene's manifest into `output`.
    fn build(&self, output: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_airlock"));
        cmd.arg("build")
            .arg("--manifest")
            .arg(self.dir.path().join("manifest.toml"))
            .arg("--output")
            .arg(output)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .stdin(std::process::Stdio::null());
        cmd
    }
}

/// Every path under `dir`, hidden ones included.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path()
                .strip_prefix(dir)
                .expect("under dir")
                .to_path_buf()
        })
        .collect()
}

/// Runs `cmd` and asserts: non-zero exit, stderr contains every one of
/// `words`, and `output` lists the same paths afterwards as before.
fn assert_refused(mut cmd: Command, output: &Path, words: &[&str]) -> String {
    let before = listing(output);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("starting airlock");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let after = listing(output);
    assert!(
        !status.success(),
        "airlock build succeeded on bad input\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&stdout)
    );
    for word in words {
        assert!(
            stderr.contains(word),
            "stderr does not name {word:?}:\n{stderr}"
        );
    }
    let new: Vec<&PathBuf> = after.difference(&before).collect();
    let gone: Vec<&PathBuf> = before.difference(&after).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "the failed build changed {}: new {new:?}, gone {gone:?}",
        output.display()
    );
    stderr
}

#[test]
fn unknown_manifest_key_is_named_with_its_line() {
    let scene = Scene::new("name = \"airlock-test\"\nversion = \"1.0\"\ncolour = \"red\"\n[distro]\nname = \"debian\"\n");
    assert_refused(
        scene.build(&scene.output()),
        &scene.output(),
        &["manifest.toml", "colour", "line 3"],
    );
}

#[test]
fn wrong_type_is_named_with_its_line() {
    let scene = Scene::new("name = \"airlock-test\"\nversion = 1\n[distro]\nname = \"debian\"\n");
    assert_refused(
        scene.build(&scene.output()),
        &scene.output(),
        &["version", "line 2", "string"],
    );
}

#[test]
fn unknown_distro_is_named_with_its_line() {
    let scene =
        Scene::new("name = \"airlock-test\"\nversion = \"1.0\"\n[distro]\nname = \"gentoo\"\n");
    assert_refused(
        scene.build(&scene.output()),
        &scene.output(),
        &["gentoo", "line 4", "debian", "fedora"],
    );
}

#[test]
fn missing_output_directory_is_not_created_for_a_bad_manifest() {
    let scene = Scene::new("name = \"airlock-test\"\nversion = 1\n[distro]\nname = \"debian\"\n");
    let output = scene.dir.path().join("not-yet");
    let out = scene.build(&output).output().expect("starting airlock");
    assert!(
        !out.status.success(),
        "airlock build succeeded on a bad manifest"
    );
    assert!(
        !output.exists(),
        "a failed build created the output directory {}",
        output.display()
    );
}

/// Slow (about a minute; network): mmdebstrap fetches the trixie indices
/// from deb.debian.org, then apt cannot resolve the package.
#[test]
fn unknown_debian_package_is_named() {
    let manifest = format!("{VALID_DEBIAN}\n[packages]\nextra = [\"airlock-no-such-package\"]\n");
    let scene = Scene::new(&manifest);
    let started = std::time::Instant::now();
    let stderr = assert_refused(
        scene.build(&scene.output()),
        &scene.output(),
        &["airlock-no-such-package"],
    );
    eprintln!(
        "unknown_debian_package_is_named: airlock failed after {:.1?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("mmdebstrap"),
        "stderr does not say which step failed:\n{stderr}"
    );
    assert!(
        stderr.contains("Unable to locate package airlock-no-such-package"),
        "stderr lacks apt's own error line (the tail of mmdebstrap's output):\n{stderr}"
    );
    // mmdebstrap must not leave /proc, /dev or /sys of the half-made tree
    // mounted (the temp dir's removal would then walk into the host's).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    let leftover: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*scene.dir.path().to_string_lossy()))
        .collect();
    if !leftover.is_empty() {
        let kept = scene.dir.keep();
        panic!(
            "mounts left under {} (kept, not removed): {leftover:#?}",
            kept.display()
        );
    }
}

/// A directory holding symlinks to every host program `airlock build` of a
/// Debian manifest needs, except `missing`, plus the basics.
fn path_without(missing: &str, dir: &Path) {
    let mut programs: Vec<&str> = TOOLS
        .iter()
        .filter(|t| matches!(t.need, Need::Build | Need::Debian) && t.program != missing)
        .map(|t| t.program)
        .collect();
    programs.extend(["sh", "env", "df", "cp", "mount", "umount", "cargo"]);
    for program in programs {
        let Some(target) = find_program(program) else {
            if program == "cargo" {
                continue; // only there for completeness; nothing is built
            }
            panic!("host program `{program}` is missing; run `airlock doctor` (or ci/install-host-deps.sh)");
        };
        std::os::unix::fs::symlink(&target, dir.join(program)).expect("symlink");
    }
    assert!(
        find_program(missing).is_some(),
        "host program `{missing}` is missing already; this test removes it from PATH itself"
    );
}

#[test]
fn missing_host_tool_names_tool_and_package() {
    let scene = Scene::new(VALID_DEBIAN);
    let bin = scene.dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    path_without("mkfs.erofs", &bin);
    let mut cmd = scene.build(&scene.output());
    cmd.env("PATH", &bin);
    let stderr = assert_refused(cmd, &scene.output(), &["mkfs.erofs", "erofs-utils"]);
    assert_eq!(
        stderr.matches("missing `").count(),
        1,
        "more than mkfs.erofs reported missing:\n{stderr}"
    );
}

/// A filesystem mounted for one test, unmounted on drop (also on panic),
/// before the temp dir holding the mount point is removed.
struct Mount {
    point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mount {
    fn tmpfs(options: &str) -> Mount {
        require_root();
        let dir = tempfile::tempdir().expect("temp dir");
        let point = dir.path().join("mnt");
        std::fs::create_dir(&point).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "airlock-test"])
            .arg(&point)
            .output()
            .expect("starting mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs -o {options} {} failed (needs root and mount(8)): {}",
            point.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { point, _dir: dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.point)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy: detach it so the temp dir's removal cannot reach into it.
            let lazy = Command::new("umount")
                .arg("--lazy")
                .arg(&self.point)
                .status()
                .is_ok_and(|s| s.success());
            eprintln!(
                "umount {} failed; lazy unmount {}",
                self.point.display(),
                if lazy { "done" } else { "failed too" }
            );
        }
    }
}

#[test]
fn full_output_filesystem_is_refused_with_free_space() {
    let scene = Scene::new(VALID_DEBIAN);
    let mount = Mount::tmpfs("size=16m");
    assert_refused(
        scene.build(&mount.point),
        &mount.point,
        &[&mount.point.display().to_string(), "MiB free"],
    );
}

#[test]
fn read_only_output_directory_is_refused() {
    let scene = Scene::new(VALID_DEBIAN);
    let mount = Mount::tmpfs("ro");
    assert_refused(
        scene.build(&mount.point),
        &mount.point,
        &[&mount.point.display().to_string(), "not writable"],
    );
}

/// `airlock doctor` (IT guide §1): on a host set up by
/// `ci/install-host-deps.sh`, as CI's is, every tool is there and it exits
/// 0; with a tool taken off PATH it exits non-zero and names the tool's
/// package.
#[test]
fn doctor_lists_every_tool_and_names_the_package_of_a_missing_one() {
    let doctor = |path: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_airlock"));
        cmd.arg("doctor");
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        let out = cmd.output().expect("running airlock doctor");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = doctor(None);
    assert!(
        ok,
        "airlock doctor on this host (set up by ci/install-host-deps.sh):\n{stdout}{stderr}"
    );
    for t in TOOLS {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok ") && l.split_whitespace().nth(1) == Some(t.program)),
            "no `ok` line for {}:\n{stdout}",
            t.program
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    path_without("mkfs.erofs", dir.path());
    let (ok, stdout, stderr) = doctor(Some(dir.path()));
    assert!(!ok, "airlock doctor exited 0 without mkfs.erofs:\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("mkfs.erofs"))
        .unwrap_or("");
    assert!(
        line.starts_with("MISSING") && line.contains("erofs-utils"),
        "the mkfs.erofs line: {line:?}\n{stdout}"
    );
    assert!(stderr.contains("some host tools are missing"), "{stderr}");
    // What is on that PATH is reported found.
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("sfdisk"))
        .unwrap_or("");
    assert!(line.starts_with("ok "), "the sfdisk line: {line:?}");
}

/// The IT guide's `airlock genkeys --secure-boot` (twice: the second run
/// refuses and changes nothing), then builds given a db key of another
/// certificate, or a certificate as the PCR policy key: refused before any
/// work, the output directory untouched, the option named.
#[test]
fn genkeys_never_overwrites_and_a_build_refuses_mismatched_signing_keys() {
    let scene = Scene::new(VALID_DEBIAN);
    let keys = scene.dir.path().join("sb-keys");
    let genkeys = || {
        Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["genkeys", "--secure-boot", "--output"])
            .arg(&keys)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("starting airlock")
    };
    let first = genkeys();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "genkeys failed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout.contains("db certificate CN=airlock Secure Boot db")
            && stdout.contains("--tpm-policy-key"),
        "{stdout}"
    );
    let db_key = std::fs::read(keys.join("db.key")).unwrap();
    let second = genkeys();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already holds Secure Boot keys"));
    assert_eq!(
        std::fs::read(keys.join("db.key")).unwrap(),
        db_key,
        "the second genkeys changed db.key"
    );

    let mut cmd = scene.build(&scene.output());
    cmd.arg("--secure-boot-key")
        .arg(keys.join("KEK.key"))
        .arg("--secure-boot-cert")
        .arg(keys.join("db.crt"));
    assert_refused(
        cmd,
        &scene.output(),
        &[
            "--secure-boot-key",
            "does not belong to --secure-boot-cert",
            "CN=airlock Secure Boot db",
        ],
    );
    let mut cmd = scene.build(&scene.output());
    cmd.arg("--tpm-policy-key").arg(keys.join("db.crt"));
    assert_refused(
        cmd,
        &scene.output(),
        &["--tpm-policy-key", "not an unencrypted PEM private key"],
    );
    // Half a pair is a usage error.
    let mut cmd = scene.build(&scene.output());
    cmd.arg("--secure-boot-key").arg(keys.join("db.key"));
    assert_refused(cmd, &scene.output(), &["--secure-boot-cert"]);
}
