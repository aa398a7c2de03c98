//! Part of `/init` (`main.rs`), not of the library: the system side of the
//! network commands (protocol in `lib.rs`, pure parts in `net.rs`).
//!
//! Interfaces and the default route are set with the classic ioctls
//! (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS`, `SIOCADDRT`) through
//! `libc`, which the guest already uses: one IPv4 address and one route
//! need no netlink library. The sockets are the standard library's, except
//! the ICMP datagram socket for `icmp-ping`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use airlock_test_guest::net::{self, Datagram};
use airlock_test_guest::protocol;

use crate::lock;

/// Ports with a TCP listener thread.
static TCP_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());
/// Ports with a UDP listener thread.
static UDP_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());
/// Datagrams received since boot, and the last [`protocol::UDP_KEPT`].
static UDP_LOG: Mutex<(u64, VecDeque<Datagram>)> = Mutex::new((0, VecDeque::new()));

/// Lets root (and everyone: the guest has no one else) open ICMP datagram
/// sockets, for `icmp-ping`.
pub fn allow_ping_sockets() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647") {
        println!("airlock-test-guest: ping_group_range: {e}");
    }
}

/// `<ip> <port> <timeout_ms>` from the command's words.
fn target<'a>(
    words: &mut impl Iterator<Item = &'a str>,
    usage: &str,
) -> Result<(SocketAddr, Duration), String> {
    let (Some(ip), Some(port), Some(ms)) = (words.next(), words.next(), words.next()) else {
        return Err(format!("usage: {usage}"));
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let ms: u64 = ms
        .parse()
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("{ms:?} is not a timeout in ms"))?;
    Ok((SocketAddr::new(ip, port), Duration::from_millis(ms)))
}

fn port_arg<'a>(words: &mut impl Iterator<Item = &'a str>, usage: &str) -> Result<u16, String> {
    let (Some(port), None) = (words.next(), words.next()) else {
        return Err(format!("usage: {usage}"));
    };
    port.parse().map_err(|_| format!("{port:?} is not a port"))
}

/// The reply for a failed connect or receive: `refused`, `timeout` or
/// `error ...`.
fn failure(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".into(),
        _ if matches!(
            e.raw_os_error(),
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH)
        ) =>
        {
            format!("error unreachable: {e}")
        }
        _ => format!("error {e}"),
    }
}

/// `line` after its first `n` words and the one space after them (the
/// payload of `udp-send` and `udp-fetch`, spaces kept).
fn rest_after(line: &str, n: usize) -> &str {
    let mut rest = line;
    for _ in 0..n {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace).unwrap_or(rest.len())..];
    }
    rest.strip_prefix([' ', '\t']).unwrap_or(rest)
}

/// Runs one network command line; `None` if it is not one.
pub fn handle(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let cmd = words.next()?;
    let words = &mut words;
    let result = match cmd {
        protocol::NET_UP => net_up(words),
        protocol::NET_INFO => Ok(net_info()),
        protocol::NET_MAC => net_mac(words),
        protocol::TCP_CONNECT => {
            target(words, "tcp-connect <ip> <port> <timeout_ms>").map(|(to, t)| {
                match TcpStream::connect_timeout(&to, t) {
                    Ok(s) => s
                        .local_addr()
                        .map_or_else(|e| format!("error {e}"), |a| format!("connected {a}")),
                    Err(e) => failure(&e),
                }
            })
        }
        protocol::TCP_FETCH => {
            target(words, "tcp-fetch <ip> <port> <timeout_ms>").map(|(to, t)| tcp_fetch(to, t))
        }
        protocol::TCP_LISTEN => port_arg(words, "tcp-listen <port>").and_then(tcp_listen),
        protocol::UDP_SEND => udp_send(words, rest_after(line, 3)),
        protocol::UDP_LISTEN => port_arg(words, "udp-listen <port>").and_then(udp_listen),
        protocol::UDP_RECEIVED => {
            let log = lock(&UDP_LOG);
            Ok(std::iter::once(format!("udp {}", log.0))
                .chain(log.1.iter().map(|d| d.to_string()))
                .collect::<Vec<_>>()
                .join(" "))
        }
        protocol::UDP_FETCH => udp_fetch(words, rest_after(line, 4)),
        protocol::ICMP_PING => {
            let (Some(ip), Some(ms), None) = (words.next(), words.next(), words.next()) else {
                return Some("error usage: icmp-ping <ip> <timeout_ms>".into());
            };
            match (ip.parse::<Ipv4Addr>(), ms.parse::<u64>()) {
                (Ok(ip), Ok(ms)) if ms > 0 => Ok(icmp_ping(ip, Duration::from_millis(ms))),
                _ => Err("usage: icmp-ping <ipv4> <timeout_ms>".into()),
            }
        }
        _ => return None,
    };
    Some(result.unwrap_or_else(|e| format!("error {e}")))
}

