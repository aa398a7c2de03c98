//! The build manifest: what IT writes to describe an image.
//!
//! `parse_manifest` is pure (TOML text in, validated `Manifest` out, errors
//! name the key and line); `load_manifest` adds the file read. Unknown keys
//! are refused everywhere, so a typo never silently falls back to a default.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// A validated build manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// Image name: lower-case letters, digits and `-`; used in file names.
    pub name: String,
    /// Image version: digits and dots (e.g. `1.4.2`), compared numerically by updates.
    pub version: String,
    /// Raised with a release that fixes a security flaw: appliances that
    /// have run it refuse update bundles of a lower epoch (default 0).
    pub security_epoch: u32,
    pub distro: Distro,
    #[serde(default)]
    pub packages: Packages,
    #[serde(default)]
    pub kernel: Kernel,
    #[serde(default)]
    pub partitions: Partitions,
    #[serde(default)]
    pub update: Update,
}

/// The base distribution and where its packages come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Distro {
    Debian {
        suite: String,
        /// APT mirrors, first one used for bootstrap (a local mirror or snapshot works).
        mirrors: Vec<String>,
    },
    Fedora {
        release: u32,
        /// DNF repositories; at least one.
        repositories: Vec<Repository>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DistroName {
    Debian,
    Fedora,
}

/// The `[distro]` table as written. A flat struct (rather than a tagged
/// enum) so that the TOML parser can point at the exact line of an unknown
/// key; `into_distro` then checks which keys belong to which distro.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistro {
    name: DistroName,
    suite: Option<String>,
    mirrors: Option<Vec<String>>,
    release: Option<u32>,
    repositories: Option<Vec<Repository>>,
}

impl RawDistro {
    fn into_distro(self) -> std::result::Result<Distro, String> {
        match self.name {
            DistroName::Debian => {
                if self.release.is_some() || self.repositories.is_some() {
                    return Err("`release` and `repositories` are Fedora keys; Debian uses `suite` and `mirrors`".into());
                }
                Ok(Distro::Debian {
                    suite: self.suite.unwrap_or_else(default_debian_suite),
                    mirrors: self.mirrors.unwrap_or_else(default_debian_mirrors),
                })
            }
            DistroName::Fedora => {
                if self.suite.is_some() || self.mirrors.is_some() {
                    return Err("`suite` and `mirrors` are Debian keys; Fedora uses `release` and `repositories`".into());
                }
                Ok(Distro::Fedora {
                    release: self.release.ok_or("Fedora needs `release` (e.g. 41)")?,
                    repositories: self
                        .repositories
                        .ok_or("Fedora needs at least one [[distro.repositories]]")?,
                })
            }
        }
    }
}

/// The manifest as written, before distro keys are sorted out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    #[serde(default)]
    security_epoch: u32,
    distro: RawDistro,
    #[serde(default)]
    packages: Packages,
    #[serde(default)]
    kernel: Kernel,
    #[serde(default)]
    partitions: Partitions,
    #[serde(default)]
    update: Update,
}

fn default_debian_suite() -> String {
    "trixie".into()
}

fn default_debian_mirrors() -> Vec<String> {
    vec!["http://deb.debian.org/debian".into()]
}

/// One DNF repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// Repository id: letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// `baseurl` (http(s)://, file://).
    pub baseurl: String,
    /// Key that signs the packages (`file://` or `https://`). Required unless
    /// `gpgcheck = false` is set explicitly.
    #[serde(default)]
    pub gpgkey: Option<String>,
    #[serde(default = "yes")]
    pub gpgcheck: bool,
}

fn yes() -> bool {
    true
}

/// Packages beyond the distro's base set in `rootfs/<distro>.packages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    #[serde(default)]
    pub extra: Vec<String>,
}

/// Kernel command line additions (appended after the builder's own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    #[serde(default)]
    pub cmdline: Vec<String>,
}

