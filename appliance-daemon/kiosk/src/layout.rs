//! Where things go on the screen, and in which colour: a pure function from
//! what the kiosk knows to the pixels it scans out ([`compose`]).
//!
//! The label strip is drawn by the host above the guest area; the guest's
//! pixels are only ever written below it, so no guest can cover or imitate
//! the strip.

use font8x8::legacy::BASIC_LEGACY;

use crate::message::Message;
use crate::rfb::Framebuffer;
use crate::Side;

/// Label strip of the classified side (red).
pub const CLASSIFIED_RGB: [u8; 3] = [192, 0, 0];
/// Label strip of the general side (green).
pub const GENERAL_RGB: [u8; 3] = [0, 128, 0];
/// The guest area when the guest is not on screen yet (stopped, starting).
pub const NO_GUEST_RGB: [u8; 3] = [48, 48, 48];
/// The box of a message for IT (amber), drawn over the guest area in
/// place of a guest, with black text.
pub const MESSAGE_RGB: [u8; 3] = [255, 176, 0];
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
    /// A message for IT about each guest, shown instead of it.
    pub classified_message: Option<Message>,
    pub general_message: Option<Message>,
    /// The info page for IT ([`Message::Info`]), shown over either guest.
    pub info: Option<Message>,
}

impl Label {
    fn state_of(&self, side: Side) -> &str {
        match side {
            Side::Classified => &self.classified_state,
            Side::General => &self.general_state,
        }
    }

