//! Secure Boot with keys IT owns.
//!
//! `airlock genkeys --secure-boot DIR` makes the three UEFI key pairs: the
//! platform key (PK, owns the machine's key database), the key-exchange key
//! (KEK, may change the databases) and the signature-database key (db, signs
//! what boots). `airlock build --secure-boot-key db.key --secure-boot-cert
//! db.crt` signs systemd-boot (`BOOTX64.EFI`) and the UKI with the db key,
//! using the tools tree's `systemd-sbsign`, so a firmware with these keys
//! enrolled boots the image and refuses a changed kernel, initrd or command
//! line (all three are inside the signed UKI).
//!
//! The keys are made and checked with the `openssl` command, as mkosi and
//! sbctl users do; RSA 2048, because that is what every firmware's db
//! verification supports.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use xshell::{cmd, Shell};

use crate::exec::Runner;

/// The UEFI key roles, in the order a firmware enrols them (db and KEK
/// first, PK last: enrolling PK leaves setup mode).
pub const ROLES: [&str; 3] = ["db", "KEK", "PK"];

/// File holding the owner GUID that goes with each enrolled certificate.
pub const GUID_FILE: &str = "GUID";

/// The key that signs the UKI's PCR 11 policy (`.pcrsig`), and its public
/// half (`.pcrpkey`), under systemd's own names. A TPM secret sealed to
/// "PCR 11 as signed by this key" unseals under every image IT builds with
/// it, and under nothing else: updates need no re-sealing.
pub const PCR_PRIVATE_KEY: &str = "tpm2-pcr-private-key.pem";
pub const PCR_PUBLIC_KEY: &str = "tpm2-pcr-public-key.pem";

/// Days a certificate is valid. UEFI does not check expiry; some tools warn
/// on expired certificates, so ten years.
const VALID_DAYS: &str = "3650";

/// Files `genkeys` writes for one role: private key, PEM and DER certificate.
fn role_files(dir: &Path, role: &str) -> [PathBuf; 3] {
    [
        dir.join(format!("{role}.key")),
        dir.join(format!("{role}.crt")),
        dir.join(format!("{role}.cer")),
    ]
}

/// Makes PK, KEK and db key pairs, an owner GUID and the PCR policy key pair
/// in `dir`. Refuses, before writing anything, if any of the files is there
/// already (keys are never overwritten). If making one fails, the files this
/// call wrote are removed, so a second try starts clean. Returns the files
/// written.
pub fn genkeys(dir: &Path, common_name: &str) -> Result<Vec<PathBuf>> {
    ensure!(
        !common_name.is_empty() && !common_name.contains(['/', '=', '\n']),
        "--name {common_name:?}: must be non-empty, without '/', '=' or line breaks"
    );
    // X.509 limits a common name to 64 characters; ours end in " Secure Boot KEK".
    ensure!(common_name.chars().count() <= 48, "--name {common_name:?}: at most 48 characters (the certificates' common name is \"<name> Secure Boot KEK\", 64 at most)");
    let mut planned: Vec<PathBuf> = ROLES.iter().flat_map(|r| role_files(dir, r)).collect();
    planned.push(dir.join(GUID_FILE));
    planned.push(dir.join(PCR_PRIVATE_KEY));
    planned.push(dir.join(PCR_PUBLIC_KEY));
    let existing: Vec<String> = planned
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        bail!(
            "{} already holds Secure Boot keys ({}); nothing was written. Keys are never overwritten: move them away first, or build with the ones there",
            dir.display(),
            existing.join(", ")
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))?;
    let made = write_keys(dir, common_name);
    if made.is_err() {
        // None of them existed before (checked above): all are this call's.
        for file in planned.iter().filter(|p| p.exists()) {
            let _ = std::fs::remove_file(file);
        }
    }
    made.map(|()| planned)
}

