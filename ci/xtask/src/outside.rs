//! The test machine's outside world, on the CI host: what the appliance's
//! two uplinks lead to in the network acceptance tests.
//!
//! One network namespace per run, `airlock-acc-<pid>` (`<pid>` is the
//! suite's), holds:
//!
//! * two persistent taps, one per uplink, that the outer QEMU opens as
//!   `-netdev tap` (QEMU itself runs in the namespace, so the taps never
//!   appear in the CI host's own namespace): `acc-cls` with the classified
//!   uplink's gateway 192.168.77.1/24, `acc-gen` with the general uplink's
//!   gateway 192.168.78.1/24; the appliance sees them as two virtio NICs
//!   with fixed MACs, which the test image's udev names `upclassified` and
//!   `upgeneral` (ci/test-agent/overlay/etc/systemd/network/);
//! * on its loopback the classified server 10.20.0.10 and the "internet"
//!   host 198.51.100.20, with small TCP and UDP listeners ([`LISTEN`]) that
//!   answer one line naming the peer they saw (after the appliance's NAT:
//!   which uplink address, so which uplink the packet came by);
//! * routes back to the guest segments by the appliance's uplinks, as a
//!   hostile upstream would have, for the inbound probes ([`Outside::tcp`],
//!   [`Outside::udp`]).
//!
//! * the far end of the classified side's WireGuard tunnel (P15): a
//!   `wireguard-go` device `acc-wg` (this CI kernel has no WireGuard
//!   module), 10.99.0.1/24, listening on the classified gateway's port
//!   51820, with the test image's peer key ([`PEER_PRIVATE_KEY`]; its public
//!   half is in ci/test-agent/overlay/etc/airlock/appliance.toml) and one
//!   peer: the appliance, with the per-run key [`Outside::appliance_key`]
//!   that the suite gives `airlock flash --wireguard-key`. Classified
//!   traffic therefore reaches the classified server from 10.99.0.2, the
//!   PC's tunnel address (ci/test-agent/machine.toml);
//! * the PCs' update server 203.0.113.80, tcp 8080 ([`UPDATE_SERVER`]): a
//!   small HTTP/1.1 file server ([`Outside::serve_update`]) that serves one
//!   bundle at `/airlock/current.airlock` (or 404) and records each request
//!   with the bytes it managed to send; the test machine's `[network.update]`
//!   (ci/test-agent/machine.toml) names it, by the general uplink;
//! * nftables counters on its input: packets for the classified server that
//!   came in plain by the classified uplink (there must be none), and those
//!   that came out of the tunnel ([`Outside::server_packets`]).
//!
//! It does not forward (`ip_forward=0`): it is two gateways and two hosts,
//! not a path between the uplinks. Nothing in it is connected to the CI
//! host's own interfaces: no veth, no bridge, no route out, so nothing
//! leaks to or from the CI machine's network. IPv6 is off in it.
//!
//! Dropping an [`Outside`] stops the listeners and deletes the namespace
//! (QEMU, which lives in it, keeps it until it exits; `Vm`'s drop kills it).
//! A namespace left by a killed run (its pid gone) is deleted when the next
//! one is made. Needs root (`ip netns`, taps).

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use airlock::qemu::Nic;
use anyhow::{bail, ensure, Context, Result};

/// Names of the suite's namespaces: this prefix and the suite's pid.
pub const NAMESPACE_PREFIX: &str = "airlock-acc-";

/// One uplink as the outside sees it.
#[derive(Debug, Clone, Copy)]
pub struct UplinkEnd {
    /// The tap in the namespace (QEMU's `-netdev tap,ifname=`).
    pub tap: &'static str,
    /// The MAC of the appliance's NIC on it (its udev names the NIC by it).
    pub mac: &'static str,
    /// The uplink's gateway: this end's address, on a /24.
    pub gateway: Ipv4Addr,
    /// The appliance's address on the uplink (`[network.<side>.uplink]`).
    pub appliance: Ipv4Addr,
    /// The guest segment behind it, routed back by the appliance.
    pub segment: &'static str,
}

