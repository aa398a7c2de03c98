//! The `[network]` section of the appliance configuration: the raw TOML shape
//! (`deny_unknown_fields` everywhere), its validation, and the validated
//! [`NetworkConfig`] that the renderers take. Deserialising a `NetworkConfig`
//! always validates it (`serde(try_from)`), so the supervisor can embed it as
//! a field of its own configuration and never hold an unchecked one.
//!
//! Every error names the key it is about, as `network.<path>: <what>`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

use serde::Deserialize;

/// A configuration error: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse or did not match the expected shape (unknown
    /// key, wrong type, missing key); toml's message names the key and line.
    #[error("network configuration: {0}")]
    Syntax(String),
    /// A value parsed but is not acceptable.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The two sides. Names are part of the run-time contract (`br-<side>`,
/// `tap-<side>`, user `airlock-<side>`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Classified,
    General,
}

impl Side {
    pub const ALL: [Side; 2] = [Side::Classified, Side::General];

    pub fn name(self) -> &'static str {
        match self {
            Side::Classified => "classified",
            Side::General => "general",
        }
    }
    /// The side's bridge, `br-<side>`.
    pub fn bridge(self) -> String {
        format!("br-{}", self.name())
    }
    /// The guest's tap device on the bridge, `tap-<side>`.
    pub fn tap(self) -> String {
        format!("tap-{}", self.name())
    }
    /// The system user that owns the tap and runs the side's QEMU.
    pub fn user(self) -> String {
        format!("airlock-{}", self.name())
    }
    /// The policy-routing table that forwarded traffic from this side uses.
    pub fn route_table(self) -> u32 {
        match self {
            Side::Classified => 101,
            Side::General => 102,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IPv4 prefix, `a.b.c.d/len`. The address may have host bits set (an
/// interface address such as `10.10.1.1/24`); [`Ipv4Cidr::network`] clears them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Cidr {
    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }
    pub fn network(self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            len: self.len,
        }
    }
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
    pub fn overlaps(self, other: Ipv4Cidr) -> bool {
        let len = self.len.min(other.len);
        let a = Ipv4Cidr {
            addr: self.addr,
            len,
        };
        a.contains(other.addr)
    }
    fn host(addr: Ipv4Addr) -> Ipv4Cidr {
        Ipv4Cidr { addr, len: 32 }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    /// `a.b.c.d/len`, or a bare address meaning `/32`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or prefix"))?;
        let len = match l {
            None => 32,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= 32 && !l.starts_with('+') => n,
                _ => return Err(format!("{s:?} has a prefix length that is not 0..=32")),
            },
        };
        Ok(Ipv4Cidr { addr, len })
    }
}

/// A MAC address, written `52:54:00:xx:xx:xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address (six hex pairs separated by ':')");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if out[0] & 1 == 1 {
            return Err(format!(
                "{s} is a multicast MAC address; a guest needs a unicast one"
            ));
        }
        if out == [0; 6] {
            return Err(format!("{s} is the all-zero MAC address"));
        }
        Ok(MacAddr(out))
    }
}

/// Transport protocol of an allow-listed classified server port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

// ---------------------------------------------------------------- raw shape

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    uplink: Option<RawUplink>,
    classified: RawClassified,
    general: RawGeneral,
    update: Option<RawUpdate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    url: String,
    uplink: Side,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    interface: String,
    address: String,
    gateway: String,
}

