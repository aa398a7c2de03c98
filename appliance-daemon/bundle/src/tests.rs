//! The refusal matrix: each flaw of a bundle, and the reason it must be
//! refused for. Plus random truncations and bit flips, which must never
//! panic and never verify.

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use ssh_key::public::{Ed25519PublicKey, KeyData, SkEd25519};
use ssh_key::{Algorithm, HashAlg, LineEnding, PublicKey, Signature, SigningKey, SshSig};

use crate::format::RawHeader;
use crate::manifest::tests::sample;
use crate::policy::RunningSystem;
use crate::trust::tests::{key, trusted};
use crate::trust::{self, Trust};
use crate::{check_policy, verify, ArtifactKind, Manifest, PolicyRefusal, Refusal, Version};

const ROOT: &[u8] = b"erofs root filesystem bytes";
const VERITY: &[u8] = b"hash tree";
const UKI: &[u8] = b"MZ unified kernel image";

fn manifest() -> Manifest {
    let mut m = sample();
    for (a, data) in m.artifacts.iter_mut().zip([ROOT, VERITY, UKI]) {
        a.size = data.len() as u64;
        a.sha256 = hex::encode(Sha256::digest(data));
    }
    m
}

/// A bundle of `m` signed by the test keys with these seeds.
fn bundle_of(m: &Manifest, seeds: &[u8]) -> Vec<u8> {
    let manifest = m.to_json();
    let signatures = seeds
        .iter()
        .map(|&s| trust::sign(&manifest, &key(s)).unwrap())
        .collect();
    let mut out = RawHeader {
        manifest,
        signatures,
    }
    .encode()
    .unwrap();
    for data in [ROOT, VERITY, UKI] {
        out.extend_from_slice(data);
    }
    out
}

fn bundle(seeds: &[u8]) -> Vec<u8> {
    bundle_of(&manifest(), seeds)
}

/// Keys 1, 2 and 3 trusted, `threshold` of them needed.
fn trust(threshold: usize) -> Trust {
    Trust::new(
        vec![trusted(1, "alice"), trusted(2, "bob"), trusted(3, "carol")],
        threshold,
    )
    .unwrap()
}

fn refusal(bytes: &[u8], trust: &Trust) -> Refusal {
    verify(&mut &bytes[..], trust).expect_err("bundle verified")
}

/// Offset of the payload in a bundle made by `bundle`.
fn payload_offset(bytes: &[u8]) -> usize {
    RawHeader::read(&mut &bytes[..]).unwrap().payload_offset() as usize
}

#[test]
fn signed_bundle_verifies() {
    let v = verify(&mut &bundle(&[1])[..], &trust(1)).unwrap();
    assert_eq!(v.manifest, manifest());
    assert_eq!(v.signers, ["alice"]);
    assert_eq!(v.bundle_len(), bundle(&[1]).len() as u64);
    let v = verify(&mut &bundle(&[3, 1])[..], &trust(2)).unwrap();
    assert_eq!(v.signers, ["alice", "carol"]);
}

#[test]
fn wrong_key_is_refused() {
    match refusal(&bundle(&[9]), &trust(1)) {
        Refusal::NoTrustedSignature {
            signatures: 1,
            untrusted,
        } => {
            assert_eq!(
                untrusted,
                [trust::fingerprint(key(9).public_key().key_data())]
            )
        }
        other => panic!("{other}"),
    }
}

#[test]
fn unsigned_bundle_is_refused() {
    let r = refusal(&bundle(&[]), &trust(1));
    assert!(
        matches!(r, Refusal::NoTrustedSignature { signatures: 0, .. }),
        "{r}"
    );
    assert_eq!(r.to_string(), "the bundle is not signed");
}

#[test]
fn below_threshold_is_refused_and_one_key_counts_once() {
    assert!(matches!(
        refusal(&bundle(&[1]), &trust(2)),
        Refusal::BelowThreshold {
            valid: 1,
            needed: 2
        }
    ));
    assert!(matches!(
        refusal(&bundle(&[1, 1, 1]), &trust(2)),
        Refusal::BelowThreshold {
            valid: 1,
            needed: 2
        }
    ));
    assert!(matches!(
        refusal(&bundle(&[1, 9]), &trust(2)),
        Refusal::BelowThreshold {
            valid: 1,
            needed: 2
        }
    ));
    // The same key listed twice in the trust file is one key.
    let doubled = Trust::new(
        vec![
            trusted(1, "alice"),
            trusted(1, "alice-laptop"),
            trusted(2, "bob"),
        ],
        2,
    )
    .unwrap();
    assert!(matches!(
        refusal(&bundle(&[1]), &doubled),
        Refusal::BelowThreshold {
            valid: 1,
            needed: 2
        }
    ));
}

