//! Unit tier: configuration parsing and validation, and the rendered ruleset
//! and topology text for each configuration shape. No root, no processes.

use airlock_network::config::Uplinks;
use airlock_network::{boot_plan, render, render_topology, ConfigError, NetworkConfig, StepKind};

const SHARED: &str = include_str!("fixtures/shared.toml");
const PER_SIDE: &str = include_str!("fixtures/per-side.toml");
const SHARED_WG: &str = include_str!("fixtures/shared-wireguard.toml");
const PER_SIDE_WG: &str = include_str!("fixtures/per-side-wireguard.toml");

fn cfg(text: &str) -> NetworkConfig {
    NetworkConfig::from_toml(text).unwrap_or_else(|e| panic!("fixture does not parse: {e}"))
}

/// The lines inside `chain NAME` or `set NAME` of `table TABLE`, trimmed.
fn block<'a>(text: &'a str, table: &str, item: &str) -> Vec<&'a str> {
    let t = text
        .find(&format!("table {table} {{\n"))
        .unwrap_or_else(|| panic!("no table {table} in:\n{text}"));
    let text = &text[t..];
    let t_end = text.find("\n}\n").expect("table end");
    let text = &text[..t_end];
    let start = text
        .find(&format!("\t{item} {{\n"))
        .unwrap_or_else(|| panic!("no {item} in table {table}:\n{text}"));
    let rest = &text[start..];
    let end = rest.find("\n\t}").expect("block end");
    rest[..end].lines().skip(1).map(str::trim).collect()
}

#[test]
fn every_ruleset_replaces_the_whole_ruleset_in_one_transaction() {
    for text in [SHARED, PER_SIDE, SHARED_WG, PER_SIDE_WG] {
        let r = render(&cfg(text));
        let first_rule = r
            .lines()
            .find(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        assert_eq!(first_rule, "flush ruleset");
        assert_eq!(r.matches("flush ruleset").count(), 1);
        // default drop on every filter base chain that sees guest traffic
        for chain in ["chain input {", "chain forward {"] {
            assert_eq!(r.matches(chain).count(), 2, "bridge and inet {chain}");
        }
        assert_eq!(r.matches("policy drop;").count(), 4);
        // No IPv6 is ever accepted.
        assert!(!r.contains("ip6"), "{r}");
    }
}

#[test]
fn the_sides_never_forward_to_each_other() {
    let r = render(&cfg(SHARED));
    let fwd = block(&r, "inet airlock", "chain forward");
    assert!(fwd.contains(&"iifname \"br-classified\" oifname \"br-general\" counter drop"));
    assert!(fwd.contains(&"iifname \"br-general\" oifname \"br-classified\" counter drop"));
    // No accept rule names both bridges.
    for l in &fwd {
        if l.ends_with("accept") {
            assert!(
                !(l.contains("br-classified") && l.contains("br-general")),
                "{l}"
            );
        }
    }
    // And the bridges never forward at layer 2.
    let l2 = block(&r, "bridge airlock_l2", "chain forward");
    assert_eq!(
        l2,
        ["type filter hook forward priority filter; policy drop;"]
    );
}

#[test]
fn classified_reaches_only_allow_listed_servers_and_dns_only_when_listed() {
    let with_dns = render(&cfg(PER_SIDE));
    let set = block(&with_dns, "inet airlock", "set classified_allowed");
    let elems: Vec<&str> = set
        .iter()
        .filter(|l| l.contains(" . ") && !l.starts_with("type"))
        .map(|l| l.trim_end_matches(','))
        .collect();
    assert_eq!(
        elems,
        [
            "192.0.2.53 . udp . 53",
            "192.0.2.53 . tcp . 53",
            "192.0.2.10 . tcp . 445",
            "192.0.2.10 . tcp . 443",
            "192.0.2.10 . udp . 5000"
        ]
    );
    assert!(with_dns.contains(
        "iifname \"br-classified\" oifname \"up-cls\" ip saddr 10.10.1.2 ip daddr . meta l4proto . th dport @classified_allowed ct state new accept"
    ));
    // The only new-connection accept for the classified side is the allow-list.
    let accepts: Vec<&str> = with_dns
        .lines()
        .filter(|l| {
            l.contains("iifname \"br-classified\"")
                && l.contains("ct state new")
                && l.ends_with("accept")
        })
        .collect();
    assert_eq!(accepts.len(), 1, "{accepts:?}");

    let without_dns = render(&cfg(SHARED));
    assert!(
        !without_dns.contains(". 53"),
        "no DNS without classified.dns:\n{without_dns}"
    );
}

#[test]
fn general_is_nat_to_the_internet_but_never_the_classified_side() {
    let r = render(&cfg(PER_SIDE));
    let denied = block(&r, "inet airlock", "set general_denied");
    for must in [
        "10.0.0.0/8",
        "192.0.2.10",
        "192.0.2.53",
        "198.51.100.0/24",
        "224.0.0.0/4",
        "255.255.255.255",
    ] {
        assert!(
            denied.iter().any(|l| l.trim_end_matches(',') == must),
            "{must} not in {denied:?}"
        );
    }
    let deny_rule = "iifname \"br-general\" oifname \"up-gen\" ip saddr 10.10.2.2 ip daddr @general_denied counter drop";
    let new_rule =
        "iifname \"br-general\" oifname \"up-gen\" ip saddr 10.10.2.2 ct state new accept";
    let (d, n) = (
        r.find(deny_rule).expect("deny rule"),
        r.find(new_rule).expect("accept rule"),
    );
    assert!(d < n, "the deny set is checked before general's accept");
    assert!(r.contains("oifname \"up-gen\" ip saddr 10.10.2.2 snat ip to 198.51.101.2"));
    assert!(r.contains("oifname \"up-cls\" ip saddr 10.10.1.2 snat ip to 198.51.100.2"));
}

#[test]
fn default_general_deny_is_the_private_ranges_plus_the_classified_side() {
    let text = PER_SIDE.replace(
        "deny = [\"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"198.51.100.0/24\", \"198.51.101.0/24\"]\n",
        "",
    );
    let r = render(&cfg(&text));
    let denied = block(&r, "inet airlock", "set general_denied");
    for must in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "192.0.2.10",
    ] {
        assert!(
            denied.iter().any(|l| l.trim_end_matches(',') == must),
            "{must} not in {denied:?}"
        );
    }
    assert!(!denied.iter().any(|l| l.starts_with("198.51.100.0/24")));
}

