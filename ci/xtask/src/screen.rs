//! Screendumps as pixels: decoding what QMP `screendump` writes (PNG, or
//! binary PPM from a QEMU built without libpng) and comparing two of them.
//!
//! The suite uses this to prove that a key press changed nothing on screen.
//! Comparison is on decoded pixels, never on file bytes: two encoders (or two
//! zlib settings) can write the same picture differently.

use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// A decoded picture: 8-bit RGBA, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

/// Decodes a PNG or binary PPM (`P6`) image, told apart by their magic bytes.
pub fn decode_image(bytes: &[u8]) -> Result<Image> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes)
    } else if bytes.starts_with(b"P6") {
        decode_ppm(bytes)
    } else {
        bail!(
            "neither PNG nor binary PPM (starts with {:02x?})",
            &bytes[..bytes.len().min(8)]
        )
    }
}

/// Reads and decodes the image at `path`.
pub fn load_image(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("decoding {}", path.display()))
}

/// How many pixels differ between `a` and `b`; `None` if their sizes differ.
pub fn differing_pixels(a: &Image, b: &Image) -> Option<usize> {
    if (a.width, a.height) != (b.width, b.height) {
        return None;
    }
    Some(
        a.rgba
            .chunks_exact(4)
            .zip(b.rgba.chunks_exact(4))
            .filter(|(x, y)| x != y)
            .count(),
    )
}

/// Whether the pictures in two image files differ in size or in any pixel.
pub fn images_differ(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (load_image(a)?, load_image(b)?);
    Ok(differing_pixels(&a, &b) != Some(0))
}

fn decode_png(bytes: &[u8]) -> Result<Image> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().context("reading PNG header")?;
    let size = reader
        .output_buffer_size()
        .context("PNG too large for memory")?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).context("decoding PNG data")?;
    buf.truncate(info.buffer_size());
    let pixels = (info.width as usize) * (info.height as usize);
    let rgba = match info.color_type {
        png::ColorType::Rgba => buf,
        png::ColorType::Rgb => buf
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        png::ColorType::Grayscale => buf.iter().flat_map(|&g| [g, g, g, 255]).collect(),
        png::ColorType::GrayscaleAlpha => buf
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0], p[1]])
            .collect(),
        png::ColorType::Indexed => bail!("PNG palette was not expanded"),
    };
    ensure!(
        rgba.len() == pixels * 4,
        "PNG decoded to {} bytes for {pixels} pixels",
        rgba.len()
    );
    Ok(Image {
        width: info.width,
        height: info.height,
        rgba,
    })
}

/// Binary PPM: `P6`, width, height and maxval as ASCII numbers separated by
/// whitespace (with `#` comments), one whitespace byte, then RGB samples.
fn decode_ppm(bytes: &[u8]) -> Result<Image> {
    let mut pos = 2;
    let mut header = [0u32; 3];
    for field in &mut header {
        loop {
            match bytes.get(pos) {
                Some(b) if b.is_ascii_whitespace() => pos += 1,
                Some(b'#') => {
                    while bytes.get(pos).is_some_and(|&b| b != b'\n') {
                        pos += 1;
                    }
                }
                _ => break,
            }
        }
        let start = pos;
        while bytes.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        let digits = std::str::from_utf8(&bytes[start..pos]).unwrap_or_default();
        *field = digits
            .parse()
            .with_context(|| format!("PPM header: expected a number at byte {start}"))?;
    }
    let [width, height, maxval] = header;
    ensure!(
        bytes.get(pos).is_some_and(u8::is_ascii_whitespace),
        "PPM header not followed by whitespace"
    );
    ensure!(
        (1..=255).contains(&maxval),
        "PPM maxval {maxval} unsupported (only 8-bit samples)"
    );
    let data = &bytes[pos + 1..];
    let samples = (width as usize) * (height as usize) * 3;
    ensure!(
        data.len() >= samples,
        "PPM data truncated: {} of {samples} bytes",
        data.len()
    );
    let scale = |v: u8| ((u32::from(v) * 255 + maxval / 2) / maxval).min(255) as u8;
    let rgba = data[..samples]
        .chunks_exact(3)
        .flat_map(|p| [scale(p[0]), scale(p[1]), scale(p[2]), 255])
        .collect();
    Ok(Image {
        width,
        height,
        rgba,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    fn ppm_bytes(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    const RED_BLUE: [u8; 6] = [255, 0, 0, 0, 0, 255];

    #[test]
    fn png_and_ppm_of_the_same_picture_decode_equal() {
        let png = decode_image(&png_bytes(2, 1, png::ColorType::Rgb, &RED_BLUE)).unwrap();
        let ppm = decode_image(&ppm_bytes("P6\n2 1\n255\n", &RED_BLUE)).unwrap();
        assert_eq!(png, ppm);
        assert_eq!(png.rgba, [255, 0, 0, 255, 0, 0, 255, 255]);
    }

    #[test]
    fn grayscale_png_expands_to_rgba() {
        let img = decode_image(&png_bytes(2, 1, png::ColorType::Grayscale, &[7, 9])).unwrap();
        assert_eq!(img.rgba, [7, 7, 7, 255, 9, 9, 9, 255]);
    }

    #[test]
    fn ppm_header_comments_and_small_maxval() {
        let img = decode_image(&ppm_bytes("P6 # QEMU\n# size:\n1 1 15\n", &[15, 0, 5])).unwrap();
        assert_eq!(img.rgba, [255, 0, 85, 255]);
    }

    #[test]
    fn bad_images_are_rejected() {
        let cases: &[(&[u8], &str)] = &[
            (b"GIF89a", "neither PNG nor binary PPM"),
            (b"P6\n2 1\n255\n\xff\x00\x00", "truncated"),
            (b"P6\nx 1\n255\n", "expected a number"),
            (b"P6\n1 1\n65535\n\x00\x00\x00\x00\x00\x00", "maxval 65535"),
            (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG header"),
        ];
        for (bytes, needle) in cases {
            let err = format!("{:#}", decode_image(bytes).unwrap_err());
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn differing_pixels_counts_changes_and_rejects_other_sizes() {
        let a = Image {
            width: 2,
            height: 1,
            rgba: vec![0; 8],
        };
        let mut b = a.clone();
        assert_eq!(differing_pixels(&a, &b), Some(0));
        b.rgba[5] = 1;
        assert_eq!(differing_pixels(&a, &b), Some(1));
        let c = Image {
            width: 1,
            height: 2,
            rgba: vec![0; 8],
        };
        assert_eq!(differing_pixels(&a, &c), None);
    }

    #[test]
    fn images_differ_compares_pixels_not_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (png_path, ppm_path, other) = (
            dir.path().join("a.png"),
            dir.path().join("a.ppm"),
            dir.path().join("b.png"),
        );
        std::fs::write(&png_path, png_bytes(2, 1, png::ColorType::Rgb, &RED_BLUE)).unwrap();
        std::fs::write(&ppm_path, ppm_bytes("P6\n2 1\n255\n", &RED_BLUE)).unwrap();
        std::fs::write(
            &other,
            png_bytes(2, 1, png::ColorType::Rgb, &[255, 0, 0, 0, 0, 254]),
        )
        .unwrap();
        assert!(!images_differ(&png_path, &ppm_path).unwrap());
        assert!(images_differ(&png_path, &other).unwrap());
        let missing = images_differ(&png_path, &dir.path().join("none.png")).unwrap_err();
        assert!(format!("{missing:#}").contains("none.png"));
    }
}
