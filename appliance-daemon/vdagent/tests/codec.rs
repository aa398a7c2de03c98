//! Table-driven codec tests on byte vectors, including the worked examples
//! of ARCHITECTURE.md §5.

use airlock_vdagent::{
    cap, encode, Capabilities, ClipboardType, DecodeError, Decoder, Message, PayloadError,
    MAX_CHUNK_PAYLOAD,
};

const CAP: u32 = 1 << 20;

/// Little-endian u32s as bytes.
fn w(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One chunk holding one whole message: chunk header, message header, data.
fn frame(port: u32, protocol: u32, msg_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = w(&[
        port,
        20 + data.len() as u32,
        protocol,
        msg_type,
        0,
        0,
        data.len() as u32,
    ]);
    v.extend_from_slice(data);
    v
}

fn decode_all(bytes: &[u8]) -> Vec<Result<Message, DecodeError>> {
    Decoder::new(CAP).feed(bytes)
}

#[test]
fn host_announce_bytes_are_exact() {
    // request=1, caps = CLIPBOARD_BY_DEMAND (bit 5) | MAX_CLIPBOARD (bit 10) = 0x420.
    let msg = Message::AnnounceCapabilities {
        request: true,
        caps: Capabilities::from_bits(&[cap::CLIPBOARD_BY_DEMAND, cap::MAX_CLIPBOARD]),
    };
    let expected: Vec<u8> = vec![
        1, 0, 0, 0, 28, 0, 0, 0, // chunk: port 1, 28 bytes
        1, 0, 0, 0, 6, 0, 0, 0, // protocol 1, ANNOUNCE_CAPABILITIES
        0, 0, 0, 0, 0, 0, 0, 0, // opaque
        8, 0, 0, 0, // size 8
        1, 0, 0, 0, 0x20, 0x04, 0, 0, // request 1, caps 0x420
    ];
    assert_eq!(encode(&msg), expected);
    assert_eq!(decode_all(&expected), vec![Ok(msg)]);
}

#[test]
fn linux_agent_announce_0x00038de7() {
    let bytes = frame(1, 1, 6, &w(&[0, 0x0003_8de7]));
    let msgs = decode_all(&bytes);
    let Ok(Message::AnnounceCapabilities { request, caps }) = &msgs[0] else {
        panic!("{msgs:?}")
    };
    assert!(!request);
    for bit in [
        cap::CLIPBOARD_BY_DEMAND,
        cap::CLIPBOARD_SELECTION,
        cap::MAX_CLIPBOARD,
        cap::CLIPBOARD_GRAB_SERIAL,
    ] {
        assert!(caps.has(bit), "bit {bit}");
    }
    assert!(!caps.has(4) && !caps.has(40));
}

#[test]
fn text_of_105000_bytes_in_one_105024_byte_chunk() {
    let text = vec![b'x'; 105_000];
    let mut data = w(&[1]);
    data.extend_from_slice(&text);
    let bytes = frame(1, 1, 4, &data);
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 105_024);
    assert_eq!(
        decode_all(&bytes),
        vec![Ok(Message::Clipboard {
            ty: ClipboardType::Utf8Text,
            data: text.clone()
        })]
    );

    // The same message sent host -> guest: 52 chunks of at most 2048 bytes.
    let enc = encode(&Message::Clipboard {
        ty: ClipboardType::Utf8Text,
        data: text,
    });
    let mut sizes = vec![];
    let mut rest = &enc[..];
    while !rest.is_empty() {
        assert_eq!(&rest[0..4], &[1, 0, 0, 0]);
        let n = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
        sizes.push(n);
        rest = &rest[8 + n..];
    }
    assert_eq!(sizes.len(), 52);
    assert!(sizes.iter().all(|&n| n <= MAX_CHUNK_PAYLOAD));
    assert_eq!(sizes[0], 2048);
    assert_eq!(*sizes.last().unwrap(), 105_024 - 51 * 2048);
}

