//! The host network in the booted test image (P7–P10, anti-spoofing), with
//! real packets from the two nested test guests on their real QEMU NICs.
//!
//! The appliance has one physical uplink per side (the test profile's
//! per-side uplinks): the outer QEMU's two virtio NICs `upclassified` and
//! `upgeneral`, whose far end is the suite's outside world on the CI host
//! ([`crate::outside`]: a network namespace with each uplink's gateway, the
//! classified server and an "internet" host, each with small TCP and UDP
//! listeners that answer one line naming the peer they saw). The addresses
//! below are the test profile's (ci/test-agent/overlay/etc/airlock/
//! appliance.toml) and the outside's.
//!
//! Every forbidden path must time out (dropped). A closed port that the
//! packet did reach answers `refused` (RST, or ICMP port unreachable for
//! UDP), an open one `connected`/a line: so a `timeout` shows the ruleset at
//! work, not a missing listener, and the allowed probes show the guests'
//! network works at all. The internet host sees the general uplink's
//! address (NAT), the classified server the PC's WireGuard tunnel address:
//! classified traffic leaves only through the tunnel (P15), whose far end
//! is in the outside world too and counts what reaches the server plain.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::boot::sh;
use super::supervisor::guest;
use super::Suite;
use crate::outside::{self, Outside, CLASSIFIED_UPLINK, GENERAL_UPLINK};
use crate::Vm;

pub const TESTS: &[&str] = &[
    "network: airlock-network.service set up the host network before the supervisor (bridges, taps, forwarding)",
    "network: the loaded nftables ruleset is exactly `airlockd net render` of the configuration",
    "network: each QEMU holds its own side's tap, in its side's domain",
    "network: classified reaches its allowed server port and nothing else (P9)",
    "network: general reaches the internet and not the classified server (P10)",
    "network: no path between the guests, either way, TCP, UDP or ICMP (P8)",
    "network: neither guest reaches a port on the host (P7)",
    "network: from the uplinks' side nothing reaches the host or a guest (P7)",
    "network: a guest sending from a spoofed address or MAC gets nothing through",
    "network: no AVC denial from the network set-up or the guests' taps",
    "network: classified traffic leaves only through the WireGuard tunnel, keyed with the key airlock flash placed (P15)",
];

const CLASSIFIED_IP: &str = "10.10.1.2";
const CLASSIFIED_HOST: &str = "10.10.1.1";
const CLASSIFIED_MAC: &str = "52:54:00:a1:00:02";
const GENERAL_IP: &str = "10.10.2.2";
const GENERAL_HOST: &str = "10.10.2.1";
const GENERAL_MAC: &str = "52:54:00:b2:00:02";
/// The appliance's uplink NICs, as the test profile's `.link` files name them.
const UPLINKS: [(&str, outside::UplinkEnd); 2] = [
    ("upclassified", CLASSIFIED_UPLINK),
    ("upgeneral", GENERAL_UPLINK),
];
/// Allow-listed for the classified guest: tcp 443 and udp 123. It also
/// listens on tcp 8080, udp 443 and udp 8080.
const SERVER: &str = "10.20.0.10";
/// The internet host; listens on tcp 80 and 443, udp 53 and 123.
const INTERNET: &str = "198.51.100.20";
/// How long a probe waits for an answer before it calls the path dropped.
const PROBE_MS: u32 = 3000;
/// A port the guests listen on (TCP and UDP) for each other and the outside.
const GUEST_PORT: u16 = 7000;

fn side_values(side: &str) -> (&'static str, &'static str, &'static str) {
    if side == "classified" {
        (CLASSIFIED_IP, CLASSIFIED_HOST, CLASSIFIED_MAC)
    } else {
        (GENERAL_IP, GENERAL_HOST, GENERAL_MAC)
    }
}

/// The address the side's traffic is NATed to: the general uplink's, and
/// for classified the PC's tunnel address (its traffic leaves only through
/// the tunnel).
fn nat_ip(side: &str) -> Ipv4Addr {
    if side == "classified" {
        outside::TUNNEL_APPLIANCE
    } else {
        GENERAL_UPLINK.appliance
    }
}

/// `net-up` with the side's configured address (or `ip` instead).
fn net_up(vm: &mut Vm, side: &str, ip: Option<&str>) -> Result<String> {
    let (addr, host, mac) = side_values(side);
    let addr = ip.unwrap_or(addr);
    let reply = guest(vm, side, &format!("net-up {addr}/24 {host}"))?;
    ensure!(
        reply.starts_with("ok net "),
        "{side}: net-up {addr}/24 {host}: {reply}"
    );
    ensure!(
        reply.contains(mac),
        "{side}: the guest's NIC does not carry the configured MAC {mac}: {reply}"
    );
    Ok(reply)
}

