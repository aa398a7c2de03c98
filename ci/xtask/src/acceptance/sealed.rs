//! Issue 11, the sealed `/var` (`docs/design/measured-boot.md` §3), on
//! booted machines with Secure Boot on and a TPM:
//!
//! - on the test machine (flashed as IT does, so /var is LUKS2 and its first
//!   boot sealed it): the dm-crypt mapping and the LUKS2 slots as the PC
//!   sees them; a marker the PC writes to /var is nowhere on the raw disk in
//!   plain text, and is there once the disk is decrypted with the recovery
//!   key (the control: the scan would have found it);
//! - a second PC: the test machine's disk, copied after its power-off, in a
//!   machine with the same firmware keys and a fresh TPM. /var stays
//!   closed, the kiosk shows IT's message, and the recovery key opens the
//!   partition there (`systemd-cryptsetup` in the booted image).

use std::io::Read;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use airlock::flash::luks;
use airlock::qemu::Graphics;
use anyhow::{ensure, Context, Result};

use super::boot::{sh, tail};
use super::images::Images;
use super::kiosk;
use super::provision::Flashed;
use super::{AcceptanceOptions, Suite};
use crate::{Machine, Vm};

pub const TESTS: &[&str] = &[
    "sealed: /var is the data partition's LUKS2 container (dm-crypt aes-xts-plain64, 4096-byte sectors), sealed to this PC's TPM at its first boot: a TPM2 slot and the recovery key's, the empty passphrase gone",
    "sealed: a marker the PC writes to /var, and the guests' disk markers, are nowhere on the raw disk in plain text; decrypted with the recovery key, they are there",
];

pub const SECOND_PC_TESTS: &[&str] = &[
    "sealed: the disk in a second PC with a fresh TPM: /var stays closed (no guest starts) and the kiosk shows IT's message, no console",
    "sealed: in that second PC the recovery key opens the data partition: the provisioned guest disks are there, byte for byte",
    "sealed: the same PC booting a UKI signed with IT's Secure Boot key but carrying another PCR policy: it boots, and /var stays closed",
];

/// Where the test machine writes its marker.
const MARKER_FILE: &str = "/var/tmp/airlock-sealed-marker";
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(90);
const CHUNK: usize = 8 << 20;

