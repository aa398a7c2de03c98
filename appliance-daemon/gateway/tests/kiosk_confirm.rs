//! Confirm mode end to end on the host: the real gateway and sanitiser
//! binaries between two fake agents (as in `gateway.rs`), and the kiosk's
//! own side of the protocol (`airlock_kiosk::confirm::follow` with an
//! `Answer`, as `airlock_kiosk::run` uses them) on the gateway's confirm
//! socket, given to a group as the supervisor asks for (`--confirm-group`).

mod common;

use airlock_kiosk::confirm::{self, Answer, Pending};
use airlock_kiosk::Event;
use airlock_vdagent::{ClipboardType, Message};
use common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// How long the user has (the gateway's `--confirm-timeout-ms`).
const CONFIRM_TIMEOUT_MS: u64 = 2000;

/// The gateway in confirm mode with its socket given to our own group, and
/// the kiosk's follower connected to it.
struct Confirm {
    _dir: tempfile::TempDir,
    gw: Gateway,
    general: FakeAgent,
    classified: FakeAgent,
    answer: Answer,
    kiosk: Receiver<Event>,
    _ports: (FakePort, FakePort),
    /// The confirm socket's directory, removed after the gateway stopped.
    _scratch: tempfile::TempDir,
}

fn start() -> Confirm {
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("confirm.sock");
    let gid = rustix::process::getegid().as_raw().to_string();
    let timeout = CONFIRM_TIMEOUT_MS.to_string();
    let (dir, gw, gp, cp, general, classified) = setup(&[
        "--confirm-socket",
        socket.to_str().unwrap(),
        "--confirm-timeout-ms",
        &timeout,
        "--confirm-group",
        &gid,
    ]);
    // The socket as the kiosk finds it: 0660, the confirm group's.
    wait_for_socket(&socket, &gw);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        (meta.mode() & 0o7777, meta.gid().to_string()),
        (0o660, gid),
        "confirm socket mode and group"
    );

    let (events, kiosk) = mpsc::channel();
    let answer = Answer::default();
    {
        let answer = answer.clone();
        // Runs for ever (the kiosk's thread); ends when `kiosk` is dropped
        // and it next has something to say, or with the test process.
        std::thread::spawn(move || confirm::follow(&socket, answer, events));
    }
    gw.wait_for_log("confirm: kiosk connected");
    Confirm {
        _dir: dir,
        gw,
        general,
        classified,
        answer,
        kiosk,
        _ports: (gp, cp),
        _scratch: scratch,
    }
}

fn wait_for_socket(path: &Path, gw: &Gateway) {
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::symlink_metadata(path)
        .map(|m| m.mode() & 0o777 != 0o660)
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no confirm socket at {}; log:\n{}",
            path.display(),
            gw.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Confirm {
    /// The next transfer the kiosk's label would show as pending.
    fn next_pending(&self) -> Pending {
        match self.kiosk.recv_timeout(WAIT) {
            Ok(Event::Pending(Some(p))) => p,
            Ok(Event::Pending(None)) => panic!(
                "the kiosk lost the confirm socket; gateway log:\n{}",
                self.gw.stderr()
            ),
            Ok(other) => panic!("unexpected kiosk event {other:?}"),
            Err(e) => panic!(
                "no pending transfer reached the kiosk ({e}); gateway log:\n{}",
                self.gw.stderr()
            ),
        }
    }

    /// Classified was offered nothing within `d`.
    fn classified_offered_nothing(&mut self, d: Duration) {
        let got = self.classified.collect_for(d);
        assert!(
            got.iter().all(|m| !matches!(m, Message::ClipboardGrab(_))),
            "offered before the user's answer: {got:?}"
        );
    }
}

#[test]
fn kiosk_accepts_and_classified_gets_the_sanitised_text() {
    let mut c = start();
    let evil = "if (admin\u{202E} \u{2066}// check\u{2069}\u{202C}) {\x1b[2J\0\r}";
    let clean = "if (admin // check) {[2J\r\n}";
    general_copies(&mut c.general, ClipboardType::Utf8Text, evil.as_bytes());

    // The kiosk is told: type and sanitised size, never content.
    let p = c.next_pending();
    assert_eq!(p.kind, "utf8-text");
    assert_eq!(p.bytes, clean.len() as u64);
    c.classified_offered_nothing(Duration::from_millis(300));
    assert!(
        c.gw.audit_lines().is_empty(),
        "decided before the user: {:?}",
        c.gw.audit_lines()
    );

    // The host-owned key: the kiosk answers `accept <transfer>`.
    assert!(
        c.answer.accept(p.transfer),
        "the kiosk's answer found no gateway"
    );
    let (ty, data) = classified_pastes(&mut c.classified);
    assert_eq!(ty, ClipboardType::Utf8Text);
    assert_eq!(String::from_utf8(data).unwrap(), clean);
    let line = c.gw.audit_line_after(0);
    assert!(
        line.contains(&format!(" transfer={} ", p.transfer)),
        "{line}"
    );
    assert!(
        line.contains("result=accepted") && line.contains("type=utf8-text->utf8-text"),
        "{line}"
    );
    assert!(
        !line.contains("admin"),
        "audit log never holds content: {line}"
    );
}

#[test]
fn nobody_accepts_so_the_transfer_is_rejected_after_the_timeout() {
    let mut c = start();
    general_copies(
        &mut c.general,
        ClipboardType::Utf8Text,
        b"nobody presses the key",
    );
    let p = c.next_pending();
    assert_eq!((p.kind.as_str(), p.bytes), ("utf8-text", 22));
    let shown = std::time::Instant::now();

    let line = c.gw.audit_line_after(0);
    assert!(
        line.contains(&format!(" transfer={} ", p.transfer)),
        "{line}"
    );
    let waited = shown.elapsed();
    assert!(
        line.contains("result=rejected") && line.contains("not confirmed in time"),
        "{line}"
    );
    assert!(
        waited >= Duration::from_millis(CONFIRM_TIMEOUT_MS - 300),
        "rejected after {waited:?}, before the {CONFIRM_TIMEOUT_MS} ms timeout: {line}"
    );
    c.classified_offered_nothing(Duration::from_millis(200));

    // Too late: accepting now changes nothing (the gateway ignores it).
    assert!(c.answer.accept(p.transfer));
    c.gw.wait_for_log(&format!(
        "verdict for transfer {} which is not pending",
        p.transfer
    ));
    c.classified_offered_nothing(Duration::from_millis(200));
    assert_eq!(c.gw.audit_lines().len(), 1);
}