/// The segment keys of one side (not a serde type: `flatten` and
/// `deny_unknown_fields` do not combine, so both sides list them inline).
struct RawSegment {
    host_address: String,
    guest_address: String,
    guest_mac: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassified {
    /// The host's address on the side's bridge, with the segment's prefix.
    host_address: String,
    guest_address: String,
    guest_mac: String,
    uplink: Option<RawUplink>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    servers: Vec<RawServer>,
    wireguard: Option<RawWireguard>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeneral {
    host_address: String,
    guest_address: String,
    guest_mac: String,
    uplink: Option<RawUplink>,
    deny: Option<Vec<String>>,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    address: String,
    protocol: Protocol,
    ports: Vec<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    egress_mbit: Option<u32>,
    ingress_mbit: Option<u32>,
    new_connections_per_second: Option<u32>,
    max_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWireguard {
    interface: Option<String>,
    /// Per PC: usually set by the machine file, not the shipped one.
    address: Option<String>,
    private_key_file: Option<String>,
    listen_port: u16,
    peer_public_key: String,
    peer_endpoint: String,
    persistent_keepalive: Option<u16>,
}

// ---------------------------------------------------------- validated shape

/// The validated `[network]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawNetwork")]
pub struct NetworkConfig {
    pub uplinks: Uplinks,
    pub classified: Classified,
    pub general: General,
    /// The server the host's update agent fetches bundles from, if any.
    pub update: Option<UpdateServer>,
}

/// One physical NIC shared by both sides, or one per side (P14, §5.2 (3)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplinks {
    Shared(Uplink),
    PerSide { classified: Uplink, general: Uplink },
}

/// A host NIC towards the outside, statically addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub interface: String,
    pub address: Ipv4Cidr,
    pub gateway: Ipv4Addr,
}

/// One side's segment: the bridge, its host address and the one guest on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub host_address: Ipv4Cidr,
    pub guest_address: Ipv4Addr,
    pub guest_mac: MacAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub segment: Segment,
    /// Resolvers the classified guest may query (udp and tcp 53). Empty: no DNS.
    pub dns: Vec<Ipv4Addr>,
    pub servers: Vec<Server>,
    pub wireguard: Option<Wireguard>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct General {
    pub segment: Segment,
    /// Destinations the general guest never reaches, on top of everything of
    /// the classified side (which is always denied).
    pub deny: Vec<Ipv4Cidr>,
    pub rate_limit: RateLimit,
}

/// An allow-listed classified server: address or prefix, protocol, ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub address: Ipv4Cidr,
    pub protocol: Protocol,
    pub ports: Vec<u16>,
}

/// Limits on the general side (P14). Policing by nftables, per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub egress_mbit: u32,
    pub ingress_mbit: u32,
    pub new_connections_per_second: u32,
    pub max_connections: u32,
}

/// Largest accepted byte rate limit, Mbit/s, and packet or connection limit.
pub const MAX_MBIT: u32 = 100_000;
pub const MAX_PER_SECOND: u32 = 1_000_000;

impl RateLimit {
    pub const DEFAULT: RateLimit = RateLimit {
        egress_mbit: 100,
        ingress_mbit: 200,
        new_connections_per_second: 100,
        max_connections: 4096,
    };
}

/// The WireGuard tunnel that carries all classified-server traffic (P15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wireguard {
    pub interface: String,
    /// The host's tunnel address, with the tunnel's prefix.
    pub address: Ipv4Cidr,
    /// File holding the host's private key (never in the configuration);
    /// [`WIREGUARD_KEY_FILE`] unless the shipped configuration says otherwise.
    pub private_key_file: String,
    pub listen_port: u16,
    pub peer_public_key: String,
    pub peer_endpoint: SocketAddrV4,
    pub persistent_keepalive: Option<u16>,
}

/// The update server (`[network.update]`): the one place the host itself
/// opens a connection to, besides the tunnel's peer. The bundle it serves
/// is trusted for its signatures, not for where it came from, so plain
/// `http://` is enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateServer {
    /// `http://ADDRESS[:PORT]/PATH` (or `https://`), as the agent fetches it.
    pub url: String,
    /// The server's address and port, from the URL: the ruleset lets the
    /// host open TCP connections to exactly this.
    pub address: SocketAddrV4,
    /// The uplink that leads to it.
    pub uplink: Side,
}

