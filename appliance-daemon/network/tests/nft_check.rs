//! Integration tier (root): every configuration shape's rendered ruleset
//! passes `nft -c -f` (the kernel checks the whole transaction without
//! committing it) in a throwaway namespace, and then really loads there.
//! A broken ruleset must fail the same check, so the check can fail.

mod common;

use airlock_network::{render, NetworkConfig};
use common::{require_root, Netns};

const FIXTURES: [(&str, &str); 4] = [
    ("shared", include_str!("fixtures/shared.toml")),
    ("per-side", include_str!("fixtures/per-side.toml")),
    (
        "shared-wireguard",
        include_str!("fixtures/shared-wireguard.toml"),
    ),
    (
        "per-side-wireguard",
        include_str!("fixtures/per-side-wireguard.toml"),
    ),
];

fn nft_file(ns: &Netns, flags: &str, text: &str) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ruleset.nft");
    std::fs::write(&path, text)?;
    ns.exec(&format!("nft {flags} -f {}", path.display()))
}

#[test]
fn every_shape_passes_nft_check_and_loads() {
    require_root();
    for (name, text) in FIXTURES {
        let ruleset = render(&NetworkConfig::from_toml(text).unwrap());
        let ns = Netns::new("nftc").unwrap();
        nft_file(&ns, "-c", &ruleset)
            .unwrap_or_else(|e| panic!("{name}: nft -c rejects the ruleset: {e:#}\n{ruleset}"));
        // Check mode must not have committed anything.
        assert_eq!(
            ns.exec("nft list ruleset").unwrap().trim(),
            "",
            "{name}: nft -c committed"
        );
        nft_file(&ns, "", &ruleset).unwrap_or_else(|e| panic!("{name}: nft -f fails: {e:#}"));
        let listed = ns.exec("nft list tables").unwrap();
        assert_eq!(
            listed.trim(),
            "table bridge airlock_l2\ntable inet airlock",
            "{name}"
        );
        // Loading twice replaces, not appends (flush ruleset at the top).
        nft_file(&ns, "", &ruleset).unwrap();
        let rules = ns.exec("nft list chain inet airlock forward").unwrap();
        assert_eq!(
            rules
                .matches("oifname \"br-general\" counter packets")
                .count(),
            1,
            "{name}: loaded twice:\n{rules}"
        );
    }
}

/// The largest limits the configuration accepts still load (the kernel's
/// limit expression overflows past them).
#[test]
fn the_largest_accepted_limits_load() {
    require_root();
    let text = format!(
        "{}\n[general.rate_limit]\negress_mbit = {max}\ningress_mbit = {max}\nnew_connections_per_second = {pps}\nmax_connections = {pps}\n",
        FIXTURES[0].1,
        max = airlock_network::config::MAX_MBIT,
        pps = airlock_network::config::MAX_PER_SECOND
    );
    let ruleset = render(&NetworkConfig::from_toml(&text).unwrap());
    let ns = Netns::new("nftmax").unwrap();
    nft_file(&ns, "", &ruleset).unwrap_or_else(|e| panic!("largest limits do not load: {e:#}"));
    let over = text.replace(
        &format!("egress_mbit = {}", airlock_network::config::MAX_MBIT),
        "egress_mbit = 100001",
    );
    assert!(NetworkConfig::from_toml(&over)
        .unwrap_err()
        .to_string()
        .contains("network.general.rate_limit.egress_mbit: 100001 is more than 100000"));
}

#[test]
fn a_broken_ruleset_fails_the_check_and_keeps_the_old_one() {
    require_root();
    let good = render(&NetworkConfig::from_toml(FIXTURES[0].1).unwrap());
    let ns = Netns::new("nftb").unwrap();
    nft_file(&ns, "", &good).unwrap();
    // A typo in the last rule: the transaction must fail as a whole.
    let broken = good.replacen("snat ip to", "snat ipp to", 1);
    assert!(
        nft_file(&ns, "-c", &broken).is_err(),
        "nft -c accepted a broken ruleset"
    );
    assert!(
        nft_file(&ns, "", &broken).is_err(),
        "nft -f accepted a broken ruleset"
    );
    let still = ns.exec("nft list tables").unwrap();
    assert_eq!(
        still.trim(),
        "table bridge airlock_l2\ntable inet airlock",
        "the failed load must leave the old ruleset"
    );
}
