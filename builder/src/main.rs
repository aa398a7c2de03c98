use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = airlock::cli::Cli::parse();
    match airlock::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
