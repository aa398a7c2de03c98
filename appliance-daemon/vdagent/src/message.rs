//! The messages a clipboard gateway exchanges with an agent, their payload
//! parsing (strict: exact sizes, no trailing bytes) and their encoding into
//! host → guest chunks of at most [`MAX_CHUNK_PAYLOAD`] bytes.
//!
//! The gateway never negotiates `CLIPBOARD_SELECTION` or
//! `CLIPBOARD_GRAB_SERIAL`, so no payload here carries a selection prefix or
//! a grab serial.

use crate::{
    msg_type, CHUNK_HEADER_LEN, CLIENT_PORT, MAX_CHUNK_PAYLOAD, MESSAGE_HEADER_LEN, PROTOCOL,
};

/// Clipboard data types (`VD_AGENT_CLIPBOARD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClipboardType {
    /// 0: no data; how a side answers a request it cannot serve.
    None,
    /// 1: UTF-8 text.
    Utf8Text,
    /// 2: PNG image.
    Png,
    /// 3: BMP image.
    Bmp,
    /// 4: TIFF image.
    Tiff,
    /// 5: JPEG image.
    Jpg,
    /// 6: a file list (file copy); never accepted.
    FileList,
    /// Any other number.
    Other(u32),
}

impl ClipboardType {
    pub fn from_u32(n: u32) -> Self {
        match n {
            0 => Self::None,
            1 => Self::Utf8Text,
            2 => Self::Png,
            3 => Self::Bmp,
            4 => Self::Tiff,
            5 => Self::Jpg,
            6 => Self::FileList,
            n => Self::Other(n),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Utf8Text => 1,
            Self::Png => 2,
            Self::Bmp => 3,
            Self::Tiff => 4,
            Self::Jpg => 5,
            Self::FileList => 6,
            Self::Other(n) => n,
        }
    }

    /// Short name for logs.
    pub fn name(self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Utf8Text => "utf8-text".into(),
            Self::Png => "png".into(),
            Self::Bmp => "bmp".into(),
            Self::Tiff => "tiff".into(),
            Self::Jpg => "jpeg".into(),
            Self::FileList => "file-list".into(),
            Self::Other(n) => format!("type-{n}"),
        }
    }
}

/// A capability bit set, as the words of `VDAgentAnnounceCapabilities.caps`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities(pub Vec<u32>);

impl Capabilities {
    /// The set holding exactly these bit numbers.
    pub fn from_bits(bits: &[u32]) -> Self {
        let words = bits.iter().map(|b| b / 32 + 1).max().unwrap_or(1) as usize;
        let mut v = vec![0u32; words];
        for b in bits {
            v[(b / 32) as usize] |= 1 << (b % 32);
        }
        Capabilities(v)
    }

    pub fn has(&self, bit: u32) -> bool {
        self.0
            .get((bit / 32) as usize)
            .is_some_and(|w| w & (1 << (bit % 32)) != 0)
    }
}

/// A decoded vdagent message (the subset a clipboard gateway handles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 6: `{u32 request, u32 caps[]}`; `request` asks the peer to announce back.
    AnnounceCapabilities { request: bool, caps: Capabilities },
    /// 7: `{u32 types[]}`: the sender now owns the clipboard, in these types.
    ClipboardGrab(Vec<ClipboardType>),
    /// 8: `{u32 type}`: the sender asks for the owner's data in this type.
    ClipboardRequest(ClipboardType),
    /// 4: `{u32 type, data}`: the answer to a request.
    Clipboard { ty: ClipboardType, data: Vec<u8> },
    /// 9: empty: the sender no longer owns the clipboard.
    ClipboardRelease,
    /// 14: `{i32 max}`: largest clipboard the peer will accept (-1: no limit).
    MaxClipboard(i32),
}

/// A message whose header was acceptable but whose data is not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{what} must be {expected} bytes, got {got}")]
    WrongSize {
        what: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("announce-capabilities request flag must be 0 or 1, got {0}")]
    BadRequestFlag(u32),
    #[error("clipboard grab lists no types")]
    EmptyGrab,
}

impl Message {
    /// The `VD_AGENT_*` type number.
    pub fn type_number(&self) -> u32 {
        match self {
            Message::AnnounceCapabilities { .. } => msg_type::ANNOUNCE_CAPABILITIES,
            Message::ClipboardGrab(_) => msg_type::CLIPBOARD_GRAB,
            Message::ClipboardRequest(_) => msg_type::CLIPBOARD_REQUEST,
            Message::Clipboard { .. } => msg_type::CLIPBOARD,
            Message::ClipboardRelease => msg_type::CLIPBOARD_RELEASE,
            Message::MaxClipboard(_) => msg_type::MAX_CLIPBOARD,
        }
    }

    /// True for the types [`Message::parse`] understands.
    pub fn is_known_type(t: u32) -> bool {
        matches!(
            t,
            msg_type::ANNOUNCE_CAPABILITIES
                | msg_type::CLIPBOARD_GRAB
                | msg_type::CLIPBOARD_REQUEST
                | msg_type::CLIPBOARD
                | msg_type::CLIPBOARD_RELEASE
                | msg_type::MAX_CLIPBOARD
        )
    }

