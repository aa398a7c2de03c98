//! `cargo xtask acceptance`: builds (or reuses) the images, boots them under
//! QEMU and checks, each check its own named test, what the appliance
//! promises. Pass/fail never comes from QEMU's exit code: results come from
//! the in-guest agent (test image) or from what the suite observes (serial
//! console, QMP events, screendumps, the image file).
//!
//! Scenarios share boots to keep the suite fast under TCG: one boot of the
//! test image serves every in-guest check, then reboots once for the
//! persistence checks. The update tests (`update:`) change slots and boot
//! counting, so they run on a second copy of the test image, after it.

mod attacks;
mod boot;
mod clipboard;
mod emulator;
pub mod images;
mod kiosk;
mod lockdown;
mod network;
pub mod policy;
mod provision;
mod sealed;
mod secureboot;
mod supervisor;
mod update;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

pub use images::Images;

/// Options of one run.
#[derive(Debug, Clone, clap::Args)]
pub struct AcceptanceOptions {
    /// Where images and per-run files go.
    #[arg(long, default_value = "target/acceptance")]
    pub work_dir: PathBuf,
    /// Package and tree cache shared with `airlock build`.
    #[arg(long, default_value = airlock::cli::DEFAULT_CACHE)]
    pub cache_dir: PathBuf,
    /// Run only tests whose name contains this text (or one of several
    /// texts separated by `|`, e.g. `network:|flash:`).
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the second, fresh build that checks reproducibility (~2 min).
    #[arg(long)]
    pub skip_reproducibility: bool,
    /// Build the production image with a deliberate flaw, to see the suite
    /// catch it: `getty` (a serial getty enabled), `avc` (a unit whose start
    /// is denied by SELinux). The suite must then fail.
    #[arg(long, value_parser = ["getty", "avc"])]
    pub sabotage: Option<String>,
}

/// Outcome of one test.
pub struct TestResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub seconds: f64,
}

/// Collects results; prints them as they come and as a table at the end.
pub struct Suite {
    filter: Option<String>,
    results: Vec<TestResult>,
    /// Runs set aside because the emulator faulted during them: the group,
    /// the fault, and that run's failed tests.
    reruns: Vec<(String, String, Vec<String>)>,
}

impl Suite {
    pub fn new(filter: Option<String>) -> Self {
        Suite {
            filter,
            results: Vec::new(),
            reruns: Vec::new(),
        }
    }

    /// True when `name` is selected by the filter.
    pub fn wants(&self, name: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| f.split('|').any(|alt| name.contains(alt)))
    }

    /// True when any of `names` is selected (to decide whether to boot at all).
    pub fn wants_any(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.wants(n))
    }

    /// Runs one test: `f` returns a one-line detail on success.
    pub fn test(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
        if !self.wants(name) {
            return;
        }
        let start = Instant::now();
        let outcome = f();
        let seconds = start.elapsed().as_secs_f64();
        let (passed, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(e) => (false, format!("{e:#}")),
        };
        println!(
            "acceptance: {} {name} ({seconds:.1}s){}",
            if passed { "PASS" } else { "FAIL" },
            indent_detail(&detail)
        );
        self.results.push(TestResult {
            name: name.into(),
            passed,
            detail,
            seconds,
        });
    }

    /// Like `test`, but runs `f` even when the filter deselects `name`
    /// (other tests need what it makes); recorded only when selected.
    pub fn prerequisite(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
        if self.wants(name) {
            self.test(name, f);
        } else if let Err(e) = f() {
            println!("acceptance: prerequisite `{name}` failed: {e:#}");
        }
    }

    /// Records `names` as failed because what they need (a boot) failed.
    pub fn fail_all(&mut self, names: &[&str], why: &anyhow::Error) {
        for name in names {
            self.test(name, || Err(anyhow::anyhow!("not run: {why:#}")));
        }
    }

    /// Where the results stand now, for [`failed_since`](Self::failed_since)
    /// and [`set_aside`](Self::set_aside).
    pub fn mark(&self) -> usize {
        self.results.len()
    }

    pub fn failed_since(&self, mark: usize) -> usize {
        self.results[mark..].iter().filter(|r| !r.passed).count()
    }

    /// Takes the results since `mark` out of the count because `group` runs
    /// again after `why`; the summary still lists what failed the first time.
    pub fn set_aside(&mut self, mark: usize, group: &str, why: &str) {
        let first_run = self.results.split_off(mark);
        let failed = first_run
            .into_iter()
            .filter(|r| !r.passed)
            .map(|r| r.name)
            .collect();
        self.reruns.push((group.to_owned(), why.to_owned(), failed));
    }

    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.passed).count()
    }

    pub fn print_summary(&self) {
        println!();
        println!("{:<58} {:>6} {:>9}", "test", "result", "seconds");
        for r in &self.results {
            println!(
                "{:<58} {:>6} {:>9.1}",
                r.name,
                if r.passed { "pass" } else { "FAIL" },
                r.seconds
            );
        }
        let passed = self.results.len() - self.failed();
        println!("\n{passed} passed, {} failed", self.failed());
        for (group, why, failed) in &self.reruns {
            println!(
                "ran again: `{group}` tests, because {why}; failed in the run set aside: {}",
                failed.join("; ")
            );
        }
    }
}

