//! The host's network topology as a list of commands (`ip`, `sysctl`, `wg`),
//! each an argv with no shell, a pure function of the configuration. At boot
//! they run in order right **after** loading the ruleset ([`crate::render`])
//! and before any guest starts; forwarding is switched on by the last step,
//! so it is never on without the ruleset. [`boot_plan`] is that whole
//! sequence, ruleset first: the program that applies it only runs each
//! step's argv (with its `stdin`, if any) and stops at the first failure.
//!
//! Steps carry a [`StepKind`], so a test can leave out the ones that need
//! real devices (taps for QEMU, a WireGuard device) and put stand-ins in
//! their place while running every other step as the appliance would.

use std::fmt;

use crate::config::{Ipv4Cidr, NetworkConfig, Side, Uplink, Uplinks};

/// What a step sets up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Load the nftables ruleset: `nft -f -`, the ruleset on standard input.
    Ruleset,
    /// A sysctl (IPv6 off, no redirects, forwarding on).
    Sysctl,
    /// Create a bridge, or put a port on it.
    Bridge,
    /// Create a guest's persistent tap, owned by the side's QEMU user.
    Tap,
    /// Address an interface or bring it up.
    Link,
    /// Create the WireGuard device and set its key, peer and allowed IPs.
    Wireguard,
    /// Policy routing: per-side tables and rules.
    Route,
}

/// One command, as an argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub kind: StepKind,
    pub argv: Vec<String>,
    /// What to write to the command's standard input (the ruleset).
    pub stdin: Option<String>,
}

impl fmt::Display for Step {
    /// The command as one shell-safe line (arguments never need quoting:
    /// they are validated names, addresses, numbers and absolute paths).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.argv.join(" "))
    }
}

fn step(kind: StepKind, line: &str) -> Step {
    Step {
        kind,
        argv: line.split_whitespace().map(str::to_string).collect(),
        stdin: None,
    }
}

/// Everything to run at boot before the guests start, in order: the
/// ruleset, then the topology.
pub fn boot_plan(cfg: &NetworkConfig) -> Vec<Step> {
    let mut plan = vec![Step {
        kind: StepKind::Ruleset,
        argv: ["nft", "-f", "-"].map(String::from).to_vec(),
        stdin: Some(crate::render(cfg)),
    }];
    plan.extend(render_topology(cfg));
    plan
}

