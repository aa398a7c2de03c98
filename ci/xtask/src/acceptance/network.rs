//! The host network in the booted test image (P7–P10, anti-spoofing), with
//! real packets from the two nested test guests on their real QEMU NICs.
//!
//! The outside world is made inside the appliance by the test profile's
//! `airlock-test-upstream.service`: a network namespace `upstream` whose
//! veth peer is the configured uplink (`uplink0`), holding the uplink's
//! gateway, the classified server and an "internet" host, each with tiny
//! TCP listeners that answer one line naming the peer they saw. The
//! addresses below are the test profile's
//! (ci/test-agent/overlay/etc/airlock/appliance.toml).
//!
//! Every forbidden path must time out (dropped). A closed port that the
//! packet did reach answers `refused` (RST), an open one `connected`: so a
//! `timeout` shows the ruleset at work, not a missing listener, and the
//! allowed probes show the guests' network works at all.

use anyhow::{bail, ensure, Context, Result};

use super::boot::sh;
use super::supervisor::guest;
use super::Suite;
use crate::Vm;

pub const TESTS: &[&str] = &[
    "network: airlock-network.service set up the host network before the supervisor (bridges, taps, forwarding)",
    "network: the loaded nftables ruleset is exactly `airlockd net render` of the configuration",
    "network: each QEMU holds its own side's tap, in its side's domain",
    "network: classified reaches its allowed server port and nothing else (P9)",
    "network: general reaches the internet and not the classified server (P10)",
    "network: no path between the guests, either way, TCP or ICMP (P8)",
    "network: neither guest reaches a port on the host (P7)",
    "network: a guest sending from a spoofed address gets nothing through",
    "network: no AVC denial from the network set-up or the guests' taps",
];

const CLASSIFIED_IP: &str = "10.10.1.2";
const CLASSIFIED_HOST: &str = "10.10.1.1";
const CLASSIFIED_MAC: &str = "52:54:00:a1:00:02";
const GENERAL_IP: &str = "10.10.2.2";
const GENERAL_HOST: &str = "10.10.2.1";
const GENERAL_MAC: &str = "52:54:00:b2:00:02";
const UPLINK_IP: &str = "192.168.77.2";
const UPLINK_GATEWAY: &str = "192.168.77.1";
/// Allow-listed for the classified guest: tcp 443 only. 8080 listens too.
const SERVER: &str = "10.20.0.10";
/// The internet host; listens on 80 and 443.
const INTERNET: &str = "198.51.100.20";
/// How long a probe waits for an answer before it calls the path dropped.
const PROBE_MS: u32 = 3000;
/// A port the guests listen on for each other.
const GUEST_PORT: u16 = 7000;

fn side_values(side: &str) -> (&'static str, &'static str, &'static str) {
    if side == "classified" {
        (CLASSIFIED_IP, CLASSIFIED_HOST, CLASSIFIED_MAC)
    } else {
        (GENERAL_IP, GENERAL_HOST, GENERAL_MAC)
    }
}

/// `net-up` with the side's configured address (or `ip` instead).
fn net_up(vm: &mut Vm, side: &str, ip: Option<&str>) -> Result<String> {
    let (addr, host, mac) = side_values(side);
    let addr = ip.unwrap_or(addr);
    let reply = guest(vm, side, &format!("net-up {addr}/24 {host}"))?;
    ensure!(reply.starts_with("ok net "), "{side}: net-up {addr}/24 {host}: {reply}");
    ensure!(reply.contains(mac), "{side}: the guest's NIC does not carry the configured MAC {mac}: {reply}");
    Ok(reply)
}

/// A probe that must get through: `tcp-fetch` answered with the server's line.
fn must_fetch(vm: &mut Vm, side: &str, ip: &str, port: u16) -> Result<String> {
    let reply = guest(vm, side, &format!("tcp-fetch {ip} {port} {PROBE_MS}"))?;
    let Some(line) = reply.strip_prefix("line ") else { bail!("{side} → {ip}:{port} tcp should get through; got {reply:?}") };
    ensure!(line.contains(&format!("{ip} port {port}")), "{side} → {ip}:{port}: unexpected server line {line:?}");
    // The server sees the uplink's address (NAT), never the guest's.
    ensure!(line.contains(&format!("peer {UPLINK_IP}:")), "{side} → {ip}:{port}: the server saw {line:?}, not the uplink address {UPLINK_IP}");
    Ok(format!("{side}→{ip}:{port} tcp ok ({})", line.rsplit("peer ").next().unwrap_or("")))
}

/// A probe that must be dropped: no answer at all (not refused: a refusal
/// would mean the packet reached the target).
fn must_drop(vm: &mut Vm, side: &str, probe: &str) -> Result<String> {
    let reply = guest(vm, side, probe)?;
    let dropped = reply == "timeout" || reply.starts_with("error unreachable");
    ensure!(dropped, "{side}: `{probe}` should be dropped, got {reply:?}");
    Ok(format!("{side}: {probe} → {reply}"))
}