#[test]
fn host_accepts_nothing_from_the_bridges_and_only_replies_on_uplinks() {
    for text in [SHARED, PER_SIDE] {
        let r = render(&cfg(text));
        let input = block(&r, "inet airlock", "chain input");
        assert_eq!(
            input,
            [
                "type filter hook input priority filter; policy drop;",
                "iif \"lo\" accept",
                "ct state invalid counter drop",
                "iifname { \"br-classified\", \"br-general\" } counter drop comment \"guests reach no host service\"",
                "ct state established,related accept",
            ]
        );
    }
}

#[test]
fn anti_spoofing_allows_only_the_guests_own_mac_and_address() {
    let r = render(&cfg(SHARED));
    let l2 = block(&r, "bridge airlock_l2", "chain input");
    let accepts: Vec<&&str> = l2.iter().filter(|l| l.ends_with("accept")).collect();
    assert_eq!(accepts.len(), 4, "{l2:?}");
    for a in &accepts {
        let ok = (a.contains("\"tap-classified\" ether saddr 52:54:00:a1:00:02")
            && (a.contains("ip saddr 10.10.1.2 ")
                || a.contains(
                    "arp saddr ether 52:54:00:a1:00:02 arp saddr ip { 0.0.0.0, 10.10.1.2 }",
                )))
            || (a.contains("\"tap-general\" ether saddr 52:54:00:b2:00:02")
                && (a.contains("ip saddr 10.10.2.2 ")
                    || a.contains(
                        "arp saddr ether 52:54:00:b2:00:02 arp saddr ip { 0.0.0.0, 10.10.2.2 }",
                    )));
        assert!(ok, "unexpected layer-2 accept: {a}");
    }
    assert_eq!(
        l2.last(),
        Some(&"counter drop comment \"spoofed or not IPv4\"")
    );
}

