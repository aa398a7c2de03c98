//! The compiled policy written next to each image, asked with setools:
//! the isolation matrix (who may do what to which side), the policy
//! README's table against the module's types, and a build that adds a
//! rule breaking isolation, which must fail.

use std::path::{Path, PathBuf};

use airlock::build::{BuildOptions, Profile};
use airlock::policy_query::{self, Access};
use anyhow::{ensure, Context, Result};

use super::images::{source_dir, Images, MANIFEST};
use super::{AcceptanceOptions, Suite};

const TESTS: &[&str] = &[
    "policy: isolation matrix holds in the production image's compiled policy",
    "policy: isolation matrix holds in the test image's compiled policy",
    "policy: policy/README.md describes exactly the module's types",
    "policy: a module that lets one side read the other's disk fails the build (neverallow)",
];

/// One row of the isolation matrix. `{own}` and `{other}` are replaced by
/// each side in turn (classified/general, then general/classified).
struct Row {
    source: &'static str,
    target: &'static str,
    class: &'static str,
    permission: &'static str,
    allowed: bool,
}

const fn row(
    source: &'static str,
    target: &'static str,
    class: &'static str,
    permission: &'static str,
    allowed: bool,
) -> Row {
    Row {
        source,
        target,
        class,
        permission,
        allowed,
    }
}

