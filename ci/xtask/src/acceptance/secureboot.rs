//! Secure Boot refusals: the production machine's firmware (OVMF's Secure
//! Boot build, the suite's keys enrolled) is given a production disk whose
//! UKI was changed, and must refuse it before any kernel runs. The
//! production group (`lockdown::production_boot`) boots the unchanged
//! image on the same firmware and keys: the control that makes these
//! refusals mean something.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use xshell::{cmd, Shell};

use super::boot::tail;
use super::images::{private_copy, secure_boot_keys, source_dir, Images, MANIFEST};
use super::{AcceptanceOptions, Suite};
use crate::Machine;

pub const TESTS: &[&str] = &[
    "secure boot: a signed UKI with one byte changed is refused by the firmware; no kernel starts",
    "secure boot: the same UKI with its signature removed is refused behind the signed boot loader; no kernel starts",
    "secure boot: a UKI with another command line, signed by a key that is not enrolled, is refused; no kernel starts",
];

/// systemd-boot's message when the firmware refuses the UKI it loads
/// (`Error loading \EFI\Linux\….efi: Access denied`).
const REFUSED: &str = "Access denied";
/// The first line of a kernel that started.
const KERNEL_STARTED: &str = "Linux version";
/// From power-on to systemd-boot's refusal under TCG: about 30 s in the
/// hand-run (design note §0b); the firmware's retries end within a minute.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(150);

pub fn refusal_checks(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions) {
    if !suite.wants_any(TESTS) {
        return;
    }
    let prepared = (|| -> Result<(PathBuf, String)> {
        let keys = secure_boot_keys(opts)?;
        let signed = images
            .production_report
            .secure_boot
            .as_ref()
            .context("the production image's report says it is not signed for Secure Boot")?;
        let uki = signed
            .signed
            .iter()
            .find(|f| f.starts_with("/EFI/Linux/"))
            .context("the report lists no signed UKI")?
            .clone();
        Ok((keys, uki))
    })();
    let (keys, uki) = match prepared {
        Ok(p) => p,
        Err(e) => return suite.fail_all(TESTS, &e),
    };
    let machines = opts.work_dir.join("machines");

    suite.test(TESTS[0], || {
        let dir = machines.join("secure-boot-changed-byte");
        let disk = private_copy(&images.production, &dir, "disk.raw")?;
        let esp = Esp::of(&disk, images)?;
        let mut bytes = esp.read(&uki, &dir)?;
        // The middle of a UKI is inside its .linux or .initrd section, which
        // the signature's Authenticode hash covers.
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        esp.write(&uki, &bytes, &dir)?;
        let refusal = boot_expecting_refusal(&dir, &disk, &keys)?;
        Ok(format!(
            "{uki}: bit 0 of byte {at} of {} flipped; {refusal}",
            bytes.len()
        ))
    });

    suite.test(TESTS[1], || {
        let dir = machines.join("secure-boot-unsigned");
        let disk = private_copy(&images.production, &dir, "disk.raw")?;
        let esp = Esp::of(&disk, images)?;
        let signed = esp.read(&uki, &dir)?;
        let unsigned = without_signature(&signed)?;
        esp.write(&uki, &unsigned, &dir)?;
        let refusal = boot_expecting_refusal(&dir, &disk, &keys)?;
        Ok(format!(
            "{uki}: its signature ({} bytes) removed, {} bytes left; {refusal}",
            signed.len() - unsigned.len(),
            unsigned.len()
        ))
    });

    suite.test(TESTS[2], || {
        let dir = machines.join("secure-boot-foreign-key");
        let disk = private_copy(&images.production, &dir, "disk.raw")?;
        let esp = Esp::of(&disk, images)?;
        let test_uki = Esp::of(&images.test, images)?.read(&only_uki(&images.test, images)?, &dir)?;
        let unsigned = match images.test_report.secure_boot {
            Some(_) => without_signature(&test_uki)?,
            None => test_uki,
        };
        // A key pair of its own, as an attacker would make: never enrolled.
        let foreign = dir.join("foreign-keys");
        if foreign.exists() {
            std::fs::remove_dir_all(&foreign)?;
        }
        airlock::secureboot::genkeys(&foreign, "not enrolled")?;
        let key = airlock::secureboot::load_signing_key(&foreign.join("db.key"), &foreign.join("db.crt"))?;
        let scratch = tempfile::tempdir_in(&dir)?;
        let input = scratch.path().join("input.efi");
        std::fs::write(&input, &unsigned)?;
        let tools = airlock::policy_query::tools_tree(&source_dir(), &source_dir().join(MANIFEST), &opts.cache_dir)?;
        let runner = airlock::exec::Runner::new(false)?;
        let signed = airlock::secureboot::sign_efi_binaries(&runner, &tools, scratch.path(), &key, &[(&input, "foreign.efi")])?;
        let signed = std::fs::read(&signed[0])?;
        ensure!(signed.len() > unsigned.len(), "signing did not add a signature ({} → {} bytes)", unsigned.len(), signed.len());
        esp.write(&uki, &signed, &dir)?;
        let refusal = boot_expecting_refusal(&dir, &disk, &keys)?;
        Ok(format!(
            "{uki} replaced by the test image's UKI (command line with root hash {}…, not {}…) signed by {}; {refusal}",
            &images.test_report.root_hash[..12],
            &images.production_report.root_hash[..12],
            key.subject
        ))
    });
}

