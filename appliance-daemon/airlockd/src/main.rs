//! `airlockd`: see `lib.rs` and `../README.md`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use airlockd::config::{self, Side};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// The airlock guest supervisor.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from.
#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// Shipped configuration.
    #[arg(long, default_value = config::SHIPPED_CONFIG)]
    config: PathBuf,
    /// Machine-specific overrides (skipped if missing).
    #[arg(long, default_value = config::PROVISION_CONFIG)]
    provision: PathBuf,
}

impl ConfigArgs {
    fn load(&self) -> Result<config::Config> {
        Ok(config::load(&self.config, Some(&self.provision))?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start both guests and supervise them until the host powers off.
    Run(ConfigArgs),
    /// Validate the configuration and print it resolved, as JSON.
    Check(ConfigArgs),
    /// Print the QEMU command line of one guest, or the clipboard gateway's.
    Cmdline {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_parser = parse_side, required_unless_present = "gateway", conflicts_with = "gateway")]
        side: Option<Side>,
        /// The clipboard gateway's command line instead.
        #[arg(long)]
        gateway: bool,
    },
    /// The host network (`[network]`): print the nftables ruleset or the topology steps.
    Net {
        #[command(subcommand)]
        what: NetCommand,
    },
    /// Set the host name from `machine.hostname` (at boot; nothing without it).
    Hostname(ConfigArgs),
    /// Print the supervisor's current status (one JSON line from the control socket).
    Status {
        #[arg(long, default_value = "/run/airlock/control.sock")]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NetCommand {
    /// The nftables ruleset (`nft -f` input).
    Render(ConfigArgs),
    /// The topology steps (bridges, taps, routing) as a shell script, for review.
    Topology(ConfigArgs),
    /// Load the ruleset, then set up the topology (at boot, before the guests).
    Apply(ConfigArgs),
}

fn parse_side(s: &str) -> Result<Side, String> {
    match s {
        "classified" => Ok(Side::Classified),
        "general" => Ok(Side::General),
        _ => Err(format!("{s:?}: expected classified or general")),
    }
}

/// How long `net apply` waits for the uplink NICs to appear (udev names them).
const UPLINK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn main() {
    // Before any thread exists, so every thread inherits the mask.
    airlockd::signals::block();
    if let Err(e) = real_main(Cli::parse()) {
        airlockd::log::error(format!("{e:#}"));
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => airlockd::supervisor::run(args.load()?),
        Command::Check(args) => {
            let cfg = args.load()?;
            out(&format!("{}\n", serde_json::to_string_pretty(&cfg)?))
        }
        Command::Cmdline {
            config,
            side,
            gateway,
        } => {
            let cfg = config.load()?;
            match side {
                Some(side) if !gateway => {
                    let args = airlockd::qemu::command_line(cfg.guest(side), &cfg.supervisor)?;
                    out(&format!(
                        "{} {}\n",
                        cfg.supervisor.qemu.display(),
                        args.join(" ")
                    ))
                }
                _ => {
                    let args = airlockd::gateway::command_line(
                        &cfg,
                        airlockd::gateway::lookup_confirm_group(&cfg),
                    );
                    out(&format!(
                        "{} {}\n",
                        cfg.supervisor.gateway.display(),
                        args.join(" ")
                    ))
                }
            }
        }
        Command::Net {
            what: NetCommand::Apply(args),
        } => {
            let cfg = args.load()?;
            let net = cfg
                .network
                .as_ref()
                .with_context(|| format!("{} has no [network] section", args.config.display()))?;
            let mut uplinks = vec![
                net.uplink(airlock_network::Side::Classified)
                    .interface
                    .as_str(),
                net.uplink(airlock_network::Side::General)
                    .interface
                    .as_str(),
            ];
            uplinks.dedup();
            airlockd::netapply::wait_for_interfaces(
                std::path::Path::new("/sys/class/net"),
                &uplinks,
                UPLINK_TIMEOUT,
            )?;
            let n = airlockd::netapply::run_plan(&airlock_network::boot_plan(net))?;
            airlockd::log::info(format!("network set up ({n} steps)"));
            Ok(())
        }
        Command::Hostname(args) => {
            let cfg = args.load()?;
            match &cfg.machine.hostname {
                None => airlockd::log::info("no machine.hostname: the image's host name stays"),
                Some(name) => {
                    // SAFETY: a valid pointer and its length; the kernel copies it.
                    #[allow(unsafe_code)]
                    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("setting the host name to {name:?}"));
                    }
                    airlockd::log::info(format!("host name set to {name:?} (machine.hostname)"));
                }
            }
            Ok(())
        }
        Command::Net { what } => {
            let (args, ruleset) = match &what {
                NetCommand::Render(a) => (a, true),
                NetCommand::Topology(a) => (a, false),
                NetCommand::Apply(_) => unreachable!("handled above"),
            };
            let cfg = args.load()?;
            let net = cfg
                .network
                .as_ref()
                .with_context(|| format!("{} has no [network] section", args.config.display()))?;
            let text = if ruleset {
                airlock_network::render(net)
            } else {
                airlock_network::render_topology_script(net)
            };
            out(&text)
        }
        Command::Status { socket } => {
            let stream = std::os::unix::net::UnixStream::connect(&socket)
                .with_context(|| format!("connecting to {}", socket.display()))?;
            let mut line = String::new();
            BufReader::new(stream)
                .read_line(&mut line)
                .context("reading the status")?;
            out(&line)
        }
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn out(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "airlockd", "cmdline", "--side", "general", "--config", "/x.toml",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Cmdline {
                side: Some(Side::General),
                gateway: false,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["airlockd", "cmdline", "--side", "secret"]).is_err());
        assert!(
            Cli::try_parse_from(["airlockd", "cmdline"]).is_err(),
            "a side or --gateway"
        );
        assert!(
            Cli::try_parse_from(["airlockd", "cmdline", "--side", "general", "--gateway"]).is_err()
        );
        let cli = Cli::try_parse_from(["airlockd", "cmdline", "--gateway"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cmdline {
                side: None,
                gateway: true,
                ..
            }
        ));
        let cli =
            Cli::try_parse_from(["airlockd", "net", "render", "--config", "/a.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Net {
                what: NetCommand::Render(_)
            }
        ));
        let cli = Cli::try_parse_from(["airlockd", "run"]).unwrap();
        match cli.command {
            Command::Run(a) => assert_eq!(a.config, PathBuf::from("/etc/airlock/appliance.toml")),
            other => panic!("{other:?}"),
        }
    }
}
