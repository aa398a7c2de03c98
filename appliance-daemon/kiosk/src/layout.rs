//! Where things go on the screen, and in which colour: a pure function from
//! what the kiosk knows to the pixels it scans out ([`compose`]).
//!
//! The label strip is drawn by the host above the guest area; the guest's
//! pixels are only ever written below it, so no guest can cover or imitate
//! the strip.

use font8x8::legacy::BASIC_LEGACY;

use crate::rfb::Framebuffer;
use crate::Side;

/// Label strip of the classified side (red).
pub const CLASSIFIED_RGB: [u8; 3] = [192, 0, 0];
/// Label strip of the general side (green).
pub const GENERAL_RGB: [u8; 3] = [0, 128, 0];
/// The guest area when the guest is not on screen yet (stopped, starting).
pub const NO_GUEST_RGB: [u8; 3] = [48, 48, 48];
const WHITE: u32 = 0x00ff_ffff;
const BLACK: u32 = 0;

/// Height of the label strip on a screen `screen_height` pixels high.
pub fn strip_height(screen_height: u32) -> u32 {
    (screen_height / 16).max(24)
}

/// XRGB8888 of an RGB triple.
pub fn xrgb([r, g, b]: [u8; 3]) -> u32 {
    u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b)
}

/// The strip's colour for `side`.
pub fn side_rgb(side: Side) -> [u8; 3] {
    match side {
        Side::Classified => CLASSIFIED_RGB,
        Side::General => GENERAL_RGB,
    }
}

/// Everything the strip says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The guest on screen.
    pub on_screen: Side,
    /// Each guest's state as the supervisor reports it (`running`, …).
    pub classified_state: String,
    pub general_state: String,
    /// How to switch, e.g. `Scroll Lock: switch`.
    pub hint: String,
    /// A clipboard transfer waiting for the confirm key, described.
    pub pending: Option<String>,
}

impl Label {
    fn state_of(&self, side: Side) -> &str {
        match side {
            Side::Classified => &self.classified_state,
            Side::General => &self.general_state,
        }
    }
}

/// A screen buffer: XRGB8888, `width` pixels per row.
pub struct Canvas<'a> {
    pub width: u32,
    pub height: u32,
    pub pixels: &'a mut [u32],
}

impl Canvas<'_> {
    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, colour: u32) {
        let x_end = (x + w).min(self.width);
        if x >= x_end {
            return;
        }
        for row in y..(y + h).min(self.height) {
            let start = (row * self.width) as usize;
            self.pixels[start + x as usize..start + x_end as usize].fill(colour);
        }
    }

    /// ASCII `text` in the 8×8 font scaled by `scale`, top-left at (x, y);
    /// clipped at the canvas edge. Returns the x after the text.
    fn text(&mut self, x: u32, y: u32, scale: u32, text: &str, colour: u32) -> u32 {
        let mut pen = x;
        for ch in text.chars() {
            let glyph = BASIC_LEGACY
                .get(ch as usize)
                .copied()
                .unwrap_or(BASIC_LEGACY[b'?' as usize]);
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..8 {
                    if bits >> gx & 1 == 1 {
                        self.fill(
                            pen + gx * scale,
                            y + gy as u32 * scale,
                            scale,
                            scale,
                            colour,
                        );
                    }
                }
            }
            pen += 8 * scale;
        }
        pen
    }
}

/// Width in pixels of `text` at `scale`.
fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 8 * scale
}

/// The rectangle (x, y, w, h) a `gw`×`gh` guest screen occupies in the
/// guest area: as large as fits with its aspect kept, centred.
pub fn guest_rect(screen_w: u32, screen_h: u32, gw: u32, gh: u32) -> (u32, u32, u32, u32) {
    let top = strip_height(screen_h);
    let (aw, ah) = (screen_w, screen_h.saturating_sub(top));
    if gw == 0 || gh == 0 || aw == 0 || ah == 0 {
        return (0, top, 0, 0);
    }
    // Fit by the tighter of the two ratios, in integers.
    let (w, h) = if u64::from(aw) * u64::from(gh) <= u64::from(ah) * u64::from(gw) {
        (aw, (u64::from(gh) * u64::from(aw) / u64::from(gw)) as u32)
    } else {
        ((u64::from(gw) * u64::from(ah) / u64::from(gh)) as u32, ah)
    };
    ((aw - w) / 2, top + (ah - h) / 2, w.max(1), h.max(1))
}