/// Partition sizes in MiB. Each root slot (A and B) gets `root_mib` plus
/// `root_verity_mib` for its hash tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    #[serde(default = "default_esp")]
    pub esp_mib: u64,
    #[serde(default = "default_root")]
    pub root_mib: u64,
    #[serde(default = "default_verity")]
    pub root_verity_mib: u64,
    /// Initial size of the data partition (`/var`); grown to fill the disk on first boot.
    #[serde(default = "default_data")]
    pub data_mib: u64,
}

fn default_esp() -> u64 {
    256
}
fn default_root() -> u64 {
    1024
}
fn default_verity() -> u64 {
    64
}
fn default_data() -> u64 {
    512
}

/// Who may sign this image's updates (`[update]`): an OpenSSH
/// `allowed_signers` file, installed read-only as
/// [`TRUSTED_KEYS_PATH`] where the update agent reads it, and how many of
/// its distinct keys must have signed a bundle. Without it the image
/// trusts no key and its update agent refuses every bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// Path of the `allowed_signers` file, relative to the manifest's directory.
    #[serde(default)]
    pub allowed_signers: Option<String>,
    /// Distinct keys needed (default 1).
    #[serde(default)]
    pub threshold: Option<usize>,
}

/// Where the image carries its trusted update keys (the update agent's
/// default `allowed_signers`).
pub const TRUSTED_KEYS_PATH: &str = "/usr/lib/airlock/update/allowed_signers";

/// The trusted update keys of a manifest, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKeys {
    /// The file as IT wrote it (installed unchanged).
    pub text: String,
    pub threshold: usize,
    /// Distinct keys in the file.
    pub keys: usize,
}

impl Default for Partitions {
    fn default() -> Self {
        Partitions {
            esp_mib: default_esp(),
            root_mib: default_root(),
            root_verity_mib: default_verity(),
            data_mib: default_data(),
        }
    }
}

impl Manifest {
    /// `<name>_<version>`, the stem of every output file.
    pub fn artifact_stem(&self) -> String {
        format!("{}_{}", self.name, self.version)
    }

    /// Which systems this build's update bundles are for: `<name>-<distro>-x86_64`.
    pub fn compatible(&self) -> String {
        format!("{}-{}-x86_64", self.name, self.distro_id())
    }

    pub fn distro_id(&self) -> &'static str {
        match self.distro {
            Distro::Debian { .. } => "debian",
            Distro::Fedora { .. } => "fedora",
        }
    }
}

/// Parses and validates manifest text. `origin` names the file in errors.
pub fn parse_manifest(text: &str, origin: &str) -> Result<Manifest> {
    // toml's error already names the line, column and offending key.
    let raw: RawManifest = toml::from_str(text)
        .map_err(|e| anyhow::anyhow!("{origin}: {}", e.to_string().trim_end()))?;
    let distro = raw.distro.into_distro().map_err(|why| {
        anyhow::anyhow!(
            "{origin}: invalid manifest: table `distro`{}: {why}",
            line_of_table(text, "distro")
        )
    })?;
    let manifest = Manifest {
        name: raw.name,
        version: raw.version,
        security_epoch: raw.security_epoch,
        distro,
        packages: raw.packages,
        kernel: raw.kernel,
        partitions: raw.partitions,
        update: raw.update,
    };
    validate(&manifest, text).with_context(|| format!("{origin}: invalid manifest"))?;
    Ok(manifest)
}

/// Reads and parses a manifest file.
pub fn load_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading manifest {}", path.display()))?;
    parse_manifest(&text, &path.display().to_string())
}