/// The checks on the running test machine.
pub fn sealed_checks(suite: &mut Suite, vm: &mut Vm, flashed: &Flashed) {
    suite.test(TESTS[0], || {
        let mount = sh(vm, "findmnt -n -o SOURCE,FSTYPE /var")?;
        ensure!(
            mount.split_whitespace().collect::<Vec<_>>() == ["/dev/mapper/var", "ext4"],
            "/var is {mount:?}, not ext4 on /dev/mapper/var"
        );
        let table = sh(vm, "dmsetup table var")?;
        ensure!(
            table.contains(" crypt aes-xts-plain64 ") && table.contains("sector_size:4096"),
            "dm table of var: {table}"
        );
        let slots = sh(vm, "systemd-cryptenroll /dev/disk/by-partlabel/data")?;
        let types: Vec<&str> = slots
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        ensure!(
            types.iter().filter(|t| **t == "tpm2").count() == 1
                && types.iter().filter(|t| **t == "password").count() == 1
                && types.len() == 2,
            "LUKS2 slots: {types:?} (want one tpm2, one password: the recovery key)\n{slots}"
        );
        // The empty passphrase must open nothing any more.
        let empty = sh(
            vm,
            "if /usr/lib/systemd/systemd-cryptsetup attach probe-empty /dev/disk/by-partlabel/data /usr/lib/airlock/empty-passphrase luks,headless,readonly,tries=1 2>&1; then /usr/lib/systemd/systemd-cryptsetup detach probe-empty; echo OPENED; else echo REFUSED; fi",
        )?;
        ensure!(
            empty.trim_end().ends_with("REFUSED"),
            "the empty passphrase still opens /var:\n{empty}"
        );
        // The sealing itself: its mark on /var, and its journal lines if the
        // first boot's journal reached the disk (an emulator reset right
        // after the first boot loses the unsynced end of it: seen on 27 Nov).
        let sealed = sh(
            vm,
            "ls /var/lib/airlock-seal/sealed; journalctl -o cat -u airlock-seal.service --no-pager | grep -e enrolled -e Wiped || true",
        )?;
        ensure!(
            sealed.lines().next() == Some("/var/lib/airlock-seal/sealed"),
            "airlock-seal.service left no mark:\n{sealed}"
        );
        let enrolled = match sealed
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" | ")
        {
            lines if lines.is_empty() => "its journal lines were not kept".to_owned(),
            lines => lines,
        };
        Ok(format!(
            "{}; slots {types:?}; empty passphrase refused; first boot: {enrolled}",
            table.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
        ))
    });
    suite.test(TESTS[1], || {
        let marker = format!(
            "airlock-sealed-marker {} {}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        );
        sh(
            vm,
            &format!("printf '%s\\n' '{marker}' > {MARKER_FILE} && sync && cat {MARKER_FILE}"),
        )?;
        let started = Instant::now();
        let disk = &flashed.disk;
        // And what a guest keeps on /var: each provisioned guest disk
        // starts with a marker of its own.
        let mut needles: Vec<(String, &[u8])> = vec![(MARKER_FILE.to_owned(), marker.as_bytes())];
        for (side, text) in &flashed.guest_markers {
            needles.push((format!("{side}'s guest disk marker"), text.as_bytes()));
        }
        let bytes: Vec<&[u8]> = needles.iter().map(|(_, b)| *b).collect();
        let plain = find_in(disk, 0, std::fs::metadata(disk)?.len(), &bytes, None)?;
        for ((what, _), at) in needles.iter().zip(&plain) {
            ensure!(at.is_none(), "{what} is in plain text on the raw disk at byte {}", at.unwrap_or_default());
        }
        let (start, len, cipher) = open_with_recovery_key(disk, &flashed.recovery_key)?;
        let decrypted = find_in(disk, start, len, &bytes, Some(&cipher))?;
        for ((what, _), at) in needles.iter().zip(&decrypted) {
            ensure!(at.is_some(), "{what} is not in the decrypted data partition either: the scan proves nothing");
        }
        let names: Vec<&str> = needles.iter().map(|(w, _)| w.as_str()).collect();
        Ok(format!(
            "{MARKER_FILE} written and synced; raw disk ({} MiB) scanned for it and for {}: none found; the data segment decrypted with the recovery key holds all {} ({:.1}s)",
            std::fs::metadata(disk)?.len() >> 20,
            names[1..].join(", "),
            names.len(),
            started.elapsed().as_secs_f64()
        ))
    });
}

/// The reboot check: the second boot opened /var with the TPM alone.
pub const REBOOT_TEST: &str =
    "reboot: the TPM alone opened /var on the second boot (no empty passphrase left, no second sealing)";

/// After a reboot (or an update): /var is open, its LUKS2 slots are still
/// the TPM's and the recovery key's (nobody typed the key: no prompt on a
/// headless PC, and it is not on the disk), and airlock-seal did not run.
pub fn tpm_unlock_after_reboot(vm: &mut Vm) -> Result<String> {
    let mount = sh(vm, "findmnt -n -o SOURCE,FSTYPE /var")?;
    ensure!(
        mount.starts_with("/dev/mapper/var"),
        "/var after the reboot: {mount}"
    );
    let slots = sh(vm, "systemd-cryptenroll /dev/disk/by-partlabel/data")?;
    let mut types: Vec<&str> = slots
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    types.sort_unstable();
    ensure!(
        types == ["password", "tpm2"],
        "LUKS2 slots now: {types:?}\n{slots}"
    );
    let unit = sh(
        vm,
        "systemctl show -p ActiveState --value systemd-cryptsetup@var.service; systemctl show -p ConditionResult --value airlock-seal.service",
    )?;
    let states: Vec<&str> = unit.split_whitespace().collect();
    ensure!(
        states == ["active", "no"],
        "systemd-cryptsetup@var and airlock-seal's condition: {states:?} (want active, no: sealed before)"
    );
    Ok(format!(
        "{}; slots {types:?} unchanged; systemd-cryptsetup@var active, airlock-seal skipped (sealed at the first boot)",
        mount.trim()
    ))
}