#[test]
fn general_rate_limits_come_before_any_accept() {
    let r = render(&cfg(PER_SIDE));
    let fwd = block(&r, "inet airlock", "chain forward").join("\n");
    let first_accept = fwd.find("accept").unwrap();
    for limit in [
        "iifname \"br-general\" limit rate over 2500 kbytes/second burst 250 kbytes counter drop",
        "oifname \"br-general\" limit rate over 10000 kbytes/second burst 1000 kbytes counter drop",
        "iifname \"br-general\" ct state new limit rate over 20/second burst 40 packets counter drop",
        "iifname \"br-general\" ct state new ct count over 256 counter drop",
    ] {
        let at = fwd.find(limit).unwrap_or_else(|| panic!("{limit} missing in\n{fwd}"));
        assert!(at < first_accept);
    }
    // Defaults when the section is absent.
    let d = render(&cfg(SHARED));
    assert!(d.contains("iifname \"br-general\" limit rate over 12500 kbytes/second"));
    assert!(d.contains("ct count over 4096"));
}

#[test]
fn with_wireguard_classified_traffic_leaves_only_by_the_tunnel() {
    for (text, wg, up) in [
        (SHARED_WG, "wg-classified", "up0"),
        (PER_SIDE_WG, "wg0", "up-cls"),
    ] {
        let r = render(&cfg(text));
        let classified_accepts: Vec<&str> = block(&r, "inet airlock", "chain forward")
            .into_iter()
            .filter(|l| l.contains("br-classified\"") && l.ends_with("accept"))
            .collect();
        assert_eq!(classified_accepts.len(), 3, "{classified_accepts:?}");
        for l in &classified_accepts {
            assert!(
                l.contains(&format!("\"{wg}\"")),
                "classified accept not via the tunnel: {l}"
            );
            assert!(!l.contains(&format!("\"{up}\"")), "{l}");
        }
        assert!(r.contains(&format!(
            "oifname \"{wg}\" ip saddr 10.10.1.2 snat ip to 10.99.0.2"
        )));
        assert!(r.contains(&format!(
            "iifname \"{up}\" ip saddr 198.51.100.7 udp sport 51820 udp dport 51820 accept"
        )));
        assert!(r.contains(&format!(
            "ip daddr 198.51.100.7 udp dport 51820 oifname != \"{up}\" counter drop"
        )));
    }
    // Without a tunnel the classified side leaves by its uplink.
    let r = render(&cfg(SHARED));
    assert!(r.contains("iifname \"br-classified\" oifname \"up0\" ip saddr 10.10.1.2 ip daddr . meta l4proto . th dport @classified_allowed ct state new accept"));
    assert!(!r.contains("wireguard") && !r.contains("wg-"));
}

#[test]
fn rendering_is_deterministic() {
    for text in [SHARED, PER_SIDE, SHARED_WG, PER_SIDE_WG] {
        assert_eq!(render(&cfg(text)), render(&cfg(text)));
    }
}

#[test]
fn topology_per_side_and_shared() {
    let shared = render_topology(&cfg(SHARED));
    let s: Vec<String> = shared.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        s.iter()
            .filter(|l| l.starts_with("ip address replace 198.51.100.2/24 dev up0"))
            .count(),
        1
    );
    assert!(s.contains(
        &"ip tuntap add dev tap-classified mode tap user airlock-classified".to_string()
    ));
    assert!(s.contains(&"ip tuntap add dev tap-general mode tap user airlock-general".to_string()));
    assert!(s.contains(
        &"ip route replace 192.0.2.10/32 via 198.51.100.1 dev up0 table 101".to_string()
    ));
    assert!(s.contains(&"ip route replace blackhole default table 101".to_string()));
    assert!(s.contains(&"ip route replace default via 198.51.100.1 dev up0 table 102".to_string()));
    assert_eq!(
        s.last().unwrap(),
        "sysctl -q -w net.ipv4.ip_forward=1",
        "forwarding goes on last"
    );
    assert!(!shared.iter().any(|s| s.kind == StepKind::Wireguard));

    let per = render_topology(&cfg(PER_SIDE));
    let p: Vec<String> = per.iter().map(|s| s.to_string()).collect();
    assert!(p.contains(
        &"ip route replace 192.0.2.53/32 via 198.51.100.1 dev up-cls table 101".to_string()
    ));
    assert!(
        p.contains(&"ip route replace default via 198.51.101.1 dev up-gen table 102".to_string())
    );
}

