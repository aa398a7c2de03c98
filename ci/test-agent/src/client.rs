//! The host side: [`AgentClient`] talks to the agent through the unix socket
//! QEMU bridges to the guest's virtio-serial port.
//!
//! The connection outlives guest reboots (QEMU keeps the chardev), so one
//! client sees every boot: each boot's agent announces itself with a `ready`
//! event carrying a new boot id. Every `ready` is handed out exactly once by
//! [`AgentClient::wait_ready`], in order, even if [`AgentClient::run`] read it
//! first. Lines that do not decode (a reply cut short by a reboot) and replies
//! to requests nobody waits for any more are skipped.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::lines::LineReader;
use crate::wire::{self, Event, Message, Request, Response};

/// Extra time, beyond the command's own timeout, to wait for its reply: the
/// agent kills the command, collects up to 8 MiB of output and sends it
/// through an emulated serial port.
pub const REPLY_GRACE: Duration = Duration::from_secs(15);

/// Pause between attempts to connect to a socket QEMU has not created yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// How often [`AgentClient::wait_ready`] pings an agent that keeps
/// reopening its port before giving up.
const SETTLE_ATTEMPTS: u32 = 5;

/// How talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the test agent socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("the test agent socket closed (QEMU exited?)")]
    Disconnected,
    #[error("talking to the test agent")]
    Io(#[from] io::Error),
    #[error("the test agent could not run request {id}: {message}")]
    Rejected { id: u64, message: String },
    #[error("the test agent restarted (new boot id {boot_id}) before answering request {id}")]
    AgentRestarted { id: u64, boot_id: String },
    #[error("the test agent reopened its port (same boot) before answering request {id}; the request was lost")]
    AgentReopened { id: u64 },
}

/// How a command run by the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The command as requested.
    pub argv: Vec<String>,
    /// `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    /// stdout or stderr was cut at 4 MiB.
    pub truncated: bool,
}

/// A command that did not exit 0, as returned by [`CommandOutput::check`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: `{command}` {status}{tail}")]
pub struct CommandFailed {
    pub what: String,
    pub command: String,
    pub status: String,
    /// The last lines of stderr (stdout if stderr is empty), preformatted.
    tail: String,
}

/// Lines of output quoted in a [`CommandFailed`].
const TAIL_LINES: usize = 20;

impl CommandOutput {
    fn new(argv: &[&str], r: Response) -> Self {
        CommandOutput {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            stdout: r.stdout,
            stderr: r.stderr,
            duration_ms: r.duration_ms,
            truncated: r.truncated,
        }
    }

    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// `self` if it succeeded, otherwise an error naming `what` was being
    /// done, the command, how it ended and the tail of its stderr.
    pub fn check(self, what: &str) -> Result<Self, CommandFailed> {
        if self.success() {
            return Ok(self);
        }
        let status = if self.timed_out {
            format!("timed out after {} ms", self.duration_ms)
        } else if let Some(code) = self.exit_code {
            format!("exited with status {code}")
        } else {
            format!("was killed by signal {}", self.signal.unwrap_or(0))
        };
        let (name, text) = if self.stderr.trim().is_empty() {
            ("stdout", &self.stdout)
        } else {
            ("stderr", &self.stderr)
        };
        let tail = tail_lines(text, TAIL_LINES);
        let tail = if tail.is_empty() {
            String::new()
        } else {
            format!("; {name}:\n{tail}")
        };
        Err(CommandFailed {
            what: what.to_owned(),
            command: shell_words(&self.argv),
            status,
            tail,
        })
    }
}

/// The last `n` lines of `text`, trimmed.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `argv` the way a person would type it, quoting words that need it.
fn shell_words(argv: &[String]) -> String {
    let quote = |w: &String| {
        if !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            w.clone()
        } else {
            format!("'{}'", w.replace('\'', r"'\''"))
        }
    };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Client for the in-guest agent; see the module documentation.
pub struct AgentClient {
    reader: LineReader,
    writer: UnixStream,
    next_id: u64,
    /// Boot ids of `ready` events not yet returned by `wait_ready`.
    readies: VecDeque<String>,
    /// Whether any `ready` was seen on this connection.
    seen_ready: bool,
    /// The boot id `wait_ready` last returned: a `ready` repeating it is the
    /// same agent reopening its port, not a new boot.
    current_boot: Option<String>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("next_id", &self.next_id)
            .field("readies", &self.readies)
            .finish()
    }
}