/// The test machine's disk, powered off, in a second PC with a fresh TPM.
pub fn second_pc(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions, flashed: &Flashed) {
    if !suite.wants_any(SECOND_PC_TESTS) {
        return;
    }
    let dir = opts.work_dir.join("machines/second-pc");
    let booted = (|| -> Result<Vm> {
        let disk = super::images::private_copy(&flashed.disk, &dir, "disk.raw")?;
        let machine = super::pc_as_it_sets_it_up(&disk, &dir, opts)?;
        let mut cfg = machine.config();
        cfg.graphics = Graphics::Std;
        let mut vm = Vm::start(cfg)?;
        vm.agent()?.wait_ready(BOOT_TIMEOUT).map_err(|e| {
            anyhow::anyhow!(
                "{e}; serial console ends with:\n{}",
                tail(&vm.serial_log(), 30)
            )
        })?;
        Ok(vm)
    })();
    let mut vm = match booted {
        Ok(vm) => vm,
        Err(e) => {
            suite.fail_all(&SECOND_PC_TESTS[..2], &e);
            return other_policy(suite, images, opts, flashed);
        }
    };
    let failed_before = suite.failed();
    suite.test(SECOND_PC_TESTS[0], || {
        let mount = sh(&mut vm, "findmnt -n -o SOURCE,FSTYPE /var")?;
        ensure!(
            mount.split_whitespace().collect::<Vec<_>>() == ["var-locked", "tmpfs"],
            "/var is {mount:?}, not the locked stand-in"
        );
        let unlock = sh(
            &mut vm,
            "systemctl is-failed systemd-cryptsetup@var.service; journalctl -b -o cat -u systemd-cryptsetup@var.service --no-pager | grep -v -e '^Starting' -e '^Failed to start' | tail -n 4; systemctl is-active airlockd.service || true",
        )?;
        ensure!(
            unlock.starts_with("failed"),
            "systemd-cryptsetup@var did not fail:\n{unlock}"
        );
        ensure!(
            unlock.trim_end().ends_with("inactive"),
            "the supervisor runs without /var:\n{unlock}"
        );
        let screens = opts.work_dir.join("screens/sealed");
        std::fs::create_dir_all(&screens)?;
        let shot = screens.join("second-pc.png");
        let start = Instant::now();
        let share = loop {
            vm.qmp()?.screendump(&shot)?;
            let image = crate::screen::load_image(&shot)?;
            let area = kiosk::guest_area(image.width, image.height);
            let share = kiosk::colour_share(&image, area, kiosk::MESSAGE_RGB);
            if share >= kiosk::MESSAGE_SHARE {
                kiosk::write_png(&image, &screens.join("second-pc-locked.png"))?;
                break share;
            }
            ensure!(
                start.elapsed() < MESSAGE_TIMEOUT,
                "no message box after {MESSAGE_TIMEOUT:?} ({:.1}% of the guest area); last screen {}",
                share * 100.0,
                shot.display()
            );
            thread::sleep(Duration::from_secs(2));
        };
        let said = sh(
            &mut vm,
            "journalctl -b -o cat -t airlock-kiosk --no-pager | grep 'message for IT' | tail -n 1",
        )?;
        ensure!(said.contains("data locked"), "the kiosk logged: {said}");
        ensure!(
            !vm.serial_log().contains("login:"),
            "a login prompt appeared on the serial console"
        );
        Ok(format!(
            "/var: {}; systemd-cryptsetup@var failed: {}; kiosk: {} (message box {:.0}% of the guest area; screenshot screens/sealed/second-pc-locked.png)",
            mount.trim(),
            unlock.lines().skip(1).filter(|l| !l.trim().is_empty() && *l != "inactive").collect::<Vec<_>>().join(" | "),
            said.trim(),
            share * 100.0
        ))
    });
    suite.test(SECOND_PC_TESTS[1], || {
        // The key reaches the PC as IT would type it; it is never on the disk.
        let key = &flashed.recovery_key;
        ensure!(
            key.len() == 71 && key.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
            "not a recovery key: {key:?}"
        );
        let out = sh(
            &mut vm,
            &format!(
                "umask 077; printf '%s' '{key}' > /run/airlock-recovery.key && \
                 /usr/lib/systemd/systemd-cryptsetup attach recovered /dev/disk/by-partlabel/data /run/airlock-recovery.key luks,headless,readonly,tries=1 && \
                 mkdir -p /run/recovered && mount -o ro,noload /dev/mapper/recovered /run/recovered && \
                 sha256sum /run/recovered/lib/airlock/classified/disk/test.raw /run/recovered/lib/airlock/general/disk/test.raw; \
                 rc=$?; umount /run/recovered; /usr/lib/systemd/systemd-cryptsetup detach recovered; rm -f /run/airlock-recovery.key; exit $rc"
            ),
        )?;
        for (side, sha256) in &flashed.guest_disks {
            ensure!(
                out.lines().any(|l| l.starts_with(sha256.as_str())
                    && l.contains(&format!("/{side}/disk/"))),
                "{side}'s guest disk is not the provisioned one ({sha256}):\n{out}"
            );
        }
        Ok("systemd-cryptsetup attach with the recovery key, mounted read-only: both guest disks' sha256 match what was flashed".into())
    });
    if suite.failed() > failed_before {
        vm.keep_files();
    }
    drop(vm);
    other_policy(suite, images, opts, flashed);
}