    /// Parses the data of a message of type `t` (one of
    /// [`Message::is_known_type`]). `data` is already bounded by the cap.
    pub fn parse(t: u32, data: Vec<u8>) -> Result<Message, PayloadError> {
        let words = |what: &'static str, d: &[u8]| -> Result<Vec<u32>, PayloadError> {
            #[allow(clippy::manual_is_multiple_of)] // is_multiple_of is newer than the MSRV (1.80)
            if d.len() % 4 != 0 {
                return Err(PayloadError::WrongSize {
                    what,
                    expected: "a multiple of 4",
                    got: d.len(),
                });
            }
            Ok(d.chunks_exact(4).map(le32).collect())
        };
        let exact = |what: &'static str, d: &[u8], n: usize, expected: &'static str| {
            if d.len() != n {
                Err(PayloadError::WrongSize {
                    what,
                    expected,
                    got: d.len(),
                })
            } else {
                Ok(())
            }
        };
        match t {
            msg_type::ANNOUNCE_CAPABILITIES => {
                if data.len() < 4 {
                    return Err(PayloadError::WrongSize {
                        what: "announce-capabilities",
                        expected: "at least 4",
                        got: data.len(),
                    });
                }
                let w = words("announce-capabilities", &data)?;
                let request = match w[0] {
                    0 => false,
                    1 => true,
                    n => return Err(PayloadError::BadRequestFlag(n)),
                };
                Ok(Message::AnnounceCapabilities {
                    request,
                    caps: Capabilities(w[1..].to_vec()),
                })
            }
            msg_type::CLIPBOARD_GRAB => {
                let w = words("clipboard-grab", &data)?;
                if w.is_empty() {
                    return Err(PayloadError::EmptyGrab);
                }
                Ok(Message::ClipboardGrab(
                    w.into_iter().map(ClipboardType::from_u32).collect(),
                ))
            }
            msg_type::CLIPBOARD_REQUEST => {
                exact("clipboard-request", &data, 4, "4")?;
                Ok(Message::ClipboardRequest(ClipboardType::from_u32(le32(
                    &data,
                ))))
            }
            msg_type::CLIPBOARD => {
                if data.len() < 4 {
                    return Err(PayloadError::WrongSize {
                        what: "clipboard",
                        expected: "at least 4",
                        got: data.len(),
                    });
                }
                let ty = ClipboardType::from_u32(le32(&data));
                let mut data = data;
                data.drain(..4);
                Ok(Message::Clipboard { ty, data })
            }
            msg_type::CLIPBOARD_RELEASE => {
                exact("clipboard-release", &data, 0, "0")?;
                Ok(Message::ClipboardRelease)
            }
            msg_type::MAX_CLIPBOARD => {
                exact("max-clipboard", &data, 4, "4")?;
                Ok(Message::MaxClipboard(le32(&data) as i32))
            }
            other => unreachable!("Message::parse called with unknown type {other}"),
        }
    }

    /// The message data (without header).
    pub fn payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::AnnounceCapabilities { request, caps } => {
                p.extend_from_slice(&u32::from(*request).to_le_bytes());
                for w in &caps.0 {
                    p.extend_from_slice(&w.to_le_bytes());
                }
            }
            Message::ClipboardGrab(types) => {
                for t in types {
                    p.extend_from_slice(&t.to_u32().to_le_bytes());
                }
            }
            Message::ClipboardRequest(t) => p.extend_from_slice(&t.to_u32().to_le_bytes()),
            Message::Clipboard { ty, data } => {
                p.reserve(4 + data.len());
                p.extend_from_slice(&ty.to_u32().to_le_bytes());
                p.extend_from_slice(data);
            }
            Message::ClipboardRelease => {}
            Message::MaxClipboard(m) => p.extend_from_slice(&m.to_le_bytes()),
        }
        p
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Encodes `msg` as host → guest chunks (port 1, at most
/// [`MAX_CHUNK_PAYLOAD`] payload bytes each, the message header in the first).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(msg, &mut out);
    out
}

/// As [`encode`], appending to `out`.
///
/// Panics if the message data exceeds `u32::MAX` bytes, which no caller can
/// build from a capped input.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    let data = msg.payload();
    let size = u32::try_from(data.len()).expect("vdagent message data exceeds u32::MAX bytes");
    let mut body = Vec::with_capacity(MESSAGE_HEADER_LEN + data.len());
    body.extend_from_slice(&PROTOCOL.to_le_bytes());
    body.extend_from_slice(&msg.type_number().to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&size.to_le_bytes());
    body.extend_from_slice(&data);
    let chunks = body.len().div_ceil(MAX_CHUNK_PAYLOAD);
    out.reserve(body.len() + chunks * CHUNK_HEADER_LEN);
    for chunk in body.chunks(MAX_CHUNK_PAYLOAD) {
        out.extend_from_slice(&CLIENT_PORT.to_le_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}
