//! The production image seen from outside, as a user at the PC would: the
//! serial console, the screen and the keyboard (QMP). No agent here — and a
//! check that none answers. Then a root partition with one byte flipped.

use std::io::{Read, Seek, SeekFrom, Write};
use std::thread;
use std::time::Duration;

use airlock::qemu::Graphics;
use anyhow::{ensure, Context, Result};

use super::boot::tail;
use super::images::{private_copy, secure_boot_keys, Images};
use super::kiosk;
use super::{AcceptanceOptions, Suite};
use crate::{images_differ, Machine, Vm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// systemd prints this on the console when the appliance target is reached.
const TARGET_REACHED: &str = "Reached target airlock.target";

const PRODUCTION_TESTS: &[&str] = &[
    "production: boots to airlock.target with no login prompt on the serial console",
    "production: no test agent answers",
    "production: Ctrl-Alt-F1..F6 and SysRq show no console (screen unchanged)",
    "production: Ctrl-Alt-Del does not reboot",
    "production: its first boot sealed /var to the PC's TPM (read from the host after power-off: a systemd-tpm2 token, no empty passphrase; the recovery key still opens it)",
    "production: a PC without guest disks or machine settings shows IT's message on screen, no console",
    "production: boots with Secure Boot on and only IT's keys enrolled (signed boot loader and UKI); the kernel is locked down",
];

const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How much larger than the image the production machine's disk is.
const DISK_GROWTH: u64 = 512 << 20;

const TAMPER_TEST: &str = "verity: one flipped byte in the root partition stops the boot";

pub fn production_boot(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions) {
    if !suite.wants_any(PRODUCTION_TESTS) {
        return;
    }
    let dir = opts.work_dir.join("machines/production");
    let recovery_key = std::cell::RefCell::new(String::new());
    let booted = (|| -> Result<Vm> {
        // Flashed as IT does, without provisioning (no guest disks, no
        // machine file): the kiosk's message for IT.
        let (disk, key) = super::provision::flash(
            &images.production,
            &dir,
            DISK_GROWTH,
            vec!["airlock".into(), "flash".into()],
        )?;
        *recovery_key.borrow_mut() = key;
        // As IT sets a PC up: Secure Boot on, the firmware holding only the
        // keys of `airlock genkeys --secure-boot` (no Microsoft keys); a TPM.
        let machine = super::pc_as_it_sets_it_up(&disk, &dir, opts)?;
        let mut cfg = machine.config();
        cfg.graphics = Graphics::Std;
        let vm = Vm::start(cfg)?;
        vm.wait_for_serial(TARGET_REACHED, BOOT_TIMEOUT)?;
        Ok(vm)
    })();
    let mut vm = match booted {
        Ok(vm) => vm,
        Err(e) => return suite.fail_all(PRODUCTION_TESTS, &e),
    };
    suite.test(PRODUCTION_TESTS[0], || {
        // Give anything that would spawn a getty time to do so.
        thread::sleep(Duration::from_secs(15));
        let log = vm.serial_log();
        ensure!(
            !log.contains("login:"),
            "a login prompt appeared:\n{}",
            tail(&log, 20)
        );
        ensure!(
            !log.contains("Give root password") && !log.contains("emergency mode"),
            "a rescue prompt appeared:\n{}",
            tail(&log, 20)
        );
        Ok(format!(
            "{} seen; no `login:` in {} lines of serial output",
            TARGET_REACHED,
            log.lines().count()
        ))
    });
    suite.test(PRODUCTION_TESTS[6], || {
        let signed = images
            .production_report
            .secure_boot
            .as_ref()
            .context("the production report says the image is not signed")?;
        let keys = secure_boot_keys(opts)?;
        let enrolled_db =
            airlock::secureboot::load_signing_key(&keys.join("db.key"), &keys.join("db.crt"))?
                .cert_sha256;
        ensure!(
            signed.certificate_sha256 == enrolled_db,
            "signed by certificate {} ({}), but the firmware's db holds {enrolled_db}",
            signed.certificate_sha256,
            signed.certificate_subject
        );
        let log = vm.serial_log();
        let lines: Vec<&str> = [
            "secureboot: Secure boot enabled",
            "Kernel is locked down from EFI Secure Boot",
        ]
        .iter()
        .map(|want| {
            log.lines()
                .find(|l| l.contains(want))
                .map(str::trim)
                .with_context(|| format!("no `{want}` on the console"))
        })
        .collect::<Result<_>>()?;
        Ok(format!(
            "{} signed by {}; console: {}",
            signed.signed.join(", "),
            signed.certificate_subject,
            lines.join(" | ")
        ))
    });
    suite.test(PRODUCTION_TESTS[1], || {
        let agent = vm.agent()?;
        match agent.wait_ready(Duration::from_secs(20)) {
            Ok(id) => anyhow::bail!("an agent answered on the test port (boot id {id})"),
            Err(_) => Ok("nothing answered on org.airlock.test.0 within 20 s".into()),
        }
    });
    // Before the console-key checks, which need a settled screen.
    suite.test(PRODUCTION_TESTS[5], || {
        let screens = opts.work_dir.join("screens/production");
        std::fs::create_dir_all(&screens)?;
        let shot = screens.join("unprovisioned.png");
        let start = std::time::Instant::now();
        loop {
            vm.qmp()?.screendump(&shot)?;
            let image = crate::screen::load_image(&shot)?;
            let area = kiosk::guest_area(image.width, image.height);
            let share = kiosk::colour_share(&image, area, kiosk::MESSAGE_RGB);
            let strip = kiosk::read_strip(&image);
            if share >= kiosk::MESSAGE_SHARE {
                let side = kiosk::strip_side(&strip)?;
                let png = screens.join("unprovisioned-message.png");
                kiosk::write_png(&image, &png)?;
                let log = vm.serial_log();
                ensure!(!log.contains("login:"), "a login prompt appeared on the serial console");
                return Ok(format!(
                    "{}x{}: {side} label strip, message box (#{:02x}{:02x}{:02x}) fills {:.0}% of the area below it, {:.0}s after airlock.target; screenshot {}",
                    image.width,
                    image.height,
                    kiosk::MESSAGE_RGB[0],
                    kiosk::MESSAGE_RGB[1],
                    kiosk::MESSAGE_RGB[2],
                    share * 100.0,
                    start.elapsed().as_secs_f64(),
                    png.display()
                ));
            }
            ensure!(
                start.elapsed() < MESSAGE_TIMEOUT,
                "no message box after {MESSAGE_TIMEOUT:?}: {:.1}% of the area below the strip is the message colour; last screen kept in {}",
                share * 100.0,
                shot.display()
            );
            thread::sleep(Duration::from_secs(2));
        }
    });
    suite.test(PRODUCTION_TESTS[2], || {
        let dir = tempfile::tempdir()?;
        let before = dir.path().join("before.png");
        let after = dir.path().join("after.png");
        let qmp = vm.qmp()?;
        qmp.screendump(&before)?;
        for n in 1..=6 {
            qmp.send_key(&["ctrl", "alt", &format!("f{n}")])?;
            thread::sleep(Duration::from_millis(800));
        }
        // Alt-SysRq-h (help) would print on the console; -s (sync) and -b
        // (reboot) would act. All must do nothing with kernel.sysrq = 0.
        for key in ["h", "s", "b"] {
            qmp.send_key(&["alt", "sysrq", key])?;
            thread::sleep(Duration::from_millis(800));
        }
        thread::sleep(Duration::from_secs(3));
        qmp.screendump(&after)?;
        let reset = qmp.saw_event("RESET")?;
        ensure!(!reset, "the VM reset after the key presses (SysRq-b acted)");
        let differ = images_differ(&before, &after)?;
        if differ {
            let keep = vm.dir().join("screens");
            std::fs::create_dir_all(&keep)?;
            std::fs::copy(&before, keep.join("before.png"))?;
            std::fs::copy(&after, keep.join("after.png"))?;
            anyhow::bail!(
                "the screen changed after Ctrl-Alt-F1..F6 / SysRq; screendumps kept in {}",
                keep.display()
            );
        }
        let log = vm.serial_log();
        ensure!(
            !log.contains("sysrq: HELP") && !log.contains("SysRq : HELP"),
            "SysRq-h printed its help"
        );
        Ok("screendumps identical before and after; no SysRq output, no reset".into())
    });
    suite.test(PRODUCTION_TESTS[3], || {
        let before = vm.serial_position();
        let qmp = vm.qmp()?;
        for _ in 0..3 {
            qmp.send_key(&["ctrl", "alt", "delete"])?;
            thread::sleep(Duration::from_millis(500));
        }
        thread::sleep(Duration::from_secs(15));
        let qmp = vm.qmp()?;
        ensure!(
            !qmp.saw_event("RESET")? && !qmp.saw_event("SHUTDOWN")?,
            "the VM reset or shut down after Ctrl-Alt-Del"
        );
        let status = qmp.query_status()?;
        let log = vm.serial_log();
        let since = &log[(before as usize).min(log.len())..];
        ensure!(
            !since.contains("reboot") && !since.contains("Stopping"),
            "the console shows a shutdown starting:\n{since}"
        );
        Ok(format!(
            "3× Ctrl-Alt-Del: no reset, VM {status:?}, nothing on the console"
        ))
    });
    // The partition table, read from the host once the machine is off.
    drop(vm);
    suite.test(PRODUCTION_TESTS[4], || {
        let disk = dir.join("disk.raw");
        super::sealed::sealed_on_disk(&disk, &recovery_key.borrow())
    });
}

/// Flips one byte of the erofs superblock in the root partition (so the
/// very first read of the root fails verification) and boots.
pub fn tampered_root(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions) {
    if !suite.wants(TAMPER_TEST) {
        return;
    }
    suite.test(TAMPER_TEST, || {
        let dir = opts.work_dir.join("machines/tampered");
        let disk = private_copy(&images.production, &dir, "disk.raw")?;
        let root = images
            .production_report
            .partitions
            .iter()
            .find(|p| p.label.starts_with("root_"))
            .context("no root partition in the report")?;
        let at = root.offset + 1024 + 8;
        flip_byte(&disk, at)?;
        let vars = dir.join("OVMF_VARS.fd");
        let _ = std::fs::remove_file(&vars);
        let vm = Machine::new(&disk, &vars)?.boot()?;
        // The initrd opens verity, then mounting the root reads the
        // superblock: verification fails, the mount fails, the boot stops.
        vm.wait_for_serial("verity", BOOT_TIMEOUT)
            .context("no dm-verity error on the console")?;
        thread::sleep(Duration::from_secs(45));
        let log = vm.serial_log();
        ensure!(
            !log.contains(TARGET_REACHED),
            "the tampered image reached airlock.target:\n{}",
            tail(&log, 20)
        );
        let evidence: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("verity")
                    && (l.contains("corrupt") || l.contains("fail") || l.contains("error"))
            })
            .take(3)
            .collect();
        ensure!(
            !evidence.is_empty(),
            "no verity failure message on the console:\n{}",
            tail(&log, 30)
        );
        Ok(format!(
            "byte at disk offset {at} flipped; {}",
            evidence.join(" | ")
        ))
    });
}

fn flip_byte(path: &std::path::Path, offset: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&b)?;
    Ok(())
}