impl AgentClient {
    /// Connects to `socket`, retrying while QEMU has not created it yet or
    /// does not accept yet, for up to `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => return Self::from_stream(stream),
                Err(e) if Instant::now() >= deadline => {
                    return Err(ClientError::Connect {
                        socket: socket.to_owned(),
                        source: e,
                    })
                }
                Err(_) => thread::sleep(CONNECT_RETRY),
            }
        }
    }

    /// A client over an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self, ClientError> {
        let writer = stream.try_clone()?;
        Ok(AgentClient {
            reader: LineReader::new(stream),
            writer,
            next_id: 1,
            readies: VecDeque::new(),
            seen_ready: false,
            current_boot: None,
        })
    }

    /// Waits for the next `ready` event not yet returned and gives its boot
    /// id, once that agent has answered a request. Call it once after
    /// connecting, and once after each guest reboot.
    ///
    /// Early in a boot the guest's virtio port can report the host as gone
    /// for a moment after the agent announced itself; the agent then reopens
    /// the port and announces the same boot again, dropping whatever request
    /// was in flight. The ping absorbs that here, so the caller's first real
    /// command is not the one lost.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<String, ClientError> {
        let deadline = Instant::now() + timeout;
        let boot_id = loop {
            if let Some(boot_id) = self.readies.pop_front() {
                break boot_id;
            }
            // Anything else is stale: replies to requests given up on.
            self.next_message(
                deadline,
                timeout,
                "the test agent to announce itself (ready)",
            )?;
        };
        self.current_boot = Some(boot_id.clone());
        self.readies.retain(|queued| queued != &boot_id);
        for _ in 0..SETTLE_ATTEMPTS {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            match self.run(&["true"], left) {
                Ok(_) => return Ok(boot_id),
                Err(ClientError::AgentReopened { .. }) => continue,
                // Another boot right after this one is an error the caller
                // must see (an unexpected reboot), not something to wait out.
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Timeout {
            what: format!("the test agent of boot {boot_id} to stop reopening its port ({SETTLE_ATTEMPTS} pings lost)"),
            after: timeout,
        })
    }

    /// Runs `argv` in the guest with `timeout`, and waits for the result.
    pub fn run(&mut self, argv: &[&str], timeout: Duration) -> Result<CommandOutput, ClientError> {
        self.run_with_stdin(argv, None, timeout)
    }

    /// [`run`](Self::run), feeding `stdin` to the command.
    pub fn run_with_stdin(
        &mut self,
        argv: &[&str],
        stdin: Option<&str>,
        timeout: Duration,
    ) -> Result<CommandOutput, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = Request {
            id,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
            stdin: stdin.map(str::to_owned),
        };
        self.writer
            .write_all(&wire::encode(&request))
            .map_err(disconnected)?;
        // A `ready` after one was already seen means the agent started over
        // and dropped our request; the first one merely precedes the reply.
        let restart_possible = self.seen_ready;
        let wait = timeout + REPLY_GRACE;
        let deadline = Instant::now() + wait;
        let what = format!(
            "the reply to `{}` (request {id})",
            shell_words(&request.argv)
        );
        loop {
            match self.next_message(deadline, wait, &what)? {
                Message::Response(r) if r.id == id => return Ok(CommandOutput::new(argv, r)),
                Message::Error(e) if e.id == Some(id) || e.id.is_none() => {
                    return Err(ClientError::Rejected {
                        id,
                        message: e.error,
                    })
                }
                Message::Event(Event::Ready { boot_id }) if restart_possible => {
                    if self.current_boot.as_ref() == Some(&boot_id) {
                        return Err(ClientError::AgentReopened { id });
                    }
                    return Err(ClientError::AgentRestarted { id, boot_id });
                }
                _ => {}
            }
        }
    }

    /// The next decodable message; `ready` events are also queued for
    /// [`wait_ready`](Self::wait_ready).
    fn next_message(
        &mut self,
        deadline: Instant,
        waited: Duration,
        what: &str,
    ) -> Result<Message, ClientError> {
        loop {
            let line = match self.reader.read_line(deadline) {
                Ok(Some(line)) => line,
                Ok(None) => return Err(ClientError::Disconnected),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(ClientError::Timeout {
                        what: what.to_owned(),
                        after: waited,
                    })
                }
                Err(e) => return Err(disconnected(e)),
            };
            let Ok(message) = wire::decode_message(&line) else {
                continue;
            };
            if let Message::Event(Event::Ready { boot_id }) = &message {
                // A repeat of the current boot is a reopened port: nothing
                // for a later `wait_ready` to hand out.
                if self.current_boot.as_ref() != Some(boot_id) {
                    self.readies.push_back(boot_id.clone());
                }
                self.seen_ready = true;
            }
            return Ok(message);
        }
    }
}