fn tcp(ip: &str, port: u16) -> String {
    format!("tcp-connect {ip} {port} {PROBE_MS}")
}

fn ping(ip: &str) -> String {
    format!("icmp-ping {ip} {PROBE_MS}")
}

fn check_setup(vm: &mut Vm) -> Result<String> {
    let state = sh(vm, "systemctl show -p ActiveState -p Result -p ExecMainStatus airlock-network.service")?;
    ensure!(state.contains("ActiveState=active") && state.contains("Result=success"), "airlock-network.service: {state}");
    // It finished before the supervisor started.
    let times = sh(vm, "systemctl show -p ExecMainExitTimestampMonotonic --value airlock-network.service; systemctl show -p ExecMainStartTimestampMonotonic --value airlockd.service")?;
    let t: Vec<u64> = times.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    ensure!(t.len() == 2 && t[0] > 0 && t[0] <= t[1], "airlock-network ended at {:?} µs, airlockd started at {:?} µs", t.first(), t.get(1));
    let forward = sh(vm, "cat /proc/sys/net/ipv4/ip_forward")?;
    ensure!(forward.trim() == "1", "ip_forward is {}", forward.trim());
    let mut lines = Vec::new();
    for side in ["classified", "general"] {
        let master = sh(vm, &format!("basename $(readlink /sys/class/net/tap-{side}/master)"))?;
        ensure!(master.trim() == format!("br-{side}"), "tap-{side} is on {}", master.trim());
        let owner = sh(vm, &format!("cat /sys/class/net/tap-{side}/owner; id -u airlock-{side}"))?;
        let o: Vec<&str> = owner.split_whitespace().collect();
        ensure!(o.len() == 2 && o[0] == o[1], "tap-{side} is owned by uid {:?}, airlock-{side} is {:?}", o.first(), o.get(1));
        let ports = sh(vm, &format!("ls /sys/class/net/br-{side}/brif"))?;
        ensure!(ports.split_whitespace().eq([format!("tap-{side}").as_str()]), "br-{side} ports: {}", ports.trim());
        lines.push(format!("tap-{side} (uid {}) alone on br-{side}", o[0]));
    }
    let journal = sh(vm, "journalctl -b -u airlock-network -o cat --no-pager | tail -n 1")?;
    Ok(format!("{}; ip_forward=1; network done {}µs before the supervisor started; {}", lines.join(", "), t[1] - t[0], journal.trim()))
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
    Ok(format!("render sha256 {}; loaded = rendered listing sha256 {}; tables: {}", h[0], h[1], tables.split_whitespace().collect::<Vec<_>>().join(" ")))
}

fn check_taps(vm: &mut Vm) -> Result<String> {
    let mut lines = Vec::new();
    for side in ["classified", "general"] {
        let other = if side == "classified" { "general" } else { "classified" };
        let pid = super::supervisor::qemu_pid(vm, side)?;
        let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
        ensure!(context.contains(&format!(":airlock_vm_{side}_t:")), "{side} QEMU (pid {pid}) runs as {context:?}");
        // Every tun fd of the process and the interface it is attached to.
        let fds = sh(vm, &format!("for f in /proc/{pid}/fdinfo/*; do i=$(sed -n 's/^iff:[[:space:]]*//p' $f); [ -n \"$i\" ] && echo \"$(basename $f) $i $(readlink /proc/{pid}/fd/$(basename $f))\"; done; true"))?;
        let taps: Vec<&str> = fds.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
        ensure!(!taps.is_empty(), "{side} QEMU (pid {pid}) holds no tap");
        ensure!(taps.iter().all(|t| *t == format!("tap-{side}")), "{side} QEMU holds {taps:?}");
        ensure!(!fds.contains(&format!("tap-{other}")), "{side} QEMU holds the other side's tap: {fds}");
        lines.push(format!("{side}: pid {pid} {} holds {}", context.trim(), fds.trim().replace('\n', "; ")));
    }
    Ok(lines.join("\n"))
}

fn check_classified(vm: &mut Vm) -> Result<String> {
    let mut seen = vec![must_fetch(vm, "classified", SERVER, 443)?];
    for probe in [tcp(SERVER, 8080), tcp(SERVER, 22), ping(SERVER), tcp(INTERNET, 443), tcp(INTERNET, 80), ping(INTERNET), tcp(UPLINK_GATEWAY, 443)] {
        seen.push(must_drop(vm, "classified", &probe)?);
    }
    // The allowed port still works after all that (nothing was rate-limited away).
    must_fetch(vm, "classified", SERVER, 443)?;
    Ok(seen.join("\n"))
}

fn check_general(vm: &mut Vm) -> Result<String> {
    let mut seen = vec![must_fetch(vm, "general", INTERNET, 80)?, must_fetch(vm, "general", INTERNET, 443)?];
    let reply = guest(vm, "general", &ping(INTERNET))?;
    ensure!(reply.starts_with("reply"), "general → {INTERNET} icmp: {reply}");
    seen.push(format!("general: ping {INTERNET} → {reply}"));
    for probe in [tcp(SERVER, 443), tcp(SERVER, 8080), ping(SERVER), tcp(UPLINK_GATEWAY, 443)] {
        seen.push(must_drop(vm, "general", &probe)?);
    }
    Ok(seen.join("\n"))
}

