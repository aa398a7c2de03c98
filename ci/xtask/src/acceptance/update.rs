//! Signed whole-image updates in the booted test image (issue 9), on a
//! machine of their own (the test image flashed and provisioned like the
//! test machine; the test machine's groups are not disturbed). One
//! timeline of six boots, each step a named test:
//!
//! 1. slot A (the built version): a bundle with one flipped payload byte
//!    and one signed by an untrusted key are refused, each with its reason,
//!    and nothing is written (slot B's bytes and the GPT hashed from the
//!    host, the ESP listed in the guest); then an apply of the next version
//!    is cut off by killing QEMU as soon as slot B's first MiB is on disk;
//! 2. the machine still boots slot A; a second apply is cut off once the
//!    middle of slot B's root is on disk;
//! 3. the machine still boots slot A; applying again succeeds (one boot
//!    try), the bundle fetched from the update server the machine file
//!    names (`airlock-update apply --update-server`, through the host's
//!    firewall by the general uplink), with a marker on the data partition
//!    that makes a test-only unit fail at the next boot;
//! 4. slot B boots, the health gate fails (on that unit), the entry is not
//!    blessed;
//! 5. the try used up, the firmware's boot loader falls back to slot A by
//!    itself; the marker goes; the update stick (`airlock flash BUNDLE
//!    STICK`, as the IT guide makes it) is plugged in through QMP and the
//!    agent udev starts for it applies it (three tries);
//! 6. slot B boots, passes the health gate, and systemd-bless-boot blesses
//!    its entry; the stick, still in, is left alone (its version runs);
//!    the periodic check's unit (what airlock-update-fetch.timer starts)
//!    finds its own version on the update server and stops after the
//!    header, then refuses an untrusted bundle before its payload.
//!
//! Steps 1–5 take their bundles from a FAT image made on the host with
//! mtools, attached as a second disk and mounted by the test agent;
//! `airlock-update` runs as systemd starts it (`systemd-run`), so in its
//! own SELinux domain, not the agent's. Step 5's bundle comes the way IT
//! brings one: a raw update stick on the USB bus, and nobody but udev
//! starts the agent.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock::build::Report;
use airlock::qemu::Graphics;
use anyhow::{bail, ensure, Context, Result};
use xshell::{cmd, Shell};

use super::boot::{sh, tail};
use super::emulator::{self, Faults};
use super::images::{self, Images};
use super::kiosk;
use super::{AcceptanceOptions, Suite};
use crate::outside::Outside;
use crate::{Machine, Vm};

pub const TESTS: &[&str] = &[
    "update: a bundle with one flipped payload byte is refused, with its reason; nothing is written",
    "update: a bundle signed by an untrusted key is refused, with its reason; nothing is written",
    "update: a power cut during the slot write still boots slot A",
    "update: a second power cut, half-way through the root partition, still boots slot A",
    "update: after the power cuts, applying the update again succeeds, fetched from the update server of the machine settings ([network.update], through the host's firewall)",
    "update: a new slot whose health gate fails falls back to slot A by itself",
    "update: A → B from an update stick (airlock flash BUNDLE STICK): plugged in, the PC applies it by itself; the new version boots from slot B and its entry is blessed",
    "update: the data partition (guest disks, journal) is intact after every step",
    "update: zero AVC denials in every boot of the update machine",
    "update: IT's info page (Ctrl+Scroll Lock) shows the running version, the host name and the last update: the refusal with its reason, later the blessed update",
    "update: slot B's new UKI (same signed PCR policy) opens /var with the TPM alone: no re-sealing, no re-enrolment",
    "update: the PC's periodic check (airlock-update-fetch.timer) asks the update server: the version it runs is left alone after its header, an untrusted bundle is refused before its payload, nothing is written",
];
/// Made before the machine boots; the tests above need it.
const PREPARE: &str = "update: the next version is built, signed, and put on a USB stick";

/// Boot to the agent's "ready" (as the test machine's).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// An apply reads the bundle twice and the slot once more under TCG.
const APPLY_TIMEOUT: Duration = Duration::from_secs(900);
/// The health gate waits up to 300 s for both guests (its configuration).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(420);
const AGENT: &str = "/usr/lib/airlock/airlock-update";
/// Where the test agent mounts the USB stick (a directory the update
/// agent's domain may search).
const STICK: &str = "/run/airlock-acceptance-usb";
/// Its presence makes `airlock-test-unhealthy.service` fail (test images).
const UNHEALTHY_MARKER: &str = "/var/lib/airlock-test/unhealthy";

/// What the host made for the machine.
struct Prepared {
    /// The next version's report (its root hash identifies slot B's image).
    next: Report,
    /// Signed bundle of the next version, and its name on the stick.
    bundle_name: String,
    /// That bundle on the host (the update server serves it), and the same
    /// signed by a key the image does not trust.
    signed: PathBuf,
    untrusted: PathBuf,
    stick: PathBuf,
    /// The signed bundle written raw by `airlock flash BUNDLE STICK` (the
    /// IT guide's update stick), plugged in as a USB disk later.
    update_stick: PathBuf,
    payload_bytes: u64,
}

pub fn update_checks(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions) {
    if !suite.wants_any(TESTS) {
        return;
    }
    let mut prepared = None;
    suite.prerequisite(PREPARE, || {
        let p = prepare(images, opts)?;
        let detail = format!(
            "{} {} (root hash {}), signed with the suite's key; stick {} MiB",
            p.next.name,
            p.next.version,
            &p.next.root_hash[..16],
            std::fs::metadata(&p.stick)?.len() >> 20
        );
        prepared = Some(p);
        Ok(detail)
    });
    let Some(prepared) = prepared else {
        return suite.fail_all(TESTS, &anyhow::anyhow!("`{PREPARE}` failed"));
    };
    let outside = match Outside::create() {
        Ok(o) => o,
        Err(e) => return suite.fail_all(TESTS, &e),
    };
    // As the test machine's groups (`boot::run_group`): failures while the
    // emulator faulted set that run aside; a freshly flashed machine runs the
    // whole timeline again (at most `emulator::MAX_RUNS` runs in all), and
    // the last run's results stand.
    for run in 1..=emulator::MAX_RUNS {
        let mark = suite.mark();
        let Some(faults) = run_timeline(suite, images, opts, &prepared, &outside) else {
            return;
        };
        if suite.failed_since(mark) == 0 || faults.is_empty() {
            return;
        }
        let why = faults.join("; ");
        if run == emulator::MAX_RUNS {
            println!("acceptance: `update:` tests failed while {why}, in each of {run} runs; the failures stand");
            return;
        }
        println!("acceptance: `update:` tests failed while {why}; running them again on a freshly flashed machine (run {} of at most {})", run + 1, emulator::MAX_RUNS);
        suite.set_aside(mark, "update:", &why);
    }
}

