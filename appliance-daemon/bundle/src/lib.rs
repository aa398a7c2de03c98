#![doc = include_str!("../README.md")]

use std::io;

pub mod format;
pub mod manifest;
pub mod policy;
pub mod trust;
pub mod verify;

/// The key and signature types of the API, for callers that read key files.
pub use ssh_key;

pub use manifest::{
    slot_partition_uuids, Artifact, ArtifactKind, Manifest, ManifestError, Version,
    MAX_ARTIFACT_BYTES,
};
pub use policy::{check_policy, PolicyRefusal, RunningSystem};
pub use trust::{parse_allowed_signers, Trust, TrustError, TrustedKey, NAMESPACE};
pub use verify::{open, read_payload, verify, verify_with_progress, Progress, VerifiedManifest};

/// Why a bundle is refused (framing, signatures or content).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("not an airlock bundle (no AIRLOCKB magic)")]
    NotABundle,
    #[error("bundle format {0} is not supported (this program reads format 1)")]
    UnsupportedFormat(u32),
    #[error("the bundle is truncated (it ends inside the {what})")]
    Truncated { what: &'static str },
    #[error("the bundle has bytes after its payload")]
    TrailingJunk,
    #[error("{what} of {size} is absurd (limit {limit})")]
    AbsurdSize {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("the signature block is malformed: {0}")]
    BadSignatureBlock(String),
    #[error("the signature by trusted key {identity:?} does not match the manifest: the manifest or the signature was altered")]
    SignatureMismatch { identity: String },
    #[error("a trusted key signed for namespace {found:?}, not {NAMESPACE:?}")]
    WrongNamespace { found: String },
    #[error("{}", no_trusted_message(*.signatures, .untrusted))]
    NoTrustedSignature {
        signatures: usize,
        untrusted: Vec<String>,
    },
    #[error("only {valid} distinct trusted key(s) signed, {needed} needed")]
    BelowThreshold { valid: usize, needed: usize },
    #[error("the manifest is signed but invalid: {0}")]
    CorruptManifest(String),
    #[error("artifact {artifact} is corrupted: sha256 {actual}, the manifest says {expected}")]
    CorruptPayload {
        artifact: ArtifactKind,
        expected: String,
        actual: String,
    },
    #[error("{during}: {error}")]
    Io {
        during: &'static str,
        error: io::Error,
    },
}

fn no_trusted_message(signatures: usize, untrusted: &[String]) -> String {
    if signatures == 0 {
        "the bundle is not signed".into()
    } else {
        format!(
            "none of the bundle's {signatures} signature(s) is by a trusted key (signed by {})",
            untrusted.join(", ")
        )
    }
}

#[cfg(test)]
mod tests;
