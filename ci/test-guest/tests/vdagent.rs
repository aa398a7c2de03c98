//! Integration test (QEMU, TCG, no root): the test guest is a SPICE vdagent
//! on `com.redhat.spice.0`. The test plays the host side (as the clipboard
//! gateway will) with the workspace codec `airlock-vdagent` on the port's
//! unix-socket chardev, and drives and checks the guest through its test
//! port. One boot, many checks.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_test_guest::client::{counters, Client};
use airlock_vdagent::{
    cap, encode, Capabilities, ClipboardType, Decoder, Message, CLIENT_PORT, MAX_CHUNK_PAYLOAD,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::{poll, Guest};

/// The host end of the guest's vdagent port.
struct Host {
    stream: UnixStream,
    decoder: Decoder,
    /// Every byte the guest sent, for the chunk-size check.
    raw: Vec<u8>,
    queue: std::collections::VecDeque<Message>,
}

impl Host {
    fn connect(socket: &Path) -> Host {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("connecting to {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        Host {
            stream,
            decoder: Decoder::new(1 << 20),
            raw: Vec::new(),
            queue: Default::default(),
        }
    }

    fn send(&mut self, msg: &Message) {
        self.stream.write_all(&encode(msg)).unwrap();
    }

    /// The next message from the guest; panics on anything the codec
    /// refuses or on silence.
    fn recv(&mut self, timeout: Duration) -> Message {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while self.queue.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no vdagent message from the guest within {timeout:?}"
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            let n = match self.stream.read(&mut buf) {
                Ok(0) => panic!("the vdagent socket closed"),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("reading the vdagent socket: {e}"),
            };
            self.raw.extend_from_slice(&buf[..n]);
            for item in self.decoder.feed(&buf[..n]) {
                self.queue.push_back(
                    item.unwrap_or_else(|e| panic!("the guest sent bad vdagent input: {e}")),
                );
            }
        }
        self.queue.pop_front().unwrap()
    }

    /// Nothing more arrives within `wait`.
    fn assert_silent(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!(
                "expected no vdagent traffic, got {other:?} ({:?})",
                &buf[..4]
            ),
        }
        assert!(self.queue.is_empty(), "unexpected {:?}", self.queue);
    }

    /// Sizes of the chunks the guest sent, checking each names port 1.
    fn chunk_sizes(&self) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut at = 0;
        while at + 8 <= self.raw.len() {
            let port = u32::from_le_bytes(self.raw[at..at + 4].try_into().unwrap());
            let size = u32::from_le_bytes(self.raw[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(port, CLIENT_PORT, "chunk at byte {at}");
            sizes.push(size);
            at += 8 + size;
        }
        assert_eq!(at, self.raw.len(), "the guest's stream ends inside a chunk");
        sizes
    }
}

fn cmd(client: &mut Client, command: &str) -> String {
    client.command(command, Duration::from_secs(10)).unwrap()
}

/// Text of `n` bytes that is not periodic in 2048 (so a chunk mix-up shows).
fn text(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| b'a' + ((i * 7 + i / 26 + seed as usize) % 26) as u8)
        .collect()
}

