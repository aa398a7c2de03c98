//! `cargo xtask boot`: boots a disk image the way the acceptance suite does,
//! optionally waits for a console message and runs one command through the
//! test agent, then switches the VM off. For trying the harness by hand.

use std::path::PathBuf;
use std::time::Duration;

use airlock::qemu::Graphics;
use anyhow::{Context, Result};

use crate::{Machine, Vm};

/// Boot a disk image under QEMU as the acceptance suite does.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BootOptions {
    /// Raw disk image to boot. Writes go to it (no snapshot).
    #[arg(long)]
    pub disk: PathBuf,
    /// UEFI variable store to use and keep, created from OVMF's template if
    /// missing. Default: a fresh copy, discarded afterwards.
    #[arg(long)]
    pub vars: Option<PathBuf>,
    /// Give the VM a TPM 2.0: an swtpm with its state in this directory
    /// (kept; the same directory is the same TPM next time).
    #[arg(long, value_name = "DIR")]
    pub tpm: Option<PathBuf>,
    /// Give the VM a standard VGA card (needed for screendumps).
    #[arg(long)]
    pub vga: bool,
    /// Wait for this text on the serial console.
    #[arg(long, value_name = "TEXT")]
    pub wait_serial: Option<String>,
    /// Seconds to wait for the console text, for the agent, and for the command.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub timeout: u64,
    /// Command to run in the guest through the test agent (test images only).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs `cargo xtask boot`; returns the guest command's exit code (0 without one).
pub fn boot(opts: &BootOptions) -> Result<i32> {
    let timeout = Duration::from_secs(opts.timeout);
    let scratch = tempfile::tempdir().context("creating a scratch dir")?;
    let vars = opts
        .vars
        .clone()
        .unwrap_or_else(|| scratch.path().join("OVMF_VARS.fd"));
    let mut machine = Machine::new(&opts.disk, &vars)?;
    if let Some(state) = &opts.tpm {
        machine = machine.with_tpm(&std::path::absolute(state)?);
    }
    let mut cfg = machine.config();
    if opts.vga {
        cfg.graphics = Graphics::Std;
    }
    let mut vm = Vm::start(cfg)?;
    eprintln!(
        "xtask boot: QEMU pid {} ({:?}), files in {}",
        vm.pid(),
        machine.accel(),
        vm.dir().display()
    );
    if let Some(text) = &opts.wait_serial {
        vm.wait_for_serial(text, timeout)?;
        eprintln!("xtask boot: saw {text:?} on the serial console");
    }
    let mut code = 0;
    if !opts.command.is_empty() {
        let agent = vm.agent()?;
        let boot_id = agent
            .wait_ready(timeout)
            .context("waiting for the test agent")?;
        eprintln!("xtask boot: test agent ready, boot id {boot_id}");
        let argv: Vec<&str> = opts.command.iter().map(String::as_str).collect();
        let out = agent
            .run(&argv, timeout)
            .context("running the command in the guest")?;
        print!("{}", out.stdout);
        eprint!("{}", out.stderr);
        eprintln!(
            "xtask boot: exit code {:?}, signal {:?}, {} ms",
            out.exit_code, out.signal, out.duration_ms
        );
        code = out.exit_code.unwrap_or(1);
    }
    vm.qmp()?.quit()?;
    vm.wait_exit(Duration::from_secs(10))?;
    Ok(code)
}