/// The classified uplink: `upclassified` in the test image.
pub const CLASSIFIED_UPLINK: UplinkEnd = UplinkEnd {
    tap: "acc-cls",
    mac: "52:54:00:77:00:02",
    gateway: Ipv4Addr::new(192, 168, 77, 1),
    appliance: Ipv4Addr::new(192, 168, 77, 2),
    segment: "10.10.1.0/24",
};

/// The general uplink: `upgeneral` in the test image.
pub const GENERAL_UPLINK: UplinkEnd = UplinkEnd {
    tap: "acc-gen",
    mac: "52:54:00:78:00:02",
    gateway: Ipv4Addr::new(192, 168, 78, 1),
    appliance: Ipv4Addr::new(192, 168, 78, 2),
    segment: "10.10.2.0/24",
};

/// The classified server (allow-listed for the classified guest: tcp 443
/// and udp 123, ci/test-agent/overlay/etc/airlock/appliance.toml).
pub const CLASSIFIED_SERVER: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 10);
/// The internet host.
pub const INTERNET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

/// The tunnel's far end in the namespace (`wg` device, its address).
pub const TUNNEL_DEVICE: &str = "acc-wg";
pub const TUNNEL_PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The appliance's tunnel address (`network.classified.wireguard.address`
/// in ci/test-agent/machine.toml): what the classified server sees.
pub const TUNNEL_APPLIANCE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The peer's port, on the classified gateway (`peer_endpoint`).
pub const TUNNEL_PORT: u16 = 51820;
/// The test peer's private key. A test key, public in this repository and
/// used nowhere else; its public half is the test image's
/// `peer_public_key` (a unit test below checks that they match).
pub const PEER_PRIVATE_KEY: &str = "aEsmmOJjiHTqmfIBzr2cbdyfl7lWh6Mf0SgdTBmZ4nA=";

/// The update server (`[network.update] url` in ci/test-agent/machine.toml).
pub const UPDATE_SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 80), 8080);
/// The one path it serves.
pub const UPDATE_PATH: &str = "/airlock/current.airlock";

/// One request the update server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    pub peer: SocketAddr,
    /// `GET /airlock/current.airlock`, and its `Range` header if any.
    pub request: String,
    pub status: u16,
    /// Body bytes the socket took before the client closed or the body ended.
    pub body_bytes: u64,
    /// The body's full length (what a complete download is).
    pub body_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// What listens outside. Besides the allowed ports, the classified server
/// listens on ports that are not allow-listed (tcp 8080, udp 443 and 8080),
/// so that a probe that times out there shows the ruleset at work, not a
/// missing listener.
pub const LISTEN: &[(Proto, Ipv4Addr, u16)] = &[
    (Proto::Tcp, CLASSIFIED_SERVER, 443),
    (Proto::Tcp, CLASSIFIED_SERVER, 8080),
    (Proto::Udp, CLASSIFIED_SERVER, 123),
    (Proto::Udp, CLASSIFIED_SERVER, 443),
    (Proto::Udp, CLASSIFIED_SERVER, 8080),
    (Proto::Tcp, INTERNET, 80),
    (Proto::Tcp, INTERNET, 443),
    (Proto::Udp, INTERNET, 53),
    (Proto::Udp, INTERNET, 123),
];

/// The line a listener answers with (TCP: one line, then it closes; UDP:
/// one datagram).
pub fn banner(local: SocketAddrV4, peer: SocketAddr) -> String {
    format!(
        "airlock-outside {} port {} peer {peer}",
        local.ip(),
        local.port()
    )
}

/// The namespace name for the suite's process `pid`.
pub fn namespace_name(pid: u32) -> String {
    format!("{NAMESPACE_PREFIX}{pid}")
}

/// Of the names in `/run/netns`, the suite's namespaces to delete before
/// making a new one: those whose process is gone, and any of our own pid.
pub fn stale_namespaces<'a>(
    names: impl IntoIterator<Item = &'a str>,
    own_pid: u32,
    alive: impl Fn(u32) -> bool,
) -> Vec<String> {
    names
        .into_iter()
        .filter_map(|name| {
            let pid: u32 = name.strip_prefix(NAMESPACE_PREFIX)?.parse().ok()?;
            (pid == own_pid || !alive(pid)).then(|| name.to_owned())
        })
        .collect()
}

