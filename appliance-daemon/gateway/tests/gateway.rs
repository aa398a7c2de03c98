//! Host integration tests: the real gateway and sanitiser binaries between
//! two fake agents on unix sockets.

mod common;

use airlock_vdagent::{ClipboardType, Message};
use common::*;
use std::time::Duration;

#[test]
fn text_copied_in_general_arrives_in_classified() {
    let (_d, gw, _gp, _cp, mut general, mut classified) = setup(&[]);
    // Both sides are told the limits: general the real one, classified 0.
    assert_eq!(
        general.expect(|m| matches!(m, Message::MaxClipboard(_))),
        Message::MaxClipboard(65536)
    );
    assert_eq!(
        classified.expect(|m| matches!(m, Message::MaxClipboard(_))),
        Message::MaxClipboard(0)
    );

    general_copies(
        &mut general,
        ClipboardType::Utf8Text,
        "line one\nline two ✓".as_bytes(),
    );
    let (ty, data) = classified_pastes(&mut classified);
    assert_eq!(ty, ClipboardType::Utf8Text);
    assert_eq!(data, "line one\r\nline two ✓".as_bytes());

    let line = gw.audit_line_after(0);
    assert!(line.contains("direction=general->classified"), "{line}");
    assert!(
        line.contains("type=utf8-text->utf8-text size_in=21 size_out=22"),
        "{line}"
    );
    assert!(line.contains("result=accepted"), "{line}");
    let sha = sha256_hex(&data);
    assert!(line.contains(&format!("sha256={sha}")), "{line}");
    assert!(
        !line.contains("line one"),
        "audit log never holds content: {line}"
    );
}

#[test]
fn copy_in_classified_never_reaches_general() {
    let (_d, gw, _gp, _cp, mut general, mut classified) = setup(&[]);
    let secret = b"CLASSIFIED-SECRET-4711";
    // Classified copies, then even sends its data unasked, several times.
    for _ in 0..3 {
        classified.send(&Message::ClipboardGrab(vec![
            ClipboardType::Utf8Text,
            ClipboardType::Png,
        ]));
        classified.send(&Message::Clipboard {
            ty: ClipboardType::Utf8Text,
            data: secret.to_vec(),
        });
    }
    // General pastes (asks the host for its clipboard): gets an empty answer.
    general.send(&Message::ClipboardRequest(ClipboardType::Utf8Text));
    assert_eq!(
        general.expect(|m| matches!(m, Message::Clipboard { .. })),
        Message::Clipboard {
            ty: ClipboardType::None,
            data: vec![]
        }
    );
    let later = general.collect_for(Duration::from_millis(700));
    let to_classified = classified.collect_for(Duration::from_millis(100));

    // Nothing but the handshake and the empty answer went to general.
    for m in &later {
        assert!(
            !matches!(
                m,
                Message::ClipboardGrab(_)
                    | Message::Clipboard { .. }
                    | Message::ClipboardRequest(_)
            ),
            "unexpected message to general: {m:?}"
        );
    }
    assert!(
        !general.raw.windows(secret.len()).any(|w| w == secret),
        "classified data on the general socket"
    );
    // The gateway never asked classified for its data.
    assert!(
        to_classified
            .iter()
            .all(|m| !matches!(m, Message::ClipboardRequest(_))),
        "{to_classified:?}"
    );
    // Each reverse attempt is audited as rejected.
    let line = gw.audit_line_after(2);
    assert!(
        line.contains("direction=classified->general") && line.contains("result=rejected"),
        "{line}"
    );
}

/// A bad input from general, what the audit log must say about it, and
/// whether the gateway must drop the connection (framing lost).
struct Bad {
    name: &'static str,
    send: Box<dyn Fn(&mut FakeAgent)>,
    reason: &'static str,
    reconnects: bool,
}

fn grab_and_answer(ty: ClipboardType, data: Vec<u8>) -> Box<dyn Fn(&mut FakeAgent)> {
    Box::new(move |g: &mut FakeAgent| general_copies(g, ty, &data))
}

fn grab_then_raw(raw: Vec<u8>) -> Box<dyn Fn(&mut FakeAgent)> {
    Box::new(move |g: &mut FakeAgent| {
        g.send(&Message::ClipboardGrab(vec![ClipboardType::Utf8Text]));
        g.expect(|m| matches!(m, Message::ClipboardRequest(_)));
        g.send_raw(&raw);
    })
}