#[test]
fn topology_reaches_on_link_servers_directly() {
    // A server on the uplink's own network is not routed by the gateway.
    let text = SHARED.replacen("address = \"192.0.2.10\"", "address = \"198.51.100.40\"", 2);
    let s: Vec<String> = render_topology(&cfg(&text))
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(
        s.contains(&"ip route replace 198.51.100.40/32 dev up0 table 101".to_string()),
        "{s:#?}"
    );
    assert!(!s.iter().any(|l| l.contains("198.51.100.40/32 via")));
}

#[test]
fn topology_with_wireguard_routes_servers_into_the_tunnel() {
    let steps = render_topology(&cfg(SHARED_WG));
    let s: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
    let wg: Vec<&String> = steps
        .iter()
        .zip(&s)
        .filter(|(st, _)| st.kind == StepKind::Wireguard)
        .map(|(_, l)| l)
        .collect();
    assert_eq!(
        wg,
        [
            "ip link add name wg-classified type wireguard",
            "wg set wg-classified private-key /var/lib/airlock/provision/wg-classified.key listen-port 51820 peer xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg= endpoint 198.51.100.7:51820 allowed-ips 192.0.2.10/32,192.0.2.53/32 persistent-keepalive 25",
        ]
    );
    assert!(s.contains(&"ip route replace 192.0.2.10/32 dev wg-classified table 101".to_string()));
    assert!(s.contains(&"ip route replace 198.51.100.7/32 dev up0".to_string()));
    assert!(!s
        .iter()
        .any(|l| l.contains("table 101") && l.contains("via 198.51.100.1")));
}

