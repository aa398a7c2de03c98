//! The nftables ruleset, a pure function of the validated configuration.
//!
//! The text is one `nft -f` transaction: it starts with `flush ruleset`, so
//! loading it replaces whatever was there atomically, and a syntax or
//! kernel error leaves the previous ruleset in force. Two tables:
//!
//! * `bridge airlock_l2` — layer 2, on the bridge ports (the taps): a guest's
//!   frame reaches the host only if it is IPv4 from the guest's own MAC and
//!   address, or ARP about exactly that pair (anti-spoofing); everything else
//!   (IPv6, VLAN tags, other ethertypes, other sources) is dropped. The
//!   bridges never forward between ports. Matching is by port *name*, so the
//!   ruleset loads before the taps exist.
//! * `inet airlock` — layer 3: `input` (the host accepts nothing from the
//!   bridges and only replies on the uplinks, P7), `forward` (default drop;
//!   classified → allow-listed servers, general → not the classified side,
//!   P8–P10; general rate limits, P14; tunnel-only with WireGuard, P15),
//!   `output` (the host starts nothing towards a guest, and on the uplinks
//!   only the tunnel and connections to the update server) and `postrouting`
//!   (source NAT to the uplink or tunnel address).

use std::fmt::Write as _;

use crate::config::{Ipv4Cidr, NetworkConfig, Side, Uplinks};

