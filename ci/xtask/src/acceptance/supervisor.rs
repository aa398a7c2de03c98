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
];
pub const POWEROFF_TEST: &str = "supervisor: both guests powering off powers the appliance off (P5)";

const CTL: &str = "/usr/lib/airlock/airlock-test-guest-ctl";
/// Nested KVM under TCG boots a test guest in seconds; nested TCG (where
/// the outer CPU model offers no SVM/VMX) in a minute or two.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn guest(vm: &mut Vm, side: &str, command: &str) -> Result<String> {
    Ok(sh(vm, &format!("{CTL} /run/airlock/{side}/test.sock {command}"))?.trim().to_string())
}

/// Waits until both guests answer `ping`; seconds since the appliance booted.
fn wait_for_guests(vm: &mut Vm) -> Result<String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < GUEST_TIMEOUT {
        let both = ["classified", "general"].iter().all(|side| match guest(vm, side, "ping") {
            Ok(reply) => reply.starts_with("pong"),
            Err(e) => {
                last = format!("{side}: {e:#}");
                false
            }
        });
        if both {
            let uptime = sh(vm, "cut -d' ' -f1 /proc/uptime")?;
            let status = sh(vm, "airlockd status || true")?;
            let kvm = sh(vm, "test -c /dev/kvm && echo 'nested KVM' || echo 'no /dev/kvm'")?;
            return Ok(format!("both answer {:.0}s after the appliance's kernel started ({}); {}", uptime.trim().parse::<f64>().unwrap_or(0.0), kvm.trim(), status.trim()));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let journal = sh(vm, "journalctl -b -u airlockd -o cat --no-pager | tail -n 30").unwrap_or_default();
    bail!("the test guests did not both answer within {GUEST_TIMEOUT:?} (last: {last}); airlockd's journal:\n{journal}")
}

fn check_processes(vm: &mut Vm) -> Result<String> {
    let mut lines = Vec::new();
    for side in ["classified", "general"] {
        // (No procps in the image: read /proc directly.)
        let pid = sh(vm, &format!("grep -l -a -- 'process=qemu-{side}' /proc/[0-9]*/cmdline 2>/dev/null | grep -v self | head -n 1 | cut -d/ -f3"))?.trim().to_string();
        ensure!(!pid.is_empty(), "no QEMU for the {side} guest; airlockd status: {}", sh(vm, "airlockd status || true")?);
        let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
        ensure!(context.contains(&format!(":airlock_vm_{side}_t:")), "{side} QEMU (pid {pid}) runs as {context:?}");
        let user = sh(vm, &format!("stat -c %U /proc/{pid}"))?.trim().to_string();
        ensure!(user == format!("airlock-{side}"), "{side} QEMU runs as user {user}");
        let cgroup = sh(vm, &format!("cut -d: -f3 /proc/{pid}/cgroup"))?.trim().to_string();
        ensure!(cgroup.ends_with(&format!("/guest-{side}")), "{side} QEMU is in cgroup {cgroup}");
        let cpu = sh(vm, &format!("cat /sys/fs/cgroup{cgroup}/cpu.max"))?.trim().to_string();
        let memory = sh(vm, &format!("cat /sys/fs/cgroup{cgroup}/memory.max"))?.trim().to_string();
        // appliance.toml of the test profile: classified 100 % and 512 MiB, general 50 % and 512 MiB.
        let expected_cpu = if side == "classified" { "100000 100000" } else { "50000 100000" };
        ensure!(cpu == expected_cpu, "{side}: cpu.max {cpu:?}, configured {expected_cpu:?}");
        ensure!(memory == (512u64 << 20).to_string(), "{side}: memory.max {memory}, configured 512 MiB");
        lines.push(format!("{side}: pid {pid} user {user} {} cgroup {cgroup} cpu.max {cpu} memory.max {memory}", context.trim()));
    }
    Ok(lines.join("\n"))
}

/// PCI classes (from the guest's own sysfs) that must not appear in the
/// classified guest: USB controllers, audio, IDE, floppy.
const FORBIDDEN_PCI_CLASSES: &[(&str, &str)] =
    &[("0c03", "USB controller"), ("0401", "audio"), ("0403", "audio (HDA)"), ("0101", "IDE"), ("0102", "floppy")];

fn check_classified_devices(vm: &mut Vm) -> Result<String> {
    let reply = guest(vm, "classified", "pci")?;
    let devices: Vec<&str> = reply.strip_prefix("pci").context("unexpected reply to pci")?.split_whitespace().collect();
    ensure!(!devices.is_empty(), "the classified guest lists no PCI device at all: {reply}");
    for device in &devices {
        for (class, what) in FORBIDDEN_PCI_CLASSES {
            ensure!(!device.starts_with(class), "the classified guest has a {what} ({device}): {reply}");
        }
    }
    Ok(format!("{} PCI devices: {}", devices.len(), devices.join(" ")))
}

pub fn supervisor_checks(suite: &mut Suite, vm: &mut Vm) {
    let up = wait_for_guests(vm);
    let ok = up.is_ok();
    suite.test(TESTS[0], || up);
    if !ok {
        return suite.fail_all(&TESTS[1..], &anyhow::anyhow!("the test guests are not running"));
    }
    suite.test(TESTS[1], || check_processes(vm));
    suite.test(TESTS[2], || check_classified_devices(vm));
}

/// Last: the machine is gone afterwards.
pub fn poweroff_check(suite: &mut Suite, vm: &mut Vm) {
    suite.test(POWEROFF_TEST, || {
        let start = Instant::now();
        guest(vm, "general", "poweroff")?;
        std::thread::sleep(Duration::from_secs(3));
        let still = vm.agent().is_ok_and(|a| a.run(&["true"], Duration::from_secs(10)).is_ok());
        ensure!(still, "the appliance went away when only the general guest powered off");
        let _ = guest(vm, "classified", "poweroff");
        let after_second = Instant::now();
        let status = vm.wait_exit(Duration::from_secs(180))?;
        let Some(status) = status else {
            bail!("the appliance still runs 180 s after both guests powered off; serial console ends with:\n{}", super::boot::tail(&vm.serial_log(), 20));
        };
        Ok(format!(
            "appliance powered off {:.1}s after the second guest's poweroff ({:.1}s in all); QEMU exit {status:?}",
            after_second.elapsed().as_secs_f64(),
            start.elapsed().as_secs_f64()
        ))
    });
}