#[test]
fn config_embeds_in_the_appliance_file() {
    // As the supervisor embeds it: a serde field that validates itself.
    #[derive(serde::Deserialize)]
    struct Appliance {
        network: NetworkConfig,
    }
    let doc = format!(
        "[supervisor]\nwhatever = 1\n\n{}",
        SHARED
            .lines()
            .map(|l| if l.starts_with('[') {
                l.replacen('[', "[network.", 1)
                    .replace("[network.[", "[[network.")
            } else {
                l.to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    );
    let c = NetworkConfig::from_appliance_toml(&doc).unwrap();
    assert_eq!(c, cfg(SHARED));
    let embedded: Appliance = toml::from_str(&doc).unwrap();
    assert_eq!(embedded.network, c);
    let bad = doc.replace(
        "guest_mac = \"52:54:00:a1:00:02\"",
        "guest_mac = \"ff:ff:ff:ff:ff:ff\"",
    );
    let e = toml::from_str::<Appliance>(&bad)
        .err()
        .expect("embedded config is validated");
    assert!(
        e.to_string()
            .contains("network.classified.guest_mac: ff:ff:ff:ff:ff:ff is a multicast"),
        "{e}"
    );
    assert!(matches!(c.uplinks, Uplinks::Shared(_)));
}

/// Table-driven: each bad configuration and the key its error must name.
#[test]
fn invalid_configurations_name_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        // (fixture edit: from, to), expected text in the error
        ("guest_mac = \"52:54:00:a1:00:02\"", "guest_mac = \"53:54:00:a1:00:02\"", "network.classified.guest_mac: 53:54:00:a1:00:02 is a multicast"),
        ("guest_mac = \"52:54:00:a1:00:02\"", "guest_mac = \"52:54:00:a1:00\"", "network.classified.guest_mac: \"52:54:00:a1:00\" is not a MAC"),
        ("guest_mac = \"52:54:00:b2:00:02\"", "guest_mac = \"52:54:00:a1:00:02\"", "network.general.guest_mac: 52:54:00:a1:00:02 is also the classified guest's MAC"),
        ("guest_address = \"10.10.1.2\"", "guest_address = \"10.10.3.2\"", "network.classified.guest_address: 10.10.3.2 is not a free host address on 10.10.1.0/24"),
        ("guest_address = \"10.10.1.2\"", "guest_address = \"10.10.1.1\"", "network.classified.guest_address: 10.10.1.1 is not a free host address"),
        ("host_address = \"10.10.2.1/24\"", "host_address = \"10.10.1.200/16\"", "network.general.host_address: 10.10.0.0/16 overlaps the classified segment"),
        ("host_address = \"10.10.2.1/24\"", "host_address = \"10.10.2.0/24\"", "network.general.host_address: 10.10.2.0/24 is the network or broadcast address"),
        ("ports = [445]", "ports = []", "network.classified.servers[0].ports: empty"),
        ("ports = [445]", "ports = [53]", "network.classified.servers[0].ports: port 53 (DNS) is allowed through network.classified.dns"),
        ("ports = [445]", "ports = [445, 445]", "network.classified.servers[0].ports: port 445 is listed twice"),
        ("protocol = \"udp\"\nports = [5000]", "protocol = \"tcp\"\nports = [445]", "network.classified.servers[1]: 192.0.2.10/32 tcp port 445 is already allowed by servers[0]"),
        ("protocol = \"tcp\"", "protocol = \"sctp\"", "unknown variant `sctp`"),
        ("address = \"192.0.2.10\"\nprotocol = \"tcp\"", "address = \"192.0.2.10/24\"\nprotocol = \"tcp\"", "network.classified.servers[0].address: 192.0.2.10/24 has host bits set"),
        ("address = \"192.0.2.10\"\nprotocol = \"tcp\"", "address = \"10.10.1.0/24\"\nprotocol = \"tcp\"", "network.classified.servers[0].address: 10.10.1.0/24 overlaps a guest segment"),
        ("interface = \"up0\"", "interface = \"br-general\"", "network.uplink.interface: \"br-general\" is reserved"),
        ("interface = \"up0\"", "interface = \"up0; reboot\"", "network.uplink.interface: \"up0; reboot\" is not an interface name"),
        ("gateway = \"198.51.100.1\"", "gateway = \"198.51.101.1\"", "network.uplink.gateway: 198.51.101.1 is not another address on 198.51.100.0/24"),
        ("address = \"198.51.100.2/24\"\ngateway = \"198.51.100.1\"", "address = \"10.10.0.2/16\"\ngateway = \"10.10.0.1\"", "network.uplink.address: 10.10.0.0/16 overlaps the classified segment"),
        ("[uplink]", "[spare]", "unknown field `spare`"),
        ("guest_address = \"10.10.2.2\"", "guest_address = \"10.10.2.2\"\nfirewall = \"off\"", "unknown field `firewall`"),
        ("deny = [\"198.51.100.0/24\"]", "deny = [\"198.51.100.0/33\"]", "network.general.deny[0]: \"198.51.100.0/33\" has a prefix length that is not 0..=32"),
        ("deny = [\"198.51.100.0/24\"]", "deny = []\nrate_limit = { egress_mbit = 0 }", "network.general.rate_limit.egress_mbit: 0 would cut the general side off"),
        ("deny = [\"198.51.100.0/24\"]", "rate_limit = { egress_mbit = 10, burst = 3 }", "unknown field `burst`"),
    ];
    for (from, to, want) in cases {
        assert!(SHARED.contains(from), "fixture lacks {from:?}");
        let text = SHARED.replacen(from, to, 1);
        let err = NetworkConfig::from_toml(&text).expect_err(&format!("accepted: {to}"));
        let msg = err.to_string();
        assert!(
            msg.contains(want),
            "for {to:?}:\n  got  {msg}\n  want {want}"
        );
    }
}

#[test]
fn uplink_shape_errors() {
    // Both a shared uplink and a per-side one.
    let both = format!("[uplink]\ninterface = \"x0\"\naddress = \"198.51.102.2/24\"\ngateway = \"198.51.102.1\"\n{PER_SIDE}");
    let e = NetworkConfig::from_toml(&both).unwrap_err();
    assert!(
        e.to_string().starts_with("network.uplink: give either"),
        "{e}"
    );
    // Only one side's uplink.
    let one = PER_SIDE.replace("[general.uplink]\ninterface = \"up-gen\"\naddress = \"198.51.101.2/24\"\ngateway = \"198.51.101.1\"\n", "");
    let e = NetworkConfig::from_toml(&one).unwrap_err();
    assert!(
        e.to_string().starts_with("network.general.uplink: missing"),
        "{e}"
    );
    // The same NIC named twice.
    let same = PER_SIDE.replace("interface = \"up-gen\"", "interface = \"up-cls\"");
    let e = NetworkConfig::from_toml(&same).unwrap_err();
    assert!(
        e.to_string()
            .contains("network.general.uplink.interface: \"up-cls\" is also the classified uplink"),
        "{e}"
    );
    assert!(matches!(e, ConfigError::Invalid { .. }));
}