#[test]
fn bad_inputs_are_dropped_and_logged_while_the_gateway_keeps_serving() {
    let limit: usize = LIMIT.parse().unwrap();
    let mut over_limit = 1u32.to_le_bytes().to_vec();
    over_limit.extend(vec![b'a'; limit + 1]);
    let mut lying = raw_frame(1, 1, 4, b"\x01\0\0\0hello");
    lying[24..28].copy_from_slice(&4u32.to_le_bytes()); // message says 4 bytes, chunk holds 9
    let cases = vec![
        Bad {
            name: "text over the limit after CRLF",
            send: grab_and_answer(ClipboardType::Utf8Text, vec![b'\n'; limit / 2 + 1]),
            reason: "exceeds the limit",
            reconnects: false,
        },
        Bad {
            name: "bad UTF-8",
            send: grab_and_answer(ClipboardType::Utf8Text, b"ok \xc3\x28 bad".to_vec()),
            reason: "not valid UTF-8",
            reconnects: false,
        },
        Bad {
            name: "message over the size limit",
            send: grab_then_raw(raw_frame(1, 1, 4, &over_limit)),
            reason: "exceeds the limit of 65540 bytes",
            reconnects: false,
        },
        Bad {
            name: "lying length field",
            send: grab_then_raw(lying),
            reason: "runs past the end of its message",
            reconnects: true,
        },
        Bad {
            name: "port 2",
            send: grab_then_raw(raw_frame(2, 1, 4, b"\x01\0\0\0hi")),
            reason: "only port 1",
            reconnects: true,
        },
        Bad {
            name: "protocol 7",
            send: grab_then_raw(raw_frame(1, 7, 4, b"\x01\0\0\0hi")),
            reason: "protocol 7, only 1",
            reconnects: true,
        },
        Bad {
            name: "file transfer start",
            send: Box::new(|g: &mut FakeAgent| {
                g.send_raw(&raw_frame(1, 1, 10, b"[vdagent-file-xfer]\nname=x.exe\n"))
            }),
            reason: "file transfer refused",
            reconnects: false,
        },
        Bad {
            name: "file list grab",
            send: Box::new(|g: &mut FakeAgent| {
                g.send(&Message::ClipboardGrab(vec![ClipboardType::FileList]))
            }),
            reason: "file copy refused",
            reconnects: false,
        },
        Bad {
            name: "tiff only",
            send: Box::new(|g: &mut FakeAgent| {
                g.send(&Message::ClipboardGrab(vec![ClipboardType::Tiff]))
            }),
            reason: "no accepted type among tiff",
            reconnects: false,
        },
        Bad {
            name: "image bomb",
            send: grab_and_answer(
                ClipboardType::Png,
                airlock_gateway::sanitise::testutil::png_header_only(60000, 60000),
            ),
            reason: "60000x60000, over the limit",
            reconnects: false,
        },
        Bad {
            name: "truncated png",
            send: grab_and_answer(ClipboardType::Png, png(64, 64)[..200].to_vec()),
            reason: "does not decode as png",
            reconnects: false,
        },
        Bad {
            name: "png declared as jpeg",
            send: grab_and_answer(ClipboardType::Jpg, png(8, 8)),
            reason: "does not decode as jpeg",
            reconnects: false,
        },
        Bad {
            name: "general sends none",
            send: grab_and_answer(ClipboardType::Utf8Text, vec![]).then_none(),
            reason: "sent no data",
            reconnects: false,
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let gport = FakePort::bind(dir.path(), "general");
    let cport = FakePort::bind(dir.path(), "classified");
    let mut gw = Gateway::start(
        dir.path(),
        &["--max-bytes", LIMIT, "--request-timeout-ms", "600"],
    );
    let mut general = gport.accept();
    let mut classified = cport.accept();
    classified.collect_for(Duration::from_millis(100));
    let mut lines = 0;
    for (i, case) in cases.iter().enumerate() {
        (case.send)(&mut general);
        let line = gw.audit_line_after(lines);
        lines += 1;
        assert!(line.contains("result=rejected"), "{}: {line}", case.name);
        assert!(
            line.contains(case.reason),
            "{}: expected {:?} in {line}",
            case.name,
            case.reason
        );
        if case.reconnects {
            assert!(
                general.closed_within(Duration::from_secs(5)),
                "{}: connection kept after a framing error",
                case.name
            );
            general = gport.accept();
        }
        // Nothing reached classified...
        let got = classified.collect_for(Duration::from_millis(50));
        assert!(
            got.iter().all(|m| !matches!(m, Message::ClipboardGrab(_))),
            "{}: {got:?}",
            case.name
        );
        // ...and the next good copy still goes through.
        let text = format!("good copy {i}");
        general_copies(&mut general, ClipboardType::Utf8Text, text.as_bytes());
        assert_eq!(
            classified_pastes(&mut classified).1,
            text.as_bytes(),
            "{}",
            case.name
        );
        let ok = gw.audit_line_after(lines);
        lines += 1;
        assert!(ok.contains("result=accepted"), "{}: {ok}", case.name);
        gw.assert_running();
    }
    assert!(gw.stderr().contains("input dropped"), "refusals are logged");
}

trait ThenNone {
    fn then_none(self) -> Box<dyn Fn(&mut FakeAgent)>;
}
impl ThenNone for Box<dyn Fn(&mut FakeAgent)> {
    /// Instead of data, answer the request with `NONE` (what an agent does
    /// when it cannot read its own clipboard).
    fn then_none(self) -> Box<dyn Fn(&mut FakeAgent)> {
        Box::new(|g: &mut FakeAgent| {
            g.send(&Message::ClipboardGrab(vec![ClipboardType::Utf8Text]));
            g.expect(|m| matches!(m, Message::ClipboardRequest(_)));
            g.send(&Message::Clipboard {
                ty: ClipboardType::None,
                data: vec![],
            });
        })
    }
}

#[test]
fn bidi_and_control_characters_are_removed() {
    let (_d, _gw, _gp, _cp, mut general, mut classified) = setup(&[]);
    let evil = "if (admin\u{202E} \u{2066}// check\u{2069}\u{202C}) {\x1b[2J\0\r}";
    general_copies(&mut general, ClipboardType::Utf8Text, evil.as_bytes());
    let (_, data) = classified_pastes(&mut classified);
    assert_eq!(
        String::from_utf8(data).unwrap(),
        "if (admin // check) {[2J\r\n}"
    );
}

#[test]
fn images_arrive_as_png_and_bombs_do_not() {
    let (_d, gw, _gp, _cp, mut general, mut classified) = setup(&["--max-bytes", "8000000"]);
    let input = png(300, 200);
    general_copies(&mut general, ClipboardType::Png, &input);
    let (ty, data) = classified_pastes(&mut classified);
    assert_eq!(ty, ClipboardType::Png);
    let img = image::load_from_memory_with_format(&data, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (300, 200));
    assert_eq!(
        img.get_pixel(299, 199),
        &image::Rgb([(299u32 % 256) as u8, 199, ((299u32 ^ 199) % 256) as u8])
    );

    // BMP in, PNG out.
    let mut bmp = Vec::new();
    image::load_from_memory(&input)
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut bmp), image::ImageFormat::Bmp)
        .unwrap();
    general_copies(&mut general, ClipboardType::Bmp, &bmp);
    let (ty, data) = classified_pastes(&mut classified);
    assert_eq!(ty, ClipboardType::Png);
    assert_eq!(image::load_from_memory(&data).unwrap().to_rgb8(), img);
    assert!(gw.audit_line_after(1).contains("type=bmp->png"));
}

