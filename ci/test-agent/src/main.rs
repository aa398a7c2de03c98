//! `airlock-test-agent [DEVICE]`: serves the acceptance suite's requests on
//! the virtio-serial port DEVICE (default `/dev/virtio-ports/org.airlock.test.0`)
//! until the guest shuts down. Test-profile images only.

use std::path::PathBuf;
use std::process::ExitCode;

use airlock_test_agent::serve;

fn main() -> ExitCode {
    let device = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| serve::DEFAULT_DEVICE.into());
    match serve::run_forever(&device) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-test-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
