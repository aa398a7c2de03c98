//! Client of the supervisor's control socket (`/run/airlock/control.sock`,
//! protocol in `appliance-daemon/airlockd/src/control.rs`): JSON lines,
//! server to client only; the current status at once, then one line per
//! change. The agent needs two facts: `ready` (both guests run) and
//! `both_off` (both guests powered themselves off, the host powers off
//! next).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The fields of a status line the agent reads (others are ignored: the
/// supervisor may add some).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub event: String,
    pub phase: String,
    pub ready: bool,
    pub both_off: bool,
}

pub fn parse_status(line: &str) -> Result<Status> {
    serde_json::from_str(line)
        .with_context(|| format!("control socket line is not a status: {line:?}"))
}

/// Whether a supervisor is there to ask.
#[derive(Debug)]
pub enum Connection {
    /// No socket, or nobody listening: no supervisor runs, so no guest runs.
    NoSupervisor,
    Connected(UnixStream),
}

pub fn connect(path: &Path) -> Result<Connection> {
    match UnixStream::connect(path) {
        Ok(s) => Ok(Connection::Connected(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(Connection::NoSupervisor)
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "connecting to the supervisor's control socket {}",
                path.display()
            )
        }),
    }
}

/// Reads status lines until `want` holds for one, or `timeout` passes
/// (`None`: no limit). Returns the matching status.
pub fn wait_for(
    stream: UnixStream,
    timeout: Option<Duration>,
    want: &dyn Fn(&Status) -> bool,
) -> Result<Status> {
    let start = Instant::now();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut last = None;
    loop {
        if let Some(t) = timeout {
            let left = t.checked_sub(start.elapsed()).filter(|d| !d.is_zero());
            match left {
                Some(d) => reader
                    .get_ref()
                    .set_read_timeout(Some(d))
                    .context("setting the control socket's timeout")?,
                None => bail!(
                    "timed out after {t:?} (last status: {})",
                    describe(last.as_ref())
                ),
            }
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => bail!(
                "the supervisor closed the control socket (last status: {})",
                describe(last.as_ref())
            ),
            Ok(_) => {
                let s = parse_status(line.trim_end())?;
                if want(&s) {
                    return Ok(s);
                }
                last = Some(s);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e).context("reading the control socket"),
        }
    }
}

fn describe(s: Option<&Status>) -> String {
    match s {
        Some(s) => format!(
            "phase {}, ready {}, both_off {}",
            s.phase, s.ready, s.both_off
        ),
        None => "none received".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn supervisor_status_lines_are_read() {
        let line = r#"{"event":"status","phase":"running","ready":true,"both_off":false,"guests":{"classified":{"state":"running","pid":812,"restarts":0}},"gateway":{"state":"running","pid":830,"restarts":0}}"#;
        let s = parse_status(line).unwrap();
        assert!(s.ready && !s.both_off && s.phase == "running");
        assert!(parse_status("{}").is_err());
    }

    #[test]
    fn waits_until_the_condition_then_times_out_otherwise() {
        let (a, mut b) = UnixStream::pair().unwrap();
        writeln!(
            b,
            r#"{{"event":"status","phase":"running","ready":true,"both_off":false}}"#
        )
        .unwrap();
        writeln!(
            b,
            r#"{{"event":"status","phase":"powering-off","ready":false,"both_off":true}}"#
        )
        .unwrap();
        let s = wait_for(a, Some(Duration::from_secs(5)), &|s| s.both_off).unwrap();
        assert_eq!(s.phase, "powering-off");

        let (a, mut b) = UnixStream::pair().unwrap();
        writeln!(
            b,
            r#"{{"event":"status","phase":"running","ready":false,"both_off":false}}"#
        )
        .unwrap();
        let e = wait_for(a, Some(Duration::from_millis(200)), &|s| s.ready).unwrap_err();
        assert!(
            e.to_string().contains("timed out") && e.to_string().contains("ready false"),
            "{e}"
        );
        drop(b);
    }

    #[test]
    fn a_missing_socket_means_no_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            connect(&dir.path().join("control.sock")).unwrap(),
            Connection::NoSupervisor
        ));
    }
}
