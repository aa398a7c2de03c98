//! Applying the host network at boot (`airlockd net apply`, run by
//! `airlock-network.service` before the supervisor): the steps of
//! `airlock_network::boot_plan` — the nftables ruleset first, then bridges,
//! taps, addresses, routes, forwarding last — each run as its argv (no
//! shell), its stdin written if it has one, stopping at the first failure
//! with the command and the end of its stderr in the error.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Where the step programs (`nft`, `ip`, `sysctl`, `wg`) are looked up.
const STEP_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Lines of a failed step's stderr quoted in the error.
const STDERR_TAIL: usize = 5;

/// Runs `steps` in order; returns how many ran.
pub fn run_plan(steps: &[airlock_network::Step]) -> Result<usize> {
    for (i, step) in steps.iter().enumerate() {
        let Some((program, args)) = step.argv.split_first() else { bail!("step {} has an empty command", i + 1) };
        crate::log::info(format!("network step {}/{} ({:?}): {step}", i + 1, steps.len(), step.kind));
        let mut child = Command::new(program)
            .args(args)
            .env("PATH", STEP_PATH)
            .stdin(if step.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("network step {}: starting {program}", i + 1))?;
        if let Some(input) = &step.stdin {
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(input.as_bytes()).with_context(|| format!("network step {}: writing to {program}", i + 1))?;
        }
        let out = child.wait_with_output().with_context(|| format!("network step {}: waiting for {program}", i + 1))?;
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
        Step { kind: StepKind::Link, argv: argv.iter().map(|s| s.to_string()).collect(), stdin: stdin.map(str::to_owned) }
    }

    #[test]
    fn runs_in_order_feeds_stdin_and_stops_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("fed");
        let after = dir.path().join("after");
        let ok = [step(&["tee", fed.to_str().unwrap()], Some("table inet airlock {}\n"))];
        assert_eq!(run_plan(&ok).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(&fed).unwrap(), "table inet airlock {}\n");

        let plan = [
            step(&["true"], None),
            step(&["ls", "/nonexistent-airlock-path"], None),
            step(&["touch", after.to_str().unwrap()], None),
        ];
        let err = run_plan(&plan).unwrap_err().to_string();
        assert!(err.contains("network step 2 failed") && err.contains("ls /nonexistent-airlock-path") && err.contains("No such file"), "{err}");
        assert!(!after.exists(), "no step runs after a failure");
    }
}