/// A probe's outcome, in the test guest's words: `connected` / `reply
/// <text>`, `refused` (an RST or ICMP port unreachable: the packet got
/// there), `timeout` (dropped), `error <what>`.
fn outcome(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".into(),
        _ => format!("error {e}"),
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .with_context(|| format!("running ip -n {ns} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_command(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .arg("netns")
        .args(args)
        .output()
        .with_context(|| format!("running ip netns {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip netns {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread of its own that has entered the network namespace
/// at `path` (only that thread moves; sockets it makes stay there).
#[allow(unsafe_code)]
fn in_namespace<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on a namespace fd we own; it changes only this
        // thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in the outside namespace panicked"))?
}

/// `ip netns exec NS ARGS…` with `input` on stdin; its stdout.
fn in_ns(ns: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::process::Stdio;
    let what = format!("ip netns exec {ns} {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The counters' table in the namespace (see the module documentation).
fn counters_ruleset() -> String {
    format!(
        "table inet acc {{
	counter plain_to_server {{ }}
	counter tunnel_to_server {{ }}
	counter tunnel_outer {{ }}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname \"{cls}\" ip daddr {CLASSIFIED_SERVER} counter name plain_to_server
		iifname \"{TUNNEL_DEVICE}\" ip daddr {CLASSIFIED_SERVER} counter name tunnel_to_server
		iifname \"{cls}\" udp dport {TUNNEL_PORT} counter name tunnel_outer
	}}
}}
",
        cls = CLASSIFIED_UPLINK.tap
    )
}

/// The packet count in `nft list counter …` output (`packets N bytes M`).
fn counter_packets(listing: &str) -> Option<u64> {
    let w: Vec<&str> = listing.split_whitespace().collect();
    w.windows(2)
        .find(|p| p[0] == "packets")
        .and_then(|p| p[1].parse().ok())
}

/// Packets the outside received for the classified server, and tunnel
/// packets by the classified uplink ([`Outside::server_packets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerPackets {
    /// By the classified uplink, not through the tunnel.
    pub plain: u64,
    /// Out of the tunnel.
    pub tunnelled: u64,
    /// WireGuard's own UDP packets that came by the classified uplink.
    pub tunnel_outer: u64,
}

/// The outside world of one test machine; see the module documentation.
pub struct Outside {
    name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Every connection and datagram the listeners answered, as their lines.
    seen: Arc<Mutex<Vec<String>>>,
    /// Key files (the peer's, the appliance's) for this run.
    keys: tempfile::TempDir,
    /// The appliance's public key (the tunnel's one peer).
    appliance_public: String,
    /// The tunnel's far end (`wireguard-go -f`), killed on drop.
    tunnel: Option<std::process::Child>,
    /// What the update server serves at [`UPDATE_PATH`] (`None`: 404).
    update_file: Arc<Mutex<Option<PathBuf>>>,
    /// Every request it answered.
    update_requests: Arc<Mutex<Vec<UpdateRequest>>>,
}

impl std::fmt::Debug for Outside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outside").field("name", &self.name).finish()
    }
}

impl Outside {
    /// Makes the namespace, its taps and addresses, and starts the listeners.
    pub fn create() -> Result<Outside> {
        let own = std::process::id();
        let existing: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for stale in stale_namespaces(existing.iter().map(String::as_str), own, |pid| {
            PathBuf::from(format!("/proc/{pid}")).exists()
        }) {
            eprintln!("outside: deleting stale network namespace {stale}");
            // A killed run leaves its processes in it (its QEMU, the
            // tunnel's wireguard-go): they go first.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &stale]).output() {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) on a pid `ip netns pids` listed; no memory involved.
                    #[allow(unsafe_code)]
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            let _ = netns_command(&["delete", &stale]);
        }
        let name = namespace_name(own);
        netns_command(&["add", &name])
            .context("making the test machine's outside network namespace (needs root)")?;
        let keys = tempfile::Builder::new()
            .prefix("airlock-acc-keys.")
            .tempdir()
            .context("a directory for the tunnel keys")?;
        let mut outside = Outside {
            name,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            seen: Arc::new(Mutex::new(Vec::new())),
            keys,
            appliance_public: String::new(),
            tunnel: None,
            update_file: Arc::new(Mutex::new(None)),
            update_requests: Arc::new(Mutex::new(Vec::new())),
        };
        outside
            .set_up()
            .with_context(|| format!("setting up network namespace {}", outside.name))?;
        Ok(outside)
    }

