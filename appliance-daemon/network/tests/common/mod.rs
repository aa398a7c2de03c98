//! Integration-tier helpers: root check, network namespaces that delete
//! themselves, commands that put their stderr into the error, and entering a
//! namespace from a thread (for socket probes without helper processes).
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// These tests need root (network namespaces, nft). Without it they fail
/// loudly rather than pass by skipping; CI runs as root.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("Uid line");
    assert_eq!(
        euid, "0",
        "this test creates network namespaces and loads nftables rulesets: run it as root (CI does); \
         it needs iproute2, nftables, iputils-ping, iputils-arping, wireguard-tools and (without kernel WireGuard) wireguard-go"
    );
    for tool in ["ip", "nft", "ping", "arping", "ss"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is not installed (see ci/install-host-deps.sh)"
        );
    }
}

/// Runs argv, fails with the tail of stderr.
pub fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("starting {}", argv.join(" ")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} exited {}: {}",
            argv.join(" "),
            out.status,
            tail.join(" | ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command line (split on whitespace; no quoting needed in tests).
pub fn sh(line: &str) -> Result<String> {
    let argv: Vec<&str> = line.split_whitespace().collect();
    run(&argv)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a name unique to this run, deleted on drop
/// (which also removes every interface in it, and so their veth peers).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("airlock-t{}-{n}-{role}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec("ip link set dev lo up")?;
        Ok(ns)
    }

    /// Runs a command line inside the namespace.
    pub fn exec(&self, line: &str) -> Result<String> {
        let mut argv = vec!["ip", "netns", "exec", &self.name];
        argv.extend(line.split_whitespace());
        run(&argv)
    }

    /// Runs an argv inside the namespace.
    pub fn exec_argv(&self, args: &[String]) -> Result<String> {
        let mut argv: Vec<&str> = vec!["ip", "netns", "exec", &self.name];
        argv.extend(args.iter().map(String::as_str));
        run(&argv)
    }

    /// Whether a command line succeeds inside the namespace.
    pub fn succeeds(&self, line: &str) -> bool {
        self.exec(line).is_ok()
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Moves the calling thread into a network namespace: sockets it opens
/// afterwards live there. Use only on a thread made for it.
#[allow(unsafe_code)]
pub fn enter(ns_path: &str) -> Result<()> {
    let f = File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
    // SAFETY: setns(2) on a valid, open namespace file descriptor; it only
    // changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A veth pair between two namespaces, with the given names.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run(&[
        "ip", "-n", &a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])?;
    Ok(())
}

/// A UDP socket bound to `src`, which need not be an address of this
/// namespace (IP_TRANSPARENT): how a guest forges its source address.
#[allow(unsafe_code)]
pub fn spoofing_udp_socket(src: std::net::Ipv4Addr) -> Result<std::net::UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2)/setsockopt(2)/bind(2) calls with correctly
    // sized, initialised arguments; the descriptor is owned by the returned
    // UdpSocket (closed on every error path by its Drop).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let sock = std::net::UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if rc != 0 {
            bail!(
                "setsockopt IP_TRANSPARENT: {}",
                std::io::Error::last_os_error()
            );
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(src).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            bail!("bind {src}: {}", std::io::Error::last_os_error());
        }
        Ok(sock)
    }
}

/// Runs argv with `input` on its standard input; returns standard output.
pub fn run_with_input(argv: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", argv.join(" ")))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} exited {}: {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A background process this test started, killed (by its own pid) on drop.
pub struct Daemon {
    child: std::process::Child,
    what: String,
    /// A file the process leaves behind when killed, removed after it.
    pub leaves: Option<std::path::PathBuf>,
}

impl Daemon {
    pub fn start(ns: &Netns, argv: &[&str], envs: &[(&str, &str)]) -> Result<Daemon> {
        use std::process::Stdio;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let what = format!("{} in {}", argv.join(" "), ns.name);
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Daemon {
            child,
            what,
            leaves: None,
        })
    }

    /// Fails if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.what);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(f) = &self.leaves {
            let _ = std::fs::remove_file(f);
        }
    }
}
