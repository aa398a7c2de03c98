//! Integration tier (root): the rendered ruleset and topology, loaded into a
//! network namespace that stands in for the appliance host, probed with real
//! packets. Namespaces stand in for the two guests (`cls`, `gen`), the
//! outside router (`world`), the classified servers (`srv`: 192.0.2.10 is
//! allow-listed, 192.0.2.11 is not, 192.0.2.53 is the classified resolver)
//! and an internet server (`inet`, 203.0.113.10). The outside router also
//! routes the guest segments back to the host, as a hostile upstream would.
//!
//! Each run gets its own namespaces; they are deleted on drop, so also when
//! an assertion fails. No traffic leaves them.
//!
//! What runs in the host namespace is the crate's own output: the ruleset
//! (`nft -f`) and every topology step, with one stand-in: the QEMU taps are
//! veths named `tap-<side>` with their peers in the guest namespaces. The
//! WireGuard shape runs a real tunnel, with keys made for the run: the
//! rendered `ip link add … type wireguard` where the kernel has WireGuard,
//! else the same interface from `wireguard-go` (userspace, same `wg`
//! configuration); the tunnel's far end is in `world`.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock_network::{boot_plan, NetworkConfig, StepKind};
use anyhow::{Context, Result};
use common::{enter, require_root, run, run_with_input, spoofing_udp_socket, veth, Daemon, Netns};

// ------------------------------------------------------------------ shapes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// tests/fixtures/per-side.toml: two uplinks, classified DNS, limits.
    PerSide,
    /// tests/fixtures/shared.toml: one uplink, no classified DNS.
    Shared,
    /// tests/fixtures/shared-wireguard.toml: one uplink, tunnel, DNS.
    SharedWireguard,
}

impl Shape {
    fn fixture(self) -> &'static str {
        match self {
            Shape::PerSide => include_str!("fixtures/per-side.toml"),
            Shape::Shared => include_str!("fixtures/shared.toml"),
            Shape::SharedWireguard => include_str!("fixtures/shared-wireguard.toml"),
        }
    }
    fn column(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Who {
    Host,
    Cls,
    Gen,
    World,
    Srv,
    Inet,
}

/// Which namespace holds an address (for the listeners).
fn owner(a: Ipv4Addr) -> Who {
    match a.octets() {
        [10, 10, 1, 2] => Who::Cls,
        [10, 10, 2, 2] => Who::Gen,
        [10, 10, _, 1] | [198, 51, 100, 2] | [198, 51, 101, 2] => Who::Host,
        [198, 51, 100, 1] | [198, 51, 101, 1] | [10, 99, 0, 1] => Who::World,
        [192, 0, 2, _] => Who::Srv,
        [203, 0, 113, 10] => Who::Inet,
        _ => panic!("no namespace holds {a}"),
    }
}

// ------------------------------------------------------------------ probes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// TCP connect, send a token, read it back (a round trip through NAT).
    Tcp(u16),
    /// One UDP datagram; reachable if the listener there received it.
    Udp(u16),
    /// One UDP datagram from a forged source address.
    UdpFrom(u16, [u8; 4]),
    /// ICMP echo and reply (`ping`).
    Icmp,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Tcp(p) => write!(f, "tcp/{p}"),
            Probe::Udp(p) => write!(f, "udp/{p}"),
            Probe::UdpFrom(p, s) => write!(f, "udp/{p} from {}", Ipv4Addr::from(*s)),
            Probe::Icmp => write!(f, "icmp echo"),
        }
    }
}

/// How long a probe waits for an answer. Probes run in parallel, so the
/// matrix takes about this long; generous, for a loaded 2-core CI machine.
const PATIENCE: Duration = Duration::from_secs(2);

const Y: Option<bool> = Some(true);
const N: Option<bool> = Some(false);
const SKIP: Option<bool> = None;

