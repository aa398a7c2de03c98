//! The sanitising rules, as pure functions (the `airlock-sanitiser`
//! process runs them under seccomp; tests and the fuzz target call them
//! directly).
//!
//! - Text: must be valid UTF-8; C0/C1 control characters other than tab and
//!   line ends are removed, so are the bidirectional embedding, override and
//!   isolate characters (U+202A–U+202E, U+2066–U+2069, "Trojan Source");
//!   every line end (`\r\n`, `\r`, `\n`) becomes `\r\n` for Windows; the
//!   result must fit the length cap.
//! - Images: PNG, BMP or JPEG, decoded by the `image` crate with limits on
//!   input bytes, width, height, pixel count and decoder allocation (so a
//!   decompression bomb is refused from its header), then re-encoded as PNG
//!   from the bare pixels: metadata, ancillary chunks, trailing bytes and
//!   anything else the source file carried are gone.

use airlock_vdagent::ClipboardType;
use image::{ImageDecoder, ImageFormat, ImageReader};
use std::io::Cursor;

/// Limits the sanitiser enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest sanitised text, in bytes (after CRLF conversion).
    pub max_text_bytes: usize,
    /// Largest image file accepted as input.
    pub max_image_bytes: usize,
    /// Largest width and height, in pixels.
    pub max_dimension: u32,
    /// Largest width × height.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text_bytes: 4 << 20,
            max_image_bytes: 32 << 20,
            max_dimension: 16384,
            max_pixels: 40_000_000,
        }
    }
}

impl Limits {
    /// Most memory a decode may take: 4 bytes a pixel at the largest
    /// allowed size, twice (decoder buffer and the RGBA copy), plus slack.
    pub fn max_decode_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20)
    }
}

/// Why an input was dropped. The text is for the audit log: it never
/// quotes the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("type {0} is not accepted")]
    UnsupportedType(String),
    #[error("text is not valid UTF-8 (first bad byte at offset {0})")]
    BadUtf8(usize),
    #[error("text of {got} bytes after sanitising exceeds the limit of {max}")]
    TextTooLong { got: usize, max: usize },
    #[error("image of {got} bytes exceeds the limit of {max}")]
    ImageTooLarge { got: usize, max: usize },
    #[error(
        "image is {width}x{height}, over the limit ({max_dimension} per side, {max_pixels} pixels)"
    )]
    ImageDimensions {
        width: u32,
        height: u32,
        max_dimension: u32,
        max_pixels: u64,
    },
    #[error("image does not decode as {format}: {reason}")]
    ImageDecode { format: String, reason: String },
    #[error("re-encoding the image failed: {0}")]
    ImageEncode(String),
}

/// A sanitised clipboard item, ready for the classified guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clean {
    pub ty: ClipboardType,
    pub data: Vec<u8>,
}

/// Sanitises one clipboard item of the given type.
pub fn sanitise(ty: ClipboardType, data: &[u8], limits: &Limits) -> Result<Clean, Rejection> {
    match ty {
        ClipboardType::Utf8Text => Ok(Clean {
            ty: ClipboardType::Utf8Text,
            data: sanitise_text(data, limits.max_text_bytes)?.into_bytes(),
        }),
        ClipboardType::Png => reencode_image(data, ImageFormat::Png, limits),
        ClipboardType::Bmp => reencode_image(data, ImageFormat::Bmp, limits),
        ClipboardType::Jpg => reencode_image(data, ImageFormat::Jpeg, limits),
        other => Err(Rejection::UnsupportedType(other.name())),
    }
}

/// True for the bidirectional formatting characters that reorder text:
/// embeddings, overrides and their terminator (U+202A–U+202E) and the
/// isolates (U+2066–U+2069).
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The text rules; see the module documentation.
pub fn sanitise_text(data: &[u8], max_bytes: usize) -> Result<String, Rejection> {
    let text = std::str::from_utf8(data).map_err(|e| Rejection::BadUtf8(e.valid_up_to()))?;
    let mut out = String::with_capacity(text.len().min(max_bytes) + 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            '\t' => out.push('\t'),
            c if c.is_control() || is_bidi_control(c) => {}
            c => out.push(c),
        }
        if out.len() > max_bytes {
            return Err(Rejection::TextTooLong {
                got: out.len() + chars.as_str_len(),
                max: max_bytes,
            });
        }
    }
    Ok(out)
}

/// Bytes left in a `Peekable<Chars>` (for the error message only: an
/// upper bound of the final length).
trait RemainingLen {
    fn as_str_len(&self) -> usize;
}
impl RemainingLen for std::iter::Peekable<std::str::Chars<'_>> {
    fn as_str_len(&self) -> usize {
        self.clone().map(char::len_utf8).sum()
    }
}