/// Ports the update agent's SELinux domain may connect to (`http_port_t`
/// 80, 443, 8443 and `http_cache_port_t` 8080 in the distribution's policy;
/// policy/airlock.te).
pub const UPDATE_SERVER_PORTS: [u16; 4] = [80, 443, 8080, 8443];

/// Validates `[network.update] url`: an `http` or `https` URL whose host is
/// an IPv4 address (the appliance has no resolver: the ruleset needs the
/// address) and whose port is one of [`UPDATE_SERVER_PORTS`].
pub fn update_url(key: &str, url: &str) -> Result<SocketAddrV4, ConfigError> {
    let bad = |why: String| invalid(key, format!("{url:?}: {why}"));
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.len() > 1024 {
        return Err(bad(
            "spaces, control characters or more than 1024 characters".into(),
        ));
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("not a URL (http://ADDRESS[:PORT]/PATH)".into()))?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        other => return Err(bad(format!("{other}:// is not http:// or https://"))),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if path.is_empty() || path.ends_with('/') || path.contains(['?', '#']) {
        return Err(bad(
            "give the bundle's own path (…/NAME.airlock), without query or fragment".into(),
        ));
    }
    if authority.contains('@') {
        return Err(bad("no user or password in the URL".into()));
    }
    let address = match authority.parse::<SocketAddrV4>() {
        Ok(a) => a,
        Err(_) => SocketAddrV4::new(
            authority.parse::<Ipv4Addr>().map_err(|_| {
                bad(format!(
                    "{authority:?} is not an IPv4 address (and port): the appliance has no DNS resolver, and its firewall opens exactly this address"
                ))
            })?,
            default_port,
        ),
    };
    if !UPDATE_SERVER_PORTS.contains(&address.port()) {
        return Err(bad(format!(
            "port {} is not a web port the update agent may connect to ({})",
            address.port(),
            UPDATE_SERVER_PORTS.map(|p| p.to_string()).join(", ")
        )));
    }
    let ip = *address.ip();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(bad(format!("{ip} is not a server's address")));
    }
    Ok(address)
}

/// Where `airlock flash --wireguard-key` puts the PC's own tunnel key: on
/// the data partition, next to the machine file, with a label only the
/// network set-up may read (`airlock_wg_key_t`).
pub const WIREGUARD_KEY_FILE: &str = "/var/lib/airlock/provision/wg-classified.key";

/// Private, link-local and shared address space: the default for
/// `general.deny`, so that "general reaches the internet" does not include
/// the organisation's own networks.
pub const DEFAULT_GENERAL_DENY: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
];

impl NetworkConfig {
    /// Parses the body of the `[network]` table (a TOML document whose root
    /// is the network section).
    pub fn from_toml(text: &str) -> Result<NetworkConfig, ConfigError> {
        let raw: RawNetwork =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        NetworkConfig::try_from(raw)
    }

    /// Parses the `[network]` table out of a whole appliance configuration,
    /// ignoring its other tables (which belong to the supervisor).
    pub fn from_appliance_toml(text: &str) -> Result<NetworkConfig, ConfigError> {
        #[derive(Deserialize)]
        struct RawDoc {
            network: RawNetwork,
        }
        // Shape errors come from toml (with the line); value errors keep
        // their kind. Embedded as a serde field, `NetworkConfig` validates
        // the same way, with the error inside toml's.
        let raw: RawDoc = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        NetworkConfig::try_from(raw.network)
    }

    pub fn segment(&self, side: Side) -> &Segment {
        match side {
            Side::Classified => &self.classified.segment,
            Side::General => &self.general.segment,
        }
    }

    pub fn uplink(&self, side: Side) -> &Uplink {
        match (&self.uplinks, side) {
            (Uplinks::Shared(u), _) => u,
            (Uplinks::PerSide { classified, .. }, Side::Classified) => classified,
            (Uplinks::PerSide { general, .. }, Side::General) => general,
        }
    }

