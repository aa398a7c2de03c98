//! The guest side of the SPICE vdagent clipboard protocol, as the test guest
//! plays it on `com.redhat.spice.0` (the I/O is in `main.rs`; this is the
//! state machine, so it is unit-tested on the host). Framing is the
//! workspace codec `airlock-vdagent`: what the guest sends is encoded with
//! [`airlock_vdagent::encode`] (chunks of at most 2048 payload bytes), what
//! it receives is decoded with [`airlock_vdagent::Decoder`].
//!
//! Behaviour, after the real agents (`../../shared/ARCHITECTURE.md` §5):
//!
//! - on start, and again once the host has gone away and reconnects, the
//!   guest announces its capabilities with `request = 1` (a host that
//!   reconnects before the guest saw it leave gets no new announce; the
//!   gateway sends its own with `request = 1` on every connection and gets
//!   the answer): `CLIPBOARD_BY_DEMAND` and
//!   `MAX_CLIPBOARD`, without `CLIPBOARD_SELECTION` or `GRAB_SERIAL`, so no
//!   message carries a selection prefix or a serial (as the Windows agent);
//! - a host announce with `request = 1` is answered with `request = 0`; any
//!   host announce forgets the host's previous grab (the Linux agent resets
//!   its clipboard state);
//! - like the Windows agent, clipboard messages from a host that has not
//!   announced `CLIPBOARD_BY_DEMAND` are counted and ignored, and the guest
//!   sends none to it;
//! - host `CLIPBOARD_GRAB`: the offered types are remembered and the guest's
//!   own clipboard is dropped (the host owns the clipboard now);
//!   `CLIPBOARD_RELEASE` forgets the offer;
//! - host `CLIPBOARD_REQUEST`: answered with `CLIPBOARD` of the guest's
//!   content when the guest owns the clipboard in that type and it fits the
//!   host's `MAX_CLIPBOARD`; otherwise with an empty `CLIPBOARD` of type
//!   `NONE` (how the gateway itself answers a request it cannot serve);
//! - host `CLIPBOARD`: stored as "last received", whether requested or not;
//! - host `MAX_CLIPBOARD`: the limit for later answers (negative: none).

use std::collections::BTreeMap;

use airlock_vdagent::{cap, Capabilities, ClipboardType, DecodeError, Message};
use base64::Engine as _;

use crate::protocol;

/// Largest message the guest accepts from the host (the decoder's cap).
pub const MAX_INBOUND_MESSAGE: u32 = 16 * 1024 * 1024;

/// The capabilities the guest announces: `CLIPBOARD_BY_DEMAND` and
/// `MAX_CLIPBOARD` (no `CLIPBOARD_SELECTION`, no `CLIPBOARD_GRAB_SERIAL`).
pub fn capabilities() -> Capabilities {
    Capabilities::from_bits(&[cap::CLIPBOARD_BY_DEMAND, cap::MAX_CLIPBOARD])
}

/// The guest agent's state and its message counters.
#[derive(Debug, Default)]
pub struct Agent {
    /// What the host announced in this session (`None`: nothing yet).
    host_caps: Option<Capabilities>,
    /// The host's `MAX_CLIPBOARD` (`None`: not sent; negative: no limit).
    max_clipboard: Option<i32>,
    /// The guest's clipboard, while the guest owns it.
    own: Option<(ClipboardType, Vec<u8>)>,
    /// The types of the host's current grab.
    host_grab: Option<Vec<ClipboardType>>,
    /// The last `CLIPBOARD` the host sent.
    received: Option<(ClipboardType, Vec<u8>)>,
    /// Messages received / sent, by type number.
    rx: BTreeMap<u32, u64>,
    tx: BTreeMap<u32, u64>,
    /// Input the decoder refused or could not frame.
    errors: u64,
}

impl Agent {
    pub const fn new() -> Self {
        Agent {
            host_caps: None,
            max_clipboard: None,
            own: None,
            host_grab: None,
            received: None,
            rx: BTreeMap::new(),
            tx: BTreeMap::new(),
            errors: 0,
        }
    }

    /// A (new) host connection: forget the previous host's announce, limit
    /// and grab; returns the guest's announce (`request = 1`).
    pub fn start(&mut self) -> Vec<Message> {
        self.host_caps = None;
        self.max_clipboard = None;
        self.host_grab = None;
        vec![Message::AnnounceCapabilities {
            request: true,
            caps: capabilities(),
        }]
    }

    /// True once the host announced `CLIPBOARD_BY_DEMAND`.
    fn clipboard_ready(&self) -> bool {
        self.host_caps
            .as_ref()
            .is_some_and(|c| c.has(cap::CLIPBOARD_BY_DEMAND))
    }

