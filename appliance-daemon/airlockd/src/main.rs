//! `airlockd`: see `lib.rs` and `../README.md`.

use std::io::{BufRead, BufReader};
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
    /// Print the QEMU command line of one guest.
    Cmdline {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_parser = parse_side)]
        side: Side,
    },
    /// Print the supervisor's current status (one JSON line from the control socket).
    Status {
        #[arg(long, default_value = "/run/airlock/control.sock")]
        socket: PathBuf,
    },
}

fn parse_side(s: &str) -> Result<Side, String> {
    match s {
        "classified" => Ok(Side::Classified),
        "general" => Ok(Side::General),
        _ => Err(format!("{s:?}: expected classified or general")),
    }
}

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
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            Ok(())
        }
        Command::Cmdline { config, side } => {
            let cfg = config.load()?;
            let args = airlockd::qemu::command_line(cfg.guest(side), &cfg.supervisor)?;
            println!("{} {}", cfg.supervisor.qemu.display(), args.join(" "));
            Ok(())
        }
        Command::Status { socket } => {
            let stream = std::os::unix::net::UnixStream::connect(&socket).with_context(|| format!("connecting to {}", socket.display()))?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).context("reading the status")?;
            print!("{line}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from(["airlockd", "cmdline", "--side", "general", "--config", "/x.toml"]).unwrap();
        assert!(matches!(cli.command, Command::Cmdline { side: Side::General, .. }));
        assert!(Cli::try_parse_from(["airlockd", "cmdline", "--side", "secret"]).is_err());
        let cli = Cli::try_parse_from(["airlockd", "run"]).unwrap();
        match cli.command {
            Command::Run(a) => assert_eq!(a.config, PathBuf::from("/etc/airlock/appliance.toml")),
            other => panic!("{other:?}"),
        }
    }
}