/// `net-mac`: the guest's NIC sends from `mac` from now on.
fn net_mac(vm: &mut Vm, side: &str, mac: &str) -> Result<()> {
    let reply = guest(vm, side, &format!("net-mac {mac}"))?;
    ensure!(
        reply.starts_with("ok mac ") && reply.ends_with(mac),
        "{side}: net-mac {mac}: {reply}"
    );
    Ok(())
}

/// What a server line (`airlock-outside <ip> port <port> peer <ip:port>`,
/// after `line ` or `reply <to> `) says: the server's address, port, and
/// the peer address it saw.
pub fn server_line(reply: &str) -> Option<(Ipv4Addr, u16, Ipv4Addr)> {
    let rest = &reply[reply.find("airlock-outside ")? + "airlock-outside ".len()..];
    let w: Vec<&str> = rest.split_whitespace().collect();
    match w.as_slice() {
        [ip, "port", port, "peer", peer, ..] => Some((
            ip.parse().ok()?,
            port.parse().ok()?,
            peer.parse::<SocketAddrV4>().ok()?.ip().to_owned(),
        )),
        _ => None,
    }
}

/// A probe that must get through, by `tcp-fetch` or `udp-fetch`: answered
/// by that server and port, which saw the side's NAT address ([`nat_ip`]),
/// never the guest's.
fn must_fetch(vm: &mut Vm, side: &str, proto: &str, ip: &str, port: u16) -> Result<String> {
    let probe = match proto {
        "tcp" => format!("tcp-fetch {ip} {port} {PROBE_MS}"),
        _ => format!("udp-fetch {ip} {port} {PROBE_MS} airlock-{side}-probe"),
    };
    let reply = guest(vm, side, &probe)?;
    let Some((server, server_port, peer)) = server_line(&reply) else {
        bail!("{side} → {ip}:{port} {proto} should get through; got {reply:?}")
    };
    ensure!(
        server.to_string() == ip && server_port == port,
        "{side} → {ip}:{port} {proto}: answered by {server}:{server_port}: {reply:?}"
    );
    let nat = nat_ip(side);
    ensure!(peer == nat, "{side} → {ip}:{port} {proto}: the server saw {peer}, not the {side} side's NAT address {nat}: {reply:?}");
    Ok(format!("{side}→{ip}:{port} {proto} ok (server saw {peer})"))
}

/// A probe that must be dropped: no answer at all (not refused: a refusal
/// would mean the packet reached the target).
fn must_drop(vm: &mut Vm, side: &str, probe: &str) -> Result<String> {
    let reply = guest(vm, side, probe)?;
    let dropped = reply == "timeout" || reply.starts_with("error unreachable");
    ensure!(
        dropped,
        "{side}: `{probe}` should be dropped, got {reply:?}"
    );
    Ok(format!("{side}: {probe} → {reply}"))
}

fn tcp(ip: &str, port: u16) -> String {
    format!("tcp-connect {ip} {port} {PROBE_MS}")
}

fn udp(ip: &str, port: u16) -> String {
    format!("udp-fetch {ip} {port} {PROBE_MS} airlock-probe")
}

fn ping(ip: &str) -> String {
    format!("icmp-ping {ip} {PROBE_MS}")
}

/// The guest's `udp-received` total (datagrams its listeners got since boot).
fn udp_total(vm: &mut Vm, side: &str) -> Result<u64> {
    let reply = guest(vm, side, "udp-received")?;
    let (total, _) =
        airlock_test_guest::net::parse_udp_received(&reply).map_err(anyhow::Error::msg)?;
    Ok(total)
}

/// Of [`super::boot::listening_sockets`]' lines, those that are not the
/// kernel WireGuard's sockets (UDP, IPv4 and IPv6, any address, the test
/// image's tunnel port), and those that are. The classified tunnel must
/// listen there; a probe of that port would prove nothing (WireGuard
/// answers nothing but a valid handshake), and the input chain admits it
/// from the peer's address and port only (the loaded ruleset is the
/// rendered one, and the render is host-tested).
pub fn split_tunnel_sockets(found: Vec<String>) -> (Vec<String>, Vec<String>) {
    let port = format!(":{:04X} state 07", outside::TUNNEL_PORT);
    found.into_iter().partition(|l| {
        let tunnel = (l.starts_with("udp local ") || l.starts_with("udp6 local "))
            && l.ends_with(&port)
            && l.split_whitespace().nth(2).is_some_and(|a| {
                a.split(':')
                    .next()
                    .is_some_and(|ip| ip.bytes().all(|b| b == b'0'))
            });
        !tunnel
    })
}

