//! The one place the builder runs external tools.
//!
//! Every command is logged (to the build log, and to stderr with
//! `--verbose`), and a failure becomes an error that names what was being
//! done, the command, its exit status and the tail of its stderr — so
//! "mmdebstrap exited 1" arrives with apt's "E: Unable to locate package foo".

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Cmd, Shell};

/// How many lines of stderr an error carries.
const STDERR_TAIL_LINES: usize = 15;

/// Runs external commands, logging each one.
pub struct Runner {
    sh: Shell,
    log: Mutex<Option<File>>,
    verbose: bool,
}

impl Runner {
    pub fn new(verbose: bool) -> Result<Self> {
        let sh = Shell::new().context("creating command shell")?;
        Ok(Runner {
            sh,
            log: Mutex::new(None),
            verbose,
        })
    }

    /// Sends command lines and their full output to `path` from now on.
    pub fn log_to(&self, path: &Path) -> Result<()> {
        let file =
            File::create(path).with_context(|| format!("creating build log {}", path.display()))?;
        *self.log.lock().unwrap() = Some(file);
        Ok(())
    }

    pub fn note(&self, line: &str) {
        if let Some(f) = self.log.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{line}");
        }
        if self.verbose {
            eprintln!("{line}");
        }
    }

    /// The underlying xshell, to build a `Cmd` with `cmd!(runner.sh(), ...)`.
    pub fn sh(&self) -> &Shell {
        &self.sh
    }

    /// Runs `cmd`, returns its stdout. `what` says what the command is for,
    /// e.g. "bootstrapping the root tree".
    pub fn run(&self, what: &str, cmd: Cmd<'_>) -> Result<String> {
        self.run_both(what, cmd).map(|(stdout, _)| stdout)
    }

    /// Like [`run`](Self::run), returning stdout and stderr.
    pub fn run_both(&self, what: &str, cmd: Cmd<'_>) -> Result<(String, String)> {
        let line = cmd.to_string();
        self.note(&format!("$ {line}"));
        let output = cmd
            .ignore_status()
            .quiet()
            .output()
            .with_context(|| format!("{what}: could not start `{line}`"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if let Some(f) = self.log.lock().unwrap().as_mut() {
            let _ = f.write_all(output.stdout.as_slice());
            let _ = f.write_all(output.stderr.as_slice());
        }
        if !output.status.success() {
            let program = line.split_whitespace().next().unwrap_or("command");
            bail!(
                "{what}: {program} {}\n  command: {line}\n{}",
                describe_status(&output.status),
                tail(&stderr, &stdout)
            );
        }
        Ok((stdout, stderr))
    }

    /// Runs `argv` inside `tree` (a chroot in its own mount and PID
    /// namespace, with /proc, /sys, /dev, a private /tmp and /run), with
    /// `work` bind-mounted at `/run/airlock`. A clean environment: only
    /// PATH, LANG and SOURCE_DATE_EPOCH pass in.
    pub fn in_tree<I, S>(&self, what: &str, tree: &Path, work: &Path, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.in_tree_both(what, tree, work, argv)
            .map(|(stdout, _)| stdout)
    }

    /// Like [`in_tree`](Self::in_tree), returning stdout and stderr.
    pub fn in_tree_both<I, S>(
        &self,
        what: &str,
        tree: &Path,
        work: &Path,
        argv: I,
    ) -> Result<(String, String)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let command = in_clean_env(argv);
        let sh = &self.sh;
        let cmd = cmd!(
            sh,
            "unshare --mount --fork --pid --mount-proc sh -euc {CHROOT_SCRIPT} airlock-chroot {tree} {work} {command...}"
        );
        self.run_both(what, cmd)
    }

    /// Like `in_tree` but without any mounts: a plain chroot, for tools that
    /// only touch files of the tree (setfiles, semodule), so nothing of the
    /// host's /dev or /proc can ever be written.
    pub fn in_tree_plain<I, S>(&self, what: &str, tree: &Path, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let command = in_clean_env(argv);
        let sh = &self.sh;
        self.run(what, cmd!(sh, "chroot {tree} {command...}"))
    }
}

/// `argv` prefixed with `env -i` and the only variables a chroot gets:
/// PATH, LANG and SOURCE_DATE_EPOCH.
fn in_clean_env<I, S>(argv: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command: Vec<OsString> = [
        "env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    command.push(format!("SOURCE_DATE_EPOCH={}", source_date_epoch()).into());
    command.extend(argv.into_iter().map(|a| a.as_ref().to_os_string()));
    command
}

/// Sets up the chroot's mounts inside a private mount namespace (they vanish
/// with the namespace, even if the command is killed). `$1` tree, `$2` work dir.
const CHROOT_SCRIPT: &str = r#"
tree=$1; work=$2; shift 2
mount --make-rprivate /
mount -t proc proc "$tree/proc"
mount -t sysfs sysfs "$tree/sys"
mount --rbind /dev "$tree/dev"
mount -t tmpfs tmpfs "$tree/tmp"
mount -t tmpfs tmpfs "$tree/run"
mkdir "$tree/run/airlock"
mount --bind "$work" "$tree/run/airlock"
exec chroot "$tree" "$@"
"#;

fn describe_status(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "failed".into(),
    }
}

/// The last lines of stderr (or stdout if stderr is empty), indented.
fn tail(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
    lines[start..]
        .iter()
        .map(|l| format!("  | {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// `SOURCE_DATE_EPOCH` if set (reproducible builds), else a fixed epoch, so
/// that the same inputs give the same image by default.
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_EPOCH)
}

/// 2025-01-01T00:00:00Z.
const DEFAULT_EPOCH: u64 = 1_735_689_600;

/// Finds `program` on PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_status_command_and_stderr_tail() {
        let runner = Runner::new(false).unwrap();
        let sh = runner.sh();
        let err = runner
            .run(
                "testing errors",
                cmd!(
                    sh,
                    "sh -c 'echo one >&2; echo E: Unable to locate package nope >&2; exit 3'"
                ),
            )
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("testing errors: sh exited 3"), "{err}");
        assert!(err.contains("E: Unable to locate package nope"), "{err}");
        assert!(err.contains("command: sh -c"), "{err}");
    }

    #[test]
    fn success_returns_stdout() {
        let runner = Runner::new(false).unwrap();
        let sh = runner.sh();
        assert_eq!(runner.run("echo", cmd!(sh, "echo hi")).unwrap(), "hi\n");
    }

    #[test]
    fn chroot_commands_get_a_clean_environment() {
        let command = in_clean_env(["semodule", "-n"]);
        let shown: Vec<String> = command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            &shown[..4],
            [
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8"
            ]
        );
        assert!(shown[4].starts_with("SOURCE_DATE_EPOCH="));
        assert_eq!(&shown[5..], ["semodule", "-n"]);
    }

    #[test]
    fn tail_keeps_last_lines_only() {
        let many: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let t = tail(&many, "");
        assert!(
            t.contains("line 39")
                && !t.contains("line 24\n")
                && t.lines().count() == STDERR_TAIL_LINES
        );
    }
}
