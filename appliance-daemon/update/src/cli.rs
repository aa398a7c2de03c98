//! The command line (clap derive); `main.rs` only calls [`main`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::apply::{ApplyOptions, FailPoints};
use crate::config::{Config, DEFAULT_CONFIG};
use crate::refusal;
use crate::source::{HttpOptions, Source};

/// The airlock update agent: signed whole-image updates into the inactive A/B slot.
#[derive(Debug, Parser)]
#[command(name = "airlock-update", version, after_help = refusal::EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub paths: Overrides,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Settings from `/etc/airlock/update.toml`, overridable one by one.
#[derive(Debug, Args)]
pub struct Overrides {
    /// Configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// OpenSSH allowed_signers file of the trusted keys.
    #[arg(long, global = true, value_name = "FILE")]
    pub allowed_signers: Option<PathBuf>,
    /// Distinct trusted keys that must have signed.
    #[arg(long, global = true)]
    pub threshold: Option<usize>,
    /// The disk holding the slots (block device or disk image file).
    #[arg(long, global = true, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// The mounted ESP.
    #[arg(long, global = true, value_name = "DIR")]
    pub esp: Option<PathBuf>,
    /// Directory of state.json.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory for downloads and the staged UKI.
    #[arg(long, global = true, value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
    /// The running image's os-release.
    #[arg(long, global = true, value_name = "FILE")]
    pub os_release: Option<PathBuf>,
    /// The running kernel's command line.
    #[arg(long, global = true, value_name = "FILE")]
    pub cmdline: Option<PathBuf>,
    /// The supervisor's control socket.
    #[arg(long, global = true, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Boot tries of the entry `apply` installs (`+N`, 1 to 7).
    #[arg(long, global = true, value_name = "N")]
    pub tries: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Verify a bundle and write it to the inactive slot; ends with "reboot pending".
    Apply(ApplyArgs),
    /// Verify a bundle completely (signatures, running system, payload); write nothing.
    Check { bundle: PathBuf },
    /// The health gate of a new boot (run before boot-complete.target).
    Health,
    /// Slots, versions, booted and blessed entries, stored epoch, last result.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "source")]
pub struct SourceArgs {
    /// A bundle file (e.g. on a USB stick).
    #[arg(long, value_name = "FILE", group = "source")]
    pub file: Option<PathBuf>,
    /// The newest *.airlock in the drop directory (default: the configured one).
    #[arg(long, value_name = "DIR", num_args = 0..=1, group = "source")]
    pub drop_dir: Option<Option<PathBuf>>,
    /// An update stick: a whole disk (/dev/sdb) with a bundle written raw
    /// from its first byte (`airlock flash BUNDLE DISK`). A disk without
    /// one is left alone (exit 0).
    #[arg(long, value_name = "DISK", group = "source")]
    pub stick: Option<PathBuf>,
    /// An http(s) URL, downloaded to the staging directory with resume.
    #[arg(long, value_name = "URL", group = "source")]
    pub url: Option<String>,
    /// The update server of the appliance configuration (`[network.update]
    /// url`, usually a machine setting), as the periodic check runs it
    /// (airlock-update-fetch.timer). Nothing configured: nothing to do.
    #[arg(long, group = "source")]
    pub update_server: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// After writing, wait until both guests are off, then reboot.
    #[arg(long)]
    pub reboot_when_idle: bool,
    /// Seconds between download attempts.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub retry_delay: u64,
    /// With --update-server: the shipped appliance configuration.
    #[arg(long, value_name = "FILE", default_value = airlockd::config::SHIPPED_CONFIG)]
    pub appliance_config: PathBuf,
    /// With --update-server: the machine settings (skipped if missing).
    #[arg(long, value_name = "FILE", default_value = airlockd::config::PROVISION_CONFIG)]
    pub machine_settings: PathBuf,
    /// Test hook: stop the slot write after N payload bytes.
    #[arg(long, hide = true, value_name = "N")]
    pub fail_slot_write_after: Option<u64>,
    /// Test hook: stop before installing the UKI.
    #[arg(long, hide = true)]
    pub fail_before_uki: bool,
}

impl Overrides {
    pub fn config(&self) -> Result<Config> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let mut c = Config::load(&path, explicit)?;
        let set = |dst: &mut PathBuf, src: &Option<PathBuf>| {
            if let Some(v) = src {
                *dst = v.clone();
            }
        };
        set(&mut c.allowed_signers, &self.allowed_signers);
        set(&mut c.esp, &self.esp);
        set(&mut c.os_release, &self.os_release);
        set(&mut c.cmdline, &self.cmdline);
        set(&mut c.control_socket, &self.control_socket);
        if let Some(d) = &self.state_dir {
            c.state_dir = d.clone();
            if self.staging_dir.is_none() {
                c.staging_dir = d.join("staging");
            }
            // Tests point the state elsewhere: the screen's copy follows.
            c.screen_status = d.join("screen-status.json");
        }
        set(&mut c.staging_dir, &self.staging_dir);
        if let Some(t) = self.threshold {
            c.threshold = t;
        }
        if let Some(t) = self.tries {
            c.tries = t;
        }
        if self.disk.is_some() {
            c.disk = self.disk.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

fn log(line: String) {
    eprintln!("airlock-update: {line}");
}

/// Runs the command; returns the process exit code.
pub fn main(cli: Cli) -> u8 {
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let code = refusal::exit_code(&e);
            let refused = refusal::refused(&e).is_some();
            eprintln!(
                "airlock-update: {}: {e:#}",
                if refused { "refused" } else { "error" }
            );
            code
        }
    }
}

/// `[network.update] url` of the appliance configuration (the image's file
/// and the machine settings, validated as the supervisor reads them).
fn update_server(shipped: &Path, machine: &Path) -> Result<Option<String>> {
    let appliance = airlockd::config::load(shipped, Some(machine)).with_context(|| {
        format!(
            "reading the update server from {} and {}",
            shipped.display(),
            machine.display()
        )
    })?;
    Ok(appliance.network.and_then(|n| n.update).map(|u| u.url))
}

fn run(cli: Cli) -> Result<()> {
    let cfg = cli.paths.config()?;
    match cli.command {
        Cmd::Apply(a) => {
            let configured = if a.source.update_server {
                match update_server(&a.appliance_config, &a.machine_settings)? {
                    Some(url) => Some(url),
                    None => {
                        println!("no update server in the appliance configuration ([network.update] url in the machine settings); nothing to do");
                        return Ok(());
                    }
                }
            } else {
                None
            };
            let src = match (
                a.source.file,
                a.source.drop_dir,
                a.source.stick,
                a.source.url.or(configured),
            ) {
                (Some(f), ..) => Source::File(f),
                (_, Some(d), ..) => Source::DropDir(d.unwrap_or_else(|| cfg.drop_dir.clone())),
                (_, _, Some(s), _) => Source::Stick(s),
                (.., Some(u)) => Source::Url(u),
                _ => anyhow::bail!(
                    "no source given (--file, --drop-dir, --stick, --url or --update-server)"
                ),
            };
            if let Source::Stick(disk) = &src {
                // Every USB disk plugged in starts the agent (udev): one
                // that is not an update stick is none of its business.
                if !crate::source::is_update_stick(disk)? {
                    println!(
                        "{}: no update bundle on this disk; left alone",
                        disk.display()
                    );
                    return Ok(());
                }
                // Left in after its update: the version it carries runs
                // already (read unverified: it only decides to do nothing).
                if let Some(running) = crate::source::stick_runs_already(disk, &cfg.cmdline) {
                    println!(
                        "{}: carries {running}, which is running already; nothing to do",
                        disk.display()
                    );
                    return Ok(());
                }
            }
            let http = HttpOptions {
                retry_delay: Duration::from_secs(a.retry_delay),
                ..HttpOptions::default()
            };
            if let Source::Url(url) = &src {
                // The server's bundle header first: its version may run
                // already (a periodic check then downloads nothing), and an
                // untrusted bundle is refused before its payload.
                if let Some(why) = crate::apply::check_server(&cfg, url, &http, &mut log)? {
                    println!("{url}: {why}; nothing to do");
                    return Ok(());
                }
            }
            let opts = ApplyOptions {
                http,
                fail: FailPoints {
                    stop_slot_write_after: a.fail_slot_write_after,
                    stop_before_uki: a.fail_before_uki,
                },
            };
            let applied = crate::apply::apply(&cfg, &src, &opts, &mut log)?;
            println!(
                "{} installed in slot {} as {} (signed by {}): reboot pending",
                applied.version,
                applied.slot,
                applied.entry,
                applied.signers.join(", ")
            );
            if a.reboot_when_idle {
                crate::reboot::reboot_when_idle(
                    &cfg.control_socket,
                    &cfg.reboot_command,
                    &mut log,
                )?;
            }
            Ok(())
        }
        Cmd::Check { bundle } => {
            let m = crate::apply::verify_only(&cfg, &bundle)?;
            println!(
                "{}: valid bundle {} {} (epoch {}, {})",
                bundle.display(),
                m.name,
                m.version,
                m.security_epoch,
                m.compatible
            );
            Ok(())
        }
        Cmd::Health => {
            let checks = crate::health::standard_checks(&cfg);
            crate::health::run(&cfg, &checks, &mut log)?;
            println!("healthy");
            Ok(())
        }
        Cmd::Status { json } => {
            let r = crate::status::report(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", crate::status::render(&r));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_source_is_required() {
        assert!(Cli::try_parse_from(["airlock-update", "apply"]).is_err());
        assert!(Cli::try_parse_from([
            "airlock-update",
            "apply",
            "--file",
            "a",
            "--url",
            "http://x/a.airlock"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "airlock-update",
            "apply",
            "--stick",
            "/dev/sdb",
            "--file",
            "a"
        ])
        .is_err());
        let c = Cli::try_parse_from(["airlock-update", "apply", "--stick", "/dev/sdb"]).unwrap();
        assert!(matches!(
            c.command,
            Cmd::Apply(ApplyArgs {
                source: SourceArgs { stick: Some(_), .. },
                ..
            })
        ));
        let c = Cli::try_parse_from(["airlock-update", "apply", "--drop-dir"]).unwrap();
        assert!(matches!(
            c.command,
            Cmd::Apply(ApplyArgs {
                source: SourceArgs {
                    drop_dir: Some(None),
                    ..
                },
                ..
            })
        ));
        let c = Cli::try_parse_from(["airlock-update", "--esp", "/tmp/esp", "status", "--json"])
            .unwrap();
        assert!(matches!(c.command, Cmd::Status { json: true }));
        assert_eq!(
            c.paths.esp.as_deref(),
            Some(std::path::Path::new("/tmp/esp"))
        );
    }

    #[test]
    fn state_dir_override_moves_staging_along() {
        let c =
            Cli::try_parse_from(["airlock-update", "--config", "/nonexistent", "status"]).unwrap();
        assert!(
            c.paths.config().is_err(),
            "an explicit missing config file is an error"
        );
        let c = Cli::try_parse_from(["airlock-update", "--state-dir", "/tmp/s", "status"]).unwrap();
        let cfg = c.paths.config().unwrap();
        assert_eq!(cfg.staging_dir, PathBuf::from("/tmp/s/staging"));
        assert_eq!(
            cfg.screen_status,
            PathBuf::from("/tmp/s/screen-status.json")
        );
    }

    #[test]
    fn tries_can_be_overridden_within_bounds() {
        let c = Cli::try_parse_from([
            "airlock-update",
            "--config",
            "/dev/null",
            "--tries",
            "1",
            "status",
        ])
        .unwrap();
        assert_eq!(c.paths.config().unwrap().tries, 1);
        let c = Cli::try_parse_from([
            "airlock-update",
            "--config",
            "/dev/null",
            "--tries",
            "9",
            "status",
        ])
        .unwrap();
        assert!(c.paths.config().is_err(), "tries 9 must be refused");
    }
}
