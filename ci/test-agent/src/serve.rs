//! The guest side: announce `ready`, then answer requests one at a time until
//! the host goes away ([`serve`]); and the loop around it that (re)opens the
//! virtio-serial port for as long as the guest runs ([`run_forever`]).
//!
//! How the port behaves (Linux `virtio_console`): while no host is connected
//! to the QEMU socket, `read` returns 0 at once and `write` blocks until one
//! connects. So the agent's first write, `ready`, is what waits for the host,
//! and a host that disconnects shows up as end of file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::exec;
use crate::wire::{self, Event, Reply};

/// Where udev links the port QEMU names `org.airlock.test.0`.
pub const DEFAULT_DEVICE: &str = "/dev/virtio-ports/org.airlock.test.0";

/// Pause before reopening the port after the host left or an error.
const REOPEN_DELAY: Duration = Duration::from_millis(500);

/// Announces readiness on `output`, then runs each request line from `input`
/// and writes its reply, until end of input (host disconnected).
pub fn serve(input: impl BufRead, output: impl Write, boot_id: &str) -> io::Result<()> {
    serve_port(input, output, boot_id, || false)
}

/// [`serve`], asking `host_left` before each reply whether the host went
/// away while the command ran. If so the reply is dropped and this returns:
/// writing it would block until some host connects and then hand that host
/// a stale reply instead of the `ready` it waits for.
fn serve_port(
    mut input: impl BufRead,
    mut output: impl Write,
    boot_id: &str,
    host_left: impl Fn() -> bool,
) -> io::Result<()> {
    // The leading newline ends any line a previous boot's agent left half written.
    let mut ready = b"\n".to_vec();
    ready.extend(wire::encode(&Event::Ready {
        boot_id: boot_id.to_owned(),
    }));
    output.write_all(&ready)?;
    output.flush()?;
    let mut line = Vec::new();
    loop {
        line.clear();
        input.read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            // End of input; a line without newline was cut off, never run it.
            return Ok(());
        }
        let request = line.trim_ascii();
        if request.is_empty() {
            continue;
        }
        let reply = wire::encode_reply(&handle_line(request));
        if host_left() {
            return Ok(());
        }
        output.write_all(&reply)?;
        output.flush()?;
    }
}

/// The reply to one request line.
pub fn handle_line(line: &[u8]) -> Reply {
    match wire::decode_request(line) {
        Ok(request) => exec::run(&request),
        Err(error) => Reply::Error(error),
    }
}

/// This boot's id, from `/proc/sys/kernel/random/boot_id`.
pub fn read_boot_id() -> io::Result<String> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    let text = std::fs::read_to_string(PATH)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {PATH}: {e}")))?;
    Ok(text.trim().to_owned())
}

/// Serves the port at `device` forever, reopening it whenever the host
/// disconnects or an error occurs. Logs to stderr (the journal).
pub fn run_forever(device: &Path) -> io::Result<()> {
    let boot_id = read_boot_id()?;
    let mut last_error = String::new();
    loop {
        let outcome = open_port(device).and_then(|port| {
            let input = BufReader::new(port.try_clone()?);
            serve_port(input, &port, &boot_id, || hung_up(port.as_fd()))
        });
        let message = match outcome {
            Ok(()) => "host disconnected".to_owned(),
            Err(e) => format!("serving {}: {e}", device.display()),
        };
        // The same failure every half second (no device yet) is logged once.
        if message != last_error {
            eprintln!("airlock-test-agent: {message}; reopening");
            last_error = message;
        }
        thread::sleep(REOPEN_DELAY);
    }
}

fn open_port(device: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(device)
}

/// Whether `fd` reports POLLHUP right now: for a virtio port, no host is
/// connected; for a socket, the peer closed it.
#[allow(unsafe_code)]
fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, initialised pollfd that outlives the call,
    // and `fd` is open for its duration (borrowed). Timeout 0: no blocking.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & libc::POLLHUP != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_message, Message, Response};
    use std::io::Cursor;

    fn serve_lines(input: &str) -> Vec<Message> {
        let mut output = Vec::new();
        serve(
            Cursor::new(input.as_bytes().to_vec()),
            &mut output,
            "boot-1",
        )
        .unwrap();
        output
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| decode_message(l).unwrap())
            .collect()
    }

    fn response(message: &Message) -> &Response {
        match message {
            Message::Response(r) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn announces_ready_with_the_boot_id_first() {
        let mut output = Vec::new();
        serve(Cursor::new(Vec::new()), &mut output, "abc").unwrap();
        assert_eq!(output, b"\n{\"event\":\"ready\",\"boot_id\":\"abc\"}\n");
    }

    #[test]
    fn answers_requests_in_order_and_keeps_going_after_garbage() {
        let messages = serve_lines(concat!(
            "{\"id\":1,\"argv\":[\"echo\",\"one\"]}\n",
            "\n",
            "this is not json\n",
            "{\"id\":2,\"argv\":[\"echo\",\"two\"]}\n",
        ));
        assert_eq!(
            messages[0],
            Message::Event(Event::Ready {
                boot_id: "boot-1".into()
            })
        );
        assert_eq!(response(&messages[1]).stdout, "one\n");
        assert!(matches!(&messages[2], Message::Error(e) if e.id.is_none()));
        assert_eq!(response(&messages[3]).id, 2);
        assert_eq!(messages.len(), 4);
    }

    #[test]
    fn hang_up_is_seen_on_a_closed_peer_only() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!hung_up(a.as_fd()));
        drop(b);
        assert!(hung_up(a.as_fd()));
    }

    #[test]
    fn reply_is_dropped_when_the_host_left_during_the_command() {
        let mut output = Vec::new();
        let input = Cursor::new(
            b"{\"id\":1,\"argv\":[\"true\"]}\n{\"id\":2,\"argv\":[\"true\"]}\n".to_vec(),
        );
        serve_port(input, &mut output, "b", || true).unwrap();
        assert_eq!(
            output, b"\n{\"event\":\"ready\",\"boot_id\":\"b\"}\n",
            "no reply, and request 2 never ran"
        );
    }

    #[test]
    fn a_request_cut_off_by_disconnect_is_not_run() {
        let messages = serve_lines("{\"id\":1,\"argv\":[\"echo\",\"one\"]}");
        assert_eq!(messages.len(), 1, "only ready: {messages:?}");
    }
}