/// The key files of [`genkeys`], written into an existing private `dir`.
fn write_keys(dir: &Path, common_name: &str) -> Result<()> {
    let sh = Shell::new()?;
    for role in ROLES {
        let [key, crt, cer] = role_files(dir, role);
        // The private key file exists, 0600, before openssl writes into it.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| format!("creating {}", key.display()))?;
        let subject = format!("/CN={common_name} Secure Boot {role}/");
        // openssl prints its progress on stderr: shown only if it fails.
        let out = cmd!(
            sh,
            "openssl req -new -x509 -newkey rsa:2048 -nodes -sha256 -days {VALID_DAYS} -subj {subject} -keyout {key} -out {crt}"
        )
        .quiet()
        .ignore_status()
        .output()
        .context("running openssl")?;
        if !out.status.success() {
            bail!(
                "making the {role} key pair with openssl: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        cmd!(sh, "openssl x509 -in {crt} -outform DER -out {cer}")
            .quiet()
            .run()
            .with_context(|| format!("writing {} (DER)", cer.display()))?;
    }
    std::fs::write(dir.join(GUID_FILE), format!("{}\n", uuid::Uuid::new_v4()))?;
    let (private, public) = (dir.join(PCR_PRIVATE_KEY), dir.join(PCR_PUBLIC_KEY));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    cmd!(
        sh,
        "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out {private}"
    )
    .quiet()
    .ignore_stderr()
    .run()
    .context("making the PCR policy key with openssl")?;
    cmd!(sh, "openssl pkey -in {private} -pubout -out {public}")
        .quiet()
        .run()
        .context("writing the PCR policy public key")?;
    Ok(())
}

/// The owner GUID written by `genkeys`.
pub fn read_guid(dir: &Path) -> Result<uuid::Uuid> {
    let path = dir.join(GUID_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    uuid::Uuid::parse_str(text.trim()).with_context(|| format!("{}: not a GUID", path.display()))
}

/// The db key a build signs with, checked.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// The certificate's subject, as openssl prints it (`CN=…`).
    pub subject: String,
    /// sha256 of the certificate's DER bytes (what a firmware's db holds).
    pub cert_sha256: String,
}

/// Checks `--secure-boot-key` and `--secure-boot-cert` before a build starts:
/// the certificate parses, the key parses without a passphrase, and both
/// hold the same public key.
pub fn load_signing_key(key: &Path, cert: &Path) -> Result<SigningKey> {
    let sh = Shell::new()?;
    for (option, path) in [("--secure-boot-key", key), ("--secure-boot-cert", cert)] {
        ensure!(path.is_file(), "{option} {}: no such file", path.display());
    }
    let cert_der = cmd!(sh, "openssl x509 -in {cert} -outform DER")
        .quiet()
        .ignore_stderr()
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout)
        .with_context(|| {
            format!(
                "--secure-boot-cert {}: not a PEM X.509 certificate",
                cert.display()
            )
        })?;
    let subject = cmd!(
        sh,
        "openssl x509 -in {cert} -noout -subject -nameopt RFC2253"
    )
    .quiet()
    .read()?
    .trim()
    .trim_start_matches("subject=")
    .to_string();
    let cert_public = cmd!(sh, "openssl x509 -in {cert} -noout -pubkey")
        .quiet()
        .read()?;
    let key_public = public_half(key, "PEM").with_context(|| {
        format!(
            "--secure-boot-key {}: not an unencrypted PEM private key (a passphrase-protected key cannot be used by an unattended build)",
            key.display()
        )
    })?;
    let key_public = String::from_utf8_lossy(&key_public);
    ensure!(
        cert_public.trim() == key_public.trim(),
        "--secure-boot-key {} does not belong to --secure-boot-cert {} ({}): their public keys differ",
        key.display(),
        cert.display(),
        subject
    );
    Ok(SigningKey {
        key: key.to_path_buf(),
        cert: cert.to_path_buf(),
        subject,
        cert_sha256: hex::encode(Sha256::digest(&cert_der)),
    })
}

/// The key a build signs the PCR 11 policy with, checked.
#[derive(Debug, Clone)]
pub struct PcrPolicyKey {
    pub key: PathBuf,
    /// Its public half, PEM (what the UKI's `.pcrpkey` carries).
    pub public_pem: String,
    /// sha256 of the public key's DER (SubjectPublicKeyInfo).
    pub public_sha256: String,
}

/// Checks `--tpm-policy-key` before a build starts: an unencrypted PEM
/// private key (RSA or EC, as systemd-measure takes).
pub fn load_pcr_policy_key(key: &Path) -> Result<PcrPolicyKey> {
    ensure!(
        key.is_file(),
        "--tpm-policy-key {}: no such file",
        key.display()
    );
    let bad = || {
        format!(
            "--tpm-policy-key {}: not an unencrypted PEM private key (`airlock genkeys --secure-boot` writes {PCR_PRIVATE_KEY})",
            key.display()
        )
    };
    let public_pem = public_half(key, "PEM").with_context(bad)?;
    let der = public_half(key, "DER").with_context(bad)?;
    Ok(PcrPolicyKey {
        key: key.to_path_buf(),
        public_pem: format!("{}\n", String::from_utf8_lossy(&public_pem).trim()),
        public_sha256: hex::encode(Sha256::digest(&der)),
    })
}

/// The public half of the unencrypted private key `key`, in openssl's
/// `form` (`PEM` or `DER`); `None` if openssl cannot read the key.
/// `-passin pass:` makes a passphrase-protected key fail at once instead of
/// asking on a terminal the build does not have.
fn public_half(key: &Path, form: &str) -> Option<Vec<u8>> {
    let sh = Shell::new().ok()?;
    cmd!(
        sh,
        "openssl pkey -in {key} -passin pass: -pubout -outform {form}"
    )
    .quiet()
    .ignore_stderr()
    .output()
    .ok()
    .filter(|o| o.status.success() && !o.stdout.is_empty())
    .map(|o| o.stdout)
}

/// Runs `f` with `files` (name, contents; mode 0600) in the private
/// directory `scratch/<name>` (0700: the chroot's `/run/airlock/<name>`),
/// and removes that directory afterwards, whatever happened: a private key
/// is on the build's scratch space only while a signing tool runs.
pub fn with_private_files<T>(
    scratch: &Path,
    name: &str,
    files: &[(&str, &[u8])],
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let dir = scratch.join(name);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            for (file, contents) in files {
                let path = dir.join(file);
                std::io::Write::write_all(
                    &mut std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)?,
                    contents,
                )
                .with_context(|| format!("writing {}", path.display()))?;
            }
            f(&dir)
        });
    std::fs::remove_dir_all(&dir)
        .with_context(|| format!("removing the key copy in {}", dir.display()))?;
    result
}

