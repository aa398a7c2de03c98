//! The bundle manifest: what is in the payload and which system it is for.
//!
//! JSON (serde_json), unknown fields refused at every level. Parsed only
//! after its exact bytes have passed the signature check, and validated
//! beyond serde (names, hex digests, sizes, each artifact exactly once).

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest artifact accepted (16 GiB): far above any root, hash tree or UKI.
pub const MAX_ARTIFACT_BYTES: u64 = 16 << 30;

/// One artifact of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// The erofs root filesystem (written to the inactive root slot).
    Root,
    /// Its dm-verity hash tree (written to the inactive verity slot).
    Verity,
    /// The unified kernel image (installed on the ESP).
    Uki,
}

impl ArtifactKind {
    /// Every kind; a manifest lists each exactly once.
    pub const ALL: [ArtifactKind; 3] =
        [ArtifactKind::Root, ArtifactKind::Verity, ArtifactKind::Uki];

    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Root => "root",
            ArtifactKind::Verity => "verity",
            ArtifactKind::Uki => "uki",
        }
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Size and digest of one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// Bytes in the payload (1..=`MAX_ARTIFACT_BYTES`).
    pub size: u64,
    /// SHA-256 of those bytes, 64 lower-case hex digits.
    pub sha256: String,
}

/// The manifest. Field order here is the order written by `to_json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Image name (as in the build manifest): `a-z`, `0-9`, `-`.
    pub name: String,
    /// Image version: numbers separated by dots, compared numerically.
    pub version: Version,
    /// Raised when a release fixes a security problem; an appliance refuses
    /// bundles below the epoch it has stored (anti-rollback).
    pub security_epoch: u32,
    /// Which systems may install this bundle, e.g. `airlock-debian-x86_64`;
    /// must equal the running system's string.
    pub compatible: String,
    /// The build's input digest, for tracing a bundle back to its build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// Free-form build date (e.g. RFC 3339), informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_date: Option<String>,
    /// dm-verity root hash of `root` over `verity` (64 hex digits), as on the UKI's command line.
    pub root_hash: String,
    /// `root`, `verity`, `uki`, each exactly once; payload order is this order.
    pub artifacts: Vec<Artifact>,
}

/// Why a manifest's content is unacceptable (its JSON parsed or not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

impl Manifest {
    /// Parses and validates manifest bytes (pure).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// The canonical bytes the builder writes and signers sign.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        out.push(b'\n');
        out
    }

    /// Checks what serde cannot: names, digests, sizes, artifact set.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |why: String| Err(ManifestError(why));
        if !is_name(&self.name) {
            return bad(format!(
                "name {:?} must be 1-64 characters of a-z, 0-9 and '-'",
                self.name
            ));
        }
        if self.compatible.is_empty()
            || self.compatible.len() > 128
            || !self
                .compatible
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(format!(
                "compatible {:?} must be 1-128 characters of letters, digits, '-', '_' and '.'",
                self.compatible
            ));
        }
        for (field, value) in [
            ("build_id", &self.build_id),
            ("build_date", &self.build_date),
        ] {
            if let Some(v) = value {
                if v.len() > 128 || v.chars().any(|c| c.is_control()) {
                    return bad(format!("{field} must be at most 128 printable characters"));
                }
            }
        }
        if !is_sha256_hex(&self.root_hash) {
            return bad(format!(
                "root_hash {:?} must be 64 lower-case hex digits",
                self.root_hash
            ));
        }
        if self.artifacts.len() != ArtifactKind::ALL.len() {
            return bad(format!(
                "artifacts: {} listed, exactly root, verity and uki expected",
                self.artifacts.len()
            ));
        }
        for kind in ArtifactKind::ALL {
            let count = self.artifacts.iter().filter(|a| a.kind == kind).count();
            if count != 1 {
                return bad(format!(
                    "artifacts: {kind} listed {count} times, exactly once expected"
                ));
            }
        }
        for a in &self.artifacts {
            if a.size == 0 || a.size > MAX_ARTIFACT_BYTES {
                return bad(format!(
                    "artifact {}: size {} is outside 1..={MAX_ARTIFACT_BYTES}",
                    a.kind, a.size
                ));
            }
            if !is_sha256_hex(&a.sha256) {
                return bad(format!(
                    "artifact {}: sha256 {:?} must be 64 lower-case hex digits",
                    a.kind, a.sha256
                ));
            }
        }
        Ok(())
    }

    /// The artifact of one kind (a validated manifest has each).
    pub fn artifact(&self, kind: ArtifactKind) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.kind == kind)
    }

    /// Total payload bytes (sizes are capped, so this cannot overflow).
    pub fn payload_len(&self) -> u64 {
        self.artifacts.iter().map(|a| a.size).sum()
    }

    /// Byte offset of each artifact from the start of the payload.
    pub fn payload_offsets(&self) -> Vec<(ArtifactKind, u64)> {
        let mut at = 0;
        self.artifacts
            .iter()
            .map(|a| {
                let here = at;
                at += a.size;
                (a.kind, here)
            })
            .collect()
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// An image version: 1 to 8 dot-separated decimal numbers (`1.0`, `2.13.4`).
/// Compared numerically, missing trailing parts count as 0 (`1.0` = `1`,
/// `1.10` > `1.9`). Serialised as the string it was parsed from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version {
    text: String,
    parts: Vec<u64>,
}

