//! Attacks from inside the booted test image (P16): a program started in
//! one guest's QEMU domain tries what a compromised QEMU would, against
//! the other side and the host. Every attempt must fail, and the kernel
//! must have logged an AVC denial for it; a control attempt on its own
//! side must succeed, so a denial is the policy's doing.

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

use super::boot::sh;
use super::Suite;
use crate::Vm;

pub const TESTS: &[&str] = &[
    "attack: sockets a side's QEMU creates get that side's types",
    "attack: from the general QEMU domain, every attempt is denied and logged as an AVC",
    "attack: from the classified QEMU domain, every attempt is denied and logged as an AVC",
];

const ATTACK: &str = "/usr/lib/airlock/airlock-test-attack";

/// What `airlock-test-attack probe` tries, in order.
const ATTEMPTS: &[&str] = &[
    "own-disk-open-rw",
    "other-disk-open-rw",
    "other-vdagent-connect",
    "other-qmp-connect",
    "other-display-connect",
    "usr-create",
    "usr-bin-write",
    "exec-shell",
    "load-module",
    "inet-socket",
    "disk-device-write",
    "slot-device-write",
];

/// Lays out what the supervisor and provisioning would (each side's disk
/// image and runtime directory, labelled from the policy's file contexts),
/// mounts a writable usr_t tmpfs on /usr/local (the real /usr is read-only
/// erofs, which refuses writes before SELinux is asked), and starts one
/// listener per side in that side's QEMU domain.
///
/// With no auditd, the kernel hands audit records to the journal through
/// printk, whose rate limit (10 messages per 5 s) would drop some of the
/// burst of denials the attacks cause; the limit is lifted for this boot.
const SETUP: &str = r#"set -eu
echo 0 > /proc/sys/kernel/printk_ratelimit
for side in classified general; do
  mkdir -p /var/lib/airlock/$side/disk /run/airlock/$side
done
restorecon -R /var/lib/airlock /run/airlock
for side in classified general; do
  head -c 1048576 /dev/zero > /var/lib/airlock/$side/disk/disk.img
  # The side's QEMU (started by the supervisor) normally owns the sockets;
  # stand in for it only where it does not run.
  [ -S /run/airlock/$side/vdagent.sock ] || setsid -f runcon -t airlock_vm_${side}_t -- ATTACK listen /run/airlock/$side </dev/null >/dev/null 2>&1
done
mountpoint -q /usr/local || mount -t tmpfs -o size=1m,context=system_u:object_r:usr_t:s0 airlock-attack /usr/local
for i in $(seq 50); do
  [ -S /run/airlock/classified/display.sock ] && [ -S /run/airlock/general/display.sock ] && break
  sleep 0.2
done
ls -Z /run/airlock/classified /run/airlock/general /var/lib/airlock/classified/disk /var/lib/airlock/general/disk
"#;

#[derive(Debug, Deserialize)]
struct Attempt {
    attempt: String,
    target: String,
    result: String,
}

/// What the audit record of a denied attempt names: its target class,
/// and a fragment of its target context.
fn expected_denial(attempt: &str, other: &str) -> Option<(&'static str, String)> {
    Some(match attempt {
        // Path lookup stops at the other side's directory, whose type is the other side's.
        "other-disk-open-rw" => ("", format!("airlock_{other}_")),
        "other-vdagent-connect" | "other-qmp-connect" | "other-display-connect" => {
            ("", format!("airlock_{other}_"))
        }
        "usr-create" => ("dir", ":usr_t:".into()),
        // Whatever the policy stops first (the symlink, or the file itself).
        "usr-bin-write" => ("", "tcontext=system_u:object_r:".into()),
        // The lookup of /bin (a bin_t symlink) is refused before the shell
        // itself (shell_exec_t) is reached.
        "exec-shell" => ("", ":bin_t:|:shell_exec_t:".into()),
        "load-module" => ("capability", "".into()),
        "inet-socket" => ("tcp_socket", "".into()),
        "disk-device-write" => ("blk_file", ":fixed_disk_device_t:".into()),
        "slot-device-write" => ("blk_file", ":airlock_slot_device_t:".into()),
        _ => return None,
    })
}

