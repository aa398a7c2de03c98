//! Runs one sanitising job in a fresh `airlock-sanitiser` process: a new
//! process per transfer, so nothing a hostile input leaves behind in one
//! sanitiser can touch the next transfer. Empty environment, `/` as working
//! directory, only stdin/stdout/stderr open; killed on a wall-clock
//! timeout. Its answer is checked again here (type, size, and for text the
//! output rules) so a subverted sanitiser can pass on no more than a
//! well-formed item.

use crate::ipc::{self, Reply};
use crate::sanitise::{is_clean_text, looks_like_png, Clean, Limits};
use airlock_vdagent::ClipboardType;
use rustix::process::{kill_process, Pid, Signal};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to start the sanitiser.
#[derive(Debug, Clone)]
pub struct Runner {
    pub program: PathBuf,
    pub limits: Limits,
    pub timeout: Duration,
}

/// What a run produced, with the figures the gateway logs.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Clean, String>,
    pub elapsed: Duration,
    /// Peak resident set of the sanitiser, KiB (its `VmHWM`).
    pub peak_rss_kib: Option<u64>,
}

impl Runner {
    fn command(&self) -> Command {
        let l = &self.limits;
        let mut cmd = Command::new(&self.program);
        cmd.env_clear()
            .current_dir("/")
            .arg("--max-text-bytes")
            .arg(l.max_text_bytes.to_string())
            .arg("--max-image-bytes")
            .arg(l.max_image_bytes.to_string())
            .arg("--max-dimension")
            .arg(l.max_dimension.to_string())
            .arg("--max-pixels")
            .arg(l.max_pixels.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Sanitises `data` of type `ty` in a new sanitiser process.
    pub fn run(&self, ty: ClipboardType, data: Vec<u8>) -> Outcome {
        let start = Instant::now();
        let (result, peak_rss_kib) = match self.run_inner(ty, data) {
            Ok((r, rss)) => (r, rss),
            Err(e) => (Err(e), None),
        };
        Outcome {
            result,
            elapsed: start.elapsed(),
            peak_rss_kib,
        }
    }

    fn run_inner(
        &self,
        ty: ClipboardType,
        data: Vec<u8>,
    ) -> Result<(Result<Clean, String>, Option<u64>), String> {
        let mut child = self
            .command()
            .spawn()
            .map_err(|e| format!("starting sanitiser {}: {e}", self.program.display()))?;
        let pid = child.id();
        // Watchdog: kills the child at the deadline unless it has been
        // reaped (the lock orders the kill before the reap, so the pid
        // cannot have been reused).
        let reaped = Arc::new(Mutex::new(false));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let timeout = self.timeout;
        let watchdog = {
            let reaped = Arc::clone(&reaped);
            std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                    let reaped = reaped.lock().unwrap_or_else(|p| p.into_inner());
                    if !*reaped {
                        if let Some(pid) = Pid::from_raw(pid as i32) {
                            let _ = kill_process(pid, Signal::KILL);
                        }
                        return true;
                    }
                }
                false
            })
        };
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let input = data;
        // The writer hands stdin back: the sanitiser waits for its EOF
        // after replying, which gives us a moment to read its peak RSS.
        let writer =
            std::thread::spawn(move || ipc::write_request(&mut stdin, ty, &input).map(|()| stdin));
        let max_out = self
            .limits
            .max_text_bytes
            .max(self.limits.max_image_bytes.saturating_mul(4));
        let reply = ipc::read_reply(&mut stdout, max_out);
        let peak_rss_kib = if reply.is_ok() { vm_hwm_kib(pid) } else { None };
        drop(stdout);
        drop(writer.join());
        let status = {
            let mut reaped = reaped.lock().unwrap_or_else(|p| p.into_inner());
            *reaped = true;
            let _ = done_tx.send(());
            child.wait()
        };
        let timed_out = watchdog.join().unwrap_or(false);
        let status = status.map_err(|e| format!("waiting for sanitiser: {e}"))?;
        if timed_out {
            return Err(format!(
                "sanitiser killed after {} ms",
                self.timeout.as_millis()
            ));
        }
        let reply = match reply {
            Ok(r) => r,
            Err(e) => return Err(format!("sanitiser failed ({status}): {e}")),
        };
        if !status.success() {
            return Err(format!("sanitiser {status}"));
        }
        Ok((check_reply(reply, &self.limits), peak_rss_kib))
    }
}

/// The gateway's own check of a sanitiser answer.
fn check_reply(reply: Reply, limits: &Limits) -> Result<Clean, String> {
    match reply {
        Reply::Rejected(why) => Err(why),
        Reply::Clean(c) => match c.ty {
            ClipboardType::Utf8Text if is_clean_text(&c.data, limits.max_text_bytes) => Ok(c),
            ClipboardType::Png if looks_like_png(&c.data) => Ok(c),
            other => Err(format!(
                "sanitiser returned an output that fails the gateway's check (type {})",
                other.name()
            )),
        },
    }
}

/// `VmHWM` of a live process, KiB: the peak resident set of its current
/// image (unlike `getrusage`, not inflated by the parent's memory it was
/// spawned from).
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