/// The lines of `ss -H -l -n -t -u -w` (netid, state, queues, local,
/// peer) other than the tunnel's UDP sockets on any address.
fn ss_without_tunnel(ss: &str) -> Vec<&str> {
    let port = format!(":{}", outside::TUNNEL_PORT);
    ss.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let tunnel = f.len() >= 5
                && f[0] == "udp"
                && ["0.0.0.0", "[::]", "*"]
                    .iter()
                    .any(|any| f[4] == format!("{any}{port}"));
            !tunnel
        })
        .collect()
}

fn check_setup(vm: &mut Vm) -> Result<String> {
    let state = sh(
        vm,
        "systemctl show -p ActiveState -p Result -p ExecMainStatus airlock-network.service",
    )?;
    ensure!(
        state.contains("ActiveState=active") && state.contains("Result=success"),
        "airlock-network.service: {state}"
    );
    // It finished before the supervisor started.
    let times = sh(vm, "systemctl show -p ExecMainExitTimestampMonotonic --value airlock-network.service; systemctl show -p ExecMainStartTimestampMonotonic --value airlockd.service")?;
    let t: Vec<u64> = times
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(
        t.len() == 2 && t[0] > 0 && t[0] <= t[1],
        "airlock-network ended at {:?} µs, airlockd started at {:?} µs",
        t.first(),
        t.get(1)
    );
    let forward = sh(vm, "cat /proc/sys/net/ipv4/ip_forward")?;
    ensure!(forward.trim() == "1", "ip_forward is {}", forward.trim());
    let mut lines = Vec::new();
    for side in ["classified", "general"] {
        let master = sh(
            vm,
            &format!("basename $(readlink /sys/class/net/tap-{side}/master)"),
        )?;
        ensure!(
            master.trim() == format!("br-{side}"),
            "tap-{side} is on {}",
            master.trim()
        );
        let owner = sh(
            vm,
            &format!("cat /sys/class/net/tap-{side}/owner; id -u airlock-{side}"),
        )?;
        let o: Vec<&str> = owner.split_whitespace().collect();
        ensure!(
            o.len() == 2 && o[0] == o[1],
            "tap-{side} is owned by uid {:?}, airlock-{side} is {:?}",
            o.first(),
            o.get(1)
        );
        let ports = sh(vm, &format!("ls /sys/class/net/br-{side}/brif"))?;
        ensure!(
            ports
                .split_whitespace()
                .eq([format!("tap-{side}").as_str()]),
            "br-{side} ports: {}",
            ports.trim()
        );
        lines.push(format!("tap-{side} (uid {}) alone on br-{side}", o[0]));
    }
    // One physical NIC per side: the outer QEMU's virtio NICs, named by MAC.
    for (name, end) in UPLINKS {
        let info = sh(vm, &format!("cat /sys/class/net/{name}/address; basename $(readlink /sys/class/net/{name}/device/driver); ip -4 -o address show dev {name} | awk '{{print $4}}'; cat /sys/class/net/{name}/operstate"))?;
        let f: Vec<&str> = info.split_whitespace().collect();
        let want = [
            end.mac.to_string(),
            "virtio_net".into(),
            format!("{}/24", end.appliance),
            "up".into(),
        ];
        ensure!(f == want, "uplink {name}: {f:?}, expected {want:?}");
        lines.push(format!("{name} {} {} {} up", f[0], f[1], f[2]));
    }
    let journal = sh(
        vm,
        "journalctl -b -u airlock-network -o cat --no-pager | tail -n 1",
    )?;
    Ok(format!(
        "{}; ip_forward=1; network done {}µs before the supervisor started; {}",
        lines.join(", "),
        t[1] - t[0],
        journal.trim()
    ))
}

