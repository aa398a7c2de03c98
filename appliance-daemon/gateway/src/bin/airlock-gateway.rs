//! `airlock-gateway`: see the library documentation.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let opts = airlock_gateway::cli::GatewayOpts::parse();
    airlock_gateway::gateway::run(opts.into_config()?)
}