#[test]
fn wireguard_errors_name_the_key() {
    let cases = [
        (
            "peer_public_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"",
            "peer_public_key = \"not-a-key\"",
            "network.classified.wireguard.peer_public_key",
        ),
        (
            "peer_endpoint = \"198.51.100.7:51820\"",
            "peer_endpoint = \"wg.example:51820\"",
            "network.classified.wireguard.peer_endpoint",
        ),
        (
            "private_key_file = \"/var/lib/airlock/provision/wg-classified.key\"",
            "private_key_file = \"wg.key\"",
            "network.classified.wireguard.private_key_file",
        ),
        (
            "listen_port = 51820",
            "listen_port = 0",
            "network.classified.wireguard.listen_port",
        ),
        (
            "address = \"10.99.0.2/24\"",
            "address = \"10.10.1.9/24\"",
            "network.classified.wireguard.address",
        ),
        (
            "listen_port = 51820",
            "listen_port = 51820\npreshared_key = \"x\"",
            "unknown field `preshared_key`",
        ),
    ];
    for (from, to, want) in cases {
        assert!(SHARED_WG.contains(from), "fixture lacks {from:?}");
        let e = NetworkConfig::from_toml(&SHARED_WG.replacen(from, to, 1)).expect_err(to);
        assert!(e.to_string().contains(want), "for {to:?}: {e}");
    }
}

#[test]
fn wireguard_key_file_has_a_default_and_the_address_has_none() {
    let without_key = SHARED_WG.replacen(
        "private_key_file = \"/var/lib/airlock/provision/wg-classified.key\"\n",
        "",
        1,
    );
    assert_ne!(without_key, SHARED_WG, "fixture sets private_key_file");
    let wg = cfg(&without_key).classified.wireguard.expect("tunnel");
    assert_eq!(
        wg.private_key_file,
        airlock_network::config::WIREGUARD_KEY_FILE
    );
    // Two PCs with one tunnel address would take each other's traffic: the
    // address is never defaulted.
    let without_address = SHARED_WG.replacen("address = \"10.99.0.2/24\"\n", "", 1);
    assert_ne!(
        without_address, SHARED_WG,
        "fixture sets the tunnel address"
    );
    let e = NetworkConfig::from_toml(&without_address)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("network.classified.wireguard.address") && e.contains("machine file"),
        "{e}"
    );
}

/// The example in README.md is a valid configuration, and renders.
#[test]
fn readme_example_is_valid() {
    let readme = include_str!("../README.md");
    let start = readme.find("```toml\n").expect("toml block") + "```toml\n".len();
    let end = start + readme[start..].find("```").expect("block end");
    let c = NetworkConfig::from_appliance_toml(&readme[start..end])
        .unwrap_or_else(|e| panic!("README example: {e}"));
    assert!(c.classified.wireguard.is_some());
    assert!(
        render(&c).contains("oifname \"wg-classified\" ip saddr 10.10.1.2 snat ip to 10.99.0.2")
    );
}

#[test]
fn boot_plan_loads_the_ruleset_first_and_enables_forwarding_last() {
    let c = cfg(PER_SIDE);
    let plan = boot_plan(&c);
    assert_eq!(plan[0].kind, StepKind::Ruleset);
    assert_eq!(plan[0].argv, ["nft", "-f", "-"]);
    assert_eq!(plan[0].stdin.as_deref(), Some(render(&c).as_str()));
    assert!(plan[1..]
        .iter()
        .all(|s| s.stdin.is_none() && s.kind != StepKind::Ruleset));
    assert_eq!(plan[1..], render_topology(&c)[..]);
    assert_eq!(
        plan.last().unwrap().to_string(),
        "sysctl -q -w net.ipv4.ip_forward=1"
    );
}