fn disconnected(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Disconnected,
        _ => ClientError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve;
    use std::io::BufReader;

    const SHORT: Duration = Duration::from_secs(10);

    /// A client wired to a real in-process agent (`serve`) over a socketpair.
    fn client_with_agent(boot_id: &'static str) -> AgentClient {
        let (host, guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let input = BufReader::new(guest.try_clone().unwrap());
            let _ = serve::serve(input, &guest, boot_id);
        });
        AgentClient::from_stream(host).unwrap()
    }

    /// A client wired to a scripted fake agent that writes `lines` verbatim.
    fn client_with_script(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> AgentClient {
        let (host, mut guest) = UnixStream::pair().unwrap();
        thread::spawn(move || script(&mut guest));
        AgentClient::from_stream(host).unwrap()
    }

    fn read_request(guest: &UnixStream) -> Request {
        let mut reader = LineReader::new(guest.try_clone().unwrap());
        let line = reader.read_line(Instant::now() + SHORT).unwrap().unwrap();
        wire::decode_request(&line).unwrap()
    }

    /// Answers the ping `wait_ready` sends once the agent announced itself.
    fn answer_ping(guest: &mut UnixStream) {
        let ping = read_request(guest);
        assert_eq!(ping.argv, ["true"]);
        guest.write_all(&reply_to(&ping, "")).unwrap();
    }

    fn reply_to(request: &Request, stdout: &str) -> Vec<u8> {
        wire::encode(&Response {
            id: request.id,
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout: stdout.into(),
            stderr: String::new(),
            duration_ms: 1,
            truncated: false,
        })
    }

    #[test]
    fn runs_commands_through_the_real_agent() {
        let mut client = client_with_agent("b-1");
        assert_eq!(client.wait_ready(SHORT).unwrap(), "b-1");
        let out = client.run(&["sh", "-c", "echo hi; exit 4"], SHORT).unwrap();
        assert_eq!(
            (out.exit_code, out.stdout.as_str(), out.success()),
            (Some(4), "hi\n", false)
        );
        let out = client.run_with_stdin(&["cat"], Some("fed"), SHORT).unwrap();
        assert_eq!(out.stdout, "fed");
    }

    #[test]
    fn timeout_comes_back_as_timed_out() {
        let mut client = client_with_agent("b-1");
        client.wait_ready(SHORT).unwrap();
        let started = Instant::now();
        let out = client
            .run(&["sleep", "5"], Duration::from_millis(200))
            .unwrap();
        assert!(out.timed_out && !out.success());
        assert_eq!(out.signal, Some(libc::SIGKILL));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn run_before_wait_ready_still_gets_its_reply_and_keeps_the_ready() {
        let mut client = client_with_agent("b-1");
        assert_eq!(client.run(&["true"], SHORT).unwrap().exit_code, Some(0));
        assert_eq!(client.wait_ready(SHORT).unwrap(), "b-1");
    }

    #[test]
    fn missing_program_is_rejected() {
        let mut client = client_with_agent("b-1");
        let err = client.run(&["/no/such/program"], SHORT).unwrap_err();
        assert!(
            matches!(err, ClientError::Rejected { id: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn reboot_mid_line_is_survived_and_gives_a_new_boot_id() {
        let mut client = client_with_script(|guest| {
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"A\"}\n")
                .unwrap();
            answer_ping(guest);
            let request = read_request(guest);
            guest.write_all(&reply_to(&request, "first")).unwrap();
            // The old boot dies while writing a stale line; the new agent's
            // leading newline ends it.
            guest.write_all(b"{\"id\":99,\"stdout\":\"cut").unwrap();
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"B\"}\n")
                .unwrap();
            answer_ping(guest);
            let request = read_request(guest);
            guest.write_all(&reply_to(&request, "second")).unwrap();
        });
        assert_eq!(client.wait_ready(SHORT).unwrap(), "A");
        assert_eq!(client.run(&["x"], SHORT).unwrap().stdout, "first");
        assert_eq!(client.wait_ready(SHORT).unwrap(), "B");
        assert_eq!(client.run(&["x"], SHORT).unwrap().stdout, "second");
    }

    #[test]
    fn agent_restart_while_waiting_is_reported_and_the_ready_kept() {
        let mut client = client_with_script(|guest| {
            guest
                .write_all(b"{\"event\":\"ready\",\"boot_id\":\"A\"}\n")
                .unwrap();
            answer_ping(guest);
            let _ignored = read_request(guest);
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"B\"}\n")
                .unwrap();
            answer_ping(guest);
        });
        client.wait_ready(SHORT).unwrap();
        let err = client.run(&["systemctl", "reboot"], SHORT).unwrap_err();
        assert!(
            matches!(&err, ClientError::AgentRestarted { boot_id, .. } if boot_id == "B"),
            "{err:?}"
        );
        assert_eq!(client.wait_ready(SHORT).unwrap(), "B");
    }

    #[test]
    fn port_reopened_early_in_a_boot_is_absorbed_by_wait_ready() {
        let mut client = client_with_script(|guest| {
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"A\"}\n")
                .unwrap();
            // The port flaps: the ping is dropped and the same boot announced again.
            let _lost = read_request(guest);
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"A\"}\n")
                .unwrap();
            answer_ping(guest);
            let request = read_request(guest);
            guest.write_all(&reply_to(&request, "after")).unwrap();
            // Later in the boot it flaps again while a command runs.
            let _lost = read_request(guest);
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"A\"}\n")
                .unwrap();
            guest
                .write_all(b"\n{\"event\":\"ready\",\"boot_id\":\"B\"}\n")
                .unwrap();
            answer_ping(guest);
        });
        assert_eq!(client.wait_ready(SHORT).unwrap(), "A");
        assert_eq!(client.run(&["x"], SHORT).unwrap().stdout, "after");
        let err = client.run(&["y"], SHORT).unwrap_err();
        assert!(matches!(err, ClientError::AgentReopened { .. }), "{err:?}");
        // The repeated A is not handed out as a boot of its own.
        assert_eq!(client.wait_ready(SHORT).unwrap(), "B");
    }

    #[test]
    fn stale_replies_are_skipped() {
        let mut client = client_with_script(|guest| {
            guest
                .write_all(b"{\"event\":\"ready\",\"boot_id\":\"A\"}\n")
                .unwrap();
            answer_ping(guest);
            let request = read_request(guest);
            let stale = Request {
                id: request.id + 100,
                ..request.clone()
            };
            guest.write_all(&reply_to(&stale, "stale")).unwrap();
            guest.write_all(&reply_to(&request, "mine")).unwrap();
        });
        client.wait_ready(SHORT).unwrap();
        assert_eq!(client.run(&["x"], SHORT).unwrap().stdout, "mine");
    }

    #[test]
    fn silence_is_a_timeout_and_closing_is_a_disconnect() {
        let mut client = client_with_script(|guest| {
            thread::sleep(Duration::from_millis(500));
            let _ = guest.shutdown(std::net::Shutdown::Both);
        });
        let err = client.wait_ready(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        let err = client.wait_ready(SHORT).unwrap_err();
        assert!(matches!(err, ClientError::Disconnected), "{err:?}");
    }

    #[test]
    fn connect_gives_up_after_the_timeout() {
        let dir = std::env::temp_dir().join(format!("agent-test-{}", std::process::id()));
        let err = AgentClient::connect(&dir.join("missing.sock"), Duration::from_millis(200))
            .unwrap_err();
        assert!(err.to_string().contains("missing.sock"), "{err}");
    }

    fn output(
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        stderr: &str,
    ) -> CommandOutput {
        CommandOutput {
            argv: vec!["systemctl".into(), "is-active".into(), "foo bar".into()],
            exit_code,
            signal,
            timed_out,
            stdout: "out\n".into(),
            stderr: stderr.into(),
            duration_ms: 1500,
            truncated: false,
        }
    }

    #[test]
    fn check_passes_success_through() {
        assert!(output(Some(0), None, false, "").check("x").is_ok());
    }

    #[test]
    fn check_explains_failures() {
        let long_stderr: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let cases = [
            (output(Some(3), None, false, &long_stderr), "checking foo: `systemctl is-active 'foo bar'` exited with status 3; stderr:\nline 11\n"),
            (output(None, Some(9), true, ""), "checking foo: `systemctl is-active 'foo bar'` timed out after 1500 ms; stdout:\nout"),
            (output(None, Some(15), false, "bye"), "was killed by signal 15; stderr:\nbye"),
        ];
        for (out, expected) in cases {
            let message = out.check("checking foo").unwrap_err().to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            assert!(!message.contains("line 10\n"), "only the tail: {message}");
        }
    }

    #[test]
    fn shell_words_quotes_only_when_needed() {
        let argv: Vec<String> = ["ls", "-l", "/a b", "it's", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(shell_words(&argv), r"ls -l '/a b' 'it'\''s' ''");
    }
}
