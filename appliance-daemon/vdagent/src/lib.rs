//! SPICE vdagent wire codec: the framing the guest agents (Windows and Linux
//! `spice-vdagent`) speak on the `com.redhat.spice.0` virtio-serial port.
//!
//! Two layers, all little-endian and packed (spice-protocol `vd_agent.h`):
//!
//! - a **chunk** `{u32 port, u32 size}` then `size` payload bytes; the port
//!   must be 1 (`VDP_CLIENT_PORT`);
//! - a **message** `{u32 protocol = 1, u32 type, u64 opaque, u32 size}`
//!   (20 bytes) then `size` data bytes, carried by one or more chunks. One
//!   chunk never holds bytes of two messages.
//!
//! Chunking is asymmetric: what the host sends is split into chunks of at
//! most [`MAX_CHUNK_PAYLOAD`] bytes (the agents refuse larger ones), what the
//! guest sends may come as one chunk of any size, so the decoder bounds
//! memory by the *message* size, checked against a cap before anything is
//! allocated.
//!
//! Only what a clipboard gateway needs is decoded: capability announcement,
//! clipboard grab / request / data / release and max-clipboard. File
//! transfer (types 10–12) and every other type are recognised only to be
//! refused; their data is skipped without being buffered.

mod decoder;
mod message;

pub use decoder::{DecodeError, Decoder};
pub use message::{encode, encode_into, Capabilities, ClipboardType, Message, PayloadError};

/// `VDP_CLIENT_PORT`: the only port a chunk may name.
pub const CLIENT_PORT: u32 = 1;
/// `VD_AGENT_PROTOCOL`: the only protocol version a message may carry.
pub const PROTOCOL: u32 = 1;
/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 8;
/// Bytes of a message header.
pub const MESSAGE_HEADER_LEN: usize = 20;
/// Largest chunk payload the host may send to a guest
/// (`VD_AGENT_MAX_DATA_SIZE`); the Linux agent drops the connection on a
/// larger one and the Windows agent stops.
pub const MAX_CHUNK_PAYLOAD: usize = 2048;

/// Message type numbers (`VD_AGENT_*`).
pub mod msg_type {
    pub const MOUSE_STATE: u32 = 1;
    pub const MONITORS_CONFIG: u32 = 2;
    pub const REPLY: u32 = 3;
    pub const CLIPBOARD: u32 = 4;
    pub const DISPLAY_CONFIG: u32 = 5;
    pub const ANNOUNCE_CAPABILITIES: u32 = 6;
    pub const CLIPBOARD_GRAB: u32 = 7;
    pub const CLIPBOARD_REQUEST: u32 = 8;
    pub const CLIPBOARD_RELEASE: u32 = 9;
    pub const FILE_XFER_START: u32 = 10;
    pub const FILE_XFER_STATUS: u32 = 11;
    pub const FILE_XFER_DATA: u32 = 12;
    pub const CLIENT_DISCONNECTED: u32 = 13;
    pub const MAX_CLIPBOARD: u32 = 14;

    /// True for the file-transfer messages, which are always refused.
    pub fn is_file_transfer(t: u32) -> bool {
        (FILE_XFER_START..=FILE_XFER_DATA).contains(&t)
    }
}

/// Capability bit numbers (`VD_AGENT_CAP_*`).
pub mod cap {
    pub const CLIPBOARD: u32 = 3;
    pub const CLIPBOARD_BY_DEMAND: u32 = 5;
    pub const CLIPBOARD_SELECTION: u32 = 6;
    pub const MAX_CLIPBOARD: u32 = 10;
    pub const CLIPBOARD_GRAB_SERIAL: u32 = 17;
}