fn check_ruleset(vm: &mut Vm) -> Result<String> {
    // nft's own listing of the loaded ruleset, against the same listing of
    // the rendered text loaded in a throwaway namespace; stateless (-s), so
    // counters and limits' state do not count.
    let script = "set -e
airlockd net render > /tmp/airlock-render.nft
sha256sum < /tmp/airlock-render.nft | cut -d' ' -f1
nft -s list ruleset | sha256sum | cut -d' ' -f1
ip netns add airlock-render-check
trap 'ip netns delete airlock-render-check' EXIT
ip netns exec airlock-render-check nft -f /tmp/airlock-render.nft
ip netns exec airlock-render-check nft -s list ruleset | sha256sum | cut -d' ' -f1";
    let out = sh(vm, script)?;
    let h: Vec<&str> = out.split_whitespace().collect();
    ensure!(h.len() == 3, "unexpected output: {out}");
    if h[1] != h[2] {
        let diff = sh(vm, "ip netns add airlock-render-diff; ip netns exec airlock-render-diff nft -f /tmp/airlock-render.nft; ip netns exec airlock-render-diff nft -s list ruleset > /tmp/rendered.list; ip netns delete airlock-render-diff; nft -s list ruleset | diff /tmp/rendered.list - | head -30; true")?;
        bail!("the loaded ruleset (nft -s list sha256 {}) differs from the rendered one ({}):\n{diff}", h[1], h[2]);
    }
    let tables = sh(vm, "nft list tables")?;
    let uplinks = sh(vm, "airlockd net render | grep '^# Uplinks'")?;
    Ok(format!(
        "render sha256 {}; loaded = rendered listing sha256 {}; tables: {}; {}",
        h[0],
        h[1],
        tables.split_whitespace().collect::<Vec<_>>().join(" "),
        uplinks.trim().trim_start_matches("# ")
    ))
}

fn check_taps(vm: &mut Vm) -> Result<String> {
    let mut lines = Vec::new();
    for side in ["classified", "general"] {
        let other = if side == "classified" {
            "general"
        } else {
            "classified"
        };
        let pid = super::supervisor::qemu_pid(vm, side)?;
        let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
        ensure!(
            context.contains(&format!(":airlock_vm_{side}_t:")),
            "{side} QEMU (pid {pid}) runs as {context:?}"
        );
        // Every tun fd of the process and the interface it is attached to.
        let fds = sh(vm, &format!("for f in /proc/{pid}/fdinfo/*; do i=$(sed -n 's/^iff:[[:space:]]*//p' $f); [ -n \"$i\" ] && echo \"$(basename $f) $i $(readlink /proc/{pid}/fd/$(basename $f))\"; done; true"))?;
        let taps: Vec<&str> = fds
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        ensure!(!taps.is_empty(), "{side} QEMU (pid {pid}) holds no tap");
        ensure!(
            taps.iter().all(|t| *t == format!("tap-{side}")),
            "{side} QEMU holds {taps:?}"
        );
        ensure!(
            !fds.contains(&format!("tap-{other}")),
            "{side} QEMU holds the other side's tap: {fds}"
        );
        lines.push(format!(
            "{side}: pid {pid} {} holds {}",
            context.trim(),
            fds.trim().replace('\n', "; ")
        ));
    }
    Ok(lines.join("\n"))
}

fn check_classified(vm: &mut Vm) -> Result<String> {
    let mut seen = vec![
        must_fetch(vm, "classified", "tcp", SERVER, 443)?,
        must_fetch(vm, "classified", "udp", SERVER, 123)?,
    ];
    let c_gw = CLASSIFIED_UPLINK.gateway.to_string();
    let g_gw = GENERAL_UPLINK.gateway.to_string();
    for probe in [
        tcp(SERVER, 8080),
        tcp(SERVER, 22),
        udp(SERVER, 443),
        udp(SERVER, 8080),
        ping(SERVER),
        tcp(INTERNET, 443),
        tcp(INTERNET, 80),
        udp(INTERNET, 53),
        udp(INTERNET, 123),
        ping(INTERNET),
        tcp(&c_gw, 443),
        udp(&c_gw, 53),
        tcp(&g_gw, 443),
    ] {
        seen.push(must_drop(vm, "classified", &probe)?);
    }
    // The allowed ports still work after all that (nothing was rate-limited away).
    must_fetch(vm, "classified", "tcp", SERVER, 443)?;
    must_fetch(vm, "classified", "udp", SERVER, 123)?;
    Ok(seen.join("\n"))
}