/// True when `text` obeys the output rules (what the gateway checks on the
/// sanitiser's answer, so a subverted sanitiser can pass on no more than
/// a well-formed text).
pub fn is_clean_text(text: &[u8], max_bytes: usize) -> bool {
    let Ok(s) = std::str::from_utf8(text) else {
        return false;
    };
    if s.len() > max_bytes {
        return false;
    }
    let mut prev_cr = false;
    for c in s.chars() {
        if prev_cr && c != '\n' {
            return false;
        }
        match c {
            '\r' => prev_cr = true,
            '\n' if !prev_cr => return false,
            '\n' | '\t' => prev_cr = false,
            c if c.is_control() || is_bidi_control(c) => return false,
            _ => prev_cr = false,
        }
    }
    !prev_cr
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// True when `data` starts like a PNG file (the gateway's cheap check on
/// the sanitiser's image output).
pub fn looks_like_png(data: &[u8]) -> bool {
    data.starts_with(PNG_SIGNATURE)
}

fn reencode_image(data: &[u8], format: ImageFormat, limits: &Limits) -> Result<Clean, Rejection> {
    if data.len() > limits.max_image_bytes {
        return Err(Rejection::ImageTooLarge {
            got: data.len(),
            max: limits.max_image_bytes,
        });
    }
    let fmt_name = format!("{format:?}").to_lowercase();
    let decode_err = |e: image::ImageError| Rejection::ImageDecode {
        format: fmt_name.clone(),
        reason: e.to_string(),
    };
    // The decoder's own allocation cap; width and height are checked
    // below, from the header, with a clearer message than the crate's.
    let mut il = image::Limits::default();
    il.max_alloc = Some(limits.max_decode_alloc());

    // The header alone decides the size: refuse before decoding any pixel.
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    reader.limits(il);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    let too_big = width == 0
        || height == 0
        || width > limits.max_dimension
        || height > limits.max_dimension
        || u64::from(width) * u64::from(height) > limits.max_pixels;
    if too_big {
        return Err(Rejection::ImageDimensions {
            width,
            height,
            max_dimension: limits.max_dimension,
            max_pixels: limits.max_pixels,
        });
    }
    let img = image::DynamicImage::from_decoder(decoder).map_err(decode_err)?;

    // Bare pixels, 8 bits per channel: RGBA if the source had alpha.
    let pixels = if img.color().has_alpha() {
        image::DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        image::DynamicImage::ImageRgb8(img.to_rgb8())
    };
    drop(img);
    let mut out = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    pixels
        .write_with_encoder(encoder)
        .map_err(|e| Rejection::ImageEncode(e.to_string()))?;
    Ok(Clean {
        ty: ClipboardType::Png,
        data: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(input: &[u8]) -> Result<String, Rejection> {
        sanitise_text(input, 64)
    }

    #[test]
    fn text_table() {
        let cases: &[(&[u8], Result<&str, Rejection>)] = &[
            (b"plain", Ok("plain")),
            (b"a\nb", Ok("a\r\nb")),
            (b"a\r\nb\rc\n", Ok("a\r\nb\r\nc\r\n")),
            (b"\r\n\r\n", Ok("\r\n\r\n")),
            (b"tab\tkept", Ok("tab\tkept")),
            (
                b"nul\0bell\x07esc\x1b[31m del\x7f",
                Ok("nulbellesc[31m del"),
            ),
            ("c1\u{85}\u{9b}x".as_bytes(), Ok("c1x")),
            ("abc\u{202E}fed\u{202C}".as_bytes(), Ok("abcfed")),
            (
                "\u{2066}iso\u{2069}\u{202A}\u{202B}\u{202D}".as_bytes(),
                Ok("iso"),
            ),
            (
                "keep \u{200F} marks and é 漢字 🙂".as_bytes(),
                Ok("keep \u{200F} marks and é 漢字 🙂"),
            ),
            (b"bad \xff utf8", Err(Rejection::BadUtf8(4))),
            (b"\xc3", Err(Rejection::BadUtf8(0))),
            (b"", Ok("")),
        ];
        for (input, want) in cases {
            assert_eq!(
                text(input).as_deref().map_err(Clone::clone),
                want.clone(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn length_cap_counts_the_output() {
        assert_eq!(sanitise_text(&[b'a'; 64], 64).unwrap().len(), 64);
        assert!(matches!(
            sanitise_text(&[b'a'; 65], 64),
            Err(Rejection::TextTooLong { max: 64, .. })
        ));
        // 40 newlines become 80 bytes.
        assert!(matches!(
            sanitise_text(&[b'\n'; 40], 64),
            Err(Rejection::TextTooLong { .. })
        ));
    }

    #[test]
    fn clean_text_check_agrees_with_sanitiser() {
        for input in ["a\nb\rc\r\n", "x\u{202E}y\0", "\t\u{2067}"] {
            let out = sanitise_text(input.as_bytes(), 64).unwrap();
            assert!(is_clean_text(out.as_bytes(), 64), "{out:?}");
        }
        for bad in ["a\nb", "a\rb", "x\u{202E}", "\0", "end\r"] {
            assert!(!is_clean_text(bad.as_bytes(), 64), "{bad:?}");
        }
        assert!(!is_clean_text(b"\xff", 64));
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn png_is_reencoded_pixel_exact() {
        let mut input = png(40, 30);
        input.extend_from_slice(b"trailing payload after IEND");
        let out = sanitise(ClipboardType::Png, &input, &Limits::default()).unwrap();
        assert_eq!(out.ty, ClipboardType::Png);
        assert!(looks_like_png(&out.data));
        assert!(!out.data.windows(8).any(|w| w == b"trailing"));
        let back = image::load_from_memory_with_format(&out.data, ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(back.dimensions(), (40, 30));
        assert_eq!(back.get_pixel(39, 29), &image::Rgb([39, 29, 7]));
    }

    #[test]
    fn bmp_and_jpeg_become_png() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            16,
            8,
            image::Rgb([200, 10, 10]),
        ));
        for (ty, fmt) in [
            (ClipboardType::Bmp, ImageFormat::Bmp),
            (ClipboardType::Jpg, ImageFormat::Jpeg),
        ] {
            let mut input = Vec::new();
            img.write_to(&mut Cursor::new(&mut input), fmt).unwrap();
            let out = sanitise(ty, &input, &Limits::default()).unwrap();
            assert_eq!(out.ty, ClipboardType::Png);
            let back = image::load_from_memory_with_format(&out.data, ImageFormat::Png).unwrap();
            assert_eq!((back.width(), back.height()), (16, 8), "{fmt:?}");
        }
    }

    #[test]
    fn image_bomb_refused_from_header() {
        // A 30000x30000 PNG header (900 MP) with a tiny body: refused on
        // its dimensions before a pixel is decoded.
        let bomb = png_header_only(30000, 30000);
        let err = sanitise(ClipboardType::Png, &bomb, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                Rejection::ImageDimensions {
                    width: 30000,
                    height: 30000,
                    ..
                }
            ),
            "{err}"
        );
        // Within each side's limit but over the pixel count.
        let limits = Limits {
            max_pixels: 1000,
            ..Limits::default()
        };
        let err = sanitise(ClipboardType::Png, &png(40, 30), &limits).unwrap_err();
        assert!(matches!(err, Rejection::ImageDimensions { .. }), "{err}");
    }

    #[test]
    fn wrong_or_broken_images_refused() {
        let p = png(4, 4);
        assert!(matches!(
            sanitise(ClipboardType::Bmp, &p, &Limits::default()),
            Err(Rejection::ImageDecode { .. })
        ));
        assert!(matches!(
            sanitise(ClipboardType::Png, &p[..p.len() / 2], &Limits::default()),
            Err(Rejection::ImageDecode { .. })
        ));
        let limits = Limits {
            max_image_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            sanitise(ClipboardType::Png, &p, &limits),
            Err(Rejection::ImageTooLarge { .. })
        ));
        for ty in [
            ClipboardType::Tiff,
            ClipboardType::FileList,
            ClipboardType::None,
            ClipboardType::Other(77),
        ] {
            assert!(matches!(
                sanitise(ty, b"x", &Limits::default()),
                Err(Rejection::UnsupportedType(_))
            ));
        }
    }

    /// A PNG signature and IHDR chunk claiming `w`×`h`, followed by an empty
    /// IDAT and IEND: what a decompression bomb looks like to a header check.
    pub(crate) fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        super::testutil::png_header_only(w, h)
    }
}

#[doc(hidden)]
pub mod testutil {
    //! Builders shared by the unit tests, integration tests and benchmark.

    /// A PNG with a valid IHDR claiming `w`×`h` (8-bit RGB) and a tiny
    /// zlib stream of zeros: a decompression bomb's shape.
    pub fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let mut crc_in = kind.to_vec();
            crc_in.extend_from_slice(data);
            out.extend_from_slice(&crc32(&crc_in).to_be_bytes());
        }
        let mut out = super::PNG_SIGNATURE.to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        // zlib: a stored empty block is enough to look like data.
        chunk(
            &mut out,
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