fn avc_lines(vm: &mut Vm, domain: &str) -> Result<Vec<String>> {
    let out = sh(vm, &format!("journalctl -b -o cat --no-pager | grep 'avc:  denied' | grep 'scontext=system_u:system_r:{domain}:' || true"))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Runs one attempt in `domain`; its outcome and the AVC records it caused.
fn one_attempt(
    vm: &mut Vm,
    domain: &str,
    args: &str,
    attempt: &str,
) -> Result<(Attempt, Vec<String>)> {
    let before = avc_lines(vm, domain)?.len();
    let out = sh(
        vm,
        &format!("runcon -t {domain} -- {ATTACK} probe {args} {attempt}"),
    )?;
    let result: Attempt = serde_json::from_str(out.trim())
        .with_context(|| format!("attack program printed {out:?}"))?;
    ensure!(
        result.attempt == attempt,
        "asked for {attempt}, the attack program reported {}",
        result.attempt
    );
    // The kernel's audit records reach the journal asynchronously.
    let mut avcs = Vec::new();
    for _ in 0..10 {
        avcs = avc_lines(vm, domain)?.split_off(before);
        if !avcs.is_empty() || result.result == "ok" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    Ok((result, avcs))
}

fn attack_from(vm: &mut Vm, own: &str, other: &str, disk: &str, slot: &str) -> Result<String> {
    let domain = format!("airlock_vm_{own}_t");
    let args = format!("{own} {other} {disk} {slot}");
    let mut table = Vec::new();
    let mut wrong = Vec::new();
    for &name in ATTEMPTS {
        let (a, avcs) = one_attempt(vm, &domain, &args, name)?;
        let denied = a.result != "ok";
        let verdict = match name {
            "own-disk-open-rw" => {
                if denied || !avcs.is_empty() {
                    wrong.push(format!(
                        "control {name} on {}: {} {avcs:?}",
                        a.target, a.result
                    ));
                }
                "control".to_string()
            }
            // Refused either by SELinux (logged) or, if SELinux let it
            // through, by the read-only root (EROFS, which logs nothing).
            "usr-bin-write" if a.result.starts_with("EROFS") => {
                "refused by the read-only root (no AVC)".to_string()
            }
            _ => {
                let (class, context) = expected_denial(name, other)
                    .with_context(|| format!("unknown attempt {name}"))?;
                let logged = avcs.iter().find(|l| {
                    (class.is_empty() || l.contains(&format!("tclass={class} ")))
                        && context.split('|').any(|c| l.contains(c))
                });
                if !denied {
                    wrong.push(format!("{name} on {} SUCCEEDED", a.target));
                } else if !(a.result.starts_with("EACCES") || a.result.starts_with("EPERM")) {
                    wrong.push(format!(
                        "{name} on {} failed with {} (not a permission denial)",
                        a.target, a.result
                    ));
                } else if logged.is_none() {
                    wrong.push(format!("{name} on {} denied ({}) but no AVC with tclass={class} and {context}: {avcs:?}", a.target, a.result));
                }
                logged.map(|l| avc_summary(l)).unwrap_or_default()
            }
        };
        table.push(format!(
            "{name:<22} {:<42} {:<7} {verdict}",
            a.target,
            a.result.split(' ').next().unwrap_or("")
        ));
    }
    let detail = table.join("\n");
    ensure!(wrong.is_empty(), "{}\n{detail}", wrong.join("\n"));
    Ok(detail)
}

/// `{ write } for pid=… comm=… tcontext=… tclass=…` → "{ write } tcontext tclass".
fn avc_summary(line: &str) -> String {
    let perms = line
        .split("denied")
        .nth(1)
        .and_then(|s| s.split(" for ").next())
        .unwrap_or("")
        .trim();
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("")
            .to_string()
    };
    let tcontext = field("tcontext=");
    let ttype = tcontext.split(':').nth(2).unwrap_or("");
    format!("AVC {perms} {ttype}:{}", field("tclass="))
}

pub fn attack_checks(suite: &mut Suite, vm: &mut Vm) {
    let setup = (|| -> Result<(String, String, String)> {
        let listing = sh(vm, &SETUP.replace("ATTACK", ATTACK))?;
        // The whole disk and the ESP's partition node, by path: the attack
        // opens device nodes directly, not through /dev/disk symlinks.
        let disk = sh(
            vm,
            "lsblk -dnpo NAME,TYPE | awk '$2==\"disk\"{print $1; exit}'",
        )?
        .trim()
        .to_string();
        let slot = sh(vm, "readlink -f /dev/disk/by-partlabel/esp")?
            .trim()
            .to_string();
        ensure!(
            !disk.is_empty() && slot.starts_with("/dev/"),
            "disk {disk:?}, ESP {slot:?}"
        );
        Ok((listing, disk, slot))
    })();
    let (listing, disk, slot) = match setup {
        Ok(x) => x,
        Err(e) => return suite.fail_all(TESTS, &e.context("setting up the attack scenario")),
    };
    suite.test(TESTS[0], || {
        for side in ["classified", "general"] {
            for socket in ["qmp", "display", "vdagent"] {
                let line = listing.lines().find(|l| l.ends_with(&format!(" {socket}.sock")) && l.contains(&format!("airlock_{side}_{socket}_sock_t"))).is_some()
                    || sh(vm, &format!("ls -Z /run/airlock/{side}/{socket}.sock"))?.contains(&format!(":airlock_{side}_{socket}_sock_t:"));
                ensure!(line, "/run/airlock/{side}/{socket}.sock is not airlock_{side}_{socket}_sock_t:\n{listing}");
            }
        }
        let slot_label = sh(vm, &format!("ls -Z {slot}"))?;
        ensure!(slot_label.contains(":airlock_slot_device_t:"), "the ESP node {slot} is {slot_label:?} (udev rule 90-airlock-slots.rules)");
        Ok(format!("{listing}{}", slot_label.trim()))
    });
    suite.test(TESTS[1], || {
        attack_from(vm, "general", "classified", &disk, &slot)
    });
    suite.test(TESTS[2], || {
        attack_from(vm, "classified", "general", &disk, &slot)
    });
}
