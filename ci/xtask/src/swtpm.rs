//! A software TPM 2.0 for a test machine: `swtpm` (the same emulator the
//! appliance gives its Windows guests), its state in a directory that plays
//! the PC's TPM chip (keep it for the same PC, a new one is a new PC).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running swtpm; stopped when dropped.
pub struct Swtpm {
    child: Child,
    /// The control socket QEMU's `tpm_socket` connects to.
    pub socket: PathBuf,
}

impl Swtpm {
    /// Starts swtpm on the state in `state` (made if missing), its control
    /// socket `state/swtpm.sock`.
    pub fn start(state: &Path) -> Result<Swtpm> {
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        let socket = state.join("swtpm.sock");
        let _ = std::fs::remove_file(&socket);
        let mut tpmstate = std::ffi::OsString::from("dir=");
        tpmstate.push(state);
        let mut ctrl = std::ffi::OsString::from("type=unixio,path=");
        ctrl.push(&socket);
        let mut log = std::ffi::OsString::from("file=");
        log.push(state.join("swtpm.log"));
        let mut child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "startup-clear", "--tpmstate"])
            .arg(tpmstate)
            .arg("--ctrl")
            .arg(ctrl)
            .arg("--log")
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting swtpm (Debian package swtpm, ci/install-host-deps.sh)")?;
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "swtpm exited at once ({status}); log: {}",
                    state.join("swtpm.log").display()
                );
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                bail!("swtpm made no socket {} in 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Swtpm { child, socket })
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