    /// Every destination of the classified side that the general guest must
    /// never reach: the classified segment, servers, resolvers and tunnel.
    pub fn classified_destinations(&self) -> Vec<Ipv4Cidr> {
        let c = &self.classified;
        let mut out = vec![c.segment.host_address.network()];
        out.extend(c.servers.iter().map(|s| s.address.network()));
        out.extend(c.dns.iter().map(|a| Ipv4Cidr::host(*a)));
        if let Some(wg) = &c.wireguard {
            out.push(wg.address.network());
            out.push(Ipv4Cidr::host(*wg.peer_endpoint.ip()));
        }
        out
    }
}

fn parse<T: FromStr<Err = String>>(key: &str, value: &str) -> Result<T, ConfigError> {
    value.parse().map_err(|m| invalid(key, m))
}

fn interface_name(key: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name != "."
        && name != "..";
    if !ok {
        return Err(invalid(
            key,
            format!("{name:?} is not an interface name (1–15 of a-z A-Z 0-9 - _ .)"),
        ));
    }
    if name == "lo" || name.starts_with("br-") || name.starts_with("tap-") {
        return Err(invalid(
            key,
            format!("{name:?} is reserved (loopback, or the appliance's own bridges and taps)"),
        ));
    }
    Ok(name.to_string())
}

fn uplink(key: &str, raw: RawUplink) -> Result<Uplink, ConfigError> {
    let interface = interface_name(&format!("{key}.interface"), &raw.interface)?;
    let address: Ipv4Cidr = parse(&format!("{key}.address"), &raw.address)?;
    let gateway: Ipv4Addr = raw.gateway.parse().map_err(|_| {
        invalid(
            format!("{key}.gateway"),
            format!("{:?} is not an IPv4 address", raw.gateway),
        )
    })?;
    if address.len == 32 || address.len < 8 {
        return Err(invalid(
            format!("{key}.address"),
            format!("{address} needs the link's prefix length (8..=31)"),
        ));
    }
    if !address.contains(gateway) || gateway == address.addr {
        return Err(invalid(
            format!("{key}.gateway"),
            format!("{gateway} is not another address on {}", address.network()),
        ));
    }
    Ok(Uplink {
        interface,
        address,
        gateway,
    })
}

fn segment(key: &str, raw: RawSegment) -> Result<Segment, ConfigError> {
    let host_address: Ipv4Cidr = parse(&format!("{key}.host_address"), &raw.host_address)?;
    if !(8..=30).contains(&host_address.len) {
        return Err(invalid(
            format!("{key}.host_address"),
            format!("{host_address} needs a prefix length of 8..=30"),
        ));
    }
    let net = host_address.network();
    if host_address.addr == net.addr || host_address.addr == net.broadcast() {
        return Err(invalid(
            format!("{key}.host_address"),
            format!("{host_address} is the network or broadcast address"),
        ));
    }
    let guest_address: Ipv4Addr = raw.guest_address.parse().map_err(|_| {
        invalid(
            format!("{key}.guest_address"),
            format!("{:?} is not an IPv4 address", raw.guest_address),
        )
    })?;
    if !net.contains(guest_address)
        || guest_address == net.addr
        || guest_address == net.broadcast()
        || guest_address == host_address.addr
    {
        return Err(invalid(
            format!("{key}.guest_address"),
            format!(
                "{guest_address} is not a free host address on {net} (the host has {})",
                host_address.addr
            ),
        ));
    }
    let guest_mac = parse(&format!("{key}.guest_mac"), &raw.guest_mac)?;
    Ok(Segment {
        host_address,
        guest_address,
        guest_mac,
    })
}

