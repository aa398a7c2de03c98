//! Verification: header and signatures first ([`open`]: a few KiB read,
//! nothing of the payload), then the payload streamed through SHA-256 in
//! fixed-size pieces ([`read_payload`]), then end of file. [`verify`] does
//! both. The update agent can pass a sink to [`read_payload`] to write the
//! inactive slot from the same pass.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::format::{read_exact, RawHeader};
use crate::manifest::{ArtifactKind, Manifest};
use crate::trust::{check_signatures, Trust};
use crate::Refusal;

/// Bytes hashed per read of the payload.
const CHUNK: usize = 1 << 20;

/// A manifest whose bytes carry enough trusted signatures.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    /// Its exact bytes as signed.
    pub manifest_bytes: Vec<u8>,
    /// Identities of the distinct trusted keys that signed.
    pub signers: Vec<String>,
    /// Offset of the payload from the start of the bundle.
    pub payload_offset: u64,
}

impl VerifiedManifest {
    /// The length the bundle file must have, exactly.
    pub fn bundle_len(&self) -> u64 {
        self.payload_offset + self.manifest.payload_len()
    }
}

/// Reads header and manifest, checks signatures and threshold over the
/// exact manifest bytes, and only then parses the manifest. Leaves `r` at
/// the first payload byte.
pub fn open<R: Read>(r: &mut R, trust: &Trust) -> Result<VerifiedManifest, Refusal> {
    let header = RawHeader::read(r)?;
    let signers = check_signatures(&header.manifest, &header.signatures, trust)?;
    let manifest =
        Manifest::from_json(&header.manifest).map_err(|e| Refusal::CorruptManifest(e.0))?;
    Ok(VerifiedManifest {
        payload_offset: header.payload_offset(),
        manifest,
        manifest_bytes: header.manifest,
        signers,
    })
}

/// Where the payload pass is: bytes done of the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub artifact: ArtifactKind,
    pub done: u64,
    pub total: u64,
}

/// Streams the payload: each artifact's bytes go to `sink` and through
/// SHA-256; a digest that differs refuses the bundle as soon as that
/// artifact ends. Then `r` must be at its end (trailing junk refused).
pub fn read_payload<R: Read>(
    r: &mut R,
    manifest: &Manifest,
    sink: &mut dyn FnMut(ArtifactKind, &[u8]) -> io::Result<()>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), Refusal> {
    let total = manifest.payload_len();
    let mut done = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for artifact in &manifest.artifacts {
        let mut hash = Sha256::new();
        let mut left = artifact.size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            read_exact(r, &mut buf[..n], "payload")?;
            hash.update(&buf[..n]);
            sink(artifact.kind, &buf[..n]).map_err(|error| Refusal::Io {
                during: "writing the payload",
                error,
            })?;
            left -= n as u64;
            done += n as u64;
            progress(Progress {
                artifact: artifact.kind,
                done,
                total,
            });
        }
        let actual = hex::encode(hash.finalize());
        if actual != artifact.sha256 {
            return Err(Refusal::CorruptPayload {
                artifact: artifact.kind,
                expected: artifact.sha256.clone(),
                actual,
            });
        }
    }
    let mut probe = [0u8; 1];
    loop {
        match r.read(&mut probe) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(Refusal::TrailingJunk),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(Refusal::Io {
                    during: "end of bundle",
                    error,
                })
            }
        }
    }
}

/// Verifies a whole bundle: framing, limits, signatures and threshold,
/// every artifact's size and SHA-256, nothing after the payload.
pub fn verify<R: Read>(r: &mut R, trust: &Trust) -> Result<VerifiedManifest, Refusal> {
    verify_with_progress(r, trust, &mut |_| {})
}

/// [`verify`], reporting the payload pass to `progress`.
pub fn verify_with_progress<R: Read>(
    r: &mut R,
    trust: &Trust,
    progress: &mut dyn FnMut(Progress),
) -> Result<VerifiedManifest, Refusal> {
    let verified = open(r, trust)?;
    read_payload(r, &verified.manifest, &mut |_, _| Ok(()), progress)?;
    Ok(verified)
}