#[test]
fn corrupted_payload_byte_is_refused() {
    for (kind, offset) in [
        (ArtifactKind::Root, 0),
        (ArtifactKind::Verity, ROOT.len()),
        (ArtifactKind::Uki, ROOT.len() + VERITY.len() + 3),
    ] {
        let mut b = bundle(&[1]);
        let at = payload_offset(&b) + offset;
        b[at] ^= 0x01;
        match refusal(&b, &trust(1)) {
            Refusal::CorruptPayload { artifact, .. } => assert_eq!(artifact, kind),
            other => panic!("{kind}: {other}"),
        }
    }
}

#[test]
fn corrupted_manifest_byte_is_refused() {
    let clean = bundle(&[1]);
    let text = String::from_utf8(manifest().to_json()).unwrap();
    // A changed digit (still valid JSON) and a broken structure alike.
    for needle in ["\"size\": 9", "{"] {
        let mut b = clean.clone();
        let at = 16 + text.find(needle).unwrap() + needle.len() - 1;
        b[at] ^= 0x01;
        let r = refusal(&b, &trust(1));
        assert!(
            matches!(r, Refusal::SignatureMismatch { ref identity } if identity == "alice"),
            "{needle}: {r}"
        );
    }
}

#[test]
fn signed_but_invalid_manifest_is_refused_after_the_signature_check() {
    let mut v: serde_json::Value = serde_json::from_slice(&manifest().to_json()).unwrap();
    v["artifacts"][2]["kind"] = "initrd".into();
    let manifest = serde_json::to_vec(&v).unwrap();
    let signatures = vec![trust::sign(&manifest, &key(1)).unwrap()];
    let b = RawHeader {
        manifest,
        signatures,
    }
    .encode()
    .unwrap();
    assert!(
        matches!(refusal(&b, &trust(1)), Refusal::CorruptManifest(why) if why.contains("initrd"))
    );
}

#[test]
fn truncated_file_is_refused() {
    let b = bundle(&[1]);
    let start = payload_offset(&b);
    for (len, part) in [
        (0, "header"),
        (10, "header"),
        (20, "manifest"),
        (start - 3, "signature block"),
        (start, "payload"),
        (b.len() - 1, "payload"),
    ] {
        match refusal(&b[..len], &trust(1)) {
            Refusal::Truncated { what } => assert_eq!(what, part, "cut at {len}"),
            other => panic!("cut at {len}: {other}"),
        }
    }
}

#[test]
fn appended_junk_is_refused() {
    let mut b = bundle(&[1]);
    b.push(0);
    assert!(matches!(refusal(&b, &trust(1)), Refusal::TrailingJunk));
}

#[test]
fn absurd_sizes_are_refused() {
    // A signed manifest that claims 16 GiB + 1: refused as content, never read.
    let mut v: serde_json::Value = serde_json::from_slice(&manifest().to_json()).unwrap();
    v["artifacts"][0]["size"] = (crate::MAX_ARTIFACT_BYTES + 1).into();
    let m = serde_json::to_vec(&v).unwrap();
    let b = RawHeader {
        signatures: vec![trust::sign(&m, &key(1)).unwrap()],
        manifest: m,
    }
    .encode()
    .unwrap();
    assert!(
        matches!(refusal(&b, &trust(1)), Refusal::CorruptManifest(why) if why.contains("outside"))
    );
    // A manifest length of 4 GiB in the header.
    let mut b = bundle(&[1]);
    b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        refusal(&b, &trust(1)),
        Refusal::AbsurdSize {
            what: "manifest",
            ..
        }
    ));
    // A signature count of 1000.
    let mut b = bundle(&[1]);
    let at = 16 + manifest().to_json().len();
    b[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
    assert!(matches!(
        refusal(&b, &trust(1)),
        Refusal::AbsurdSize {
            what: "signature count",
            ..
        }
    ));
}

#[test]
fn signature_for_another_namespace_is_refused() {
    let m = manifest().to_json();
    let sig = SshSig::sign(&key(1), "git", HashAlg::Sha512, &m)
        .unwrap()
        .to_pem(LineEnding::LF)
        .unwrap();
    let mut b = RawHeader {
        manifest: m,
        signatures: vec![sig.into_bytes()],
    }
    .encode()
    .unwrap();
    b.extend_from_slice(&[ROOT, VERITY, UKI].concat());
    assert!(matches!(refusal(&b, &trust(1)), Refusal::WrongNamespace { found } if found == "git"));
}

fn running(version: &str, epoch: u32, compatible: &str) -> RunningSystem {
    RunningSystem {
        compatible: compatible.into(),
        version: Version::parse(version).unwrap(),
        stored_epoch: epoch,
        root_slot_bytes: Some(1 << 30),
        verity_slot_bytes: Some(1 << 26),
    }
}

