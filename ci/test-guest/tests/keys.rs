//! Integration test (QEMU, TCG, no root): keys sent with QMP `send-key`
//! reach the test guest's PS/2 keyboard (q35's i8042, where QEMU's VNC
//! server sends them too) and `keys` reports them as evdev codes, presses
//! and releases in order, without autorepeats; `keys-clear` empties the
//! log; a button of the `virtio-tablet-pci` (the appliance's pointer, found
//! by the guest's rescan once `virtio_input` binds it) shows too; the ACPI
//! power button, read by the same code, still powers the guest off. One
//! boot.

mod common;

use std::time::Duration;

use airlock_test_guest::keys::{parse_reply, KeyEvent};
use common::{poll, Guest, Qmp};

/// evdev codes (`linux/input-event-codes.h`), literal here so a mistake in
/// the guest shows.
const KEY_A: u16 = 30;
const KEY_B: u16 = 48;
const KEY_C: u16 = 46;
const BTN_LEFT: u16 = 272;

fn send_key(qmp: &mut Qmp, qcode: &str, hold_ms: u64) {
    qmp.execute(&format!(
        r#"{{"execute": "send-key", "arguments": {{"keys": [{{"type": "qcode", "data": "{qcode}"}}], "hold-time": {hold_ms}}}}}"#
    ))
    .unwrap();
}

/// Polls `keys` until it reports `n` events (or 10 s pass); returns them.
fn wait_keys(client: &mut airlock_test_guest::client::Client, n: usize) -> Vec<KeyEvent> {
    let reply = poll(client, "keys", Duration::from_secs(10), |r| {
        parse_reply(r).is_ok_and(|e| e.len() >= n)
    });
    parse_reply(&reply).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn guest_reports_keys_from_qmp_send_key() {
    // `atkbd.softrepeat`: the kernel, not the keyboard, repeats held keys
    // (QEMU's PS/2 keyboard has no typematic repeat), so a held key makes
    // autorepeat events.
    let mut guest = Guest::boot_with_cmdline("atkbd.softrepeat=1", |dir| {
        vec![
            "-device".into(),
            "virtio-tablet-pci".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()).into(),
        ]
    });
    let mut client = guest.client();
    let mut qmp = Qmp::connect(&guest.dir.path().join("qmp.sock")).unwrap();
    let t = Duration::from_secs(10);

    // Sent before the first `keys`: recorded from boot on.
    send_key(&mut qmp, "a", 50);
    send_key(&mut qmp, "b", 50);
    let events = wait_keys(&mut client, 4);
    let expected = [
        KeyEvent::new(KEY_A, 1),
        KeyEvent::new(KEY_A, 0),
        KeyEvent::new(KEY_B, 1),
        KeyEvent::new(KEY_B, 0),
    ];
    assert_eq!(events, expected, "keys a, b");
    assert_eq!(
        client.command("keys", t).unwrap(),
        "ok keys 30:1 30:0 48:1 48:0"
    );

    assert_eq!(client.command("keys-clear", t).unwrap(), "ok keys-clear");
    assert_eq!(client.command("keys", t).unwrap(), "ok keys");

    // Held for 800 ms: the kernel autorepeats it (value 2, from 250 ms on,
    // every 33 ms), the log leaves the repeats out.
    send_key(&mut qmp, "c", 800);
    assert_eq!(
        wait_keys(&mut client, 2),
        [KeyEvent::new(KEY_C, 1), KeyEvent::new(KEY_C, 0)],
        "held key c"
    );
    assert_eq!(client.command("keys-clear", t).unwrap(), "ok keys-clear");

    // A tablet button: a virtio input device, read since the guest found it.
    for down in [true, false] {
        qmp.execute(&format!(
            r#"{{"execute": "input-send-event", "arguments": {{"events": [{{"type": "btn", "data": {{"down": {down}, "button": "left"}}}}]}}}}"#
        ))
        .unwrap();
    }
    assert_eq!(
        wait_keys(&mut client, 2),
        [KeyEvent::new(BTN_LEFT, 1), KeyEvent::new(BTN_LEFT, 0)],
        "tablet button"
    );

    // The ACPI power button is read by the same readers: QMP
    // `system_powerdown` still powers the guest off.
    qmp.execute(r#"{"execute": "system_powerdown"}"#).unwrap();
    let status = guest
        .wait_exit(Duration::from_secs(30))
        .expect("QEMU still runs 30 s after system_powerdown");
    assert!(
        status.success(),
        "QEMU ended with {status} after system_powerdown"
    );
    let console = guest.console();
    assert!(console.contains("power button pressed"), "{console}");
    for device in ["AT Translated Set 2 keyboard", "QEMU Virtio Tablet"] {
        assert!(
            console.contains(&format!("({device})")),
            "{device} not read:\n{console}"
        );
    }
}