/// Flashes the update machine and runs every step; the emulator faults
/// seen on the way (`None` if the machine never came up).
fn run_timeline(
    suite: &mut Suite,
    images: &Images,
    opts: &AcceptanceOptions,
    prepared: &Prepared,
    outside: &Outside,
) -> Option<Vec<String>> {
    let mut run = match Timeline::start(images, opts, prepared, outside) {
        Ok(r) => r,
        Err(e) => {
            suite.fail_all(TESTS, &e);
            return None;
        }
    };
    let mark = suite.mark();
    run.steps(suite, prepared);
    run.record_faults();
    if suite.failed_since(mark) > 0 {
        if let Some(vm) = run.vm.as_mut() {
            vm.keep_files();
        }
        println!(
            "acceptance: update machine disk kept in {}",
            run.machine.disk().display()
        );
    }
    Some(run.faults)
}

/// Builds the next version of the test image, signs its bundle with the
/// suite's key, makes the flipped and the untrusted copies, and writes all
/// three onto a FAT image (the USB stick).
fn prepare(images: &Images, opts: &AcceptanceOptions) -> Result<Prepared> {
    let next_version = format!("{}.1", images.test_report.version);
    let (dir, next, seconds) = images::build_test_version(opts, &next_version)?;
    println!(
        "acceptance: update: {} {} built in {seconds:.1}s",
        next.name, next.version
    );
    let work = opts.work_dir.join("update");
    std::fs::create_dir_all(&work)?;
    let key = images::update_key(opts)?;
    let bundle_name = next.bundle.clone();
    let signed = work.join(&bundle_name);
    std::fs::copy(dir.join(&next.bundle), &signed)
        .with_context(|| format!("copying {}", next.bundle))?;
    airlock::bundle::sign_bundle(&signed, airlock::bundle::Signer::Key(&key.private))?;

    // One payload byte flipped, in the middle of the root filesystem.
    let flipped = work.join("flipped.airlock");
    std::fs::copy(&signed, &flipped)?;
    let payload_offset = {
        let mut f = std::io::BufReader::new(std::fs::File::open(&flipped)?);
        airlock_bundle::format::RawHeader::read(&mut f)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .payload_offset()
    };
    flip_byte(&flipped, payload_offset + next.root_fs_bytes / 2)?;

    // The same bundle, signed by a key the image does not trust.
    let untrusted = work.join("untrusted.airlock");
    std::fs::copy(dir.join(&next.bundle), &untrusted)?;
    let other = tempfile::tempdir()?;
    let other_key = other.path().join("id_ed25519");
    let sh = Shell::new()?;
    cmd!(
        sh,
        "ssh-keygen -q -t ed25519 -N '' -C untrusted -f {other_key}"
    )
    .quiet()
    .run()?;
    airlock::bundle::sign_bundle(&untrusted, airlock::bundle::Signer::Key(&other_key))?;

    let files = [
        (&signed, bundle_name.as_str()),
        (&flipped, "flipped.airlock"),
        (&untrusted, "untrusted.airlock"),
    ];
    let total: u64 = files
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let stick = work.join("usb-stick.img");
    let _ = std::fs::remove_file(&stick);
    let kib = (total + (64 << 20)) / 1024;
    let kib = kib.to_string();
    cmd!(sh, "mkfs.vfat -F 32 -n AIRLOCKUSB -C {stick} {kib}")
        .quiet()
        .run()
        .context("making the USB stick's filesystem (mkfs.vfat)")?;
    let _env = sh.push_env("MTOOLS_SKIP_CHECK", "1");
    for (path, name) in files {
        let target = format!("::/{name}");
        cmd!(sh, "mcopy -i {stick} {path} {target}")
            .quiet()
            .run()
            .context("copying a bundle onto the USB stick (mcopy)")?;
    }
    let payload_bytes = std::fs::metadata(&signed)?.len() - payload_offset;

    // The update stick, made as the IT guide makes it: a USB disk (here a
    // file of a stick's size) and `airlock flash BUNDLE DISK`.
    let update_stick = work.join("update-stick.raw");
    let _ = std::fs::remove_file(&update_stick);
    std::fs::File::create(&update_stick)?
        .set_len((std::fs::metadata(&signed)?.len() + (64 << 20)).next_multiple_of(1 << 20))?;
    let args = [
        "airlock".as_ref(),
        "flash".as_ref(),
        signed.as_os_str(),
        update_stick.as_os_str(),
    ];
    let cli = <airlock::cli::Cli as clap::Parser>::try_parse_from(args)
        .context("the IT guide's update stick command line")?;
    airlock::run(cli).context("airlock flash BUNDLE STICK")?;
    Ok(Prepared {
        next,
        bundle_name,
        signed,
        untrusted,
        stick,
        update_stick,
        payload_bytes,
    })
}

fn flip_byte(path: &Path, at: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&b)?;
    Ok(())
}

/// The update machine and what the steps learn on the way.
struct Timeline<'a> {
    machine: Machine,
    outside: &'a Outside,
    stick: PathBuf,
    update_stick: PathBuf,
    vm: Option<Vm>,
    /// The built version's report (slot A's image, the disk layout).
    base: &'a Report,
    /// Per boot: what the data-partition check found.
    data: Vec<String>,
    data_problems: Vec<String>,
    /// Per boot: AVC denials found.
    avc: Vec<String>,
    avc_problems: Vec<String>,
    /// Written on the data partition at the first boot.
    marker: String,
    boots: usize,
    boot_seconds: Vec<f64>,
    /// `airlock-update` units started so far (each gets its own name).
    runs: usize,
    /// Screenshots of the info page.
    screens: PathBuf,
    /// Emulator faults (`emulator::Fault`) of the machine's QEMU runs.
    faults: Vec<String>,
}

/// How an `airlock-update` unit ended: its exit status and its journal.
struct AgentRun {
    exit: i32,
    output: String,
}

/// Where a boot came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Booted {
    version: String,
    root_hash: String,
}

