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

/// Binds the confirm socket (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
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
        let Ok(writer) = conn.try_clone() else { continue };
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
        assert_eq!(parse_line("accept 7\n"), Some(Verdict { transfer: 7, accept: true }));
        assert_eq!(parse_line("reject 12"), Some(Verdict { transfer: 12, accept: false }));
        for bad in ["", "accept", "accept x", "accept 1 2", "ACCEPT 1", "yes 1", "accept -1"] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
        assert_eq!(pending_line(3, "png", 10), "pending 3 png 10\n");
    }
}
