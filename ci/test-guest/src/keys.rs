//! The keys the guest received (`keys`, `keys-clear`; see
//! [`crate::protocol::KEYS`]): decoding evdev `struct input_event`s, the
//! bounded log `/init` keeps from boot on, its reply line, and parsing that
//! line on the host.

use std::collections::VecDeque;

/// `EV_KEY` (`linux/input-event-codes.h`): keys and buttons.
pub const EV_KEY: u16 = 1;
/// Key values: press, release, autorepeat.
pub const PRESSED: i32 = 1;
pub const RELEASED: i32 = 0;
pub const REPEATED: i32 = 2;
/// Size of `struct input_event` on x86-64: `struct timeval` (16 bytes),
/// `type` u16, `code` u16, `value` i32.
pub const INPUT_EVENT_SIZE: usize = 24;
/// Events [`KeyLog`] keeps by default (the oldest go first).
pub const KEPT: usize = 1024;

/// One key event: evdev key code (`KEY_A` = 30) and value ([`PRESSED`] or
/// [`RELEASED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEvent {
    pub code: u16,
    pub value: i32,
}

impl KeyEvent {
    pub const fn new(code: u16, value: i32) -> KeyEvent {
        KeyEvent { code, value }
    }
}

/// The key event in one `struct input_event` (native byte order), or `None`
/// for any other event type (`EV_SYN`, `EV_MSC` scan codes, `EV_ABS`, ...).
pub fn decode(raw: &[u8; INPUT_EVENT_SIZE]) -> Option<KeyEvent> {
    let kind = u16::from_ne_bytes([raw[16], raw[17]]);
    let code = u16::from_ne_bytes([raw[18], raw[19]]);
    let value = i32::from_ne_bytes([raw[20], raw[21], raw[22], raw[23]]);
    (kind == EV_KEY).then_some(KeyEvent { code, value })
}

/// Key presses and releases in arrival order, at most `capacity` (the
/// oldest are dropped). Autorepeats are not kept: how many arrive depends on
/// timing, the presses and releases do not.
#[derive(Debug, Clone)]
pub struct KeyLog {
    events: VecDeque<KeyEvent>,
    capacity: usize,
}

impl KeyLog {
    /// An empty log of [`KEPT`] events (`const` for a `static`).
    pub const fn new() -> KeyLog {
        KeyLog::with_capacity(KEPT)
    }

    pub const fn with_capacity(capacity: usize) -> KeyLog {
        KeyLog {
            events: VecDeque::new(),
            capacity,
        }
    }

