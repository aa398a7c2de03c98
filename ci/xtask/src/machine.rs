//! A test machine: one disk image plus the state a real machine keeps across
//! power cycles — its UEFI variable store (boot entries, the boot loader's
//! boot counting) and its SMBIOS UUID (so the guest keeps its machine ID).
//! Each [`Machine::boot`] is a fresh QEMU on that same state.

use std::path::{Path, PathBuf};

use airlock::qemu::{
    detect_accel, prepare_firmware, prepare_secure_boot_firmware, Accel, Firmware, VmConfig,
};
use anyhow::{Context, Result};

use crate::vm::{qemu_binary, Vm};

/// A disk and its firmware state; see the module documentation.
#[derive(Debug, Clone)]
pub struct Machine {
    disk: PathBuf,
    firmware: Firmware,
    accel: Accel,
    uuid: String,
    /// The TPM's state directory, if the machine has a TPM.
    tpm: Option<PathBuf>,
}

impl Machine {
    /// A machine booting `disk`, with its UEFI variables in `vars`: copied
    /// from OVMF's template if `vars` does not exist, used as it is if it
    /// does (a later run continues where an earlier one left the firmware).
    pub fn new(disk: &Path, vars: &Path) -> Result<Machine> {
        Machine::with_firmware(disk, prepare_firmware(vars)?)
    }

    /// Like [`new`](Self::new), with Secure Boot on and the keys of
    /// `keys` (`airlock genkeys --secure-boot`) enrolled in a fresh `vars`.
    pub fn with_secure_boot(disk: &Path, vars: &Path, keys: &Path) -> Result<Machine> {
        Machine::with_firmware(disk, prepare_secure_boot_firmware(vars, keys)?)
    }

    fn with_firmware(disk: &Path, firmware: Firmware) -> Result<Machine> {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .context("generating the machine's SMBIOS UUID")?
            .trim()
            .to_owned();
        Ok(Machine {
            disk: disk.to_owned(),
            firmware,
            accel: detect_accel(&qemu_binary()),
            uuid,
            tpm: None,
        })
    }

    /// Gives the machine a TPM 2.0 (an swtpm started with each boot, see
    /// `Vm::start`) whose state lives in `state`: kept across boots like a
    /// PC's TPM chip; a new directory is a new PC.
    pub fn with_tpm(mut self, state: &Path) -> Machine {
        self.tpm = Some(state.to_path_buf());
        self
    }

    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The UEFI variable store every boot of this machine uses.
    pub fn vars(&self) -> &Path {
        &self.firmware.vars
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The configuration [`boot`](Self::boot) uses: persistent disk (no
    /// snapshot), this machine's firmware and UUID, `VmConfig::new`'s
    /// defaults otherwise. Adjust it and pass it to [`Vm::start`].
    pub fn config(&self) -> VmConfig {
        let mut cfg = VmConfig::new(self.disk.clone(), self.firmware.clone(), self.accel);
        cfg.uuid = Some(self.uuid.clone());
        cfg.tpm_socket = self.tpm.as_ref().map(|state| state.join("swtpm.sock"));
        cfg
    }

    /// Powers the machine on.
    pub fn boot(&self) -> Result<Vm> {
        Vm::start(self.config())
    }
}
