//! Network isolation on the appliance host (P7–P10, P14, P15 in
//! ARCHITECTURE.md): the `[network]` configuration section, the host
//! topology, and the nftables ruleset, as pure functions of the
//! configuration. `airlockd net render` prints them; at boot, [`boot_plan`]
//! is run step by step (the ruleset with `nft -f -`, then the topology)
//! before the guests start.
//!
//! # Shape
//!
//! ```text
//!  classified guest ── tap-classified ─ br-classified ┐            ┌─ uplink (shared, or
//!                                                     ├─ host ─────┤   one NIC per side)
//!  general guest ───── tap-general ──── br-general ───┘  (router,  └─ wg-classified (optional)
//!                                                         NAT)
//! ```
//!
//! One bridge per side with one persistent tap on it, created at boot and
//! owned by the side's QEMU user (QEMU opens it with `script=no`, so QEMU
//! needs no network privilege). The host routes and NATs; the two segments
//! never meet at layer 2 (separate bridges, bridge forwarding off) and the
//! ruleset forbids every forwarded path between them (P8).
//!
//! # Decisions
//!
//! * **Static addressing, no DHCP.** Each guest has a fixed MAC (set on
//!   QEMU's NIC) and a fixed address (set once in the guest image, e.g.
//!   `netsh interface ip set address`), and the host's address on the bridge
//!   is its gateway. A DHCP server would be the one host service that parses
//!   packets written by the general guest — the side that "may catch a
//!   virus" — and would show in `ss -l`; static addresses keep the host with
//!   nothing listening at all (P7), and anti-spoofing needs the fixed pair
//!   anyway. The cost is one setting in each guest image; DNS for the
//!   general guest is then a public resolver through NAT, and for the
//!   classified guest one of `classified.dns`.
//! * **Static uplink addresses** (with policy routing per side) for the same
//!   reason: no DHCP client on the host, and the per-PC values belong in the
//!   provisioning file. A DHCP-addressed uplink is not supported yet.
//! * **Anti-spoofing in the bridge family**, on the bridge ports by name,
//!   rather than netdev ingress chains: a netdev chain needs its device to
//!   exist when the ruleset loads, while the ruleset must load before the
//!   taps do anything. The bridge `input` chain is an allow-list: IPv4 from
//!   the guest's MAC and address, ARP about exactly that pair, nothing else
//!   (IPv6 is off on the host, so it is dropped too).
//! * **IPv4 only.** IPv6 is switched off on the host by the topology steps;
//!   the inet table drops any IPv6 anyway (default drop, no v6 accept rule).
//! * **WireGuard set up by rendered `ip`/`wg` commands**, not a
//!   systemd-networkd `.netdev`: the appliance runs no networkd (one daemon
//!   fewer, P7), the supervisor already runs the other topology steps in
//!   order, and the private key stays in a file (`private_key_file`) that
//!   only the set-up step reads. With a tunnel, classified traffic may leave
//!   only by the tunnel interface (ruleset) and the classified routing table
//!   sends the servers there (routing): traffic that would leave by the
//!   uplink is dropped, P15.
//! * **What the classified servers see (P9 "servers accept only the
//!   classified guest").** Without a tunnel they see the classified uplink's
//!   address, which with a shared NIC is also the general side's NAT
//!   address: the host alone keeps the general guest away from them. With
//!   the tunnel they see only the tunnel address, which nothing of the
//!   general side can use, so the servers (or the tunnel's far end) can
//!   admit exactly that. The tunnel's UDP port is the one thing that listens
//!   on the host; the ruleset admits it from the peer's endpoint only.
//! * **Rate limits (P14) are nftables policing** of the general side in
//!   the forward chain (bytes each way, new connections a second,
//!   concurrent connections) plus an ARP rate limit on its tap. Policing
//!   drops above the rate; TCP settles below it.
//! * **The whole ruleset is one transaction** starting with `flush ruleset`:
//!   the appliance owns the host's ruleset, and a failed load keeps the
//!   previous one.

pub mod config;
pub mod ruleset;
pub mod topology;

pub use config::{ConfigError, NetworkConfig, Side};
pub use ruleset::render;
pub use topology::{boot_plan, render_topology, render_topology_script, Step, StepKind};
