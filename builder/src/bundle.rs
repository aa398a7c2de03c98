//! The update bundle on the build host: written by `airlock build` from the
//! same root, verity and UKI files that go into the disk image; signed by
//! `airlock sign`; checked by `airlock verify`. The format, the signature
//! checks and the refusals are the `airlock-bundle` crate's; this module
//! only reads and writes files.

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_bundle::format::RawHeader;
use airlock_bundle::ssh_key;
use airlock_bundle::trust::{self, TrustedKey};
use airlock_bundle::{
    Artifact, ArtifactKind, Manifest, Progress, Trust, VerifiedManifest, Version,
};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// What a bundle is made of: the build's identity and its three files.
pub struct BundleInputs<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub security_epoch: u32,
    pub compatible: String,
    pub build_id: Option<String>,
    pub root_hash: &'a str,
    pub root: &'a Path,
    pub verity: &'a Path,
    pub uki: &'a Path,
}

/// Writes an unsigned bundle to `out`; returns its manifest.
pub fn write_bundle(inputs: &BundleInputs<'_>, out: &Path) -> Result<Manifest> {
    let files = [
        (ArtifactKind::Root, inputs.root),
        (ArtifactKind::Verity, inputs.verity),
        (ArtifactKind::Uki, inputs.uki),
    ];
    let mut artifacts = Vec::new();
    for (kind, path) in files {
        let (size, sha256) = hash_file(path)?;
        artifacts.push(Artifact { kind, size, sha256 });
    }
    let manifest = Manifest {
        name: inputs.name.to_string(),
        version: Version::parse(inputs.version).map_err(|e| anyhow::anyhow!("{e}"))?,
        security_epoch: inputs.security_epoch,
        compatible: inputs.compatible.clone(),
        build_id: inputs.build_id.clone(),
        build_date: None,
        root_hash: inputs.root_hash.to_string(),
        artifacts,
    };
    manifest
        .validate()
        .map_err(|e| anyhow::anyhow!("bundle manifest: {e}"))?;
    let header = RawHeader {
        manifest: manifest.to_json(),
        signatures: Vec::new(),
    }
    .encode()?;
    let mut w =
        BufWriter::new(File::create(out).with_context(|| format!("creating {}", out.display()))?);
    w.write_all(&header)?;
    for (_, path) in files {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        std::io::copy(&mut f, &mut w)
            .with_context(|| format!("copying {} into {}", path.display(), out.display()))?;
    }
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(manifest)
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().into())
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let size =
        std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok((size, hex::encode(h.finalize())))
}

/// Reads a bundle's header (nothing verified).
fn read_header(path: &Path) -> Result<(File, RawHeader)> {
    let mut f = File::open(path).with_context(|| format!("opening bundle {}", path.display()))?;
    let header = RawHeader::read(&mut BufReader::new(&mut f))
        .with_context(|| format!("{}: refused", path.display()))?;
    Ok((f, header))
}

/// The manifest's exact bytes, for signing with `ssh-keygen -Y sign`.
pub fn manifest_bytes(path: &Path) -> Result<Vec<u8>> {
    Ok(read_header(path)?.1.manifest)
}