    fn set_up(&mut self) -> Result<()> {
        let ns = self.name.clone();
        let ns = ns.as_str();
        // No IPv6 (no router advertisements or neighbour discovery towards
        // the appliance), and no forwarding between the two uplinks.
        in_ns(
            ns,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv4.ip_forward=0",
            ],
            None,
        )
        .context("sysctl in the namespace")?;
        ip(ns, &["link", "set", "dev", "lo", "up"])?;
        for host in [CLASSIFIED_SERVER, INTERNET, *UPDATE_SERVER.ip()] {
            ip(ns, &["address", "add", &format!("{host}/32"), "dev", "lo"])?;
        }
        for end in [CLASSIFIED_UPLINK, GENERAL_UPLINK] {
            ip(ns, &["tuntap", "add", "dev", end.tap, "mode", "tap"])?;
            ip(
                ns,
                &[
                    "address",
                    "add",
                    &format!("{}/24", end.gateway),
                    "dev",
                    end.tap,
                ],
            )?;
            ip(ns, &["link", "set", "dev", end.tap, "up"])?;
            // A hostile upstream routes the guest segments back to the appliance.
            // (`onlink`: the tap has no carrier until QEMU opens it.)
            ip(
                ns,
                &[
                    "route",
                    "add",
                    end.segment,
                    "via",
                    &end.appliance.to_string(),
                    "dev",
                    end.tap,
                    "onlink",
                ],
            )?;
        }
        self.set_up_tunnel()
            .context("the classified tunnel's far end")?;
        in_ns(ns, &["nft", "-f", "-"], Some(&counters_ruleset()))
            .context("the outside's packet counters")?;
        let (tcp, udp, update) = in_namespace(self.path(), || {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for &(proto, addr, port) in LISTEN {
                let at = SocketAddrV4::new(addr, port);
                match proto {
                    Proto::Tcp => tcp.push((
                        at,
                        TcpListener::bind(at).with_context(|| format!("tcp bind {at}"))?,
                    )),
                    Proto::Udp => udp.push((
                        at,
                        UdpSocket::bind(at).with_context(|| format!("udp bind {at}"))?,
                    )),
                }
            }
            let update = TcpListener::bind(UPDATE_SERVER)
                .with_context(|| format!("tcp bind {UPDATE_SERVER}"))?;
            Ok((tcp, udp, update))
        })?;
        update.set_nonblocking(true)?;
        let (stop, file, log) = (
            self.stop.clone(),
            self.update_file.clone(),
            self.update_requests.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match update.accept() {
                    Ok((stream, peer)) => {
                        let served = file.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        let log = log.clone();
                        // A connection of its own: a download may take minutes.
                        std::thread::spawn(move || {
                            if let Some(r) = serve_update_request(stream, peer, served.as_deref()) {
                                log.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
        for (at, listener) in tcp {
            listener.set_nonblocking(true)?;
            let (stop, seen) = (self.stop.clone(), self.seen.clone());
            self.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            let line = banner(at, peer);
                            let _ = stream.set_nonblocking(false);
                            let _ = writeln!(stream, "{line}");
                            seen.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("tcp {line}"));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        for (at, socket) in udp {
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (stop, seen) = (self.stop.clone(), self.seen.clone());
            self.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let line = banner(at, peer);
                        let _ = socket.send_to(line.as_bytes(), peer);
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("udp {line}"));
                    }
                }
            }));
        }
        Ok(())
    }

    /// The tunnel's far end: the appliance's key pair for this run, then
    /// `wireguard-go` in the namespace with the peer key and the appliance
    /// as its one peer.
    fn set_up_tunnel(&mut self) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let ns = self.name.clone();
        let write_key = |name: &str, text: &str| -> Result<PathBuf> {
            let path = self.keys.path().join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
            Ok(path)
        };
        let appliance_private =
            in_ns(&ns, &["wg", "genkey"], None).context("wg genkey (package wireguard-tools)")?;
        write_key("appliance.key", &appliance_private)?;
        self.appliance_public = in_ns(&ns, &["wg", "pubkey"], Some(&appliance_private))?
            .trim()
            .to_owned();
        let peer_key = write_key("peer.key", &format!("{PEER_PRIVATE_KEY}\n"))?;
        // wireguard-go's configuration socket is named after the device in
        // one directory for every namespace: clear a stale one first.
        let sock = PathBuf::from(format!("/var/run/wireguard/{TUNNEL_DEVICE}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "wireguard-go", "-f", TUNNEL_DEVICE])
            .env("LOG_LEVEL", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting wireguard-go (package wireguard-go)")?;
        self.tunnel = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(sock.exists()
            && in_ns(&ns, &["ip", "link", "show", "dev", TUNNEL_DEVICE], None).is_ok())
        {
            if let Some(status) = self
                .tunnel
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("wireguard-go exited ({status}) before making {TUNNEL_DEVICE}");
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "wireguard-go made no {TUNNEL_DEVICE} in 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let peer_key = peer_key.display().to_string();
        let port = TUNNEL_PORT.to_string();
        let allowed = format!("{TUNNEL_APPLIANCE}/32");
        let public = self.appliance_public.clone();
        in_ns(
            &ns,
            &[
                "wg",
                "set",
                TUNNEL_DEVICE,
                "private-key",
                &peer_key,
                "listen-port",
                &port,
                "peer",
                &public,
                "allowed-ips",
                &allowed,
            ],
            None,
        )?;
        ip(
            &ns,
            &[
                "address",
                "add",
                &format!("{TUNNEL_PEER}/24"),
                "dev",
                TUNNEL_DEVICE,
            ],
        )?;
        ip(&ns, &["link", "set", "dev", TUNNEL_DEVICE, "up"])?;
        Ok(())
    }

    /// The appliance's private key for this run, for `airlock flash
    /// --wireguard-key` (the file given to IT's command).
    pub fn appliance_key(&self) -> PathBuf {
        self.keys.path().join("appliance.key")
    }

    /// The appliance's public key: the tunnel's one peer.
    pub fn appliance_public(&self) -> &str {
        &self.appliance_public
    }

    /// What the counters say so far.
    pub fn server_packets(&self) -> Result<ServerPackets> {
        let read = |name: &str| -> Result<u64> {
            let listing = in_ns(
                &self.name,
                &["nft", "list", "counter", "inet", "acc", name],
                None,
            )?;
            counter_packets(&listing).with_context(|| format!("no packet count in {listing:?}"))
        };
        Ok(ServerPackets {
            plain: read("plain_to_server")?,
            tunnelled: read("tunnel_to_server")?,
            tunnel_outer: read("tunnel_outer")?,
        })
    }

    /// `wg show acc-wg DUMP` at the far end: the peer's public key, endpoint,
    /// latest handshake (seconds since the epoch, 0: never), bytes received
    /// and sent.
    pub fn tunnel_peer(&self) -> Result<(String, String, u64, u64, u64)> {
        let dump = in_ns(&self.name, &["wg", "show", TUNNEL_DEVICE, "dump"], None)?;
        // The first line is the device itself; the second the one peer.
        let peer = dump
            .lines()
            .nth(1)
            .with_context(|| format!("no peer in {dump:?}"))?;
        let f: Vec<&str> = peer.split('\t').collect();
        ensure!(f.len() >= 7, "unexpected wg dump line {peer:?}");
        let n = |i: usize| {
            f[i].parse::<u64>()
                .with_context(|| format!("field {i} of {peer:?}"))
        };
        Ok((f[0].to_owned(), f[2].to_owned(), n(4)?, n(5)?, n(6)?))
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace as a file, for [`crate::Vm::start_in_netns`].
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// The outer QEMU's two NICs: the classified uplink, then the general.
    pub fn nics() -> Vec<Nic> {
        [CLASSIFIED_UPLINK, GENERAL_UPLINK]
            .iter()
            .map(|end| Nic {
                netdev: format!("tap,ifname={},script=no,downscript=no", end.tap),
                mac: Some(end.mac.to_owned()),
            })
            .collect()
    }

    /// Every line the listeners answered so far (`tcp …` / `udp …`).
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A TCP connection from the outside to `to`: `connected <local>`,
    /// `refused`, `timeout` or `error …`.
    pub fn tcp(&self, to: SocketAddrV4, timeout: Duration) -> Result<String> {
        in_namespace(self.path(), move || {
            Ok(match TcpStream::connect_timeout(&to.into(), timeout) {
                Ok(s) => format!(
                    "connected {}",
                    s.local_addr().map_or("?".into(), |a| a.to_string())
                ),
                Err(e) => outcome(&e),
            })
        })
    }

    /// One UDP datagram from the outside to `to`, waiting for an answer:
    /// `reply <text>`, `refused`, `timeout` or `error …`.
    pub fn udp(&self, to: SocketAddrV4, timeout: Duration) -> Result<String> {
        in_namespace(self.path(), move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(timeout))?;
            if let Err(e) = socket.send(b"airlock-outside probe") {
                return Ok(outcome(&e));
            }
            let mut buf = [0u8; 2048];
            Ok(match socket.recv(&mut buf) {
                Ok(n) => format!("reply {}", String::from_utf8_lossy(&buf[..n]).trim()),
                Err(e) => outcome(&e),
            })
        })
    }
}

impl Outside {
    /// What the update server serves from now on (`None`: 404).
    pub fn serve_update(&self, file: Option<PathBuf>) {
        *self.update_file.lock().unwrap_or_else(|p| p.into_inner()) = file;
    }

    /// The update server's requests so far (each once the response ended).
    pub fn update_requests(&self) -> Vec<UpdateRequest> {
        self.update_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Answers one HTTP/1.1 request on the update server: `GET UPDATE_PATH`
/// with the served file (from `Range: bytes=N-` on: 206), else 404.
fn serve_update_request(
    stream: TcpStream,
    peer: SocketAddr,
    served: Option<&std::path::Path>,
) -> Option<UpdateRequest> {
    use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let mut range_start = None;
    let mut range = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
            range = format!(" ({})", v.trim());
            range_start = v
                .trim()
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    let mut words = first.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let request = format!("{method} {path}{range}");
    let mut out = stream;
    let file = served.filter(|_| method == "GET" && path == UPDATE_PATH);
    let Some(mut file) = file.and_then(|p| std::fs::File::open(p).ok()) else {
        let _ = out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return Some(UpdateRequest {
            peer,
            request,
            status: 404,
            body_bytes: 0,
            body_len: 0,
        });
    };
    let len = file.metadata().ok()?.len();
    let start = range_start.filter(|s| *s < len).unwrap_or(0);
    let head = if start > 0 {
        format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nConnection: close\r\n\r\n", len - start, len - 1)
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let status = if start > 0 { 206 } else { 200 };
    let mut sent = 0u64;
    if out.write_all(head.as_bytes()).is_ok() && file.seek(SeekFrom::Start(start)).is_ok() {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Counted as the socket takes it: a client that closes after
            // the header has taken only what it read and what fits in the
            // socket buffers.
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                match out.write(chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(w) => {
                        sent += w as u64;
                        chunk = &chunk[w..];
                    }
                }
            }
            if !chunk.is_empty() {
                break;
            }
        }
    }
    let _ = out.flush();
    Some(UpdateRequest {
        peer,
        request,
        status,
        body_bytes: sent,
        body_len: len - start,
    })
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut tunnel) = self.tunnel.take() {
            let _ = tunnel.kill();
            let _ = tunnel.wait();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{TUNNEL_DEVICE}.sock"));
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The listeners' sockets are closed now; the taps and addresses go
        // with the namespace once QEMU, which lives in it, has exited.
        if let Err(e) = netns_command(&["delete", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_namespaces_are_ours_with_a_dead_pid_or_our_own() {
        let names = [
            "airlock-acc-100",
            "airlock-acc-200",
            "airlock-acc-300",
            "airlock-acc-x",
            "other-400",
            "airlock-render-check",
        ];
        let stale = stale_namespaces(names, 300, |pid| pid == 200);
        assert_eq!(stale, ["airlock-acc-100", "airlock-acc-300"]);
        assert!(stale_namespaces(["airlock-acc-7"], 1, |_| true).is_empty());
    }

    #[test]
    fn names_and_banner() {
        assert_eq!(namespace_name(4242), "airlock-acc-4242");
        let line = banner(
            SocketAddrV4::new(CLASSIFIED_SERVER, 443),
            "192.168.77.2:40000".parse().unwrap(),
        );
        assert_eq!(
            line,
            "airlock-outside 10.20.0.10 port 443 peer 192.168.77.2:40000"
        );
    }

    #[test]
    fn uplinks_do_not_overlap_and_each_gateway_is_on_its_link() {
        for end in [CLASSIFIED_UPLINK, GENERAL_UPLINK] {
            assert_eq!(
                end.gateway.octets()[..3],
                end.appliance.octets()[..3],
                "{end:?}"
            );
            assert_ne!(end.gateway, end.appliance);
            // Interface names: at most 15 bytes.
            assert!(end.tap.len() <= 15);
        }
        assert_ne!(
            CLASSIFIED_UPLINK.gateway.octets()[..3],
            GENERAL_UPLINK.gateway.octets()[..3]
        );
        assert_ne!(CLASSIFIED_UPLINK.mac, GENERAL_UPLINK.mac);
    }

    #[test]
    fn the_test_images_peer_key_is_the_public_half_of_ours() {
        let shipped = include_str!("../../test-agent/overlay/etc/airlock/appliance.toml");
        let public = airlock::flash::wgkey::PrivateKey::parse(PEER_PRIVATE_KEY.as_bytes())
            .unwrap()
            .public();
        assert!(
            shipped.contains(&format!("peer_public_key = \"{public}\"")),
            "the test image's peer_public_key is not {public}"
        );
        assert!(shipped.contains(&format!(
            "peer_endpoint = \"{}:{TUNNEL_PORT}\"",
            CLASSIFIED_UPLINK.gateway
        )));
        let machine = include_str!("../../test-agent/machine.toml");
        assert!(machine.contains(&format!("address = \"{TUNNEL_APPLIANCE}/24\"")));
    }

    #[test]
    fn counters_parse_and_the_ruleset_names_the_devices() {
        assert_eq!(
            counter_packets(
                "table inet acc {\n\tcounter plain_to_server {\n\t\tpackets 12 bytes 760\n\t}\n}\n"
            ),
            Some(12)
        );
        assert_eq!(counter_packets("table inet acc { }"), None);
        let r = counters_ruleset();
        assert!(
            r.contains("iifname \"acc-cls\" ip daddr 10.20.0.10 counter name plain_to_server"),
            "{r}"
        );
        assert!(
            r.contains("iifname \"acc-wg\" ip daddr 10.20.0.10 counter name tunnel_to_server"),
            "{r}"
        );
    }

    #[test]
    fn nics_are_taps_in_uplink_order() {
        let nics = Outside::nics();
        assert_eq!(nics[0].netdev, "tap,ifname=acc-cls,script=no,downscript=no");
        assert_eq!(nics[0].mac.as_deref(), Some("52:54:00:77:00:02"));
        assert_eq!(nics[1].netdev, "tap,ifname=acc-gen,script=no,downscript=no");
    }
}
