use clap::Parser;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(airlock_update::cli::main(airlock_update::cli::Cli::parse()))
}
