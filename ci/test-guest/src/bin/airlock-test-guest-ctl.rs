//! `airlock-test-guest-ctl SOCKET COMMAND...`: sends one command to a test
//! guest's test port (the unix socket QEMU makes for `org.airlock.test.0`)
//! and prints the reply. Installed in test images, where the acceptance
//! suite drives the appliance's nested test guests through its agent.
//!
//! `airlock-test-guest-ctl --qmp SOCKET JSON` runs one QMP command on a
//! guest's test-only QMP socket instead and prints QEMU's answer line.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use airlock_test_guest::client::{qmp_execute, Client};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let qmp = args.first().is_some_and(|a| a == "--qmp");
    if qmp {
        args.remove(0);
    }
    let Some((socket, command)) = args.split_first().filter(|(_, c)| !c.is_empty()) else {
        eprintln!("usage: airlock-test-guest-ctl [--qmp] SOCKET COMMAND...");
        return ExitCode::from(2);
    };
    let (socket, command) = (Path::new(socket), command.join(" "));
    let result = if qmp {
        qmp_execute(socket, &command, Duration::from_secs(30))
    } else {
        Client::connect(socket, Duration::from_secs(10))
            .and_then(|mut client| client.command(&command, Duration::from_secs(60)))
    };
    match result {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("airlock-test-guest-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}
