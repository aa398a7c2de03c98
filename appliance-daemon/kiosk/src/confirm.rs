//! The kiosk's side of the clipboard gateway's confirm mode: the gateway
//! announces each sanitised transfer on its confirm socket
//! (`/run/airlock/clipboard/confirm.sock`, only when `[clipboard] confirm`
//! is on) as `pending <transfer> <type> <bytes>` — never content. The label
//! shows it; the host-owned confirm key answers `accept <transfer>`. No
//! answer before the gateway's timeout means rejected.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::Event;

/// A transfer waiting for the user's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub transfer: u64,
    /// `text` or an image type, from a fixed alphabet.
    pub kind: String,
    pub bytes: u64,
}

/// Parses one gateway line.
pub fn parse_pending(line: &str) -> Option<Pending> {
    let mut words = line.split_whitespace();
    if words.next()? != "pending" {
        return None;
    }
    let transfer = words.next()?.parse().ok()?;
    let kind = words.next()?;
    if kind.is_empty()
        || kind.len() > 16
        || !kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-')
    {
        return None;
    }
    let bytes = words.next()?.parse().ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(Pending {
        transfer,
        kind: kind.to_owned(),
        bytes,
    })
}

/// The connection to the gateway, for answers.
#[derive(Default, Clone)]
pub struct Answer(Arc<Mutex<Option<UnixStream>>>);

impl Answer {
    /// Accepts `transfer`; false if the gateway is not connected.
    pub fn accept(&self, transfer: u64) -> bool {
        match self.0.lock().unwrap().as_mut() {
            Some(stream) => stream
                .write_all(format!("accept {transfer}\n").as_bytes())
                .is_ok(),
            None => false,
        }
    }
}

/// Follows the confirm socket for ever (it exists only in confirm mode):
/// each announcement becomes [`Event::Pending`]; a lost connection clears
/// it. Lines are capped at 256 bytes.
pub fn follow(socket: &Path, answer: Answer, events: Sender<Event>) {
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            eprintln!(
                "airlock-kiosk: clipboard confirm mode: connected to {}",
                socket.display()
            );
            *answer.0.lock().unwrap() = stream.try_clone().ok();
            let mut reader = BufReader::new(std::io::Read::take(stream, u64::MAX));
            let mut line = String::new();
            loop {
                line.clear();
                reader.get_mut().set_limit(256);
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => match parse_pending(&line) {
                        Some(p) => {
                            if events.send(Event::Pending(Some(p))).is_err() {
                                return;
                            }
                        }
                        None => eprintln!("airlock-kiosk: confirm socket: bad line ignored"),
                    },
                }
            }
            *answer.0.lock().unwrap() = None;
            if events.send(Event::Pending(None)).is_err() {
                return;
            }
        }
        thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_lines() {
        assert_eq!(
            parse_pending("pending 3 png 10\n"),
            Some(Pending {
                transfer: 3,
                kind: "png".into(),
                bytes: 10
            })
        );
        for bad in [
            "",
            "pending",
            "pending x png 1",
            "pending 1 png",
            "pending 1 png 1 extra",
            "pending 1 \u{1b}[2J 1",
            "accept 1",
        ] {
            assert_eq!(parse_pending(bad), None, "{bad:?}");
        }
    }
}