#[test]
fn guest_is_a_vdagent_clipboard_peer() {
    let guest = Guest::boot(|dir| {
        let sock = dir.join("vdagent.sock");
        vec![
            "-chardev".into(),
            format!(
                "socket,id=vdagent,path={},server=on,wait=off",
                sock.display()
            )
            .into(),
            "-device".into(),
            "virtserialport,bus=vser0.0,chardev=vdagent,name=com.redhat.spice.0".into(),
        ]
    });
    let mut client = guest.client();
    let started = Instant::now();
    let mut host = Host::connect(&guest.dir.path().join("vdagent.sock"));
    let t = Duration::from_secs(10);
    let ours = Capabilities::from_bits(&[cap::CLIPBOARD_BY_DEMAND, cap::MAX_CLIPBOARD]);

    // The guest announces itself and asks for the host's announce.
    match host.recv(t) {
        Message::AnnounceCapabilities {
            request: true,
            caps,
        } => {
            assert!(
                caps.has(cap::CLIPBOARD_BY_DEMAND) && caps.has(cap::MAX_CLIPBOARD),
                "{caps:?}"
            );
            assert!(
                !caps.has(cap::CLIPBOARD_SELECTION) && !caps.has(cap::CLIPBOARD_GRAB_SERIAL),
                "{caps:?}"
            );
        }
        other => panic!("expected the guest's announce first, got {other:?}"),
    }
    let log = poll(&mut client, "vdagent-log", t, |l| {
        l.contains("connected=yes")
    });
    assert!(
        log.starts_with("vdagent connected=yes tx.announce-capabilities=1 errors=0"),
        "{log}"
    );

    // Like the Windows agent: no clipboard traffic before the host announced BY_DEMAND.
    let reply = cmd(&mut client, "clip-set utf8 eA==");
    assert!(
        reply.starts_with("error not sent: the host has not announced"),
        "{reply}"
    );
    host.assert_silent(Duration::from_millis(300));

    // The host's announce (request = 1) is answered with request = 0.
    host.send(&Message::AnnounceCapabilities {
        request: true,
        caps: ours.clone(),
    });
    assert_eq!(
        host.recv(t),
        Message::AnnounceCapabilities {
            request: false,
            caps: ours.clone()
        }
    );

    // Host → guest: a grab, then data larger than one chunk.
    let from_host = text(5000, 1);
    host.send(&Message::ClipboardGrab(vec![
        ClipboardType::Utf8Text,
        ClipboardType::Png,
    ]));
    host.send(&Message::Clipboard {
        ty: ClipboardType::Utf8Text,
        data: from_host.clone(),
    });
    assert_eq!(
        poll(&mut client, "clip-grabs", t, |l| l != "grabs none"),
        "grabs utf8 png"
    );
    let expected = format!("clip utf8 {}", B64.encode(&from_host));
    assert_eq!(
        poll(&mut client, "clip-received", t, |l| l != "clip none"),
        expected
    );

    // Guest copy: the guest grabs and serves the host's request.
    let from_guest = text(3000, 2);
    let reply = cmd(
        &mut client,
        &format!("clip-set utf8 {}", B64.encode(&from_guest)),
    );
    assert_eq!(reply, "ok grabbed utf8 3000 bytes");
    assert_eq!(
        host.recv(t),
        Message::ClipboardGrab(vec![ClipboardType::Utf8Text])
    );
    assert_eq!(
        cmd(&mut client, "clip-grabs"),
        "grabs none",
        "the guest's grab ends the host's"
    );
    host.send(&Message::ClipboardRequest(ClipboardType::Utf8Text));
    assert_eq!(
        host.recv(t),
        Message::Clipboard {
            ty: ClipboardType::Utf8Text,
            data: from_guest.clone()
        }
    );
    // A type the guest does not hold, and data over the host's limit: empty answers.
    let nothing = Message::Clipboard {
        ty: ClipboardType::None,
        data: Vec::new(),
    };
    host.send(&Message::ClipboardRequest(ClipboardType::Png));
    assert_eq!(host.recv(t), nothing);
    host.send(&Message::MaxClipboard(100));
    host.send(&Message::ClipboardRequest(ClipboardType::Utf8Text));
    assert_eq!(host.recv(t), nothing);

    // Guest paste: the guest requests, the host answers.
    assert_eq!(cmd(&mut client, "clip-request png"), "ok requested png");
    assert_eq!(host.recv(t), Message::ClipboardRequest(ClipboardType::Png));
    let png = b"\x89PNG\r\n\x1a\n not really".to_vec();
    host.send(&Message::Clipboard {
        ty: ClipboardType::Png,
        data: png.clone(),
    });
    let expected = format!("clip png {}", B64.encode(&png));
    assert_eq!(
        poll(&mut client, "clip-received", t, |l| l
            .starts_with("clip png")),
        expected
    );

    // A file transfer start (type 10) is refused by the codec and counted.
    let mut xfer = Vec::new();
    for word in [CLIENT_PORT, 20 + 4, 1, 10, 0, 0, 4, 0] {
        xfer.extend_from_slice(&word.to_le_bytes());
    }
    host.stream.write_all(&xfer).unwrap();
    let log = poll(&mut client, "vdagent-log", t, |l| !l.ends_with("errors=0"));
    let c = counters(&log);
    let expected: Vec<(&str, u64)> = vec![
        ("errors", 1),
        ("rx.announce-capabilities", 1),
        ("rx.clipboard", 2),
        ("rx.clipboard-grab", 1),
        ("rx.clipboard-request", 3),
        ("rx.file-xfer-start", 1),
        ("rx.max-clipboard", 1),
        ("tx.announce-capabilities", 2),
        ("tx.clipboard", 3),
        ("tx.clipboard-grab", 1),
        ("tx.clipboard-request", 1),
    ];
    assert_eq!(
        c.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
        expected,
        "{log}"
    );
    host.assert_silent(Duration::from_millis(300));

    // The guest chunks what it sends at 2048 payload bytes.
    let sizes = host.chunk_sizes();
    assert!(sizes.iter().all(|s| *s <= MAX_CHUNK_PAYLOAD), "{sizes:?}");
    assert!(
        sizes.contains(&MAX_CHUNK_PAYLOAD),
        "the 3000-byte answer spans two chunks: {sizes:?}"
    );

    // The guest notices the host going away, and a new host connection
    // gets a new announce. (A host that reconnects before the guest noticed
    // gets none: it sends its own announce with request = 1, as the gateway
    // does, and gets the answer.)
    drop(host);
    let log = poll(&mut client, "vdagent-log", t, |l| {
        l.contains("connected=no")
    });
    assert!(log.contains("connected=no"), "{log}");
    let mut host = Host::connect(&guest.dir.path().join("vdagent.sock"));
    assert!(matches!(
        host.recv(t),
        Message::AnnounceCapabilities { request: true, .. }
    ));
    let log = poll(&mut client, "vdagent-log", t, |l| {
        l.contains("tx.announce-capabilities=3")
    });
    assert!(
        log.contains("connected=yes") && log.contains("tx.announce-capabilities=3"),
        "{log}"
    );

    // No display in this boot: draw says so.
    let reply = cmd(&mut client, "draw bars");
    assert!(reply.starts_with("error no framebuffer"), "{reply}");
    eprintln!(
        "vdagent checks took {:.1} s after boot",
        started.elapsed().as_secs_f64()
    );
}