impl<'a> Timeline<'a> {
    fn start(
        images: &'a Images,
        opts: &AcceptanceOptions,
        prepared: &Prepared,
        outside: &'a Outside,
    ) -> Result<Timeline<'a>> {
        let dir = opts.work_dir.join("machines/update");
        // Flashed and provisioned like the test machine (the health gate
        // wants both guests and the host network up), same size as the image.
        let disk =
            super::provision::flash_test_machine(images, opts, &dir, 0, &outside.appliance_key())?
                .disk;
        // With a TPM, as the test machine: it stays the same TPM across the
        // timeline's boots and power cuts, as a PC's chip does.
        // Secure Boot on: each version's UKI must be signed to boot.
        let machine = super::pc_as_it_sets_it_up(&disk, &dir, opts)?;
        let mut t = Timeline {
            machine,
            outside,
            stick: prepared.stick.clone(),
            update_stick: prepared.update_stick.clone(),
            vm: None,
            base: &images.test_report,
            data: Vec::new(),
            data_problems: Vec::new(),
            avc: Vec::new(),
            avc_problems: Vec::new(),
            marker: String::new(),
            boots: 0,
            boot_seconds: Vec::new(),
            runs: 0,
            screens: opts.work_dir.join("screens/update"),
            faults: Vec::new(),
        };
        if let Err(e) = t.power_on() {
            if let Some(vm) = t.vm.as_mut() {
                vm.keep_files();
            }
            return Err(e);
        }
        Ok(t)
    }

    fn vm(&mut self) -> Result<&mut Vm> {
        self.vm.as_mut().context("the update machine is off")
    }

    /// A fresh QEMU on the machine's disk and firmware state, with the
    /// display (the kiosk is part of the health gate), both uplinks and
    /// the USB stick; waits for the agent.
    fn power_on(&mut self) -> Result<()> {
        let mut cfg = self.machine.config();
        cfg.graphics = Graphics::Std;
        cfg.extra_netdevs = Outside::nics();
        cfg.extra_disks = vec![self.stick.clone()];
        // The update stick is plugged in later, through QMP.
        cfg.usb_controller = true;
        let start = Instant::now();
        let mut vm = Vm::start_in_netns(cfg, Some(&self.outside.path()))?;
        let ready = vm.agent()?.wait_ready(BOOT_TIMEOUT);
        if let Err(e) = ready {
            let serial = tail(&vm.serial_log(), 30);
            self.vm = Some(vm);
            bail!("{e}; serial console ends with:\n{serial}");
        }
        self.vm = Some(vm);
        self.booted_now(start)
    }

    /// Reboots the guest (as IT would) and waits for the next boot's agent.
    fn reboot(&mut self) -> Result<()> {
        let start = Instant::now();
        let vm = self.vm()?;
        let _ = vm
            .agent()?
            .run(&["systemctl", "reboot"], Duration::from_secs(20));
        if let Err(e) = vm.agent()?.wait_ready(BOOT_TIMEOUT) {
            bail!(
                "rebooting the update machine: {e}; serial console ends with:\n{}",
                tail(&vm.serial_log(), 30)
            );
        }
        self.booted_now(start)
    }

    /// Pulls the plug.
    fn power_cut(&mut self) -> Result<()> {
        self.record_faults();
        if let Some(mut vm) = self.vm.take() {
            vm.kill()?;
        }
        Ok(())
    }

    /// Notes the emulator faults of the running QEMU (counted over its
    /// whole run: call once per QEMU, before it goes).
    fn record_faults(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            if let Some(fault) = Faults::read(vm).since(&Faults::default()) {
                self.faults.push(fault.to_string());
            }
        }
    }

    /// After each boot: mount the stick, record the boot, check the data.
    fn booted_now(&mut self, start: Instant) -> Result<()> {
        self.boots += 1;
        self.boot_seconds.push(start.elapsed().as_secs_f64());
        if self.boots == 1 {
            self.marker = format!("airlock-update-acceptance-{}", std::process::id());
        }
        let (first, m) = (self.boots == 1, self.marker.clone());
        let vm = self.vm()?;
        sh(vm, &format!("udevadm settle --timeout=60; mkdir -p {STICK} && mount -t vfat -o ro,umask=0077 /dev/disk/by-label/AIRLOCKUSB {STICK}"))?;
        if first {
            sh(
                vm,
                &format!(
                    "for side in classified general; do echo {m} > /var/lib/airlock/$side/disk/acceptance-marker; done; echo {m} | systemd-cat -t airlock-acceptance-update && journalctl --flush"
                ),
            )?;
        }
        self.check_data();
        Ok(())
    }

    fn check_data(&mut self) {
        let boot = self.boots;
        let marker = self.marker.clone();
        let found = (|| -> Result<String> {
            let vm = self.vm()?;
            let files = sh(vm, "cat /var/lib/airlock/classified/disk/acceptance-marker /var/lib/airlock/general/disk/acceptance-marker")?;
            ensure!(
                files.lines().filter(|l| *l == marker).count() == 2,
                "guest disk directories hold {files:?}, not the marker {marker:?}"
            );
            let journal = sh(
                vm,
                "journalctl -t airlock-acceptance-update -o cat --no-pager",
            )?;
            ensure!(
                journal.contains(&marker),
                "the first boot's journal entry is gone"
            );
            let boots = sh(
                vm,
                "journalctl --list-boots --no-pager | tail -n +2 | wc -l",
            )?;
            let disks = sh(
                vm,
                "ls /var/lib/airlock/classified/disk /var/lib/airlock/general/disk | tr '\\n' ' '",
            )?;
            Ok(format!(
                "boot {boot}: markers in both guest disk directories ({}), journal of {} boots",
                disks.trim(),
                boots.trim()
            ))
        })();
        match found {
            Ok(s) => self.data.push(s),
            Err(e) => self.data_problems.push(format!("boot {boot}: {e:#}")),
        }
    }

    /// Counts this boot's AVC denials (the previous boot's too, when it
    /// ended by a reboot: its shutdown).
    fn check_avc(&mut self, what: &str) {
        let boot = self.boots;
        let found = (|| -> Result<String> {
            let vm = self.vm()?;
            sh(
                vm,
                "journalctl -b -o cat --no-pager | grep 'avc:  denied' || true",
            )
        })();
        match found {
            Ok(d) if d.trim().is_empty() => self.avc.push(format!("boot {boot} ({what}): 0")),
            Ok(d) => self.avc_problems.push(format!(
                "boot {boot} ({what}): {} denials:\n{}",
                d.lines().count(),
                d.lines().take(10).collect::<Vec<_>>().join("\n")
            )),
            Err(e) => self
                .avc_problems
                .push(format!("boot {boot} ({what}): {e:#}")),
        }
    }

    fn booted(&mut self) -> Result<Booted> {
        let vm = self.vm()?;
        let os = sh(vm, "sed -n 's/^IMAGE_VERSION=//p' /etc/os-release")?;
        let cmdline = sh(vm, "cat /proc/cmdline")?;
        let root_hash = cmdline
            .split_whitespace()
            .find_map(|a| a.strip_prefix("roothash="))
            .context("no roothash= on the command line")?;
        Ok(Booted {
            version: os.trim().trim_matches('"').to_owned(),
            root_hash: root_hash.to_owned(),
        })
    }

    /// The entry systemd-boot booted (`LoaderEntrySelected`), and whether
    /// the boot is counted (`LoaderBootCountPath` exists).
    fn loader(&mut self) -> Result<(String, bool)> {
        let out = sh(
            self.vm()?,
            "cd /sys/firmware/efi/efivars && tail -c +5 LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f | tr -d '\\000'; echo; ls | grep -c '^LoaderBootCountPath-' || true",
        )?;
        let mut lines = out.lines();
        let entry = lines.next().unwrap_or("").trim().to_owned();
        let counted = lines.next().unwrap_or("0").trim() != "0";
        Ok((entry, counted))
    }

    fn esp_listing(&mut self) -> Result<String> {
        Ok(sh(self.vm()?, "ls -1 /efi/EFI/Linux")?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// `airlock-update ARGS` started by systemd as a unit of its own (so
    /// in its own SELinux domain); waits for it to end. Its output comes
    /// from the journal (`systemd-run --pipe` would hand the agent's file
    /// descriptors to dbus-daemon, which the policy refuses).
    fn update_agent(&mut self, args: &str, timeout: Duration) -> Result<(AgentRun, f64)> {
        self.runs += 1;
        let unit = format!("airlock-update-acceptance-{}", self.runs);
        let start = Instant::now();
        let vm = self.vm()?;
        sh(
            vm,
            &format!("systemd-run --quiet --unit={unit} --service-type=exec {AGENT} {args}"),
        )?;
        let exit = loop {
            let show = sh(
                vm,
                &format!("systemctl show {unit} -p ActiveState -p ExecMainStatus"),
            )?;
            let field = |k: &str| {
                show.lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            };
            match field("ActiveState").as_str() {
                // A unit that exited 0 is unloaded at once: inactive, status 0.
                "inactive" => break 0,
                "failed" => {
                    break field("ExecMainStatus")
                        .parse()
                        .with_context(|| format!("{unit}: {show}"))?
                }
                _ if start.elapsed() > timeout => bail!("{unit} still runs after {timeout:?}"),
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        let output = sh(vm, &format!("journalctl --sync; journalctl -u {unit} -o cat --no-pager; systemctl reset-failed {unit} 2>/dev/null || true"))?;
        Ok((AgentRun { exit, output }, seconds))
    }

    /// Plugs the update stick into the running machine (QMP: a read-only
    /// block node and a `usb-storage` device on the xHCI bus), then waits
    /// for the agent udev started for it to end; its journal and the
    /// seconds from the plug. Nothing here starts the agent.
    fn plug_in_update_stick(&mut self) -> Result<(String, f64)> {
        let path = self.update_stick.display().to_string();
        let vm = self.vm()?;
        let start = Instant::now();
        let qmp = vm.qmp()?;
        qmp.execute(
            "blockdev-add",
            Some(
                serde_json::json!({"driver": "raw", "node-name": "update-stick", "read-only": true,
                "file": {"driver": "file", "filename": path, "read-only": true}}),
            ),
        )?;
        qmp.execute("device_add", Some(serde_json::json!({"driver": "usb-storage", "id": "update-stick", "bus": "usb.0", "drive": "update-stick", "removable": true})))?;
        loop {
            let (unit, log, state) = match stick_unit(vm)? {
                Some(unit) => {
                    let log = sh(
                        vm,
                        &format!("journalctl --sync; journalctl -b -u {unit} -o cat --no-pager"),
                    )?;
                    let state = sh(vm, &format!("systemctl show -P ActiveState {unit}"))?
                        .trim()
                        .to_owned();
                    (unit, log, state)
                }
                None => ("(no USB disk yet)".to_owned(), String::new(), String::new()),
            };
            // Ended: a oneshot that succeeded goes inactive, one that did not, failed.
            let ended = log.contains("reboot pending")
                || log.contains("airlock-update: refused")
                || log.contains("airlock-update: error");
            if ended && state != "activating" {
                let seconds = start.elapsed().as_secs_f64();
                ensure!(
                    log.contains("reboot pending") && state != "failed",
                    "the stick's apply did not succeed ({unit} {state}):\n{log}"
                );
                let domain = logged_domain(vm, &unit);
                return Ok((
                    format!(
                        "{} (udev started {unit}, in {domain})\n{log}",
                        log.lines()
                            .find(|l| l.contains("update stick with"))
                            .unwrap_or("")
                            .trim()
                    ),
                    seconds,
                ));
            }
            if start.elapsed() > APPLY_TIMEOUT {
                bail!(
                    "no end of the stick's apply {:?} after the plug ({unit} {state}):\n{log}",
                    APPLY_TIMEOUT
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The first MiB of slot B's root partition, as it is on the disk file.
    fn slot_b_head(&self) -> Result<Vec<u8>> {
        let p = self
            .base
            .partitions
            .iter()
            .find(|p| p.number == 4)
            .context("the report has no partition 4 (slot B)")?;
        let mut f = std::fs::File::open(self.machine.disk())?;
        f.seek(SeekFrom::Start(p.offset))?;
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// 1 MiB from the middle of slot B's root area as far as `root_bytes`
    /// (the next image's root filesystem) reaches.
    fn slot_b_root_middle(&self, root_bytes: u64) -> Result<Vec<u8>> {
        let p = self
            .base
            .partitions
            .iter()
            .find(|p| p.number == 4)
            .context("the report has no partition 4 (slot B)")?;
        let mut f = std::fs::File::open(self.machine.disk())?;
        f.seek(SeekFrom::Start(p.offset + ((root_bytes / 2) & !0xfffff)))?;
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Starts `apply` of `bundle` as systemd unit `unit`, waits until it
    /// writes slot B, then pulls the plug as soon as `landed` sees the write
    /// reach the disk (the guest's page cache holds writes a while; at most
    /// 120 s after the write began). The cut must come before the new
    /// entry is on the ESP. Returns what happened, for the test's detail.
    fn cut_during_apply(
        &mut self,
        unit: &str,
        bundle: &str,
        what: &str,
        landed: &dyn Fn(&Self) -> Result<bool>,
    ) -> Result<String> {
        let new_version_entry = bundle
            .rsplit('/')
            .next()
            .unwrap_or(bundle)
            .trim_end_matches(".airlock")
            .to_owned();
        let vm = self.vm()?;
        sh(
            vm,
            &format!("systemd-run --quiet --collect --unit={unit} {AGENT} apply --file {bundle}"),
        )?;
        let start = Instant::now();
        loop {
            ensure!(
                start.elapsed() < APPLY_TIMEOUT,
                "the apply never started writing slot B"
            );
            let log = sh(vm, &format!("journalctl -u {unit} -o cat --no-pager"))?;
            if log.contains("installed") || log.contains("error") || log.contains("refused") {
                bail!("the apply ended before the power cut:\n{log}");
            }
            if log.contains("payload verified; writing slot") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let writing_after = start.elapsed().as_secs_f64();
        let label = logged_domain(vm, unit);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut reached = false;
        while Instant::now() < deadline {
            if landed(self)? {
                reached = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let cut_at = start.elapsed().as_secs_f64();
        self.power_cut()?;
        ensure!(reached, "the write never reached the disk at that point within 120 s; QEMU killed at {cut_at:.1}s");
        let esp = esp_from_host(self.machine.disk(), self.base)?;
        ensure!(
            !esp.contains(&new_version_entry),
            "the new entry is already on the ESP: the cut came after the slot write ({esp})"
        );
        let gpt = slot_b_labels(self.machine.disk())?;
        Ok(format!("apply started by systemd in {label}; slot B write began {writing_after:.1}s after the start; QEMU killed at {cut_at:.1}s, {what}; on disk then: slot B labels {gpt}, ESP {esp}"))
    }

    /// Slot B's partitions and both GPT copies, hashed from the host.
    fn slot_b_digest(&self) -> Result<String> {
        self.slots_digest(&[4, 5])
    }

    /// A digest of both GPT copies and of the partitions `numbers` (slot A
    /// is 2 and 3, slot B 4 and 5), read from the host.
    fn slots_digest(&self, numbers: &[u32]) -> Result<String> {
        use std::hash::Hasher;
        let disk = self.machine.disk();
        let mut f = std::fs::File::open(disk)?;
        let len = f.metadata()?.len();
        let b: Vec<_> = self
            .base
            .partitions
            .iter()
            .filter(|p| numbers.contains(&p.number))
            .collect();
        ensure!(
            b.len() == numbers.len(),
            "the report has no partitions {numbers:?}"
        );
        let mut ranges = vec![(0, 1 << 20), (len - 33 * 512, 33 * 512)];
        ranges.extend(b.iter().map(|p| (p.offset, p.size)));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for (offset, size) in ranges {
            f.seek(SeekFrom::Start(offset))?;
            let mut left = size;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                f.read_exact(&mut buf[..n])?;
                h.write(&buf[..n]);
                left -= n as u64;
            }
        }
        Ok(format!("{:016x}", h.finish()))
    }

    fn steps(&mut self, suite: &mut Suite, p: &Prepared) {
        let bundle = format!("{STICK}/{}", p.bundle_name);
        let a_hash = self.base.root_hash.clone();
        let b_hash = p.next.root_hash.clone();
        let new_version = p.next.version.clone();
        let mut verification = None;

        // Boot 1, slot A: the refusals.
        let before = self
            .slot_b_digest()
            .and_then(|d| Ok((d, self.esp_listing()?)));
        for (test, file, code, words) in [
            (TESTS[0], "flipped.airlock", 19, "is corrupted: sha256"),
            (TESTS[1], "untrusted.airlock", 16, "by a trusted key"),
        ] {
            suite.test(test, || {
                let (digest, listing) = before.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let (out, seconds) = self.update_agent(&format!("apply --file {STICK}/{file}"), APPLY_TIMEOUT)?;
                let refusal = out.output.lines().find(|l| l.contains("airlock-update: refused:")).unwrap_or("").to_owned();
                ensure!(out.exit == code, "expected exit code {code}, got {}:\n{}", out.exit, out.output);
                ensure!(refusal.contains(words), "the refusal does not say {words:?}: {refusal:?}\n{}", out.output);
                let after = self.slot_b_digest()?;
                ensure!(&after == digest, "slot B or the GPT changed on disk (digest {digest} → {after})");
                let esp = self.esp_listing()?;
                ensure!(&esp == listing, "the ESP changed: {listing:?} → {esp:?}");
                if file == "flipped.airlock" {
                    verification = Some(seconds);
                }
                Ok(format!("{refusal} (exit {code}, {seconds:.1}s); slot B and GPT unchanged (digest {digest}), ESP still: {esp}"))
            });
        }
        // IT at the desk: the refusal is on the info page.
        let refused_page = match &before {
            Ok(_) => {
                let image = format!("image:       {} {} |", self.base.name, self.base.version);
                self.info_page(
                    "info-refused",
                    &[
                        &image,
                        "host name:   airlock-test-pc",
                        "last update: refused (apply)",
                    ],
                )
            }
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        self.check_avc("refusals");

        // Boot 1: cut the power as soon as slot B's first MiB reaches the disk.
        let cut = (|| -> Result<String> {
            let clean = self.slot_b_head()?;
            let what = "once slot B's first MiB had reached the disk";
            self.cut_during_apply("airlock-update-cut", &bundle, what, &|t: &Self| {
                Ok(t.slot_b_head()? != clean)
            })
        })();
        // Boot 2: still slot A.
        let boot2 = match &cut {
            Ok(_) => self.power_on(),
            Err(e) => Err(anyhow::anyhow!("no power cut during the slot write: {e:#}")),
        };
        suite.test(TESTS[2], || {
            boot2.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let cut_detail = cut.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let b = self.booted()?;
            ensure!(
                b.root_hash == a_hash && b.version == self.base.version,
                "booted {} (root hash {}) instead of slot A's {}",
                b.version,
                &b.root_hash[..16],
                self.base.version
            );
            let esp = self.esp_listing()?;
            Ok(format!(
                "{cut_detail}; next boot: {} from slot A (root hash {}), ESP: {esp}",
                b.version,
                &b.root_hash[..16]
            ))
        });

        // Boot 2: a second cut, half-way through the root partition (still
        // zeros there: the first cut came after its first MiB).
        let cut2 = match &boot2 {
            Ok(()) => (|| -> Result<String> {
                let middle = self.slot_b_root_middle(p.next.root_fs_bytes)?;
                let what = "once the middle of slot B's root had reached the disk";
                self.cut_during_apply("airlock-update-cut2", &bundle, what, &|t: &Self| {
                    Ok(t.slot_b_root_middle(p.next.root_fs_bytes)? != middle)
                })
            })(),
            Err(e) => Err(anyhow::anyhow!("no boot after the first cut: {e:#}")),
        };
        // Boot 3: still slot A.
        let boot3 = match &cut2 {
            Ok(_) => self.power_on(),
            Err(e) => Err(anyhow::anyhow!("no second power cut: {e:#}")),
        };
        suite.test(TESTS[3], || {
            boot3.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let cut_detail = cut2.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let b = self.booted()?;
            ensure!(
                b.root_hash == a_hash && b.version == self.base.version,
                "booted {} (root hash {}) instead of slot A's {}",
                b.version,
                &b.root_hash[..16],
                self.base.version
            );
            let esp = self.esp_listing()?;
            Ok(format!(
                "{cut_detail}; next boot: {} from slot A (root hash {}), ESP: {esp}",
                b.version,
                &b.root_hash[..16]
            ))
        });

        // Boot 3: apply again, one try, with the unhealthy marker set.
        let mut applied = false;
        suite.test(TESTS[4], || {
            boot3.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            // The bundle comes from the update server the machine file
            // names, as the PC's periodic check fetches it (one boot try
            // instead of three, for the fallback below).
            // As the fetch unit is ordered: after the host network is set
            // up (the suite's agent answers before that, early in a boot).
            let network = self.wait_unit_settled("airlock-network.service")?;
            ensure!(network == "active", "airlock-network.service ended {network}");
            let asked = self.outside.update_requests().len();
            self.outside.serve_update(Some(p.signed.clone()));
            let fetched = self.update_agent("--tries 1 apply --update-server", APPLY_TIMEOUT);
            self.outside.serve_update(None);
            let (out, seconds) = fetched?;
            if out.exit != 0 {
                let routes = sh(self.vm()?, "ip -4 route; journalctl -b -u airlock-network.service -o short-monotonic --no-pager | tail -n 5")?;
                bail!("apply failed: exit {}\n{}\nhost routes and the network set-up:\n{routes}", out.exit, out.output);
            }
            let requests = self.outside.update_requests().split_off(asked);
            let size = std::fs::metadata(&p.signed)?.len();
            let general = std::net::IpAddr::V4(crate::outside::GENERAL_UPLINK.appliance);
            ensure!(
                requests.iter().all(|r| r.peer.ip() == general),
                "requests did not all come from the general uplink's address {general}: {requests:?}"
            );
            ensure!(
                requests.iter().any(|r| r.status == 200 && r.body_bytes == size),
                "the update server never sent the whole bundle ({size} bytes): {requests:?}"
            );
            let server = format!(
                "update server {}: {} request(s) from {general} ({})",
                crate::outside::UPDATE_SERVER,
                requests.len(),
                requests.iter().map(|r| format!("{} {} → {} of {} bytes", r.request, r.status, r.body_bytes, r.body_len)).collect::<Vec<_>>().join("; ")
            );
            let summary = out.output.lines().find(|l| l.contains("reboot pending") && !l.starts_with("airlock-update:")).unwrap_or("").to_owned();
            ensure!(!summary.is_empty(), "apply did not say \"reboot pending\":\n{}", out.output);
            let esp = self.esp_listing()?;
            let entry = format!("{}_{}+1.efi", p.next.name, new_version);
            ensure!(esp.split_whitespace().any(|e| e == entry), "no {entry} on the ESP: {esp}");
            applied = true;
            self.check_avc("slot A after the power cut: apply");
            let mb = p.payload_bytes as f64 / 1e6;
            let verify = verification.map(|v| format!("; verification alone (the flipped bundle's refusal): {v:.1}s, {:.1} MB/s", mb / v)).unwrap_or_default();
            Ok(format!(
                "{} ({seconds:.1}s for {mb:.0} MB of payload, {:.1} MB/s end to end: download, verify, write, read back{verify}); {server}; ESP: {esp}",
                summary.trim(),
                mb / seconds
            ))
        });

        // Boots 4 and 5: the new slot fails its health gate; back to A.
        suite.test(TESTS[5], || {
            ensure!(applied, "the update was not applied");
            sh(self.vm()?, &format!("mkdir -p $(dirname {UNHEALTHY_MARKER}) && touch {UNHEALTHY_MARKER}"))?;
            self.reboot()?;
            let b = self.booted()?;
            ensure!(b.root_hash == b_hash, "the trial boot came from root hash {}, not slot B's {}", &b.root_hash[..16], &b_hash[..16]);
            let (entry, counted) = self.loader()?;
            ensure!(counted, "systemd-boot booted {entry} without boot counting (no LoaderBootCountPath)");
            let state = self.wait_unit_settled("airlock-update-health.service")?;
            ensure!(state == "failed", "the health gate ended {state}, expected failed");
            let why = sh(self.vm()?, "journalctl -b -u airlock-update-health.service -o cat --no-pager | grep 'FAILED' || true")?;
            // The gate must have run and failed for the unit the suite broke,
            // not for anything else (a gate that cannot start also "fails").
            ensure!(
                why.contains("airlock-test-unhealthy.service"),
                "the health gate did not fail on the broken unit: {:?}; its journal:\n{}",
                why.trim(),
                sh(self.vm()?, "journalctl -b -u airlock-update-health.service -o cat --no-pager | tail -n 15")?
            );
            let esp_trial = self.esp_listing()?;
            self.check_avc("slot B on trial, unhealthy");
            self.reboot()?;
            let back = self.booted()?;
            ensure!(back.root_hash == a_hash, "after the failed try the machine booted root hash {}, not slot A's", &back.root_hash[..16]);
            let esp = self.esp_listing()?;
            ensure!(esp.contains(&format!("{}_{}+0-1.efi", p.next.name, new_version)), "the failed entry is not marked bad (+0-1): {esp}");
            sh(self.vm()?, &format!("rm -f {UNHEALTHY_MARKER}"))?;
            Ok(format!(
                "trial boot of {} from slot B (entry {entry}): health gate failed ({}); ESP then: {esp_trial}; next boot: {} from slot A, ESP: {esp}",
                b.version,
                why.trim().replace('\n', "; "),
                back.version
            ))
        });

        // Boot 5 → 6: IT plugs in the update stick; udev starts the agent
        // (three tries); reboot, blessed.
        suite.test(TESTS[6], || {
            let (out, seconds) = self.plug_in_update_stick()?;
            let pending = self.esp_listing()?;
            ensure!(pending.split_whitespace().any(|e| e == format!("{}_{}+3.efi", p.next.name, new_version)), "the stick's apply installed no counted entry: {pending}\n{out}");
            self.check_avc("slot A after the fallback: apply");
            let reboot_start = Instant::now();
            self.reboot()?;
            let b = self.booted()?;
            ensure!(b.version == new_version && b.root_hash == b_hash, "booted {} (root hash {}), expected {new_version} from slot B", b.version, &b.root_hash[..16]);
            let (entry, counted) = self.loader()?;
            ensure!(counted, "systemd-boot booted {entry} without boot counting (no LoaderBootCountPath)");
            let health = self.wait_unit_settled("airlock-update-health.service")?;
            if health != "active" {
                let journal = sh(self.vm()?, "journalctl -b -u airlock-update-health.service -o cat --no-pager | tail -n 15")?;
                bail!("the health gate ended {health}; its journal:\n{journal}");
            }
            let bless = self.wait_unit_settled("systemd-bless-boot.service")?;
            ensure!(bless == "active", "systemd-bless-boot.service ended {bless}");
            let blessed_after = reboot_start.elapsed().as_secs_f64();
            let esp = self.esp_listing()?;
            let blessed = format!("{}_{}.efi", p.next.name, new_version);
            ensure!(esp.split_whitespace().any(|e| e == blessed), "the entry is not blessed ({blessed} missing): {esp}");
            // As every run of the agent here: a unit of its own, so that it
            // runs in its domain (its state is readable by it alone).
            let (status, _) = self.update_agent("status", Duration::from_secs(120))?;
            ensure!(status.exit == 0, "airlock-update status: exit {}\n{}", status.exit, status.output);
            let status = status.output;
            let failed = sh(self.vm()?, "systemctl --failed --no-legend --plain")?;
            ensure!(failed.trim().is_empty(), "failed units:\n{failed}");
            // The stick is still in: at this boot it found its version running.
            let unit = stick_unit(self.vm()?)?.context("the update stick is no USB disk of slot B's boot")?;
            let again = sh(self.vm()?, &format!("journalctl -b -u {unit} -o cat --no-pager"))?;
            ensure!(again.contains("which is running already; nothing to do"), "with the stick left in, slot B's boot did not leave it alone:\n{again}");
            self.check_avc("slot B, blessed");
            Ok(format!(
                "{}; the stick's apply took {seconds:.1}s from the plug, ESP {pending}; reboot → {} from slot B (entry {entry}), health gate passed, blessed {blessed_after:.0}s after the reboot; ESP: {esp}; stick left in: {}\n{}",
                out.lines().next().unwrap_or(""),
                b.version,
                again.lines().last().unwrap_or("").trim(),
                status.trim()
            ))
        });

        suite.test(TESTS[10], || {
            let b = self.booted()?;
            ensure!(
                b.version == new_version,
                "running {}, not slot B's {new_version}",
                b.version
            );
            let unlocked = super::sealed::tpm_unlock_after_reboot(self.vm()?)?;
            Ok(format!("{} from slot B: {unlocked}", b.version))
        });

        suite.test(TESTS[9], || {
            let refused = refused_page
                .as_ref()
                .map_err(|e| anyhow::anyhow!("after the refusals: {e:#}"))?;
            let image = format!("image:       {} {new_version} |", p.next.name);
            let healthy = format!("  {} {new_version} passed the health gate", p.next.name);
            let blessed = self
                .info_page(
                    "info-blessed",
                    &[&image, "last update: healthy (health)", &healthy],
                )
                .context("after the blessed update")?;
            Ok(format!(
                "after the refusals: {refused}\nafter the update: {blessed}"
            ))
        });

        // Slot B, blessed (after the info page's check, which wants the
        // health gate's result): the periodic check, as its timer starts it.
        suite.test(TESTS[11], || {
            let vm = self.vm()?;
            let timer = sh(vm, "systemctl show airlock-update-fetch.timer -p ActiveState -p SubState -p Unit -p NextElapseUSecMonotonic")?;
            ensure!(
                timer.contains("ActiveState=active") && timer.contains("Unit=airlock-update-fetch.service"),
                "the timer is not waiting to start the check:\n{timer}"
            );
            // Running slot B: slot A is the one an apply would write.
            let before = (self.slots_digest(&[2, 3])?, self.esp_listing()?);
            let mut details = Vec::new();
            for (file, want) in [
                (&p.signed, "which is running already; nothing to do"),
                (&p.untrusted, "by a trusted key"),
            ] {
                let asked = self.outside.update_requests().len();
                self.outside.serve_update(Some(file.clone()));
                let vm = self.vm()?;
                // As the timer does: the unit itself, in its own domain.
                let started = sh(vm, "systemctl start airlock-update-fetch.service; echo \"exit $?\"");
                self.outside.serve_update(None);
                let started = started?;
                let vm = self.vm()?;
                let journal = sh(vm, "journalctl --sync; journalctl -b -u airlock-update-fetch.service -o cat --no-pager | tail -n 6; systemctl reset-failed airlock-update-fetch.service 2>/dev/null; true")?;
                let said = journal.lines().rev().find(|l| l.contains(want)).unwrap_or("").to_owned();
                ensure!(journal.contains(want), "the check did not say {want:?} ({}):\n{journal}", started.trim());
                let requests = self.outside.update_requests().split_off(asked);
                let size = std::fs::metadata(file)?.len();
                ensure!(requests.len() == 1, "expected the one header request, got {requests:?}");
                ensure!(
                    requests[0].body_bytes < size / 4,
                    "the server sent {} of {size} bytes: the payload was downloaded ({requests:?})",
                    requests[0].body_bytes
                );
                details.push(format!("{}: {} (systemctl start: {}; the server's socket took {} of {size} bytes before the agent closed)", file.file_name().unwrap_or_default().to_string_lossy(), said.trim(), started.trim(), requests[0].body_bytes));
            }
            let after = (self.slots_digest(&[2, 3])?, self.esp_listing()?);
            ensure!(after == before, "slot A, the GPT or the ESP changed: {before:?} → {after:?}");
            self.check_avc("slot B, the update server's checks");
            Ok(format!(
                "timer: {}; {}; slot A (the inactive one), GPT and ESP unchanged ({})",
                timer.split_whitespace().collect::<Vec<_>>().join(" "),
                details.join("; "),
                after.1
            ))
        });

        let (data, data_problems) = (self.data.join("\n"), self.data_problems.join("\n"));
        suite.test(TESTS[7], || {
            ensure!(data_problems.is_empty(), "{data_problems}");
            ensure!(self.boots >= 2, "only {} boot(s) happened", self.boots);
            Ok(data)
        });
        let (avc, avc_problems) = (self.avc.join("; "), self.avc_problems.join("\n"));
        suite.test(TESTS[8], || {
            ensure!(avc_problems.is_empty(), "{avc_problems}");
            Ok(format!("denials per boot: {avc}"))
        });
        let boots: Vec<String> = self
            .boot_seconds
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect();
        println!(
            "acceptance: update machine: {} boots, seconds to the agent: {}",
            self.boots,
            boots.join(", ")
        );
    }

    /// IT's info page: Ctrl+Scroll Lock opens it, the kiosk logs what it
    /// shows (each of `expected` must be in it) and the screen shows the
    /// amber box; Scroll Lock closes it and the box goes. Screenshot
    /// `<name>.png`.
    fn info_page(&mut self, name: &str, expected: &[&str]) -> Result<String> {
        const LOGGED: &str = "journalctl -b -u airlock-kiosk.service -o cat --no-pager | grep -F 'info page' || true";
        let deadline = Duration::from_secs(60);
        std::fs::create_dir_all(&self.screens)?;
        let shot = self.screens.join(format!("{name}.ppm"));
        let png = self.screens.join(format!("{name}.png"));
        // Waits for one more line than `seen` with `word`; that line.
        let wait_logged = |t: &mut Self, seen: usize, word: &str| -> Result<String> {
            let start = Instant::now();
            loop {
                let lines = sh(t.vm()?, LOGGED)?;
                let matching: Vec<&str> = lines.lines().filter(|l| l.contains(word)).collect();
                if matching.len() > seen {
                    return Ok(matching[matching.len() - 1].to_owned());
                }
                ensure!(
                    start.elapsed() < deadline,
                    "the kiosk logged no new {word:?} line in {deadline:?}; its lines:\n{lines}"
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        };
        let count = |t: &mut Self, word: &str| -> Result<usize> {
            Ok(sh(t.vm()?, LOGGED)?
                .lines()
                .filter(|l| l.contains(word))
                .count())
        };
        // The amber share of the guest area, polled until `done` says so.
        let screen = |t: &mut Self, done: &dyn Fn(f64) -> bool| -> Result<f64> {
            let start = Instant::now();
            loop {
                t.vm()?.qmp()?.screendump(&shot)?;
                let image = crate::screen::load_image(&shot)?;
                let share = kiosk::colour_share(
                    &image,
                    kiosk::guest_area(image.width, image.height),
                    kiosk::MESSAGE_RGB,
                );
                if done(share) {
                    kiosk::write_png(&image, &png)?;
                    return Ok(share);
                }
                ensure!(start.elapsed() < deadline, "after {deadline:?} the amber share of the guest area is {:.0}%; screen kept in {}", share * 100.0, shot.display());
                std::thread::sleep(Duration::from_secs(1));
            }
        };

        let (opened, closed) = (count(self, "info page:")?, count(self, "info page closed")?);
        self.vm()?
            .qmp()?
            .send_key(&["ctrl", "scroll_lock"])
            .context("pressing Ctrl+Scroll Lock")?;
        let page = wait_logged(self, opened, "info page:")?;
        for e in expected {
            ensure!(page.contains(e), "the info page does not say {e:?}: {page}");
        }
        let shown = screen(self, &|share| share >= kiosk::MESSAGE_SHARE)?;
        let shown_png = self.screens.join(format!("{name}-open.png"));
        std::fs::rename(&png, &shown_png)?;
        self.vm()?
            .qmp()?
            .send_key(&["scroll_lock"])
            .context("pressing Scroll Lock")?;
        wait_logged(self, closed, "info page closed")?;
        let after = screen(self, &|share| share < 0.05)?;
        let text = page
            .split_once("info page: ")
            .map_or(page.as_str(), |(_, t)| t)
            .to_owned();
        Ok(format!(
            "{text}; amber box {:.0}% of the guest area (screenshot {}), after Scroll Lock {:.0}%",
            shown * 100.0,
            shown_png.display(),
            after * 100.0
        ))
    }

    /// Waits until `unit` is neither inactive nor activating; its state.
    fn wait_unit_settled(&mut self, unit: &str) -> Result<String> {
        let start = Instant::now();
        loop {
            let state = sh(self.vm()?, &format!("systemctl is-active {unit} || true"))?
                .trim()
                .to_owned();
            if state != "activating" && state != "inactive" {
                return Ok(state);
            }
            if start.elapsed() > HEALTH_TIMEOUT {
                bail!("{unit} still {state} after {:?}", HEALTH_TIMEOUT);
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// The update stick's unit, once the stick is a disk: udev starts
/// `airlock-update-stick@<kernel name>.service` for it (the machine's only
/// USB disk). Exact unit names only: `journalctl -u` with a glob looks the
/// names up among the journal's values and in one run found none ("Failed
/// to add filter for units: No data available") while the unit's lines
/// were there.
fn stick_unit(vm: &mut Vm) -> Result<Option<String>> {
    let name = sh(
        vm,
        "lsblk -dn -o NAME,TRAN | awk '$2 == \"usb\" {print $1; exit}'",
    )?;
    let name = name.trim();
    Ok((!name.is_empty()).then(|| format!("airlock-update-stick@{name}.service")))
}

/// The SELinux context of the process that wrote the first journal entry
/// of `unit`'s own processes in this boot: the domain it ran in.
fn logged_domain(vm: &mut Vm, unit: &str) -> String {
    // `_SYSTEMD_UNIT=`: lines of the unit's own processes, not systemd's
    // "Starting …" (which would name init_t).
    let unit = if unit.ends_with(".service") {
        unit.to_owned()
    } else {
        format!("{unit}.service")
    };
    let context = sh(vm, &format!("journalctl -b _SYSTEMD_UNIT={unit} -o verbose --no-pager | awk -F= '/_SELINUX_CONTEXT=/ {{print $2; exit}}'")).unwrap_or_default();
    match context.trim() {
        "" => "an unknown domain (no _SELINUX_CONTEXT in its journal)".into(),
        c => c.to_owned(),
    }
}

/// The ESP's `EFI/Linux` as it is on the disk file (mtools, no mount).
fn esp_from_host(disk: &Path, report: &Report) -> Result<String> {
    let esp = report
        .partitions
        .iter()
        .find(|p| p.label == "esp")
        .context("no ESP in the report")?;
    let sh = Shell::new()?;
    let _env = sh.push_env("MTOOLS_SKIP_CHECK", "1");
    let image = format!("{}@@{}", disk.display(), esp.offset);
    let out = cmd!(sh, "mdir -b -i {image} ::/EFI/Linux").quiet().read()?;
    Ok(out
        .lines()
        .map(|l| l.trim_start_matches("::/EFI/Linux/"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The GPT names of partitions 4 and 5 (slot B) on the disk file.
fn slot_b_labels(disk: &Path) -> Result<String> {
    let sh = Shell::new()?;
    let json = cmd!(sh, "sfdisk --json {disk}").quiet().read()?;
    let v: serde_json::Value = serde_json::from_str(&json).context("sfdisk --json")?;
    let parts = v["partitiontable"]["partitions"]
        .as_array()
        .context("no partitions in sfdisk --json")?;
    let names: Vec<String> = parts
        .iter()
        .skip(3)
        .take(2)
        .map(|p| p["name"].as_str().unwrap_or("").to_owned())
        .collect();
    Ok(names.join("/"))
}