/// Policy refusals come from a bundle that verifies.
#[test]
fn verified_bundle_meets_policy_checks() {
    let v = verify(&mut &bundle(&[1])[..], &trust(1)).unwrap();
    assert_eq!(
        check_policy(&v.manifest, &running("1.1", 3, "airlock-debian-x86_64")),
        Ok(())
    );
    assert!(matches!(
        check_policy(&v.manifest, &running("1.2", 3, "airlock-debian-x86_64")),
        Err(PolicyRefusal::NotNewer { .. })
    ));
    assert!(matches!(
        check_policy(&v.manifest, &running("1.3", 3, "airlock-debian-x86_64")),
        Err(PolicyRefusal::NotNewer { .. })
    ));
    assert!(matches!(
        check_policy(&v.manifest, &running("1.1", 4, "airlock-debian-x86_64")),
        Err(PolicyRefusal::EpochBelow { .. })
    ));
    assert!(matches!(
        check_policy(&v.manifest, &running("1.1", 3, "airlock-fedora-x86_64")),
        Err(PolicyRefusal::WrongCompatible { .. })
    ));
}

/// `sk-ssh-ed25519@openssh.com` (FIDO2) signatures, made the way a security
/// key makes them: verified, and refused without the user-presence flag.
#[test]
fn fido2_ed25519_signatures_verify_only_with_user_presence() {
    fn raw_sign<S: SigningKey>(k: &S, msg: &[u8]) -> Vec<u8> {
        k.try_sign(msg).unwrap().as_bytes().to_vec()
    }
    let pair = ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]);
    let application = "ssh:";
    let public = KeyData::SkEd25519(SkEd25519::new(Ed25519PublicKey(pair.public.0), application));
    let m = manifest().to_json();
    let sk_sig = |flags: u8| {
        let signed = SshSig::signed_data(trust::NAMESPACE, HashAlg::Sha512, &m).unwrap();
        let mut data = Sha256::digest(application).to_vec();
        data.push(flags);
        data.extend_from_slice(&42u32.to_be_bytes());
        data.extend_from_slice(&Sha256::digest(&signed));
        let mut bytes = raw_sign(&ssh_key::PrivateKey::from(pair.clone()), &data);
        bytes.push(flags);
        bytes.extend_from_slice(&42u32.to_be_bytes());
        let sig = Signature::new(Algorithm::SkEd25519, bytes).unwrap();
        SshSig::new(public.clone(), trust::NAMESPACE, HashAlg::Sha512, sig)
            .unwrap()
            .to_pem(LineEnding::LF)
            .unwrap()
            .into_bytes()
    };
    let fido = Trust::new(
        vec![crate::TrustedKey {
            identity: "yubikey".into(),
            key: PublicKey::new(public.clone(), ""),
        }],
        1,
    )
    .unwrap();
    let with = |sig: Vec<u8>| {
        let mut b = RawHeader {
            manifest: m.clone(),
            signatures: vec![sig],
        }
        .encode()
        .unwrap();
        b.extend_from_slice(&[ROOT, VERITY, UKI].concat());
        b
    };
    assert_eq!(
        verify(&mut &with(sk_sig(0x01))[..], &fido).unwrap().signers,
        ["yubikey"]
    );
    assert!(matches!(
        refusal(&with(sk_sig(0x00)), &fido),
        Refusal::SignatureMismatch { .. }
    ));
    assert!(trust::check_foreign_signature(&m, &sk_sig(0x01)).is_ok());
}

/// The bundle the random tests damage, made once.
fn two_signed() -> &'static [u8] {
    static BUNDLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BUNDLE.get_or_init(|| bundle(&[1, 2]))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any cut of a valid bundle is refused (as truncated), never panics.
    #[test]
    fn random_truncations_never_verify(cut in 0usize..1000) {
        let b = two_signed();
        let len = cut % b.len();
        let r = verify(&mut &b[..len], &trust(2));
        prop_assert!(matches!(r, Err(Refusal::Truncated { .. })), "cut at {}: {:?}", len, r.map(|_| ()));
    }

    /// Any single bit flip anywhere is refused, never panics.
    #[test]
    fn random_bit_flips_never_verify(at in 0usize..100_000, bit in 0u8..8) {
        let mut b = two_signed().to_vec();
        let at = at % b.len();
        b[at] ^= 1 << bit;
        prop_assert!(verify(&mut &b[..], &trust(2)).is_err(), "flip at {} verified", at);
    }

    /// Arbitrary bytes after a valid magic never panic.
    #[test]
    fn random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = b"AIRLOCKB\0\0\0\x01".to_vec();
        b.extend_from_slice(&tail);
        prop_assert!(verify(&mut &b[..], &trust(1)).is_err());
    }
}

/// An sshsig blob whose version field reads 0 instead of 1 (base64 `AQ` →
/// `AA` at the 13th character) is refused: the version is not covered by
/// the signature, and ssh-key alone would accept it.
#[test]
fn signature_version_other_than_one_is_refused() {
    let mut b = two_signed().to_vec();
    let armour = b"-----BEGIN SSH SIGNATURE-----\n";
    let start = b.windows(armour.len()).position(|w| w == armour).unwrap() + armour.len();
    assert_eq!(
        &b[start..start + 16],
        b"U1NIU0lHAAAAAQAA",
        "SSHSIG magic, then version 1"
    );
    b[start + 13] = b'A';
    assert!(verify(&mut &b[..], &trust(2)).is_err());
}