/// Boots `disk` on Secure Boot firmware with `keys` enrolled; Ok with the
/// refusal line once systemd-boot reports the firmware's refusal, an error
/// if a kernel starts or nothing is refused in time.
fn boot_expecting_refusal(dir: &Path, disk: &Path, keys: &Path) -> Result<String> {
    let vars = dir.join("OVMF_VARS.fd");
    let _ = std::fs::remove_file(&vars);
    let machine = Machine::with_secure_boot(disk, &vars, keys)?;
    let started = Instant::now();
    let mut vm = crate::Vm::start(machine.config())?;
    loop {
        let log = vm.serial_log();
        if let Some(line) = log.lines().find(|l| l.contains(KERNEL_STARTED)) {
            vm.keep_files();
            bail!("a kernel started: {}", line.trim());
        }
        if let Some(line) = log.lines().find(|l| l.contains(REFUSED)) {
            let line = line.trim().to_owned();
            // Give a kernel that would start anyway (another boot option)
            // the time to say so.
            thread::sleep(Duration::from_secs(5));
            let log = vm.serial_log();
            ensure!(
                !log.contains(KERNEL_STARTED),
                "refused, then a kernel started anyway:\n{}",
                tail(&log, 10)
            );
            return Ok(format!(
                "firmware refused it after {:.0}s: \"{line}\"; no `{KERNEL_STARTED}`",
                started.elapsed().as_secs_f64()
            ));
        }
        if started.elapsed() > REFUSAL_TIMEOUT {
            vm.keep_files();
            bail!(
                "no `{REFUSED}` and no kernel after {REFUSAL_TIMEOUT:?}; console:\n{}",
                tail(&log, 15)
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// A PE image without its Authenticode signature, as `sbattach --remove`
/// makes it: the certificate table (data directory 4 of the PE32+
/// optional header) cut off the end of the file and its entry zeroed.
fn without_signature(pe: &[u8]) -> Result<Vec<u8>> {
    let bytes = |at: usize, n: usize| pe.get(at..at + n).context("not a PE image: too short");
    let u32_at =
        |at: usize| -> Result<usize> { Ok(u32::from_le_bytes(bytes(at, 4)?.try_into()?) as usize) };
    let header = u32_at(0x3c)?;
    ensure!(
        bytes(header, 4)? == b"PE\0\0",
        "not a PE image: no PE signature at {header:#x}"
    );
    let optional = header + 4 + 20;
    ensure!(bytes(optional, 2)? == [0x0b, 0x02], "not a PE32+ image");
    let entry = optional + 112 + 4 * 8;
    let (offset, size) = (u32_at(entry)?, u32_at(entry + 4)?);
    ensure!(size > 0, "the image carries no signature");
    ensure!(
        offset + size <= pe.len(),
        "the certificate table ({offset:#x}, {size} bytes) runs past the end of the file"
    );
    let mut out = pe[..offset].to_vec();
    out[entry..entry + 8].fill(0);
    Ok(out)
}

/// An image's ESP, reached with mtools at its offset in the disk file.
pub(super) struct Esp {
    disk: PathBuf,
    offset: u64,
}

impl Esp {
    pub(super) fn of(disk: &Path, images: &Images) -> Result<Esp> {
        // Both images have the same layout (one manifest); the production
        // report's ESP offset holds for the test image too, and is checked.
        let offset = [&images.production_report, &images.test_report]
            .iter()
            .map(|r| {
                r.partitions
                    .iter()
                    .find(|p| p.label == airlock::disk::labels::ESP)
                    .map(|p| p.offset)
            })
            .collect::<Option<Vec<u64>>>()
            .context("a report lists no ESP")?;
        ensure!(
            offset[0] == offset[1],
            "the images' ESPs start at different offsets: {offset:?}"
        );
        Ok(Esp {
            disk: disk.to_path_buf(),
            offset: offset[0],
        })
    }

    fn image(&self) -> String {
        format!("{}@@{}", self.disk.display(), self.offset)
    }

    pub(super) fn read(&self, path: &str, scratch: &Path) -> Result<Vec<u8>> {
        let sh = Shell::new()?;
        let (image, tmp) = (self.image(), scratch.join("esp-read.efi"));
        let _ = std::fs::remove_file(&tmp);
        cmd!(sh, "mcopy -n -i {image} ::{path} {tmp}")
            .quiet()
            .run()
            .with_context(|| format!("reading {path} from the ESP of {}", self.disk.display()))?;
        let bytes = std::fs::read(&tmp)?;
        std::fs::remove_file(&tmp)?;
        Ok(bytes)
    }

    pub(super) fn write(&self, path: &str, bytes: &[u8], scratch: &Path) -> Result<()> {
        let sh = Shell::new()?;
        let (image, tmp) = (self.image(), scratch.join("esp-write.efi"));
        std::fs::write(&tmp, bytes)?;
        cmd!(sh, "mcopy -o -i {image} {tmp} ::{path}")
            .quiet()
            .run()
            .with_context(|| format!("writing {path} onto the ESP of {}", self.disk.display()))?;
        std::fs::remove_file(&tmp)?;
        Ok(())
    }
}

/// The one UKI on an image's ESP (`/EFI/Linux/*.efi`).
pub(super) fn only_uki(disk: &Path, images: &Images) -> Result<String> {
    let esp = Esp::of(disk, images)?;
    let sh = Shell::new()?;
    let image = esp.image();
    let listing = cmd!(sh, "mdir -b -i {image} ::/EFI/Linux").quiet().read()?;
    let ukis: Vec<&str> = listing
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with(".efi"))
        .collect();
    match ukis.as_slice() {
        [one] => Ok(one.trim_start_matches("::").to_owned()),
        _ => bail!(
            "expected one UKI on the ESP of {}, found {ukis:?}",
            disk.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ header with a certificate table of `size` bytes at
    /// the end of a file of `len` bytes.
    fn pe_with_table(len: usize, size: usize) -> Vec<u8> {
        let mut pe = vec![0u8; len];
        pe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        let optional = 0x80 + 24;
        pe[optional..optional + 2].copy_from_slice(&[0x0b, 0x02]);
        let entry = optional + 144;
        pe[entry..entry + 4].copy_from_slice(&((len - size) as u32).to_le_bytes());
        pe[entry + 4..entry + 8].copy_from_slice(&(size as u32).to_le_bytes());
        pe
    }

    #[test]
    fn removing_the_signature_cuts_the_table_and_clears_its_entry() {
        let pe = pe_with_table(4096, 1024);
        let out = without_signature(&pe).unwrap();
        assert_eq!(out.len(), 3072);
        let entry = 0x80 + 24 + 144;
        assert_eq!(&out[entry..entry + 8], &[0u8; 8]);
        assert!(without_signature(&out)
            .unwrap_err()
            .to_string()
            .contains("no signature"));
        assert!(without_signature(b"MZ").is_err());
        let mut odd = pe_with_table(4096, 1024);
        odd[0x80] = b'X';
        assert!(without_signature(&odd)
            .unwrap_err()
            .to_string()
            .contains("not a PE image"));
    }
}
