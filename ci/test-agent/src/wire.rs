//! The wire format between the host and the in-guest agent: newline-delimited
//! JSON, one message per line, in both directions.
//!
//! Host → guest: a [`Request`] per line.
//! Guest → host: an [`Event`] (`{"event":"ready",...}`) whenever the agent
//! (re)opens its port, then one [`Response`] or [`ErrorResponse`] per request.
//! The agent starts every connection with an empty line before `ready`, so a
//! line cut short by a reboot never swallows the next boot's `ready`; readers
//! skip empty lines.
//!
//! Both sides use these types, so the format is defined exactly once.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Time a command may run when the request does not say (`timeout_ms`).
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// Most bytes of stdout, and separately of stderr, that a response carries.
pub const OUTPUT_CAP: usize = 4 * 1024 * 1024;

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// Run `argv` (no shell) and report how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub argv: Vec<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Written to the command's stdin, which is closed afterwards. Without
    /// it stdin is `/dev/null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    /// `None` when the command was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The agent killed the command's process group at the deadline.
    pub timed_out: bool,
    /// Lossy UTF-8, at most [`OUTPUT_CAP`] bytes of output.
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    /// stdout or stderr was cut at [`OUTPUT_CAP`].
    #[serde(default)]
    pub truncated: bool,
}

/// A request the agent could not run: malformed line, empty argv, or a
/// program that could not be started. `id` is `null` when the line did not
/// carry a readable one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub id: Option<u64>,
    pub error: String,
}

/// Unsolicited messages from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The agent opened its port and waits for requests. `boot_id` is the
    /// guest kernel's `/proc/sys/kernel/random/boot_id`, new on every boot.
    Ready { boot_id: String },
}

/// Any line the agent sends, as the host decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Event(Event),
    Response(Response),
    Error(ErrorResponse),
}

/// The agent's answer to one request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Response(Response),
    Error(ErrorResponse),
}

impl Reply {
    pub fn error(id: Option<u64>, error: impl Into<String>) -> Reply {
        Reply::Error(ErrorResponse {
            id,
            error: error.into(),
        })
    }
}

/// One message as a JSON line, newline included.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (string keys, no maps of
    // non-string keys, no custom Serialize impls).
    let mut line = serde_json::to_vec(message).expect("wire types always serialize");
    line.push(b'\n');
    line
}

/// The line for a reply, newline included.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Response(r) => encode(r),
        Reply::Error(e) => encode(e),
    }
}

/// Decodes a line from the agent (without its newline). The kind is decided
/// by the keys present: `event`, then `error`, otherwise a response.
pub fn decode_message(line: &[u8]) -> Result<Message, serde_json::Error> {
    let value: Value = serde_json::from_slice(line)?;
    let has = |key: &str| value.get(key).is_some();
    if has("event") {
        Ok(Message::Event(serde_json::from_value(value)?))
    } else if has("error") {
        Ok(Message::Error(serde_json::from_value(value)?))
    } else {
        Ok(Message::Response(serde_json::from_value(value)?))
    }
}

/// Decodes a request line (without its newline). On failure returns the
/// error reply to send, carrying the request's id if the line had one.
pub fn decode_request(line: &[u8]) -> Result<Request, ErrorResponse> {
    let value: Value = serde_json::from_slice(line).map_err(|e| ErrorResponse {
        id: None,
        error: format!("request is not JSON: {e}"),
    })?;
    let id = value.get("id").and_then(Value::as_u64);
    let request: Request = serde_json::from_value(value).map_err(|e| ErrorResponse {
        id,
        error: format!("malformed request: {e}"),
    })?;
    if request.argv.is_empty() {
        return Err(ErrorResponse {
            id,
            error: "malformed request: argv is empty".into(),
        });
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn ready_event_has_the_agreed_shape() {
        let line = text(encode(&Event::Ready {
            boot_id: "b1".into(),
        }));
        assert_eq!(line, "{\"event\":\"ready\",\"boot_id\":\"b1\"}\n");
    }

    #[test]
    fn request_defaults_timeout_and_stdin() {
        let r = decode_request(br#"{"id":3,"argv":["true"]}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: 3,
                argv: vec!["true".into()],
                timeout_ms: 60_000,
                stdin: None
            }
        );
    }

    #[test]
    fn request_round_trips() {
        let r = Request {
            id: 9,
            argv: vec!["sh".into(), "-c".into(), "cat".into()],
            timeout_ms: 5,
            stdin: Some("x\n".into()),
        };
        let line = encode(&r);
        assert!(line.ends_with(b"\n"));
        assert_eq!(decode_request(&line[..line.len() - 1]).unwrap(), r);
    }

    #[test]
    fn malformed_requests_are_rejected_with_the_id_when_readable() {
        let cases: &[(&[u8], Option<u64>, &str)] = &[
            (b"not json", None, "not JSON"),
            (b"[1,2]", None, "malformed request"),
            (br#"{"argv":["true"]}"#, None, "missing field `id`"),
            (br#"{"id":4}"#, Some(4), "missing field `argv`"),
            (br#"{"id":5,"argv":[]}"#, Some(5), "argv is empty"),
            (br#"{"id":6,"argv":"ls"}"#, Some(6), "malformed request"),
        ];
        for (line, id, needle) in cases {
            let err = decode_request(line).unwrap_err();
            assert_eq!(err.id, *id, "{}", String::from_utf8_lossy(line));
            assert!(
                err.error.contains(needle),
                "{:?} lacks {needle:?}",
                err.error
            );
        }
    }

    #[test]
    fn error_reply_without_id_encodes_null() {
        let line = text(encode_reply(&Reply::error(None, "bad")));
        assert_eq!(line, "{\"id\":null,\"error\":\"bad\"}\n");
    }

    #[test]
    fn messages_decode_by_their_keys() {
        assert_eq!(
            decode_message(br#"{"event":"ready","boot_id":"x"}"#).unwrap(),
            Message::Event(Event::Ready {
                boot_id: "x".into()
            })
        );
        assert_eq!(
            decode_message(br#"{"id":null,"error":"e"}"#).unwrap(),
            Message::Error(ErrorResponse {
                id: None,
                error: "e".into()
            })
        );
        let response = Response {
            id: 1,
            exit_code: None,
            signal: Some(9),
            timed_out: true,
            stdout: "o".into(),
            stderr: String::new(),
            duration_ms: 200,
            truncated: false,
        };
        let line = encode(&response);
        assert_eq!(
            decode_message(&line[..line.len() - 1]).unwrap(),
            Message::Response(response)
        );
    }

    #[test]
    fn unknown_events_and_garbage_do_not_decode() {
        assert!(decode_message(br#"{"event":"bye"}"#).is_err());
        assert!(decode_message(br#"{"id":1,"std"#).is_err());
    }
}