fn wireguard(raw: RawWireguard) -> Result<Wireguard, ConfigError> {
    const K: &str = "network.classified.wireguard";
    let interface = interface_name(
        &format!("{K}.interface"),
        raw.interface.as_deref().unwrap_or("wg-classified"),
    )?;
    // Two PCs with one tunnel address would take each other's traffic, so
    // the address is a machine setting; no default.
    let address = raw.address.as_deref().ok_or_else(|| {
        invalid(
            format!("{K}.address"),
            "each PC's tunnel address is a machine setting, and none is set (set it in the machine file, `airlock flash --machine`)",
        )
    })?;
    let address: Ipv4Cidr = parse(&format!("{K}.address"), address)?;
    let private_key_file = raw
        .private_key_file
        .unwrap_or_else(|| WIREGUARD_KEY_FILE.to_owned());
    if !private_key_file.starts_with('/') || private_key_file.contains(char::is_whitespace) {
        return Err(invalid(
            format!("{K}.private_key_file"),
            format!("{private_key_file:?} is not an absolute path without spaces"),
        ));
    }
    if raw.listen_port == 0 {
        return Err(invalid(format!("{K}.listen_port"), "0 is not a port"));
    }
    // A WireGuard key is 32 bytes in standard base64: 43 characters and '='.
    let k = &raw.peer_public_key;
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    if k.len() != 44 || !k.ends_with('=') || !k[..43].chars().all(b64) {
        return Err(invalid(
            format!("{K}.peer_public_key"),
            format!("{k:?} is not a WireGuard public key (44 characters of base64)"),
        ));
    }
    let peer_endpoint: SocketAddrV4 = raw.peer_endpoint.parse().map_err(|_| {
        invalid(
            format!("{K}.peer_endpoint"),
            format!("{:?} is not an IPv4 address and port", raw.peer_endpoint),
        )
    })?;
    if peer_endpoint.port() == 0 {
        return Err(invalid(format!("{K}.peer_endpoint"), "port 0"));
    }
    Ok(Wireguard {
        interface,
        address,
        private_key_file,
        listen_port: raw.listen_port,
        peer_public_key: raw.peer_public_key,
        peer_endpoint,
        persistent_keepalive: raw.persistent_keepalive,
    })
}

impl TryFrom<RawNetwork> for NetworkConfig {
    type Error = ConfigError;

