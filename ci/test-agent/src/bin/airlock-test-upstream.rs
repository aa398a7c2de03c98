//! Test images only: the "outside world" of the acceptance suite's network
//! tests, made inside the appliance (ci/test-agent/overlay/etc/systemd/system/
//! airlock-test-upstream.service, before airlock-network.service).
//!
//! `setup`: a network namespace `upstream` joined to the host by a veth pair,
//! whose host end is the test profile's uplink NIC (`uplink0`); in the
//! namespace `wan0` has the uplink's gateway address, and its loopback the
//! classified server and the "internet" host.
//!
//! `serve`: moves into that namespace and listens on TCP there; each
//! connection gets one line `airlock-test-upstream <local ip> port <port>
//! peer <peer ip:port>` (the peer as seen, i.e. after the appliance's NAT)
//! and is logged to stdout (the journal). Nothing listens in the host's
//! own namespace.
//!
//! The addresses are the test profile's (ci/test-agent/overlay/etc/airlock/
//! appliance.toml) and the suite's (ci/xtask/src/acceptance/network.rs).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;

const NAMESPACE: &str = "upstream";
/// Host end of the veth pair: `[network.uplink] interface`.
const UPLINK: &str = "uplink0";
/// Namespace end, with the uplink's gateway address.
const WAN: &str = "wan0";
const GATEWAY: &str = "192.168.77.1/24";
/// The classified server (allow-listed: tcp 443) and the internet host.
const CLASSIFIED_SERVER: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 10);
const INTERNET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// 8080 on the classified server is open but not allow-listed; the internet
/// host listens on the classified server's allowed port too.
const LISTEN: &[(Ipv4Addr, u16)] = &[(CLASSIFIED_SERVER, 443), (CLASSIFIED_SERVER, 8080), (INTERNET, 80), (INTERNET, 443)];

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn setup() -> Result<(), String> {
    // A restarted unit starts from scratch (the veth goes with the namespace).
    let _ = run(&["netns", "delete", NAMESPACE]);
    run(&["netns", "add", NAMESPACE])?;
    run(&["link", "add", UPLINK, "type", "veth", "peer", "name", WAN, "netns", NAMESPACE])?;
    let n = ["-n", NAMESPACE];
    for step in [
        vec!["link", "set", "dev", "lo", "up"],
        vec!["address", "add", GATEWAY, "dev", WAN],
        vec!["link", "set", "dev", WAN, "up"],
    ] {
        run(&[&n[..], &step[..]].concat())?;
    }
    for addr in [CLASSIFIED_SERVER, INTERNET] {
        run(&[&n[..], &["address", "add", &format!("{addr}/32"), "dev", "lo"][..]].concat())?;
    }
    println!("upstream namespace ready: {UPLINK} <-> {WAN} {GATEWAY}, {CLASSIFIED_SERVER} and {INTERNET} on its loopback");
    Ok(())
}

#[allow(unsafe_code)]
fn enter_namespace() -> Result<(), String> {
    let path = format!("/run/netns/{NAMESPACE}");
    let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on a namespace fd we own; before any thread exists, so
    // every listener thread is created in the namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn serve() -> Result<(), String> {
    enter_namespace()?;
    let mut threads = Vec::new();
    for &(addr, port) in LISTEN {
        let listener = TcpListener::bind(SocketAddrV4::new(addr, port)).map_err(|e| format!("bind {addr}:{port}: {e}"))?;
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_else(|_| "?".into());
                let line = format!("airlock-test-upstream {addr} port {port} peer {peer}");
                println!("{line}");
                let _ = writeln!(stream, "{line}");
            }
        }));
    }
    println!("listening in namespace {NAMESPACE}: {}", LISTEN.iter().map(|(a, p)| format!("{a}:{p}")).collect::<Vec<_>>().join(" "));
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn main() {
    let result = match std::env::args().nth(1).as_deref() {
        Some("setup") => setup(),
        Some("serve") => serve(),
        _ => Err("usage: airlock-test-upstream setup|serve".into()),
    };
    if let Err(e) = result {
        eprintln!("airlock-test-upstream: {e}");
        std::process::exit(1);
    }
}