/// Maps a point on the screen to the guest's own coordinates (pointer
/// events); points outside the guest are clamped to its edge.
pub fn screen_to_guest(
    screen_w: u32,
    screen_h: u32,
    gw: u16,
    gh: u16,
    x: u32,
    y: u32,
) -> (u16, u16) {
    let (rx, ry, rw, rh) = guest_rect(screen_w, screen_h, u32::from(gw), u32::from(gh));
    let map = |p: u32, origin: u32, len: u32, guest: u16| -> u16 {
        let offset = p.saturating_sub(origin).min(len.saturating_sub(1));
        (u64::from(offset) * u64::from(guest) / u64::from(len.max(1)))
            .min(u64::from(guest.saturating_sub(1))) as u16
    };
    (map(x, rx, rw, gw), map(y, ry, rh, gh))
}

/// Draws the whole screen: the strip for `label`, then the guest on screen
/// (`guest`: its framebuffer once connected and drawn) or its state.
pub fn compose(canvas: &mut Canvas<'_>, label: &Label, guest: Option<&Framebuffer>) {
    let (width, height) = (canvas.width, canvas.height);
    let strip = strip_height(height);
    draw_strip(canvas, label, strip);

    let area_top = strip.min(height);
    match guest {
        Some(fb) => {
            let (rx, ry, rw, rh) =
                guest_rect(width, height, u32::from(fb.width), u32::from(fb.height));
            canvas.fill(0, area_top, width, height - area_top, BLACK);
            let source_x: Vec<usize> = (0..rw)
                .map(|dx| (u64::from(dx) * u64::from(fb.width) / u64::from(rw)) as usize)
                .collect();
            for dy in 0..rh {
                let sy = (u64::from(dy) * u64::from(fb.height) / u64::from(rh)) as usize;
                let src = &fb.pixels[sy * usize::from(fb.width)..(sy + 1) * usize::from(fb.width)];
                let start = ((ry + dy) * width + rx) as usize;
                for (dst, &sx) in canvas.pixels[start..start + rw as usize]
                    .iter_mut()
                    .zip(&source_x)
                {
                    *dst = src[sx];
                }
            }
        }
        None => {
            canvas.fill(0, area_top, width, height - area_top, xrgb(NO_GUEST_RGB));
            let side = label.on_screen;
            let message = format!("{} guest: {}", side.name(), label.state_of(side));
            let scale = (height / 200).max(1);
            let x = width.saturating_sub(text_width(&message, scale)) / 2;
            let y = area_top + (height - area_top).saturating_sub(8 * scale) / 2;
            canvas.text(x, y, scale, &message, WHITE);
        }
    }
}

