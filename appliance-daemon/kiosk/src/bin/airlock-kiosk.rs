//! `airlock-kiosk`: see the crate documentation for what it does and the
//! run-time contract.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The appliance's screen: one guest at a time under a host-drawn label.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The supervisor's run directory (`<side>/display.sock`, `control.sock`).
    #[arg(long, default_value = "/run/airlock")]
    run_dir: PathBuf,
    /// The KMS device to drive.
    #[arg(long, default_value = "/dev/dri/card0")]
    drm_device: PathBuf,
    /// Where keyboards and pointers appear.
    #[arg(long, default_value = "/dev/input")]
    input_dir: PathBuf,
    /// The host-owned key that switches guests: scrolllock, pause, f12,
    /// rightctrl or menu. It never reaches a guest.
    #[arg(long, default_value = "scrolllock")]
    switch_key: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(switch_key) = airlock_kiosk::keys::parse_switch_key(&cli.switch_key) else {
        eprintln!("airlock-kiosk: --switch-key {:?} is not one of scrolllock, pause, f12, rightctrl, menu", cli.switch_key);
        return ExitCode::from(2);
    };
    let switch_key_name = match switch_key {
        airlock_kiosk::keys::KEY_SCROLLLOCK => "Scroll Lock".to_owned(),
        _ => cli.switch_key.clone(),
    };
    let options = airlock_kiosk::Options {
        run_dir: cli.run_dir,
        drm_device: cli.drm_device,
        input_dir: cli.input_dir,
        switch_key,
        switch_key_name,
    };
    match airlock_kiosk::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-kiosk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
