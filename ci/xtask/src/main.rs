//! `cargo xtask`: airlock's acceptance suite and helpers. Parses the command
//! line and calls the `xtask` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "airlock's acceptance suite (boots built images in QEMU) and helpers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the images, boot them under QEMU, check what the appliance promises.
    Acceptance(xtask::acceptance::AcceptanceOptions),
    /// Benchmarks that print figures (`bench boot`).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Boot a disk image by hand (see --help).
    Boot(xtask::try_boot::BootOptions),
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Boot the test image several times and print boot-time medians.
    Boot(xtask::bench::BenchBootOptions),
    /// Unlock time of the sealed /var (empty passphrase vs TPM) and
    /// encrypted vs plain I/O throughput, in a booted test image.
    Sealed(xtask::bench::BenchSealedOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Acceptance(opts) => xtask::acceptance::run(opts).map(|ok| if ok { 0 } else { 1 }),
        Cmd::Bench(BenchCmd::Boot(opts)) => xtask::bench::boot(opts).map(|()| 0),
        Cmd::Bench(BenchCmd::Sealed(opts)) => xtask::bench::sealed(opts).map(|()| 0),
        Cmd::Boot(opts) => xtask::try_boot::boot(opts),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_takes_a_guest_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "xtask",
            "boot",
            "--disk",
            "a.raw",
            "--vga",
            "--",
            "systemctl",
            "is-system-running",
        ])
        .unwrap();
        let Cmd::Boot(opts) = cli.command else {
            panic!("not boot")
        };
        assert_eq!(opts.disk, std::path::PathBuf::from("a.raw"));
        assert!(opts.vga);
        assert_eq!(opts.timeout, 600);
        assert_eq!(opts.command, ["systemctl", "is-system-running"]);
    }

    #[test]
    fn boot_needs_a_disk() {
        assert!(Cli::try_parse_from(["xtask", "boot"]).is_err());
    }
}