fn check_between_guests(vm: &mut Vm) -> Result<String> {
    let mut seen = Vec::new();
    for side in ["classified", "general"] {
        let reply = guest(vm, side, &format!("tcp-listen {GUEST_PORT}"))?;
        ensure!(reply.starts_with("ok listening"), "{side}: tcp-listen: {reply}");
    }
    for (from, to) in [("classified", GENERAL_IP), ("general", CLASSIFIED_IP)] {
        seen.push(must_drop(vm, from, &tcp(to, GUEST_PORT))?);
        seen.push(must_drop(vm, from, &tcp(to, 1))?);
        seen.push(must_drop(vm, from, &ping(to))?);
    }
    Ok(seen.join("\n"))
}

fn check_host(vm: &mut Vm) -> Result<String> {
    let mut seen = Vec::new();
    // Closed ports on the host: a packet that got in would be answered with
    // a RST (`refused`); dropped, it gets nothing.
    for side in ["classified", "general"] {
        for ip in [CLASSIFIED_HOST, GENERAL_HOST, UPLINK_IP] {
            seen.push(must_drop(vm, side, &tcp(ip, 22))?);
        }
        let (_, host, _) = side_values(side);
        seen.push(must_drop(vm, side, &tcp(host, 53))?);
        seen.push(must_drop(vm, side, &ping(host))?);
    }
    let listening = sh(vm, "for f in tcp udp raw; do echo \"# $f\"; cat /proc/net/$f; done")?;
    let found = super::boot::listening_sockets(&listening);
    ensure!(found.is_empty(), "the host listens: {found:?}");
    seen.push("nothing listens in the host's namespace (/proc/net/{tcp,udp,raw})".into());
    Ok(seen.join("\n"))
}

fn check_spoofing(vm: &mut Vm) -> Result<String> {
    let mut seen = Vec::new();
    for (side, spoofed, target, port) in [("classified", "10.10.1.3", SERVER, 443), ("general", "10.10.2.3", INTERNET, 80)] {
        net_up(vm, side, Some(spoofed))?;
        let outcome = (|| -> Result<()> {
            seen.push(must_drop(vm, side, &format!("tcp-fetch {target} {port} {PROBE_MS}"))?);
            seen.push(must_drop(vm, side, &ping(target))?);
            Ok(())
        })();
        // Back to its own address: the same probe gets through again.
        net_up(vm, side, None)?;
        outcome.with_context(|| format!("{side} guest as {spoofed}"))?;
        seen.push(format!("{side} back on its own address: {}", must_fetch(vm, side, target, port)?));
    }
    let counters = sh(vm, "nft list chain bridge airlock_l2 input | grep 'spoofed or not IPv4'")?;
    seen.push(format!("bridge drop rule: {}", counters.trim()));
    Ok(seen.join("\n"))
}

fn check_avcs(vm: &mut Vm) -> Result<String> {
    let denials = sh(vm, "journalctl -b -o cat --no-pager | grep 'avc:  denied' | grep -E 'airlock_network_t|tun_socket|airlock-test-upstream' || true")?;
    let count = denials.lines().count();
    ensure!(count == 0, "{count} AVC denials:\n{}", denials.lines().take(15).collect::<Vec<_>>().join("\n"));
    let label = sh(vm, "stat -c %C /usr/lib/airlock/airlock-network")?;
    ensure!(label.contains(":airlock_network_exec_t:"), "/usr/lib/airlock/airlock-network is labelled {}", label.trim());
    let logged = sh(vm, "journalctl -b -u airlock-network -o verbose --no-pager | sed -n 's/^ *_SELINUX_CONTEXT=//p' | sort -u | tr '\\n' ' '")?;
    Ok(format!("0 denials for airlock_network_t or a tun socket this boot; the unit's program is {} (its log lines' sender contexts: {})", label.trim(), logged.trim()))
}

pub fn network_checks(suite: &mut Suite, vm: &mut Vm) {
    if !suite.wants_any(TESTS) {
        return;
    }
    suite.test(TESTS[0], || check_setup(vm));
    suite.test(TESTS[1], || check_ruleset(vm));
    suite.test(TESTS[2], || check_taps(vm));
    // Both guests on their configured addresses first.
    let up = ["classified", "general"].iter().map(|side| net_up(vm, side, None)).collect::<Result<Vec<_>>>();
    let probes = &TESTS[3..8];
    match up {
        Err(e) => suite.fail_all(probes, &e.context("net-up in the test guests")),
        Ok(_) => {
            suite.test(TESTS[3], || check_classified(vm));
            suite.test(TESTS[4], || check_general(vm));
            suite.test(TESTS[5], || check_between_guests(vm));
            suite.test(TESTS[6], || check_host(vm));
            suite.test(TESTS[7], || check_spoofing(vm));
        }
    }
    suite.test(TESTS[8], || check_avcs(vm));
}