#[test]
fn table_of_messages() {
    use ClipboardType::*;
    let cases: Vec<(&str, Vec<u8>, Message)> = vec![
        (
            "grab text",
            frame(1, 1, 7, &w(&[1])),
            Message::ClipboardGrab(vec![Utf8Text]),
        ),
        (
            "grab png+bmp",
            frame(1, 1, 7, &w(&[2, 3])),
            Message::ClipboardGrab(vec![Png, Bmp]),
        ),
        (
            "grab unknown type kept",
            frame(1, 1, 7, &w(&[99])),
            Message::ClipboardGrab(vec![Other(99)]),
        ),
        (
            "request png",
            frame(1, 1, 8, &w(&[2])),
            Message::ClipboardRequest(Png),
        ),
        ("release", frame(1, 1, 9, &[]), Message::ClipboardRelease),
        (
            "max clipboard -1",
            frame(1, 1, 14, &w(&[u32::MAX])),
            Message::MaxClipboard(-1),
        ),
        (
            "empty answer",
            frame(1, 1, 4, &w(&[0])),
            Message::Clipboard {
                ty: None,
                data: vec![],
            },
        ),
        (
            "jpeg data",
            frame(1, 1, 4, &[5, 0, 0, 0, 0xff, 0xd8]),
            Message::Clipboard {
                ty: Jpg,
                data: vec![0xff, 0xd8],
            },
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(decode_all(&bytes), vec![Ok(want.clone())], "{name}");
        // Host-side encoding of a small message is the same single chunk.
        assert_eq!(encode(&want), bytes, "{name}");
    }
}

#[test]
fn table_of_refusals() {
    // A clipboard message one byte over the cap, data and all: skipped.
    let over = frame(1, 1, 4, &vec![0; CAP as usize + 1]);
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "port 2",
            frame(2, 1, 7, &w(&[1])),
            DecodeError::BadPort { port: 2 },
        ),
        (
            "port 3",
            frame(3, 1, 7, &w(&[1])),
            DecodeError::BadPort { port: 3 },
        ),
        (
            "protocol 2",
            frame(1, 2, 7, &w(&[1])),
            DecodeError::BadProtocol { protocol: 2 },
        ),
        ("empty chunk", w(&[1, 0]), DecodeError::EmptyChunk),
        (
            "chunk longer than its message (lying message size)",
            {
                let mut b = frame(1, 1, 7, &w(&[1, 2]));
                b[24..28].copy_from_slice(&4u32.to_le_bytes());
                b
            },
            DecodeError::ChunkPastMessage {
                chunk: 8,
                message_left: 4,
            },
        ),
        (
            "message over the cap",
            over,
            DecodeError::MessageTooLarge {
                msg_type: 4,
                size: CAP + 1,
                max: CAP,
            },
        ),
        (
            "control message over 4096",
            frame(1, 1, 7, &vec![1; 4100]),
            DecodeError::MessageTooLarge {
                msg_type: 7,
                size: 4100,
                max: 4096,
            },
        ),
        (
            "file transfer start",
            frame(1, 1, 10, b"[vdagent-file-xfer]"),
            DecodeError::FileTransferRefused {
                msg_type: 10,
                size: 19,
            },
        ),
        (
            "file transfer status",
            frame(1, 1, 11, &w(&[1, 0])),
            DecodeError::FileTransferRefused {
                msg_type: 11,
                size: 8,
            },
        ),
        (
            "file transfer data",
            frame(1, 1, 12, &[0; 12]),
            DecodeError::FileTransferRefused {
                msg_type: 12,
                size: 12,
            },
        ),
        (
            "monitors config",
            frame(1, 1, 2, &w(&[0, 0])),
            DecodeError::UnknownType {
                msg_type: 2,
                size: 8,
            },
        ),
        (
            "grab with 3 bytes",
            frame(1, 1, 7, &[1, 0, 0]),
            DecodeError::BadPayload {
                msg_type: 7,
                source: PayloadError::WrongSize {
                    what: "clipboard-grab",
                    expected: "a multiple of 4",
                    got: 3,
                },
            },
        ),
        (
            "empty grab",
            frame(1, 1, 7, &[]),
            DecodeError::BadPayload {
                msg_type: 7,
                source: PayloadError::EmptyGrab,
            },
        ),
        (
            "release with selection prefix",
            frame(1, 1, 9, &[0; 4]),
            DecodeError::BadPayload {
                msg_type: 9,
                source: PayloadError::WrongSize {
                    what: "clipboard-release",
                    expected: "0",
                    got: 4,
                },
            },
        ),
        (
            "announce request 2",
            frame(1, 1, 6, &w(&[2, 0])),
            DecodeError::BadPayload {
                msg_type: 6,
                source: PayloadError::BadRequestFlag(2),
            },
        ),
        (
            "clipboard shorter than its type",
            frame(1, 1, 4, &[1, 0]),
            DecodeError::BadPayload {
                msg_type: 4,
                source: PayloadError::WrongSize {
                    what: "clipboard",
                    expected: "at least 4",
                    got: 2,
                },
            },
        ),
    ];
    for (name, bytes, want) in cases {
        let fatal = want.is_fatal();
        // The message after the bad one decodes only if the error is not fatal.
        let mut input = bytes.clone();
        input.extend_from_slice(&frame(1, 1, 9, &[]));
        let got = decode_all(&input);
        assert_eq!(got[0], Err(want), "{name}");
        if fatal {
            assert_eq!(
                got.len(),
                1,
                "{name}: nothing decoded after a fatal error: {got:?}"
            );
        } else {
            assert_eq!(
                got[1..],
                [Ok(Message::ClipboardRelease)],
                "{name}: resynced"
            );
        }
    }
}

