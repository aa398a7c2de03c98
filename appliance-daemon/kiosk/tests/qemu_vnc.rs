//! Integration test (QEMU, TCG, no root): the kiosk's RFB client against
//! QEMU's real VNC server on a unix socket, as the supervisor starts it
//! (`-vga none -device VGA -vnc unix:…`). The firmware's text screen must
//! arrive as pixels, and QEMU must take our extended key and pointer events
//! without dropping the connection.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_kiosk::rfb::{self, Framebuffer, Update};

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_vnc_server_speaks_with_the_kiosk_client() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("display.sock");
    let qemu = std::env::var("AIRLOCK_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let child = Command::new(&qemu)
        .args([
            "-nodefaults",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "64",
            "-display",
            "none",
            "-vga",
            "none",
            "-device",
            "VGA",
        ])
        .arg("-vnc")
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {qemu} (the CI host installs it): {e}"));
    let _qemu = KillOnDrop(child);

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("QEMU's VNC socket never appeared: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let init = rfb::handshake(&mut stream).unwrap();
    assert!(init.width >= 320 && init.height >= 200, "{init:?}");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut fb = Framebuffer::new(init.width, init.height);
    let mut extended = false;
    writer
        .write_all(&rfb::update_request(false, fb.width, fb.height))
        .unwrap();

    // The firmware writes text on the screen within seconds (TCG).
    let mut lit = 0;
    while Instant::now() < deadline {
        if rfb::read_message(&mut reader, &mut fb, &mut extended).unwrap() == Update::Frame {
            lit = fb.pixels.iter().filter(|&&p| p != 0).count();
            if lit > 100 && extended {
                break;
            }
            writer
                .write_all(&rfb::update_request(true, fb.width, fb.height))
                .unwrap();
        }
    }
    assert!(extended, "QEMU never acknowledged extended key events");
    assert!(
        lit > 100,
        "only {lit} lit pixels in {}x{} after 30 s",
        fb.width,
        fb.height
    );

    // Input is accepted: after a key, a pointer event and another update
    // request the connection still answers.
    writer.write_all(&rfb::key_event(0x1e, true)).unwrap();
    writer.write_all(&rfb::key_event(0x1e, false)).unwrap();
    writer.write_all(&rfb::pointer_event(1, 10, 10)).unwrap();
    writer.write_all(&rfb::pointer_event(0, 10, 10)).unwrap();
    writer
        .write_all(&rfb::update_request(false, fb.width, fb.height))
        .unwrap();
    loop {
        if rfb::read_message(&mut reader, &mut fb, &mut extended).unwrap() == Update::Frame {
            break;
        }
    }
}