/// Signs each `(input, output file name)` with `systemd-sbsign` from the
/// tools tree; the outputs go to `scratch`. The key is copied into the
/// scratch directory (the chroot's `/run/airlock`) only for the signing and
/// removed right after, whatever happened.
pub fn sign_efi_binaries(
    runner: &Runner,
    tools_tree: &Path,
    scratch: &Path,
    key: &SigningKey,
    binaries: &[(&Path, &str)],
) -> Result<Vec<PathBuf>> {
    let private = std::fs::read(&key.key).context("reading the signing key")?;
    let cert = std::fs::read(&key.cert).context("reading the certificate")?;
    let files: [(&str, &[u8]); 2] = [("db.key", &private), ("db.crt", &cert)];
    with_private_files(scratch, "secure-boot", &files, |dir| {
        let mut signed = Vec::new();
        for (i, (input, output)) in binaries.iter().enumerate() {
            let unsigned = format!("unsigned-{i}.efi");
            std::fs::copy(input, dir.join(&unsigned))
                .with_context(|| format!("copying {}", input.display()))?;
            runner.in_tree(
                &format!("signing {output} for Secure Boot (systemd-sbsign)"),
                tools_tree,
                scratch,
                [
                    "/usr/lib/systemd/systemd-sbsign",
                    "sign",
                    "--private-key=/run/airlock/secure-boot/db.key",
                    "--certificate=/run/airlock/secure-boot/db.crt",
                    &format!("--output=/run/airlock/{output}"),
                    &format!("/run/airlock/secure-boot/{unsigned}"),
                ],
            )?;
            signed.push(scratch.join(output));
        }
        Ok(signed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_openssl() -> bool {
        crate::exec::find_program("openssl").is_some()
    }

    #[test]
    fn genkeys_makes_three_pairs_that_load_and_never_overwrites() {
        if !have_openssl() {
            panic!("openssl is needed (ci/install-host-deps.sh installs it)");
        }
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("sb");
        let written = genkeys(&keys, "airlock test").unwrap();
        assert_eq!(written.len(), 12);
        let pcr = load_pcr_policy_key(&keys.join(PCR_PRIVATE_KEY)).unwrap();
        assert_eq!(
            pcr.public_pem,
            std::fs::read_to_string(keys.join(PCR_PUBLIC_KEY)).unwrap()
        );
        assert_eq!(
            std::fs::metadata(keys.join(PCR_PRIVATE_KEY))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let err = load_pcr_policy_key(&keys.join("db.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--tpm-policy-key") && err.contains("not an unencrypted PEM private key"),
            "{err}"
        );
        assert_eq!(
            std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for role in ROLES {
            let [key, crt, cer] = role_files(&keys, role);
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600,
                "{role}"
            );
            let loaded = load_signing_key(&key, &crt).unwrap();
            assert_eq!(
                loaded.subject,
                format!("CN=airlock test Secure Boot {role}")
            );
            // The DER file is the certificate whose hash we report.
            assert_eq!(
                hex::encode(Sha256::digest(std::fs::read(&cer).unwrap())),
                loaded.cert_sha256
            );
        }
        read_guid(&keys).unwrap();
        let long = "x".repeat(49);
        assert!(genkeys(&dir.path().join("long"), &long)
            .unwrap_err()
            .to_string()
            .contains("at most 48 characters"));
        assert!(
            !dir.path().join("long").exists(),
            "a refused name wrote something"
        );
        let before = std::fs::read(keys.join("db.key")).unwrap();
        let err = genkeys(&keys, "airlock test").unwrap_err().to_string();
        assert!(
            err.contains("already holds Secure Boot keys") && err.contains("db.key"),
            "{err}"
        );
        assert_eq!(std::fs::read(keys.join("db.key")).unwrap(), before);
    }

    #[test]
    fn a_key_of_another_certificate_or_no_certificate_is_refused() {
        if !have_openssl() {
            panic!("openssl is needed (ci/install-host-deps.sh installs it)");
        }
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("sb");
        genkeys(&keys, "airlock").unwrap();
        let err = load_signing_key(&keys.join("KEK.key"), &keys.join("db.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not belong to --secure-boot-cert")
                && err.contains("CN=airlock Secure Boot db"),
            "{err}"
        );
        let err = load_signing_key(&keys.join("db.key"), &keys.join("db.key"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--secure-boot-cert") && err.contains("not a PEM X.509 certificate"),
            "{err}"
        );
        let err = load_signing_key(&keys.join("db.crt"), &keys.join("db.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--secure-boot-key") && err.contains("not an unencrypted PEM private key"),
            "{err}"
        );
        let err = load_signing_key(&keys.join("nope.key"), &keys.join("db.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--secure-boot-key") && err.contains("no such file"),
            "{err}"
        );
        // A passphrase-protected key fails at once (no prompt).
        let sh = Shell::new().unwrap();
        let (plain, locked) = (keys.join("db.key"), dir.path().join("locked.key"));
        cmd!(
            sh,
            "openssl pkey -in {plain} -aes256 -passout pass:secret -out {locked}"
        )
        .quiet()
        .run()
        .unwrap();
        let err = load_signing_key(&locked, &keys.join("db.crt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("passphrase-protected"), "{err}");
    }
}
