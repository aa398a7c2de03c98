//! Integration test (root, no QEMU): the network acceptance tests' outside
//! world on the CI host (`xtask::outside`). Its namespace holds the two
//! uplink taps and the listeners, nothing of it shows in the host's own
//! namespace, its listeners answer from inside it, and dropping it deletes
//! it; a namespace left by a dead process is removed by the next one.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use xtask::outside::{
    self, Outside, CLASSIFIED_SERVER, CLASSIFIED_UPLINK, GENERAL_UPLINK, INTERNET,
};

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(
        euid, "0",
        "this test makes a network namespace and taps: run it as root"
    );
}

fn host_links() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

fn ns_links(ns: &str) -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["-n", ns, "-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn outside_namespace_has_taps_and_listeners_and_goes_away() {
    require_root();
    // A stale namespace of a process that no longer exists (pid_max is at
    // most 2^22, so this pid cannot be alive).
    let stale = outside::namespace_name(4_194_305);
    assert!(Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap()
        .success());

    let o = Outside::create().unwrap();
    assert!(
        !Path::new(&format!("/run/netns/{stale}")).exists(),
        "the stale namespace was not removed"
    );
    assert_eq!(o.name(), outside::namespace_name(std::process::id()));
    assert!(o.path().exists());

    let links = ns_links(o.name());
    let host = host_links();
    for end in [CLASSIFIED_UPLINK, GENERAL_UPLINK] {
        assert!(links.contains(&format!(" {}:", end.tap)), "{links}");
        assert!(
            !host.contains(&format!(" {}:", end.tap)),
            "{} is in the host's namespace: {host}",
            end.tap
        );
    }

    let t = Duration::from_secs(2);
    let reply = o.tcp(SocketAddrV4::new(CLASSIFIED_SERVER, 443), t).unwrap();
    assert!(reply.starts_with("connected "), "{reply}");
    let reply = o.udp(SocketAddrV4::new(CLASSIFIED_SERVER, 123), t).unwrap();
    assert!(
        reply.starts_with("reply airlock-outside 10.20.0.10 port 123 peer "),
        "{reply}"
    );
    let reply = o.udp(SocketAddrV4::new(INTERNET, 53), t).unwrap();
    assert!(
        reply.starts_with("reply airlock-outside 198.51.100.20 port 53 peer "),
        "{reply}"
    );
    // A closed port answers (so a timeout in the suite means dropped).
    assert_eq!(
        o.tcp(SocketAddrV4::new(CLASSIFIED_SERVER, 22), t).unwrap(),
        "refused"
    );
    assert_eq!(o.udp(SocketAddrV4::new(INTERNET, 9), t).unwrap(), "refused");
    // No appliance behind the taps: its addresses do not answer.
    assert_eq!(
        o.tcp(
            SocketAddrV4::new(CLASSIFIED_UPLINK.appliance, 22),
            Duration::from_millis(500)
        )
        .unwrap(),
        "timeout"
    );
    // A little later the TCP listener has logged its answer too.
    std::thread::sleep(Duration::from_millis(200));
    let seen = o.seen();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("tcp airlock-outside 10.20.0.10 port 443 peer ")),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("udp ")).count(),
        2,
        "{seen:?}"
    );

    let path = o.path();
    drop(o);
    assert!(!path.exists(), "{} is still there", path.display());
}
