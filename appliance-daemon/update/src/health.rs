//! `airlock-update health`: the gate between a new boot and its blessing.
//! `airlock-update-health.service` runs it before `boot-complete.target`
//! (`RequiredBy=` that target): if it succeeds, the target is reached and
//! `systemd-bless-boot.service` marks the entry good; if it fails, the
//! target fails, the entry is not blessed, and after its tries systemd-boot
//! boots the previous slot. On success the stored security epoch is raised
//! to the running image's (Android's rule: only after the new image has
//! proven itself, so a failed update never locks out the old slot).
//!
//! The checks are values of [`Check`], so tests run them with fakes.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::control::{self, Connection};
use crate::refusal::Failure;
use crate::system::{self, LastResult};

/// One health check: `Ok` with a short note, or `Err` with the reason.
pub trait Check {
    fn name(&self) -> &str;
    fn run(&self) -> Result<String>;
}

/// `/sys/fs/selinux/enforce` reads `1`.
pub struct SelinuxEnforcing {
    pub enforce: PathBuf,
}

impl Check for SelinuxEnforcing {
    fn name(&self) -> &str {
        "selinux"
    }
    fn run(&self) -> Result<String> {
        let v = std::fs::read_to_string(&self.enforce)
            .with_context(|| format!("reading {} (is SELinux enabled?)", self.enforce.display()))?;
        match v.trim() {
            "1" => Ok("enforcing".into()),
            other => bail!(
                "SELinux is not enforcing ({} reads {other:?})",
                self.enforce.display()
            ),
        }
    }
}

/// Both guests run (the supervisor's `ready`), waiting up to `timeout`;
/// passes without a supervisor on an unprovisioned appliance.
pub struct GuestsRunning {
    pub socket: PathBuf,
    pub provision_marker: PathBuf,
    pub timeout: Duration,
}

impl Check for GuestsRunning {
    fn name(&self) -> &str {
        "guests"
    }
    fn run(&self) -> Result<String> {
        if !self.provision_marker.exists() {
            return Ok(format!(
                "unprovisioned ({} absent): no guest expected",
                self.provision_marker.display()
            ));
        }
        let deadline = std::time::Instant::now() + self.timeout;
        // The supervisor may not have created its socket yet: retry until the deadline.
        loop {
            match control::connect(&self.socket)? {
                Connection::Connected(s) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    control::wait_for(s, Some(left.max(Duration::from_millis(1))), &|s| s.ready)
                        .context("waiting for both guests to run")?;
                    return Ok("both guests running".into());
                }
                Connection::NoSupervisor if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_secs(1))
                }
                Connection::NoSupervisor => bail!(
                    "no supervisor on {} after {:?}",
                    self.socket.display(),
                    self.timeout
                ),
            }
        }
    }
}

/// A systemd unit is active (`systemctl is-active`).
pub struct UnitActive {
    pub systemctl: PathBuf,
    pub unit: String,
}

impl Check for UnitActive {
    fn name(&self) -> &str {
        "kiosk"
    }
    fn run(&self) -> Result<String> {
        let out = Command::new(&self.systemctl)
            .args(["is-active", &self.unit])
            .output()
            .with_context(|| format!("running {}", self.systemctl.display()))?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && state == "active" {
            Ok(format!("{} active", self.unit))
        } else {
            bail!(
                "{} is {}",
                self.unit,
                if state.is_empty() { "unknown" } else { &state }
            )
        }
    }
}

/// The units that bring bundles: the update stick's
/// (`airlock-update-stick@sdX.service`) and the update server's periodic
/// check (`airlock-update-fetch.service`).
const BUNDLE_SOURCE_UNITS: [&str; 2] = ["airlock-update-stick@", "airlock-update-fetch.service"];

/// No unit has failed (`systemctl list-units --state=failed`), but for the
/// units that bring bundles.
pub struct NoFailedUnits {
    pub systemctl: PathBuf,
}

/// The unit names of `systemctl list-units --plain --no-legend` output (pure).
pub fn failed_units(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().find(|t| *t != "●"))
        .map(str::to_owned)
        .collect()
}