/// The host's own connections on its uplinks: replies, the tunnel to its
/// peer, and new TCP connections to the update server; nothing else.
#[test]
fn host_opens_connections_only_to_the_update_server_and_the_tunnel() {
    let r = render(&cfg(PER_SIDE));
    assert_eq!(
        block(&r, "inet airlock", "chain output"),
        [
            "type filter hook output priority filter; policy accept;",
            "oifname { \"br-classified\", \"br-general\" } ct state established,related accept",
            "oifname { \"br-classified\", \"br-general\" } counter drop",
            "oifname { \"up-cls\", \"up-gen\" } ct state established,related accept",
            "oifname \"up-gen\" ip daddr 203.0.113.10 tcp dport 80 ct state new accept comment \"update server\"",
            "oifname { \"up-cls\", \"up-gen\" } counter drop comment \"the host starts nothing else\"",
        ]
    );
    let u = cfg(PER_SIDE)
        .update
        .expect("the per-side fixture has an update server");
    assert_eq!(u.address.to_string(), "203.0.113.10:80");
    let route: Vec<String> = render_topology(&cfg(PER_SIDE))
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(
        route.contains(&"ip route replace 203.0.113.10/32 via 198.51.101.1 dev up-gen".to_string()),
        "{route:?}"
    );
    // Without one: no route, no hole.
    let r = render(&cfg(SHARED));
    assert!(!r.contains("tcp dport 80 ct state new accept"), "{r}");
    assert!(r.contains("oifname { \"up0\" } counter drop comment \"the host starts nothing else\""));
    // With a tunnel: its packets leave by the classified uplink only, and
    // the tunnel device is closed to the host's own traffic too.
    let r = render(&cfg(PER_SIDE_WG));
    let out = block(&r, "inet airlock", "chain output");
    assert!(
        out.contains(&"oifname \"up-cls\" ip daddr 198.51.100.7 udp dport 51820 accept"),
        "{out:?}"
    );
    assert!(out.contains(&"oifname { \"up-cls\", \"up-gen\", \"wg0\" } counter drop comment \"the host starts nothing else\""), "{out:?}");
}

#[test]
fn update_server_errors_name_the_key() {
    let base =
        "[update]\nurl = \"http://203.0.113.10/airlock/current.airlock\"\nuplink = \"general\"";
    assert!(PER_SIDE.contains(base));
    for (to, want) in [
        ("url = \"http://updates.example/airlock/current.airlock\"", "network.update.url: \"http://updates.example/airlock/current.airlock\": \"updates.example\" is not an IPv4 address"),
        ("url = \"ftp://203.0.113.10/a.airlock\"", "ftp:// is not http:// or https://"),
        ("url = \"http://203.0.113.10/\"", "give the bundle's own path"),
        ("url = \"http://203.0.113.10:2222/a.airlock\"", "port 2222 is not a web port the update agent may connect to (80, 443, 8080, 8443)"),
        ("url = \"http://user:pw@203.0.113.10/a.airlock\"", "no user or password"),
        ("url = \"http://10.10.2.7/a.airlock\"", "network.update.url: 10.10.2.7 is in a guest segment"),
        ("url = \"http://127.0.0.1/a.airlock\"", "127.0.0.1 is not a server's address"),
    ] {
        let text = PER_SIDE.replacen(
            "url = \"http://203.0.113.10/airlock/current.airlock\"",
            to,
            1,
        );
        let msg = NetworkConfig::from_toml(&text).expect_err(to).to_string();
        assert!(msg.contains(want), "for {to:?}:\n  got  {msg}\n  want {want}");
    }
    let text = PER_SIDE.replacen("uplink = \"general\"", "uplink = \"both\"", 1);
    let msg = NetworkConfig::from_toml(&text)
        .expect_err("both")
        .to_string();
    assert!(msg.contains("unknown variant `both`"), "{msg}");
    let ok = PER_SIDE.replacen(
        "url = \"http://203.0.113.10/airlock/current.airlock\"",
        "url = \"https://203.0.113.10:8443/a/b.airlock\"",
        1,
    );
    assert_eq!(
        cfg(&ok).update.unwrap().address.to_string(),
        "203.0.113.10:8443"
    );
}
