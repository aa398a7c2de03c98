//! The patterns the guest draws on its display (`draw`, see
//! [`crate::protocol::DRAW`]) and their packing into framebuffer pixels.

/// The colours of `draw bars`, left to right: eight vertical bars of equal
/// width (the last takes the rounding), full-intensity RGB.
pub const BARS: [[u8; 3]; 8] = [
    [255, 255, 255], // white
    [255, 255, 0],   // yellow
    [0, 255, 255],   // cyan
    [0, 255, 0],     // green
    [255, 0, 255],   // magenta
    [255, 0, 0],     // red
    [0, 0, 255],     // blue
    [0, 0, 0],       // black
];

/// A pattern to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// [`BARS`].
    Bars,
    /// One colour over the whole screen.
    Solid([u8; 3]),
}

impl Pattern {
    /// Parses the words after `draw`: `bars` or `solid <rrggbb>`.
    pub fn parse(words: &[&str]) -> Result<Pattern, String> {
        match words {
            ["bars"] => Ok(Pattern::Bars),
            ["solid", hex] if hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let c = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex");
                Ok(Pattern::Solid([c(0), c(2), c(4)]))
            }
            _ => Err(format!(
                "usage: draw bars | draw solid <rrggbb>, got {:?}",
                words.join(" ")
            )),
        }
    }

    /// How the reply names it: `bars` or `solid <rrggbb>`.
    pub fn name(&self) -> String {
        match self {
            Pattern::Bars => "bars".into(),
            Pattern::Solid([r, g, b]) => format!("solid {r:02x}{g:02x}{b:02x}"),
        }
    }

    /// The colour at column `x` of a screen `width` pixels wide.
    pub fn colour_at(&self, x: u32, width: u32) -> [u8; 3] {
        match self {
            Pattern::Bars => {
                BARS[((x as u64 * BARS.len() as u64) / width.max(1) as u64).min(7) as usize]
            }
            Pattern::Solid(c) => *c,
        }
    }
}

/// A framebuffer's pixel layout (from `FBIOGET_VSCREENINFO` /
/// `FBIOGET_FSCREENINFO`): true colour, `(offset, length)` in bits of each
/// channel inside a little-endian pixel of `bits_per_pixel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    pub bits_per_pixel: u32,
    pub line_length: u32,
    pub red: (u32, u32),
    pub green: (u32, u32),
    pub blue: (u32, u32),
}

impl Layout {
    /// The visible screen's bytes (`height` lines of `line_length`) with
    /// `pattern` drawn; errors on a layout this cannot pack.
    pub fn render(&self, pattern: Pattern) -> Result<Vec<u8>, String> {
        let bytes = match self.bits_per_pixel {
            16 | 24 | 32 => (self.bits_per_pixel / 8) as usize,
            n => return Err(format!("{n} bits per pixel not supported")),
        };
        let line = self.line_length as usize;
        if line < self.width as usize * bytes {
            return Err(format!(
                "line length {line} too short for {} pixels",
                self.width
            ));
        }
        let channel = |v: u8, (offset, len): (u32, u32)| -> u32 {
            if len == 0 || len > 8 {
                0
            } else {
                (u32::from(v) >> (8 - len)) << offset
            }
        };
        let mut row = vec![0u8; line];
        for x in 0..self.width {
            let [r, g, b] = pattern.colour_at(x, self.width);
            let pixel = channel(r, self.red) | channel(g, self.green) | channel(b, self.blue);
            let at = x as usize * bytes;
            row[at..at + bytes].copy_from_slice(&pixel.to_le_bytes()[..bytes]);
        }
        Ok(row.repeat(self.height as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_patterns() {
        assert_eq!(Pattern::parse(&["bars"]), Ok(Pattern::Bars));
        assert_eq!(
            Pattern::parse(&["solid", "12aBef"]),
            Ok(Pattern::Solid([0x12, 0xab, 0xef]))
        );
        assert_eq!(
            Pattern::parse(&["solid", "12aBef"]).unwrap().name(),
            "solid 12abef"
        );
        for bad in [
            &["solid", "12345"][..],
            &["solid", "zz0000"],
            &["dots"],
            &[],
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bars_split_the_width_in_eight() {
        let p = Pattern::Bars;
        assert_eq!(p.colour_at(0, 1024), [255, 255, 255]);
        assert_eq!(p.colour_at(127, 1024), [255, 255, 255]);
        assert_eq!(p.colour_at(128, 1024), [255, 255, 0]);
        assert_eq!(p.colour_at(5 * 128 + 1, 1024), [255, 0, 0]);
        assert_eq!(p.colour_at(1023, 1024), [0, 0, 0]);
    }

    #[test]
    fn packs_xrgb8888_and_rgb565() {
        let xrgb = Layout {
            width: 2,
            height: 2,
            bits_per_pixel: 32,
            line_length: 12,
            red: (16, 8),
            green: (8, 8),
            blue: (0, 8),
        };
        let px = xrgb.render(Pattern::Solid([0x11, 0x22, 0x33])).unwrap();
        assert_eq!(px.len(), 24);
        assert_eq!(
            &px[..12],
            &[0x33, 0x22, 0x11, 0, 0x33, 0x22, 0x11, 0, 0, 0, 0, 0]
        );
        assert_eq!(&px[12..], &px[..12]);
        let rgb565 = Layout {
            width: 1,
            height: 1,
            bits_per_pixel: 16,
            line_length: 2,
            red: (11, 5),
            green: (5, 6),
            blue: (0, 5),
        };
        assert_eq!(
            rgb565.render(Pattern::Solid([255, 0, 255])).unwrap(),
            vec![0x1f, 0xf8]
        );
        let bad = Layout {
            bits_per_pixel: 8,
            ..xrgb
        };
        assert!(bad.render(Pattern::Bars).is_err());
    }
}
