//! A deliberately small RFB (VNC) client for QEMU's VNC server on a unix
//! socket: protocol 3.8, security "None", 32-bit true-colour pixels in the
//! KMS byte order (XRGB8888), and only the encodings the kiosk needs — Raw,
//! the DesktopSize pseudo-encoding and QEMU's extended key events (raw
//! scancodes, so the host needs no keymap). Anything else the server sends
//! is a protocol error and the connection is dropped (the kiosk reconnects).
//!
//! The guest controls what is drawn, never the protocol (that is QEMU), but
//! QEMU runs in the guest's confined domain, so the parser still treats the
//! stream as untrusted: every size is checked against fixed caps before
//! anything is allocated or written.

use std::io::{self, Read, Write};

/// Largest framebuffer the kiosk accepts from a guest (either side).
pub const MAX_DIMENSION: u16 = 8192;
/// Cut text the server may send (QEMU sends none: it has no clipboard
/// chardev); read and dropped up to this size, refused above.
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Longest desktop name or refusal reason read.
const MAX_STRING: u32 = 4096;

const ENCODING_RAW: i32 = 0;
const ENCODING_DESKTOP_SIZE: i32 = -223;
const ENCODING_QEMU_EXTENDED_KEY: i32 = -258;

/// How the connection failed.
#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    #[error("VNC connection: {0}")]
    Io(#[from] io::Error),
    #[error("VNC protocol: {0}")]
    Protocol(String),
}

fn protocol<T>(why: impl Into<String>) -> Result<T, RfbError> {
    Err(RfbError::Protocol(why.into()))
}

/// A guest's screen as the kiosk keeps it: XRGB8888, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framebuffer {
    pub width: u16,
    pub height: u16,
    pub pixels: Vec<u32>,
}

impl Framebuffer {
    pub fn new(width: u16, height: u16) -> Self {
        Framebuffer {
            width,
            height,
            pixels: vec![0; usize::from(width) * usize::from(height)],
        }
    }

    pub fn pixel(&self, x: u16, y: u16) -> u32 {
        self.pixels[usize::from(y) * usize::from(self.width) + usize::from(x)]
    }
}

/// What one server message did to the framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// A framebuffer update was applied (the screen changed or was resized).
    Frame,
    /// Nothing visible (bell, cut text dropped, colour map).
    Nothing,
}