/// Renders the set-up commands, in order.
pub fn render_topology(cfg: &NetworkConfig) -> Vec<Step> {
    use StepKind::*;
    let mut s = Vec::new();
    // The design is IPv4 only: with IPv6 off no interface answers neighbour
    // discovery or takes router advertisements (P7).
    for key in ["all", "default"] {
        s.push(step(
            Sysctl,
            &format!("sysctl -q -w net.ipv6.conf.{key}.disable_ipv6=1"),
        ));
        s.push(step(
            Sysctl,
            &format!("sysctl -q -w net.ipv4.conf.{key}.send_redirects=0"),
        ));
        s.push(step(
            Sysctl,
            &format!("sysctl -q -w net.ipv4.conf.{key}.accept_redirects=0"),
        ));
    }

    let uplinks: Vec<&Uplink> = match &cfg.uplinks {
        Uplinks::Shared(u) => vec![u],
        Uplinks::PerSide {
            classified,
            general,
        } => vec![classified, general],
    };
    for u in &uplinks {
        s.push(step(
            Link,
            &format!("ip address replace {} dev {}", u.address, u.interface),
        ));
        s.push(step(Link, &format!("ip link set dev {} up", u.interface)));
    }

    for side in Side::ALL {
        let seg = cfg.segment(side);
        let (br, tap) = (side.bridge(), side.tap());
        s.push(step(
            Bridge,
            &format!("ip link add name {br} type bridge stp_state 0 mcast_snooping 0"),
        ));
        s.push(step(
            Tap,
            &format!("ip tuntap add dev {tap} mode tap user {}", side.user()),
        ));
        s.push(step(Bridge, &format!("ip link set dev {tap} master {br}")));
        s.push(step(
            Link,
            &format!("ip address add {} dev {br}", seg.host_address),
        ));
        s.push(step(Link, &format!("ip link set dev {br} up")));
        s.push(step(Link, &format!("ip link set dev {tap} up")));
    }

    let c = &cfg.classified;
    let cup = cfg.uplink(Side::Classified);
    if let Some(w) = &c.wireguard {
        let ep = w.peer_endpoint;
        // The tunnel's outer packets go to the peer by the classified uplink.
        let ep_host = Ipv4Cidr {
            addr: *ep.ip(),
            len: 32,
        };
        s.push(step(
            Route,
            &format!("ip route replace {ep_host} {}", next_hop(cup, ep_host)),
        ));
        s.push(step(
            Wireguard,
            &format!("ip link add name {} type wireguard", w.interface),
        ));
        let mut allowed: Vec<String> = c.servers.iter().map(|x| x.address.to_string()).collect();
        allowed.extend(c.dns.iter().map(|d| format!("{d}/32")));
        allowed.sort();
        allowed.dedup();
        if allowed.is_empty() {
            // wg needs a list; this admits nothing that the ruleset allows.
            allowed.push(w.address.network().to_string());
        }
        let mut wg = format!(
            "wg set {} private-key {} listen-port {} peer {} endpoint {} allowed-ips {}",
            w.interface,
            w.private_key_file,
            w.listen_port,
            w.peer_public_key,
            ep,
            allowed.join(",")
        );
        if let Some(k) = w.persistent_keepalive {
            wg.push_str(&format!(" persistent-keepalive {k}"));
        }
        s.push(step(Wireguard, &wg));
        s.push(step(
            Link,
            &format!("ip address add {} dev {}", w.address, w.interface),
        ));
        s.push(step(Link, &format!("ip link set dev {} up", w.interface)));
    }

    // The update server, for the host's own update agent (the main table
    // has no default route: the host reaches nothing else off its links).
    if let Some(u) = &cfg.update {
        let server = Ipv4Cidr {
            addr: *u.address.ip(),
            len: 32,
        };
        s.push(step(
            Route,
            &format!(
                "ip route replace {server} {}",
                next_hop(cfg.uplink(u.uplink), server)
            ),
        ));
    }

    // Policy routing: forwarded traffic from each bridge uses its side's
    // table. The classified table holds routes to the allow-listed servers
    // only, and a blackhole for everything else; the general table a default
    // route by the general uplink. Host addresses stay in `local`, which is
    // looked up first, so the ruleset's input chain decides about them.
    let ct = Side::Classified.route_table();
    let mut dests: Vec<Ipv4Cidr> = c.servers.iter().map(|x| x.address).collect();
    dests.extend(c.dns.iter().map(|d| Ipv4Cidr { addr: *d, len: 32 }));
    dests.sort();
    dests.dedup();
    for d in &dests {
        let via = match &c.wireguard {
            Some(w) => format!("dev {}", w.interface),
            None => next_hop(cup, *d),
        };
        s.push(step(
            Route,
            &format!("ip route replace {d} {via} table {ct}"),
        ));
    }
    s.push(step(
        Route,
        &format!("ip route replace blackhole default table {ct}"),
    ));
    let gup = cfg.uplink(Side::General);
    let gt = Side::General.route_table();
    s.push(step(
        Route,
        &format!(
            "ip route replace default via {} dev {} table {gt}",
            gup.gateway, gup.interface
        ),
    ));
    for side in Side::ALL {
        let t = side.route_table();
        s.push(step(
            Route,
            &format!(
                "ip rule add iif {} lookup {t} priority {}",
                side.bridge(),
                1000 + t
            ),
        ));
    }
    s.push(step(Sysctl, "sysctl -q -w net.ipv4.ip_forward=1"));
    s
}

/// How to reach `dest` by an uplink: directly if it is on the uplink's own
/// network, else by its gateway.
fn next_hop(up: &Uplink, dest: Ipv4Cidr) -> String {
    let net = up.address.network();
    if dest.len >= net.len && net.contains(dest.addr) {
        format!("dev {}", up.interface)
    } else {
        format!("via {} dev {}", up.gateway, up.interface)
    }
}

/// The steps as a script, one command a line, for people and for logs.
pub fn render_topology_script(cfg: &NetworkConfig) -> String {
    let mut o =
        String::from("# airlock network topology, rendered by airlock-network from [network].\n");
    o.push_str("# Run in order after loading the ruleset, before starting the guests.\n");
    for st in render_topology(cfg) {
        o.push_str(&st.to_string());
        o.push('\n');
    }
    o
}