/// The test machine's disk and TPM (copies, after its power-off) with its
/// UKI replaced by one made from the same kernel, initrd, command line and
/// os-release but another PCR policy key (`.pcrsig`, `.pcrpkey`), signed
/// with IT's db key: Secure Boot lets it boot, PCR 7 is unchanged, and the
/// TPM must still refuse /var (the slot is bound to IT's policy key).
fn other_policy(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions, flashed: &Flashed) {
    suite.test(SECOND_PC_TESTS[2], || {
        let dir = opts.work_dir.join("machines/other-policy");
        let disk = super::images::private_copy(&flashed.disk, &dir, "disk.raw")?;
        let tpm = dir.join("tpm");
        if tpm.exists() {
            std::fs::remove_dir_all(&tpm)?;
        }
        let host = xshell::Shell::new()?;
        let test_tpm = std::path::absolute(opts.work_dir.join("machines/test/tpm"))?;
        xshell::cmd!(host, "cp -a {test_tpm} {tpm}").quiet().run()?;
        let uki_path = super::secureboot::only_uki(&disk, images)?;
        let esp = super::secureboot::Esp::of(&disk, images)?;
        let original = esp.read(&uki_path, &dir)?;
        let scratch = tempfile::tempdir_in(&dir)?;
        let s = scratch.path();
        std::fs::write(s.join("original.efi"), &original)?;
        let section = |name: &str, file: &str| -> Result<()> {
            let (from, to) = (s.join("original.efi"), s.join(file));
            xshell::cmd!(host, "objcopy --dump-section {name}={to} {from}")
                .quiet()
                .ignore_stderr()
                .run()
                .with_context(|| format!("extracting {name} from the UKI"))
        };
        for (name, file) in [
            (".linux", "kernel"),
            (".initrd", "initrd.img"),
            (".cmdline", "cmdline"),
            (".osrel", "os-release"),
            (".uname", "uname"),
            (".pcrpkey", "original-pcrpkey.pem"),
        ] {
            section(name, file)?;
        }
        let text = |file: &str| -> Result<String> {
            Ok(std::fs::read_to_string(s.join(file))?
                .trim_end_matches(['\0', '\n'])
                .to_owned())
        };
        let other_keys = dir.join("other-policy-keys");
        if other_keys.exists() {
            std::fs::remove_dir_all(&other_keys)?;
        }
        airlock::secureboot::genkeys(&other_keys, "another policy")?;
        let other = airlock::secureboot::load_pcr_policy_key(
            &other_keys.join(airlock::secureboot::PCR_PRIVATE_KEY),
        )?;
        ensure!(
            other.public_pem.trim() != text("original-pcrpkey.pem")?.trim(),
            "the new policy key is the image's"
        );
        let tools = airlock::policy_query::tools_tree(
            &super::images::source_dir(),
            &super::images::source_dir().join(super::images::MANIFEST),
            &opts.cache_dir,
        )?;
        let runner = airlock::exec::Runner::new(false)?;
        let uki = airlock::seal::make_uki(
            &runner,
            &tools,
            s,
            &airlock::seal::UkiInputs {
                kernel: &s.join("kernel"),
                kernel_version: &text("uname")?,
                cmdline: &text("cmdline")?,
                os_release: &text("os-release")?,
                pcr_policy_key: Some(&other),
            },
        )?;
        let keys = super::images::secure_boot_keys(opts)?;
        let db = airlock::secureboot::load_signing_key(&keys.join("db.key"), &keys.join("db.crt"))?;
        let signed = airlock::secureboot::sign_efi_binaries(&runner, &tools, s, &db, &[(&uki.path, "other-policy.efi")])?;
        esp.write(&uki_path, &std::fs::read(&signed[0])?, &dir)?;

        let vars = dir.join("OVMF_VARS.fd");
        let _ = std::fs::remove_file(&vars);
        let machine = Machine::with_secure_boot(&disk, &vars, &keys)?.with_tpm(&tpm);
        let mut cfg = machine.config();
        cfg.graphics = Graphics::Std;
        let mut vm = Vm::start(cfg)?;
        let ready = vm.agent()?.wait_ready(BOOT_TIMEOUT);
        if let Err(e) = ready {
            vm.keep_files();
            anyhow::bail!("{e}; serial console ends with:\n{}", tail(&vm.serial_log(), 30));
        }
        let booted_key = sh(&mut vm, "cat /run/systemd/tpm2-pcr-public-key.pem")?;
        let mount = sh(&mut vm, "findmnt -n -o SOURCE,FSTYPE /var")?;
        let unlock = sh(&mut vm, "systemctl is-failed systemd-cryptsetup@var.service || true")?;
        let result = (|| -> Result<String> {
            ensure!(
                booted_key.trim() == other.public_pem.trim(),
                "the booted UKI's policy key is not the other one"
            );
            ensure!(
                mount.split_whitespace().collect::<Vec<_>>() == ["var-locked", "tmpfs"],
                "/var is {mount:?}: the other policy opened it"
            );
            ensure!(unlock.trim() == "failed", "systemd-cryptsetup@var: {unlock}");
            Ok(format!(
                "{uki_path} remade with another PCR policy key and signed with IT's db key: booted under Secure Boot with the test machine's TPM (a copy); /var {}, systemd-cryptsetup@var failed",
                mount.trim()
            ))
        })();
        if result.is_err() {
            vm.keep_files();
        }
        result
    });
}