impl Check for NoFailedUnits {
    fn name(&self) -> &str {
        "units"
    }
    fn run(&self) -> Result<String> {
        let out = Command::new(&self.systemctl)
            .args([
                "list-units",
                "--state=failed",
                "--plain",
                "--no-legend",
                "--no-pager",
            ])
            .output()
            .with_context(|| format!("running {}", self.systemctl.display()))?;
        if !out.status.success() {
            bail!(
                "systemctl list-units exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // A stick somebody plugged in and the agent refused, or an update
        // server that was down or offered a bundle the agent refused, says
        // nothing about the new slot (the result is in `status`, on IT's
        // info page and in the journal).
        let failed: Vec<String> = failed_units(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter(|u| !BUNDLE_SOURCE_UNITS.iter().any(|p| u.starts_with(p)))
            .collect();
        if failed.is_empty() {
            Ok("no failed unit".into())
        } else {
            bail!("failed units: {}", failed.join(", "))
        }
    }
}

/// The checks of a real boot, from the configuration.
pub fn standard_checks(cfg: &Config) -> Vec<Box<dyn Check>> {
    let h = &cfg.health;
    vec![
        Box::new(SelinuxEnforcing {
            enforce: h.selinux_enforce.clone(),
        }),
        Box::new(GuestsRunning {
            socket: cfg.control_socket.clone(),
            provision_marker: h.provision_marker.clone(),
            timeout: Duration::from_secs(h.guests_timeout_secs),
        }),
        Box::new(UnitActive {
            systemctl: h.systemctl.clone(),
            unit: h.kiosk_unit.clone(),
        }),
        Box::new(NoFailedUnits {
            systemctl: h.systemctl.clone(),
        }),
    ]
}

/// Runs every check (all of them, so the log names every problem); on
/// success raises the stored epoch to the running image's. Records the
/// outcome in the state file either way.
pub fn run(cfg: &Config, checks: &[Box<dyn Check>], log: &mut dyn FnMut(String)) -> Result<()> {
    let mut problems = Vec::new();
    for c in checks {
        match c.run() {
            Ok(note) => log(format!("health {}: ok, {note}", c.name())),
            Err(e) => {
                log(format!("health {}: FAILED, {e:#}", c.name()));
                problems.push(format!("{}: {e:#}", c.name()));
            }
        }
    }
    let state_file = cfg.state_file();
    if !problems.is_empty() {
        let msg = problems.join("; ");
        if let Err(e) =
            system::record_outcome(cfg, LastResult::now("health", "unhealthy", msg.clone()))
        {
            log(format!("warning: recording the result: {e:#}"));
        }
        return Err(Failure::Unhealthy(msg).into());
    }
    let image = system::load_os_release(&cfg.os_release)?;
    let mut state = system::load_state(&state_file)?;
    let raised = image.security_epoch > state.security_epoch;
    if raised {
        log(format!(
            "security epoch raised from {} to {}",
            state.security_epoch, image.security_epoch
        ));
        state.security_epoch = image.security_epoch;
    }
    let last = LastResult::now(
        "health",
        "healthy",
        format!("{} {} passed the health gate", image.name, image.version),
    );
    state.last = Some(last.clone());
    system::store_state(&state_file, &state)?;
    // The screen's copy is for IT's eyes: not having it is no reason to
    // fall back to the previous version.
    if let Err(e) = system::publish_last(&cfg.screen_status, &last) {
        log(format!("warning: {e:#}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static str, bool);
    impl Check for Fake {
        fn name(&self) -> &str {
            self.0
        }
        fn run(&self) -> Result<String> {
            if self.1 {
                Ok("fine".into())
            } else {
                bail!("broken")
            }
        }
    }

    fn cfg(dir: &std::path::Path, epoch: u32) -> Config {
        let os = dir.join("os-release");
        std::fs::write(&os, format!("IMAGE_ID=airlock\nIMAGE_VERSION=1.1\nAIRLOCK_COMPATIBLE=c\nAIRLOCK_SECURITY_EPOCH={epoch}\n")).unwrap();
        Config {
            os_release: os,
            state_dir: dir.join("state"),
            screen_status: dir.join("status/update.json"),
            ..Config::default()
        }
    }

    #[test]
    fn success_raises_the_epoch_and_failure_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 5);
        let bad: Vec<Box<dyn Check>> = vec![
            Box::new(Fake("a", true)),
            Box::new(Fake("b", false)),
            Box::new(Fake("c", false)),
        ];
        let e = run(&c, &bad, &mut |_| {}).unwrap_err();
        assert_eq!(crate::refusal::exit_code(&e), 40);
        assert!(e.to_string().contains("b: broken; c: broken"), "{e}");
        let s = system::load_state(&c.state_file()).unwrap();
        assert_eq!(
            (s.security_epoch, s.last.unwrap().result.as_str()),
            (0, "unhealthy")
        );

        let good: Vec<Box<dyn Check>> = vec![Box::new(Fake("a", true))];
        run(&c, &good, &mut |_| {}).unwrap();
        let s = system::load_state(&c.state_file()).unwrap();
        assert_eq!(
            (s.security_epoch, s.last.unwrap().result.as_str()),
            (5, "healthy")
        );
        // The screen's copy: the same result, readable by every user.
        let shown: LastResult =
            serde_json::from_slice(&std::fs::read(&c.screen_status).unwrap()).unwrap();
        assert_eq!(
            (shown.action.as_str(), shown.result.as_str()),
            ("health", "healthy")
        );
        assert_eq!(shown.message, "airlock 1.1 passed the health gate");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&c.screen_status)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
    }

    #[test]
    fn the_epoch_is_never_lowered() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 2);
        system::store_state(
            &c.state_file(),
            &system::State {
                security_epoch: 7,
                last: None,
            },
        )
        .unwrap();
        run(&c, &[], &mut |_| {}).unwrap();
        assert_eq!(
            system::load_state(&c.state_file()).unwrap().security_epoch,
            7
        );
    }

    #[test]
    fn selinux_check_reads_the_enforce_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("enforce");
        let c = SelinuxEnforcing { enforce: f.clone() };
        assert!(c.run().is_err());
        std::fs::write(&f, "0").unwrap();
        assert!(c.run().unwrap_err().to_string().contains("not enforcing"));
        std::fs::write(&f, "1").unwrap();
        assert_eq!(c.run().unwrap(), "enforcing");
    }