    /// Adds `event` unless it is an autorepeat (or any value other than
    /// press and release).
    pub fn record(&mut self, event: KeyEvent) {
        if (event.value != PRESSED && event.value != RELEASED) || self.capacity == 0 {
            return;
        }
        while self.events.len() >= self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    pub fn clear(&mut self) {
        self.events.clear();
    }

    pub fn events(&self) -> impl Iterator<Item = &KeyEvent> {
        self.events.iter()
    }

    /// The `keys` reply: `ok keys 30:1 30:0 ...`, or `ok keys` when empty.
    pub fn line(&self) -> String {
        let mut line = String::from("ok keys");
        for e in &self.events {
            line.push_str(&format!(" {}:{}", e.code, e.value));
        }
        line
    }
}

impl Default for KeyLog {
    fn default() -> Self {
        KeyLog::new()
    }
}

/// The events of a `keys` reply ([`KeyLog::line`]); `Err` with the line for
/// anything else (an `error ...` reply, a malformed word).
pub fn parse_reply(line: &str) -> Result<Vec<KeyEvent>, String> {
    let mut words = line.split_whitespace();
    if (words.next(), words.next()) != (Some("ok"), Some("keys")) {
        return Err(format!("not a keys reply: {line:?}"));
    }
    words
        .map(|w| {
            let (code, value) = w
                .split_once(':')
                .ok_or_else(|| format!("bad key event {w:?} in {line:?}"))?;
            match (code.parse(), value.parse()) {
                (Ok(code), Ok(value)) => Ok(KeyEvent { code, value }),
                _ => Err(format!("bad key event {w:?} in {line:?}")),
            }
        })
        .collect()
}

/// Whether `/sys/class/input/eventN/device/capabilities/ev` (a hex bitmask
/// of event types) includes `EV_KEY`.
pub fn has_keys(capabilities_ev: &str) -> bool {
    // The mask is one or more space-separated hex words, most significant
    // first; EV_KEY is bit 1 of the last one.
    capabilities_ev
        .split_whitespace()
        .last()
        .and_then(|w| u64::from_str_radix(w, 16).ok())
        .is_some_and(|mask| mask & (1 << EV_KEY) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u16, code: u16, value: i32) -> [u8; INPUT_EVENT_SIZE] {
        let mut ev = [0u8; INPUT_EVENT_SIZE];
        ev[..8].copy_from_slice(&12345u64.to_ne_bytes());
        ev[16..18].copy_from_slice(&kind.to_ne_bytes());
        ev[18..20].copy_from_slice(&code.to_ne_bytes());
        ev[20..24].copy_from_slice(&value.to_ne_bytes());
        ev
    }

    #[test]
    fn decodes_key_events_only() {
        assert_eq!(decode(&raw(EV_KEY, 30, 1)), Some(KeyEvent::new(30, 1)));
        assert_eq!(decode(&raw(EV_KEY, 272, 0)), Some(KeyEvent::new(272, 0)));
        assert_eq!(decode(&raw(0, 0, 0)), None, "EV_SYN");
        assert_eq!(decode(&raw(4, 4, 0x1e)), None, "EV_MSC scan code");
        assert_eq!(decode(&raw(3, 0, 100)), None, "EV_ABS");
    }

    #[test]
    fn logs_presses_and_releases_without_repeats() {
        let mut log = KeyLog::new();
        assert_eq!(log.line(), "ok keys");
        for (code, value) in [
            (30, 1),
            (30, 2),
            (30, 2),
            (30, 0),
            (48, 1),
            (48, 0),
            (48, 7),
        ] {
            log.record(KeyEvent::new(code, value));
        }
        assert_eq!(log.line(), "ok keys 30:1 30:0 48:1 48:0");
        log.clear();
        assert_eq!(log.line(), "ok keys");
        assert_eq!(log.events().count(), 0);
    }

    #[test]
    fn log_is_bounded_and_keeps_the_newest() {
        let mut log = KeyLog::with_capacity(3);
        for code in 1..=5 {
            log.record(KeyEvent::new(code, 1));
        }
        assert_eq!(log.line(), "ok keys 3:1 4:1 5:1");
        let mut full = KeyLog::new();
        for i in 0..KEPT + 10 {
            full.record(KeyEvent::new((i % 500) as u16, (i % 2) as i32));
        }
        assert_eq!(full.events().count(), KEPT);
        assert_eq!(full.events().next(), Some(&KeyEvent::new(10, 0)));
        let mut none = KeyLog::with_capacity(0);
        none.record(KeyEvent::new(1, 1));
        assert_eq!(none.line(), "ok keys");
    }

    #[test]
    fn reply_round_trips() {
        let mut log = KeyLog::new();
        let events = [
            KeyEvent::new(30, 1),
            KeyEvent::new(30, 0),
            KeyEvent::new(272, 1),
            KeyEvent::new(272, 0),
        ];
        events.iter().for_each(|e| log.record(*e));
        assert_eq!(parse_reply(&log.line()), Ok(events.to_vec()));
        assert_eq!(parse_reply("ok keys"), Ok(vec![]));
        assert_eq!(parse_reply("ok keys  "), Ok(vec![]));
        for bad in [
            "ok keys-clear",
            "error unknown command",
            "ok keys 30",
            "ok keys 30:x",
            "ok keys -1:1",
            "keys 30:1",
            "",
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_capability_is_bit_one() {
        // A PS/2 keyboard (SYN KEY MSC LED REP), the ACPI power button
        // (SYN KEY), a virtio tablet (SYN KEY ABS), a relative mouse
        // without buttons (SYN REL), an empty mask.
        assert!(has_keys("120013\n"));
        assert!(has_keys("3"));
        assert!(has_keys("b"));
        assert!(!has_keys("5"));
        assert!(!has_keys(""));
        assert!(has_keys("0 3"));
        assert!(!has_keys("2 0"));
    }
}