    /// Handles one message from the host; returns the guest's answers.
    pub fn on_message(&mut self, msg: Message) -> Vec<Message> {
        *self.rx.entry(msg.type_number()).or_default() += 1;
        if let Message::AnnounceCapabilities { request, caps } = msg {
            self.host_caps = Some(caps);
            self.host_grab = None;
            return if request {
                vec![Message::AnnounceCapabilities {
                    request: false,
                    caps: capabilities(),
                }]
            } else {
                Vec::new()
            };
        }
        if !self.clipboard_ready() {
            return Vec::new();
        }
        match msg {
            Message::AnnounceCapabilities { .. } => unreachable!("handled above"),
            Message::ClipboardGrab(types) => {
                self.host_grab = Some(types);
                self.own = None;
                Vec::new()
            }
            Message::ClipboardRelease => {
                self.host_grab = None;
                Vec::new()
            }
            Message::ClipboardRequest(ty) => {
                let fits = |data: &Vec<u8>| match self.max_clipboard {
                    Some(m) if m >= 0 => data.len() <= m as usize,
                    _ => true,
                };
                match &self.own {
                    Some((own_ty, data)) if *own_ty == ty && fits(data) => {
                        vec![Message::Clipboard {
                            ty,
                            data: data.clone(),
                        }]
                    }
                    _ => vec![Message::Clipboard {
                        ty: ClipboardType::None,
                        data: Vec::new(),
                    }],
                }
            }
            Message::Clipboard { ty, data } => {
                self.received = Some((ty, data));
                Vec::new()
            }
            Message::MaxClipboard(max) => {
                self.max_clipboard = Some(max);
                Vec::new()
            }
        }
    }

    /// Counts input the decoder refused (by type where it names one).
    pub fn on_refused(&mut self, err: &DecodeError) {
        self.errors += 1;
        match err {
            DecodeError::UnknownType { msg_type, .. }
            | DecodeError::FileTransferRefused { msg_type, .. }
            | DecodeError::MessageTooLarge { msg_type, .. }
            | DecodeError::BadPayload { msg_type, .. } => {
                *self.rx.entry(*msg_type).or_default() += 1
            }
            _ => {}
        }
    }

    /// Counts a message the guest has written to the host.
    pub fn sent(&mut self, msg: &Message) {
        *self.tx.entry(msg.type_number()).or_default() += 1;
    }

    /// The guest takes the clipboard with `data` in type `ty` (a copy in
    /// the guest); returns the grab to send, or why none can be sent (the
    /// content is kept either way).
    pub fn grab(&mut self, ty: ClipboardType, data: Vec<u8>) -> Result<Vec<Message>, String> {
        self.own = Some((ty, data));
        self.host_grab = None;
        self.ready()?;
        Ok(vec![Message::ClipboardGrab(vec![ty])])
    }

    /// A paste in the guest: the request to send for type `ty`.
    pub fn request(&mut self, ty: ClipboardType) -> Result<Vec<Message>, String> {
        self.ready()?;
        Ok(vec![Message::ClipboardRequest(ty)])
    }

    fn ready(&self) -> Result<(), String> {
        match &self.host_caps {
            None => Err("the host has not announced its capabilities".into()),
            Some(_) if !self.clipboard_ready() => {
                Err("the host did not announce clipboard-by-demand".into())
            }
            Some(_) => Ok(()),
        }
    }

    /// The `clip-received` reply: `clip <type> <base64>` or `clip none`.
    pub fn received_line(&self) -> String {
        match &self.received {
            Some((ty, data)) if *ty != ClipboardType::None => {
                format!(
                    "clip {} {}",
                    protocol::clip_type_name(*ty),
                    base64::engine::general_purpose::STANDARD.encode(data)
                )
            }
            _ => "clip none".into(),
        }
    }

    /// The `clip-grabs` reply: `grabs <type> ...` or `grabs none`.
    pub fn grabs_line(&self) -> String {
        match &self.host_grab {
            Some(types) => {
                let names: Vec<String> =
                    types.iter().map(|t| protocol::clip_type_name(*t)).collect();
                format!("grabs {}", names.join(" "))
            }
            None => "grabs none".into(),
        }
    }