    fn try_from(mut raw: RawNetwork) -> Result<Self, ConfigError> {
        let uplinks = match (raw.uplink.take(), raw.classified.uplink.take(), raw.general.uplink.take()) {
            (Some(u), None, None) => Uplinks::Shared(uplink("network.uplink", u)?),
            (None, Some(c), Some(g)) => {
                let classified = uplink("network.classified.uplink", c)?;
                let general = uplink("network.general.uplink", g)?;
                if classified.interface == general.interface {
                    return Err(invalid(
                        "network.general.uplink.interface",
                        format!("{:?} is also the classified uplink; for one shared NIC use [network.uplink]", general.interface),
                    ));
                }
                Uplinks::PerSide { classified, general }
            }
            (Some(_), _, _) => {
                return Err(invalid(
                    "network.uplink",
                    "give either [network.uplink] (one shared NIC) or both [network.classified.uplink] and [network.general.uplink], not both",
                ))
            }
            (None, c, _) => {
                let missing = if c.is_none() { "network.classified.uplink" } else { "network.general.uplink" };
                return Err(invalid(missing, "missing: give [network.uplink] (one shared NIC) or an uplink for each side"));
            }
        };

        let c = &raw.classified;
        let cseg = segment(
            "network.classified",
            RawSegment {
                host_address: c.host_address.clone(),
                guest_address: c.guest_address.clone(),
                guest_mac: c.guest_mac.clone(),
            },
        )?;
        let g = &raw.general;
        let gseg = segment(
            "network.general",
            RawSegment {
                host_address: g.host_address.clone(),
                guest_address: g.guest_address.clone(),
                guest_mac: g.guest_mac.clone(),
            },
        )?;
        if cseg.host_address.overlaps(gseg.host_address) {
            return Err(invalid(
                "network.general.host_address",
                format!(
                    "{} overlaps the classified segment {}",
                    gseg.host_address.network(),
                    cseg.host_address.network()
                ),
            ));
        }
        if cseg.guest_mac == gseg.guest_mac {
            return Err(invalid(
                "network.general.guest_mac",
                format!("{} is also the classified guest's MAC", gseg.guest_mac),
            ));
        }
        let uplink_list: Vec<(&str, &Uplink)> = match &uplinks {
            Uplinks::Shared(u) => vec![("network.uplink", u)],
            Uplinks::PerSide {
                classified,
                general,
            } => {
                if classified.address.overlaps(general.address) {
                    return Err(invalid(
                        "network.general.uplink.address",
                        format!(
                            "{} overlaps the classified uplink's network",
                            general.address.network()
                        ),
                    ));
                }
                vec![
                    ("network.classified.uplink", classified),
                    ("network.general.uplink", general),
                ]
            }
        };
        for (key, u) in &uplink_list {
            for (side, seg) in [("classified", &cseg), ("general", &gseg)] {
                if u.address.overlaps(seg.host_address) {
                    return Err(invalid(
                        format!("{key}.address"),
                        format!(
                            "{} overlaps the {side} segment {}",
                            u.address.network(),
                            seg.host_address.network()
                        ),
                    ));
                }
            }
        }

        let mut dns = Vec::new();
        for (i, d) in raw.classified.dns.iter().enumerate() {
            let a: Ipv4Addr = d.parse().map_err(|_| {
                invalid(
                    format!("network.classified.dns[{i}]"),
                    format!("{d:?} is not an IPv4 address"),
                )
            })?;
            dns.push(a);
        }
        let mut servers = Vec::new();
        for (i, s) in std::mem::take(&mut raw.classified.servers)
            .into_iter()
            .enumerate()
        {
            let key = format!("network.classified.servers[{i}]");
            let address: Ipv4Cidr = parse(&format!("{key}.address"), &s.address)?;
            if address.network() != address {
                return Err(invalid(
                    format!("{key}.address"),
                    format!("{address} has host bits set; write {}", address.network()),
                ));
            }
            if address.len < 8 {
                return Err(invalid(
                    format!("{key}.address"),
                    format!("{address} is wider than a /8; list the servers"),
                ));
            }
            for seg in [&cseg, &gseg] {
                if address.overlaps(seg.host_address) {
                    return Err(invalid(
                        format!("{key}.address"),
                        format!(
                            "{address} overlaps a guest segment ({})",
                            seg.host_address.network()
                        ),
                    ));
                }
            }
            if s.ports.is_empty() {
                return Err(invalid(
                    format!("{key}.ports"),
                    "empty: list at least one port",
                ));
            }
            let mut seen = BTreeSet::new();
            for p in &s.ports {
                if *p == 0 {
                    return Err(invalid(format!("{key}.ports"), "0 is not a port"));
                }
                if *p == 53 {
                    return Err(invalid(format!("{key}.ports"), "port 53 (DNS) is allowed through network.classified.dns, not as a server port"));
                }
                if !seen.insert(*p) {
                    return Err(invalid(
                        format!("{key}.ports"),
                        format!("port {p} is listed twice"),
                    ));
                }
            }
            servers.push(Server {
                address,
                protocol: s.protocol,
                ports: s.ports,
            });
        }
        for (i, a) in servers.iter().enumerate() {
            for (j, b) in servers.iter().enumerate().skip(i + 1) {
                if a.protocol == b.protocol && a.address.overlaps(b.address) {
                    if let Some(p) = a.ports.iter().find(|p| b.ports.contains(p)) {
                        return Err(invalid(
                            format!("network.classified.servers[{j}]"),
                            format!(
                                "{} {} port {p} is already allowed by servers[{i}] ({})",
                                b.address,
                                b.protocol.name(),
                                a.address
                            ),
                        ));
                    }
                }
            }
        }
        for (i, a) in dns.iter().enumerate() {
            if dns[..i].contains(a) {
                return Err(invalid(
                    format!("network.classified.dns[{i}]"),
                    format!("{a} is listed twice"),
                ));
            }
        }
        let wireguard = raw.classified.wireguard.take().map(wireguard).transpose()?;
        if let Some(wg) = &wireguard {
            if uplink_list.iter().any(|(_, u)| u.interface == wg.interface) {
                return Err(invalid(
                    "network.classified.wireguard.interface",
                    format!("{:?} is an uplink", wg.interface),
                ));
            }
            for seg in [&cseg, &gseg] {
                if wg.address.overlaps(seg.host_address) {
                    return Err(invalid(
                        "network.classified.wireguard.address",
                        format!(
                            "{} overlaps a guest segment ({})",
                            wg.address,
                            seg.host_address.network()
                        ),
                    ));
                }
            }
        }

        let deny = match raw.general.deny {
            None => DEFAULT_GENERAL_DENY
                .iter()
                .map(|s| s.parse().expect("constant prefix"))
                .collect(),
            Some(list) => {
                let mut out = Vec::new();
                for (i, d) in list.iter().enumerate() {
                    let c: Ipv4Cidr = parse(&format!("network.general.deny[{i}]"), d)?;
                    out.push(c.network());
                }
                out
            }
        };
        let d = RateLimit::DEFAULT;
        let rate_limit = match raw.general.rate_limit {
            None => d,
            Some(r) => RateLimit {
                egress_mbit: r.egress_mbit.unwrap_or(d.egress_mbit),
                ingress_mbit: r.ingress_mbit.unwrap_or(d.ingress_mbit),
                new_connections_per_second: r
                    .new_connections_per_second
                    .unwrap_or(d.new_connections_per_second),
                max_connections: r.max_connections.unwrap_or(d.max_connections),
            },
        };
        for (k, v) in [
            ("egress_mbit", rate_limit.egress_mbit),
            ("ingress_mbit", rate_limit.ingress_mbit),
            (
                "new_connections_per_second",
                rate_limit.new_connections_per_second,
            ),
            ("max_connections", rate_limit.max_connections),
        ] {
            if v == 0 {
                return Err(invalid(
                    format!("network.general.rate_limit.{k}"),
                    "0 would cut the general side off; give a positive limit",
                ));
            }
        }
        // The kernel's limit expression overflows (EOVERFLOW at load) from
        // about 140 Gbit/s; past these the ruleset would not load at boot.
        for (k, v, max) in [
            ("egress_mbit", rate_limit.egress_mbit, MAX_MBIT),
            ("ingress_mbit", rate_limit.ingress_mbit, MAX_MBIT),
            (
                "new_connections_per_second",
                rate_limit.new_connections_per_second,
                MAX_PER_SECOND,
            ),
            (
                "max_connections",
                rate_limit.max_connections,
                MAX_PER_SECOND,
            ),
        ] {
            if v > max {
                return Err(invalid(
                    format!("network.general.rate_limit.{k}"),
                    format!("{v} is more than {max}"),
                ));
            }
        }

        let update = match raw.update.take() {
            None => None,
            Some(u) => {
                let address = update_url("network.update.url", &u.url)?;
                for seg in [&cseg, &gseg] {
                    if seg.host_address.contains(*address.ip()) {
                        return Err(invalid(
                            "network.update.url",
                            format!(
                                "{} is in a guest segment ({}); the update server is outside",
                                address.ip(),
                                seg.host_address.network()
                            ),
                        ));
                    }
                }
                Some(UpdateServer {
                    url: u.url,
                    address,
                    uplink: u.uplink,
                })
            }
        };

        Ok(NetworkConfig {
            uplinks,
            update,
            classified: Classified {
                segment: cseg,
                dns,
                servers,
                wireguard,
            },
            general: General {
                segment: gseg,
                deny,
                rate_limit,
            },
        })
    }
}
