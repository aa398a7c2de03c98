//! Integration test (QEMU, TCG, no root): the test guest boots from a Debian
//! kernel and our initramfs, answers on its port, runs the benchmark, and
//! powers the VM off on command (QEMU exits 0 by itself).

mod common;

use std::time::Duration;

use common::Guest;

#[test]
fn boots_answers_and_powers_off() {
    let mut guest = Guest::boot(|_| Vec::new());
    let mut client = guest.client();
    let bench = client
        .command("bench 2000000", Duration::from_secs(60))
        .unwrap();
    eprintln!("{bench}");
    assert!(
        bench.starts_with("bench iterations=2000000 elapsed_us="),
        "unexpected bench reply {bench:?}"
    );
    let reply = client.command("poweroff", Duration::from_secs(10)).unwrap();
    assert_eq!(reply, "ok powering off");
    let status = guest
        .wait_exit(Duration::from_secs(30))
        .expect("QEMU still runs 30 s after the guest's poweroff");
    assert!(status.success(), "QEMU ended with {status} after poweroff");
    let console = guest.console();
    assert!(console.contains("airlock-test-guest: alive"), "{console}");
}
