//! Who may sign: the trusted keys, the M-of-N threshold, and the check of
//! a bundle's SSH signatures (`sshsig`, namespace [`NAMESPACE`]) against them.
//!
//! The trusted keys are an OpenSSH `allowed_signers` file (the format of
//! `ssh-keygen -Y verify -f` and of git's `gpg.ssh.allowedSignersFile`), so
//! IT keeps one reviewable file that names the person behind each key, and
//! can check a bundle with plain `ssh-keygen` against the very same file.
//! Only ed25519 keys are accepted: `ssh-ed25519` and the FIDO2
//! `sk-ssh-ed25519@openssh.com` (whose signatures must carry the
//! user-presence flag, as `ssh-keygen -Y verify` requires by default).

use std::collections::BTreeSet;

use ssh_key::public::KeyData;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::Refusal;

/// The `sshsig` namespace of bundle signatures (`ssh-keygen -Y sign -n`).
pub const NAMESPACE: &str = "airlock-update@v1";

/// Most signatures a bundle may carry.
pub const MAX_SIGNATURES: usize = 16;

/// Most bytes of one armoured signature (an ed25519 one is about 300).
pub const MAX_SIGNATURE_BYTES: usize = 8192;

/// Most keys in a trust file.
pub const MAX_TRUSTED_KEYS: usize = 256;

/// A key allowed to sign bundles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// Who holds it (the `allowed_signers` principal, or a `.pub` file's name).
    pub identity: String,
    pub key: PublicKey,
}

/// The trusted keys and how many distinct ones must have signed.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Vec<TrustedKey>,
    threshold: usize,
}

/// A trust file or threshold that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("no trusted key (for namespace {NAMESPACE})")]
    NoKeys,
    #[error("more than {MAX_TRUSTED_KEYS} trusted keys")]
    TooManyKeys,
    #[error("threshold {threshold} is impossible with {keys} distinct trusted key(s): it must be 1..={keys}")]
    Threshold { threshold: usize, keys: usize },
    #[error("{0}")]
    Key(String),
}

impl Trust {
    /// Trust in `keys` (a key listed twice counts once), `threshold` of
    /// them needed.
    pub fn new(keys: Vec<TrustedKey>, threshold: usize) -> Result<Trust, TrustError> {
        let mut distinct: Vec<TrustedKey> = Vec::new();
        for k in keys {
            check_algorithm(&k.key).map_err(TrustError::Key)?;
            if !distinct
                .iter()
                .any(|d| d.key.key_data() == k.key.key_data())
            {
                distinct.push(k);
            }
        }
        if distinct.is_empty() {
            return Err(TrustError::NoKeys);
        }
        if distinct.len() > MAX_TRUSTED_KEYS {
            return Err(TrustError::TooManyKeys);
        }
        if threshold == 0 || threshold > distinct.len() {
            return Err(TrustError::Threshold {
                threshold,
                keys: distinct.len(),
            });
        }
        Ok(Trust {
            keys: distinct,
            threshold,
        })
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }
}

fn check_algorithm(key: &PublicKey) -> Result<(), String> {
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::SkEd25519 => Ok(()),
        other => Err(format!(
            "{other} keys are not accepted; use ed25519 (ssh-keygen -t ed25519 or -t ed25519-sk)"
        )),
    }
}

/// Parses an OpenSSH `allowed_signers` file: one key per line,
/// `identity[,identity…] [namespaces="…"] ssh-ed25519 AAAA… [comment]`;
/// `#` comments and blank lines are skipped. A line whose `namespaces=`
/// does not list [`NAMESPACE`] grants nothing here (as in OpenSSH); any
/// other option (`cert-authority`, `valid-after`, …) is refused rather
/// than ignored, so the file never means more here than it says.
pub fn parse_allowed_signers(text: &str) -> Result<Vec<TrustedKey>, TrustError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: String| TrustError::Line { line: i + 1, why };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (identity, rest) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("expected `identity key-type key`".into()))?;
        let rest = rest.trim_start();
        let (options, key_text) = if is_key_type(rest) {
            ("", rest)
        } else {
            split_options(rest).ok_or_else(|| bad("unterminated quote in options".into()))?
        };
        let mut for_us = true;
        for option in split_commas(options) {
            match option.split_once('=') {
                Some((name, value)) if name.eq_ignore_ascii_case("namespaces") => {
                    let list = value.trim_matches('"');
                    for_us = list.split(',').any(|n| n.trim() == NAMESPACE);
                }
                _ => {
                    return Err(bad(format!(
                        "option {option:?} is not supported (only namespaces=\"…\")"
                    )))
                }
            }
        }
        let key = PublicKey::from_openssh(key_text.trim())
            .map_err(|e| bad(format!("not an OpenSSH public key: {e}")))?;
        check_algorithm(&key).map_err(bad)?;
        if for_us {
            keys.push(TrustedKey {
                identity: identity.to_string(),
                key,
            });
        }
    }
    Ok(keys)
}

