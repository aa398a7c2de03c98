//! Why the agent refuses or fails, each with its own exit code so a unit,
//! a script or the acceptance suite can tell the cases apart without
//! parsing text. Refusals happen before anything is written to a slot or
//! the ESP; failures may happen after (and leave the old slot bootable).

use std::path::PathBuf;

use airlock_bundle::{PolicyRefusal, Refusal};

/// A bundle or situation the agent will not install; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    // transparent: the inner error is the whole message (with "{0}" it
    // would also be the source, and `{:#}` would print it twice).
    #[error(transparent)]
    Bundle(#[from] Refusal),
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    #[error("the bundle is image {bundle:?}, this system runs {running:?}")]
    WrongImage { bundle: String, running: String },
    #[error("the running boot entry {entry} is still on trial: the health gate must bless it before an update may overwrite the fallback slot")]
    NotBlessed { entry: String },
    #[error("the bundle's root hash is the running slot's")]
    SameRoot,
    #[error("the ESP has {free} bytes free, the new UKI needs {need}")]
    NoRoom { free: u64, need: u64 },
    #[error("no *.airlock file in the drop directory {}", .0.display())]
    NothingDropped(PathBuf),
}

/// Something went wrong after the checks passed (or before them, outside the bundle).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{what} reads back with sha256 {actual}, the manifest says {expected}")]
    ReadBack {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("fetching the bundle failed")]
    Source,
    #[error("the health gate failed: {0}")]
    Unhealthy(String),
    #[error("another airlock-update holds {}", .0.display())]
    Busy(PathBuf),
}

impl Refused {
    pub fn exit_code(&self) -> u8 {
        match self {
            Refused::Bundle(r) => match r {
                Refusal::NotABundle | Refusal::UnsupportedFormat(_) => 10,
                Refusal::Truncated { .. } => 11,
                Refusal::TrailingJunk => 12,
                Refusal::AbsurdSize { .. } => 13,
                Refusal::BadSignatureBlock(_) | Refusal::WrongNamespace { .. } => 14,
                Refusal::SignatureMismatch { .. } => 15,
                Refusal::NoTrustedSignature { .. } => 16,
                Refusal::BelowThreshold { .. } => 17,
                Refusal::CorruptManifest(_) => 18,
                Refusal::CorruptPayload { .. } => 19,
                Refusal::Io { .. } => 1,
            },
            Refused::Policy(p) => match p {
                PolicyRefusal::WrongCompatible { .. } => 20,
                PolicyRefusal::NotNewer { .. } => 21,
                PolicyRefusal::EpochBelow { .. } => 22,
                PolicyRefusal::DoesNotFit { .. } => 23,
            },
            Refused::WrongImage { .. } => 20,
            Refused::NotBlessed { .. } => 24,
            Refused::SameRoot => 21,
            Refused::NoRoom { .. } => 25,
            Refused::NothingDropped(_) => 3,
        }
    }
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::ReadBack { .. } => 30,
            Failure::Source => 31,
            Failure::Unhealthy(_) => 40,
            Failure::Busy(_) => 4,
        }
    }
}

/// The [`Refused`] in an error, whether it is the error itself, a cause, or
/// a context layer.
pub fn refused(err: &anyhow::Error) -> Option<&Refused> {
    err.downcast_ref::<Refused>()
        .or_else(|| err.chain().find_map(|c| c.downcast_ref::<Refused>()))
}

/// The [`Failure`] in an error, found the same way.
pub fn failure(err: &anyhow::Error) -> Option<&Failure> {
    err.downcast_ref::<Failure>()
        .or_else(|| err.chain().find_map(|c| c.downcast_ref::<Failure>()))
}

/// The exit code for an error: its [`Refused`] or [`Failure`], else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match (refused(err), failure(err)) {
        (Some(r), _) => r.exit_code(),
        (None, Some(f)) => f.exit_code(),
        (None, None) => 1,
    }
}

/// The table printed by `--help` and the README (code: meaning).
pub const EXIT_CODES: &str = "exit codes: 0 done; 1 error (I/O, configuration); 3 nothing in the drop directory; 4 another airlock-update is running; \
10 not a bundle; 11 truncated; 12 bytes after the payload; 13 absurd size; 14 malformed signature block; \
15 signature does not match (altered manifest); 16 no trusted signature (unsigned or wrong key); 17 below the signature threshold; \
18 corrupt manifest; 19 corrupt payload; 20 wrong compatible string or image; 21 not newer (downgrade or reinstall); \
22 security epoch below the stored one; 23 does not fit the slot; 24 running boot not blessed yet; 25 no room on the ESP; \
30 slot or ESP read back wrong; 31 download failed; 40 health gate failed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_found_through_context_layers() {
        let e = anyhow::Error::from(Refused::SameRoot).context("applying");
        assert_eq!(exit_code(&e), 21);
        let e = anyhow::anyhow!("HTTP 404")
            .context(Failure::Source)
            .context("downloading");
        assert_eq!(exit_code(&e), 31);
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), 1);
    }
}