/// What signs: a private key file, or a signature made elsewhere.
pub enum Signer<'a> {
    Key(&'a Path),
    Signature(&'a Path),
}

/// Adds a signature to the bundle at `path` (rewritten through a temporary
/// file in the same directory, then renamed). Returns the signing key's
/// fingerprint and whether the bundle changed (a key that already signed
/// is not added twice).
pub fn sign_bundle(path: &Path, signer: Signer<'_>) -> Result<(String, bool)> {
    let (mut file, header) = read_header(path)?;
    let signature = match signer {
        Signer::Key(key_path) => {
            let key = ssh_key::PrivateKey::read_openssh_file(key_path).map_err(|e| {
                anyhow::anyhow!("{}: not an OpenSSH private key: {e}", key_path.display())
            })?;
            trust::sign(&header.manifest, &key)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?
        }
        Signer::Signature(sig_path) => {
            let armoured = std::fs::read(sig_path)
                .with_context(|| format!("reading {}", sig_path.display()))?;
            trust::check_foreign_signature(&header.manifest, &armoured)
                .map_err(|e| anyhow::anyhow!("{}: {e}", sig_path.display()))?
                .1
        }
    };
    let key = trust::signature_key(&signature).map_err(|e| anyhow::anyhow!("{e}"))?;
    let fingerprint = trust::fingerprint(&key);
    if header
        .signatures
        .iter()
        .any(|s| trust::signature_key(s).ok().as_ref() == Some(&key))
    {
        return Ok((fingerprint, false));
    }
    let payload_offset = header.payload_offset();
    let mut signatures = header.signatures;
    signatures.push(signature);
    let new_header = RawHeader {
        manifest: header.manifest,
        signatures,
    }
    .encode()
    .with_context(|| format!("{}: cannot add a signature", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".airlock-sign-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&new_header)?;
    file.seek(SeekFrom::Start(payload_offset))?;
    std::io::copy(&mut file, tmp.as_file_mut())
        .with_context(|| format!("copying the payload of {}", path.display()))?;
    tmp.as_file().sync_all()?;
    let permissions = file.metadata()?.permissions();
    tmp.as_file().set_permissions(permissions)?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok((fingerprint, true))
}

/// Loads trusted keys: an `allowed_signers` file, or a directory of `.pub`
/// files (each one key, its identity the file name without `.pub`).
pub fn load_trust(keys: &Path, threshold: usize) -> Result<Trust> {
    let meta = std::fs::metadata(keys)
        .with_context(|| format!("reading trusted keys {}", keys.display()))?;
    let list: Vec<TrustedKey> = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(keys)
            .with_context(|| format!("listing {}", keys.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                let identity = f.file_stem().unwrap_or_default().to_string_lossy();
                trust::parse_public_key(&text, &identity).with_context(|| f.display().to_string())
            })
            .collect::<Result<_>>()?
    } else {
        let text =
            std::fs::read_to_string(keys).with_context(|| format!("reading {}", keys.display()))?;
        trust::parse_allowed_signers(&text).with_context(|| keys.display().to_string())?
    };
    Trust::new(list, threshold).with_context(|| format!("trusted keys {}", keys.display()))
}

/// Verifies the bundle at `path`; `progress` gets a line now and then
/// while the payload is hashed.
pub fn verify_bundle(
    path: &Path,
    trust: &Trust,
    progress: &mut dyn FnMut(&str),
) -> Result<VerifiedManifest> {
    let refused = || format!("{}: refused", path.display());
    let file = File::open(path).with_context(|| format!("opening bundle {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let verified = airlock_bundle::open(&mut r, trust).with_context(refused)?;
    // The length is known here: refuse a cut or extended file before hashing it.
    let expected = verified.bundle_len();
    if file_len < expected {
        return Err(airlock_bundle::Refusal::Truncated { what: "payload" })
            .with_context(|| format!("{} ({file_len} of {expected} bytes)", refused()));
    }
    if file_len > expected {
        return Err(airlock_bundle::Refusal::TrailingJunk)
            .with_context(|| format!("{} ({file_len} bytes, {expected} expected)", refused()));
    }
    let mut ticker = Ticker::new(Duration::from_secs(2));
    airlock_bundle::read_payload(
        &mut r,
        &verified.manifest,
        &mut |_, _| Ok(()),
        &mut |p: Progress| {
            if ticker.due() || p.done == p.total {
                progress(&format!(
                    "hashing {}: {} of {} MiB",
                    p.artifact,
                    p.done >> 20,
                    p.total >> 20
                ));
            }
        },
    )
    .with_context(refused)?;
    Ok(verified)
}

/// Says when a progress line is due: at most one per `every`.
struct Ticker {
    every: Duration,
    last: Instant,
}

impl Ticker {
    fn new(every: Duration) -> Ticker {
        Ticker {
            every,
            last: Instant::now(),
        }
    }

    fn due(&mut self) -> bool {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle from three small files, signed, verified, and refused
    /// once its payload changes: the file side of the crate's checks.
    #[test]
    fn write_sign_verify_on_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("root"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(p("verity"), b"tree").unwrap();
        std::fs::write(p("uki"), b"MZ").unwrap();
        let inputs = BundleInputs {
            name: "airlock",
            version: "1.0",
            security_epoch: 0,
            compatible: "airlock-debian-x86_64".into(),
            build_id: None,
            root_hash: &"ab".repeat(32),
            root: &p("root"),
            verity: &p("verity"),
            uki: &p("uki"),
        };
        let bundle = p("airlock_1.0.airlock");
        write_bundle(&inputs, &bundle).unwrap();
        let key = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]));
        key.write_openssh_file(&p("key"), ssh_key::LineEnding::LF)
            .unwrap();
        std::fs::write(
            p("allowed_signers"),
            format!(
                "it@example.org {}\n",
                key.public_key().to_openssh().unwrap()
            ),
        )
        .unwrap();
        let trust = load_trust(&p("allowed_signers"), 1).unwrap();

        let unsigned = format!(
            "{:#}",
            verify_bundle(&bundle, &trust, &mut |_| {}).unwrap_err()
        );
        assert!(
            unsigned.contains("not signed") && unsigned.contains("airlock_1.0.airlock"),
            "{unsigned}"
        );
        assert!(sign_bundle(&bundle, Signer::Key(&p("key"))).unwrap().1);
        assert!(
            !sign_bundle(&bundle, Signer::Key(&p("key"))).unwrap().1,
            "signed twice"
        );
        let mut lines = Vec::new();
        let v = verify_bundle(&bundle, &trust, &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(v.signers, ["it@example.org"]);
        assert_eq!(v.manifest.compatible, "airlock-debian-x86_64");
        assert_eq!(lines.last().unwrap(), "hashing uki: 3 of 3 MiB");

        let mut bytes = std::fs::read(&bundle).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&bundle, &bytes).unwrap();
        let err = format!(
            "{:#}",
            verify_bundle(&bundle, &trust, &mut |_| {}).unwrap_err()
        );
        assert!(err.contains("artifact uki is corrupted"), "{err}");
        bytes.truncate(last);
        std::fs::write(&bundle, &bytes).unwrap();
        let err = format!(
            "{:#}",
            verify_bundle(&bundle, &trust, &mut |_| {}).unwrap_err()
        );
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn directory_of_pub_files_is_a_trust_source() {
        let dir = tempfile::tempdir().unwrap();
        for seed in [1u8, 2] {
            let key =
                ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]));
            std::fs::write(
                dir.path().join(format!("key{seed}.pub")),
                key.public_key().to_openssh().unwrap(),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("README"), "not a key").unwrap();
        let trust = load_trust(dir.path(), 2).unwrap();
        let ids: Vec<&str> = trust.keys().iter().map(|k| k.identity.as_str()).collect();
        assert_eq!(ids, ["key1", "key2"]);
        assert!(format!("{:#}", load_trust(dir.path(), 3).unwrap_err()).contains("threshold 3"));
    }
}