/// Reads and checks the manifest's `[update] allowed_signers` (relative to
/// the manifest file) against its `threshold`; `None` without `[update]`.
/// `text` is the manifest's text, for the line in errors.
pub fn load_trusted_keys(
    m: &Manifest,
    manifest_path: &Path,
    text: &str,
) -> Result<Option<TrustedKeys>> {
    let Some(file) = &m.update.allowed_signers else {
        return Ok(None);
    };
    let origin = manifest_path.display();
    let bad = |why: String| {
        anyhow::anyhow!(
            "{origin}: invalid manifest: key `update.allowed_signers`{}: {why}",
            line_of(text, "allowed_signers")
        )
    };
    let path = manifest_path.parent().unwrap_or(Path::new(".")).join(file);
    let keys_text = std::fs::read_to_string(&path)
        .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
    let keys = airlock_bundle::parse_allowed_signers(&keys_text)
        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let threshold = m.update.threshold.unwrap_or(1);
    let trust = airlock_bundle::Trust::new(keys, threshold).map_err(|e| {
        bad(format!(
            "{} with threshold {threshold}: {e}",
            path.display()
        ))
    })?;
    Ok(Some(TrustedKeys {
        text: keys_text,
        threshold,
        keys: trust.keys().len(),
    }))
}

/// 1-based line of the first `key =` assignment in the text, for messages
/// about values that parsed but are not acceptable.
fn line_of(text: &str, key: &str) -> String {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| format!(" (line {})", i + 1))
        .unwrap_or_default()
}

/// 1-based line of the `[table]` header.
fn line_of_table(text: &str, table: &str) -> String {
    let header = format!("[{table}]");
    text.lines()
        .position(|l| l.trim() == header)
        .map(|i| format!(" (line {})", i + 1))
        .unwrap_or_default()
}

fn validate(m: &Manifest, text: &str) -> Result<()> {
    let bad = |key: &str, why: String| {
        anyhow::anyhow!(
            "key `{key}`{}: {why}",
            line_of(text, key.rsplit('.').next().unwrap_or(key))
        )
    };
    if m.name.is_empty()
        || m.name.len() > 64
        || !m
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || m.name.starts_with('-')
    {
        return Err(bad(
            "name",
            format!("{:?} must be 1-64 characters of a-z, 0-9 and '-'", m.name),
        ));
    }
    if m.version.is_empty()
        || m.version
            .split('.')
            .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()))
        || airlock_bundle::Version::parse(&m.version).is_err()
    {
        return Err(bad(
            "version",
            format!(
                "{:?} must be numbers separated by dots, like 1.4.2",
                m.version
            ),
        ));
    }
    match &m.distro {
        Distro::Debian { suite, mirrors } => {
            if suite.is_empty() || !suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(bad(
                    "distro.suite",
                    format!("{suite:?} is not a Debian suite name"),
                ));
            }
            if mirrors.is_empty() {
                return Err(bad("distro.mirrors", "needs at least one mirror".into()));
            }
            for mirror in mirrors {
                check_url(mirror).map_err(|why| bad("distro.mirrors", why))?;
            }
        }
        Distro::Fedora {
            release,
            repositories,
        } => {
            if *release < 38 {
                return Err(bad(
                    "distro.release",
                    format!("Fedora {release} is too old (38 or newer)"),
                ));
            }
            if repositories.is_empty() {
                return Err(bad(
                    "distro.repositories",
                    "needs at least one repository".into(),
                ));
            }
            for repo in repositories {
                if repo.id.is_empty()
                    || !repo
                        .id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return Err(bad(
                        "distro.repositories.id",
                        format!("{:?} is not a valid repository id", repo.id),
                    ));
                }
                check_url(&repo.baseurl).map_err(|why| bad("distro.repositories.baseurl", why))?;
                match (&repo.gpgkey, repo.gpgcheck) {
                    (None, true) => {
                        return Err(bad(
                            "distro.repositories.gpgkey",
                            format!("repository {:?} has no gpgkey; set one, or set gpgcheck = false explicitly (test repositories only)", repo.id),
                        ))
                    }
                    (Some(key), _) => check_url(key).map_err(|why| bad("distro.repositories.gpgkey", why))?,
                    (None, false) => {}
                }
            }
        }
    }
    for package in &m.packages.extra {
        if package.is_empty()
            || !package
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-._:".contains(c))
        {
            return Err(bad(
                "packages.extra",
                format!("{package:?} is not a package name"),
            ));
        }
    }
    for arg in &m.kernel.cmdline {
        if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "kernel.cmdline",
                format!("{arg:?}: one argument per entry, no spaces"),
            ));
        }
        let key = arg.split('=').next().unwrap_or(arg);
        if RESERVED_CMDLINE_KEYS.contains(&key) {
            return Err(bad(
                "kernel.cmdline",
                format!("{arg:?} overrides a security setting the builder owns"),
            ));
        }
    }
    match (&m.update.allowed_signers, m.update.threshold) {
        (None, Some(_)) => {
            return Err(bad(
                "update.threshold",
                "needs `allowed_signers`, the keys it counts".into(),
            ))
        }
        (_, Some(0)) => return Err(bad("update.threshold", "must be at least 1".into())),
        (Some(f), _) if f.trim().is_empty() => {
            return Err(bad("update.allowed_signers", "names no file".into()))
        }
        _ => {}
    }
    let p = &m.partitions;
    for (key, value, min) in [
        ("partitions.esp_mib", p.esp_mib, 64),
        ("partitions.root_mib", p.root_mib, 128),
        ("partitions.root_verity_mib", p.root_verity_mib, 8),
        ("partitions.data_mib", p.data_mib, 64),
    ] {
        if value < min || value > 1 << 20 {
            return Err(bad(key, format!("{value} MiB is outside {min}..=1048576")));
        }
    }
    Ok(())
}

