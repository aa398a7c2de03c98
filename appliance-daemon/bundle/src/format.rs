//! Framing: the fixed header, the manifest bytes and the signature block,
//! read from any `Read` with a limit on every length before it is trusted,
//! and encoded into bytes. The payload is not touched here.

use std::io::{self, Read};

use crate::trust::{MAX_SIGNATURES, MAX_SIGNATURE_BYTES};
use crate::Refusal;

/// First 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"AIRLOCKB";

/// The one format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Largest manifest accepted (64 KiB); a real one is about 1 KiB.
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;

/// Everything before the payload, as read (nothing verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    /// The manifest's exact bytes: what the signatures cover.
    pub manifest: Vec<u8>,
    /// Each signature as stored: an armoured `sshsig` (`-----BEGIN SSH SIGNATURE-----`).
    pub signatures: Vec<Vec<u8>>,
}

impl RawHeader {
    /// Bytes from the start of the file to the first payload byte.
    pub fn payload_offset(&self) -> u64 {
        (16 + self.manifest.len() + 4 + self.signatures.iter().map(|s| 4 + s.len()).sum::<usize>())
            as u64
    }

    /// The header's bytes; refuses what a reader would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, Refusal> {
        check_manifest_len(self.manifest.len() as u64)?;
        check_signature_count(self.signatures.len() as u64)?;
        let mut out = Vec::with_capacity(self.payload_offset() as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&(self.manifest.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.manifest);
        out.extend_from_slice(&(self.signatures.len() as u32).to_be_bytes());
        for s in &self.signatures {
            check_signature_len(s.len() as u64)?;
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s);
        }
        Ok(out)
    }

    /// Reads the header from the start of a bundle; leaves `r` at the
    /// first payload byte.
    pub fn read<R: Read>(r: &mut R) -> Result<RawHeader, Refusal> {
        let mut fixed = [0u8; 16];
        read_exact(r, &mut fixed, "header")?;
        if fixed[..8] != MAGIC {
            return Err(Refusal::NotABundle);
        }
        let version = u32::from_be_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(Refusal::UnsupportedFormat(version));
        }
        let manifest_len = u32::from_be_bytes(fixed[12..16].try_into().expect("4 bytes"));
        check_manifest_len(manifest_len.into())?;
        let mut manifest = vec![0u8; manifest_len as usize];
        read_exact(r, &mut manifest, "manifest")?;
        let count = read_u32(r, "signature block")?;
        check_signature_count(count.into())?;
        let mut signatures = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = read_u32(r, "signature block")?;
            check_signature_len(len.into())?;
            let mut sig = vec![0u8; len as usize];
            read_exact(r, &mut sig, "signature block")?;
            signatures.push(sig);
        }
        Ok(RawHeader {
            manifest,
            signatures,
        })
    }
}

fn check_manifest_len(len: u64) -> Result<(), Refusal> {
    if len == 0 || len > MAX_MANIFEST_BYTES as u64 {
        return Err(Refusal::AbsurdSize {
            what: "manifest",
            size: len,
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    Ok(())
}

fn check_signature_count(count: u64) -> Result<(), Refusal> {
    if count > MAX_SIGNATURES as u64 {
        return Err(Refusal::AbsurdSize {
            what: "signature count",
            size: count,
            limit: MAX_SIGNATURES as u64,
        });
    }
    Ok(())
}

fn check_signature_len(len: u64) -> Result<(), Refusal> {
    if len == 0 || len > MAX_SIGNATURE_BYTES as u64 {
        return Err(Refusal::AbsurdSize {
            what: "signature",
            size: len,
            limit: MAX_SIGNATURE_BYTES as u64,
        });
    }
    Ok(())
}

fn read_u32<R: Read>(r: &mut R, what: &'static str) -> Result<u32, Refusal> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b, what)?;
    Ok(u32::from_be_bytes(b))
}

/// `read_exact`, with end of file reported as truncation of `what`.
pub(crate) fn read_exact<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), Refusal> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Refusal::Truncated { what },
        _ => Refusal::Io {
            during: what,
            error: e,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_layout_is_as_documented() {
        let h = RawHeader {
            manifest: b"{}".to_vec(),
            signatures: vec![b"sig".to_vec()],
        };
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len() as u64, h.payload_offset());
        assert_eq!(&bytes[..8], b"AIRLOCKB");
        assert_eq!(bytes[8..16], [0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&bytes[16..18], b"{}");
        assert_eq!(bytes[18..26], [0, 0, 0, 1, 0, 0, 0, 3]);
        assert_eq!(RawHeader::read(&mut &bytes[..]).unwrap(), h);
    }

    #[test]
    fn limits_are_checked_before_allocating() {
        let mut huge = b"AIRLOCKB\0\0\0\x01".to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            RawHeader::read(&mut &huge[..]),
            Err(Refusal::AbsurdSize {
                what: "manifest",
                ..
            })
        ));
        let mut many = b"AIRLOCKB\0\0\0\x01\0\0\0\x02{}".to_vec();
        many.extend_from_slice(&17u32.to_be_bytes());
        assert!(matches!(
            RawHeader::read(&mut &many[..]),
            Err(Refusal::AbsurdSize {
                what: "signature count",
                ..
            })
        ));
        let mut long = b"AIRLOCKB\0\0\0\x01\0\0\0\x02{}\0\0\0\x01".to_vec();
        long.extend_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(matches!(
            RawHeader::read(&mut &long[..]),
            Err(Refusal::AbsurdSize {
                what: "signature",
                ..
            })
        ));
        assert!(matches!(
            RawHeader::read(&mut &b"AIRLOCKB\0\0\0\x02"[..]),
            Err(Refusal::Truncated { .. })
        ));
        assert!(matches!(
            RawHeader::read(&mut &b"AIRLOCKB\0\0\0\x02\0\0\0\x01{"[..]),
            Err(Refusal::UnsupportedFormat(2))
        ));
        assert!(matches!(
            RawHeader::read(&mut &b"ELF\0\0\0\0\0\0\0\0\0\0\0\0\0"[..]),
            Err(Refusal::NotABundle)
        ));
    }
}
