//! Streaming decoder for guest → host traffic: feed it whatever bytes the
//! socket gave, get back whole messages and errors.
//!
//! Memory is bounded by the *message* size, which is checked against the
//! cap (and, for control messages, against [`MAX_CONTROL_MESSAGE`]) before
//! the buffer for it is allocated; chunk sizes are never used to size an
//! allocation. Refused messages (too large, file transfer, unknown type) are
//! skipped byte by byte without being buffered, and decoding goes on after
//! them. Framing errors (wrong port, wrong protocol, empty chunk, a chunk
//! that runs past its message) leave no trustworthy boundary to resync on:
//! the decoder reports the error once and then refuses all further input;
//! the caller drops the connection.

use crate::message::{Message, PayloadError};
use crate::{msg_type, CHUNK_HEADER_LEN, CLIENT_PORT, MESSAGE_HEADER_LEN, PROTOCOL};

/// Largest data size accepted for a message other than `CLIPBOARD`
/// (capabilities, grab, request, release, max-clipboard are all tiny).
pub const MAX_CONTROL_MESSAGE: u32 = 4096;

/// What went wrong with the input. [`DecodeError::is_fatal`] tells whether
/// the stream can go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("chunk names port {port}, only port 1 (client) is allowed")]
    BadPort { port: u32 },
    #[error("empty chunk")]
    EmptyChunk,
    #[error("message header has protocol {protocol}, only 1 is allowed")]
    BadProtocol { protocol: u32 },
    #[error("chunk of {chunk} bytes runs past the end of its message ({message_left} bytes left)")]
    ChunkPastMessage { chunk: u32, message_left: u32 },
    #[error("message type {msg_type} of {size} bytes exceeds the limit of {max} bytes; skipped")]
    MessageTooLarge { msg_type: u32, size: u32, max: u32 },
    #[error("file transfer message (type {msg_type}, {size} bytes) refused")]
    FileTransferRefused { msg_type: u32, size: u32 },
    #[error("message type {msg_type} ({size} bytes) not handled; skipped")]
    UnknownType { msg_type: u32, size: u32 },
    #[error("malformed message type {msg_type}")]
    BadPayload {
        msg_type: u32,
        #[source]
        source: PayloadError,
    },
    #[error("input refused after an earlier framing error")]
    Poisoned,
}

impl DecodeError {
    /// True when the byte stream has lost its framing and the connection
    /// must be dropped.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::BadPort { .. }
                | DecodeError::EmptyChunk
                | DecodeError::BadProtocol { .. }
                | DecodeError::ChunkPastMessage { .. }
                | DecodeError::Poisoned
        )
    }
}

#[derive(Debug)]
enum MsgState {
    Header {
        buf: [u8; MESSAGE_HEADER_LEN],
        have: usize,
    },
    Body {
        msg_type: u32,
        size: u32,
        data: Vec<u8>,
    },
    Skip {
        left: u32,
    },
}

/// Streaming vdagent decoder with a message size cap.
#[derive(Debug)]
pub struct Decoder {
    max_message: u32,
    chunk_hdr: [u8; CHUNK_HEADER_LEN],
    chunk_hdr_have: usize,
    chunk_left: u32,
    msg: MsgState,
    poisoned: bool,
}

impl Decoder {
    /// A decoder that refuses messages whose data exceeds `max_message`
    /// bytes.
    pub fn new(max_message: u32) -> Self {
        Decoder {
            max_message,
            chunk_hdr: [0; CHUNK_HEADER_LEN],
            chunk_hdr_have: 0,
            chunk_left: 0,
            msg: MsgState::Header {
                buf: [0; MESSAGE_HEADER_LEN],
                have: 0,
            },
            poisoned: false,
        }
    }

    /// True between messages (nothing partial buffered).
    pub fn at_boundary(&self) -> bool {
        !self.poisoned
            && self.chunk_hdr_have == 0
            && self.chunk_left == 0
            && matches!(self.msg, MsgState::Header { have: 0, .. })
    }

    /// True once a fatal error has been reported.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Consumes `input`, returning the messages and errors it completed, in
    /// order. After a fatal error nothing more is decoded.
    pub fn feed(&mut self, mut input: &[u8]) -> Vec<Result<Message, DecodeError>> {
        let mut out = Vec::new();
        if self.poisoned {
            if !input.is_empty() {
                out.push(Err(DecodeError::Poisoned));
            }
            return out;
        }
        while !input.is_empty() {
            if self.chunk_left == 0 {
                let n = (CHUNK_HEADER_LEN - self.chunk_hdr_have).min(input.len());
                self.chunk_hdr[self.chunk_hdr_have..self.chunk_hdr_have + n]
                    .copy_from_slice(&input[..n]);
                self.chunk_hdr_have += n;
                input = &input[n..];
                if self.chunk_hdr_have < CHUNK_HEADER_LEN {
                    break;
                }
                self.chunk_hdr_have = 0;
                let port = le32(&self.chunk_hdr[0..4]);
                let size = le32(&self.chunk_hdr[4..8]);
                if let Err(e) = self.start_chunk(port, size) {
                    return self.poison(out, e);
                }
                continue;
            }
            let take = (self.chunk_left as usize).min(input.len());
            let (now, rest) = input.split_at(take);
            input = rest;
            self.chunk_left -= take as u32;
            if let Err(e) = self.message_bytes(now, &mut out) {
                return self.poison(out, e);
            }
        }
        out
    }

