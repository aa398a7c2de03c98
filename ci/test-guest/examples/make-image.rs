//! Writes the test guest's boot files into a directory, for test images
//! (`/usr/lib/airlock/test-guest/` in the test profile) or by hand:
//! `cargo run -p airlock-test-guest --example make-image -- DIR`
//! → `DIR/vmlinuz` (copied from the kernel found, see `kernel.rs`) and
//! `DIR/initrd.cpio`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: make-image DIR");
        return ExitCode::from(2);
    };
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))
        .and_then(|()| {
            let img = airlock_test_guest::image::prepare(&dir)?;
            let vmlinuz = dir.join("vmlinuz");
            std::fs::copy(&img.kernel.vmlinuz, &vmlinuz)
                .map_err(|e| format!("copying {}: {e}", img.kernel.vmlinuz.display()))?;
            Ok(format!(
                "{} (kernel {} from {}; modules {:?}), {}",
                vmlinuz.display(),
                img.kernel.vmlinuz.display(),
                img.kernel.source,
                img.modules,
                img.initrd.display()
            ))
        });
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-image: {e}");
            ExitCode::FAILURE
        }
    }
}