/// Runs `f` on a read-only loop device over the data partition of `disk`
/// (QEMU may have the file open: nothing is written), with the partition.
fn with_data_partition<T>(
    disk: &Path,
    f: impl FnOnce(&xshell::Shell, &str) -> Result<T>,
) -> Result<(T, airlock::flash::TablePartition)> {
    let sh = xshell::Shell::new()?;
    let table = airlock::flash::parse_sfdisk_json(
        &xshell::cmd!(sh, "sfdisk --json {disk}").quiet().read()?,
    )?;
    let data = table
        .partitions
        .iter()
        .find(|p| p.label == airlock::disk::labels::DATA)
        .context("no data partition")?
        .clone();
    let (offset, size) = (data.start.to_string(), data.size.to_string());
    let lo = xshell::cmd!(
        sh,
        "losetup --find --show --read-only --offset {offset} --sizelimit {size} {disk}"
    )
    .quiet()
    .read()?;
    let result = f(&sh, &lo);
    let _ = xshell::cmd!(sh, "losetup -d {lo}").quiet().run();
    Ok((result?, data))
}

/// Whether `key_file` opens a keyslot of the LUKS2 header on `device`.
fn opens(sh: &xshell::Shell, device: &str, key_file: &Path) -> bool {
    xshell::cmd!(
        sh,
        "cryptsetup open --test-passphrase --tries 1 --key-file {key_file} {device}"
    )
    .quiet()
    .ignore_stderr()
    .run()
    .is_ok()
}