/// from, to, probe, expected reachability in [per-side, shared, shared+wireguard].
type Row = (Who, [u8; 4], Probe, [Option<bool>; 3]);

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    // P9: classified reaches its allow-listed servers, nothing else.
    (Who::Cls, [192, 0, 2, 10], Probe::Tcp(445), [Y, Y, Y]),
    (Who::Cls, [192, 0, 2, 10], Probe::Tcp(443), [Y, N, N]),
    (Who::Cls, [192, 0, 2, 10], Probe::Tcp(8080), [N, N, N]),
    (Who::Cls, [192, 0, 2, 10], Probe::Udp(5000), [Y, Y, Y]),
    (Who::Cls, [192, 0, 2, 10], Probe::Udp(6000), [N, N, N]),
    (Who::Cls, [192, 0, 2, 10], Probe::Icmp, [N, N, N]),
    (Who::Cls, [192, 0, 2, 11], Probe::Tcp(445), [N, N, N]),
    (Who::Cls, [192, 0, 2, 53], Probe::Udp(53), [Y, N, Y]),
    (Who::Cls, [192, 0, 2, 53], Probe::Tcp(53), [Y, N, Y]),
    (Who::Cls, [192, 0, 2, 10], Probe::Udp(53), [N, N, N]),
    (Who::Cls, [203, 0, 113, 10], Probe::Tcp(80), [N, N, N]),
    (Who::Cls, [203, 0, 113, 10], Probe::Udp(53), [N, N, N]),
    (Who::Cls, [203, 0, 113, 10], Probe::Icmp, [N, N, N]),
    (Who::Cls, [198, 51, 100, 1], Probe::Icmp, [N, N, N]),
    // P8: nothing between the sides.
    (Who::Cls, [10, 10, 2, 2], Probe::Tcp(445), [N, N, N]),
    (Who::Cls, [10, 10, 2, 2], Probe::Udp(5000), [N, N, N]),
    (Who::Cls, [10, 10, 2, 2], Probe::Icmp, [N, N, N]),
    (Who::Gen, [10, 10, 1, 2], Probe::Tcp(445), [N, N, N]),
    (Who::Gen, [10, 10, 1, 2], Probe::Udp(5000), [N, N, N]),
    (Who::Gen, [10, 10, 1, 2], Probe::Icmp, [N, N, N]),
    // P7: the host offers nothing (a listener runs on each probed port).
    (Who::Cls, [10, 10, 1, 1], Probe::Tcp(22), [N, N, N]),
    (Who::Cls, [10, 10, 1, 1], Probe::Udp(53), [N, N, N]),
    (Who::Cls, [10, 10, 1, 1], Probe::Udp(67), [N, N, N]),
    (Who::Cls, [10, 10, 1, 1], Probe::Icmp, [N, N, N]),
    (Who::Cls, [10, 10, 2, 1], Probe::Tcp(22), [N, N, N]),
    (Who::Cls, [198, 51, 100, 2], Probe::Tcp(22), [N, N, N]),
    (Who::Gen, [10, 10, 2, 1], Probe::Tcp(22), [N, N, N]),
    (Who::Gen, [10, 10, 2, 1], Probe::Udp(53), [N, N, N]),
    (Who::Gen, [10, 10, 2, 1], Probe::Udp(67), [N, N, N]),
    (Who::Gen, [10, 10, 2, 1], Probe::Icmp, [N, N, N]),
    (Who::Gen, [10, 10, 1, 1], Probe::Tcp(22), [N, N, N]),
    (Who::Inet, [198, 51, 100, 2], Probe::Tcp(22), [N, N, N]),
    (Who::Inet, [198, 51, 100, 2], Probe::Udp(53), [N, N, N]),
    (Who::Inet, [198, 51, 100, 2], Probe::Icmp, [N, N, N]),
    (Who::Inet, [198, 51, 101, 2], Probe::Tcp(22), [N, SKIP, SKIP]),
    (Who::Srv, [198, 51, 100, 2], Probe::Tcp(22), [N, N, N]),
    // The host itself opens connections only to the update server (per-side
    // fixture: 203.0.113.10 tcp 80, routed by the general uplink; the shared
    // fixtures have none, so no route there either) and to the tunnel's
    // peer; its on-link gateways get nothing.
    (Who::Host, [203, 0, 113, 10], Probe::Tcp(80), [Y, SKIP, SKIP]),
    (Who::Host, [203, 0, 113, 10], Probe::Tcp(8080), [N, SKIP, SKIP]),
    (Who::Host, [203, 0, 113, 10], Probe::Udp(53), [N, SKIP, SKIP]),
    (Who::Host, [203, 0, 113, 10], Probe::Icmp, [N, SKIP, SKIP]),
    (Who::Host, [198, 51, 101, 1], Probe::Tcp(22), [N, SKIP, SKIP]),
    (Who::Host, [198, 51, 100, 1], Probe::Tcp(22), [N, N, N]),
    (Who::Host, [198, 51, 100, 1], Probe::Udp(53), [N, N, N]),
    (Who::Host, [10, 10, 2, 2], Probe::Tcp(445), [N, N, N]),
    // P10: general reaches the internet through NAT, never the classified side.
    (Who::Gen, [203, 0, 113, 10], Probe::Tcp(80), [Y, Y, Y]),
    (Who::Gen, [203, 0, 113, 10], Probe::Udp(5000), [Y, Y, Y]),
    (Who::Gen, [203, 0, 113, 10], Probe::Udp(53), [Y, Y, Y]),
    (Who::Gen, [203, 0, 113, 10], Probe::Icmp, [Y, Y, Y]),
    (Who::Gen, [192, 0, 2, 10], Probe::Tcp(445), [N, N, N]),
    (Who::Gen, [192, 0, 2, 10], Probe::Udp(5000), [N, N, N]),
    (Who::Gen, [192, 0, 2, 10], Probe::Icmp, [N, N, N]),
    (Who::Gen, [192, 0, 2, 53], Probe::Udp(53), [N, Y, N]),
    // Not listed as a classified server nor in general.deny: the internet.
    (Who::Gen, [192, 0, 2, 11], Probe::Tcp(445), [Y, Y, Y]),
    (Who::Gen, [198, 51, 100, 1], Probe::Icmp, [N, N, N]),
    (Who::Gen, [198, 51, 101, 1], Probe::Icmp, [N, SKIP, SKIP]),
    (Who::Gen, [10, 99, 0, 1], Probe::Icmp, [SKIP, SKIP, N]),
    // Nothing from outside gets in to a guest.
    (Who::Inet, [10, 10, 2, 2], Probe::Tcp(445), [N, N, N]),
    (Who::Inet, [10, 10, 2, 2], Probe::Udp(5000), [N, N, N]),
    (Who::Inet, [10, 10, 2, 2], Probe::Icmp, [N, N, N]),
    (Who::Srv, [10, 10, 1, 2], Probe::Tcp(445), [N, N, N]),
    (Who::Srv, [10, 10, 1, 2], Probe::Udp(5000), [N, N, N]),
    (Who::Srv, [10, 10, 1, 2], Probe::Icmp, [N, N, N]),
    // Anti-spoofing: a guest sends only from its own address. The first two
    // rows are the control: the forging socket with the real address.
    (Who::Gen, [203, 0, 113, 10], Probe::UdpFrom(5000, [10, 10, 2, 2]), [Y, Y, Y]),
    (Who::Cls, [192, 0, 2, 10], Probe::UdpFrom(5000, [10, 10, 1, 2]), [Y, Y, Y]),
    (Who::Gen, [203, 0, 113, 10], Probe::UdpFrom(5000, [10, 10, 2, 3]), [N, N, N]),
    (Who::Gen, [203, 0, 113, 10], Probe::UdpFrom(5000, [10, 10, 1, 2]), [N, N, N]),
    (Who::Gen, [203, 0, 113, 10], Probe::UdpFrom(5000, [203, 0, 113, 99]), [N, N, N]),
    (Who::Gen, [192, 0, 2, 10], Probe::UdpFrom(5000, [10, 10, 1, 2]), [N, N, N]),
    (Who::Cls, [192, 0, 2, 10], Probe::UdpFrom(5000, [10, 10, 1, 3]), [N, N, N]),
    (Who::Cls, [192, 0, 2, 10], Probe::UdpFrom(5000, [10, 10, 2, 2]), [N, N, N]),
    (Who::Cls, [203, 0, 113, 10], Probe::UdpFrom(5000, [10, 10, 2, 2]), [N, N, N]),
];

