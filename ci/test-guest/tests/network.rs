//! Integration test (QEMU, TCG, no root): two test guests on one virtual
//! wire (each a `-device virtio-net-pci` with a fixed MAC, as the appliance
//! gives its guests, joined by `-netdev dgram` over two unix sockets: no
//! root, no host interface, nothing leaves the test's directory). Both are
//! given static addresses with `net-up`, each the other's gateway; then the
//! network commands are checked both ways: TCP banner fetch (two-way data),
//! refused vs. dropped (a closed port answers RST; an address routed to the
//! peer, which does not forward, is silently dropped; an on-link address
//! nobody has is unreachable), ICMP echo, UDP round trip and log. One boot
//! pair.

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_test_guest::client::Client;
use airlock_test_guest::net::parse_udp_received;
use common::Guest;

const A: &str = "10.77.0.1";
const B: &str = "10.77.0.2";
const MAC_A: &str = "52:54:00:a1:00:01";
const MAC_B: &str = "52:54:00:a1:00:02";

/// QEMU arguments for a NIC with `mac` on the wire: datagrams from
/// `local`, to `remote` (the other guest's `local`).
fn nic(mac: &str, local: &Path, remote: &Path) -> Vec<OsString> {
    vec![
        "-netdev".into(),
        format!(
            "dgram,id=net0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            local.display(),
            remote.display()
        )
        .into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,mac={mac}").into(),
    ]
}

/// Sends `command`, logs it with the reply and how long it took.
fn run(client: &mut Client, who: &str, command: &str) -> String {
    let start = Instant::now();
    let reply = client.command(command, Duration::from_secs(30)).unwrap();
    eprintln!(
        "{who}: {command} → {reply} ({} ms)",
        start.elapsed().as_millis()
    );
    reply
}

