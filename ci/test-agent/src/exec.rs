//! Running one requested command in the guest: its own process group, stdin
//! fed from the request, stdout and stderr captured up to a cap, and at the
//! deadline the whole process group killed.
//!
//! Output is read by one thread per pipe while this thread polls the child,
//! so a command that fills a pipe never deadlocks against us. A command that
//! exits but leaves a background process holding its pipes open is waited
//! for until the deadline; then its process group is killed too.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::wire::{Reply, Request, Response, OUTPUT_CAP};

/// How long to wait for pipes to close after the process group was killed.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// Longest sleep between two checks of whether the child exited.
const MAX_POLL: Duration = Duration::from_millis(20);

/// Runs `request` and returns the reply to send.
pub fn run(request: &Request) -> Reply {
    run_capped(request, OUTPUT_CAP)
}

/// [`run`] with an explicit output cap (tests use a small one).
pub(crate) fn run_capped(request: &Request, cap: usize) -> Reply {
    match execute(request, cap) {
        Ok(response) => Reply::Response(response),
        Err(error) => Reply::error(Some(request.id), error),
    }
}

/// Bytes read from one pipe, at most `cap` of them kept.
#[derive(Default)]
struct Capture {
    bytes: Vec<u8>,
    truncated: bool,
}

type Shared = Arc<Mutex<Capture>>;

fn execute(request: &Request, cap: usize) -> Result<Response, String> {
    let (program, args) = request.argv.split_first().ok_or("argv is empty")?;
    let mut command = Command::new(program);
    command
        .args(args)
        .process_group(0)
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let deadline = started + Duration::from_millis(request.timeout_ms);
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))?;

    if let (Some(mut pipe), Some(input)) = (child.stdin.take(), request.stdin.clone()) {
        // Ignoring errors: a command that does not read its stdin closes the
        // pipe (EPIPE), which is its business, not a failure of the agent.
        thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = spawn_reader(child.stdout.take(), cap, done_tx.clone());
    let stderr = spawn_reader(child.stderr.take(), cap, done_tx);

    let pgid = child.id() as i32;
    let (status, timed_out) = match wait_until(&mut child, deadline) {
        Some(status) => (status, false),
        None => {
            kill_group(pgid);
            let status = child
                .wait()
                .map_err(|e| format!("waiting for {program:?}: {e}"))?;
            (status, true)
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;

    // Both readers finish once every holder of the pipes is gone.
    let mut open_pipes = 2;
    let mut wait_pipes = |until: Instant| {
        while open_pipes > 0
            && done_rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
                .is_ok()
        {
            open_pipes -= 1;
        }
        open_pipes == 0
    };
    if !wait_pipes(deadline.max(Instant::now())) {
        // Something the command started still holds its output open.
        kill_group(pgid);
        wait_pipes(Instant::now() + PIPE_GRACE);
    }

    let take =
        |shared: &Shared| std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()));
    let (out, err) = (take(&stdout), take(&stderr));
    Ok(Response {
        id: request.id,
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout: String::from_utf8_lossy(&out.bytes).into_owned(),
        stderr: String::from_utf8_lossy(&err.bytes).into_owned(),
        duration_ms,
        truncated: out.truncated || err.truncated,
    })
}

/// Polls the child until it exits (its status) or the deadline passes (`None`).
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // try_wait only fails if the child was already reaped, which we
            // never do elsewhere; treat it as the deadline.
            Err(_) => return None,
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Reads `pipe` to its end in a thread, keeping the first `cap` bytes.
fn spawn_reader(
    pipe: Option<impl Read + Send + 'static>,
    cap: usize,
    done: mpsc::Sender<()>,
) -> Shared {
    let shared = Shared::default();
    let capture = Arc::clone(&shared);
    thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 64 * 1024];
            loop {
                let n = match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
                let room = cap.saturating_sub(c.bytes.len());
                c.bytes.extend_from_slice(&chunk[..n.min(room)]);
                c.truncated |= n > room;
            }
        }
        let _ = done.send(());
    });
    shared
}

/// Sends SIGKILL to process group `pgid`; a group already gone is fine.
#[allow(unsafe_code)]
fn kill_group(pgid: i32) {
    // SAFETY: killpg has no memory-safety preconditions. As for which group
    // it hits: `pgid` is the pid of our child, either not reaped yet or
    // reaped while other members keep the group (and so the id) alive, so it
    // names the group we created with process_group(0), not a recycled one.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(argv: &[&str], timeout_ms: u64) -> Request {
        Request {
            id: 7,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            stdin: None,
        }
    }

    fn response(reply: Reply) -> Response {
        match reply {
            Reply::Response(r) => r,
            Reply::Error(e) => panic!("unexpected error reply: {e:?}"),
        }
    }

    #[test]
    fn captures_exit_code_and_both_streams() {
        let r = response(run(&request(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            10_000,
        )));
        assert_eq!(
            (r.id, r.exit_code, r.signal, r.timed_out),
            (7, Some(3), None, false)
        );
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
        assert!(!r.truncated);
    }

    #[test]
    fn runs_argv_without_a_shell() {
        let r = response(run(&request(&["echo", "$HOME", "a;b"], 10_000)));
        assert_eq!(r.stdout, "$HOME a;b\n");
    }

    #[test]
    fn feeds_stdin_then_closes_it() {
        let mut req = request(&["cat"], 10_000);
        req.stdin = Some("hello\nworld".into());
        assert_eq!(response(run(&req)).stdout, "hello\nworld");
    }

    #[test]
    fn stdin_is_empty_when_not_given() {
        assert_eq!(
            response(run(&request(&["wc", "-c"], 10_000))).stdout.trim(),
            "0"
        );
    }

    #[test]
    fn timeout_kills_the_command() {
        let r = response(run(&request(&["sleep", "5"], 200)));
        assert!(r.timed_out);
        assert_eq!((r.exit_code, r.signal), (None, Some(libc::SIGKILL)));
        assert!(
            (200..2_000).contains(&r.duration_ms),
            "took {} ms",
            r.duration_ms
        );
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        // Without killpg the background sleep would keep stdout open for 5 s.
        let started = Instant::now();
        let r = response(run(&request(&["sh", "-c", "sleep 5 & sleep 5"], 200)));
        assert!(r.timed_out);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn background_process_holding_the_pipe_is_killed_at_the_deadline() {
        let started = Instant::now();
        let r = response(run(&request(&["sh", "-c", "echo hi; sleep 5 &"], 300)));
        assert_eq!(
            (r.exit_code, r.timed_out, r.stdout.as_str()),
            (Some(0), false, "hi\n")
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn exit_by_signal_reports_the_signal() {
        let r = response(run(&request(&["sh", "-c", "kill -TERM $$"], 10_000)));
        assert_eq!(
            (r.exit_code, r.signal, r.timed_out),
            (None, Some(libc::SIGTERM), false)
        );
    }

    #[test]
    fn output_is_capped_and_flagged() {
        let r = response(run_capped(
            &request(
                &["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"],
                10_000,
            ),
            1000,
        ));
        assert_eq!(r.stdout.len(), 1000);
        assert!(r.truncated);
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let r = response(run(&request(&["printf", "a\\377b"], 10_000)));
        assert_eq!(r.stdout, "a\u{fffd}b");
    }

    #[test]
    fn missing_program_is_an_error_reply_with_the_id() {
        match run(&request(&["/nonexistent/prog"], 1_000)) {
            Reply::Error(e) => {
                assert_eq!(e.id, Some(7));
                assert!(e.error.contains("/nonexistent/prog"), "{}", e.error);
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