#[test]
fn request_timeout_then_next_copy_works() {
    let (_d, gw, _gp, _cp, mut general, mut classified) = setup(&["--request-timeout-ms", "300"]);
    general.send(&Message::ClipboardGrab(vec![ClipboardType::Utf8Text]));
    general.expect(|m| matches!(m, Message::ClipboardRequest(_)));
    let line = gw.audit_line_after(0);
    assert!(line.contains("did not answer within 300 ms"), "{line}");
    // A late answer is dropped, not delivered.
    general.send(&Message::Clipboard {
        ty: ClipboardType::Utf8Text,
        data: b"late".to_vec(),
    });
    general_copies(&mut general, ClipboardType::Utf8Text, b"on time");
    assert_eq!(classified_pastes(&mut classified).1, b"on time");
}

#[test]
fn gateway_reconnects_when_a_guest_restarts() {
    let (_d, mut gw, gport, cport, general, mut classified) = setup(&[]);
    // General's QEMU restarts: connection gone.
    drop(general);
    let mut general = gport.accept();
    general_copies(
        &mut general,
        ClipboardType::Utf8Text,
        b"after general restart",
    );
    assert_eq!(
        classified_pastes(&mut classified).1,
        b"after general restart"
    );
    // Classified restarts: the gateway reconnects and offers the last item again.
    drop(classified);
    let mut classified = cport.accept();
    let (_, data) = classified_pastes(&mut classified);
    assert_eq!(data, b"after general restart");
    gw.assert_running();
}

