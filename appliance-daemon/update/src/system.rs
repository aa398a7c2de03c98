//! What the agent knows about the system it runs on, read from files whose
//! paths come from the configuration: the image's os-release (version,
//! compatible string, security epoch), the kernel command line (the booted
//! root hash), and the agent's state on `/var` (stored security epoch,
//! last result). Parsers are pure; loaders only read or write the file.

use std::path::Path;

use airlock_bundle::Version;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The running image's identity, from its os-release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `IMAGE_ID`: the image name, as in the ESP entries `<name>_<version>…efi`.
    pub name: String,
    /// `IMAGE_VERSION`.
    pub version: Version,
    /// `AIRLOCK_COMPATIBLE`.
    pub compatible: String,
    /// `AIRLOCK_SECURITY_EPOCH`.
    pub security_epoch: u32,
}

/// Parses an os-release file (pure): the four fields the builder writes.
pub fn parse_os_release(text: &str) -> Result<Image> {
    let field = |key: &str| -> Result<String> {
        let value = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .next_back()
            .with_context(|| format!("os-release has no {key}"))?;
        let value = value.trim();
        let unquoted = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        if unquoted.is_empty() {
            bail!("os-release: {key} is empty");
        }
        Ok(unquoted.to_string())
    };
    let version = field("IMAGE_VERSION")?;
    let epoch = field("AIRLOCK_SECURITY_EPOCH")?;
    Ok(Image {
        name: field("IMAGE_ID")?,
        version: Version::parse(&version)
            .map_err(|e| anyhow::anyhow!("os-release: IMAGE_VERSION {version:?}: {e}"))?,
        compatible: field("AIRLOCK_COMPATIBLE")?,
        security_epoch: epoch.parse().with_context(|| {
            format!("os-release: AIRLOCK_SECURITY_EPOCH {epoch:?} is not a number")
        })?,
    })
}

pub fn load_os_release(path: &Path) -> Result<Image> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_os_release(&text).with_context(|| format!("{}", path.display()))
}

/// The `roothash=` of a kernel command line (pure): 64 hex digits.
pub fn parse_root_hash(cmdline: &str) -> Result<String> {
    let hashes: Vec<&str> = cmdline
        .split_ascii_whitespace()
        .filter_map(|a| a.strip_prefix("roothash="))
        .collect();
    match hashes.as_slice() {
        [h] if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(h.to_ascii_lowercase())
        }
        [h] => bail!("roothash={h} on the kernel command line is not 64 hex digits"),
        [] => bail!("the kernel command line has no roothash= (not booted from a verity slot)"),
        _ => bail!(
            "the kernel command line has {} roothash= arguments",
            hashes.len()
        ),
    }
}

pub fn load_root_hash(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_root_hash(&text).with_context(|| format!("{}", path.display()))
}

/// The agent's persistent state (`state.json` on `/var`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The security epoch of the newest image that passed the health gate;
    /// bundles below it are refused. Only ever raised.
    pub security_epoch: u32,
    /// What the last command did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<LastResult>,
}

/// The outcome of the last `apply` or `health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastResult {
    /// `apply` or `health`.
    pub action: String,
    /// `applied` (reboot pending), `refused`, `failed`, `healthy`, `unhealthy`.
    pub result: String,
    /// One line: what was done or why not.
    pub message: String,
    /// Seconds since the epoch.
    pub at: u64,
}

impl LastResult {
    pub fn now(action: &str, result: &str, message: impl Into<String>) -> LastResult {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        LastResult {
            action: action.into(),
            result: result.into(),
            message: message.into(),
            at,
        }
    }
}

/// Reads `state.json`; a missing file is the fresh state (epoch 0).
pub fn load_state(path: &Path) -> Result<State> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `state.json` atomically (temporary file, fsync, rename, fsync dir).
pub fn store_state(path: &Path, state: &State) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state).context("serialising the state")?;
    bytes.push(b'\n');
    crate::fsutil::write_atomic(path, &bytes)
}

/// Updates `last` in the state file, keeping the rest (best effort is the
/// caller's choice: this returns the error).
pub fn record_last(path: &Path, last: LastResult) -> Result<()> {
    let mut state = load_state(path)?;
    state.last = Some(last);
    store_state(path, &state)
}

/// Writes `last` for the screen: the kiosk shows it on its info page, so
/// IT sees at the desk what the last update or health gate did. A file of
/// its own (world-readable, type `airlock_status_t`), not the state file:
/// the kiosk may read this one file and nothing of the agent's state.
pub fn publish_last(path: &Path, last: &LastResult) -> Result<()> {
    let mut bytes = serde_json::to_vec(last).context("serialising the result")?;
    bytes.push(b'\n');
    crate::fsutil::write_atomic_public(path, &bytes)
        .with_context(|| format!("the result for the screen, {}", path.display()))
}

/// [`record_last`] in the state file and [`publish_last`] for the screen;
/// the state file's error first.
pub fn record_outcome(cfg: &crate::config::Config, last: LastResult) -> Result<()> {
    record_last(&cfg.state_file(), last.clone())?;
    publish_last(&cfg.screen_status, &last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_fields_are_read_quoted_or_not() {
        let text = "ID=debian\nIMAGE_ID=airlock\nIMAGE_VERSION=\"1.2\"\nAIRLOCK_COMPATIBLE='airlock-debian-x86_64'\nAIRLOCK_SECURITY_EPOCH=3\n";
        let i = parse_os_release(text).unwrap();
        assert_eq!(i.name, "airlock");
        assert_eq!(i.version, Version::parse("1.2").unwrap());
        assert_eq!(i.compatible, "airlock-debian-x86_64");
        assert_eq!(i.security_epoch, 3);
    }

    #[test]
    fn os_release_without_our_fields_is_an_error_naming_the_field() {
        let e = parse_os_release("ID=debian\nIMAGE_ID=a\nIMAGE_VERSION=1\nAIRLOCK_COMPATIBLE=x\n")
            .unwrap_err();
        assert!(e.to_string().contains("AIRLOCK_SECURITY_EPOCH"), "{e}");
        let e = parse_os_release(
            "IMAGE_ID=a\nIMAGE_VERSION=1\nAIRLOCK_COMPATIBLE=x\nAIRLOCK_SECURITY_EPOCH=-1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }

    #[test]
    fn root_hash_is_taken_from_the_command_line() {
        let h = "AB".repeat(32);
        assert_eq!(
            parse_root_hash(&format!("BOOT_IMAGE=x roothash={h} ro")).unwrap(),
            "ab".repeat(32)
        );
        assert!(parse_root_hash("ro quiet").is_err());
        assert!(parse_root_hash("roothash=abc").is_err());
        assert!(parse_root_hash(&format!("roothash={h} roothash={h}")).is_err());
    }

    #[test]
    fn state_round_trips_and_missing_file_is_epoch_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load_state(&path).unwrap(), State::default());
        let s = State {
            security_epoch: 4,
            last: Some(LastResult::now("apply", "applied", "1.1 to slot B")),
        };
        store_state(&path, &s).unwrap();
        assert_eq!(load_state(&path).unwrap(), s);
        std::fs::write(&path, "{\"security_epoch\": \"x\"}").unwrap();
        assert!(load_state(&path).is_err());
    }
}
