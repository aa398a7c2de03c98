//! `airlock-test-guest-ctl SOCKET COMMAND...`: sends one command to a test
//! guest's test port (the unix socket QEMU makes for `org.airlock.test.0`)
//! and prints the reply. Installed in test images, where the acceptance
//! suite drives the appliance's nested test guests through its agent.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use airlock_test_guest::client::Client;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((socket, command)) = args.split_first().filter(|(_, c)| !c.is_empty()) else {
        eprintln!("usage: airlock-test-guest-ctl SOCKET COMMAND...");
        return ExitCode::from(2);
    };
    let result = Client::connect(Path::new(socket), Duration::from_secs(10))
        .and_then(|mut client| client.command(&command.join(" "), Duration::from_secs(60)));
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
