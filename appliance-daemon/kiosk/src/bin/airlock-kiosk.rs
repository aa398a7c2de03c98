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
    /// The KMS device to drive, or a directory: the first device in it with
    /// a connected output.
    #[arg(long, default_value = "/dev/dri")]
    drm_device: PathBuf,
    /// Where keyboards and pointers appear.
    #[arg(long, default_value = "/dev/input")]
    input_dir: PathBuf,
    /// The machine settings written at provisioning (only looked at: absent,
    /// and no supervisor, means this PC is not provisioned).
    #[arg(long, default_value = airlock_kiosk::message::MACHINE_FILE)]
    machine_file: PathBuf,
    /// The image's os-release, for the info page (Ctrl + the switch key).
    #[arg(long, default_value = airlock_kiosk::info::OS_RELEASE)]
    os_release: PathBuf,
    /// The update agent's last result for the screen, for the info page.
    #[arg(long, default_value = airlock_kiosk::info::UPDATE_STATUS)]
    update_status: PathBuf,
    /// The host-owned key that switches guests: scrolllock, pause, f12,
    /// rightctrl or menu. It never reaches a guest.
    #[arg(long, default_value = "scrolllock")]
    switch_key: String,
    /// The clipboard gateway's confirm socket (present only when
    /// `[clipboard] confirm` is on).
    #[arg(long, default_value = "/run/airlock/clipboard/confirm.sock")]
    confirm_socket: PathBuf,
    /// The key that releases a pending clipboard transfer; the host's only
    /// while one waits.
    #[arg(long, default_value = "pause")]
    confirm_key: String,
    /// How long a pending transfer is shown: the gateway's
    /// `confirm_timeout_ms`, after which it rejects the transfer itself.
    #[arg(long, default_value_t = 30000)]
    confirm_timeout_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(switch_key) = airlock_kiosk::keys::parse_switch_key(&cli.switch_key) else {
        eprintln!("airlock-kiosk: --switch-key {:?} is not one of scrolllock, pause, f12, rightctrl, menu", cli.switch_key);
        return ExitCode::from(2);
    };
    let Some(confirm_key) =
        airlock_kiosk::keys::parse_switch_key(&cli.confirm_key).filter(|k| *k != switch_key)
    else {
        eprintln!(
            "airlock-kiosk: --confirm-key {:?} must be one of scrolllock, pause, f12, rightctrl, menu, and not the switch key",
            cli.confirm_key
        );
        return ExitCode::from(2);
    };
    let options = airlock_kiosk::Options {
        run_dir: cli.run_dir,
        drm_device: cli.drm_device,
        input_dir: cli.input_dir,
        machine_file: cli.machine_file,
        os_release: cli.os_release,
        update_status: cli.update_status,
        switch_key,
        switch_key_name: airlock_kiosk::keys::key_name(switch_key, &cli.switch_key),
        confirm: Some(airlock_kiosk::ConfirmOptions {
            socket: cli.confirm_socket,
            key: confirm_key,
            key_name: airlock_kiosk::keys::key_name(confirm_key, &cli.confirm_key),
            timeout: std::time::Duration::from_millis(cli.confirm_timeout_ms),
        }),
    };
    match airlock_kiosk::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-kiosk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