    /// The message for IT about the guest of `side`.
    pub fn message_of(&self, side: Side) -> Option<&Message> {
        match side {
            Side::Classified => self.classified_message.as_ref(),
            Side::General => self.general_message.as_ref(),
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
    if let Some(message) = label.info.as_ref().or(label.message_of(label.on_screen)) {
        // No guest to show: say what is missing, over any stale picture.
        draw_message(canvas, area_top, message, label.on_screen);
        return;
    }
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

/// The guest area (below `top`): grey, with an amber box inset from its
/// edges holding `message` in black: the headline in large letters, then
/// its lines, each as large as lets every line fit (at least the font's
/// own 8 pixels; a line still too long is cut at the box's edge).
fn draw_message(canvas: &mut Canvas<'_>, top: u32, message: &Message, side: Side) {
    let (width, height) = (canvas.width, canvas.height);
    let area_h = height - top;
    canvas.fill(0, top, width, area_h, xrgb(NO_GUEST_RGB));
    let margin = width.min(area_h) / 20;
    let (bx, by) = (margin, top + margin);
    let (bw, bh) = (
        width.saturating_sub(2 * margin),
        area_h.saturating_sub(2 * margin),
    );
    canvas.fill(bx, by, bw, bh, xrgb(MESSAGE_RGB));
    let pad = (bw.min(bh) / 24).max(1);
    let (inner_w, inner_h) = (bw.saturating_sub(2 * pad), bh.saturating_sub(2 * pad));
    let headline = message.headline();
    let lines = message.lines(side);
    let longest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    let rows = lines.len() as u32;
    // Body scale s, headline scale up to 3s; line pitch 1.5 lines, half a
    // headline's gap below it.
    let fits_width = |chars: u32, scale: u32| chars * 8 * scale <= inner_w;
    let head_scale = |s: u32| {
        (s..=3 * s)
            .rev()
            .find(|&h| fits_width(headline.len() as u32, h))
            .unwrap_or(s)
    };
    let total_height = |s: u32| {
        let h = head_scale(s);
        8 * h * 3 / 2 + rows * 12 * s
    };
    let body = (1..=8)
        .rev()
        .find(|&s| fits_width(longest, s) && total_height(s) <= inner_h)
        .unwrap_or(1);
    let head = head_scale(body);
    let mut y = by + pad + inner_h.saturating_sub(total_height(body)) / 2;
    let clip = |text: &str, scale: u32| -> String {
        text.chars()
            .take((inner_w / (8 * scale)) as usize)
            .collect()
    };
    // The block of lines centred, each line left-aligned in it.
    let block_w = (headline.len() as u32 * 8 * head)
        .max(longest * 8 * body)
        .min(inner_w);
    let x = bx + pad + (inner_w - block_w) / 2;
    let bottom = by + pad + inner_h;
    if y + 8 * head <= bottom {
        canvas.text(x, y, head, &clip(headline, head), BLACK);
    }
    y += 8 * head * 3 / 2;
    for line in &lines {
        if y + 8 * body > bottom {
            break;
        }
        canvas.text(x, y, body, &clip(line, body), BLACK);
        y += 12 * body;
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
    let small = [(big * 2 / 3).max(1), 1]
        .into_iter()
        .find(|&s| text_width(&status, s) <= room)
        .unwrap_or(1);
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
            classified_message: None,
            general_message: None,
            info: None,
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

    fn messages() -> [Message; 3] {
        [
            Message::NoDisk {
                path: "/var/lib/airlock/classified/disk/windows.qcow2".into(),
            },
            Message::NotProvisioned,
            Message::DataLocked,
        ]
    }

    /// Counts of the area's pixels: (amber, black, grey, anything else).
    fn area_counts(pixels: &[u32], width: u32, height: u32) -> (usize, usize, usize, usize) {
        let area = &pixels[(strip_height(height).min(height) * width) as usize..];
        let count = |c: u32| area.iter().filter(|&&p| p == c).count();
        let (amber, black, grey) = (
            count(xrgb(MESSAGE_RGB)),
            count(BLACK),
            count(xrgb(NO_GUEST_RGB)),
        );
        (amber, black, grey, area.len() - amber - black - grey)
    }

    #[test]
    fn a_message_for_it_fills_the_area_in_amber_with_black_text() {
        for (width, height) in [(1024, 768), (1920, 1080), (640, 480)] {
            for message in messages() {
                for side in [Side::Classified, Side::General] {
                    let mut l = label(side);
                    // Only the side on screen's message is shown…
                    *match side.other() {
                        Side::Classified => &mut l.classified_message,
                        Side::General => &mut l.general_message,
                    } = Some(message.clone());
                    let (amber, ..) = area_counts(&draw(width, height, &l, None), width, height);
                    assert_eq!(
                        amber, 0,
                        "{width}x{height} {side:?}: the other side's message"
                    );
                    l.classified_message = Some(message.clone());
                    l.general_message = Some(message.clone());
                    // …and it covers a guest's picture, stale or not.
                    let mut fb = Framebuffer::new(64, 48);
                    fb.pixels.fill(0x0000ff);
                    let pixels = draw(width, height, &l, Some(&fb));
                    let (amber, black, grey, other) = area_counts(&pixels, width, height);
                    let area = (amber + black + grey + other) as f64;
                    assert!(
                        amber as f64 / area > 0.6,
                        "{width}x{height} {message:?}: amber {amber} of {area}"
                    );
                    assert!(
                        black as f64 / area > 0.01,
                        "{width}x{height} {message:?}: text {black}"
                    );
                    assert_eq!(other, 0, "{width}x{height}: only grey, amber and black");
                    // The strip stays as it was.
                    assert!(pixels[..(strip_height(height) * width) as usize]
                        .iter()
                        .all(|&p| p == xrgb(side_rgb(side)) || p == WHITE));
                    assert!(!pixels.contains(&0xdead), "every pixel drawn");
                }
            }
        }
    }

    /// The text stays inside the box: every black pixel has the box's
    /// colour somewhere to its left and right on its row.
    #[test]
    fn message_text_stays_inside_the_box() {
        for (width, height) in [(640, 480), (1024, 768), (1280, 800)] {
            for message in messages() {
                let mut l = label(Side::Classified);
                l.classified_message = Some(message.clone());
                let pixels = draw(width, height, &l, None);
                for y in strip_height(height)..height {
                    let row = &pixels[(y * width) as usize..((y + 1) * width) as usize];
                    let Some(first) = row.iter().position(|&p| p == BLACK) else {
                        continue;
                    };
                    let last = row.iter().rposition(|&p| p == BLACK).unwrap();
                    assert!(
                        row[..first].contains(&xrgb(MESSAGE_RGB)),
                        "{width}x{height} row {y}"
                    );
                    assert!(
                        row[last..].contains(&xrgb(MESSAGE_RGB)),
                        "{width}x{height} row {y}"
                    );
                }
                let (_, black, ..) = area_counts(&pixels, width, height);
                assert!(
                    black > 500,
                    "{width}x{height} {message:?}: text is drawn ({black})"
                );
            }
        }
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
        for (w, h) in [
            (1, 1),
            (24, 24),
            (30, 25),
            (8, 200),
            (200, 8),
            (100, 60),
            (320, 200),
            (640, 480),
        ] {
            let fb = Framebuffer::new(3, 3);
            draw(w, h, &label(Side::Classified), Some(&fb));
            draw(w, h, &label(Side::Classified), None);
            for message in messages() {
                let mut l = label(Side::Classified);
                l.classified_message = Some(message);
                draw(w, h, &l, Some(&fb));
                draw(w, h, &l, None);
            }
        }
    }
}