/// Command-line keys the builder sets itself; a manifest may not override
/// them (they carry the verity root hash and the SELinux mode).
pub const RESERVED_CMDLINE_KEYS: &[&str] = &[
    "roothash",
    "usrhash",
    "root",
    "ro",
    "rw",
    "security",
    "lsm",
    "selinux",
    "enforcing",
    "init",
    "rd.shell",
    "systemd.verity",
    "systemd.unit",
    "rd.systemd.unit",
    "systemd.debug_shell",
    "systemd.volatile",
];

fn check_url(url: &str) -> std::result::Result<(), String> {
    let ok = ["http://", "https://", "file:///"]
        .iter()
        .any(|p| url.starts_with(p))
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{url:?} must be an http://, https:// or file:/// URL without spaces"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = r#"
name = "airlock"
version = "1.0"
[distro]
name = "debian"
"#;

    #[test]
    fn minimal_debian_gets_defaults() {
        let m = parse_manifest(DEBIAN, "t.toml").unwrap();
        assert_eq!(
            m.distro,
            Distro::Debian {
                suite: "trixie".into(),
                mirrors: vec!["http://deb.debian.org/debian".into()]
            }
        );
        assert_eq!(m.partitions, Partitions::default());
        assert_eq!(m.artifact_stem(), "airlock_1.0");
        assert_eq!(m.security_epoch, 0);
        assert_eq!(m.compatible(), "airlock-debian-x86_64");
    }

    #[test]
    fn shipped_examples_parse() {
        for (file, text) in [
            ("debian.toml", include_str!("../../examples/debian.toml")),
            ("fedora.toml", include_str!("../../examples/fedora.toml")),
        ] {
            parse_manifest(text, file).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        }
    }

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMFqCXij7GD1YFB5ZLVlBBskqc5+mFnSGAlAp/xtx/Yf";

    #[test]
    fn trusted_keys_are_read_relative_to_the_manifest_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let manifest_path = dir.path().join("m.toml");
        let text = format!(
            "{DEBIAN}[update]\nallowed_signers = \"keys/allowed_signers\"\nthreshold = 2\n"
        );
        let m = parse_manifest(&text, "m.toml").unwrap();
        assert_eq!(
            load_trusted_keys(
                &parse_manifest(DEBIAN, "m.toml").unwrap(),
                &manifest_path,
                DEBIAN
            )
            .unwrap(),
            None
        );
        let err = format!(
            "{:#}",
            load_trusted_keys(&m, &manifest_path, &text).unwrap_err()
        );
        assert!(
            err.contains("update.allowed_signers")
                && err.contains("line 7")
                && err.contains("keys/allowed_signers"),
            "{err}"
        );
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(
            dir.path().join("keys/allowed_signers"),
            format!("it@example.org {KEY_A}\n"),
        )
        .unwrap();
        let err = format!(
            "{:#}",
            load_trusted_keys(&m, &manifest_path, &text).unwrap_err()
        );
        assert!(
            err.contains("threshold 2"),
            "one key cannot meet a threshold of 2: {err}"
        );
        std::fs::write(
            dir.path().join("keys/allowed_signers"),
            "it@example.org ssh-ed25519 not-base64\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            load_trusted_keys(&m, &manifest_path, &text).unwrap_err()
        );
        assert!(
            err.contains("line 1"),
            "the trust file's own line is named: {err}"
        );
        let one = text.replace("threshold = 2", "threshold = 1");
        std::fs::write(
            dir.path().join("keys/allowed_signers"),
            format!("# IT\nit@example.org {KEY_A}\n"),
        )
        .unwrap();
        let keys = load_trusted_keys(
            &parse_manifest(&one, "m.toml").unwrap(),
            &manifest_path,
            &one,
        )
        .unwrap()
        .unwrap();
        assert_eq!((keys.threshold, keys.keys), (1, 1));
        assert!(keys.text.starts_with("# IT\n"), "installed as written");
    }

    /// Each bad manifest, and words its error must contain (key and line).
    #[test]
    fn bad_manifests_name_key_and_line() {
        let cases: &[(&str, &[&str])] = &[
            ("name = \"a\"\nversion = \"1\"\ncolour = \"red\"\n[distro]\nname = \"debian\"\n", &["colour", "line 3"]),
            ("name = \"a\"\nversion = 1\n[distro]\nname = \"debian\"\n", &["version", "line 2", "string"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"gentoo\"\n", &["gentoo", "line 4"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\nsuit = \"sid\"\n", &["suit", "line 5"]),
            ("name = \"A b\"\nversion = \"1\"\n[distro]\nname = \"debian\"\n", &["name", "line 1"]),
            ("name = \"a\"\nversion = \"1.x\"\n[distro]\nname = \"debian\"\n", &["version", "line 2"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\n[partitions]\nroot_mib = 10\n", &["partitions.root_mib", "line 6"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\n[kernel]\ncmdline = [\"enforcing=0\"]\n", &["kernel.cmdline", "line 6", "security setting"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\nmirrors = [\"ftp://x\"]\n", &["distro.mirrors", "line 5"]),
            (
                "name = \"a\"\nversion = \"1\"\n[distro]\nname = \"fedora\"\nrelease = 41\n[[distro.repositories]]\nid = \"f\"\nbaseurl = \"https://x/\"\n",
                &["gpgkey", "gpgcheck = false"],
            ),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"fedora\"\nrelease = 41\nrepositories = []\n", &["distro.repositories", "line 6"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\nrelease = 41\n", &["distro", "line 3", "Fedora keys"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\n[update]\nthreshold = 2\n", &["update.threshold", "line 6", "allowed_signers"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\n[update]\nallowed_signers = \"k\"\nthreshold = 0\n", &["update.threshold", "line 7"]),
            ("name = \"a\"\nversion = \"1\"\n[distro]\nname = \"debian\"\n[update]\nallowed_signer = \"k\"\n", &["allowed_signer", "line 6"]),
        ];
        for (text, words) in cases {
            let err = format!("{:#}", parse_manifest(text, "m.toml").unwrap_err());
            for word in *words {
                assert!(
                    err.contains(word),
                    "error for\n{text}\nlacks {word:?}: {err}"
                );
            }
            assert!(
                err.starts_with("m.toml"),
                "error does not name the file: {err}"
            );
        }
    }
}
