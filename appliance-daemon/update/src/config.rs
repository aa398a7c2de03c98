//! Configuration: `/etc/airlock/update.toml` on the read-only, verity
//! protected root (so the trust settings are part of the signed image),
//! every key optional with the defaults below. Command-line flags override
//! single paths (tests point everything at plain files and a temp dir).
//!
//! ```toml
//! allowed_signers = "/usr/lib/airlock/update/allowed_signers"
//! threshold = 1                      # M of the file's distinct keys
//! state_dir = "/var/lib/airlock/update"
//! staging_dir = "/var/lib/airlock/update/staging"
//! screen_status = "/var/lib/airlock/status/update.json"
//! drop_dir = "/var/lib/airlock/update/drop"
//! esp = "/efi"                       # the mounted ESP
//! # disk = "/dev/nvme0n1"            # default: the disk of the booted root
//! tries = 3                          # boot counting of a new entry
//! reboot_command = ["systemctl", "reboot"]
//! [health]
//! guests_timeout_secs = 300
//! kiosk_unit = "airlock-kiosk.service"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/airlock/update.toml";

/// The settings, validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// OpenSSH allowed_signers file of the keys that may sign updates.
    pub allowed_signers: PathBuf,
    /// Distinct trusted keys that must have signed a bundle.
    pub threshold: usize,
    /// `state.json` lives here.
    pub state_dir: PathBuf,
    /// The last result again, world-readable, for the kiosk's info page
    /// (`system::publish_last`).
    pub screen_status: PathBuf,
    /// Downloads (and the new UKI before it goes to the ESP).
    pub staging_dir: PathBuf,
    /// Where IT drops `*.airlock` files.
    pub drop_dir: PathBuf,
    /// The mounted ESP (holds `EFI/Linux`).
    pub esp: PathBuf,
    /// The disk holding the slots: a block device, or a disk image file
    /// (tests). `None`: the disk of the booted root partition.
    pub disk: Option<PathBuf>,
    /// Boot tries of a freshly installed entry (`+N`).
    pub tries: u32,
    /// The image's os-release (running version, compatible, epoch).
    pub os_release: PathBuf,
    /// The kernel command line (the booted `roothash=`).
    pub cmdline: PathBuf,
    /// Where udev links partitions by PARTUUID (finding the booted disk).
    pub by_partuuid: PathBuf,
    /// The supervisor's control socket.
    pub control_socket: PathBuf,
    /// The `sfdisk` program (reads and edits the GPT).
    pub sfdisk: PathBuf,
    pub reboot_command: Vec<String>,
    pub health: HealthConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How long the health gate waits for both guests to run.
    pub guests_timeout_secs: u64,
    /// Present on a provisioned appliance; without it no guest is expected
    /// (`airlockd.service` has the same condition).
    pub provision_marker: PathBuf,
    pub kiosk_unit: String,
    /// `/sys/fs/selinux/enforce`.
    pub selinux_enforce: PathBuf,
    pub systemctl: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            allowed_signers: "/usr/lib/airlock/update/allowed_signers".into(),
            threshold: 1,
            state_dir: "/var/lib/airlock/update".into(),
            staging_dir: "/var/lib/airlock/update/staging".into(),
            screen_status: "/var/lib/airlock/status/update.json".into(),
            drop_dir: "/var/lib/airlock/update/drop".into(),
            esp: "/efi".into(),
            disk: None,
            tries: 3,
            os_release: "/etc/os-release".into(),
            cmdline: "/proc/cmdline".into(),
            by_partuuid: "/dev/disk/by-partuuid".into(),
            control_socket: "/run/airlock/control.sock".into(),
            sfdisk: "sfdisk".into(),
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            health: HealthConfig::default(),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            guests_timeout_secs: 300,
            provision_marker: "/var/lib/airlock/provision/appliance.toml".into(),
            kiosk_unit: "airlock-kiosk.service".into(),
            selinux_enforce: "/sys/fs/selinux/enforce".into(),
            systemctl: "systemctl".into(),
        }
    }
}

impl Config {
    /// Parses and validates a configuration file's text (pure).
    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Loads `path`; a missing file at the default path means all defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Config::parse(&text).with_context(|| format!("configuration {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(e).with_context(|| format!("reading configuration {}", path.display())),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.threshold == 0 {
            bail!("threshold must be at least 1");
        }
        if !(1..=7).contains(&self.tries) {
            bail!("tries must be 1..=7 (systemd-boot counts down from it)");
        }
        if self.reboot_command.is_empty() {
            bail!("reboot_command must name a program");
        }
        Ok(())
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_the_defaults() {
        assert_eq!(
            Config::parse(include_str!("../dist/update.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn keys_override_defaults_and_unknown_keys_are_refused() {
        let c =
            Config::parse("threshold = 2\nesp = \"/boot\"\n[health]\nguests_timeout_secs = 10\n")
                .unwrap();
        assert_eq!(
            (c.threshold, c.esp.as_path(), c.health.guests_timeout_secs),
            (2, Path::new("/boot"), 10)
        );
        assert_eq!(c.allowed_signers, Config::default().allowed_signers);
        assert!(Config::parse("treshold = 2\n").is_err());
        assert!(Config::parse("threshold = 0\n").is_err());
        assert!(Config::parse("tries = 9\n").is_err());
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("update.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        assert!(Config::load(&p, true).is_err());
    }
}