#[test]
fn oversized_message_is_refused_from_its_header_alone() {
    // A header claiming 4 GiB: the error comes as soon as the 28 header bytes
    // are in, long before any data (none is ever sent here).
    let mut d = Decoder::new(CAP);
    let hdr = w(&[1, u32::MAX, 1, 4, 0, 0, u32::MAX - 20]);
    let got = d.feed(&hdr);
    assert_eq!(
        got,
        vec![Err(DecodeError::MessageTooLarge {
            msg_type: 4,
            size: u32::MAX - 20,
            max: CAP
        })]
    );
}

#[test]
fn byte_by_byte_equals_all_at_once() {
    let mut stream = encode(&Message::ClipboardGrab(vec![ClipboardType::Utf8Text]));
    stream.extend(encode(&Message::Clipboard {
        ty: ClipboardType::Utf8Text,
        data: vec![b'a'; 5000],
    }));
    stream.extend(frame(1, 1, 11, &[0; 8]));
    stream.extend(encode(&Message::ClipboardRelease));
    let whole = decode_all(&stream);
    let mut d = Decoder::new(CAP);
    let mut pieces = vec![];
    for b in &stream {
        pieces.extend(d.feed(std::slice::from_ref(b)));
    }
    assert_eq!(whole, pieces);
    assert_eq!(whole.len(), 4);
    assert!(d.at_boundary());
}

#[test]
fn message_header_may_span_chunks() {
    let mut bytes = w(&[1, 10]);
    bytes.extend(w(&[1, 8]));
    bytes.extend([0, 0]);
    bytes.extend(w(&[1, 14]));
    bytes.extend([0; 6]);
    bytes.extend(w(&[4, 1]));
    assert_eq!(
        decode_all(&bytes),
        vec![Ok(Message::ClipboardRequest(ClipboardType::Utf8Text))]
    );
}

#[test]
fn continuation_chunk_past_message_is_fatal() {
    // Message of 8 data bytes: first chunk carries header + 4, second chunk claims 10.
    let mut bytes = w(&[1, 24, 1, 7, 0, 0, 8, 1]);
    bytes.extend(w(&[1, 10, 2, 3]));
    let got = decode_all(&bytes);
    assert_eq!(
        got,
        vec![Err(DecodeError::ChunkPastMessage {
            chunk: 10,
            message_left: 4
        })]
    );
}

#[test]
fn poisoned_after_fatal_error() {
    let mut d = Decoder::new(CAP);
    assert!(d.feed(&frame(2, 1, 9, &[]))[0]
        .as_ref()
        .unwrap_err()
        .is_fatal());
    assert!(d.is_poisoned());
    assert_eq!(
        d.feed(&frame(1, 1, 9, &[])),
        vec![Err(DecodeError::Poisoned)]
    );
}
