//! Prints the ruleset or the topology for a `[network]` configuration file,
//! until `airlockd net render` exists. The file holds either the `[network]`
//! table's body or a whole appliance configuration with a `[network]` table.
//!
//! `cargo run -p airlock-network --example airlock-net-render -- ruleset|topology FILE`

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, path) = match args.as_slice() {
        [w, p] if w == "ruleset" || w == "topology" => (w.as_str(), p.as_str()),
        _ => {
            eprintln!("usage: airlock-net-render ruleset|topology FILE");
            return ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("airlock-net-render: reading {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parsed = if text
        .lines()
        .any(|l| l.trim() == "[network]" || l.trim_start().starts_with("[network."))
    {
        airlock_network::NetworkConfig::from_appliance_toml(&text)
    } else {
        airlock_network::NetworkConfig::from_toml(&text)
    };
    let cfg = match parsed {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock-net-render: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match what {
        "ruleset" => print!("{}", airlock_network::render(&cfg)),
        _ => print!("{}", airlock_network::render_topology_script(&cfg)),
    }
    ExitCode::SUCCESS
}
