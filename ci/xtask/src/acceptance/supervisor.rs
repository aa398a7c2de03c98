//! The guest supervisor in the booted test image (P5, P11, P14, P2): both
//! nested test guests start at boot, each QEMU as its side's user, in its
//! side's SELinux domain and cgroup with the configured limits; the
//! classified guest sees no USB, sound or removable-media controller; and
//! when both guests power themselves off, the appliance powers off.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::boot::sh;
use super::Suite;
use crate::Vm;

pub const TESTS: &[&str] = &[
    "supervisor: both test guests answer after boot (nested)",
    "supervisor: each QEMU runs as its side's user, in its side's domain and cgroup, with its limits",
    "supervisor: the classified guest has no USB, sound, IDE or floppy controller (P11)",
    "supervisor: QMP on the classified QEMU: no USB, sound or storage-media device beyond its disk (P11)",
    "supervisor: a CPU and memory hog in the general guest leaves the classified guest's benchmark within 1.5x (P14)",
];
pub const POWEROFF_TEST: &str =
    "supervisor: both guests powering off powers the appliance off (P5)";

pub const CTL: &str = "/usr/lib/airlock/airlock-test-guest-ctl";
/// Nested KVM under TCG boots a test guest in seconds; nested TCG (where
/// the outer CPU model offers no SVM/VMX) in a minute or two.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

pub fn guest(vm: &mut Vm, side: &str, command: &str) -> Result<String> {
    Ok(sh(
        vm,
        &format!("{CTL} /run/airlock/{side}/test.sock {command}"),
    )?
    .trim()
    .to_string())
}

/// The pid of the side's QEMU, as the supervisor reports it. (Not a grep
/// over /proc/*/cmdline: that also matches the grep itself.)
pub fn qemu_pid(vm: &mut Vm, side: &str) -> Result<String> {
    let status = sh(vm, "airlockd status")?;
    let json: serde_json::Value = serde_json::from_str(status.trim())
        .with_context(|| format!("airlockd status: {status}"))?;
    let pid = json["guests"][side]["pid"]
        .as_i64()
        .with_context(|| format!("no QEMU pid for the {side} guest; airlockd status: {status}"))?;
    Ok(pid.to_string())
}

/// One QMP command on the side's test-only monitor; QEMU's `return` value.
pub fn qmp(vm: &mut Vm, side: &str, execute: &str) -> Result<serde_json::Value> {
    let line = sh(
        vm,
        &format!("{CTL} --qmp /run/airlock/{side}/qmp-test.sock '{{\"execute\": \"{execute}\"}}'"),
    )?;
    let answer: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("QMP {execute} answered {line:?}"))?;
    answer
        .get("return")
        .cloned()
        .with_context(|| format!("QMP {execute} failed: {answer}"))
}