/// A machine for `disk` as IT sets a PC up: Secure Boot on with only the
/// suite's keys enrolled (a fresh variable store `dir/OVMF_VARS.fd`) and a
/// TPM that has never seen a boot ([`fresh_tpm`]).
pub fn pc_as_it_sets_it_up(
    disk: &std::path::Path,
    dir: &std::path::Path,
    opts: &AcceptanceOptions,
) -> Result<crate::Machine> {
    let vars = dir.join("OVMF_VARS.fd");
    let _ = std::fs::remove_file(&vars);
    let keys = images::secure_boot_keys(opts)?;
    Ok(crate::Machine::with_secure_boot(disk, &vars, &keys)?.with_tpm(&fresh_tpm(dir)?))
}

/// For the benches: runs `script` with `sh -c` in the guest ([`boot::sh`]).
pub fn boot_sh(vm: &mut crate::Vm, script: &str) -> Result<String> {
    boot::sh(vm, script)
}

/// For the benches: `airlock flash IMAGE dir/disk.raw` without
/// provisioning; the disk and its recovery key.
pub fn flash_unprovisioned(
    image: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, String)> {
    provision::flash(image, dir, 0, vec!["airlock".into(), "flash".into()])
}

/// A new TPM for a machine in `dir` (state `dir/tpm`, emptied): a TPM that
/// has never seen a boot, as in a new PC.
pub fn fresh_tpm(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let state = std::path::absolute(dir.join("tpm"))?;
    if state.exists() {
        std::fs::remove_dir_all(&state)?;
    }
    Ok(state)
}

fn indent_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!("\n    {}", detail.trim_end().replace('\n', "\n    "))
    }
}

/// Runs the whole suite; Ok(true) when every selected test passed.
pub fn run(opts: &AcceptanceOptions) -> Result<bool> {
    let started = Instant::now();
    let mut suite = Suite::new(opts.filter.clone());
    let images = images::prepare(&mut suite, opts)?;
    images::image_checks(&mut suite, &images, opts);
    policy::policy_checks(&mut suite, &images, opts);
    boot::test_image_boots(&mut suite, &images, opts);
    // A machine of its own, after the test machine is off.
    update::update_checks(&mut suite, &images, opts);
    lockdown::production_boot(&mut suite, &images, opts);
    secureboot::refusal_checks(&mut suite, &images, opts);
    lockdown::tampered_root(&mut suite, &images, opts);
    suite.print_summary();
    println!("acceptance: total {:.0}s", started.elapsed().as_secs_f64());
    if suite.results.is_empty() {
        anyhow::bail!("no test matched the filter {:?}", opts.filter);
    }
    Ok(suite.failed() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_set_aside_no_longer_counts_but_is_remembered() {
        let mut suite = Suite::new(None);
        suite.test("a: before", || Ok(String::new()));
        let mark = suite.mark();
        suite.test("b: one", || anyhow::bail!("emulator fault"));
        suite.test("b: two", || Ok(String::new()));
        assert_eq!(suite.failed_since(mark), 1);
        suite.set_aside(mark, "b:", "a triple fault");
        assert_eq!(suite.failed(), 0);
        assert_eq!(
            suite.reruns,
            vec![(
                "b:".to_owned(),
                "a triple fault".to_owned(),
                vec!["b: one".to_owned()]
            )]
        );
        // The second run's failures count.
        suite.test("b: one", || anyhow::bail!("real failure"));
        assert_eq!(suite.failed(), 1);
    }
}