fn check_general(vm: &mut Vm, outside: &Outside) -> Result<String> {
    let mut seen = Vec::new();
    for (proto, port) in [("tcp", 80), ("tcp", 443), ("udp", 53), ("udp", 123)] {
        seen.push(must_fetch(vm, "general", proto, INTERNET, port)?);
    }
    let reply = guest(vm, "general", &ping(INTERNET))?;
    ensure!(
        reply.starts_with("reply"),
        "general → {INTERNET} icmp: {reply}"
    );
    seen.push(format!("general: ping {INTERNET} → {reply}"));
    let c_gw = CLASSIFIED_UPLINK.gateway.to_string();
    let g_gw = GENERAL_UPLINK.gateway.to_string();
    for probe in [
        tcp(SERVER, 443),
        tcp(SERVER, 8080),
        udp(SERVER, 123),
        udp(SERVER, 443),
        ping(SERVER),
        tcp(&g_gw, 443),
        udp(&g_gw, 53),
        tcp(&c_gw, 443),
    ] {
        seen.push(must_drop(vm, "general", &probe)?);
    }
    // What the outside's listeners saw so far (P9 and P10 probes): the
    // classified server only ever the tunnel address; nothing un-NATed.
    let lines = outside.seen();
    let mut by_peer = std::collections::BTreeMap::<String, usize>::new();
    for line in &lines {
        let (server, port, peer) =
            server_line(line).with_context(|| format!("outside listener line {line:?}"))?;
        ensure!(
            peer == outside::TUNNEL_APPLIANCE || peer == GENERAL_UPLINK.appliance,
            "the outside saw {peer} (not the tunnel or the general uplink address): {line}"
        );
        if server.to_string() == SERVER {
            ensure!(
                peer == outside::TUNNEL_APPLIANCE,
                "the classified server was reached from {peer}: {line}"
            );
        }
        *by_peer
            .entry(format!("{} {server}:{port} from {peer}", &line[..3]))
            .or_default() += 1;
    }
    seen.push(format!(
        "outside listeners answered {} times: {}",
        lines.len(),
        by_peer
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(seen.join("\n"))
}

fn check_between_guests(vm: &mut Vm) -> Result<String> {
    let mut seen = Vec::new();
    for side in ["classified", "general"] {
        let reply = guest(vm, side, &format!("tcp-listen {GUEST_PORT}"))?;
        ensure!(
            reply.starts_with("ok listening"),
            "{side}: tcp-listen: {reply}"
        );
        let reply = guest(vm, side, &format!("udp-listen {GUEST_PORT}"))?;
        ensure!(
            reply.starts_with("ok listening"),
            "{side}: udp-listen: {reply}"
        );
    }
    let before = (udp_total(vm, "classified")?, udp_total(vm, "general")?);
    for (from, to) in [("classified", GENERAL_IP), ("general", CLASSIFIED_IP)] {
        seen.push(must_drop(vm, from, &tcp(to, GUEST_PORT))?);
        seen.push(must_drop(vm, from, &tcp(to, 1))?);
        seen.push(must_drop(vm, from, &udp(to, GUEST_PORT))?);
        seen.push(must_drop(vm, from, &udp(to, 1))?);
        seen.push(must_drop(vm, from, &ping(to))?);
    }
    let after = (udp_total(vm, "classified")?, udp_total(vm, "general")?);
    ensure!(before == after, "the guests' UDP listeners received datagrams: (classified, general) {before:?} → {after:?}");
    seen.push(format!("UDP datagrams received by the guests since boot (classified, general): {after:?}, unchanged"));
    Ok(seen.join("\n"))
}

fn check_host(vm: &mut Vm) -> Result<String> {
    let mut seen = Vec::new();
    // Closed ports on the host: a packet that got in would be answered with
    // a RST or an ICMP port unreachable (`refused`); dropped, it gets nothing.
    let c_up = CLASSIFIED_UPLINK.appliance.to_string();
    let g_up = GENERAL_UPLINK.appliance.to_string();
    for side in ["classified", "general"] {
        for ip in [CLASSIFIED_HOST, GENERAL_HOST, &c_up, &g_up] {
            seen.push(must_drop(vm, side, &tcp(ip, 22))?);
        }
        let (_, host, _) = side_values(side);
        seen.push(must_drop(vm, side, &tcp(host, 53))?);
        for port in [53, 67, 123] {
            seen.push(must_drop(vm, side, &udp(host, port))?);
        }
        seen.push(must_drop(vm, side, &ping(host))?);
    }
    // Nothing listens but the kernel's WireGuard socket on the tunnel port.
    let listening = sh(
        vm,
        "for f in tcp udp raw; do echo \"# $f\"; cat /proc/net/$f; done",
    )?;
    let (found, _) = split_tunnel_sockets(super::boot::listening_sockets(&listening));
    ensure!(found.is_empty(), "the host listens: {found:?}");
    let ss = sh(vm, "ss -H -l -n -t -u -w")?;
    let others = ss_without_tunnel(&ss);
    ensure!(others.is_empty(), "`ss -lntuw` on the host lists:\n{ss}");
    seen.push(format!(
        "nothing listens in the host's namespace but the kernel's WireGuard on udp {} (`ss -H -lntuw`: {:?}; /proc/net/{{tcp,udp,raw}})",
        outside::TUNNEL_PORT,
        ss.trim()
    ));
    Ok(seen.join("\n"))
}

/// From the outside namespace, as a hostile upstream that routes the guest
/// segments back to the appliance: the uplink addresses and the guests'
/// listening ports must time out.
fn check_from_outside(vm: &mut Vm, outside: &Outside) -> Result<String> {
    let timeout = Duration::from_millis(u64::from(PROBE_MS));
    let mut seen = Vec::new();
    let before = (udp_total(vm, "classified")?, udp_total(vm, "general")?);
    let mut targets: Vec<(Ipv4Addr, u16)> = Vec::new();
    for (_, end) in UPLINKS {
        targets.extend([22, 53, 123].map(|p| (end.appliance, p)));
    }
    for guest_ip in [CLASSIFIED_IP, GENERAL_IP] {
        targets.push((guest_ip.parse()?, GUEST_PORT));
    }
    for (ip, port) in targets {
        let to = SocketAddrV4::new(ip, port);
        for (proto, reply) in [
            ("tcp", outside.tcp(to, timeout)?),
            ("udp", outside.udp(to, timeout)?),
        ] {
            ensure!(
                reply == "timeout",
                "outside → {to} {proto} should be dropped, got {reply:?}"
            );
            seen.push(format!(
                "outside ({}) → {to} {proto} → {reply}",
                outside.name()
            ));
        }
    }
    let after = (udp_total(vm, "classified")?, udp_total(vm, "general")?);
    ensure!(before == after, "the guests' UDP listeners received datagrams from outside: (classified, general) {before:?} → {after:?}");
    let counter = sh(
        vm,
        "nft list chain inet airlock forward | grep 'default drop'",
    )?;
    seen.push(format!(
        "the guests' UDP totals unchanged {after:?}; forward chain: {}",
        counter.trim()
    ));
    Ok(seen.join("\n"))
}

fn check_spoofing(vm: &mut Vm) -> Result<String> {
    let mut seen = Vec::new();
    // A spoofed source address, from the guest's own MAC.
    for (side, spoofed, target, proto, port) in [
        ("classified", "10.10.1.3", SERVER, "tcp", 443),
        ("general", "10.10.2.3", INTERNET, "tcp", 80),
    ] {
        net_up(vm, side, Some(spoofed))?;
        let outcome = (|| -> Result<()> {
            seen.push(must_drop(
                vm,
                side,
                &format!("tcp-fetch {target} {port} {PROBE_MS}"),
            )?);
            let udp_port = if side == "classified" { 123 } else { 53 };
            seen.push(must_drop(vm, side, &udp(target, udp_port))?);
            seen.push(must_drop(vm, side, &ping(target))?);
            Ok(())
        })();
        // Back to its own address: the same probe gets through again.
        net_up(vm, side, None)?;
        outcome.with_context(|| format!("{side} guest as {spoofed}"))?;
        seen.push(format!(
            "{side} back on its own address: {}",
            must_fetch(vm, side, proto, target, port)?
        ));
    }
    // Its own address from another MAC (the virtio NIC takes a new MAC live).
    for (side, fake_mac, target, udp_port) in [
        ("classified", "52:54:00:a1:00:99", SERVER, 123),
        ("general", "52:54:00:b2:00:99", INTERNET, 53),
    ] {
        let (_, _, own_mac) = side_values(side);
        net_mac(vm, side, fake_mac)?;
        let outcome = (|| -> Result<()> {
            let tcp_port = if side == "classified" { 443 } else { 80 };
            seen.push(format!(
                "{side} as {fake_mac}: {}",
                must_drop(
                    vm,
                    side,
                    &format!("tcp-fetch {target} {tcp_port} {PROBE_MS}")
                )?
            ));
            seen.push(format!(
                "{side} as {fake_mac}: {}",
                must_drop(vm, side, &udp(target, udp_port))?
            ));
            Ok(())
        })();
        net_mac(vm, side, own_mac)?;
        outcome.with_context(|| format!("{side} guest with MAC {fake_mac}"))?;
        seen.push(format!(
            "{side} back on its own MAC: {}",
            must_fetch(vm, side, "udp", target, udp_port)?
        ));
    }
    let counters = sh(
        vm,
        "nft list chain bridge airlock_l2 input | grep 'spoofed or not IPv4'",
    )?;
    seen.push(format!("bridge drop rule: {}", counters.trim()));
    Ok(seen.join("\n"))
}

fn check_avcs(vm: &mut Vm) -> Result<String> {
    let denials = sh(vm, "journalctl -b -o cat --no-pager | grep 'avc:  denied' | grep -E 'airlock_network_t|tun_socket|udev' || true")?;
    let count = denials.lines().count();
    ensure!(
        count == 0,
        "{count} AVC denials:\n{}",
        denials.lines().take(15).collect::<Vec<_>>().join("\n")
    );
    let label = sh(vm, "stat -c %C /usr/lib/airlock/airlock-network")?;
    ensure!(
        label.contains(":airlock_network_exec_t:"),
        "/usr/lib/airlock/airlock-network is labelled {}",
        label.trim()
    );
    let logged = sh(vm, "journalctl -b -u airlock-network -o verbose --no-pager | sed -n 's/^ *_SELINUX_CONTEXT=//p' | sort -u | tr '\\n' ' '")?;
    Ok(format!("0 denials for airlock_network_t, a tun socket or udev (the uplinks' renaming) this boot; the unit's program is {} (its log lines' sender contexts: {})", label.trim(), logged.trim()))
}

/// P15: the classified guest's allowed fetch reaches the server out of the
/// tunnel, from the PC's tunnel address, and not one packet for the server
/// came plain by the classified uplink; the tunnel's far end has a
/// handshake with the appliance's key (the one flash placed), by the
/// classified uplink; on the appliance, the key is the provisioned file
/// with its own label, and the tunnel device carries the machine file's
/// address.
fn check_tunnel(vm: &mut Vm, outside: &Outside) -> Result<String> {
    let fetched = must_fetch(vm, "classified", "tcp", SERVER, 443)?;
    let fetched_udp = must_fetch(vm, "classified", "udp", SERVER, 123)?;
    let packets = outside.server_packets()?;
    ensure!(
        packets.plain == 0,
        "{} packets for the classified server came plain by the classified uplink: {packets:?}",
        packets.plain
    );
    ensure!(
        packets.tunnelled > 0 && packets.tunnel_outer > 0,
        "nothing came through the tunnel: {packets:?}"
    );
    let (peer_key, endpoint, handshake, rx, tx) = outside.tunnel_peer()?;
    ensure!(
        peer_key == outside.appliance_public(),
        "the tunnel's peer is {peer_key}, not the key given to airlock flash ({})",
        outside.appliance_public()
    );
    ensure!(
        handshake > 0 && rx > 0 && tx > 0,
        "no handshake or no traffic with the appliance: handshake {handshake}, rx {rx}, tx {tx}"
    );
    let from_uplink = endpoint.starts_with(&format!("{}:", CLASSIFIED_UPLINK.appliance));
    ensure!(
        from_uplink,
        "the tunnel's packets came from {endpoint}, not the classified uplink {}",
        CLASSIFIED_UPLINK.appliance
    );
    let device = sh(vm, "ip -4 -o address show dev wg-classified | awk '{print $4}'; cat /sys/class/net/wg-classified/operstate")?;
    ensure!(
        device.split_whitespace().next()
            == Some(&format!("{}/24", outside::TUNNEL_APPLIANCE) as &str),
        "wg-classified: {device:?}"
    );
    let key = sh(
        vm,
        "stat -c '%U:%G %a %C' /var/lib/airlock/provision/wg-classified.key",
    )?;
    ensure!(
        key.starts_with("root:root 600 ") && key.contains(":airlock_wg_key_t:"),
        "the tunnel key on the appliance: {key:?}"
    );
    // Root in another domain (the test agent's, otherwise unconfined)
    // cannot read it: only the network set-up can.
    let read = sh(vm, "cat /var/lib/airlock/provision/wg-classified.key >/dev/null 2>&1 && echo read || echo refused")?;
    ensure!(
        read.trim() == "refused",
        "root in the test agent's domain read the tunnel key"
    );
    Ok(format!(
        "{fetched}; {fetched_udp}; outside counted {} packets for the server out of the tunnel, {} plain by the uplink, {} WireGuard packets by the uplink; far end: peer = the flashed key's public half {}, endpoint {endpoint}, handshake at {handshake}, rx {rx} B, tx {tx} B; appliance: wg-classified {}, key {} (root in the test agent's domain: read refused)",
        packets.tunnelled,
        packets.plain,
        packets.tunnel_outer,
        &peer_key[..12],
        device.split_whitespace().collect::<Vec<_>>().join(" "),
        key.trim()
    ))
}

pub fn network_checks(suite: &mut Suite, vm: &mut Vm, outside: &Outside) {
    if !suite.wants_any(TESTS) {
        return;
    }
    suite.test(TESTS[0], || check_setup(vm));
    suite.test(TESTS[1], || check_ruleset(vm));
    suite.test(TESTS[2], || check_taps(vm));
    // Both guests on their configured addresses first.
    let up = ["classified", "general"]
        .iter()
        .map(|side| net_up(vm, side, None))
        .collect::<Result<Vec<_>>>();
    let probes: Vec<&str> = TESTS[3..9].iter().chain(&TESTS[10..]).copied().collect();
    match up {
        Err(e) => suite.fail_all(&probes, &e.context("net-up in the test guests")),
        Ok(_) => {
            suite.test(TESTS[3], || check_classified(vm));
            suite.test(TESTS[4], || check_general(vm, outside));
            // Also makes the guests listen on GUEST_PORT (TCP and UDP), which
            // the outside's probes aim at.
            suite.prerequisite(TESTS[5], || check_between_guests(vm));
            suite.test(TESTS[6], || check_host(vm));
            suite.test(TESTS[7], || check_from_outside(vm, outside));
            suite.test(TESTS[8], || check_spoofing(vm));
            suite.test(TESTS[10], || check_tunnel(vm, outside));
        }
    }
    suite.test(TESTS[9], || check_avcs(vm));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_of_the_tunnel_are_set_apart() {
        let ss = "udp   UNCONN 0      0      0.0.0.0:51820 0.0.0.0:*\nudp   UNCONN 0      0         [::]:51820    [::]:*\nudp   UNCONN 0      0    127.0.0.1:51820 0.0.0.0:*\ntcp   LISTEN 0      4096   0.0.0.0:51820 0.0.0.0:*\nudp   UNCONN 0      0      0.0.0.0:53 0.0.0.0:*";
        assert_eq!(
            ss_without_tunnel(ss),
            ss.lines().skip(2).collect::<Vec<_>>()
        );
        assert!(ss_without_tunnel("").is_empty());
    }

    #[test]
    fn only_the_tunnels_wildcard_udp_sockets_are_set_apart() {
        let lines = [
            "udp local 00000000:CA6C state 07",
            "udp6 local 00000000000000000000000000000000:CA6C state 07",
            "udp local 0100007F:CA6C state 07",
            "tcp local 00000000:CA6C state 0A",
            "udp local 00000000:0035 state 07",
        ];
        let (others, tunnel) = split_tunnel_sockets(lines.iter().map(|l| l.to_string()).collect());
        assert_eq!(tunnel, lines[..2]);
        assert_eq!(others, lines[2..]);
    }

    #[test]
    fn server_lines_parse_after_tcp_and_udp_prefixes() {
        let want = Some((
            Ipv4Addr::new(10, 20, 0, 10),
            443,
            Ipv4Addr::new(192, 168, 77, 2),
        ));
        assert_eq!(
            server_line("line airlock-outside 10.20.0.10 port 443 peer 192.168.77.2:40000"),
            want
        );
        assert_eq!(
            server_line(
                "reply 10.20.0.10:443 airlock-outside 10.20.0.10 port 443 peer 192.168.77.2:40000"
            ),
            want
        );
        assert_eq!(
            server_line("tcp airlock-outside 10.20.0.10 port 443 peer 192.168.77.2:1"),
            want
        );
        assert_eq!(server_line("timeout"), None);
        assert_eq!(
            server_line("line airlock-outside 10.20.0.10 port x peer 192.168.77.2:1"),
            None
        );
        // The outside's own banner is what the parser reads.
        let b = outside::banner(
            SocketAddrV4::new(outside::INTERNET, 53),
            "192.168.78.2:5000".parse().unwrap(),
        );
        assert_eq!(
            server_line(&b),
            Some((outside::INTERNET, 53, GENERAL_UPLINK.appliance))
        );
    }

    #[test]
    fn addresses_match_the_test_profile() {
        let cfg = airlock_network_config();
        // The uplinks are machine settings, provisioned by airlock flash.
        let machine = super::super::provision::MACHINE_SETTINGS;
        assert!(
            machine.contains("interface = \"upclassified\"")
                && machine.contains("interface = \"upgeneral\"")
        );
        for (name, end) in UPLINKS {
            assert!(
                machine.contains(&format!("address = \"{}/24\"", end.appliance)),
                "{name}"
            );
            assert!(
                machine.contains(&format!("gateway = \"{}\"", end.gateway)),
                "{name}"
            );
            let link = std::fs::read_to_string(format!(
                "{}/../test-agent/overlay/etc/systemd/network/10-airlock-test-uplink-{}.link",
                env!("CARGO_MANIFEST_DIR"),
                &name[2..]
            ))
            .unwrap();
            assert!(
                link.contains(&format!("MACAddress={}", end.mac))
                    && link.contains(&format!("Name={name}")),
                "{link}"
            );
        }
        for (ip, mac) in [(CLASSIFIED_IP, CLASSIFIED_MAC), (GENERAL_IP, GENERAL_MAC)] {
            assert!(
                cfg.contains(&format!("guest_address = \"{ip}\""))
                    && cfg.contains(&format!("guest_mac = \"{mac}\""))
            );
        }
        assert!(cfg.contains(&format!("address = \"{SERVER}\"")));
    }

    fn airlock_network_config() -> String {
        std::fs::read_to_string(format!(
            "{}/../test-agent/overlay/etc/airlock/appliance.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }
}