#[test]
fn two_guests_talk_tcp_udp_icmp_and_see_refused_vs_dropped() {
    let wire = tempfile::tempdir().unwrap();
    let (sock_a, sock_b) = (wire.path().join("a.sock"), wire.path().join("b.sock"));
    let guest_a = Guest::boot(|_| nic(MAC_A, &sock_a, &sock_b));
    let guest_b = Guest::boot(|_| nic(MAC_B, &sock_b, &sock_a));
    let mut a = guest_a.client();
    let mut b = guest_b.client();

    // Addresses: static, each the other's gateway (the peer does not forward).
    assert_eq!(
        run(&mut a, "a", &format!("net-up {A}/24 {B}")),
        format!("ok net eth0 {MAC_A} {A}/24")
    );
    assert_eq!(
        run(&mut b, "b", &format!("net-up {B}/24 {A}")),
        format!("ok net eth0 {MAC_B} {B}/24")
    );
    let info = run(&mut a, "a", "net-info");
    for word in [
        format!("iface=eth0,{MAC_A},up,{A}/24"),
        "iface=lo,00:00:00:00:00:00,up,127.0.0.1/8".into(),
        format!("route=0.0.0.0/0,{B},eth0"),
        "route=10.77.0.0/24,direct,eth0".into(),
    ] {
        assert!(
            info.split_whitespace().any(|w| w == word),
            "{word} not in {info}"
        );
    }
    // A second net-up replaces the default route rather than failing.
    assert_eq!(
        run(&mut b, "b", &format!("net-up {B}/24 {A}")),
        format!("ok net eth0 {MAC_B} {B}/24")
    );
    let info = run(&mut b, "b", "net-info");
    assert_eq!(info.matches("route=0.0.0.0/0,").count(), 1, "{info}");

    // ICMP both ways (the first also resolves ARP).
    assert!(
        run(&mut a, "a", &format!("icmp-ping {B} 5000")).starts_with("reply "),
        "a pings b"
    );
    let reply = run(&mut b, "b", &format!("icmp-ping {A} 5000"));
    assert!(
        reply.starts_with("reply ") && reply.ends_with(&format!("from {A}")),
        "{reply}"
    );

    // TCP: a banner line each way proves data in both directions.
    assert_eq!(run(&mut b, "b", "tcp-listen 7000"), "ok listening 7000");
    assert_eq!(
        run(&mut b, "b", "tcp-listen 7000"),
        "ok listening 7000",
        "listening twice is fine"
    );
    assert_eq!(run(&mut a, "a", "tcp-listen 7000"), "ok listening 7000");
    let line = run(&mut a, "a", &format!("tcp-fetch {B} 7000 5000"));
    assert!(
        line.starts_with(&format!("line airlock-test-guest {B} port 7000 peer {A}:")),
        "{line}"
    );
    let line = run(&mut b, "b", &format!("tcp-fetch {A} 7000 5000"));
    assert!(
        line.starts_with(&format!("line airlock-test-guest {A} port 7000 peer {B}:")),
        "{line}"
    );
    let connected = run(&mut a, "a", &format!("tcp-connect {B} 7000 5000"));
    assert!(
        connected.starts_with(&format!("connected {A}:")),
        "{connected}"
    );

    // Rejected vs. dropped vs. unreachable.
    assert_eq!(
        run(&mut a, "a", &format!("tcp-connect {B} 7001 5000")),
        "refused",
        "closed port: RST"
    );
    assert_eq!(
        run(&mut a, "a", &format!("tcp-fetch {B} 7001 5000")),
        "refused"
    );
    let start = Instant::now();
    assert_eq!(
        run(&mut a, "a", "tcp-connect 10.99.0.1 80 2000"),
        "timeout",
        "routed to b, which drops it"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "the timeout was waited for"
    );
    assert_eq!(run(&mut a, "a", "tcp-fetch 10.99.0.1 80 1000"), "timeout");
    assert_eq!(run(&mut a, "a", "icmp-ping 10.99.0.1 1000"), "timeout");
    let unreachable = run(&mut a, "a", "tcp-connect 10.77.0.99 80 10000");
    assert!(
        unreachable.starts_with("error unreachable: "),
        "on-link, no ARP answer: {unreachable}"
    );

    // UDP: a request/answer round trip, a one-way datagram, the log.
    assert_eq!(run(&mut b, "b", "udp-listen 5353"), "ok listening udp 5353");
    assert_eq!(run(&mut a, "a", "udp-received"), "udp 0");
    let reply = run(
        &mut a,
        "a",
        &format!("udp-fetch {B} 5353 5000 what is airlock.test?"),
    );
    assert!(
        reply.starts_with(&format!(
            "reply {B}:5353 airlock-test-guest {B} port 5353 peer {A}:"
        )),
        "{reply}"
    );
    let sent = run(
        &mut a,
        "a",
        &format!("udp-send {B} 5353 one way  two spaces"),
    );
    assert!(
        sent.starts_with(&format!("ok sent 19 bytes from {A}:")),
        "{sent}"
    );
    let (total, datagrams) = parse_udp_received(&common::poll(
        &mut b,
        "udp-received",
        Duration::from_secs(5),
        |r| r.starts_with("udp 2"),
    ))
    .unwrap();
    assert_eq!(total, 2);
    let payloads: Vec<&[u8]> = datagrams.iter().map(|d| d.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        [&b"what is airlock.test?"[..], b"one way  two spaces"]
    );
    assert!(
        datagrams
            .iter()
            .all(|d| d.port == 5353 && d.source.ip().to_string() == A),
        "{datagrams:?}"
    );
    assert_eq!(
        run(&mut a, "a", &format!("udp-fetch {B} 5354 5000 anyone?")),
        "refused",
        "closed UDP port: ICMP port unreachable"
    );
    assert_eq!(
        run(&mut a, "a", "udp-fetch 10.99.0.1 53 1000 dropped?"),
        "timeout"
    );

    // Usage errors are errors.
    assert!(run(&mut a, "a", &format!("tcp-connect {B}")).starts_with("error usage: tcp-connect"));
    assert!(run(&mut a, "a", "net-up 10.77.0.1 10.77.0.2").starts_with("error "));
}