    /// The `vdagent-log` reply (format in [`protocol::VDAGENT_LOG`]).
    pub fn log_line(&self, connected: bool) -> String {
        let mut line = format!("vdagent connected={}", if connected { "yes" } else { "no" });
        for (dir, counts) in [("rx", &self.rx), ("tx", &self.tx)] {
            for (t, n) in counts {
                line.push_str(&format!(" {dir}.{}={n}", protocol::message_name(*t)));
            }
        }
        line.push_str(&format!(" errors={}", self.errors));
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced() -> Agent {
        let mut a = Agent::new();
        a.start();
        let host = Capabilities::from_bits(&[cap::CLIPBOARD_BY_DEMAND, cap::MAX_CLIPBOARD]);
        assert_eq!(
            a.on_message(Message::AnnounceCapabilities {
                request: true,
                caps: host
            }),
            vec![Message::AnnounceCapabilities {
                request: false,
                caps: capabilities()
            }]
        );
        a
    }

    #[test]
    fn announces_by_demand_and_max_clipboard_only() {
        let caps = capabilities();
        assert!(caps.has(cap::CLIPBOARD_BY_DEMAND) && caps.has(cap::MAX_CLIPBOARD));
        assert!(
            !caps.has(cap::CLIPBOARD_SELECTION)
                && !caps.has(cap::CLIPBOARD_GRAB_SERIAL)
                && !caps.has(cap::CLIPBOARD)
        );
        assert_eq!(caps.0, vec![(1 << 5) | (1 << 10)]);
        assert_eq!(
            Agent::new().start(),
            vec![Message::AnnounceCapabilities {
                request: true,
                caps
            }]
        );
    }

    #[test]
    fn host_grab_and_data_are_kept() {
        let mut a = announced();
        assert_eq!(a.grabs_line(), "grabs none");
        assert!(a
            .on_message(Message::ClipboardGrab(vec![
                ClipboardType::Utf8Text,
                ClipboardType::Png
            ]))
            .is_empty());
        assert_eq!(a.grabs_line(), "grabs utf8 png");
        assert_eq!(a.received_line(), "clip none");
        a.on_message(Message::Clipboard {
            ty: ClipboardType::Utf8Text,
            data: b"hi".to_vec(),
        });
        assert_eq!(a.received_line(), "clip utf8 aGk=");
        a.on_message(Message::ClipboardRelease);
        assert_eq!(a.grabs_line(), "grabs none");
    }

    #[test]
    fn requests_are_answered_with_own_data_or_none() {
        let mut a = announced();
        let none = vec![Message::Clipboard {
            ty: ClipboardType::None,
            data: Vec::new(),
        }];
        assert_eq!(
            a.on_message(Message::ClipboardRequest(ClipboardType::Utf8Text)),
            none
        );
        assert_eq!(
            a.grab(ClipboardType::Utf8Text, b"abc".to_vec()).unwrap(),
            vec![Message::ClipboardGrab(vec![ClipboardType::Utf8Text])]
        );
        assert_eq!(
            a.on_message(Message::ClipboardRequest(ClipboardType::Utf8Text)),
            vec![Message::Clipboard {
                ty: ClipboardType::Utf8Text,
                data: b"abc".to_vec()
            }]
        );
        assert_eq!(
            a.on_message(Message::ClipboardRequest(ClipboardType::Png)),
            none
        );
        a.on_message(Message::MaxClipboard(2));
        assert_eq!(
            a.on_message(Message::ClipboardRequest(ClipboardType::Utf8Text)),
            none,
            "over the host's limit"
        );
        a.on_message(Message::MaxClipboard(-1));
        assert_eq!(
            a.on_message(Message::ClipboardRequest(ClipboardType::Utf8Text))
                .len(),
            1
        );
        // A host grab takes the clipboard away from the guest.
        a.on_message(Message::ClipboardGrab(vec![ClipboardType::Png]));
        assert_eq!(
            a.on_message(Message::ClipboardRequest(ClipboardType::Utf8Text)),
            none
        );
    }

    #[test]
    fn no_clipboard_traffic_without_by_demand() {
        let mut a = Agent::new();
        a.start();
        assert!(a.grab(ClipboardType::Utf8Text, b"x".to_vec()).is_err());
        a.on_message(Message::AnnounceCapabilities {
            request: false,
            caps: Capabilities::from_bits(&[cap::MAX_CLIPBOARD]),
        });
        assert!(a.request(ClipboardType::Utf8Text).is_err());
        assert!(a
            .on_message(Message::ClipboardRequest(ClipboardType::Utf8Text))
            .is_empty());
        a.on_message(Message::Clipboard {
            ty: ClipboardType::Utf8Text,
            data: b"x".to_vec(),
        });
        assert_eq!(a.received_line(), "clip none");
        assert_eq!(a.log_line(false), "vdagent connected=no rx.clipboard=1 rx.announce-capabilities=1 rx.clipboard-request=1 errors=0");
    }

    #[test]
    fn log_counts_both_directions_and_refusals() {
        let mut a = announced();
        a.sent(&Message::AnnounceCapabilities {
            request: true,
            caps: capabilities(),
        });
        a.on_refused(&DecodeError::FileTransferRefused {
            msg_type: 10,
            size: 5,
        });
        a.on_refused(&DecodeError::EmptyChunk);
        assert_eq!(
            a.log_line(true),
            "vdagent connected=yes rx.announce-capabilities=1 rx.file-xfer-start=1 tx.announce-capabilities=1 errors=2"
        );
    }
}
