//! The reboot policy: `apply` never reboots; the new slot boots at the
//! next start, whenever that is. `apply --reboot-when-idle` waits for the
//! supervisor's `both_off` (both guests powered themselves off; the
//! supervisor powers the host off next) and then runs the reboot command,
//! so the appliance comes back on the new version instead of staying off.
//! Without a supervisor (no socket, or nobody listening) no guest runs and
//! the reboot happens at once. IT may instead schedule the reboot itself.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::control::{self, Connection};

/// Waits until no guest runs, then runs `command` (e.g. `systemctl reboot`).
pub fn reboot_when_idle(
    socket: &Path,
    command: &[String],
    log: &mut dyn FnMut(String),
) -> Result<()> {
    match control::connect(socket)? {
        Connection::NoSupervisor => log(format!(
            "no supervisor on {}: no guest runs",
            socket.display()
        )),
        Connection::Connected(s) => {
            log("reboot pending: waiting for both guests to power off".into());
            control::wait_for(s, None, &|s| s.both_off)
                .context("waiting for both guests to power off")?;
            log("both guests are off".into());
        }
    }
    let (program, args) = command
        .split_first()
        .context("the reboot command is empty")?;
    log(format!("rebooting: {}", command.join(" ")));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{} exited {status}", command.join(" "));
    }
    Ok(())
}