// --------------------------------------------------------------- listeners

/// TCP echo and UDP recorders in the namespaces, on 0.0.0.0, so that a
/// "not reachable" is the ruleset's doing and not a closed port.
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    udp_seen: Arc<Mutex<HashSet<String>>>,
}

impl Listeners {
    fn new() -> Listeners {
        Listeners {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            udp_seen: Arc::default(),
        }
    }

    fn tcp(&mut self, ns: &Netns, port: u16) -> Result<()> {
        let (path, stop) = (ns.path(), self.stop.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        self.threads.push(std::thread::spawn(move || {
            let l = match enter(&path).and_then(|_| {
                let l = TcpListener::bind(("0.0.0.0", port)).context("bind")?;
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        std::thread::spawn(move || serve_tcp(s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
        rx.recv()?
            .with_context(|| format!("tcp listener on {port} in {}", ns.name))
    }

    fn udp(&mut self, ns: &Netns, port: u16) -> Result<()> {
        let (path, stop, seen) = (ns.path(), self.stop.clone(), self.udp_seen.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        self.threads.push(std::thread::spawn(move || {
            let s = match enter(&path).and_then(|_| {
                let s = UdpSocket::bind(("0.0.0.0", port)).context("bind")?;
                s.set_read_timeout(Some(Duration::from_millis(20)))?;
                Ok(s)
            }) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    seen.lock()
                        .unwrap()
                        .insert(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        }));
        rx.recv()?
            .with_context(|| format!("udp listener on {port} in {}", ns.name))
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Echo the first line; then count what follows until EOF and report it
/// (the bulk-transfer mode of the rate-limit test).
fn serve_tcp(s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut w = s;
    let mut line = String::new();
    if r.read_line(&mut line).is_err() || w.write_all(line.as_bytes()).is_err() {
        return;
    }
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let _ = writeln!(w, "{total}");
}

// ----------------------------------------------------------------- world

struct World {
    shape: Shape,
    cfg: NetworkConfig,
    // Listeners and daemons first: they stop before the namespaces go.
    listeners: Listeners,
    daemons: Vec<Daemon>,
    host: Netns,
    cls: Netns,
    gen: Netns,
    world: Netns,
    srv: Netns,
    inet: Netns,
    token: AtomicUsize,
}

impl World {
    fn ns(&self, who: Who) -> &Netns {
        match who {
            Who::Host => &self.host,
            Who::Cls => &self.cls,
            Who::Gen => &self.gen,
            Who::World => &self.world,
            Who::Srv => &self.srv,
            Who::Inet => &self.inet,
        }
    }

    /// Builds the world for a shape's fixture, edited by `edit`.
    fn build(shape: Shape, edit: impl Fn(&str) -> String) -> Result<World> {
        // Tunnel keys for this run, in files as on the appliance.
        let keys = tempfile::tempdir()?;
        let mut text = edit(shape.fixture());
        let mut peer_key_file = None;
        let mut host_public = String::new();
        if text.contains("[classified.wireguard]") {
            let key = |name: &str| -> Result<(String, String)> {
                let private = run(&["wg", "genkey"])?;
                let public = run_with_input(&["wg", "pubkey"], &private)?;
                let path = keys.path().join(name);
                std::fs::write(&path, &private)?;
                Ok((path.display().to_string(), public.trim().to_string()))
            };
            let (host_file, host_pub) = key("host.key")?;
            let (peer_file, peer_pub) = key("peer.key")?;
            text = text
                .replace("/var/lib/airlock/provision/wg-classified.key", &host_file)
                .replace("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", &peer_pub);
            peer_key_file = Some(peer_file);
            host_public = host_pub;
        }
        let cfg = NetworkConfig::from_toml(&text)?;
        let mut w = World {
            shape,
            daemons: Vec::new(),
            listeners: Listeners::new(),
            host: Netns::new("host")?,
            cls: Netns::new("cls")?,
            gen: Netns::new("gen")?,
            world: Netns::new("world")?,
            srv: Netns::new("srv")?,
            inet: Netns::new("inet")?,
            cfg,
            token: AtomicUsize::new(0),
        };
        let (h, wd) = (&w.host, &w.world);

        // The outside: servers behind a router.
        veth(wd, "w-srv", &w.srv, "eth0")?;
        veth(wd, "w-inet", &w.inet, "eth0")?;
        for line in [
            "ip address add 192.0.2.1/24 dev w-srv",
            "ip address add 203.0.113.1/24 dev w-inet",
            "ip link set dev w-srv up",
            "ip link set dev w-inet up",
            "sysctl -q -w net.ipv4.ip_forward=1",
        ] {
            wd.exec(line)?;
        }
        for a in ["192.0.2.10/24", "192.0.2.11/24", "192.0.2.53/24"] {
            w.srv.exec(&format!("ip address add {a} dev eth0"))?;
        }
        w.srv.exec("ip link set dev eth0 up")?;
        w.srv.exec("ip route add default via 192.0.2.1")?;
        w.inet.exec("ip address add 203.0.113.10/24 dev eth0")?;
        w.inet.exec("ip link set dev eth0 up")?;
        w.inet.exec("ip route add default via 203.0.113.1")?;

        // The uplinks: the host's "physical NICs" with the router's ends.
        let ups: Vec<(&str, &str, &str, &str)> = match shape {
            Shape::PerSide => vec![
                (
                    "up-cls",
                    "w-cls",
                    "198.51.100.1/24",
                    "10.10.1.0/24 via 198.51.100.2",
                ),
                (
                    "up-gen",
                    "w-gen",
                    "198.51.101.1/24",
                    "10.10.2.0/24 via 198.51.101.2",
                ),
            ],
            Shape::Shared | Shape::SharedWireguard => vec![(
                "up0",
                "w-up0",
                "198.51.100.1/24",
                "10.10.0.0/16 via 198.51.100.2",
            )],
        };
        for (hif, wif, waddr, back) in ups {
            veth(h, hif, wd, wif)?;
            wd.exec(&format!("ip address add {waddr} dev {wif}"))?;
            wd.exec(&format!("ip link set dev {wif} up"))?;
            // A hostile upstream that routes the guest segments to the host.
            wd.exec(&format!("ip route add {back}"))?;
        }

        // The guests, on veths named as the taps QEMU would get.
        for (side_ns, tap, seg) in [
            (&w.cls, "tap-classified", &w.cfg.classified.segment),
            (&w.gen, "tap-general", &w.cfg.general.segment),
        ] {
            veth(h, tap, side_ns, "eth0")?;
            side_ns.exec(&format!("ip link set dev eth0 address {}", seg.guest_mac))?;
            side_ns.exec(&format!(
                "ip address add {}/{} dev eth0",
                seg.guest_address, seg.host_address.len
            ))?;
            side_ns.exec("ip link set dev eth0 up")?;
            side_ns.exec(&format!(
                "ip route add default via {}",
                seg.host_address.addr
            ))?;
        }

        // The tunnel's far end, at the configured endpoint behind the uplink.
        if let Some(wg) = w.cfg.classified.wireguard.clone() {
            let ep = wg.peer_endpoint;
            wd.exec(&format!("ip address add {}/24 dev w-up0", ep.ip()))?;
            w.wireguard_device(Who::World, "wg-peer")?;
            let peer_key = peer_key_file.as_deref().expect("peer key");
            let wd = &w.world;
            wd.exec(&format!(
                "wg set wg-peer private-key {peer_key} listen-port {} peer {host_public} allowed-ips {}/32",
                ep.port(),
                wg.address.addr
            ))?;
            wd.exec("ip address add 10.99.0.1/24 dev wg-peer")?;
            wd.exec("ip link set dev wg-peer up")?;
        }

        // As at boot: the boot plan, ruleset first, then the topology.
        for step in boot_plan(&w.cfg) {
            match step.kind {
                StepKind::Tap => continue,
                StepKind::Wireguard if step.argv[0] == "ip" => {
                    // ip link add name NAME type wireguard
                    assert_eq!(step.argv[..4], ["ip", "link", "add", "name"]);
                    let name = step.argv[4].clone();
                    w.wireguard_device(Who::Host, &name)?;
                }
                _ => {
                    let mut argv = vec!["ip", "netns", "exec", &w.host.name];
                    argv.extend(step.argv.iter().map(String::as_str));
                    let done = match &step.stdin {
                        Some(input) => run_with_input(&argv, input),
                        None => run(&argv),
                    };
                    done.with_context(|| format!("boot step {step}"))?;
                }
            }
        }
        drop(keys);
        Ok(w)
    }

    /// Creates a WireGuard interface: the kernel's if it has WireGuard,
    /// else wireguard-go's (a TUN device configured by the same `wg`).
    fn wireguard_device(&mut self, who: Who, name: &str) -> Result<()> {
        let ns = self.ns(who);
        if ns
            .exec(&format!("ip link add name {name} type wireguard"))
            .is_ok()
        {
            return Ok(());
        }
        // wireguard-go's configuration socket is named after the interface
        // in one directory for all namespaces: clear a stale one first.
        let sock = std::path::PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut d = Daemon::start(ns, &["wireguard-go", "-f", name], &[("LOG_LEVEL", "error")])
            .context("no kernel WireGuard; starting wireguard-go (package wireguard-go)")?;
        d.leaves = Some(sock.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        // Ready when its configuration socket exists (after the TUN device).
        while !(ns.succeeds(&format!("ip link show dev {name}")) && sock.exists()) {
            d.check_running()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "wireguard-go made no {name} in 5 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.daemons.push(d);
        Ok(())
    }

    /// Starts a listener for every (namespace, protocol, port) the matrix
    /// probes, plus the bulk ports.
    fn listen(&mut self, rows: &[&Row]) -> Result<()> {
        let mut want: BTreeSet<(Who, bool, u16)> = BTreeSet::new();
        for (_, to, probe, _) in rows {
            let who = owner(Ipv4Addr::from(*to));
            match probe {
                Probe::Tcp(p) => {
                    want.insert((who, true, *p));
                }
                Probe::Udp(p) | Probe::UdpFrom(p, _) => {
                    want.insert((who, false, *p));
                }
                Probe::Icmp => {}
            }
        }
        for (who, tcp, port) in want {
            let ns = match who {
                Who::Host => &self.host,
                Who::Cls => &self.cls,
                Who::Gen => &self.gen,
                Who::World => &self.world,
                Who::Srv => &self.srv,
                Who::Inet => &self.inet,
            };
            if tcp {
                self.listeners.tcp(ns, port)?;
            } else {
                self.listeners.udp(ns, port)?;
            }
        }
        Ok(())
    }

    fn token(&self, what: &str) -> String {
        format!(
            "{:?}-{}-{what}",
            self.shape,
            self.token.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// Sends one probe; true if it got through.
    fn probe(&self, from: Who, to: Ipv4Addr, probe: Probe) -> bool {
        let src = self.ns(from);
        match probe {
            Probe::Icmp => src.succeeds(&format!("ping -n -q -c 1 -i 0.5 -w 2 {to}")),
            Probe::Tcp(port) => {
                let token = self.token("tcp");
                let path = src.path();
                std::thread::spawn(move || -> Result<bool> {
                    enter(&path)?;
                    let Ok(mut s) =
                        TcpStream::connect_timeout(&SocketAddr::from((to, port)), PATIENCE)
                    else {
                        return Ok(false);
                    };
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    writeln!(s, "{token}")?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line)?;
                    Ok(line.trim() == token)
                })
                .join()
                .unwrap()
                .unwrap_or(false)
            }
            Probe::Udp(port) | Probe::UdpFrom(port, _) => {
                let token = self.token("udp");
                let path = src.path();
                let forged = match probe {
                    Probe::UdpFrom(_, s) => Some(Ipv4Addr::from(s)),
                    _ => None,
                };
                let t = token.clone();
                let sent = std::thread::spawn(move || -> Result<()> {
                    enter(&path)?;
                    let s = match forged {
                        Some(a) => spoofing_udp_socket(a)?,
                        None => UdpSocket::bind(("0.0.0.0", 0))?,
                    };
                    for _ in 0..3 {
                        s.send_to(t.as_bytes(), (to, port))?;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Ok(())
                })
                .join()
                .unwrap();
                match sent {
                    Ok(()) => {}
                    // The host's own output chain drops it: the kernel
                    // answers the sender with EPERM. Blocked, as a timeout.
                    Err(e)
                        if from == Who::Host
                            && e.downcast_ref::<std::io::Error>()
                                .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM)) =>
                    {
                        return false
                    }
                    Err(e) => panic!("udp probe from {from:?} could not send: {e:#}"),
                }
                let deadline = Instant::now() + PATIENCE;
                while Instant::now() < deadline {
                    if self.listeners.udp_seen.lock().unwrap().contains(&token) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                false
            }
        }
    }
}

/// Probes all rows in parallel; returns (row, got) for each.
fn run_matrix(w: &World, rows: &[&Row]) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .iter()
            .map(|(from, to, probe, _)| {
                s.spawn(move || w.probe(*from, Ipv4Addr::from(*to), *probe))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check_matrix(w: &mut World) {
    let col = w.shape.column();
    let rows: Vec<&Row> = MATRIX.iter().filter(|r| r.3[col].is_some()).collect();

    // P7: before the test starts any listener, nothing listens on the host
    // but the tunnel's own UDP port (which the ruleset opens to the peer
    // only) and, with wireguard-go, its configuration socket.
    let ss = w.host.exec("ss -l -n -H -A inet,unix,packet").unwrap();
    let wg_port = w
        .cfg
        .classified
        .wireguard
        .as_ref()
        .map(|wg| format!("0.0.0.0:{} ", wg.listen_port));
    let unexpected: Vec<&str> = ss
        .lines()
        .filter(|l| {
            let v6 = wg_port.as_ref().map(|p| p.replace("0.0.0.0:", "[::]:"));
            let tunnel = wg_port.as_ref().is_some_and(|p| {
                l.starts_with("udp")
                    && (l.contains(p.as_str()) || l.contains(v6.as_deref().unwrap_or(p)))
            }) || (wg_port.is_some()
                && l.starts_with("u_str")
                && l.contains(" /var/run/wireguard/"));
            !tunnel
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "{:?}: something listens in the host namespace: {unexpected:#?}\n(all of ss -l:\n{ss})",
        w.shape
    );
    if let Some(p) = &wg_port {
        assert!(
            ss.contains(p.as_str()),
            "{:?}: the tunnel does not listen on {p}:\n{ss}",
            w.shape
        );
    }

    w.listen(&rows).unwrap();
    let got = run_matrix(w, &rows);
    let mut report = String::new();
    let mut wrong = 0;
    for (row, got) in rows.iter().zip(&got) {
        let (from, to, probe, expect) = row;
        let want = expect[col].unwrap();
        let mark = if want == *got { "  " } else { "!!" };
        if want != *got {
            wrong += 1;
        }
        report.push_str(&format!(
            "{mark} {:<5} -> {:<15} {:<24} expected {:<13} got {}\n",
            format!("{from:?}"),
            Ipv4Addr::from(*to).to_string(),
            probe.to_string(),
            if want { "reachable" } else { "unreachable" },
            if *got { "reachable" } else { "unreachable" }
        ));
    }
    eprintln!(
        "{:?} reachability matrix ({} probes):\n{report}",
        w.shape,
        rows.len()
    );
    assert_eq!(
        wrong, 0,
        "{:?}: {wrong} probes differ from the matrix:\n{report}",
        w.shape
    );
}

/// A guest that changes its MAC (keeping its address) gets nothing through;
/// put back, it does. The gateway's neighbour entry is pinned so the probe
/// tests the IPv4 frame itself, not a failed ARP.
fn check_mac_spoofing(w: &World) {
    for (who, ns, to, br, own_mac, fake_mac) in [
        (
            Who::Gen,
            &w.gen,
            [203, 0, 113, 10],
            "br-general",
            w.cfg.general.segment.guest_mac,
            "52:54:00:b2:00:99",
        ),
        (
            Who::Cls,
            &w.cls,
            [192, 0, 2, 10],
            "br-classified",
            w.cfg.classified.segment.guest_mac,
            "52:54:00:a1:00:99",
        ),
    ] {
        let gw = w
            .cfg
            .segment(if who == Who::Gen {
                airlock_network::Side::General
            } else {
                airlock_network::Side::Classified
            })
            .host_address
            .addr;
        let br_mac = w
            .host
            .exec(&format!("cat /sys/class/net/{br}/address"))
            .unwrap();
        // (A MAC change flushes the neighbour table, so pin after it.)
        ns.exec(&format!("ip link set dev eth0 address {fake_mac}"))
            .unwrap();
        ns.exec(&format!(
            "ip neigh replace {gw} lladdr {} dev eth0 nud permanent",
            br_mac.trim()
        ))
        .unwrap();
        let spoofed = w.probe(who, Ipv4Addr::from(to), Probe::Udp(5000));
        ns.exec(&format!("ip link set dev eth0 address {own_mac}"))
            .unwrap();
        ns.exec(&format!(
            "ip neigh replace {gw} lladdr {} dev eth0 nud permanent",
            br_mac.trim()
        ))
        .unwrap();
        let real = w.probe(who, Ipv4Addr::from(to), Probe::Udp(5000));
        assert!(
            !spoofed,
            "{:?}: {who:?} with MAC {fake_mac} reached {:?}",
            w.shape, to
        );
        assert!(
            real,
            "{:?}: {who:?} with its own MAC did not reach {:?} (control)",
            w.shape, to
        );
    }
}

/// ARP: a guest resolves its gateway from its own address, but an ARP
/// request that claims another address gets no answer.
fn check_arp_spoofing(w: &World) {
    for (ns, seg, fake) in [
        (&w.gen, &w.cfg.general.segment, "10.10.2.3"),
        (&w.cls, &w.cfg.classified.segment, "10.10.1.3"),
    ] {
        let gw = seg.host_address.addr;
        let real = ns.succeeds(&format!(
            "arping -q -c 2 -w 2 -I eth0 -s {} {gw}",
            seg.guest_address
        ));
        ns.exec(&format!("ip address add {fake}/32 dev eth0"))
            .unwrap();
        let spoofed = ns.succeeds(&format!("arping -q -c 2 -w 2 -I eth0 -s {fake} {gw}"));
        ns.exec(&format!("ip address del {fake}/32 dev eth0"))
            .unwrap();
        assert!(
            real,
            "{:?}: ARP from the guest's own address got no reply (control)",
            w.shape
        );
        assert!(!spoofed, "{:?}: ARP claiming {fake} was answered", w.shape);
    }
}

fn world(shape: Shape) -> World {
    world_edited(shape, str::to_string)
}

fn world_edited(shape: Shape, edit: impl Fn(&str) -> String) -> World {
    require_root();
    World::build(shape, edit).unwrap_or_else(|e| panic!("{shape:?}: setting up namespaces: {e:#}"))
}

#[test]
fn per_side_uplinks_matrix() {
    let mut w = world(Shape::PerSide);
    check_matrix(&mut w);
    check_mac_spoofing(&w);
    check_arp_spoofing(&w);
}

#[test]
fn shared_uplink_matrix() {
    let mut w = world(Shape::Shared);
    check_matrix(&mut w);
    check_mac_spoofing(&w);
    check_arp_spoofing(&w);
}

#[test]
fn shared_uplink_wireguard_matrix_and_no_leak_outside_the_tunnel() {
    let mut w = world(Shape::SharedWireguard);
    check_matrix(&mut w);
    // The classified rows above went through a real tunnel.
    let hs = w
        .host
        .exec("wg show wg-classified latest-handshakes")
        .unwrap();
    let when: u64 = hs
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(when > 0, "no WireGuard handshake with the peer: {hs:?}");
    check_mac_spoofing(&w);
    // P15: route the server out of the plain uplink instead of the tunnel
    // (a routing mistake, or a tunnel that went away): it must not leave.
    let srv = Ipv4Addr::new(192, 0, 2, 10);
    let dropped_before = default_drops(&w);
    w.host
        .exec("ip route replace 192.0.2.10/32 via 198.51.100.1 dev up0 table 101")
        .unwrap();
    let leaked = w.probe(Who::Cls, srv, Probe::Tcp(445));
    let leaked_udp = w.probe(Who::Cls, srv, Probe::Udp(5000));
    w.host
        .exec("ip route replace 192.0.2.10/32 dev wg-classified table 101")
        .unwrap();
    let tunnelled = w.probe(Who::Cls, srv, Probe::Tcp(445));
    assert!(
        !leaked && !leaked_udp,
        "classified traffic left by the uplink instead of the tunnel"
    );
    assert!(
        tunnelled,
        "back through the tunnel the server is reachable again (control)"
    );
    // It was the ruleset's default drop that stopped them.
    let dropped_after = default_drops(&w);
    assert!(
        dropped_after > dropped_before,
        "forward default-drop counter {dropped_before} -> {dropped_after}"
    );
}

/// Packets counted by the forward chain's final `counter comment "default drop"`.
fn default_drops(w: &World) -> u64 {
    let fwd = w.host.exec("nft list chain inet airlock forward").unwrap();
    let line = fwd
        .lines()
        .find(|l| l.contains("comment \"default drop\""))
        .unwrap_or_else(|| panic!("{fwd}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets").expect("counter");
    words[at + 1].parse().unwrap()
}

/// P14: the general side's new-connection rate and bandwidth are policed;
/// the classified side, unlimited, shows the measurement could see more.
#[test]
fn general_rate_limits_hold() {
    let mut w = world(Shape::PerSide);
    let rl = w.cfg.general.rate_limit;
    assert_eq!(
        (rl.new_connections_per_second, rl.egress_mbit),
        (20, 20),
        "fixture changed"
    );
    let rows: Vec<&Row> = vec![
        &(Who::Gen, [203, 0, 113, 10], Probe::Tcp(80), [Y, Y, Y]),
        &(Who::Cls, [192, 0, 2, 10], Probe::Tcp(443), [Y, Y, Y]),
    ];
    w.listen(&rows).unwrap();

    // 100 simultaneous connection attempts: the burst (40) and about one
    // second's worth (20) get through, the rest are dropped.
    std::thread::sleep(Duration::from_millis(2500)); // let the bucket fill
    let path = w.gen.path();
    let ok = std::thread::scope(|s| {
        let hs: Vec<_> = (0..100)
            .map(|_| {
                let path = path.clone();
                s.spawn(move || {
                    enter(&path).unwrap();
                    TcpStream::connect_timeout(
                        &SocketAddr::from(([203, 0, 113, 10], 80)),
                        Duration::from_millis(700),
                    )
                    .is_ok()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(false))
            .filter(|ok| *ok)
            .count()
    });
    eprintln!("general: {ok} of 100 simultaneous connections admitted (limit 20/s, burst 40)");
    assert!(
        (10..=70).contains(&ok),
        "{ok} of 100 connections got through a 20/s, burst 40 limit"
    );

    std::thread::sleep(Duration::from_millis(1500));
    let bulk = |who: Who, to: [u8; 4], port: u16| -> f64 {
        let path = w.ns(who).path();
        std::thread::spawn(move || -> Result<f64> {
            enter(&path)?;
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            writeln!(s, "bulk")?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut line = String::new();
            r.read_line(&mut line)?;
            let chunk = vec![0x5au8; 64 * 1024];
            let total = 16 * 1024 * 1024;
            let start = Instant::now();
            for _ in 0..total / chunk.len() {
                s.write_all(&chunk)?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            line.clear();
            r.read_line(&mut line)?;
            let secs = start.elapsed().as_secs_f64();
            let got: u64 = line.trim().parse().context("byte count")?;
            anyhow::ensure!(got == total as u64, "server counted {got} of {total} bytes");
            Ok(got as f64 * 8.0 / secs / 1e6)
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("bulk transfer from {who:?}: {e:#}"))
    };
    let general = bulk(Who::Gen, [203, 0, 113, 10], 80);
    let classified = bulk(Who::Cls, [192, 0, 2, 10], 443);
    eprintln!("upload of 16 MiB: general {general:.1} Mbit/s (limit 20), classified {classified:.1} Mbit/s (no limit)");
    // nftables' byte bucket holds one second at the rate plus the burst
    // (2.5 + 0.25 MB here), so 16 MiB take at least (16.8 - 2.75) / 2.5 s:
    // at most 24 Mbit/s on average.
    assert!(
        general <= 26.0,
        "general uploaded at {general:.1} Mbit/s through a 20 Mbit/s limit"
    );
    assert!(classified > general * 2.0, "the unlimited path ({classified:.1}) should be far faster than the limited one ({general:.1})");
}

/// In a world of `shape` whose host has no ruleset, every one of `rows`
/// gets through.
fn assert_open_without_the_ruleset(shape: Shape, rows: &[&Row]) {
    let mut w = world(shape);
    w.host.exec("nft flush ruleset").unwrap();
    w.listen(rows).unwrap();
    let got = run_matrix(&w, rows);
    for (row, got) in rows.iter().zip(got) {
        assert!(
            got,
            "without a ruleset {:?} -> {} {} should get through",
            row.0,
            Ipv4Addr::from(row.1),
            row.2
        );
    }
}

/// The probes can see a path when there is one: without the ruleset, rows
/// that the ruleset must block do get through. (Guards against a matrix
/// that passes because the probes never reach anything.)
#[test]
fn probes_detect_open_paths_without_the_ruleset() {
    let rows: Vec<&Row> = vec![
        &(Who::Cls, [10, 10, 1, 1], Probe::Tcp(22), [Y, Y, Y]),
        &(Who::Gen, [10, 10, 2, 1], Probe::Udp(67), [Y, Y, Y]),
        // Out by the uplink and back in through the hostile upstream.
        &(Who::Gen, [10, 10, 1, 2], Probe::Udp(5000), [Y, Y, Y]),
        &(
            Who::Gen,
            [192, 0, 2, 10],
            Probe::UdpFrom(5000, [10, 10, 1, 2]),
            [Y, Y, Y],
        ),
        &(
            Who::Gen,
            [203, 0, 113, 10],
            Probe::UdpFrom(5000, [10, 10, 2, 3]),
            [Y, Y, Y],
        ),
        &(Who::Inet, [10, 10, 2, 2], Probe::Tcp(445), [Y, Y, Y]),
    ];
    assert_open_without_the_ruleset(Shape::Shared, &rows);
}

/// The host-side rows above are the ruleset's doing: without it, the host
/// reaches its gateway and the update server's other ports.
#[test]
fn without_the_ruleset_the_host_reaches_more_than_the_update_server() {
    let rows: Vec<&Row> = vec![
        &(Who::Host, [203, 0, 113, 10], Probe::Tcp(8080), [Y, Y, Y]),
        &(Who::Host, [198, 51, 101, 1], Probe::Tcp(22), [Y, Y, Y]),
        &(Who::Host, [198, 51, 100, 1], Probe::Udp(53), [Y, Y, Y]),
    ];
    assert_open_without_the_ruleset(Shape::PerSide, &rows);
}

/// P14: the general guest holds at most `max_connections` connections at
/// once; a closed one frees its place.
#[test]
fn general_concurrent_connections_are_capped() {
    let mut w = world_edited(Shape::PerSide, |t| {
        t.replace("max_connections = 256", "max_connections = 10")
    });
    assert_eq!(
        w.cfg.general.rate_limit.max_connections, 10,
        "fixture changed"
    );
    w.listen(&[&(Who::Gen, [203, 0, 113, 10], Probe::Tcp(80), [Y, Y, Y])])
        .unwrap();
    let path = w.gen.path();
    let connect = move |n: usize| -> Vec<Option<TcpStream>> {
        let path = path.clone();
        std::thread::spawn(move || {
            enter(&path).unwrap();
            (0..n)
                .map(|_| {
                    TcpStream::connect_timeout(
                        &SocketAddr::from(([203, 0, 113, 10], 80)),
                        Duration::from_millis(1500),
                    )
                    .ok()
                })
                .collect()
        })
        .join()
        .unwrap()
    };
    let held = connect(10);
    assert!(
        held.iter().all(Option::is_some),
        "the first 10 connections must open"
    );
    let over = connect(3);
    assert!(
        over.iter().all(Option::is_none),
        "an 11th concurrent connection opened"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let again = connect(1);
    assert!(
        again[0].is_some(),
        "closing connections must free their places"
    );
}
