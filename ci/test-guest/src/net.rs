//! The pure parts of the guest's network commands (`net-up`, `net-info`,
//! `tcp-*`, `udp-*`, `icmp-ping`; protocol in [`crate::protocol`]): address
//! and route parsing, the listeners' banner, payload escaping. The system
//! calls are in `/init` (`src/guest_net.rs`).

use std::net::{Ipv4Addr, SocketAddr};

/// `a.b.c.d/p` → (address, prefix).
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not <address>/<prefix>"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length 0..=32"))?;
    Ok((addr, prefix))
}

/// `52:54:00:a1:00:02` → its six bytes (a unicast address).
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC address (six hex pairs separated by ':')");
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(bad());
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("{text} is a multicast address"));
    }
    Ok(mac)
}

/// The netmask of a prefix length (`24` → `255.255.255.0`).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

/// The prefix length of a contiguous netmask, `None` otherwise.
pub fn prefix_len(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// One IPv4 route from `/proc/net/route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dev: String,
}

impl std::fmt::Display for Route {
    /// `<dest/prefix>,<gateway|direct>,<dev>`, as in `net-info`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let via = self.gateway.map_or("direct".to_owned(), |g| g.to_string());
        write!(f, "{}/{},{via},{}", self.dest, self.prefix, self.dev)
    }
}

/// The routes in `/proc/net/route` text (addresses in hex, in the host's
/// byte order, little-endian on x86).
pub fn parse_proc_route(text: &str) -> Vec<Route> {
    let hex = |w: &str| {
        u32::from_str_radix(w, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_le_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dev, dest, gateway, mask) = (
                f.first()?,
                hex(f.get(1)?)?,
                hex(f.get(2)?)?,
                hex(f.get(7)?)?,
            );
            Some(Route {
                dest,
                prefix: prefix_len(mask)?,
                gateway: (!gateway.is_unspecified()).then_some(gateway),
                dev: dev.to_string(),
            })
        })
        .collect()
}

/// The line a guest's TCP or UDP listener answers with: which guest
/// answered (its local address) on which port, and whom it saw (after NAT,
/// the translated source).
pub fn banner(local: SocketAddr, peer: SocketAddr) -> String {
    format!(
        "airlock-test-guest {} port {} peer {peer}",
        local.ip(),
        local.port()
    )
}

/// A payload as one word: printable ASCII other than space and `\` as is,
/// every other byte as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() && b != b'\\' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// The inverse of [`escape`]; `None` for a malformed escape.
pub fn unescape(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'\\' {
            let hex = tail.strip_prefix(b"x").filter(|t| t.len() >= 2)?;
            out.push(u8::from_str_radix(std::str::from_utf8(&hex[..2]).ok()?, 16).ok()?);
            rest = &hex[2..];
        } else {
            out.push(b);
            rest = tail;
        }
    }
    Some(out)
}

/// One datagram in `udp-received`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The listener's port.
    pub port: u16,
    pub source: SocketAddr,
    pub payload: Vec<u8>,
}

impl std::fmt::Display for Datagram {
    /// `<port>:<source ip:port>/<escaped payload>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.port, self.source, escape(&self.payload))
    }
}

/// A `udp-received` reply → (total since boot, the datagrams listed).
pub fn parse_udp_received(line: &str) -> Result<(u64, Vec<Datagram>), String> {
    let mut words = line.split_whitespace();
    let (Some("udp"), Some(total)) = (words.next(), words.next()) else {
        return Err(format!("not a udp-received reply: {line:?}"));
    };
    let total = total
        .parse()
        .map_err(|_| format!("bad total in {line:?}"))?;
    let datagrams = words
        .map(|w| {
            let bad = || format!("bad datagram {w:?}");
            let (port, rest) = w.split_once(':').ok_or_else(bad)?;
            let (source, payload) = rest.split_once('/').ok_or_else(bad)?;
            Ok(Datagram {
                port: port.parse().map_err(|_| bad())?,
                source: source.parse().map_err(|_| bad())?,
                payload: unescape(payload).ok_or_else(bad)?,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok((total, datagrams))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_and_masks() {
        assert_eq!(
            parse_cidr("10.10.1.2/24"),
            Ok((Ipv4Addr::new(10, 10, 1, 2), 24))
        );
        assert!(parse_cidr("10.10.1.2").is_err());
        assert!(parse_cidr("10.10.1.2/33").is_err());
        assert!(parse_cidr("10.10.1/24").is_err());
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
        for p in 0..=32 {
            assert_eq!(prefix_len(netmask(p)), Some(p));
        }
        assert_eq!(prefix_len(Ipv4Addr::new(255, 0, 255, 0)), None);
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:a1:00:0f"),
            Ok([0x52, 0x54, 0, 0xa1, 0, 0x0f])
        );
        assert!(parse_mac("52:54:00:a1:00").is_err());
        assert!(parse_mac("52:54:00:a1:00:0g").is_err());
        assert!(parse_mac("52:54:00:a1:00:002").is_err());
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
    }

    #[test]
    fn proc_net_route_is_parsed() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010A0A0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000A0A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let routes = parse_proc_route(text);
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].to_string(), "0.0.0.0/0,10.10.10.1,eth0");
        assert_eq!(routes[1].to_string(), "10.10.10.0/24,direct,eth0");
    }

    #[test]
    fn payloads_and_udp_replies_round_trip() {
        let payload = b"a b\\c\n\xffz".to_vec();
        let word = escape(&payload);
        assert!(!word.contains(' '), "{word}");
        assert_eq!(word, "a\\x20b\\x5cc\\x0a\\xffz");
        assert_eq!(unescape(&word), Some(payload.clone()));
        assert_eq!(unescape("\\x4"), None);
        let d = Datagram {
            port: 53,
            source: "10.0.0.1:40000".parse().unwrap(),
            payload,
        };
        let (total, got) = parse_udp_received(&format!("udp 9 {d}")).unwrap();
        assert_eq!((total, got), (9, vec![d]));
        assert_eq!(parse_udp_received("udp 0").unwrap(), (0, vec![]));
        assert!(parse_udp_received("clip none").is_err());
    }

    #[test]
    fn banner_names_both_ends() {
        let b = banner(
            "10.0.0.2:7000".parse().unwrap(),
            "10.0.0.1:40001".parse().unwrap(),
        );
        assert_eq!(
            b,
            "airlock-test-guest 10.0.0.2 port 7000 peer 10.0.0.1:40001"
        );
    }
}