impl Version {
    pub fn parse(text: &str) -> Result<Version, ManifestError> {
        let bad = || {
            ManifestError(format!(
                "version {text:?} must be 1-8 numbers separated by dots, like 1.4.2"
            ))
        };
        if text.is_empty() || text.len() > 64 {
            return Err(bad());
        }
        let parts = text
            .split('.')
            .map(|p| {
                if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                    p.parse::<u64>().ok()
                } else {
                    None
                }
            })
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(bad)?;
        if parts.len() > 8 {
            return Err(bad());
        }
        Ok(Version {
            text: text.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for Version {
    type Error = ManifestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Version::parse(&s)
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.text
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        let at = |v: &Version, i: usize| v.parts.get(i).copied().unwrap_or(0);
        (0..n)
            .map(|i| at(self, i).cmp(&at(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            name: "airlock".into(),
            version: Version::parse("1.2").unwrap(),
            security_epoch: 3,
            compatible: "airlock-debian-x86_64".into(),
            build_id: Some("abc".into()),
            build_date: None,
            root_hash: "ab".repeat(32),
            artifacts: ArtifactKind::ALL
                .iter()
                .map(|&kind| Artifact {
                    kind,
                    size: 1,
                    sha256: "00".repeat(32),
                })
                .collect(),
        }
    }

    #[test]
    fn versions_compare_numerically() {
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(v("1.10") > v("1.9"));
        assert!(v("2") > v("1.99.99"));
        assert_eq!(v("1.0"), v("1"));
        assert_eq!(v("1.01"), v("1.1"));
        assert!(v("1.0.1") > v("1"));
        for bad in [
            "",
            "1.",
            ".1",
            "1..2",
            "1.x",
            "-1",
            "1.2-rc1",
            " 1",
            "1.2.3.4.5.6.7.8.9",
            "99999999999999999999999",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn manifest_round_trips_and_validates() {
        let m = sample();
        let bytes = m.to_json();
        assert_eq!(Manifest::from_json(&bytes).unwrap(), m);
        assert_eq!(m.payload_len(), 3);
        assert_eq!(m.payload_offsets()[2], (ArtifactKind::Uki, 2));
    }

    /// Each mutation of a valid manifest, and a word its error must contain.
    #[test]
    fn bad_manifests_are_refused() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|v| v["colour"] = "red".into()), "unknown field"),
            (
                Box::new(|v| v["artifacts"][0]["extra"] = 1.into()),
                "unknown field",
            ),
            (
                Box::new(|v| v["artifacts"][0]["kind"] = "initrd".into()),
                "unknown variant",
            ),
            (
                Box::new(|v| v["artifacts"][1]["kind"] = "root".into()),
                "root listed 2 times",
            ),
            (
                Box::new(|v| v["artifacts"].as_array_mut().unwrap().truncate(2)),
                "2 listed",
            ),
            (
                Box::new(|v| v["artifacts"][0]["size"] = (MAX_ARTIFACT_BYTES + 1).into()),
                "outside",
            ),
            (
                Box::new(|v| v["artifacts"][0]["size"] = 0.into()),
                "outside",
            ),
            (
                Box::new(|v| v["artifacts"][2]["sha256"] = "AB".repeat(32).into()),
                "sha256",
            ),
            (Box::new(|v| v["root_hash"] = "ab".into()), "root_hash"),
            (Box::new(|v| v["version"] = "1.x".into()), "version"),
            (Box::new(|v| v["security_epoch"] = (-1).into()), "u32"),
            (Box::new(|v| v["name"] = "A".into()), "name"),
            (Box::new(|v| v["compatible"] = "".into()), "compatible"),
            (
                Box::new(|v| {
                    v.as_object_mut()
                        .unwrap()
                        .remove("compatible")
                        .map(|_| ())
                        .unwrap()
                }),
                "missing field",
            ),
        ];
        for (mutate, word) in cases {
            let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
            mutate(&mut v);
            let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{v}: {err:?} lacks {word:?}");
        }
        let dup = br#"{"name":"a","name":"b"}"#;
        assert!(Manifest::from_json(dup)
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
    }
}

/// The partition UUIDs of a slot with `root_hash` (hex, 32 bytes): the first
/// half names the root partition, the second its verity partition — the
/// convention systemd's discoverable-partitions spec uses, so the initrd
/// finds both from `roothash=`. `None` if `root_hash` is not 64 hex digits.
/// The builder lays slots out with it and the update agent finds the
/// booted slot with it.
pub fn slot_partition_uuids(root_hash: &str) -> Option<([u8; 16], [u8; 16])> {
    let bytes: [u8; 32] = hex::decode(root_hash).ok()?.try_into().ok()?;
    let (root, verity) = bytes.split_at(16);
    Some((root.try_into().ok()?, verity.try_into().ok()?))
}

#[cfg(test)]
mod slot_uuid_tests {
    use super::slot_partition_uuids;

    #[test]
    fn halves_of_the_root_hash() {
        let hash = "00112233445566778899aabbccddeeff"
            .repeat(2)
            .replacen("00", "ff", 1);
        let (root, verity) = slot_partition_uuids(&hash).unwrap();
        assert_eq!(root[0], 0xff);
        assert_eq!(verity[0], 0x00);
        assert_eq!(root[15], 0xff);
        assert!(slot_partition_uuids("abcd").is_none());
        assert!(slot_partition_uuids(&"zz".repeat(32)).is_none());
    }
}