fn tcp_fetch(to: SocketAddr, timeout: Duration) -> String {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return failure(&e),
    };
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(left));
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while !line.contains(&b'\n') && line.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if line.is_empty() => return format!("error connected, no line: {e}"),
            Err(_) => break,
        }
    }
    if line.is_empty() {
        return "error connected, no line: the server closed without sending".into();
    }
    let text = String::from_utf8_lossy(&line);
    format!("line {}", text.lines().next().unwrap_or_default())
}

/// Binds with `bind` and runs `serve` on a thread of its own, once per
/// port in `ports`: listening again on a port is a no-op.
fn listen_once<S: Send + 'static>(
    ports: &Mutex<Vec<u16>>,
    port: u16,
    bind: impl FnOnce() -> io::Result<S>,
    serve: impl FnOnce(S) + Send + 'static,
) -> Result<(), String> {
    let mut ports = lock(ports);
    if !ports.contains(&port) {
        let socket = bind().map_err(|e| format!("listening on {port}: {e}"))?;
        ports.push(port);
        std::thread::spawn(move || serve(socket));
    }
    Ok(())
}

fn tcp_listen(port: u16) -> Result<String, String> {
    listen_once(
        &TCP_PORTS,
        port,
        || TcpListener::bind(("0.0.0.0", port)),
        |listener| {
            for mut stream in listener.incoming().flatten() {
                if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) {
                    let _ = stream.write_all(format!("{}\n", net::banner(local, peer)).as_bytes());
                }
                let _ = stream.shutdown(Shutdown::Both);
            }
        },
    )?;
    Ok(format!("ok listening {port}"))
}

fn udp_send<'a>(words: &mut impl Iterator<Item = &'a str>, text: &str) -> Result<String, String> {
    let (Some(ip), Some(port)) = (words.next(), words.next()) else {
        return Err("usage: udp-send <ip> <port> <text>".into());
    };
    let to = SocketAddr::new(
        ip.parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?,
        port.parse()
            .map_err(|_| format!("{port:?} is not a port"))?,
    );
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(to).map_err(|e| failure(&e))?;
    let n = socket.send(text.as_bytes()).map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    Ok(format!("ok sent {n} bytes from {local}"))
}

fn udp_listen(port: u16) -> Result<String, String> {
    listen_once(
        &UDP_PORTS,
        port,
        || UdpSocket::bind(("0.0.0.0", port)),
        move |socket| {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, source)) = socket.recv_from(&mut buf) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                {
                    let mut log = lock(&UDP_LOG);
                    log.0 += 1;
                    log.1.push_back(Datagram {
                        port,
                        source,
                        payload: buf[..n].to_vec(),
                    });
                    while log.1.len() > protocol::UDP_KEPT {
                        log.1.pop_front();
                    }
                }
                // The local address as the peer sees it: the one the route to it uses.
                let local = local_address_towards(source)
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port)));
                let _ = socket.send_to(
                    net::banner(SocketAddr::new(local.ip(), port), source).as_bytes(),
                    source,
                );
            }
        },
    )?;
    Ok(format!("ok listening udp {port}"))
}

/// The source address the kernel would use towards `peer`.
fn local_address_towards(peer: SocketAddr) -> Option<SocketAddr> {
    let probe = UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect(peer).ok()?;
    probe.local_addr().ok()
}

