//! `airlock-sanitiser`: one item in on stdin, its sanitised form (or the
//! reason it was refused) out on stdout. Confines itself before reading.
use airlock_gateway::{ipc, sandbox, sanitise};
use clap::Parser;
use std::io::{Read, Write};

fn main() -> anyhow::Result<()> {
    let opts = airlock_gateway::cli::SanitiserOpts::parse();
    let limits = opts.limits();
    let max_in = limits.max_text_bytes.max(limits.max_image_bytes);
    // Locks taken before confinement, so nothing after it needs more than
    // read(0), write(1) and memory.
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    sandbox::confine()?;
    if opts.probe_forbidden_syscall {
        let _ = std::fs::File::open("/");
        anyhow::bail!("probe: open(2) was not blocked");
    }
    let (ty, data) = ipc::read_request(&mut stdin, max_in)?;
    let result = sanitise::sanitise(ty, &data, &limits);
    drop(data);
    ipc::write_reply(&mut stdout, &result)?;
    stdout.flush()?;
    // Stay until the gateway closes our stdin (it reads our peak memory
    // meanwhile); anything it sends is ignored.
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}