/// The sealed state of a powered-off disk's data partition, from its LUKS2
/// header: a `systemd-tpm2` token (bound to PCR 7 and the signed PCR 11
/// policy), two keyslots (TPM, recovery key), the empty passphrase refused
/// and the recovery key accepted.
pub fn sealed_on_disk(disk: &Path, recovery_key: &str) -> Result<String> {
    let tmp = tempfile::tempdir()?;
    let (key_file, empty) = (tmp.path().join("recovery"), tmp.path().join("empty"));
    std::fs::write(&key_file, recovery_key)?;
    std::fs::write(&empty, b"")?;
    let (summary, _) = with_data_partition(disk, |sh, lo| {
        let json = xshell::cmd!(sh, "cryptsetup luksDump --dump-json-metadata {lo}")
            .quiet()
            .read()?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let tokens: Vec<&serde_json::Value> = v["tokens"]
            .as_object()
            .map(|t| t.values().collect())
            .unwrap_or_default();
        let tpm: Vec<&&serde_json::Value> = tokens
            .iter()
            .filter(|t| t["type"] == "systemd-tpm2")
            .collect();
        let [token] = tpm.as_slice() else {
            anyhow::bail!(
                "{} systemd-tpm2 tokens in the LUKS2 header:\n{json}",
                tpm.len()
            );
        };
        let keyslots = v["keyslots"].as_object().map_or(0, |k| k.len());
        ensure!(
            keyslots == 2,
            "{keyslots} keyslots (want 2: TPM, recovery key):\n{json}"
        );
        ensure!(
            token["tpm2-pcrs"] == serde_json::json!([7])
                && token["tpm2_pubkey_pcrs"] == serde_json::json!([11])
                && token["tpm2_pubkey"].as_str().is_some_and(|k| !k.is_empty()),
            "the TPM2 token is not bound to PCR 7 and the signed PCR 11 policy: {token}"
        );
        ensure!(
            !opens(sh, lo, &empty),
            "the empty passphrase still opens /var"
        );
        ensure!(
            opens(sh, lo, &key_file),
            "the recovery key does not open /var"
        );
        Ok(format!(
            "LUKS2 header: {keyslots} keyslots, a systemd-tpm2 token (PCR 7 + signed PCR 11 policy, bank {}); empty passphrase refused, recovery key accepted",
            token["tpm2-pcr-bank"].as_str().unwrap_or("?")
        ))
    })?;
    Ok(summary)
}

/// The data segment of the flashed disk's data partition (start, length on
/// the disk) and its cipher, from the volume key that host `cryptsetup`
/// gives for the recovery key (no device-mapper needed).
fn open_with_recovery_key(
    disk: &Path,
    recovery_key: &str,
) -> Result<(u64, u64, luks::SegmentCipher)> {
    let tmp = tempfile::tempdir()?;
    let key_file = tmp.path().join("recovery");
    std::fs::write(&key_file, recovery_key)?;
    let vk_file = tmp.path().join("vk");
    let (segment, data) = with_data_partition(disk, |sh, lo| {
        let json = xshell::cmd!(sh, "cryptsetup luksDump --dump-json-metadata {lo}")
            .quiet()
            .read()?;
        xshell::cmd!(
            sh,
            "cryptsetup luksDump -q --dump-volume-key --key-file {key_file} --volume-key-file {vk_file} {lo}"
        )
        .quiet()
        .ignore_stdout()
        .run()
        .context("cryptsetup refused the recovery key")?;
        luks::parse_metadata(&json)
    })?;
    let key = luks::VolumeKey::from_bytes(&std::fs::read(&vk_file)?)?;
    Ok((
        data.start + segment.offset,
        data.size - segment.offset,
        luks::SegmentCipher::new(&key, segment.iv_tweak),
    ))
}

/// For each of `needles`, its first byte offset (from `start`) in `len`
/// bytes of `file` from `start`, decrypted by `cipher` first if given (then
/// `start` is the data segment's first byte and chunks stay sector-aligned).
fn find_in(
    file: &Path,
    start: u64,
    len: u64,
    needles: &[&[u8]],
    cipher: Option<&luks::SegmentCipher>,
) -> Result<Vec<Option<u64>>> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::Start(start))?;
    let mut buf = vec![0u8; CHUNK];
    let mut found: Vec<Option<u64>> = vec![None; needles.len()];
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    // The previous chunk's last bytes, so a needle across two chunks is found.
    let mut carry: Vec<u8> = Vec::new();
    let mut pos = 0u64;
    while pos < len && found.iter().any(Option::is_none) {
        let n = (len - pos).min(CHUNK as u64) as usize;
        f.read_exact(&mut buf[..n])?;
        if let Some(c) = cipher {
            let whole = n - n % luks::SECTOR as usize;
            c.decrypt(&mut buf[..whole], pos / luks::SECTOR);
        }
        let mut window = std::mem::take(&mut carry);
        let window_start = pos - window.len() as u64;
        window.extend_from_slice(&buf[..n]);
        for (needle, at) in needles.iter().zip(found.iter_mut()) {
            if at.is_none() {
                *at = memchr::memmem::find(&window, needle).map(|i| window_start + i as u64);
            }
        }
        let keep = longest.saturating_sub(1).min(window.len());
        carry = window[window.len() - keep..].to_vec();
        pos += n as u64;
    }
    Ok(found)
}