fn draw_strip(canvas: &mut Canvas<'_>, label: &Label, strip: u32) {
    let width = canvas.width;
    canvas.fill(0, 0, width, strip, xrgb(side_rgb(label.on_screen)));
    // The side in large letters on the left…
    let big = (strip * 5 / 8 / 8).max(1);
    let pad = strip / 4;
    let word = label.on_screen.name().to_ascii_uppercase();
    let after_word = canvas.text(pad, (strip - 8 * big) / 2, big, &word, WHITE);
    // …both guests' states and the hint on the right, in smaller letters:
    // two thirds of the side's size where that fits, else the smallest.
    let status = match &label.pending {
        // Pending transfer: the strip says so instead of the states.
        Some(pending) => pending.clone(),
        None => format!(
            "classified: {}   general: {}   {}",
            label.classified_state, label.general_state, label.hint
        ),
    };
    let room = width.saturating_sub(after_word + 2 * pad);
    let small = [(big * 2 / 3).max(1), 1].into_iter().find(|&s| text_width(&status, s) <= room).unwrap_or(1);
    let status_w = text_width(&status, small);
    let x = width.saturating_sub(status_w + pad).max(after_word + pad);
    canvas.text(x, (strip - 8 * small) / 2, small, &status, WHITE);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(side: Side) -> Label {
        Label {
            on_screen: side,
            classified_state: "running".into(),
            general_state: "stopped".into(),
            hint: "Scroll Lock: switch".into(),
            pending: None,
        }
    }

    fn draw(width: u32, height: u32, label: &Label, guest: Option<&Framebuffer>) -> Vec<u32> {
        let mut pixels = vec![0xdead; (width * height) as usize];
        compose(
            &mut Canvas {
                width,
                height,
                pixels: &mut pixels,
            },
            label,
            guest,
        );
        pixels
    }

    /// The share of the strip's pixels in `colour`.
    fn strip_share(pixels: &[u32], width: u32, height: u32, colour: u32) -> f64 {
        let strip = &pixels[..(strip_height(height) * width) as usize];
        strip.iter().filter(|&&p| p == colour).count() as f64 / strip.len() as f64
    }

    #[test]
    fn the_strip_is_the_side_colour_with_white_text() {
        for (side, rgb) in [
            (Side::Classified, CLASSIFIED_RGB),
            (Side::General, GENERAL_RGB),
        ] {
            let pixels = draw(1280, 800, &label(side), None);
            let share = strip_share(&pixels, 1280, 800, xrgb(rgb));
            assert!(share > 0.7, "{side:?}: {share}");
            assert!(
                strip_share(&pixels, 1280, 800, WHITE) > 0.02,
                "{side:?}: text is drawn"
            );
            assert_eq!(
                share + strip_share(&pixels, 1280, 800, WHITE),
                1.0,
                "nothing else in the strip"
            );
        }
    }

    #[test]
    fn the_guest_is_scaled_into_the_area_below_the_strip_and_never_above() {
        let mut fb = Framebuffer::new(640, 480);
        fb.pixels.fill(0x0000ff);
        let pixels = draw(1280, 800, &label(Side::General), Some(&fb));
        let strip = strip_height(800);
        assert_eq!(strip, 50);
        assert!(pixels[..(strip * 1280) as usize]
            .iter()
            .all(|&p| p == xrgb(GENERAL_RGB) || p == WHITE));
        // 640x480 into 1280x750: 1000x750 at x 140.
        assert_eq!(guest_rect(1280, 800, 640, 480), (140, 50, 1000, 750));
        assert_eq!(pixels[(400 * 1280 + 640) as usize], 0x0000ff);
        assert_eq!(pixels[(400 * 1280 + 100) as usize], BLACK);
        assert!(!pixels.contains(&0xdead), "every pixel drawn");
    }

    #[test]
    fn scaling_keeps_the_pattern_in_place() {
        // Left half red, right half green, at half the resolution.
        let mut fb = Framebuffer::new(4, 2);
        for y in 0..2 {
            for x in 0..4 {
                fb.pixels[y * 4 + x] = if x < 2 { 0xff0000 } else { 0x00ff00 };
            }
        }
        let pixels = draw(800, 424, &label(Side::Classified), Some(&fb));
        let (rx, ry, rw, rh) = guest_rect(800, 424, 4, 2);
        let at = |x: u32, y: u32| pixels[(y * 800 + x) as usize];
        assert_eq!(at(rx + rw / 4, ry + rh / 2), 0xff0000);
        assert_eq!(at(rx + 3 * rw / 4, ry + rh / 2), 0x00ff00);
    }

    #[test]
    fn no_guest_shows_its_state_on_grey() {
        let pixels = draw(1024, 768, &label(Side::General), None);
        let area = &pixels[(strip_height(768) * 1024) as usize..];
        let grey = area.iter().filter(|&&p| p == xrgb(NO_GUEST_RGB)).count();
        let white = area.iter().filter(|&&p| p == WHITE).count();
        assert!(
            white > 100 && grey + white == area.len(),
            "grey {grey}, white {white}"
        );
    }

    #[test]
    fn pointer_positions_map_into_the_guest() {
        assert_eq!(screen_to_guest(1280, 800, 640, 480, 140, 50), (0, 0));
        assert_eq!(screen_to_guest(1280, 800, 640, 480, 640, 425), (320, 240));
        assert_eq!(screen_to_guest(1280, 800, 640, 480, 0, 0), (0, 0));
        assert_eq!(screen_to_guest(1280, 800, 640, 480, 1279, 799), (639, 479));
    }

    #[test]
    fn tiny_screens_do_not_panic() {
        for (w, h) in [(1, 1), (24, 24), (30, 25), (8, 200)] {
            let fb = Framebuffer::new(3, 3);
            draw(w, h, &label(Side::Classified), Some(&fb));
            draw(w, h, &label(Side::Classified), None);
        }
    }
}
