//! Property tests: encode then decode is the identity, however the stream is
//! cut; no input makes the decoder panic or buffer past its cap.

use airlock_vdagent::{encode, Capabilities, ClipboardType, Decoder, Message, MAX_CHUNK_PAYLOAD};
use proptest::prelude::*;

fn clip_type() -> impl Strategy<Value = ClipboardType> {
    prop_oneof![0u32..8, any::<u32>()].prop_map(ClipboardType::from_u32)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u32>(), 0..8)).prop_map(|(request, caps)| {
            Message::AnnounceCapabilities {
                request,
                caps: Capabilities(caps),
            }
        }),
        prop::collection::vec(clip_type(), 1..8).prop_map(Message::ClipboardGrab),
        clip_type().prop_map(Message::ClipboardRequest),
        (clip_type(), prop::collection::vec(any::<u8>(), 0..9000))
            .prop_map(|(ty, data)| Message::Clipboard { ty, data }),
        Just(Message::ClipboardRelease),
        any::<i32>().prop_map(Message::MaxClipboard),
    ]
}

proptest! {
    #[test]
    fn encode_decode_identity(msgs in prop::collection::vec(message(), 1..6), cut in 1usize..5000) {
        let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut d = Decoder::new(1 << 20);
        let mut got = vec![];
        for piece in stream.chunks(cut) {
            got.extend(d.feed(piece));
        }
        let got: Vec<Message> = got.into_iter().map(|r| r.unwrap()).collect();
        prop_assert_eq!(got, msgs);
        prop_assert!(d.at_boundary());
    }

    #[test]
    fn encoded_chunks_are_small(msg in message()) {
        let enc = encode(&msg);
        let mut rest = &enc[..];
        while !rest.is_empty() {
            let n = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
            prop_assert!((1..=MAX_CHUNK_PAYLOAD).contains(&n));
            rest = &rest[8 + n..];
        }
    }

    #[test]
    fn arbitrary_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096), cap in 0u32..10_000) {
        let mut d = Decoder::new(cap);
        for piece in bytes.chunks(7) {
            for r in d.feed(piece) {
                if let Ok(Message::Clipboard { data, .. }) = r {
                    prop_assert!(data.len() + 4 <= cap as usize);
                }
            }
        }
    }

    #[test]
    fn valid_prefix_then_garbage_never_panics(
        msg in message(), garbage in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        let mut stream = encode(&msg);
        stream.extend(garbage);
        let mut d = Decoder::new(1 << 20);
        let got = d.feed(&stream);
        prop_assert_eq!(got[0].clone(), Ok(msg));
    }
}