/// Waits until both guests answer `ping`; seconds since the appliance booted.
pub fn wait_for_guests(vm: &mut Vm) -> Result<String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < GUEST_TIMEOUT {
        let both = ["classified", "general"]
            .iter()
            .all(|side| match guest(vm, side, "ping") {
                Ok(reply) => reply.starts_with("pong"),
                Err(e) => {
                    last = format!("{side}: {e:#}");
                    false
                }
            });
        if both {
            let uptime = sh(vm, "cut -d' ' -f1 /proc/uptime")?;
            let status = sh(vm, "airlockd status || true")?;
            let kvm = sh(
                vm,
                "test -c /dev/kvm && echo 'nested KVM' || echo 'no /dev/kvm'",
            )?;
            let rss = sh(
                vm,
                "grep VmRSS /proc/$(systemctl show -P MainPID airlockd)/status | tr -s ' \t' ' '",
            )?;
            return Ok(format!(
                "both answer {:.0}s after the appliance's kernel started ({}); airlockd {}; {}",
                uptime.trim().parse::<f64>().unwrap_or(0.0),
                kvm.trim(),
                rss.trim(),
                status.trim()
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let journal = sh(
        vm,
        "journalctl -b -u airlockd -o cat --no-pager | tail -n 30",
    )
    .unwrap_or_default();
    bail!("the test guests did not both answer within {GUEST_TIMEOUT:?} (last: {last}); airlockd's journal:\n{journal}")
}

fn check_processes(vm: &mut Vm) -> Result<String> {
    let mut lines = Vec::new();
    for side in ["classified", "general"] {
        let pid = qemu_pid(vm, side)?;
        let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
        ensure!(
            context.contains(&format!(":airlock_vm_{side}_t:")),
            "{side} QEMU (pid {pid}) runs as {context:?}"
        );
        let user = sh(vm, &format!("stat -c %U /proc/{pid}"))?
            .trim()
            .to_string();
        ensure!(
            user == format!("airlock-{side}"),
            "{side} QEMU runs as user {user}"
        );
        let cgroup = sh(vm, &format!("cut -d: -f3 /proc/{pid}/cgroup"))?
            .trim()
            .to_string();
        ensure!(
            cgroup.ends_with(&format!("/guest-{side}")),
            "{side} QEMU is in cgroup {cgroup}"
        );
        let cpu = sh(vm, &format!("cat /sys/fs/cgroup{cgroup}/cpu.max"))?
            .trim()
            .to_string();
        let memory = sh(vm, &format!("cat /sys/fs/cgroup{cgroup}/memory.max"))?
            .trim()
            .to_string();
        // appliance.toml of the test profile: classified 100 % and 512 MiB, general 50 % and 512 MiB.
        let expected_cpu = if side == "classified" {
            "100000 100000"
        } else {
            "50000 100000"
        };
        ensure!(
            cpu == expected_cpu,
            "{side}: cpu.max {cpu:?}, configured {expected_cpu:?}"
        );
        ensure!(
            memory == (512u64 << 20).to_string(),
            "{side}: memory.max {memory}, configured 512 MiB"
        );
        lines.push(format!(
            "{side}: pid {pid} user {user} {} cgroup {cgroup} cpu.max {cpu} memory.max {memory}",
            context.trim()
        ));
    }
    Ok(lines.join("\n"))
}

/// PCI classes (from the guest's own sysfs) that must not appear in the
/// classified guest: USB controllers, audio, IDE, floppy.
const FORBIDDEN_PCI_CLASSES: &[(&str, &str)] = &[
    ("0c03", "USB controller"),
    ("0401", "audio"),
    ("0403", "audio (HDA)"),
    ("0101", "IDE"),
    ("0102", "floppy"),
];

fn check_classified_devices(vm: &mut Vm) -> Result<String> {
    let reply = guest(vm, "classified", "pci")?;
    let devices: Vec<&str> = reply
        .strip_prefix("pci")
        .context("unexpected reply to pci")?
        .split_whitespace()
        .collect();
    ensure!(
        !devices.is_empty(),
        "the classified guest lists no PCI device at all: {reply}"
    );
    for device in &devices {
        for (class, what) in FORBIDDEN_PCI_CLASSES {
            ensure!(
                !device.starts_with(class),
                "the classified guest has a {what} ({device}): {reply}"
            );
        }
    }
    Ok(format!(
        "{} PCI devices: {}",
        devices.len(),
        devices.join(" ")
    ))
}

/// PCI class codes QEMU reports as `class_info.class` (decimal in QMP).
const PCI_CLASS_USB: u64 = 0x0c03;
const PCI_CLASS_MULTIMEDIA: u64 = 0x04; // (base class) audio, video capture
const PCI_CLASS_STORAGE: u64 = 0x01; // (base class)
const PCI_CLASS_SATA: u64 = 0x0106;
const PCI_CLASS_SCSI: u64 = 0x0100; // virtio-blk reports itself as SCSI-class

/// Reads the classified QEMU's own view (QMP `query-pci`, `query-block`)
/// rather than the guest's: a device the guest failed to probe still counts.
/// Storage controllers allowed: the disk's virtio-blk and q35's built-in
/// ICH9 AHCI (part of the chipset; it carries no drive, as `query-block` shows).
fn check_classified_qmp(vm: &mut Vm) -> Result<String> {
    let buses = qmp(vm, "classified", "query-pci")?;
    let mut devices = Vec::new();
    let mut storage = Vec::new();
    for device in buses
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|bus| bus["devices"].as_array().into_iter().flatten())
    {
        let class = device["class_info"]["class"]
            .as_u64()
            .context("query-pci: a device without class")?;
        let desc = device["class_info"]["desc"].as_str().unwrap_or("?");
        let id = device["qdev_id"].as_str().unwrap_or("");
        let name = format!(
            "{class:04x} {desc}{}",
            if id.is_empty() {
                String::new()
            } else {
                format!(" ({id})")
            }
        );
        ensure!(
            class != PCI_CLASS_USB,
            "the classified QEMU has a USB controller: {name}"
        );
        ensure!(
            class >> 8 != PCI_CLASS_MULTIMEDIA,
            "the classified QEMU has a multimedia device: {name}"
        );
        if class >> 8 == PCI_CLASS_STORAGE {
            ensure!(
                class == PCI_CLASS_SATA || class == PCI_CLASS_SCSI,
                "unexpected storage controller: {name}"
            );
            storage.push(name.clone());
        }
        devices.push(name);
    }
    ensure!(!devices.is_empty(), "query-pci listed no device: {buses}");
    let disks = storage
        .iter()
        .filter(|n| n.starts_with(&format!("{PCI_CLASS_SCSI:04x}")))
        .count();
    ensure!(
        disks == 1,
        "expected one virtio disk controller, found {disks}: {storage:?}"
    );
    let blocks = qmp(vm, "classified", "query-block")?;
    let blocks: Vec<&serde_json::Value> = blocks.as_array().into_iter().flatten().collect();
    let names: Vec<String> = blocks
        .iter()
        .map(|b| {
            format!(
                "{} removable={} inserted={}",
                b["device"].as_str().unwrap_or("?"),
                b["removable"],
                b.get("inserted").is_some()
            )
        })
        .collect();
    ensure!(
        blocks.len() == 1,
        "the classified QEMU has {} block devices, only its disk expected: {names:?}",
        blocks.len()
    );
    ensure!(
        blocks[0]["removable"] == false,
        "the classified disk is removable media: {names:?}"
    );
    Ok(format!(
        "{} PCI functions, storage: {}; block devices: {}",
        devices.len(),
        storage.join(", "),
        names.join(", ")
    ))
}

/// Median benchmark time (µs) of three runs in the side's guest.
fn bench_median(vm: &mut Vm, side: &str) -> Result<u64> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let reply = guest(vm, side, &format!("bench {BENCH_ITERATIONS}"))?;
        let us = reply
            .split_whitespace()
            .find_map(|w| w.strip_prefix("elapsed_us="))
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("unexpected bench reply {reply:?}"))?;
        times.push(us);
    }
    times.sort_unstable();
    Ok(times[1])
}