#[test]
fn classified_grab_withdraws_the_offer() {
    let (_d, _gw, _gp, _cp, mut general, mut classified) = setup(&[]);
    general_copies(&mut general, ClipboardType::Utf8Text, b"x");
    classified.expect(|m| matches!(m, Message::ClipboardGrab(_)));
    classified.send(&Message::ClipboardGrab(vec![ClipboardType::Utf8Text]));
    std::thread::sleep(Duration::from_millis(200));
    classified.send(&Message::ClipboardRequest(ClipboardType::Utf8Text));
    assert_eq!(
        classified.expect(|m| matches!(m, Message::Clipboard { .. })),
        Message::Clipboard {
            ty: ClipboardType::None,
            data: vec![]
        }
    );
}

#[test]
fn sanitiser_is_confined_by_seccomp() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock-sanitiser"))
        .args([
            "--max-text-bytes",
            "10",
            "--max-image-bytes",
            "10",
            "--max-dimension",
            "10",
            "--max-pixels",
            "10",
        ])
        .arg("--probe-forbidden-syscall")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "open(2) after confinement must kill: {out:?}"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Writes an executable shell script standing in for the sanitiser.
fn fake_sanitiser(dir: &std::path::Path, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-sanitiser");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn hung_sanitiser_is_killed_and_the_transfer_rejected() {
    let scratch = tempfile::tempdir().unwrap();
    let hang = fake_sanitiser(scratch.path(), "exec sleep 30");
    let (_d, mut gw, _gp, _cp, mut general, mut classified) =
        setup(&["--sanitiser", &hang, "--sanitiser-timeout-ms", "300"]);
    let t = std::time::Instant::now();
    general_copies(&mut general, ClipboardType::Utf8Text, b"x");
    let line = gw.audit_line_after(0);
    assert!(line.contains("sanitiser killed after 300 ms"), "{line}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(classified
        .collect_for(Duration::from_millis(100))
        .iter()
        .all(|m| !matches!(m, Message::ClipboardGrab(_))));
    gw.assert_running();
}

#[test]
fn subverted_sanitiser_output_is_checked_by_the_gateway() {
    // A "sanitiser" that ignores its input and answers status 0, UTF8_TEXT,
    // 6 bytes: "a" U+202E "b\n" -- a bidi override and a bare LF.
    let scratch = tempfile::tempdir().unwrap();
    let liar = fake_sanitiser(
        scratch.path(),
        r"printf 'ALR1\000\001\000\000\000\006\000\000\000a\342\200\256b\n'; cat >/dev/null",
    );
    let (_d, gw, _gp, _cp, mut general, mut classified) = setup(&["--sanitiser", &liar]);
    general_copies(&mut general, ClipboardType::Utf8Text, b"anything");
    let line = gw.audit_line_after(0);
    assert!(line.contains("fails the gateway's check"), "{line}");
    assert!(classified
        .collect_for(Duration::from_millis(200))
        .iter()
        .all(|m| !matches!(m, Message::ClipboardGrab(_))));
}

