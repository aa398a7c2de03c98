//! Feeds arbitrary bytes, cut at arbitrary points, to the streaming
//! decoder with an arbitrary cap: it must never panic, never return a
//! clipboard message larger than its cap, stop after a fatal error, and
//! every message it returns must encode and decode back to itself.
#![no_main]

use airlock_vdagent::{encode, Decoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let cap = u32::from(u16::from_le_bytes([input[0], input[1]])) * 4;
    let cut = usize::from(input[2]).max(1);
    let data = &input[3..];
    let mut d = Decoder::new(cap);
    let mut fatal_seen = false;
    for piece in data.chunks(cut) {
        for r in d.feed(piece) {
            assert!(!fatal_seen || r == Err(airlock_vdagent::DecodeError::Poisoned), "output after a fatal error");
            match r {
                Ok(msg) => {
                    if let Message::Clipboard { data, .. } = &msg {
                        assert!(data.len() + 4 <= cap as usize);
                    }
                    let again = Decoder::new(u32::MAX).feed(&encode(&msg));
                    assert_eq!(again, vec![Ok(msg)]);
                }
                Err(e) => fatal_seen |= e.is_fatal(),
            }
        }
    }
});