/// About 1 s per run in a nested KVM guest under TCG (20 M took 0.08 s):
/// long enough for the CFS period (100 ms) to matter many times over.
const BENCH_ITERATIONS: u64 = 250_000_000;
/// The hog: four busy threads on the general guest's vCPU and a third of
/// its memory (more starves its own test port), for [`HOG_SECONDS`].
const HOG_SECONDS: u64 = 20;
const HOG_THREADS_MIB: &str = "4 64";
const HOG_BOUND: f64 = 1.5;

/// The general guest hogs CPU and memory; the classified guest's benchmark
/// must stay within [`HOG_BOUND`] of its time without the hog, and the
/// general guest's cgroup must show it was throttled (the cap did the work).
fn check_cpu_hog(vm: &mut Vm) -> Result<String> {
    let throttled = |vm: &mut Vm| -> Result<u64> {
        let stat = sh(
            vm,
            "cat /sys/fs/cgroup/system.slice/airlockd.service/guest-general/cpu.stat",
        )?;
        stat.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no nr_throttled in cpu.stat: {stat}"))
    };
    let quiet = bench_median(vm, "classified")?;
    let throttled_before = throttled(vm)?;
    let hog = format!("hog {HOG_THREADS_MIB} {HOG_SECONDS}");
    let reply = guest(vm, "general", &hog)?;
    let hog_started = Instant::now();
    ensure!(
        reply.starts_with("ok hog"),
        "the general guest refused the hog: {reply}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let hogged = bench_median(vm, "classified")?;
    let throttled_after = throttled(vm)?;
    ensure!(
        hog_started.elapsed() < Duration::from_secs(HOG_SECONDS),
        "the benchmark outlasted the hog ({HOG_SECONDS} s): raise HOG_SECONDS"
    );
    // The next tests start from a quiet general guest.
    std::thread::sleep(Duration::from_secs(HOG_SECONDS + 2).saturating_sub(hog_started.elapsed()));
    // The hog may not have ended the guest: it must still answer.
    let alive = guest(vm, "general", "ping")?;
    ensure!(
        alive.starts_with("pong"),
        "the general guest stopped answering under its own hog: {alive}"
    );
    let ratio = hogged as f64 / quiet as f64;
    ensure!(throttled_after > throttled_before, "the general guest's cgroup was never throttled during the hog (nr_throttled {throttled_before} → {throttled_after}): the CPU cap did not act");
    ensure!(ratio <= HOG_BOUND, "classified benchmark {quiet} µs quiet, {hogged} µs with the general hog: ratio {ratio:.2} > {HOG_BOUND}");
    Ok(format!(
        "classified benchmark median {:.2} s quiet, {:.2} s with the general guest hogging ({hog}): ratio {ratio:.2} (bound {HOG_BOUND}); general throttled {} times",
        quiet as f64 / 1e6,
        hogged as f64 / 1e6,
        throttled_after - throttled_before
    ))
}

pub fn supervisor_checks(suite: &mut Suite, vm: &mut Vm) {
    let up = wait_for_guests(vm);
    let ok = up.is_ok();
    suite.test(TESTS[0], || up);
    if !ok {
        return suite.fail_all(
            &TESTS[1..],
            &anyhow::anyhow!("the test guests are not running"),
        );
    }
    suite.test(TESTS[1], || check_processes(vm));
    suite.test(TESTS[2], || check_classified_devices(vm));
    suite.test(TESTS[3], || check_classified_qmp(vm));
    suite.test(TESTS[4], || check_cpu_hog(vm));
}

/// Last: the machine is gone afterwards.
pub fn poweroff_check(suite: &mut Suite, vm: &mut Vm) {
    suite.test(POWEROFF_TEST, || {
        // After the reboot checks the guests start again; wait for them.
        let up = wait_for_guests(vm)?;
        println!("    before power-off: {up}");
        let start = Instant::now();
        guest(vm, "general", "poweroff")?;
        std::thread::sleep(Duration::from_secs(3));
        let still = vm.agent().is_ok_and(|a| a.run(&["true"], Duration::from_secs(10)).is_ok());
        ensure!(still, "the appliance went away when only the general guest powered off");
        let _ = guest(vm, "classified", "poweroff");
        let after_second = Instant::now();
        let status = vm.wait_exit(Duration::from_secs(180))?;
        let Some(status) = status else {
            let journal = sh(vm, "journalctl -b -u airlockd -o cat --no-pager | tail -n 15").unwrap_or_default();
            bail!("the appliance still runs 180 s after both guests powered off; airlockd's journal ends with:\n{journal}");
        };
        Ok(format!(
            "appliance powered off {:.1}s after the second guest's poweroff ({:.1}s in all); QEMU exit {status:?}",
            after_second.elapsed().as_secs_f64(),
            start.elapsed().as_secs_f64()
        ))
    });
}