fn udp_fetch<'a>(words: &mut impl Iterator<Item = &'a str>, text: &str) -> Result<String, String> {
    let (to, timeout) = target(words, "udp-fetch <ip> <port> <timeout_ms> <text>")?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    // Connected, so that an ICMP port unreachable shows as ECONNREFUSED.
    if let Err(e) = socket.connect(to) {
        return Ok(failure(&e));
    }
    socket.send(text.as_bytes()).map_err(|e| failure(&e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    Ok(match socket.recv(&mut buf) {
        Ok(n) => format!(
            "reply {to} {}",
            String::from_utf8_lossy(&buf[..n])
                .trim_end()
                .replace('\n', " ")
        ),
        Err(e) => failure(&e),
    })
}

/// One echo request on an ICMP datagram socket (the kernel sets the
/// identifier and the checksum, and passes back only replies to it).
#[allow(unsafe_code)]
fn icmp_ping(ip: Ipv4Addr, timeout: Duration) -> String {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the descriptor is checked and then owned by the UdpSocket.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return format!("error icmp socket: {}", io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid datagram socket nobody else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    const ECHO_REQUEST: u8 = 8;
    const ECHO_REPLY: u8 = 0;
    let sequence: u16 = 1;
    let mut request = vec![ECHO_REQUEST, 0, 0, 0, 0, 0];
    request.extend_from_slice(&sequence.to_be_bytes());
    request.extend_from_slice(b"airlock-test-guest");
    let start = Instant::now();
    if let Err(e) = socket.send_to(&request, (ip, 0)) {
        return failure(&e);
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return "timeout".into();
        }
        let _ = socket.set_read_timeout(Some(left));
        match socket.recv_from(&mut buf) {
            Ok((n, from))
                if n >= 8 && buf[0] == ECHO_REPLY && buf[6..8] == sequence.to_be_bytes() =>
            {
                return format!(
                    "reply {:.2} from {}",
                    start.elapsed().as_secs_f64() * 1000.0,
                    from.ip()
                );
            }
            Ok(_) => {}
            Err(e) => return failure(&e),
        }
    }
}

/// `SIOCADDRT`'s `struct rtentry` (`linux/route.h`; the libc crate has it
/// only for musl and uclibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An IPv4 `struct sockaddr` (`sockaddr_in` laid out in `sa_data`).
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let mut sa_data = [0 as libc::c_char; 14];
    for (d, o) in sa_data[2..6].iter_mut().zip(addr.octets()) {
        *d = o as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

fn sockaddr_ip(sa: &libc::sockaddr) -> Ipv4Addr {
    Ipv4Addr::new(
        sa.sa_data[2] as u8,
        sa.sa_data[3] as u8,
        sa.sa_data[4] as u8,
        sa.sa_data[5] as u8,
    )
}

/// An `ifreq` for interface `name`, the rest zero.
#[allow(unsafe_code)]
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of plain data); all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req
}

/// ioctl(2) on `socket` with a pointer to `arg`.
#[allow(unsafe_code)]
fn ioctl<T>(
    socket: &UdpSocket,
    request: libc::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<(), io::Error> {
    // SAFETY: `arg` is the structure `request` expects (ifreq or rtentry), valid for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, arg as *mut T) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

#[allow(unsafe_code)]
fn set_up(socket: &UdpSocket, name: &str) -> io::Result<()> {
    let mut req = ifreq(name);
    ioctl(
        socket,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("SIOCGIFFLAGS {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(
        socket,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("SIOCSIFFLAGS {name}"),
    )
}

/// Interface names in `/sys/class/net`, sorted.
fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn sys(name: &str, file: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{name}/{file}"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The first interface of type ethernet (`ARPHRD_ETHER`), waiting up to
/// `wait` for the driver to make one.
fn first_ethernet(wait: Duration) -> Option<String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(name) = interfaces().into_iter().find(|n| sys(n, "type") == "1") {
            return Some(name);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn net_up<'a>(words: &mut impl Iterator<Item = &'a str>) -> Result<String, String> {
    let (Some(cidr), Some(gateway), None) = (words.next(), words.next(), words.next()) else {
        return Err("usage: net-up <address>/<prefix> <gateway>".into());
    };
    let (address, prefix) = net::parse_cidr(cidr)?;
    let gateway: Ipv4Addr = gateway
        .parse()
        .map_err(|_| format!("{gateway:?} is not an IPv4 address"))?;
    let name = first_ethernet(Duration::from_secs(5))
        .ok_or("no ethernet interface (no virtio-net-pci NIC, or virtio_net not loaded)")?;
    let e = |e: io::Error| e.to_string();
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(e)?;
    set_up(&socket, "lo").map_err(e)?;
    let mut req = ifreq(&name);
    req.ifr_ifru.ifru_addr = sockaddr(address);
    ioctl(
        &socket,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("SIOCSIFADDR {name}"),
    )
    .map_err(e)?;
    let mut req = ifreq(&name);
    req.ifr_ifru.ifru_netmask = sockaddr(net::netmask(prefix));
    ioctl(
        &socket,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("SIOCSIFNETMASK {name}"),
    )
    .map_err(e)?;
    set_up(&socket, &name).map_err(e)?;
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // Replace any earlier default route (a second net-up).
    for _ in 0..8 {
        let mut old = RtEntry {
            rt_gateway: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP,
            ..route
        };
        if ioctl(&socket, libc::SIOCDELRT, &mut old, "SIOCDELRT").is_err() {
            break;
        }
    }
    ioctl(
        &socket,
        libc::SIOCADDRT,
        &mut route,
        &format!("SIOCADDRT default via {gateway}"),
    )
    .map_err(e)?;
    Ok(format!(
        "ok net {name} {} {address}/{prefix}",
        sys(&name, "address")
    ))
}

fn net_mac<'a>(words: &mut impl Iterator<Item = &'a str>) -> Result<String, String> {
    let (Some(mac), None) = (words.next(), words.next()) else {
        return Err("usage: net-mac <mac>".into());
    };
    let mac = net::parse_mac(mac)?;
    let name = first_ethernet(Duration::from_secs(5)).ok_or("no ethernet interface")?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let mut req = ifreq(&name);
    let mut sa_data = [0 as libc::c_char; 14];
    for (d, b) in sa_data.iter_mut().zip(mac) {
        *d = b as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data,
    };
    ioctl(
        &socket,
        libc::SIOCSIFHWADDR,
        &mut req,
        &format!("SIOCSIFHWADDR {name}"),
    )
    .map_err(|e| e.to_string())?;
    Ok(format!("ok mac {name} {}", sys(&name, "address")))
}

/// `<address>/<prefix>` of an interface, `none` without one.
#[allow(unsafe_code)]
fn address_of(socket: &UdpSocket, name: &str) -> String {
    let mut req = ifreq(name);
    if ioctl(socket, libc::SIOCGIFADDR, &mut req, "SIOCGIFADDR").is_err() {
        return "none".into();
    }
    // SAFETY: SIOCGIFADDR filled the address member.
    let address = sockaddr_ip(unsafe { &req.ifr_ifru.ifru_addr });
    let mut req = ifreq(name);
    let prefix = match ioctl(socket, libc::SIOCGIFNETMASK, &mut req, "SIOCGIFNETMASK") {
        // SAFETY: SIOCGIFNETMASK filled the netmask member.
        Ok(()) => net::prefix_len(sockaddr_ip(unsafe { &req.ifr_ifru.ifru_netmask }))
            .map_or("?".into(), |p| p.to_string()),
        Err(_) => "?".into(),
    };
    format!("{address}/{prefix}")
}

fn net_info() -> String {
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return "error no socket".into();
    };
    let mut words = vec!["net".to_owned()];
    for name in interfaces() {
        let flags =
            u32::from_str_radix(sys(&name, "flags").trim_start_matches("0x"), 16).unwrap_or(0);
        let state = if flags & libc::IFF_UP as u32 != 0 {
            "up"
        } else {
            "down"
        };
        words.push(format!(
            "iface={name},{},{state},{}",
            sys(&name, "address"),
            address_of(&socket, &name)
        ));
    }
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    words.extend(
        net::parse_proc_route(&routes)
            .iter()
            .map(|r| format!("route={r}")),
    );
    words.join(" ")
}
