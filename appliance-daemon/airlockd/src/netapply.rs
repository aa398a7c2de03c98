//! Applying the host network at boot (`airlockd net apply`, run by
//! `airlock-network.service` before the supervisor): the steps of
//! `airlock_network::boot_plan` — the nftables ruleset first, then bridges,
//! taps, addresses, routes, forwarding last — each run as its argv (no
//! shell), its stdin written if it has one, stopping at the first failure
//! with the command and the end of its stderr in the error.
//!
//! `sysctl` steps are not executed: their `key=value` is written to
//! `/proc/sys/<key>` directly (the image ships no procps), with the same
//! stop-at-the-first-failure rule.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where the step programs (`nft`, `ip`, `sysctl`, `wg`) are looked up.
const STEP_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Lines of a failed step's stderr quoted in the error.
const STDERR_TAIL: usize = 5;

/// Waits until every interface in `names` exists (the uplink NICs, named
/// by udev), polling `sys_class_net`; fails naming the missing ones.
pub fn wait_for_interfaces(sys_class_net: &Path, names: &[&str], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !sys_class_net.join(n).exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "uplink interface(s) {} did not appear within {timeout:?}",
                missing.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `sysctl -q -w key=value` step as the file under `proc_sys` and the value.
pub fn sysctl_write(proc_sys: &Path, argv: &[String]) -> Option<(PathBuf, String)> {
    let (program, rest) = argv.split_first()?;
    if program != "sysctl" {
        return None;
    }
    let assignment = rest.iter().find(|a| !a.starts_with('-'))?;
    let (key, value) = assignment.split_once('=')?;
    if key.is_empty()
        || key.split('.').any(|part| part.is_empty() || part == "..")
        || key.contains('/')
    {
        return None;
    }
    Some((proc_sys.join(key.replace('.', "/")), value.to_string()))
}

/// Runs `steps` in order; returns how many ran.
pub fn run_plan(steps: &[airlock_network::Step]) -> Result<usize> {
    run_plan_in(Path::new("/proc/sys"), steps)
}

/// `run_plan` with sysctls written under `proc_sys` (a test gives a temporary directory).
pub fn run_plan_in(proc_sys: &Path, steps: &[airlock_network::Step]) -> Result<usize> {
    for (i, step) in steps.iter().enumerate() {
        let Some((program, args)) = step.argv.split_first() else {
            bail!("step {} has an empty command", i + 1)
        };
        crate::log::info(format!(
            "network step {}/{} ({:?}): {step}",
            i + 1,
            steps.len(),
            step.kind
        ));
        if step.kind == airlock_network::StepKind::Sysctl {
            let (path, value) = sysctl_write(proc_sys, &step.argv).with_context(|| {
                format!(
                    "network step {}: `{step}` is not a sysctl assignment",
                    i + 1
                )
            })?;
            std::fs::write(&path, format!("{value}\n")).with_context(|| {
                format!(
                    "network step {} failed: `{step}`: writing {}",
                    i + 1,
                    path.display()
                )
            })?;
            continue;
        }
        let mut child = Command::new(program)
            .args(args)
            .env("PATH", STEP_PATH)
            .stdin(if step.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("network step {}: starting {program}", i + 1))?;
        if let Some(input) = &step.stdin {
            let mut stdin = child.stdin.take().expect("piped");
            stdin
                .write_all(input.as_bytes())
                .with_context(|| format!("network step {}: writing to {program}", i + 1))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("network step {}: waiting for {program}", i + 1))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            bail!(
                "network step {} failed ({}): `{step}`: {}",
                i + 1,
                out.status,
                lines[lines.len().saturating_sub(STDERR_TAIL)..].join(" | ")
            );
        }
    }
    Ok(steps.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_network::{Step, StepKind};

    fn step(argv: &[&str], stdin: Option<&str>) -> Step {
        Step {
            kind: StepKind::Link,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: stdin.map(str::to_owned),
        }
    }

    #[test]
    fn runs_in_order_feeds_stdin_and_stops_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("fed");
        let after = dir.path().join("after");
        let ok = [step(
            &["tee", fed.to_str().unwrap()],
            Some("table inet airlock {}\n"),
        )];
        assert_eq!(run_plan(&ok).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(&fed).unwrap(),
            "table inet airlock {}\n"
        );

        let plan = [
            step(&["true"], None),
            step(&["ls", "/nonexistent-airlock-path"], None),
            step(&["touch", after.to_str().unwrap()], None),
        ];
        let err = run_plan(&plan).unwrap_err().to_string();
        assert!(
            err.contains("network step 2 failed")
                && err.contains("ls /nonexistent-airlock-path")
                && err.contains("No such file"),
            "{err}"
        );
        assert!(!after.exists(), "no step runs after a failure");
    }

    #[test]
    fn sysctl_steps_are_written_under_proc_sys_not_executed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4/conf/all")).unwrap();
        let mut s = step(
            &["sysctl", "-q", "-w", "net.ipv4.conf.all.send_redirects=0"],
            None,
        );
        s.kind = StepKind::Sysctl;
        let mut f = step(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], None);
        f.kind = StepKind::Sysctl;
        assert_eq!(run_plan_in(dir.path(), &[s, f]).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("net/ipv4/conf/all/send_redirects")).unwrap(),
            "0\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("net/ipv4/ip_forward")).unwrap(),
            "1\n"
        );
        // A key that does not exist is a failure, as with sysctl(8).
        let mut bad = step(&["sysctl", "-q", "-w", "net.nonexistent.key=1"], None);
        bad.kind = StepKind::Sysctl;
        let err = run_plan_in(dir.path(), &[bad]).unwrap_err().to_string();
        assert!(err.contains("network step 1 failed"), "{err}");
        let p = Path::new("/proc/sys");
        assert_eq!(
            sysctl_write(p, &["sysctl".into(), "-w".into(), "a..b=1".into()]),
            None
        );
        assert_eq!(sysctl_write(p, &["ip".into(), "a.b=1".into()]), None);
        // Every sysctl the network crate renders maps to a file.
        let cfg = crate::config::parse_layers(&[
            (
                "appliance-test.toml",
                include_str!("../../../ci/test-agent/overlay/etc/airlock/appliance.toml"),
                false,
            ),
            (
                "machine.toml",
                include_str!("../../../ci/test-agent/machine.toml"),
                true,
            ),
        ])
        .unwrap()
        .network
        .expect("the test PC has a host network");
        for st in airlock_network::render_topology(&cfg)
            .iter()
            .filter(|s| s.kind == StepKind::Sysctl)
        {
            let (path, _) = sysctl_write(p, &st.argv).unwrap_or_else(|| panic!("{st}"));
            assert!(path.starts_with("/proc/sys/net/"), "{}", path.display());
        }
    }

    #[test]
    fn waits_for_interfaces_and_names_the_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("eth0")).unwrap();
        wait_for_interfaces(dir.path(), &["eth0"], Duration::from_millis(10)).unwrap();
        let err = wait_for_interfaces(dir.path(), &["eth0", "uplink9"], Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("uplink9") && !err.contains("eth0"), "{err}");
    }
}