#[test]
fn confirm_mode_waits_for_the_kiosk() {
    use std::io::{BufRead, BufReader, Write};
    let scratch = tempfile::tempdir().unwrap();
    let sock = scratch.path().join("confirm.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    let (_d, gw, _gp, _cp, mut general, mut classified) =
        setup(&["--confirm-socket", &sock_arg, "--confirm-timeout-ms", "400"]);

    // No kiosk connected: refused.
    general_copies(&mut general, ClipboardType::Utf8Text, b"nobody to confirm");
    assert!(gw
        .audit_line_after(0)
        .contains("no confirmation client connected"));

    let kiosk = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut lines = BufReader::new(kiosk.try_clone().unwrap());
    let mut kiosk = kiosk;
    std::thread::sleep(Duration::from_millis(100));
    let mut read_line = || {
        let mut l = String::new();
        lines.read_line(&mut l).unwrap();
        l
    };

    // Accepted: offered only after the verdict.
    general_copies(&mut general, ClipboardType::Utf8Text, b"confirm me");
    let line = read_line();
    assert!(
        line.starts_with("pending ") && line.ends_with(" utf8-text 10\n"),
        "{line:?}"
    );
    let transfer: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(classified
        .collect_for(Duration::from_millis(200))
        .iter()
        .all(|m| !matches!(m, Message::ClipboardGrab(_))));
    writeln!(kiosk, "accept {transfer}").unwrap();
    assert_eq!(classified_pastes(&mut classified).1, b"confirm me");
    assert!(gw.audit_line_after(1).contains("result=accepted"));

    // Rejected by the user.
    general_copies(&mut general, ClipboardType::Utf8Text, b"no thanks");
    let transfer: u64 = read_line()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    writeln!(kiosk, "reject {transfer}").unwrap();
    assert!(gw
        .audit_line_after(2)
        .contains("refused at the confirmation prompt"));

    // No answer in time.
    general_copies(&mut general, ClipboardType::Utf8Text, b"too slow");
    read_line();
    assert!(gw.audit_line_after(3).contains("not confirmed in time"));
    assert!(classified
        .collect_for(Duration::from_millis(100))
        .iter()
        .all(|m| !matches!(m, Message::ClipboardGrab(_))));
}

#[test]
fn a_flood_of_copies_runs_one_sanitiser_at_a_time() {
    // A slow sanitiser (0.3 s, then the real one) and 20 copies in a row:
    // the gateway must not fork 20 sanitisers; the newest copy wins.
    let scratch = tempfile::tempdir().unwrap();
    let slow = fake_sanitiser(
        scratch.path(),
        &format!(
            "sleep 0.3; exec {} \"$@\"",
            env!("CARGO_BIN_EXE_airlock-sanitiser")
        ),
    );
    let (_d, gw, _gp, _cp, mut general, mut classified) = setup(&["--sanitiser", &slow]);
    for i in 0..20 {
        general_copies(
            &mut general,
            ClipboardType::Utf8Text,
            format!("copy {i}").as_bytes(),
        );
    }
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while last != b"copy 19" {
        assert!(
            std::time::Instant::now() < deadline,
            "newest copy never offered; last {last:?}"
        );
        last = classified_pastes(&mut classified).1;
    }
    let log = gw.stderr();
    let started = log.matches("sanitiser took").count();
    assert!(
        started <= 3,
        "{started} sanitiser runs for a burst of 20 copies:\n{log}"
    );
    let superseded = gw
        .audit_lines()
        .iter()
        .filter(|l| l.contains("superseded"))
        .count();
    assert!(superseded >= 17, "{superseded} superseded");
}

#[test]
fn garbage_from_classified_costs_only_its_own_connection() {
    let (_d, gw, _gp, cport, mut general, mut classified) = setup(&[]);
    general_copies(&mut general, ClipboardType::Utf8Text, b"before");
    assert_eq!(classified_pastes(&mut classified).1, b"before");
    // Classified sends a chunk for port 2 and an oversized, unrequested
    // clipboard message: its connection is dropped and re-made...
    classified.send_raw(&raw_frame(1, 1, 4, &vec![b'z'; 100_000]));
    classified.send_raw(&raw_frame(2, 1, 7, &1u32.to_le_bytes()));
    assert!(classified.closed_within(Duration::from_secs(5)));
    assert!(!general.raw.windows(8).any(|w| w == b"zzzzzzzz"));
    // ...general is served meanwhile, and the new classified connection
    // gets the newest offer.
    general_copies(&mut general, ClipboardType::Utf8Text, b"during");
    let mut classified = cport.accept();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, data) = classified_pastes(&mut classified);
        if data == b"during" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "newest offer never arrived"
        );
    }
    assert!(
        gw.stderr()
            .contains("classified: input dropped: chunk names port 2"),
        "{}",
        gw.stderr()
    );
}