/// Renders the complete ruleset for `nft -f`.
pub fn render(cfg: &NetworkConfig) -> String {
    let mut o = String::new();
    let c = &cfg.classified;
    let g = &cfg.general;
    let cbr = Side::Classified.bridge();
    let gbr = Side::General.bridge();
    let cup = &cfg.uplink(Side::Classified).interface;
    let gup = &cfg.uplink(Side::General).interface;
    // Where classified traffic leaves the host: the tunnel if there is one.
    let cout = c
        .wireguard
        .as_ref()
        .map_or(cup.as_str(), |w| w.interface.as_str());

    let _ = writeln!(
        o,
        "# airlock network ruleset, rendered by airlock-network from [network]."
    );
    let _ = writeln!(
        o,
        "# One transaction: load with `nft -f`; it replaces the whole ruleset."
    );
    let _ = writeln!(
        o,
        "# Uplinks: {}.",
        match &cfg.uplinks {
            Uplinks::Shared(u) => format!("one shared NIC {}", u.interface),
            Uplinks::PerSide {
                classified,
                general,
            } => format!(
                "classified {}, general {}",
                classified.interface, general.interface
            ),
        }
    );
    o.push_str("flush ruleset\n\n");

    // ------------------------------------------------------------ layer 2
    o.push_str("table bridge airlock_l2 {\n");
    o.push_str("\t# Frames from a guest to the host: its own MAC and IPv4 address only.\n");
    o.push_str("\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n");
    for side in Side::ALL {
        let seg = cfg.segment(side);
        let tap = side.tap();
        let (mac, ip) = (seg.guest_mac, seg.guest_address);
        if side == Side::General {
            // P14: a flood of broadcasts costs the host, not only the wire.
            let _ = writeln!(o, "\t\tiifname \"{tap}\" ether type arp limit rate over 50/second burst 50 packets counter drop");
        }
        let _ = writeln!(
            o,
            "\t\tiifname \"{tap}\" ether saddr {mac} ip saddr {ip} accept"
        );
        let _ = writeln!(
            o,
            "\t\tiifname \"{tap}\" ether saddr {mac} arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
             arp operation {{ request, reply }} arp saddr ether {mac} arp saddr ip {{ 0.0.0.0, {ip} }} accept"
        );
    }
    o.push_str("\t\tcounter drop comment \"spoofed or not IPv4\"\n\t}\n\n");
    o.push_str("\t# One guest per bridge: a bridge never forwards between its ports.\n");
    o.push_str(
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n",
    );
    o.push_str("}\n\n");

    // ------------------------------------------------------------ layer 3
    o.push_str("table inet airlock {\n");
    // Allow-list of classified destinations: address . protocol . port.
    let mut allow: Vec<String> = Vec::new();
    for d in &c.dns {
        allow.push(format!("{d} . udp . 53"));
        allow.push(format!("{d} . tcp . 53"));
    }
    for s in &c.servers {
        for p in &s.ports {
            allow.push(format!("{} . {} . {p}", cidr(s.address), s.protocol.name()));
        }
    }
    o.push_str("\t# P9: the only destinations of the classified guest.\n");
    o.push_str("\tset classified_allowed {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t\tflags interval\n");
    elements(&mut o, &allow);
    o.push_str("\t}\n\n");

    let mut denied: Vec<String> = cfg
        .classified_destinations()
        .into_iter()
        .map(cidr)
        .collect();
    denied.extend(g.deny.iter().map(|d| cidr(*d)));
    denied.extend(["224.0.0.0/4".to_string(), "255.255.255.255".to_string()]);
    denied.sort();
    denied.dedup();
    o.push_str("\t# P10: never reached by the general guest (the classified side, the\n");
    o.push_str("\t# organisation's own networks, multicast and broadcast).\n");
    o.push_str("\tset general_denied {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge\n");
    elements(&mut o, &denied);
    o.push_str("\t}\n\n");

    // input
    o.push_str("\t# P7: the host offers nothing to the guests or the uplinks.\n");
    o.push_str("\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n");
    o.push_str("\t\tiif \"lo\" accept\n");
    o.push_str("\t\tct state invalid counter drop\n");
    let _ = writeln!(o, "\t\tiifname {{ \"{cbr}\", \"{gbr}\" }} counter drop comment \"guests reach no host service\"");
    if let Some(w) = &c.wireguard {
        let ep = w.peer_endpoint;
        let _ = writeln!(
            o,
            "\t\tiifname \"{cup}\" ip saddr {} udp sport {} udp dport {} accept",
            ep.ip(),
            ep.port(),
            w.listen_port
        );
    }
    o.push_str("\t\tct state established,related accept\n");
    o.push_str("\t}\n\n");

    // forward
    o.push_str("\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n");
    o.push_str("\t\tct state invalid counter drop\n");
    o.push_str("\t\t# P8: no path between the sides, whatever the addresses.\n");
    let _ = writeln!(o, "\t\tiifname \"{cbr}\" oifname \"{gbr}\" counter drop");
    let _ = writeln!(o, "\t\tiifname \"{gbr}\" oifname \"{cbr}\" counter drop");
    o.push_str("\t\t# P14: the general guest's share of the host.\n");
    let rl = g.rate_limit;
    let _ = writeln!(
        o,
        "\t\tiifname \"{gbr}\" limit rate over {} kbytes/second burst {} kbytes counter drop",
        rl.egress_mbit as u64 * 125,
        burst_kbytes(rl.egress_mbit)
    );
    let _ = writeln!(
        o,
        "\t\toifname \"{gbr}\" limit rate over {} kbytes/second burst {} kbytes counter drop",
        rl.ingress_mbit as u64 * 125,
        burst_kbytes(rl.ingress_mbit)
    );
    let _ = writeln!(
        o,
        "\t\tiifname \"{gbr}\" ct state new limit rate over {}/second burst {} packets counter drop",
        rl.new_connections_per_second,
        rl.new_connections_per_second.saturating_mul(2)
    );
    let _ = writeln!(
        o,
        "\t\tiifname \"{gbr}\" ct state new ct count over {} counter drop",
        rl.max_connections
    );

    let cip = c.segment.guest_address;
    let gip = g.segment.guest_address;
    o.push_str("\t\t# P9: classified guest to its allow-listed servers");
    o.push_str(if c.wireguard.is_some() {
        ", through the tunnel only.\n"
    } else {
        ".\n"
    });
    let _ = writeln!(o, "\t\tiifname \"{cbr}\" oifname \"{cout}\" ip saddr {cip} ct state established,related accept");
    let _ = writeln!(o, "\t\tiifname \"{cout}\" oifname \"{cbr}\" ip daddr {cip} ct state established,related accept");
    let _ = writeln!(
        o,
        "\t\tiifname \"{cbr}\" oifname \"{cout}\" ip saddr {cip} ip daddr . meta l4proto . th dport @classified_allowed ct state new accept"
    );
    o.push_str("\t\t# P10: general guest to the internet, never the classified side.\n");
    let _ = writeln!(o, "\t\tiifname \"{gbr}\" oifname \"{gup}\" ip saddr {gip} ip daddr @general_denied counter drop");
    let _ = writeln!(o, "\t\tiifname \"{gbr}\" oifname \"{gup}\" ip saddr {gip} ct state established,related accept");
    let _ = writeln!(o, "\t\tiifname \"{gup}\" oifname \"{gbr}\" ip daddr {gip} ct state established,related accept");
    let _ = writeln!(
        o,
        "\t\tiifname \"{gbr}\" oifname \"{gup}\" ip saddr {gip} ct state new accept"
    );
    o.push_str("\t\tcounter comment \"default drop\"\n");
    o.push_str("\t}\n\n");

    // output
    o.push_str("\t# The host starts nothing towards a guest, and on its uplinks only the\n");
    o.push_str("\t# tunnel and the update agent's fetches; errors about flows pass.\n");
    o.push_str("\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n");
    let _ = writeln!(
        o,
        "\t\toifname {{ \"{cbr}\", \"{gbr}\" }} ct state established,related accept"
    );
    let _ = writeln!(o, "\t\toifname {{ \"{cbr}\", \"{gbr}\" }} counter drop");
    let mut outward = vec![cup.as_str(), gup.as_str(), cout];
    outward.sort();
    outward.dedup();
    let outward = outward
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(w) = &c.wireguard {
        // The tunnel itself, and only by the classified uplink.
        let ep = w.peer_endpoint;
        let _ = writeln!(
            o,
            "\t\tip daddr {} udp dport {} oifname != \"{cup}\" counter drop",
            ep.ip(),
            ep.port()
        );
        let _ = writeln!(
            o,
            "\t\toifname \"{cup}\" ip daddr {} udp dport {} accept",
            ep.ip(),
            ep.port()
        );
    }
    let _ = writeln!(
        o,
        "\t\toifname {{ {outward} }} ct state established,related accept"
    );
    if let Some(u) = &cfg.update {
        let up = &cfg.uplink(u.uplink).interface;
        let _ = writeln!(
            o,
            "\t\toifname \"{up}\" ip daddr {} tcp dport {} ct state new accept comment \"update server\"",
            u.address.ip(),
            u.address.port()
        );
    }
    let _ = writeln!(
        o,
        "\t\toifname {{ {outward} }} counter drop comment \"the host starts nothing else\""
    );
    o.push_str("\t}\n\n");

    // NAT
    o.push_str(
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
    );
    let csnat = match &c.wireguard {
        Some(w) => w.address.addr,
        None => cfg.uplink(Side::Classified).address.addr,
    };
    let _ = writeln!(
        o,
        "\t\toifname \"{cout}\" ip saddr {cip} snat ip to {csnat}"
    );
    let _ = writeln!(
        o,
        "\t\toifname \"{gup}\" ip saddr {gip} snat ip to {}",
        cfg.uplink(Side::General).address.addr
    );
    o.push_str("\t}\n}\n");
    o
}

/// A /32 as a bare address (as `nft list` prints it), a prefix otherwise.
fn cidr(c: Ipv4Cidr) -> String {
    if c.len == 32 {
        c.addr.to_string()
    } else {
        c.network().to_string()
    }
}

/// A burst of about 100 ms of traffic at the rate, at least 64 kbytes.
fn burst_kbytes(mbit: u32) -> u64 {
    (mbit as u64 * 125 / 10).max(64)
}

fn elements(o: &mut String, items: &[String]) {
    if items.is_empty() {
        o.push_str("\t\t# (empty)\n");
        return;
    }
    o.push_str("\t\telements = {\n");
    for (i, e) in items.iter().enumerate() {
        let sep = if i + 1 == items.len() { "" } else { "," };
        let _ = writeln!(o, "\t\t\t{e}{sep}");
    }
    o.push_str("\t\t}\n");
}