    fn poison(
        &mut self,
        mut out: Vec<Result<Message, DecodeError>>,
        e: DecodeError,
    ) -> Vec<Result<Message, DecodeError>> {
        self.poisoned = true;
        self.msg = MsgState::Header {
            buf: [0; MESSAGE_HEADER_LEN],
            have: 0,
        };
        out.push(Err(e));
        out
    }

    fn start_chunk(&mut self, port: u32, size: u32) -> Result<(), DecodeError> {
        if port != CLIENT_PORT {
            return Err(DecodeError::BadPort { port });
        }
        if size == 0 {
            return Err(DecodeError::EmptyChunk);
        }
        let message_left = match &self.msg {
            MsgState::Header { .. } => None, // checked once the header is complete
            MsgState::Body { size: s, data, .. } => Some(*s - data.len() as u32),
            MsgState::Skip { left } => Some(*left),
        };
        if let Some(message_left) = message_left {
            if size > message_left {
                return Err(DecodeError::ChunkPastMessage {
                    chunk: size,
                    message_left,
                });
            }
        }
        self.chunk_left = size;
        Ok(())
    }

    /// Feeds bytes that belong to the current chunk into the message state.
    fn message_bytes(
        &mut self,
        mut bytes: &[u8],
        out: &mut Vec<Result<Message, DecodeError>>,
    ) -> Result<(), DecodeError> {
        while !bytes.is_empty() {
            match &mut self.msg {
                MsgState::Header { buf, have } => {
                    let n = (MESSAGE_HEADER_LEN - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < MESSAGE_HEADER_LEN {
                        continue;
                    }
                    let hdr = *buf;
                    let protocol = le32(&hdr[0..4]);
                    let msg_type = le32(&hdr[4..8]);
                    let size = le32(&hdr[16..20]);
                    if protocol != PROTOCOL {
                        return Err(DecodeError::BadProtocol { protocol });
                    }
                    // What is left of this chunk (the part of it not yet
                    // handed to us plus what we hold) must not run past the
                    // message.
                    let chunk_rest = self.chunk_left as u64 + bytes.len() as u64;
                    if chunk_rest > size as u64 {
                        return Err(DecodeError::ChunkPastMessage {
                            chunk: chunk_rest.min(u32::MAX as u64) as u32,
                            message_left: size,
                        });
                    }
                    let max = if msg_type == msg_type::CLIPBOARD {
                        self.max_message
                    } else {
                        self.max_message.min(MAX_CONTROL_MESSAGE)
                    };
                    let refusal = if msg_type::is_file_transfer(msg_type) {
                        Some(DecodeError::FileTransferRefused { msg_type, size })
                    } else if !Message::is_known_type(msg_type) {
                        Some(DecodeError::UnknownType { msg_type, size })
                    } else if size > max {
                        Some(DecodeError::MessageTooLarge {
                            msg_type,
                            size,
                            max,
                        })
                    } else {
                        None
                    };
                    if let Some(e) = refusal {
                        out.push(Err(e));
                        self.msg = if size == 0 {
                            MsgState::Header {
                                buf: [0; MESSAGE_HEADER_LEN],
                                have: 0,
                            }
                        } else {
                            MsgState::Skip { left: size }
                        };
                    } else {
                        // `size` is at most `max` here: the allocation is bounded.
                        self.msg = MsgState::Body {
                            msg_type,
                            size,
                            data: Vec::with_capacity(size as usize),
                        };
                        self.finish_if_complete(out);
                    }
                }
                MsgState::Body { size, data, .. } => {
                    let n = (*size as usize - data.len()).min(bytes.len());
                    data.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    self.finish_if_complete(out);
                }
                MsgState::Skip { left } => {
                    let n = (*left as usize).min(bytes.len());
                    *left -= n as u32;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.msg = MsgState::Header {
                            buf: [0; MESSAGE_HEADER_LEN],
                            have: 0,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_if_complete(&mut self, out: &mut Vec<Result<Message, DecodeError>>) {
        if let MsgState::Body { size, data, .. } = &self.msg {
            if data.len() < *size as usize {
                return;
            }
        } else {
            return;
        }
        let MsgState::Body { msg_type, data, .. } = std::mem::replace(
            &mut self.msg,
            MsgState::Header {
                buf: [0; MESSAGE_HEADER_LEN],
                have: 0,
            },
        ) else {
            unreachable!()
        };
        out.push(
            Message::parse(msg_type, data)
                .map_err(|source| DecodeError::BadPayload { msg_type, source }),
        );
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
