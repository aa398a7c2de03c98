//! The update bundle `<name>_<version>.airlock`: one file holding a
//! signed manifest and the artifacts of a whole image (root filesystem,
//! its verity hash tree, the UKI). Shared by the builder (`airlock build`,
//! `sign`, `verify`) and the update agent. No I/O of its own: everything
//! works on byte slices or on a caller's `Read`, with a limit on every
//! length before it is used.
//!
//! # Layout
//!
//! All integers are unsigned 32-bit big-endian. `M` is the manifest's
//! length, `S` the offset where the payload starts.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `AIRLOCKB` |
//! | 8 | 4 | format version, `1` |
//! | 12 | 4 | `M`, manifest length, 1..=65536 |
//! | 16 | `M` | manifest: UTF-8 JSON (below); the signatures cover exactly these bytes |
//! | 16+`M` | 4 | `N`, number of signatures, 0..=16 |
//! | 20+`M` | | `N` times: length `L` (4 bytes, 1..=8192), then `L` bytes of one armoured SSH signature, exactly as `ssh-keygen -Y sign -n airlock-update@v1` writes it (`-----BEGIN SSH SIGNATURE-----` …) |
//! | `S` | sum of sizes | payload: the artifacts' bytes in the manifest's order, no padding |
//! | `S` + sizes | | end of file: any further byte refuses the bundle |
//!
//! The manifest (field order as written by the builder; unknown fields are
//! refused, `build_id` and `build_date` may be left out):
//!
//! ```json
//! {
//!   "name": "airlock",
//!   "version": "1.0",
//!   "security_epoch": 0,
//!   "compatible": "airlock-debian-x86_64",
//!   "build_id": "<input digest of the build>",
//!   "root_hash": "<dm-verity root hash, 64 hex digits>",
//!   "artifacts": [
//!     { "kind": "root",   "size": 123, "sha256": "<64 hex digits>" },
//!     { "kind": "verity", "size": 456, "sha256": "…" },
//!     { "kind": "uki",    "size": 789, "sha256": "…" }
//!   ]
//! }
//! ```
//!
//! Each of `root`, `verity`, `uki` appears exactly once, each size is
//! 1..=16 GiB. Signatures sit before the payload so that a reader knows a
//! bundle is genuine after reading a few KiB and can then stream the
//! payload (into a slot, say) while hashing it. Adding a signature
//! rewrites the header, so the signing tool copies the payload once.
//!
//! # Checks, in order
//!
//! 1. framing and limits ([`format::RawHeader::read`]);
//! 2. signatures over the exact manifest bytes, distinct trusted keys,
//!    threshold ([`trust::check_signatures`]); the manifest is parsed only
//!    after this, so unauthenticated JSON is never interpreted;
//! 3. the manifest's content ([`Manifest::from_json`]);
//! 4. each artifact's size and SHA-256, streamed, then end of file
//!    ([`verify::read_payload`]);
//! 5. separately, with the running system's facts: compatible string,
//!    newer version, security epoch, slot sizes ([`check_policy`]).

use std::io;

pub mod format;
pub mod manifest;
pub mod policy;
pub mod trust;
pub mod verify;

/// The key and signature types of the API, for callers that read key files.
pub use ssh_key;

pub use manifest::{Artifact, ArtifactKind, Manifest, ManifestError, Version, MAX_ARTIFACT_BYTES};
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
    AbsurdSize { what: &'static str, size: u64, limit: u64 },
    #[error("the signature block is malformed: {0}")]
    BadSignatureBlock(String),
    #[error("the signature by trusted key {identity:?} does not match the manifest: the manifest or the signature was altered")]
    SignatureMismatch { identity: String },
    #[error("a trusted key signed for namespace {found:?}, not {NAMESPACE:?}")]
    WrongNamespace { found: String },
    #[error("{}", no_trusted_message(*.signatures, .untrusted))]
    NoTrustedSignature { signatures: usize, untrusted: Vec<String> },
    #[error("only {valid} distinct trusted key(s) signed, {needed} needed")]
    BelowThreshold { valid: usize, needed: usize },
    #[error("the manifest is signed but invalid: {0}")]
    CorruptManifest(String),
    #[error("artifact {artifact} is corrupted: sha256 {actual}, the manifest says {expected}")]
    CorruptPayload { artifact: ArtifactKind, expected: String, actual: String },
    #[error("{during}: {error}")]
    Io { during: &'static str, error: io::Error },
}

fn no_trusted_message(signatures: usize, untrusted: &[String]) -> String {
    if signatures == 0 {
        "the bundle is not signed".into()
    } else {
        format!("none of the bundle's {signatures} signature(s) is by a trusted key (signed by {})", untrusted.join(", "))
    }
}

#[cfg(test)]
mod tests;