const ALLOW: bool = true;
const DENY: bool = false;

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    // A guest's QEMU: its own side read/write, config read-only, log append-only (P3).
    row("airlock_vm_{own}_t", "airlock_{own}_disk_t", "file", "write", ALLOW),
    row("airlock_vm_{own}_t", "airlock_{own}_disk_t", "file", "read", ALLOW),
    row("airlock_vm_{own}_t", "airlock_{own}_conf_t", "file", "read", ALLOW),
    row("airlock_vm_{own}_t", "airlock_{own}_conf_t", "file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_{own}_log_t", "file", "append", ALLOW),
    row("airlock_vm_{own}_t", "airlock_{own}_log_t", "file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_{own}_vdagent_sock_t", "sock_file", "create", ALLOW),
    // ... and nothing of the other side (P16).
    row("airlock_vm_{own}_t", "airlock_{other}_disk_t", "file", "read", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_disk_t", "file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_disk_t", "file", "map", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_disk_t", "dir", "search", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_conf_t", "file", "read", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_log_t", "file", "append", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_runtime_t", "dir", "search", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_vdagent_sock_t", "sock_file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_qmp_sock_t", "sock_file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_{other}_display_sock_t", "sock_file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{other}_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{other}_t", "process", "ptrace", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{other}_t", "process", "signal", DENY),
    // No program, no module, no policy change, no block device, no network socket.
    row("airlock_vm_{own}_t", "shell_exec_t", "file", "execute_no_trans", DENY),
    row("airlock_vm_{own}_t", "shell_exec_t", "file", "execute", DENY),
    row("airlock_vm_{own}_t", "bin_t", "file", "execute_no_trans", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{own}_t", "capability", "sys_module", DENY),
    row("airlock_vm_{own}_t", "kernel_t", "system", "module_load", DENY),
    row("airlock_vm_{own}_t", "security_t", "security", "load_policy", DENY),
    row("airlock_vm_{own}_t", "security_t", "security", "setbool", DENY),
    row("airlock_vm_{own}_t", "security_t", "security", "setenforce", DENY),
    row("airlock_vm_{own}_t", "fixed_disk_device_t", "blk_file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{own}_t", "tcp_socket", "create", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{own}_t", "udp_socket", "create", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{own}_t", "packet_socket", "create", DENY),
    row("airlock_vm_{own}_t", "airlock_vm_{own}_t", "tun_socket", "create", ALLOW),
    row("airlock_vm_{own}_t", "kvm_device_t", "chr_file", "open", ALLOW),
    row("airlock_vm_{own}_t", "usr_t", "dir", "write", DENY),
    row("airlock_vm_{own}_t", "etc_t", "file", "write", DENY),
    // Entered only from the supervisor, through QEMU's binary.
    row("airlock_supervisor_t", "airlock_vm_{own}_t", "process", "transition", ALLOW),
    row("airlock_vm_{own}_t", "qemu_exec_t", "file", "entrypoint", ALLOW),
    row("airlock_gateway_t", "airlock_vm_{own}_t", "process", "transition", DENY),
    row("airlock_kiosk_t", "airlock_vm_{own}_t", "process", "transition", DENY),
    // Sockets: vdagent for the gateway, QMP for the supervisor, display for the kiosk.
    row("airlock_gateway_t", "airlock_{own}_vdagent_sock_t", "sock_file", "write", ALLOW),
    row("airlock_gateway_t", "airlock_{own}_qmp_sock_t", "sock_file", "write", DENY),
    row("airlock_gateway_t", "airlock_{own}_display_sock_t", "sock_file", "write", DENY),
    row("airlock_supervisor_t", "airlock_{own}_qmp_sock_t", "sock_file", "write", ALLOW),
    row("airlock_supervisor_t", "airlock_{own}_vdagent_sock_t", "sock_file", "write", DENY),
    row("airlock_kiosk_t", "airlock_{own}_display_sock_t", "sock_file", "write", ALLOW),
    row("airlock_kiosk_t", "airlock_{own}_vdagent_sock_t", "sock_file", "write", DENY),
    row("airlock_kiosk_t", "airlock_{own}_qmp_sock_t", "sock_file", "write", DENY),
    row("airlock_sanitiser_t", "airlock_{own}_vdagent_sock_t", "sock_file", "write", DENY),
    row("airlock_update_t", "airlock_{own}_vdagent_sock_t", "sock_file", "write", DENY),
    // Nobody but the guest reads its disk image; the gateway never.
    row("airlock_gateway_t", "airlock_{own}_disk_t", "file", "read", DENY),
    row("airlock_sanitiser_t", "airlock_{own}_disk_t", "file", "read", DENY),
    row("airlock_kiosk_t", "airlock_{own}_disk_t", "file", "read", DENY),
    row("airlock_supervisor_t", "airlock_{own}_disk_t", "file", "read", DENY),
    row("airlock_update_t", "airlock_{own}_disk_t", "file", "read", DENY),
];

/// Rows about one program, not a side.
#[rustfmt::skip]
const SINGLE: &[Row] = &[
    // The gateway and sanitiser have no network; the sanitiser no files.
    row("airlock_gateway_t", "airlock_gateway_t", "tcp_socket", "create", DENY),
    row("airlock_gateway_t", "airlock_gateway_t", "udp_socket", "create", DENY),
    row("airlock_sanitiser_t", "airlock_sanitiser_t", "tcp_socket", "create", DENY),
    row("airlock_sanitiser_t", "airlock_supervisor_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_sanitiser_t", "airlock_vm_general_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_sanitiser_t", "airlock_conf_t", "file", "read", DENY),
    row("airlock_gateway_t", "airlock_sanitiser_t", "process", "transition", ALLOW),
    // Audit log: appended by the gateway, rewritten by nobody.
    row("airlock_gateway_t", "airlock_audit_log_t", "file", "append", ALLOW),
    row("airlock_gateway_t", "airlock_audit_log_t", "file", "write", DENY),
    row("airlock_supervisor_t", "airlock_audit_log_t", "file", "write", DENY),
    row("unconfined_t", "airlock_audit_log_t", "file", "write", DENY),
    // Clipboard confirm mode: the gateway's confirm socket is the kiosk's alone.
    row("airlock_kiosk_t", "airlock_confirm_sock_t", "sock_file", "write", ALLOW),
    row("airlock_kiosk_t", "airlock_gateway_t", "unix_stream_socket", "connectto", ALLOW),
    row("airlock_gateway_t", "airlock_confirm_sock_t", "sock_file", "create", ALLOW),
    row("airlock_supervisor_t", "airlock_confirm_sock_t", "sock_file", "write", DENY),
    row("airlock_sanitiser_t", "airlock_confirm_sock_t", "sock_file", "write", DENY),
    row("airlock_update_t", "airlock_confirm_sock_t", "sock_file", "write", DENY),
    row("airlock_vm_general_t", "airlock_confirm_sock_t", "sock_file", "write", DENY),
    row("airlock_vm_general_t", "airlock_gateway_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_vm_classified_t", "airlock_gateway_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_update_t", "airlock_gateway_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_sanitiser_t", "airlock_gateway_t", "unix_stream_socket", "connectto", DENY),
    row("airlock_kiosk_t", "airlock_confirm_sock_t", "sock_file", "setattr", DENY),
    row("unconfined_t", "airlock_confirm_sock_t", "sock_file", "write", DENY),
    // Boot slots and ESP: written by the update agent alone.
    row("airlock_update_t", "airlock_slot_device_t", "blk_file", "write", ALLOW),
    row("airlock_supervisor_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("airlock_gateway_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("airlock_kiosk_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("init_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("udev_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("unconfined_t", "airlock_slot_device_t", "blk_file", "write", DENY),
    row("udev_t", "airlock_slot_device_t", "blk_file", "relabelto", ALLOW),
    // Policy changes (P3): none of ours.
    row("airlock_supervisor_t", "security_t", "security", "load_policy", DENY),
    row("airlock_supervisor_t", "security_t", "security", "setenforce", DENY),
    row("airlock_gateway_t", "security_t", "security", "setbool", DENY),
    row("airlock_kiosk_t", "security_t", "security", "load_policy", DENY),
    row("airlock_update_t", "security_t", "security", "load_policy", DENY),
    row("airlock_update_t", "security_t", "security", "setenforce", DENY),
    // The other side's objects are out of reach of the distro's broad rules too.
    row("unconfined_t", "airlock_classified_disk_t", "file", "read", DENY),
    row("init_t", "airlock_classified_disk_t", "file", "read", DENY),
    row("systemd_tmpfiles_t", "airlock_classified_disk_t", "file", "write", DENY),
];

fn questions() -> Vec<(Access, bool)> {
    let mut out = Vec::new();
    for (own, other) in [("classified", "general"), ("general", "classified")] {
        let fill = |s: &str| s.replace("{own}", own).replace("{other}", other);
        for r in MATRIX {
            out.push((
                Access::new(&fill(r.source), &fill(r.target), r.class, r.permission),
                r.allowed,
            ));
        }
    }
    for r in SINGLE {
        out.push((
            Access::new(r.source, r.target, r.class, r.permission),
            r.allowed,
        ));
    }
    out
}

/// `<stem>.selinux/policy.NN` next to an image.
fn policy_file(image: &Path) -> Result<PathBuf> {
    let dir = image.with_extension("selinux");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("policy."))
        {
            return Ok(path);
        }
    }
    anyhow::bail!("no policy.NN in {}", dir.display())
}

fn check_matrix(opts: &AcceptanceOptions, image: &Path) -> Result<String> {
    let tools =
        policy_query::tools_tree(&source_dir(), &source_dir().join(MANIFEST), &opts.cache_dir)?;
    let policy = policy_file(image)?;
    let rows = questions();
    let access: Vec<Access> = rows.iter().map(|(a, _)| a.clone()).collect();
    let answers = policy_query::ask(&tools, &policy, &access)?;
    let mut wrong = Vec::new();
    for ((q, expected), got) in rows.iter().zip(&answers.access) {
        if got != expected {
            let say = |b: bool| if b { "allowed" } else { "denied" };
            wrong.push(format!(
                "{} → {}:{} {}: expected {}, policy says {}",
                q.source,
                q.target,
                q.class,
                q.permission,
                say(*expected),
                say(*got)
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {} rows differ:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n")
    );
    let allowed = rows.iter().filter(|(_, e)| *e).count();
    Ok(format!(
        "{} rows ({allowed} allowed, {} denied) match {}",
        rows.len(),
        rows.len() - allowed,
        policy.display()
    ))
}

/// Every `airlock_*` type named in README.md's tables (a backticked
/// first-column cell; `<side>` stands for both sides).
pub fn documented_types(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in readme.lines() {
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        let Some(name) = cell.split('`').next() else {
            continue;
        };
        if !name.starts_with("airlock_") {
            continue;
        }
        if name.contains("<side>") {
            for side in ["classified", "general"] {
                out.push(name.replace("<side>", side));
            }
        } else {
            out.push(name.to_string());
        }
    }
    out.sort();
    out
}

fn check_readme(opts: &AcceptanceOptions, images: &Images) -> Result<String> {
    let tools =
        policy_query::tools_tree(&source_dir(), &source_dir().join(MANIFEST), &opts.cache_dir)?;
    let answers = policy_query::ask(&tools, &policy_file(&images.production)?, &[])?;
    let in_policy: Vec<String> = answers
        .types
        .into_iter()
        .filter(|t| t.starts_with("airlock_"))
        .collect();
    let readme = std::fs::read_to_string(source_dir().join("policy/README.md"))
        .context("reading policy/README.md")?;
    let documented = documented_types(&readme);
    let missing: Vec<&String> = in_policy
        .iter()
        .filter(|t| !documented.contains(t))
        .collect();
    let stale: Vec<&String> = documented
        .iter()
        .filter(|t| !in_policy.contains(t))
        .collect();
    ensure!(missing.is_empty() && stale.is_empty(), "types in the policy but not in policy/README.md: {missing:?}; in the README but not in the policy: {stale:?}");
    Ok(format!(
        "{} airlock types, each in the README's tables",
        in_policy.len()
    ))
}

fn sabotage_build(opts: &AcceptanceOptions) -> Result<String> {
    let output = opts.work_dir.join("images/policy-sabotage");
    let result = airlock::build::build(&BuildOptions {
        manifest_path: source_dir().join(MANIFEST),
        output: output.clone(),
        cache: opts.cache_dir.clone(),
        source: source_dir(),
        profile: Profile::Production,
        reuse_trees: true,
        reuse_output: false,
        extra_overlays: Vec::new(),
        extra_policy_dirs: vec![source_dir().join("ci/xtask/sabotage/policy-cross-side")],
        secure_boot: None,
        tpm_policy_key: None,
        verbose: false,
    });
    let error = match result {
        Ok(report) => anyhow::bail!("the build succeeded ({}) with a module that lets the general guest read the classified disk", report.image),
        Err(e) => format!("{e:#}"),
    };
    // semodule's own report (not the builder's hint, which always mentions
    // neverallow): the rule that failed and the sabotage module's allow.
    ensure!(
        error.contains("neverallow check failed") && error.contains("airlock_sabotage_cross_side"),
        "the build failed, but not on a neverallow rule broken by the sabotage module:\n{error}"
    );
    let left: Vec<_> = std::fs::read_dir(&output)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(
        left.iter().all(|n| !n.to_string_lossy().ends_with(".raw")),
        "an image was left in {}: {left:?}",
        output.display()
    );
    let rule = error
        .lines()
        .find(|l| l.contains("(neverallow "))
        .unwrap_or_default()
        .trim_start_matches([' ', '|'])
        .trim();
    let allow = error
        .lines()
        .find(|l| l.contains("(allow airlock_vm_general_t"))
        .unwrap_or_default()
        .trim_start_matches([' ', '|'])
        .trim();
    Ok(format!(
        "build refused by semodule:\n{}…\nbroken by {allow}",
        rule.chars().take(90).collect::<String>()
    ))
}

pub fn policy_checks(suite: &mut Suite, images: &Images, opts: &AcceptanceOptions) {
    suite.test(TESTS[0], || check_matrix(opts, &images.production));
    suite.test(TESTS[1], || check_matrix(opts, &images.test));
    suite.test(TESTS[2], || check_readme(opts, images));
    suite.test(TESTS[3], || sabotage_build(opts));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_types_expand_sides() {
        let readme = "| type | what |\n|---|---|\n| `airlock_<side>_disk_t` | disk |\n| `airlock_conf_t` | conf |\n| `qemu_exec_t` | distro |\ntext `airlock_x_t`\n";
        assert_eq!(
            documented_types(readme),
            [
                "airlock_classified_disk_t",
                "airlock_conf_t",
                "airlock_general_disk_t"
            ]
        );
    }

    #[test]
    fn matrix_covers_both_sides_symmetrically() {
        let q = questions();
        assert_eq!(q.len(), 2 * MATRIX.len() + SINGLE.len());
        assert!(q.iter().any(|(a, e)| a.source == "airlock_vm_general_t"
            && a.target == "airlock_classified_disk_t"
            && !e));
        assert!(q.iter().any(|(a, e)| a.source == "airlock_vm_classified_t"
            && a.target == "airlock_general_disk_t"
            && !e));
        assert!(q
            .iter()
            .all(|(a, _)| !a.source.contains('{') && !a.target.contains('{')));
    }
}
