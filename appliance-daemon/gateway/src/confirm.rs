//! Optional confirm mode: a sanitised item is offered to the classified
//! guest only after the user confirms it with a host-owned key in the
//! kiosk. The gateway listens on a unix socket (`--confirm-socket`, for
//! the kiosk only); one client at a time, the newest wins. Line protocol:
//!
//! - gateway → kiosk: `pending <transfer> <type> <bytes>` (never content);
//! - kiosk → gateway: `accept <transfer>` or `reject <transfer>`.
//!
//! No client, no answer within the timeout, or `reject`: the transfer is
//! rejected and audited.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// A kiosk's verdict on a pending transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub transfer: u64,
    pub accept: bool,
}

/// Parses one kiosk line.
pub fn parse_line(line: &str) -> Option<Verdict> {
    let mut words = line.split_whitespace();
    let accept = match words.next()? {
        "accept" => true,
        "reject" => false,
        _ => return None,
    };
    let transfer = words.next()?.parse().ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(Verdict { transfer, accept })
}

/// The line announcing a pending transfer.
pub fn pending_line(transfer: u64, ty: &str, bytes: usize) -> String {
    format!("pending {transfer} {ty} {bytes}\n")
}

/// The confirm socket's mode without a group: the gateway's user alone.
pub const PRIVATE_MODE: u32 = 0o600;
/// Its mode once handed to the confirm group (the kiosk's way in).
pub const GROUP_MODE: u32 = 0o660;

/// Binds the confirm socket (replacing a stale one): mode 0600, then, with
/// `group`, given to that group (the gateway's user must be a member; no
/// capability is needed) and made 0660 so the kiosk, also a member, may
/// connect. A group that cannot be set is logged and the socket stays
/// 0600: confirm mode then rejects every transfer (no client), it never
/// opens the socket wider. The socket's directory (the supervisor's,
/// `0710 airlock-gateway:<group>`) keeps it unreachable in between.
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_MODE))?;
    if let Some(gid) = group {
        // lchown: the path is the socket just bound, never a link followed.
        match std::os::unix::fs::lchown(path, None, Some(gid)) {
            Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(GROUP_MODE))?,
            Err(e) => eprintln!(
                "airlock-gateway: warn: confirm socket {}: cannot give it to group {gid} ({e}); it stays 0600, \
                 so no kiosk can connect and every transfer is rejected",
                path.display()
            ),
        }
    }
    Ok(listener)
}

/// Serves kiosk connections: hands each new client's writer to
/// `on_client` and each verdict to `on_verdict`; bad lines are logged and
/// ignored. Lines are capped at 256 bytes.
pub fn serve(
    listener: UnixListener,
    on_client: impl Fn(UnixStream) -> bool,
    on_verdict: impl Fn(Verdict) -> bool,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(writer) = conn.try_clone() else {
            continue;
        };
        if !on_client(writer) {
            return;
        }
        let mut reader = BufReader::new(std::io::Read::take(conn, u64::MAX));
        let mut line = String::new();
        loop {
            line.clear();
            reader.get_mut().set_limit(256);
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => match parse_line(&line) {
                    Some(v) => {
                        if !on_verdict(v) {
                            return;
                        }
                    }
                    None => eprintln!("airlock-gateway: warn: confirm socket: bad line ignored"),
                },
            }
        }
    }
}

/// Writes a line to the kiosk; false if it is gone.
pub fn notify(client: &mut UnixStream, line: &str) -> bool {
    client.write_all(line.as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiosk_lines() {
        assert_eq!(
            parse_line("accept 7\n"),
            Some(Verdict {
                transfer: 7,
                accept: true
            })
        );
        assert_eq!(
            parse_line("reject 12"),
            Some(Verdict {
                transfer: 12,
                accept: false
            })
        );
        for bad in [
            "",
            "accept",
            "accept x",
            "accept 1 2",
            "ACCEPT 1",
            "yes 1",
            "accept -1",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
        assert_eq!(pending_line(3, "png", 10), "pending 3 png 10\n");
    }

    fn mode_and_group(path: &Path) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        (m.mode() & 0o7777, m.gid())
    }

    #[test]
    fn socket_mode_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confirm.sock");
        // No group: the gateway's user alone.
        let _l = bind(&path, None).unwrap();
        assert_eq!(mode_and_group(&path).0, PRIVATE_MODE);
        // A group of ours (our primary group always is): 0660 and that group.
        let ours = rustix::process::getegid().as_raw();
        drop(_l);
        let _l = bind(&path, Some(ours)).unwrap();
        assert_eq!(mode_and_group(&path), (GROUP_MODE, ours));
        // A stale socket is replaced; a group we may not give it to (not a
        // member, unless we are root) leaves it 0600, not wider.
        drop(_l);
        if !rustix::process::geteuid().is_root() {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let member: Vec<u32> = status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let foreign = (60000..65000)
                .find(|g| *g != ours && !member.contains(g))
                .unwrap();
            let _l = bind(&path, Some(foreign)).unwrap();
            assert_eq!(mode_and_group(&path), (PRIVATE_MODE, ours));
        }
    }
}