    #[test]
    fn guests_check_passes_unprovisioned_and_follows_the_supervisor() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let marker = dir.path().join("appliance.toml");
        let c = GuestsRunning {
            socket: socket.clone(),
            provision_marker: marker.clone(),
            timeout: Duration::from_secs(5),
        };
        assert!(c.run().unwrap().contains("unprovisioned"));
        std::fs::write(&marker, "").unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            writeln!(
                s,
                r#"{{"event":"status","phase":"running","ready":false,"both_off":false}}"#
            )
            .unwrap();
            writeln!(
                s,
                r#"{{"event":"status","phase":"running","ready":true,"both_off":false}}"#
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        assert_eq!(c.run().unwrap(), "both guests running");
        server.join().unwrap();
        let short = GuestsRunning {
            timeout: Duration::from_millis(1500),
            ..c
        };
        assert!(
            short.run().is_err(),
            "no supervisor listening must fail the gate"
        );
    }

    /// A stand-in for systemctl: prints `out` and exits `code`.
    fn fake_systemctl(dir: &std::path::Path, out: &str, code: i32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("systemctl-{code}-{}", out.len()));
        std::fs::write(&p, format!("#!/bin/sh\nprintf '%s' '{out}'\nexit {code}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn unit_checks_read_systemctl() {
        let dir = tempfile::tempdir().unwrap();
        let kiosk = |out, code| UnitActive {
            systemctl: fake_systemctl(dir.path(), out, code),
            unit: "airlock-kiosk.service".into(),
        };
        assert_eq!(
            kiosk("active\n", 0).run().unwrap(),
            "airlock-kiosk.service active"
        );
        assert!(kiosk("activating\n", 3)
            .run()
            .unwrap_err()
            .to_string()
            .contains("is activating"));
        assert!(kiosk("failed\n", 3).run().is_err());
        let units = |out, code| NoFailedUnits {
            systemctl: fake_systemctl(dir.path(), out, code),
        };
        assert!(units("", 0).run().is_ok());
        assert!(units("x.service loaded failed failed X\n", 0)
            .run()
            .unwrap_err()
            .to_string()
            .contains("failed units: x.service"));
        assert!(
            units("", 1).run().is_err(),
            "a systemctl that fails must fail the gate"
        );
        assert!(
            units(
                "airlock-update-stick@sda.service loaded failed failed X\n",
                0
            )
            .run()
            .is_ok(),
            "a refused stick is not the slot's failure"
        );
        assert!(units("airlock-update-stick@sda.service loaded failed failed X\nx.service loaded failed failed X\n", 0).run().is_err());
        assert!(
            units("airlock-update-fetch.service loaded failed failed X\n", 0)
                .run()
                .is_ok(),
            "an update server that was down is not the slot's failure"
        );
        assert!(
            units("airlock-update-fetch.timer loaded failed failed X\n", 0)
                .run()
                .is_err()
        );
    }

    #[test]
    fn failed_units_are_named() {
        assert_eq!(
            failed_units(
                "foo.service loaded failed failed Foo\n● bar.mount loaded failed failed Bar\n"
            ),
            ["foo.service", "bar.mount"]
        );
        assert!(failed_units("").is_empty());
    }
}