/// Parses one `.pub` file (`ssh-ed25519 AAAA… comment`); `identity` is
/// usually the file's name.
pub fn parse_public_key(text: &str, identity: &str) -> Result<TrustedKey, TrustError> {
    let key = PublicKey::from_openssh(text.trim())
        .map_err(|e| TrustError::Key(format!("not an OpenSSH public key: {e}")))?;
    check_algorithm(&key).map_err(TrustError::Key)?;
    Ok(TrustedKey {
        identity: identity.to_string(),
        key,
    })
}

fn is_key_type(s: &str) -> bool {
    s.starts_with("ssh-") || s.starts_with("sk-") || s.starts_with("ecdsa-")
}

/// Splits `opt,opt="a b" key…` at the first whitespace outside quotes.
fn split_options(s: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Some((&s[..i], s[i..].trim_start())),
            _ => {}
        }
    }
    None
}

fn split_commas(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// `SHA256:…` fingerprint, as `ssh-keygen -l` shows it.
pub fn fingerprint(key: &KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Parses one armoured signature (`-----BEGIN SSH SIGNATURE-----`), as
/// `ssh-keygen -Y sign` writes it.
pub fn parse_signature(armoured: &[u8]) -> Result<SshSig, String> {
    if armoured.len() > MAX_SIGNATURE_BYTES {
        return Err(format!(
            "{} bytes, more than {MAX_SIGNATURE_BYTES}",
            armoured.len()
        ));
    }
    let sig = SshSig::from_pem(armoured).map_err(|e| format!("not an SSH signature: {e}"))?;
    // ssh-key accepts any version up to its own and keeps it, and the
    // version is not covered by the signature: a 0 would verify too (the
    // bit-flip property test found that). Only the one OpenSSH writes.
    if sig.version() != SshSig::VERSION {
        return Err(format!(
            "SSH signature version {}, only {} is accepted",
            sig.version(),
            SshSig::VERSION
        ));
    }
    Ok(sig)
}

/// The one encoding a bundle stores: PEM with 70-column lines and LF.
pub fn canonical(sig: &SshSig) -> Result<Vec<u8>, String> {
    Ok(sig
        .to_pem(LineEnding::LF)
        .map_err(|e| format!("encoding the signature: {e}"))?
        .into_bytes())
}

/// Parses a signature stored in a bundle, which must be in [`canonical`]
/// form: a changed line break or unused base64 bit is refused too, so no
/// byte of a bundle can change without it being refused.
fn parse_stored_signature(armoured: &[u8]) -> Result<SshSig, String> {
    let sig = parse_signature(armoured)?;
    if canonical(&sig)? != armoured {
        return Err("not in canonical form (PEM, 70-column lines, LF)".into());
    }
    Ok(sig)
}

/// Checks the signatures over the exact manifest bytes; returns the
/// identities of the distinct trusted keys that signed, at least the
/// threshold. Refusals, most alarming first: a trusted key's signature
/// that does not match (altered manifest), a wrong namespace, no trusted
/// signer at all, too few.
pub fn check_signatures(
    manifest: &[u8],
    signatures: &[Vec<u8>],
    trust: &Trust,
) -> Result<Vec<String>, Refusal> {
    let mut signers: BTreeSet<usize> = BTreeSet::new();
    let mut untrusted: Vec<String> = Vec::new();
    let mut mismatch: Option<String> = None;
    let mut wrong_namespace: Option<String> = None;
    for (i, armoured) in signatures.iter().enumerate() {
        let sig = parse_stored_signature(armoured)
            .map_err(|why| Refusal::BadSignatureBlock(format!("signature {}: {why}", i + 1)))?;
        let Some(index) = trust
            .keys
            .iter()
            .position(|k| k.key.key_data() == sig.public_key())
        else {
            untrusted.push(fingerprint(sig.public_key()));
            continue;
        };
        let trusted = &trust.keys[index];
        if sig.namespace() != NAMESPACE {
            wrong_namespace.get_or_insert_with(|| sig.namespace().to_string());
            continue;
        }
        if trusted.key.verify(NAMESPACE, manifest, &sig).is_err() || !user_present(&sig) {
            mismatch.get_or_insert_with(|| trusted.identity.clone());
            continue;
        }
        signers.insert(index);
    }
    if signers.len() >= trust.threshold {
        return Ok(signers
            .into_iter()
            .map(|i| trust.keys[i].identity.clone())
            .collect());
    }
    if let Some(identity) = mismatch {
        return Err(Refusal::SignatureMismatch { identity });
    }
    if let Some(found) = wrong_namespace {
        return Err(Refusal::WrongNamespace { found });
    }
    if signers.is_empty() {
        return Err(Refusal::NoTrustedSignature {
            signatures: signatures.len(),
            untrusted,
        });
    }
    Err(Refusal::BelowThreshold {
        valid: signers.len(),
        needed: trust.threshold,
    })
}

/// FIDO2 signatures end with flags (1 byte) and a counter (4 bytes); flag
/// 0x01 is "user present". Plain keys have none.
fn user_present(sig: &SshSig) -> bool {
    if sig.algorithm() != Algorithm::SkEd25519 {
        return true;
    }
    let bytes = sig.signature_bytes();
    bytes.len() == 64 + 5 && bytes[64] & 0x01 == 0x01
}

/// Signs manifest bytes with an (unencrypted) private key; returns the
/// armoured signature, as `ssh-keygen -Y sign -n airlock-update@v1` would.
pub fn sign(manifest: &[u8], key: &PrivateKey) -> Result<Vec<u8>, String> {
    if key.is_encrypted() {
        return Err("the private key is passphrase-protected; sign with `ssh-keygen -Y sign` and import with `airlock sign --signature`".into());
    }
    check_algorithm(key.public_key())?;
    let sig = SshSig::sign(key, NAMESPACE, HashAlg::Sha512, manifest)
        .map_err(|e| format!("signing: {e}"))?;
    canonical(&sig)
}

/// Checks a signature made elsewhere before it is added to a bundle: it
/// parses, uses [`NAMESPACE`], an accepted algorithm, and matches the
/// manifest bytes under its own key. Returns that key and the signature
/// in the [`canonical`] form a bundle stores.
pub fn check_foreign_signature(
    manifest: &[u8],
    armoured: &[u8],
) -> Result<(PublicKey, Vec<u8>), String> {
    let sig = parse_signature(armoured)?;
    if sig.namespace() != NAMESPACE {
        return Err(format!(
            "namespace is {:?}, not {NAMESPACE:?} (ssh-keygen -Y sign -n {NAMESPACE})",
            sig.namespace()
        ));
    }
    let key = PublicKey::new(sig.public_key().clone(), "");
    check_algorithm(&key)?;
    key.verify(NAMESPACE, manifest, &sig)
        .map_err(|_| "the signature does not match this bundle's manifest bytes".to_string())?;
    if !user_present(&sig) {
        return Err("the FIDO2 signature was made without user presence (touch)".into());
    }
    Ok((key, canonical(&sig)?))
}

/// The public key inside an armoured signature.
pub fn signature_key(armoured: &[u8]) -> Result<KeyData, String> {
    parse_signature(armoured).map(|s| s.public_key().clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ssh_key::private::Ed25519Keypair;

    /// A deterministic test key (no randomness needed).
    pub(crate) fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    pub(crate) fn trusted(seed: u8, identity: &str) -> TrustedKey {
        TrustedKey {
            identity: identity.into(),
            key: key(seed).public_key().clone(),
        }
    }

    #[test]
    fn allowed_signers_lines() {
        let a = key(1).public_key().to_openssh().unwrap();
        let b = key(2).public_key().to_openssh().unwrap();
        let c = key(3).public_key().to_openssh().unwrap();
        let text = format!("# IT keys\n\nalice@example.org {a}\nbob namespaces=\"git,{NAMESPACE}\" {b} bob's laptop\ncarol namespaces=\"git\" {c}\n");
        let keys = parse_allowed_signers(&text).unwrap();
        let ids: Vec<&str> = keys.iter().map(|k| k.identity.as_str()).collect();
        assert_eq!(ids, ["alice@example.org", "bob"]);
        for (bad, word) in [
            (format!("x cert-authority {a}"), "cert-authority"),
            (format!("x valid-after=\"20250101\" {a}"), "valid-after"),
            ("x ssh-ed25519 AAAAnot-base64".to_string(), "line 1"),
            ("x".to_string(), "expected"),
            (
                "x ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC0 x".to_string(),
                "line 1",
            ),
        ] {
            let err = parse_allowed_signers(&bad).unwrap_err().to_string();
            assert!(err.contains(word), "{bad}: {err}");
        }
    }

    #[test]
    fn threshold_must_be_reachable_and_duplicates_count_once() {
        let keys = vec![trusted(1, "a"), trusted(1, "a-again"), trusted(2, "b")];
        assert_eq!(Trust::new(keys.clone(), 2).unwrap().keys().len(), 2);
        assert!(matches!(
            Trust::new(keys.clone(), 3),
            Err(TrustError::Threshold {
                threshold: 3,
                keys: 2
            })
        ));
        assert!(matches!(
            Trust::new(keys, 0),
            Err(TrustError::Threshold { .. })
        ));
        assert!(matches!(Trust::new(vec![], 1), Err(TrustError::NoKeys)));
    }

    #[test]
    fn foreign_signature_is_checked_before_import() {
        let manifest = b"{}";
        let sig = sign(manifest, &key(1)).unwrap();
        assert_eq!(
            &check_foreign_signature(manifest, &sig)
                .unwrap()
                .0
                .key_data(),
            &key(1).public_key().key_data()
        );
        assert!(check_foreign_signature(b"{ }", &sig)
            .unwrap_err()
            .contains("does not match"));
        let other_ns = SshSig::sign(&key(1), "file", HashAlg::Sha512, manifest)
            .unwrap()
            .to_pem(LineEnding::LF)
            .unwrap();
        assert!(check_foreign_signature(manifest, other_ns.as_bytes())
            .unwrap_err()
            .contains("namespace"));
    }
}
