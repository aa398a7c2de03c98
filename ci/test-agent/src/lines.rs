//! Reading newline-delimited messages from a unix socket with a deadline.
//!
//! `BufRead::read_line` loses its place when a read times out; this keeps
//! partial lines buffered across timeouts, so a caller can give up waiting
//! and later continue exactly where it stopped. The host-side agent client
//! and xtask's QMP client both read through it.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Buffered line reader over a socket; see the module documentation.
#[derive(Debug)]
pub struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already checked for a newline.
    scanned: usize,
    eof: bool,
}

impl LineReader {
    pub fn new(stream: UnixStream) -> Self {
        LineReader {
            stream,
            buf: Vec::new(),
            scanned: 0,
            eof: false,
        }
    }

    /// The next line without its `\n` (and without a trailing `\r`).
    ///
    /// `Ok(None)` at end of stream (a last line without newline is dropped:
    /// it was cut short). Fails with `ErrorKind::TimedOut` once `deadline`
    /// passes; buffered data is kept for the next call.
    pub fn read_line(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.eof {
                return Ok(None);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "deadline passed while reading a line",
                ));
            }
            self.stream.set_read_timeout(Some(remaining))?;
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "deadline passed while reading a line",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(100)
    }

    #[test]
    fn splits_lines_and_strips_cr() {
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(b"one\r\ntwo\n\nthree").unwrap();
        drop(w);
        let mut reader = LineReader::new(r);
        assert_eq!(reader.read_line(soon()).unwrap().unwrap(), b"one");
        assert_eq!(reader.read_line(soon()).unwrap().unwrap(), b"two");
        assert_eq!(reader.read_line(soon()).unwrap().unwrap(), b"");
        assert_eq!(
            reader.read_line(soon()).unwrap(),
            None,
            "unterminated last line is dropped"
        );
    }

    #[test]
    fn timeout_keeps_the_partial_line() {
        let (mut w, r) = UnixStream::pair().unwrap();
        let mut reader = LineReader::new(r);
        w.write_all(b"{\"par").unwrap();
        let err = reader.read_line(soon()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        w.write_all(b"tial\":1}\n").unwrap();
        assert_eq!(
            reader.read_line(soon()).unwrap().unwrap(),
            b"{\"partial\":1}"
        );
    }

    #[test]
    fn past_deadline_still_returns_buffered_lines() {
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(b"a\nb\n").unwrap();
        let mut reader = LineReader::new(r);
        assert_eq!(reader.read_line(soon()).unwrap().unwrap(), b"a");
        assert_eq!(reader.read_line(Instant::now()).unwrap().unwrap(), b"b");
    }
}