/// The server's half of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub name: String,
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A length-prefixed string, refused above `MAX_STRING`.
fn read_string(r: &mut impl Read, what: &str) -> Result<String, RfbError> {
    let len = read_u32(r)?;
    if len > MAX_STRING {
        return protocol(format!("{what} of {len} bytes"));
    }
    let mut bytes = vec![0; len as usize];
    r.read_exact(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Our pixel format: 32 bpp, depth 24, little-endian, true colour,
/// red at bit 16, green at 8, blue at 0 — XRGB8888 as KMS scans it out.
const PIXEL_FORMAT: [u8; 16] = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];

/// Handshake on `stream`: version, security None, exclusive ClientInit
/// (any other viewer is disconnected), then our pixel format and encodings.
pub fn handshake(stream: &mut (impl Read + Write)) -> Result<ServerInit, RfbError> {
    let mut version = [0; 12];
    stream.read_exact(&mut version)?;
    if &version[..4] != b"RFB " || version[11] != b'\n' {
        return protocol(format!(
            "not an RFB server (greeting {:?})",
            String::from_utf8_lossy(&version)
        ));
    }
    if &version[4..11] < b"003.008".as_slice() {
        return protocol(format!(
            "server speaks {}, 3.8 needed",
            String::from_utf8_lossy(&version[4..11])
        ));
    }
    stream.write_all(b"RFB 003.008\n")?;
    let count = read_u8(stream)?;
    if count == 0 {
        let reason = read_string(stream, "refusal reason")?;
        return protocol(format!("server refused the connection: {reason}"));
    }
    let mut types = vec![0; usize::from(count)];
    stream.read_exact(&mut types)?;
    if !types.contains(&1) {
        return protocol(format!(
            "server offers no security type None (offers {types:?})"
        ));
    }
    stream.write_all(&[1])?;
    if read_u32(stream)? != 0 {
        let reason = read_string(stream, "security failure reason")?;
        return protocol(format!("security handshake failed: {reason}"));
    }
    stream.write_all(&[0])?; // ClientInit: not shared
    let width = read_u16(stream)?;
    let height = read_u16(stream)?;
    let mut server_format = [0; 16];
    stream.read_exact(&mut server_format)?;
    let name = read_string(stream, "desktop name")?;
    check_size(width, height)?;

    let mut set_format = vec![0u8, 0, 0, 0];
    set_format.extend_from_slice(&PIXEL_FORMAT);
    let encodings = [
        ENCODING_RAW,
        ENCODING_DESKTOP_SIZE,
        ENCODING_QEMU_EXTENDED_KEY,
    ];
    let mut set_encodings = vec![2u8, 0];
    set_encodings.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
    for e in encodings {
        set_encodings.extend_from_slice(&e.to_be_bytes());
    }
    set_format.extend_from_slice(&set_encodings);
    stream.write_all(&set_format)?;
    Ok(ServerInit {
        width,
        height,
        name,
    })
}

fn check_size(width: u16, height: u16) -> Result<(), RfbError> {
    if width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION {
        return protocol(format!(
            "framebuffer size {width}x{height} outside 1..={MAX_DIMENSION}"
        ));
    }
    Ok(())
}

/// FramebufferUpdateRequest for the whole screen.
pub fn update_request(incremental: bool, width: u16, height: u16) -> [u8; 10] {
    let mut m = [3, u8::from(incremental), 0, 0, 0, 0, 0, 0, 0, 0];
    m[6..8].copy_from_slice(&width.to_be_bytes());
    m[8..10].copy_from_slice(&height.to_be_bytes());
    m
}

/// QEMU extended key event: `scancode` in QEMU's XT encoding (0xe0-prefixed
/// codes as `0x80 | code`), keysym 0 (QEMU uses the scancode).
pub fn key_event(scancode: u16, down: bool) -> [u8; 12] {
    let mut m = [255, 0, 0, u8::from(down), 0, 0, 0, 0, 0, 0, 0, 0];
    m[8..12].copy_from_slice(&u32::from(scancode).to_be_bytes());
    m
}

/// PointerEvent: `buttons` bit 0 left, 1 middle, 2 right, 3/4 wheel.
pub fn pointer_event(buttons: u8, x: u16, y: u16) -> [u8; 6] {
    let mut m = [5, buttons, 0, 0, 0, 0];
    m[2..4].copy_from_slice(&x.to_be_bytes());
    m[4..6].copy_from_slice(&y.to_be_bytes());
    m
}

/// Reads one server message and applies it to `fb`. `extended_keys` is set
/// once the server acknowledged QEMU extended key events.
pub fn read_message(
    r: &mut impl Read,
    fb: &mut Framebuffer,
    extended_keys: &mut bool,
) -> Result<Update, RfbError> {
    match read_u8(r)? {
        0 => {
            skip(r, 1)?;
            let rects = read_u16(r)?;
            for _ in 0..rects {
                read_rect(r, fb, extended_keys)?;
            }
            Ok(Update::Frame)
        }
        1 => {
            // SetColourMapEntries: never asked for (true colour); skip it.
            skip(r, 3)?;
            let count = read_u16(r)?;
            skip(r, u64::from(count) * 6)?;
            Ok(Update::Nothing)
        }
        2 => Ok(Update::Nothing), // Bell
        3 => {
            skip(r, 3)?;
            let len = read_u32(r)?;
            if len > MAX_CUT_TEXT {
                return protocol(format!("cut text of {len} bytes"));
            }
            // No clipboard through the display: dropped unread.
            skip(r, u64::from(len))?;
            Ok(Update::Nothing)
        }
        other => protocol(format!("unknown server message type {other}")),
    }
}

fn read_rect(
    r: &mut impl Read,
    fb: &mut Framebuffer,
    extended_keys: &mut bool,
) -> Result<(), RfbError> {
    let x = read_u16(r)?;
    let y = read_u16(r)?;
    let w = read_u16(r)?;
    let h = read_u16(r)?;
    let encoding = read_u32(r)? as i32;
    match encoding {
        ENCODING_RAW => {
            let (x, y, w, h) = (
                usize::from(x),
                usize::from(y),
                usize::from(w),
                usize::from(h),
            );
            let (fw, fh) = (usize::from(fb.width), usize::from(fb.height));
            if x + w > fw || y + h > fh {
                return protocol(format!(
                    "rectangle {w}x{h}+{x}+{y} outside the {fw}x{fh} screen"
                ));
            }
            let mut row = vec![0u8; w * 4];
            for line in y..y + h {
                r.read_exact(&mut row)?;
                let start = line * fw + x;
                for (dst, px) in fb.pixels[start..start + w]
                    .iter_mut()
                    .zip(row.chunks_exact(4))
                {
                    *dst = u32::from_le_bytes([px[0], px[1], px[2], px[3]]) & 0x00ff_ffff;
                }
            }
            Ok(())
        }
        ENCODING_DESKTOP_SIZE => {
            check_size(w, h)?;
            *fb = Framebuffer::new(w, h);
            Ok(())
        }
        ENCODING_QEMU_EXTENDED_KEY => {
            *extended_keys = true;
            Ok(())
        }
        other => protocol(format!(
            "rectangle in encoding {other}, which was not asked for"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A server's handshake bytes, then `rest`.
    fn server_bytes(width: u16, height: u16, rest: &[u8]) -> Vec<u8> {
        let mut s = b"RFB 003.008\n".to_vec();
        s.extend([1, 1]); // one security type: None
        s.extend(0u32.to_be_bytes());
        s.extend(width.to_be_bytes());
        s.extend(height.to_be_bytes());
        s.extend([0; 16]);
        s.extend(4u32.to_be_bytes());
        s.extend(b"QEMU");
        s.extend(rest);
        s
    }

    /// A stream that reads `input` and records what is written.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn rect_header(x: u16, y: u16, w: u16, h: u16, encoding: i32) -> Vec<u8> {
        [x, y, w, h]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .chain(encoding.to_be_bytes())
            .collect()
    }

    #[test]
    fn handshake_asks_for_xrgb_raw_and_extended_keys() {
        let mut s = Duplex {
            input: Cursor::new(server_bytes(640, 480, &[])),
            output: Vec::new(),
        };
        let init = handshake(&mut s).unwrap();
        assert_eq!(
            init,
            ServerInit {
                width: 640,
                height: 480,
                name: "QEMU".into()
            }
        );
        let out = &s.output;
        assert_eq!(&out[..12], b"RFB 003.008\n");
        assert_eq!(
            &out[12..14],
            &[1, 0],
            "security None, then ClientInit not shared"
        );
        assert_eq!(&out[14..18], &[0, 0, 0, 0]);
        assert_eq!(&out[18..34], &PIXEL_FORMAT);
        assert_eq!(&out[34..38], &[2, 0, 0, 3]);
        let encodings: Vec<i32> = out[38..]
            .chunks(4)
            .map(|c| i32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(encodings, [0, -223, -258]);
    }

    #[test]
    fn handshake_refuses_what_it_cannot_speak() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"HTTP/1.1 200".to_vec(), "not an RFB server"),
            (b"RFB 003.003\n".to_vec(), "3.8 needed"),
            (
                [
                    b"RFB 003.008\n".as_slice(),
                    &[0],
                    &5u32.to_be_bytes(),
                    b"busy!",
                ]
                .concat(),
                "refused the connection: busy!",
            ),
            (
                [b"RFB 003.008\n".as_slice(), &[1, 2]].concat(),
                "no security type None",
            ),
            (server_bytes(0, 480, &[]), "outside"),
            (server_bytes(9000, 480, &[]), "outside"),
        ];
        for (input, expected) in cases {
            let err = handshake(&mut Duplex {
                input: Cursor::new(input),
                output: Vec::new(),
            })
            .unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should say {expected:?}"
            );
        }
    }

    #[test]
    fn raw_rectangles_land_where_they_say() {
        let mut msg = vec![0, 0, 0, 2];
        msg.extend(rect_header(1, 1, 2, 1, ENCODING_RAW));
        msg.extend([0x11, 0x22, 0x33, 0xff, 0x44, 0x55, 0x66, 0x00]);
        msg.extend(rect_header(0, 0, 0, 0, ENCODING_QEMU_EXTENDED_KEY));
        let mut fb = Framebuffer::new(4, 3);
        let mut ext = false;
        assert_eq!(
            read_message(&mut Cursor::new(msg), &mut fb, &mut ext).unwrap(),
            Update::Frame
        );
        assert_eq!(
            (fb.pixel(1, 1), fb.pixel(2, 1), fb.pixel(0, 0)),
            (0x332211, 0x665544, 0)
        );
        assert!(ext);
    }

    #[test]
    fn desktop_size_resizes_and_is_capped() {
        let mut msg = vec![0, 0, 0, 1];
        msg.extend(rect_header(0, 0, 800, 600, ENCODING_DESKTOP_SIZE));
        let mut fb = Framebuffer::new(4, 3);
        read_message(&mut Cursor::new(msg), &mut fb, &mut false).unwrap();
        assert_eq!((fb.width, fb.height, fb.pixels.len()), (800, 600, 480_000));
        let mut msg = vec![0, 0, 0, 1];
        msg.extend(rect_header(0, 0, 60000, 60000, ENCODING_DESKTOP_SIZE));
        assert!(read_message(&mut Cursor::new(msg), &mut fb, &mut false).is_err());
        assert_eq!(fb.width, 800, "a refused resize changes nothing");
    }

    #[test]
    fn hostile_messages_are_refused_before_allocating() {
        let mut fb = Framebuffer::new(4, 3);
        let out_of_bounds = [vec![0, 0, 0, 1], rect_header(3, 0, 2, 1, ENCODING_RAW)].concat();
        let unknown_encoding = [vec![0, 0, 0, 1], rect_header(0, 0, 1, 1, 7)].concat();
        let huge_cut_text = [vec![3, 0, 0, 0], u32::MAX.to_be_bytes().to_vec()].concat();
        for (msg, expected) in [
            (out_of_bounds, "outside"),
            (unknown_encoding, "encoding 7"),
            (huge_cut_text, "cut text"),
            (vec![77], "unknown server message type 77"),
        ] {
            let err = read_message(&mut Cursor::new(msg), &mut fb, &mut false).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should say {expected:?}"
            );
        }
    }

    #[test]
    fn small_cut_text_and_bell_are_dropped() {
        let mut msg = vec![3, 0, 0, 0];
        msg.extend(5u32.to_be_bytes());
        msg.extend(b"hello");
        msg.push(2);
        let mut r = Cursor::new(msg);
        let mut fb = Framebuffer::new(1, 1);
        assert_eq!(
            read_message(&mut r, &mut fb, &mut false).unwrap(),
            Update::Nothing
        );
        assert_eq!(
            read_message(&mut r, &mut fb, &mut false).unwrap(),
            Update::Nothing
        );
    }

    #[test]
    fn client_messages_are_encoded_as_rfb_and_qemu_say() {
        assert_eq!(
            update_request(true, 1024, 768),
            [3, 1, 0, 0, 0, 0, 4, 0, 3, 0]
        );
        assert_eq!(
            key_event(0x9c, true),
            [255, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x9c]
        );
        assert_eq!(pointer_event(0b101, 300, 2), [5, 5, 1, 44, 0, 2]);
    }
}
