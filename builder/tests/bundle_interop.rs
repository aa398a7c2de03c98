//! Interop of bundle signatures with OpenSSH (needs `ssh-keygen`, from
//! openssh-client; no root): a bundle signed by `ssh-keygen -Y sign`
//! verifies with `airlock verify`, and a signature made by `airlock sign`
//! verifies with `ssh-keygen -Y verify` against the same allowed_signers
//! file. Runs the real `airlock` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use airlock::bundle::{write_bundle, BundleInputs};
use airlock_bundle::format::RawHeader;
use airlock_bundle::NAMESPACE;

/// Fails (never skips) without ssh-keygen: CI installs it.
fn ssh_keygen() -> PathBuf {
    airlock::exec::find_program("ssh-keygen")
        .expect("ssh-keygen not found: install openssh-client (ci/install-host-deps.sh does)")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn airlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
}

struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let scene = Scene { dir };
        std::fs::write(scene.path("root.erofs"), vec![0xe0; 1 << 20]).unwrap();
        std::fs::write(scene.path("root.verity"), vec![0x5a; 8192]).unwrap();
        std::fs::write(scene.path("uki.efi"), b"MZ not really a UKI").unwrap();
        scene
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh unsigned bundle.
    fn bundle(&self, name: &str) -> PathBuf {
        let out = self.path(name);
        let (root, verity, uki) = (
            self.path("root.erofs"),
            self.path("root.verity"),
            self.path("uki.efi"),
        );
        let inputs = BundleInputs {
            name: "airlock",
            version: "1.1",
            security_epoch: 0,
            compatible: "airlock-debian-x86_64".into(),
            build_id: None,
            root_hash: &"cd".repeat(32),
            root: &root,
            verity: &verity,
            uki: &uki,
        };
        write_bundle(&inputs, &out).unwrap();
        out
    }

    /// An ed25519 key pair made by ssh-keygen; returns the private key's path.
    fn keygen(&self, name: &str, passphrase: &str) -> PathBuf {
        let key = self.path(name);
        ok(Command::new(ssh_keygen())
            .args(["-q", "-t", "ed25519", "-C", name, "-N", passphrase, "-f"])
            .arg(&key));
        key
    }

    /// An allowed_signers line for `identity` and the key's `.pub`.
    fn allow(&self, file: &str, entries: &[(&str, &Path)]) -> PathBuf {
        let text: String = entries
            .iter()
            .map(|(identity, key)| {
                let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
                format!("{identity} {}\n", public.trim())
            })
            .collect();
        let path = self.path(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `airlock bundle manifest BUNDLE > FILE`.
    fn manifest(&self, bundle: &Path) -> PathBuf {
        let out = self.path("manifest");
        let file = std::fs::File::create(&out).unwrap();
        ok(airlock()
            .args(["bundle", "manifest"])
            .arg(bundle)
            .stdout(Stdio::from(file)));
        out
    }
}

#[test]
fn ssh_keygen_signature_verifies_with_airlock_verify() {
    let s = Scene::new();
    let bundle = s.bundle("a.airlock");
    let key = s.keygen("it-alice", "");
    let manifest = s.manifest(&bundle);
    assert_eq!(
        std::fs::read(&manifest).unwrap(),
        RawHeader::read(&mut std::fs::File::open(&bundle).unwrap())
            .unwrap()
            .manifest
    );
    ok(Command::new(ssh_keygen())
        .args(["-q", "-Y", "sign", "-n", NAMESPACE, "-f"])
        .arg(&key)
        .arg(&manifest));
    let sig = manifest.with_extension("sig");
    ok(airlock()
        .arg("sign")
        .arg("--signature")
        .arg(&sig)
        .arg(&bundle));
    let allowed = s.allow("allowed_signers", &[("alice@example.org", &key)]);
    let out = ok(airlock()
        .arg("verify")
        .arg("--keys")
        .arg(&allowed)
        .arg(&bundle));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("valid") && stdout.contains("alice@example.org"),
        "{stdout}"
    );

    // Two of two needed: refused with the reason, exit non-zero.
    let other = s.keygen("it-bob", "");
    let two = s.allow(
        "two_signers",
        &[("alice@example.org", &key), ("bob@example.org", &other)],
    );
    let out = run(airlock()
        .arg("verify")
        .arg("--keys")
        .arg(&two)
        .args(["--threshold", "2"])
        .arg(&bundle));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("a.airlock: refused")
            && stderr.contains("1 distinct trusted key(s) signed, 2 needed"),
        "{stderr}"
    );
    // The second signer, with a passphrase-protected key: ssh-keygen signs, airlock imports.
    let bob_pass = s.keygen("it-bob-pass", "correct horse");
    let out = run(airlock()
        .arg("sign")
        .arg("--key")
        .arg(&bob_pass)
        .arg(&bundle));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("passphrase"),
        "{out:?}"
    );
}

#[test]
fn airlock_sign_signature_verifies_with_ssh_keygen() {
    let s = Scene::new();
    let bundle = s.bundle("b.airlock");
    let key = s.keygen("it-carol", "");
    ok(airlock().arg("sign").arg("--key").arg(&key).arg(&bundle));
    let header = RawHeader::read(&mut std::fs::File::open(&bundle).unwrap()).unwrap();
    assert_eq!(header.signatures.len(), 1);
    let sig = s.path("b.sig");
    std::fs::write(&sig, &header.signatures[0]).unwrap();
    let manifest = s.manifest(&bundle);
    let allowed = s.allow("allowed_signers", &[("carol@example.org", &key)]);
    let verify = |message: &Path| {
        run(Command::new(ssh_keygen())
            .args(["-Y", "verify", "-f"])
            .arg(&allowed)
            .args(["-I", "carol@example.org", "-n", NAMESPACE, "-s"])
            .arg(&sig)
            .stdin(Stdio::from(std::fs::File::open(message).unwrap())))
    };
    let out = verify(&manifest);
    assert!(
        out.status.success(),
        "ssh-keygen -Y verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And OpenSSH refuses it over other bytes.
    let mut altered = std::fs::read(&manifest).unwrap();
    altered[5] ^= 1;
    std::fs::write(s.path("altered"), altered).unwrap();
    assert!(!verify(&s.path("altered")).status.success());
    // airlock verify agrees with the same allowed_signers file.
    ok(airlock()
        .arg("verify")
        .arg("--keys")
        .arg(&allowed)
        .arg(&bundle));
}
