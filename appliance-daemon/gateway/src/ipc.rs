//! The pipe protocol between the gateway and its sanitiser process.
//!
//! Request (gateway → sanitiser, on the sanitiser's stdin):
//! `"ALS1" | u32 type | u32 len | data`. Reply (on its stdout):
//! `"ALR1" | u8 status | u32 type | u32 len | bytes`, status 0 with the
//! sanitised data, status 1 with a UTF-8 rejection reason. All integers
//! little-endian. Each side checks a length against its limit before it
//! allocates for it: neither trusts the other.

use crate::sanitise::{Clean, Rejection};
use airlock_vdagent::ClipboardType;
use std::io::{self, Read, Write};

const REQUEST_MAGIC: &[u8; 4] = b"ALS1";
const REPLY_MAGIC: &[u8; 4] = b"ALR1";
/// Longest rejection reason a reply may carry.
pub const MAX_REASON: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("length {got} exceeds the limit of {max}")]
    TooLong { got: u32, max: usize },
    #[error("bad status byte {0}")]
    BadStatus(u8),
    #[error("rejection reason is not UTF-8")]
    BadReason,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A sanitiser's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Clean(Clean),
    Rejected(String),
}

pub fn write_request(w: &mut impl Write, ty: ClipboardType, data: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(data.len()).map_err(|_| io::Error::other("request larger than 4 GiB"))?;
    w.write_all(REQUEST_MAGIC)?;
    w.write_all(&ty.to_u32().to_le_bytes())?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(data)?;
    w.flush()
}

pub fn read_request(r: &mut impl Read, max: usize) -> Result<(ClipboardType, Vec<u8>), IpcError> {
    let mut hdr = [0u8; 12];
    r.read_exact(&mut hdr)?;
    let magic: [u8; 4] = hdr[0..4].try_into().expect("4 bytes");
    if &magic != REQUEST_MAGIC {
        return Err(IpcError::BadMagic(magic));
    }
    let ty = ClipboardType::from_u32(u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes")));
    let len = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
    let data = read_bounded(r, len, max)?;
    Ok((ty, data))
}

pub fn write_reply(w: &mut impl Write, result: &Result<Clean, Rejection>) -> io::Result<()> {
    let (status, ty, bytes): (u8, u32, Vec<u8>) = match result {
        Ok(c) => (0, c.ty.to_u32(), c.data.clone()),
        Err(e) => {
            let mut reason = e.to_string();
            truncate_utf8(&mut reason, MAX_REASON);
            (1, 0, reason.into_bytes())
        }
    };
    w.write_all(REPLY_MAGIC)?;
    w.write_all(&[status])?;
    w.write_all(&ty.to_le_bytes())?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)?;
    w.flush()
}

pub fn read_reply(r: &mut impl Read, max: usize) -> Result<Reply, IpcError> {
    let mut hdr = [0u8; 13];
    r.read_exact(&mut hdr)?;
    let magic: [u8; 4] = hdr[0..4].try_into().expect("4 bytes");
    if &magic != REPLY_MAGIC {
        return Err(IpcError::BadMagic(magic));
    }
    let status = hdr[4];
    let ty = ClipboardType::from_u32(u32::from_le_bytes(hdr[5..9].try_into().expect("4 bytes")));
    let len = u32::from_le_bytes(hdr[9..13].try_into().expect("4 bytes"));
    match status {
        0 => Ok(Reply::Clean(Clean {
            ty,
            data: read_bounded(r, len, max)?,
        })),
        1 => {
            let bytes = read_bounded(r, len, MAX_REASON)?;
            Ok(Reply::Rejected(
                String::from_utf8(bytes).map_err(|_| IpcError::BadReason)?,
            ))
        }
        s => Err(IpcError::BadStatus(s)),
    }
}

fn read_bounded(r: &mut impl Read, len: u32, max: usize) -> Result<Vec<u8>, IpcError> {
    if len as usize > max {
        return Err(IpcError::TooLong { got: len, max });
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok(data)
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_limit() {
        let mut buf = Vec::new();
        write_request(&mut buf, ClipboardType::Png, b"abc").unwrap();
        assert_eq!(
            read_request(&mut &buf[..], 3).unwrap(),
            (ClipboardType::Png, b"abc".to_vec())
        );
        assert!(matches!(
            read_request(&mut &buf[..], 2),
            Err(IpcError::TooLong { got: 3, max: 2 })
        ));
        buf[0] = b'X';
        assert!(matches!(
            read_request(&mut &buf[..], 3),
            Err(IpcError::BadMagic(_))
        ));
    }

    #[test]
    fn reply_round_trip_and_limits() {
        let ok = Ok(Clean {
            ty: ClipboardType::Utf8Text,
            data: b"hi".to_vec(),
        });
        let mut buf = Vec::new();
        write_reply(&mut buf, &ok).unwrap();
        assert_eq!(
            read_reply(&mut &buf[..], 2).unwrap(),
            Reply::Clean(ok.clone().unwrap())
        );
        assert!(matches!(
            read_reply(&mut &buf[..], 1),
            Err(IpcError::TooLong { .. })
        ));
        let mut buf = Vec::new();
        write_reply(&mut buf, &Err(Rejection::BadUtf8(3))).unwrap();
        assert_eq!(
            read_reply(&mut &buf[..], 0).unwrap(),
            Reply::Rejected("text is not valid UTF-8 (first bad byte at offset 3)".into())
        );
        // A lying length field with nothing behind it is an I/O error, not a hang or a panic.
        let mut buf = Vec::new();
        write_reply(&mut buf, &ok).unwrap();
        buf[9..13].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            read_reply(&mut &buf[..], 1000),
            Err(IpcError::Io(_))
        ));
    }
}
