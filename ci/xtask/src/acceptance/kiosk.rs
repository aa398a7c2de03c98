//! The kiosk in the booted test image (P6, P2): `airlock-kiosk` owns the
//! outer VM's display and keyboard. Seen from outside, as a user at the PC
//! would: QMP screendumps of the outer VM (the label strip, the guest on
//! screen) and QMP key presses on its PS/2 keyboard; from inside through the
//! agent: the kiosk's process, and what each nested test guest received
//! (`keys`, `keys-clear` of ci/test-guest).
//!
//! The kiosk's run-time contract is in `appliance-daemon/kiosk/src/lib.rs`;
//! its colours and strip height are mirrored here (a unit test keeps the
//! two equal), so the suite does not link the kiosk's KMS and evdev crates.
//!
//! Every screendump is kept as PNG in the directory given to
//! [`kiosk_checks`] (`<work dir>/screens/kiosk/`), named after what it
//! shows; the details print their paths.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::boot::sh;
use super::supervisor::{guest, CTL};
use super::Suite;
use crate::qmp::ImageFormat;
use crate::screen::{differing_pixels, load_image, Image};
use crate::Vm;

pub const TESTS: &[&str] = &[
    "kiosk: runs as airlock-kiosk in airlock_kiosk_t, the only process with the DRM device open",
    "kiosk: the screen shows the label and each guest's pattern, switching with the switch key (P6)",
    "kiosk: keys reach only the guest on screen; the switch key reaches neither",
    "kiosk: pointer clicks reach only the guest on screen",
    "kiosk: Ctrl-Alt-F1..F12, SysRq combinations and Ctrl-Alt-Backspace leave the kiosk on screen",
    "kiosk: figures: CPU while idle and while the guest on screen redraws, first frame after the kernel started",
    "kiosk: a killed kiosk comes back within 10 s",
    "kiosk: a guest whose disk is missing shows IT's message in its place (no-disk), and runs again once the disk is back",
];

const UNIT: &str = "airlock-kiosk.service";
const USER: &str = "airlock-kiosk";
const DOMAIN: &str = "airlock_kiosk_t";
const EXECUTABLE: &str = "/usr/lib/airlock/airlock-kiosk";
/// The line the kiosk logs each time it shows a side (then the side's name).
const SHOWING: &str = "airlock-kiosk: showing ";

/// The switch key's QMP qcode (the kiosk's default `--switch-key`).
const SWITCH_KEY: &str = "scroll_lock";
/// Its evdev code (KEY_SCROLLLOCK), which no guest may ever see.
const KEY_SCROLLLOCK: u16 = 70;
/// evdev codes of the keys typed in the routing test.
const KEY_A: u16 = 30;
const KEY_B: u16 = 48;
const KEY_C: u16 = 46;

/// Mirror of `airlock_kiosk::layout::CLASSIFIED_RGB` (red strip).
pub const CLASSIFIED_RGB: [u8; 3] = [192, 0, 0];
/// Mirror of `airlock_kiosk::layout::GENERAL_RGB` (green strip).
pub const GENERAL_RGB: [u8; 3] = [0, 128, 0];
/// Mirror of `airlock_kiosk::layout::NO_GUEST_RGB` (guest area, no guest).
pub const NO_GUEST_RGB: [u8; 3] = [48, 48, 48];
/// Mirror of `airlock_kiosk::layout::MESSAGE_RGB` (the amber box of a
/// message for IT: no guest disk, PC not provisioned).
pub const MESSAGE_RGB: [u8; 3] = [255, 176, 0];
/// The share of the area below the label strip the kiosk's message box
/// must fill (its unit tests: more than 60 % at common screen sizes).
pub const MESSAGE_SHARE: f64 = 0.4;

/// Mirror of `airlock_kiosk::layout::strip_height`.
pub fn strip_height(screen_height: u32) -> u32 {
    (screen_height / 16).max(24)
}

/// What each test guest draws: distinct from both strips, from black and
/// from the no-guest grey.
const CLASSIFIED_PATTERN: &str = "solid 0000ff";
const CLASSIFIED_COLOUR: [u8; 3] = [0, 0, 255];
const GENERAL_PATTERN: &str = "solid ffff00";
const GENERAL_COLOUR: [u8; 3] = [255, 255, 0];

/// Per-channel tolerance when a screen pixel is compared with a colour the
/// kiosk or a guest drew (screendumps are lossless; this covers a kiosk
/// that dithers or blends its text's edges).
const TOLERANCE: u8 = 48;
/// Share of the strip's pixels that must be the side's colour (the rest is
/// the white label text and its edges).
const STRIP_SHARE: f64 = 0.6;
/// Share of the strip's pixels that must be white: there is a label at all.
const LABEL_SHARE: f64 = 0.002;
/// Most of the row just below the strip that may still be the strip colour.
const BELOW_STRIP_SHARE: f64 = 0.1;
/// Half the side of the block sampled at the centre of the guest area.
const CENTRE_HALF: u32 = 8;

/// First look at the screen: the kiosk may still be connecting to a guest.
const FIRST_SCREEN_TIMEOUT: Duration = Duration::from_secs(90);
/// A switch, a redraw, a key's way to a nested guest under TCG.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(20);
const KEYS_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two screendumps while waiting for the screen.
const SCREEN_POLL: Duration = Duration::from_millis(500);
/// How long a wrongly routed key is given to show up where it must not.
const SETTLE: Duration = Duration::from_secs(2);
/// Restart=always, RestartSec=1s, then the kiosk's start and first frame.
const RESTART_BOUND: Duration = Duration::from_secs(10);
/// How long the restart test keeps looking (to report a time over the bound).
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_SECONDS: u64 = 10;

pub fn kiosk_checks(suite: &mut Suite, vm: &mut Vm, screens_dir: &Path) {
    if !suite.wants_any(TESTS) {
        return;
    }
    let ready = (|| -> Result<Screens> {
        let screens = Screens::new(screens_dir)?;
        wait_for_kiosk(vm, FIRST_SCREEN_TIMEOUT)?;
        Ok(screens)
    })();
    let screens = match ready {
        Ok(s) => s,
        Err(e) => return suite.fail_all(TESTS, &e),
    };
    suite.test(TESTS[0], || check_process(vm));
    suite.test(TESTS[1], || check_screens(vm, &screens));
    suite.test(TESTS[2], || check_key_routing(vm, &screens));
    suite.test(TESTS[3], || check_pointer_routing(vm, &screens));
    suite.test(TESTS[4], || check_console_keys(vm, &screens));
    suite.test(TESTS[5], || figures(vm));
    suite.test(TESTS[6], || check_restart(vm, &screens));
    suite.test(TESTS[7], || check_no_disk(vm, &screens));
}

// ---------------------------------------------------------------- screens

/// Where a test's screendumps go, each as `<name>.png`.
struct Screens {
    dir: PathBuf,
}

impl Screens {
    /// Empties `dir` first: every file in it is from this run.
    fn new(dir: &Path) -> Result<Screens> {
        let dir =
            std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Screens { dir })
    }

    /// A screendump of the outer VM, kept as `<name>.png` (converted if
    /// this QEMU wrote PPM), and its pixels.
    fn take(&self, vm: &mut Vm, name: &str) -> Result<(PathBuf, Image)> {
        let raw = self.dir.join(format!("{name}.dump"));
        let png = self.dir.join(format!("{name}.png"));
        let format = vm.qmp()?.screendump(&raw)?;
        let image = load_image(&raw)?;
        match format {
            ImageFormat::Png => std::fs::rename(&raw, &png)
                .with_context(|| format!("renaming {} to {}", raw.display(), png.display()))?,
            ImageFormat::Ppm => {
                write_png(&image, &png)?;
                std::fs::remove_file(&raw)?;
            }
        }
        Ok((png, image))
    }

    /// Takes screendumps as `<name>.png` until `want` accepts one; its
    /// path, what `want` said, and how long it took. On timeout the file
    /// holds the last screen seen, and the error says why it was refused.
    fn wait(
        &self,
        vm: &mut Vm,
        name: &str,
        timeout: Duration,
        want: impl Fn(&Image) -> Result<String>,
    ) -> Result<(PathBuf, String, Duration)> {
        let start = Instant::now();
        loop {
            let (path, image) = self.take(vm, name)?;
            let verdict = want(&image);
            match verdict {
                Ok(said) => return Ok((path, said, start.elapsed())),
                Err(e) if start.elapsed() >= timeout => {
                    bail!(
                        "after {:.1}s the screen still does not match: {e:#}; last screendump {}",
                        start.elapsed().as_secs_f64(),
                        path.display()
                    )
                }
                Err(_) => thread::sleep(SCREEN_POLL),
            }
        }
    }
}

pub fn write_png(image: &Image, path: &Path) -> Result<()> {
    let buffer = image::RgbaImage::from_raw(image.width, image.height, image.rgba.clone())
        .context("screendump size does not match its pixels")?;
    buffer
        .save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn pixel(image: &Image, x: u32, y: u32) -> [u8; 3] {
    let i = ((y as usize) * (image.width as usize) + x as usize) * 4;
    [image.rgba[i], image.rgba[i + 1], image.rgba[i + 2]]
}

/// Whether every channel of `p` is within `tolerance` of `want`.
pub fn near(p: [u8; 3], want: [u8; 3], tolerance: u8) -> bool {
    p.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= tolerance)
}

fn is_white(p: [u8; 3]) -> bool {
    p.iter().all(|&c| c >= 200)
}

fn strip_colour(side: &str) -> [u8; 3] {
    if side == "classified" {
        CLASSIFIED_RGB
    } else {
        GENERAL_RGB
    }
}

fn other(side: &str) -> &'static str {
    if side == "classified" {
        "general"
    } else {
        "classified"
    }
}

/// Shares of the label strip's pixels (the top [`strip_height`] rows) in
/// each side's colour and in white, and of the row just below the strip
/// (a small allowance for rounding) in either side's colour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StripReading {
    pub height: u32,
    pub classified: f64,
    pub general: f64,
    pub white: f64,
    pub below: f64,
}

pub fn read_strip(image: &Image) -> StripReading {
    let height = strip_height(image.height).min(image.height);
    let (mut classified, mut general, mut white) = (0usize, 0usize, 0usize);
    for y in 0..height {
        for x in 0..image.width {
            let p = pixel(image, x, y);
            classified += usize::from(near(p, CLASSIFIED_RGB, TOLERANCE));
            general += usize::from(near(p, GENERAL_RGB, TOLERANCE));
            white += usize::from(is_white(p));
        }
    }
    let total = (height as usize * image.width as usize).max(1) as f64;
    let below_row = height + 2;
    let below = if below_row < image.height && image.width > 0 {
        let n = (0..image.width).filter(|&x| {
            let p = pixel(image, x, below_row);
            near(p, CLASSIFIED_RGB, TOLERANCE) || near(p, GENERAL_RGB, TOLERANCE)
        });
        n.count() as f64 / image.width as f64
    } else {
        0.0
    };
    StripReading {
        height,
        classified: classified as f64 / total,
        general: general as f64 / total,
        white: white as f64 / total,
        below,
    }
}

/// The side whose label strip is on screen, or why none is.
pub fn strip_side(reading: &StripReading) -> Result<&'static str> {
    let side = if reading.classified >= STRIP_SHARE {
        "classified"
    } else if reading.general >= STRIP_SHARE {
        "general"
    } else {
        bail!(
            "no label strip: top {} rows {:.0}% red, {:.0}% green (need {:.0}%)",
            reading.height,
            reading.classified * 100.0,
            reading.general * 100.0,
            STRIP_SHARE * 100.0
        );
    };
    ensure!(
        reading.white >= LABEL_SHARE,
        "the {side} strip carries no white label text ({:.2}% white)",
        reading.white * 100.0
    );
    ensure!(
        reading.below <= BELOW_STRIP_SHARE,
        "the strip is taller than {} rows ({:.0}% of row {} is strip colour)",
        reading.height,
        reading.below * 100.0,
        reading.height + 2
    );
    Ok(side)
}

/// A rectangle on the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Rect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}+{}+{}", self.width, self.height, self.x, self.y)
    }
}

/// Everything below the strip.
pub fn guest_area(width: u32, height: u32) -> Rect {
    let strip = strip_height(height).min(height);
    Rect {
        x: 0,
        y: strip,
        width,
        height: height - strip,
    }
}

/// Where a `guest_width`×`guest_height` screen lands in `area`: scaled to
/// fit, aspect kept, centred. (The kiosk may round a pixel differently;
/// the checks keep a margin.)
pub fn fit(area: Rect, guest_width: u32, guest_height: u32) -> Rect {
    let (gw, gh) = (
        u64::from(guest_width.max(1)),
        u64::from(guest_height.max(1)),
    );
    let (aw, ah) = (u64::from(area.width), u64::from(area.height));
    let (w, h) = if aw * gh <= ah * gw {
        (aw, gh * aw / gw)
    } else {
        (gw * ah / gh, ah)
    };
    let (w, h) = (w as u32, h as u32);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// Share of the pixels of `area` within [`TOLERANCE`] of `colour`.
pub fn colour_share(image: &Image, area: Rect, colour: [u8; 3]) -> f64 {
    let mut hits = 0u64;
    let (x1, y1) = (
        (area.x + area.width).min(image.width),
        (area.y + area.height).min(image.height),
    );
    for y in area.y..y1 {
        for x in area.x..x1 {
            if near(pixel(image, x, y), colour, TOLERANCE) {
                hits += 1;
            }
        }
    }
    hits as f64 / (u64::from(area.width) * u64::from(area.height)).max(1) as f64
}

/// Mean colour of the block of side `2 * half` centred on (`cx`, `cy`).
pub fn mean_colour(image: &Image, cx: u32, cy: u32, half: u32) -> [u8; 3] {
    let (x0, x1) = (cx.saturating_sub(half), (cx + half).min(image.width));
    let (y0, y1) = (cy.saturating_sub(half), (cy + half).min(image.height));
    let mut sum = [0u64; 3];
    let mut n = 0u64;
    for y in y0..y1 {
        for x in x0..x1 {
            let p = pixel(image, x, y);
            for c in 0..3 {
                sum[c] += u64::from(p[c]);
            }
            n += 1;
        }
    }
    let n = n.max(1);
    [(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8]
}

fn hex(c: [u8; 3]) -> String {
    format!("{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Checks that the guest area shows a guest drawn in `colour`: its centre
/// always; with the guest's size, also near the corners of where it must
/// land ([`fit`]) and, where the aspects differ, black bands beside it.
pub fn check_guest_area(
    image: &Image,
    colour: [u8; 3],
    guest_size: Option<(u32, u32)>,
) -> Result<String> {
    let area = guest_area(image.width, image.height);
    ensure!(
        area.width > 2 * CENTRE_HALF && area.height > 2 * CENTRE_HALF,
        "screen {}x{} leaves no guest area",
        image.width,
        image.height
    );
    let centre = mean_colour(
        image,
        area.x + area.width / 2,
        area.y + area.height / 2,
        CENTRE_HALF,
    );
    if near(centre, NO_GUEST_RGB, 8) {
        bail!("the guest area shows no guest (grey {})", hex(centre));
    }
    ensure!(
        near(centre, colour, TOLERANCE),
        "the centre of the guest area is {}, not the guest's {}",
        hex(centre),
        hex(colour)
    );
    let Some((gw, gh)) = guest_size else {
        return Ok(format!("guest area {area} centre {}", hex(centre)));
    };
    let placed = fit(area, gw, gh);
    // Well inside the expected rectangle: rounding and scaling cannot reach.
    let (mx, my) = ((placed.width / 50).max(4), (placed.height / 50).max(4));
    ensure!(
        placed.width > 2 * mx && placed.height > 2 * my,
        "the guest's {gw}x{gh} screen would be {placed}: too small to check"
    );
    for (x, y) in [
        (placed.x + mx, placed.y + my),
        (placed.x + placed.width - 1 - mx, placed.y + my),
        (placed.x + mx, placed.y + placed.height - 1 - my),
        (
            placed.x + placed.width - 1 - mx,
            placed.y + placed.height - 1 - my,
        ),
    ] {
        let p = pixel(image, x, y);
        ensure!(
            near(p, colour, TOLERANCE),
            "pixel ({x}, {y}), inside where the {gw}x{gh} guest belongs ({placed}), is {} not {}",
            hex(p),
            hex(colour)
        );
    }
    // The bands beside (or above and below) the scaled guest: black.
    let mut bands = Vec::new();
    let left = placed.x - area.x;
    let top = placed.y - area.y;
    let cy = placed.y + placed.height / 2;
    let cx = placed.x + placed.width / 2;
    if left >= 8 {
        bands.push((area.x + left / 2, cy));
        bands.push((placed.x + placed.width + left / 2, cy));
    }
    if top >= 8 {
        bands.push((cx, area.y + top / 2));
        bands.push((cx, placed.y + placed.height + top / 2));
    }
    for &(x, y) in &bands {
        if x < image.width && y < image.height {
            let p = pixel(image, x, y);
            ensure!(
                near(p, [0, 0, 0], 16),
                "pixel ({x}, {y}), beside the scaled guest ({placed}), is {} not black",
                hex(p)
            );
        }
    }
    Ok(format!(
        "{gw}x{gh} guest at {placed}{}",
        if bands.is_empty() {
            String::new()
        } else {
            ", black beside it".into()
        }
    ))
}

/// What a screen must show: the side's strip and, if given, its guest's colour.
#[derive(Debug, Clone, Copy)]
struct Want {
    side: &'static str,
    colour: Option<[u8; 3]>,
    guest_size: Option<(u32, u32)>,
}

fn judge(image: &Image, want: &Want) -> Result<String> {
    let reading = read_strip(image);
    let side = strip_side(&reading)?;
    ensure!(
        side == want.side,
        "the {side} strip is on screen, not the {}",
        want.side
    );
    let share = if side == "classified" {
        reading.classified
    } else {
        reading.general
    };
    let strip = format!(
        "{}x{} screen, {side} strip {} rows ({:.0}% {}, {:.1}% white)",
        image.width,
        image.height,
        reading.height,
        share * 100.0,
        hex(strip_colour(side)),
        reading.white * 100.0
    );
    match want.colour {
        Some(colour) => Ok(format!(
            "{strip}; {}",
            check_guest_area(image, colour, want.guest_size)?
        )),
        None => Ok(strip),
    }
}

// ------------------------------------------------------------ the kiosk

/// The kiosk's main pid; 0 when it does not run.
fn main_pid(vm: &mut Vm) -> Result<u32> {
    let out = sh(vm, &format!("systemctl show -P MainPID {UNIT}"))?;
    out.trim()
        .parse()
        .with_context(|| format!("MainPID of {UNIT}: {out:?}"))
}

fn n_restarts(vm: &mut Vm) -> Result<u32> {
    let out = sh(vm, &format!("systemctl show -P NRestarts {UNIT}"))?;
    out.trim()
        .parse()
        .with_context(|| format!("NRestarts of {UNIT}: {out:?}"))
}

/// Waits until the unit is active with a main pid; the pid.
fn wait_for_kiosk(vm: &mut Vm, timeout: Duration) -> Result<u32> {
    let start = Instant::now();
    loop {
        let state = sh(vm, &format!("systemctl is-active {UNIT} || true"))?;
        let pid = main_pid(vm)?;
        if state.trim() == "active" && pid != 0 {
            return Ok(pid);
        }
        if start.elapsed() >= timeout {
            let status = sh(vm, &format!("systemctl status --no-pager {UNIT} 2>&1 | head -n 15; journalctl -b -u {UNIT} -o cat --no-pager | tail -n 15")).unwrap_or_default();
            bail!(
                "{UNIT} is {} (MainPID {pid}) after {timeout:?}:\n{status}",
                state.trim()
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// The sides named by the kiosk's `showing` lines this boot, oldest first.
fn showing(vm: &mut Vm) -> Result<Vec<String>> {
    let out = sh(
        vm,
        &format!("journalctl -b -u {UNIT} -o cat --no-pager | grep -F '{SHOWING}' || true"),
    )?;
    Ok(showing_sides(&out))
}

/// The side after each `airlock-kiosk: showing ` in `log`.
pub fn showing_sides(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once(SHOWING))
        .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// Presses the switch key on the outer VM's keyboard.
fn press_switch(vm: &mut Vm) -> Result<()> {
    vm.qmp()?
        .send_key(&[SWITCH_KEY])
        .context("pressing the switch key")
}

/// Makes sure `side` is on screen (pressing the switch key if the other
/// side is); the screendump's path and what it showed. Not right after a
/// switch key press: the screen may not show that switch yet.
fn ensure_side(
    vm: &mut Vm,
    screens: &Screens,
    side: &'static str,
    name: &str,
) -> Result<(PathBuf, String)> {
    let want = Want {
        side,
        colour: None,
        guest_size: None,
    };
    let (_, image) = screens.take(vm, name)?;
    if strip_side(&read_strip(&image)).is_ok_and(|s| s == other(side)) {
        press_switch(vm)?;
    }
    let (path, said, _) = screens.wait(vm, name, SCREEN_TIMEOUT, |i| judge(i, &want))?;
    Ok((path, said))
}

/// `draw <pattern>` in the side's guest; the guest's screen size.
fn draw(vm: &mut Vm, side: &str, pattern: &str) -> Result<(u32, u32)> {
    let reply = guest(vm, side, &format!("draw {pattern}"))?;
    parse_drew(&reply)
        .with_context(|| format!("the {side} guest answered `draw {pattern}` with {reply:?}"))
}

/// `ok drew solid 0000ff 1024x768` → (1024, 768).
pub fn parse_drew(reply: &str) -> Result<(u32, u32)> {
    ensure!(reply.starts_with("ok drew "), "not an `ok drew` reply");
    let size = reply.split_whitespace().last().context("empty reply")?;
    let (w, h) = size.split_once('x').context("no WxH at the end")?;
    Ok((w.parse()?, h.parse()?))
}

// ---------------------------------------------------------------- keys

/// `ok keys 30:1 30:0` → [(30, 1), (30, 0)]; `ok keys` → [].
pub fn parse_keys(reply: &str) -> Result<Vec<(u16, u8)>> {
    let rest = reply
        .strip_prefix("ok keys")
        .with_context(|| format!("not an `ok keys` reply: {reply:?}"))?;
    ensure!(
        rest.is_empty() || rest.starts_with(' '),
        "not an `ok keys` reply: {reply:?}"
    );
    rest.split_whitespace()
        .map(|w| {
            let (code, value) = w
                .split_once(':')
                .with_context(|| format!("key event {w:?} is not code:value"))?;
            Ok((code.parse()?, value.parse()?))
        })
        .collect()
}

pub fn format_keys(keys: &[(u16, u8)]) -> String {
    if keys.is_empty() {
        return "nothing".into();
    }
    keys.iter()
        .map(|(c, v)| format!("{c}:{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn keys(vm: &mut Vm, side: &str) -> Result<Vec<(u16, u8)>> {
    let reply = guest(vm, side, "keys")?;
    parse_keys(&reply).with_context(|| {
        format!("the {side} test guest's `keys` (does it have the kiosk-keys commands?)")
    })
}

fn keys_clear(vm: &mut Vm, side: &str) -> Result<()> {
    let reply = guest(vm, side, "keys-clear")?;
    ensure!(reply == "ok keys-clear", "the {side} test guest answered `keys-clear` with {reply:?} (does it have the kiosk-keys commands?)");
    Ok(())
}

/// Types one key on the outer VM's keyboard (pressed, held 100 ms, released).
fn type_key(vm: &mut Vm, qcode: &str) -> Result<()> {
    vm.qmp()?
        .send_key(&[qcode])
        .with_context(|| format!("typing {qcode}"))
}

/// Waits until the side's guest has received exactly `want`; how long it
/// took. Fails at once on anything that is not on the way to `want`.
fn wait_keys(vm: &mut Vm, side: &str, want: &[(u16, u8)]) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let got = keys(vm, side)?;
        if got == want {
            return Ok(start.elapsed());
        }
        ensure!(
            want.starts_with(&got),
            "the {side} guest received {}, expected {}",
            format_keys(&got),
            format_keys(want)
        );
        ensure!(
            start.elapsed() < KEYS_TIMEOUT,
            "after {KEYS_TIMEOUT:?} the {side} guest has received {}, expected {}",
            format_keys(&got),
            format_keys(want)
        );
        thread::sleep(Duration::from_millis(300));
    }
}

fn press_release(code: u16) -> [(u16, u8); 2] {
    [(code, 1), (code, 0)]
}

// ------------------------------------------------------------- /proc

/// `find … -printf '%h %l\n'` over `/proc/*/fd`: `/proc/<pid>/fd <target>`
/// lines → (pid, target).
pub fn parse_holders(out: &str) -> Vec<(u32, String)> {
    out.lines()
        .filter_map(|l| {
            let (dir, target) = l.split_once(' ')?;
            let pid = dir
                .strip_prefix("/proc/")?
                .strip_suffix("/fd")?
                .parse()
                .ok()?;
            Some((pid, target.trim().to_string()))
        })
        .collect()
}

/// utime + stime (clock ticks) from a `/proc/PID/stat` line. The command
/// name (field 2) may hold spaces and parentheses: fields are counted
/// after its last `)`, where field 3 (state) comes first.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The monotonic time of a `journalctl -o short-monotonic` line:
/// `[   23.456789] host unit[1]: text` → 23.456789.
pub fn monotonic_seconds(line: &str) -> Option<f64> {
    let inner = line.trim_start().strip_prefix('[')?.split_once(']')?.0;
    inner.trim().parse().ok()
}

// --------------------------------------------------------------- tests

fn check_process(vm: &mut Vm) -> Result<String> {
    let pid = main_pid(vm)?;
    ensure!(pid != 0, "{UNIT} has no main process");
    let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
    ensure!(
        context.contains(&format!(":{DOMAIN}:")),
        "the kiosk (pid {pid}) runs as {:?}",
        context.trim()
    );
    let exe = sh(vm, &format!("readlink /proc/{pid}/exe"))?;
    ensure!(
        exe.trim() == EXECUTABLE,
        "the kiosk's main process (pid {pid}) is {}, not {EXECUTABLE}",
        exe.trim()
    );
    let uid: u32 = sh(vm, &format!("id -u {USER}"))?
        .trim()
        .parse()
        .context("uid of the kiosk's user")?;
    let status = sh(vm, &format!("cat /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let uids = field("Uid:");
    ensure!(
        uids.split(' ').all(|u| u == uid.to_string()) && uids.split(' ').count() == 4,
        "the kiosk's uids (real, effective, saved, fs) are {uids:?}, not all {uid} ({USER})"
    );
    // Every process's open files, by where the link points: the shell and
    // `find` doing the scan hold no display device, so they cannot match.
    let out = sh(vm, "find /proc/[0-9]*/fd -mindepth 1 -maxdepth 1 \\( -lname '/dev/dri/*' -o -lname '/dev/fb*' \\) -printf '%h %l\\n' 2>/dev/null || true")?;
    let holders = parse_holders(&out);
    let own: Vec<&str> = holders
        .iter()
        .filter(|(p, _)| *p == pid)
        .map(|(_, t)| t.as_str())
        .collect();
    ensure!(
        own.iter().any(|t| t.starts_with("/dev/dri/card")),
        "the kiosk (pid {pid}) has no /dev/dri/card* open; open display devices: {holders:?}"
    );
    let others: Vec<String> = holders
        .iter()
        .filter(|(p, _)| *p != pid)
        .map(|(p, t)| {
            let comm =
                sh(vm, &format!("cat /proc/{p}/comm 2>/dev/null || true")).unwrap_or_default();
            format!("pid {p} ({}) {t}", comm.trim())
        })
        .collect();
    ensure!(
        others.is_empty(),
        "other processes hold display devices open: {others:?}"
    );
    let mut own_sorted = own.clone();
    own_sorted.sort_unstable();
    own_sorted.dedup();
    let restarts = n_restarts(vm)?;
    Ok(format!(
        "pid {pid} {exe} {}, Uid {uids} ({USER}), Groups {}; display devices open: {} by the kiosk, none by any other process; {UNIT} NRestarts={restarts}",
        context.trim(),
        field("Groups:"),
        own_sorted.join(" "),
        exe = exe.trim()
    ))
}

fn check_screens(vm: &mut Vm, screens: &Screens) -> Result<String> {
    let classified_size = draw(vm, "classified", CLASSIFIED_PATTERN)?;
    let general_size = draw(vm, "general", GENERAL_PATTERN)?;
    let classified = Want {
        side: "classified",
        colour: Some(CLASSIFIED_COLOUR),
        guest_size: Some(classified_size),
    };
    let general = Want {
        side: "general",
        colour: Some(GENERAL_COLOUR),
        guest_size: Some(general_size),
    };
    // The classified side is shown first: no key is pressed before it shows.
    let (first, first_said, first_took) =
        screens.wait(vm, "kiosk-classified", FIRST_SCREEN_TIMEOUT, |i| {
            judge(i, &classified)
        })?;
    let logged = showing(vm)?;
    ensure!(
        logged.first().is_some_and(|s| s == "classified"),
        "the kiosk's first `{SHOWING}` line of this boot names {:?}, not classified",
        logged.first()
    );
    press_switch(vm)?;
    let (second, second_said, to_general) =
        screens.wait(vm, "kiosk-general", SCREEN_TIMEOUT, |i| judge(i, &general))?;
    press_switch(vm)?;
    let (third, _, to_classified) =
        screens.wait(vm, "kiosk-classified-again", SCREEN_TIMEOUT, |i| {
            judge(i, &classified)
        })?;
    // Each switch logged, in order.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = showing(vm)?;
    while now.len() < logged.len() + 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        now = showing(vm)?;
    }
    ensure!(
        now.get(logged.len()..) == Some(&["general".to_string(), "classified".to_string()][..]),
        "after two switches the kiosk logged {:?} (before: {logged:?}); expected `{SHOWING}general`, then `{SHOWING}classified`",
        now
    );
    Ok(format!(
        "classified: {first_said} (seen after {:.1}s); switch key → general in {:.1}s: {second_said}; again → classified in {:.1}s; journal: {} `showing` lines; screendumps {} {} {}",
        first_took.as_secs_f64(),
        to_general.as_secs_f64(),
        to_classified.as_secs_f64(),
        now.len(),
        first.display(),
        second.display(),
        third.display()
    ))
}

fn check_key_routing(vm: &mut Vm, screens: &Screens) -> Result<String> {
    ensure_side(vm, screens, "classified", "kiosk-keys-classified")?;
    for side in ["classified", "general"] {
        keys_clear(vm, side)?;
    }
    let ab: Vec<(u16, u8)> = press_release(KEY_A)
        .into_iter()
        .chain(press_release(KEY_B))
        .collect();
    let c: Vec<(u16, u8)> = press_release(KEY_C).to_vec();
    type_key(vm, "a")?;
    type_key(vm, "b")?;
    let ab_took = wait_keys(vm, "classified", &ab)?;
    thread::sleep(SETTLE);
    let general = keys(vm, "general")?;
    ensure!(
        general.is_empty(),
        "the general guest, not on screen, received {}",
        format_keys(&general)
    );
    press_switch(vm)?;
    let (path, _, _) = screens.wait(vm, "kiosk-keys-general", SCREEN_TIMEOUT, |i| {
        judge(
            i,
            &Want {
                side: "general",
                colour: None,
                guest_size: None,
            },
        )
    })?;
    type_key(vm, "c")?;
    let c_took = wait_keys(vm, "general", &c)?;
    thread::sleep(SETTLE);
    let classified = keys(vm, "classified")?;
    ensure!(
        classified == ab,
        "the classified guest, no longer on screen, now has {} (had {})",
        format_keys(&classified),
        format_keys(&ab)
    );
    // Back to classified; the switch key's press and release go nowhere.
    press_switch(vm)?;
    screens.wait(vm, "kiosk-keys-classified-again", SCREEN_TIMEOUT, |i| {
        judge(
            i,
            &Want {
                side: "classified",
                colour: None,
                guest_size: None,
            },
        )
    })?;
    thread::sleep(SETTLE);
    let classified = keys(vm, "classified")?;
    let general = keys(vm, "general")?;
    for (side, got) in [("classified", &classified), ("general", &general)] {
        ensure!(
            !got.iter().any(|(code, _)| *code == KEY_SCROLLLOCK),
            "the {side} guest received the switch key: {}",
            format_keys(got)
        );
    }
    ensure!(
        classified == ab,
        "classified received {} in all, expected {}",
        format_keys(&classified),
        format_keys(&ab)
    );
    ensure!(
        general == c,
        "general received {} in all, expected {}",
        format_keys(&general),
        format_keys(&c)
    );
    Ok(format!(
        "classified on screen: a b → classified got {} in {:.1}s, general nothing; switch key, general on screen ({}): c → general got {} in {:.1}s, classified nothing new; two switches: key {KEY_SCROLLLOCK} reached neither guest",
        format_keys(&ab),
        ab_took.as_secs_f64(),
        path.display(),
        format_keys(&c),
        c_took.as_secs_f64()
    ))
}

/// evdev `BTN_LEFT`, as the nested guests' tablets report a click.
const BTN_LEFT: u16 = 0x110;

/// One left click on the outer VM's mouse (PS/2), after a small move.
fn click(vm: &mut Vm) -> Result<()> {
    let event =
        |kind: &str, data: serde_json::Value| serde_json::json!({ "type": kind, "data": data });
    let qmp = vm.qmp()?;
    qmp.execute("input-send-event", Some(serde_json::json!({ "events": [event("rel", serde_json::json!({ "axis": "x", "value": 8 }))] })))?;
    qmp.execute("input-send-event", Some(serde_json::json!({ "events": [event("btn", serde_json::json!({ "down": true, "button": "left" }))] })))?;
    qmp.execute("input-send-event", Some(serde_json::json!({ "events": [event("btn", serde_json::json!({ "down": false, "button": "left" }))] })))?;
    Ok(())
}

/// The mouse follows the screen like the keyboard: a click lands in the
/// guest on screen (its tablet reports BTN_LEFT), never in the other.
fn check_pointer_routing(vm: &mut Vm, screens: &Screens) -> Result<String> {
    ensure_side(vm, screens, "classified", "kiosk-pointer-classified")?;
    for side in ["classified", "general"] {
        keys_clear(vm, side)?;
    }
    let one_click: Vec<(u16, u8)> = press_release(BTN_LEFT).to_vec();
    click(vm)?;
    let classified_took = wait_keys(vm, "classified", &one_click)?;
    thread::sleep(SETTLE);
    let general = keys(vm, "general")?;
    ensure!(
        general.is_empty(),
        "the general guest, not on screen, received {}",
        format_keys(&general)
    );
    press_switch(vm)?;
    screens.wait(vm, "kiosk-pointer-general", SCREEN_TIMEOUT, |i| {
        judge(
            i,
            &Want {
                side: "general",
                colour: None,
                guest_size: None,
            },
        )
    })?;
    click(vm)?;
    let general_took = wait_keys(vm, "general", &one_click)?;
    thread::sleep(SETTLE);
    let classified = keys(vm, "classified")?;
    ensure!(
        classified == one_click,
        "the classified guest, no longer on screen, now has {}",
        format_keys(&classified)
    );
    press_switch(vm)?;
    screens.wait(vm, "kiosk-pointer-classified-again", SCREEN_TIMEOUT, |i| {
        judge(
            i,
            &Want {
                side: "classified",
                colour: None,
                guest_size: None,
            },
        )
    })?;
    Ok(format!(
        "click with classified on screen → classified got {} in {:.1}s, general nothing; after the switch → general got it in {:.1}s, classified nothing new",
        format_keys(&one_click),
        classified_took.as_secs_f64(),
        general_took.as_secs_f64()
    ))
}

/// Key combinations a user could try to reach a host console, each pressed
/// together and released. The kiosk forwards every key but the switch key
/// to the guest on screen, so these also reach the nested classified test
/// guest, whose Debian kernel has some SysRq functions on by default: only
/// SysRq functions harmless to it are sent (-h help, -s sync, -r unraw).
/// -b/-o/-c (reboot, power off, crash), -k (SAK), -u (remount), -e/-i
/// (signal all) would end or disturb the test guest that later tests use;
/// with `kernel.sysrq = 0` on the host (`boot: Magic SysRq is off`) and
/// the keyboard grabbed, any of them shows the same thing here, and
/// `production: Ctrl-Alt-F1..F6 and SysRq show no console` sends -b to a
/// host of its own.
fn console_combinations() -> Vec<Vec<String>> {
    let mut combos: Vec<Vec<String>> = Vec::new();
    let keys = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    for n in 1..=12 {
        combos.push(keys(&["ctrl", "alt", &format!("f{n}")]));
    }
    // Alt-Fn and Alt-arrows also switch VTs in Linux's default keymap;
    // Ctrl-Alt-1..9 switch consoles in QEMU's VNC server (the kiosk's way
    // into each guest's display).
    for n in 1..=12 {
        combos.push(keys(&["alt", &format!("f{n}")]));
    }
    combos.push(keys(&["alt", "left"]));
    combos.push(keys(&["alt", "right"]));
    for n in 1..=9 {
        combos.push(keys(&["ctrl", "alt", &n.to_string()]));
    }
    combos.push(keys(&["ctrl", "alt", "backspace"]));
    combos.push(keys(&["sysrq"]));
    for k in ["h", "s", "r"] {
        combos.push(keys(&["alt", "sysrq", k]));
    }
    combos
}

/// Processes that would mean a console: the same names as
/// `boot: no getty, login or shell process runs`.
const CONSOLE_PROCESSES: &[&str] = &["agetty", "getty", "login", "sulogin", "bash"];

fn console_processes(vm: &mut Vm) -> Result<Vec<String>> {
    let comms = sh(vm, "cat /proc/[0-9]*/comm 2>/dev/null || true")?;
    Ok(comms
        .lines()
        .map(str::trim)
        .filter(|c| CONSOLE_PROCESSES.contains(c))
        .map(str::to_string)
        .collect())
}

fn resets(vm: &mut Vm) -> Result<usize> {
    Ok(vm
        .qmp()?
        .poll_events()?
        .iter()
        .filter(|e| e.name == "RESET" || e.name == "SHUTDOWN")
        .count())
}

fn check_console_keys(vm: &mut Vm, screens: &Screens) -> Result<String> {
    let size = draw(vm, "classified", CLASSIFIED_PATTERN)?;
    ensure_side(vm, screens, "classified", "kiosk-before-console-keys")?;
    let want = Want {
        side: "classified",
        colour: Some(CLASSIFIED_COLOUR),
        guest_size: Some(size),
    };
    let (before_path, _, _) =
        screens.wait(vm, "kiosk-before-console-keys", SCREEN_TIMEOUT, |i| {
            judge(i, &want)
        })?;
    let before_image = load_image(&before_path)?;
    let pid = main_pid(vm)?;
    let restarts = n_restarts(vm)?;
    let logged = showing(vm)?.len();
    let vt = sh(vm, "cat /sys/class/tty/tty0/active")?;
    let resets_before = resets(vm)?;
    let combos = console_combinations();
    for combo in &combos {
        let keys: Vec<&str> = combo.iter().map(String::as_str).collect();
        vm.qmp()?
            .send_key(&keys)
            .with_context(|| format!("sending {}", combo.join("-")))?;
        thread::sleep(Duration::from_millis(400));
    }
    thread::sleep(Duration::from_secs(3));
    // The kiosk first, as the keys left it.
    let strip_only = Want {
        side: "classified",
        colour: None,
        guest_size: None,
    };
    let (after_path, _, _) = screens
        .wait(vm, "kiosk-after-console-keys", SCREEN_TIMEOUT, |i| {
            judge(i, &strip_only)
        })
        .context("after the key combinations")?;
    // Then the guest's picture through it: redrawn, in case a combination
    // changed what the test guest itself shows (its own VT), so that only
    // the kiosk's way to the guest's display is judged (Ctrl-Alt-N would
    // switch QEMU's VNC server to another console, if the guest's QEMU had one).
    draw(vm, "classified", CLASSIFIED_PATTERN)?;
    let (redrawn_path, said, _) = screens
        .wait(
            vm,
            "kiosk-after-console-keys-redrawn",
            SCREEN_TIMEOUT,
            |i| judge(i, &want),
        )
        .context("the guest on screen after the key combinations")?;
    let after_image = load_image(&after_path)?;
    let pid_after = main_pid(vm)?;
    ensure!(
        pid_after == pid,
        "the kiosk's main pid changed from {pid} to {pid_after}"
    );
    let restarts_after = n_restarts(vm)?;
    ensure!(
        restarts_after == restarts,
        "{UNIT} restarted ({restarts} → {restarts_after} restarts)"
    );
    ensure!(
        resets(vm)? == resets_before,
        "the outer VM reset or shut down"
    );
    let vt_after = sh(vm, "cat /sys/class/tty/tty0/active")?;
    ensure!(
        vt_after.trim() == vt.trim(),
        "the active VT changed from {} to {}",
        vt.trim(),
        vt_after.trim()
    );
    let consoles = console_processes(vm)?;
    ensure!(
        consoles.is_empty(),
        "console processes appeared: {consoles:?}"
    );
    let logged_after = showing(vm)?.len();
    ensure!(logged_after == logged, "the kiosk's `showing` lines went from {logged} to {logged_after} during the key combinations");
    let changed = differing_pixels(&before_image, &after_image)
        .map_or("a different size".to_string(), |n| format!("{n} pixels"));
    Ok(format!(
        "{} combinations sent; classified strip still on screen, kiosk pid {pid} unchanged, no restart, no reset, active VT {} unchanged, no getty/login; guest redrawn: {said}; screen before → after the keys differs by {changed} ({} → {}; {})",
        combos.len(),
        vt.trim(),
        before_path.display(),
        after_path.display(),
        redrawn_path.display()
    ))
}

fn figures(vm: &mut Vm) -> Result<String> {
    let pid = main_pid(vm)?;
    ensure!(pid != 0, "{UNIT} has no main process");
    let sample = |vm: &mut Vm| -> Result<(f64, u64)> {
        let out = sh(
            vm,
            &format!("cut -d' ' -f1 /proc/uptime; cat /proc/{pid}/stat"),
        )?;
        let (uptime, stat) = out
            .split_once('\n')
            .with_context(|| format!("unexpected output {out:?}"))?;
        let uptime: f64 = uptime
            .trim()
            .parse()
            .with_context(|| format!("/proc/uptime: {uptime:?}"))?;
        let ticks = cpu_ticks(stat).with_context(|| format!("/proc/{pid}/stat: {stat:?}"))?;
        Ok((uptime, ticks))
    };
    let hz: f64 = sh(vm, "getconf CLK_TCK")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    let (t0, c0) = sample(vm)?;
    thread::sleep(Duration::from_secs(IDLE_SECONDS));
    let (t1, c1) = sample(vm)?;
    let cpu = (c1.saturating_sub(c0)) as f64 / hz / (t1 - t0).max(0.001) * 100.0;
    // Busy: the guest on screen redraws its whole screen as fast as the
    // test port lets it, alternating two colours, for the same time.
    let redraws = format!(
        "end=$(( $(date +%s) + {IDLE_SECONDS} )); n=0; while [ $(date +%s) -lt $end ]; do \
         if [ $((n % 2)) = 0 ]; then c=ff0000; else c=00ff00; fi; \
         {CTL} /run/airlock/classified/test.sock draw solid $c >/dev/null || exit 1; n=$((n + 1)); done; echo $n"
    );
    let (b0, d0) = sample(vm)?;
    let frames: u32 = sh(vm, &redraws)?
        .trim()
        .parse()
        .context("counting the guest's redraws")?;
    let (b1, d1) = sample(vm)?;
    let busy = (d1.saturating_sub(d0)) as f64 / hz / (b1 - b0).max(0.001) * 100.0;
    draw(vm, "classified", CLASSIFIED_PATTERN)?;
    let rss = sh(
        vm,
        &format!("grep VmRSS /proc/{pid}/status | tr -s ' \\t' ' '"),
    )?;
    let virt = sh(vm, "systemd-detect-virt || true")?;
    let accel = if virt.trim() == "qemu" {
        "outer VM under TCG"
    } else {
        "outer VM accelerated"
    };
    let first = sh(vm, &format!("journalctl -b -u {UNIT} -o short-monotonic --no-pager | grep -m1 -F '{SHOWING}' || true"))?;
    let first_frame = match monotonic_seconds(&first) {
        Some(s) => format!("first `showing` line (first frame) {s:.1}s after the kernel started"),
        None => format!("no `{SHOWING}` line in this boot's journal"),
    };
    let picture = sh(vm, &format!("journalctl -b -u {UNIT} -o short-monotonic --no-pager | grep -m1 -F 'classified display: first picture' || true"))?;
    let first_frame = match monotonic_seconds(&picture) {
        Some(s) => format!(
            "{first_frame}; the classified guest's first picture {s:.1}s after the kernel started"
        ),
        None => format!("{first_frame}; no first-picture line for the classified guest"),
    };
    let restarts = n_restarts(vm)?;
    Ok(format!(
        "idle (no input, static guest screens): {cpu:.1}% of one CPU over {:.1}s; guest on screen redrawing ({frames} full-screen redraws in {:.1}s): {busy:.1}% ({accel}, systemd-detect-virt: {}); {}; {first_frame}; NRestarts={restarts}",
        t1 - t0,
        b1 - b0,
        virt.trim(),
        rss.trim()
    ))
}

fn check_restart(vm: &mut Vm, screens: &Screens) -> Result<String> {
    let size = draw(vm, "classified", CLASSIFIED_PATTERN)?;
    let old = main_pid(vm)?;
    ensure!(old != 0, "{UNIT} has no main process");
    let restarts = n_restarts(vm)?;
    let strip_only = Want {
        side: "classified",
        colour: None,
        guest_size: None,
    };
    let start = Instant::now();
    sh(vm, &format!("kill -9 {old}"))?;
    let mut gone: Option<PathBuf> = None;
    // A few screendumps while no new kiosk shows (each slows the loop).
    let mut looks_between = 0;
    let mut last = String::new();
    let (took, pid) = loop {
        let elapsed = start.elapsed();
        ensure!(
            elapsed < RESTART_TIMEOUT,
            "no new kiosk on screen {RESTART_TIMEOUT:?} after kill -9 {old}: {last}"
        );
        // One round trip: the main pid, the unit's state, and whether that
        // process has logged its first `showing classified`.
        let out = sh(
            vm,
            &format!(
                "p=$(systemctl show -P MainPID {UNIT}); s=$(systemctl is-active {UNIT}); n=$(journalctl -b _PID=$p -o cat --no-pager 2>/dev/null | grep -c -F '{SHOWING}classified'); echo \"$p $s $n\""
            ),
        )?;
        let fields: Vec<&str> = out.split_whitespace().collect();
        let pid: u32 = fields.first().and_then(|p| p.parse().ok()).unwrap_or(0);
        let active = fields.get(1) == Some(&"active");
        let logged = fields
            .get(2)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
            > 0;
        if pid != 0 && pid != old && active && logged {
            let (path, image) = screens.take(vm, "kiosk-restart")?;
            match judge(&image, &strip_only) {
                Ok(_) => break (start.elapsed(), pid),
                Err(e) => {
                    last = format!(
                        "new pid {pid} logged `showing classified`, but the screen: {e:#} ({})",
                        path.display()
                    )
                }
            }
        } else {
            last = format!(
                "MainPID {pid}, {}, `showing classified` logged by it: {logged}",
                fields.get(1).unwrap_or(&"?")
            );
            if gone.is_none() && pid != old && looks_between < 3 {
                looks_between += 1;
                // While no kiosk runs: keep what the screen shows then.
                let (path, image) = screens.take(vm, "kiosk-while-restarting")?;
                if strip_side(&read_strip(&image)).is_err() {
                    gone = Some(path);
                }
            }
        }
        thread::sleep(Duration::from_millis(200));
    };
    ensure!(took <= RESTART_BOUND, "the new kiosk (pid {pid}) showed the classified strip {:.1}s after kill -9, over the {RESTART_BOUND:?} bound", took.as_secs_f64());
    let restarts_after = n_restarts(vm)?;
    ensure!(
        restarts_after > restarts,
        "NRestarts {restarts} → {restarts_after}: systemd did not count a restart"
    );
    // The guest comes back too (the new kiosk reconnects to its display).
    let want = Want {
        side: "classified",
        colour: Some(CLASSIFIED_COLOUR),
        guest_size: Some(size),
    };
    let (path, said, guest_took) = screens
        .wait(vm, "kiosk-restarted", SCREEN_TIMEOUT, |i| judge(i, &want))
        .context("the classified guest after the restart")?;
    let between = match gone {
        Some(p) => format!("screen without strip while no kiosk ran: {}", p.display()),
        None => "no screendump caught the screen without the strip".into(),
    };
    Ok(format!(
        "kill -9 {old} → new pid {pid} active, `showing classified` logged and the classified strip on screen after {:.1}s (bound {RESTART_BOUND:?}, RestartSec=1s included); guest on screen {:.1}s later: {said}; NRestarts {restarts} → {restarts_after}; {between}; {}",
        took.as_secs_f64(),
        guest_took.as_secs_f64(),
        path.display()
    ))
}

/// The general guest's provisioned disk (`ci/test-agent/machine.toml`).
const GENERAL_DISK: &str = "/var/lib/airlock/general/disk/test.raw";
/// How long the supervisor may take to notice the missing disk (restart
/// back-off after the kill) and to start the guest once it is back (it
/// looks every 10 s).
const NO_DISK_TIMEOUT: Duration = Duration::from_secs(90);

/// The general guest's state word from `airlockd status`.
fn general_state(vm: &mut Vm) -> Result<String> {
    let status = sh(vm, "airlockd status")?;
    let json: serde_json::Value = serde_json::from_str(status.trim())
        .with_context(|| format!("airlockd status: {status}"))?;
    Ok(json["guests"]["general"]["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned())
}

fn wait_general_state(vm: &mut Vm, want: &str) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let state = general_state(vm)?;
        if state == want {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < NO_DISK_TIMEOUT,
            "the general guest is {state:?} after {NO_DISK_TIMEOUT:?}, not {want:?}"
        );
        thread::sleep(Duration::from_secs(1));
    }
}

/// The general guest's disk moved away and its QEMU killed (as if the
/// disk had been lost): the supervisor does not start QEMU without it and
/// the kiosk shows the message for IT in the general guest's place. The
/// disk is put back in any case, and the guest must run again.
fn check_no_disk(vm: &mut Vm, screens: &Screens) -> Result<String> {
    let away = format!("{GENERAL_DISK}.away");
    let pid = super::supervisor::qemu_pid(vm, "general")?;
    sh(vm, &format!("mv {GENERAL_DISK} {away} && kill -9 {pid}"))?;
    let shown = (|| -> Result<String> {
        let noticed = wait_general_state(vm, "no-disk")?;
        let line =
            format!("airlock-kiosk: message for IT: general: no guest disk at {GENERAL_DISK}");
        let start = Instant::now();
        while !sh(
            vm,
            "journalctl -b -u airlock-kiosk.service -o cat --no-pager || true",
        )?
        .contains(&line)
        {
            ensure!(
                start.elapsed() < SCREEN_TIMEOUT,
                "the kiosk did not log {line:?}"
            );
            thread::sleep(Duration::from_secs(1));
        }
        ensure_side(vm, screens, "general", "no-disk-switch")?;
        let (path, said, _) = screens.wait(vm, "no-disk-message", SCREEN_TIMEOUT, |image| {
            judge(
                image,
                &Want {
                    side: "general",
                    colour: None,
                    guest_size: None,
                },
            )?;
            let share = colour_share(image, guest_area(image.width, image.height), MESSAGE_RGB);
            ensure!(
                share >= MESSAGE_SHARE,
                "the message colour fills {:.0}% of the guest area",
                share * 100.0
            );
            Ok(format!(
                "message box {:.0}% of the guest area",
                share * 100.0
            ))
        })?;
        Ok(format!(
            "`no-disk` {:.0}s after kill -9 {pid}; logged `{line}`; general strip, {said} ({})",
            noticed.as_secs_f64(),
            path.display()
        ))
    })();
    // Back in any case: later groups need the guest.
    sh(
        vm,
        &format!("test -e {GENERAL_DISK} || mv {away} {GENERAL_DISK}"),
    )?;
    let shown = shown?;
    let back = wait_general_state(vm, "running").context("after the disk was put back")?;
    let start = Instant::now();
    while guest(vm, "general", "ping").is_err() {
        ensure!(
            start.elapsed() < NO_DISK_TIMEOUT,
            "the general guest does not answer {NO_DISK_TIMEOUT:?} after running again"
        );
        thread::sleep(Duration::from_secs(2));
    }
    ensure_side(vm, screens, "classified", "no-disk-back")?;
    Ok(format!(
        "{shown}; disk back: running again {:.0}s later, answering after {:.0}s more",
        back.as_secs_f64(),
        start.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A screen as the kiosk draws it: the strip in `strip` with a white
    /// "label" block, black below, and a `guest`-sized screen of `colour`
    /// fitted into the area (or the no-guest grey if `colour` is None).
    fn screen(
        width: u32,
        height: u32,
        strip: [u8; 3],
        guest: (u32, u32),
        colour: Option<[u8; 3]>,
    ) -> Image {
        let sh = strip_height(height);
        let area = guest_area(width, height);
        let placed = fit(area, guest.0, guest.1);
        let mut rgba = Vec::with_capacity((width * height * 4) as usize);
        for y in 0..height {
            for x in 0..width {
                let p = if y < sh {
                    let text = (10..90).contains(&x) && (sh / 4..sh * 3 / 4).contains(&y);
                    if text {
                        [255, 255, 255]
                    } else {
                        strip
                    }
                } else {
                    match colour {
                        None => NO_GUEST_RGB,
                        Some(c)
                            if x >= placed.x
                                && x < placed.x + placed.width
                                && y >= placed.y
                                && y < placed.y + placed.height =>
                        {
                            c
                        }
                        Some(_) => [0, 0, 0],
                    }
                };
                rgba.extend_from_slice(&[p[0], p[1], p[2], 255]);
            }
        }
        Image {
            width,
            height,
            rgba,
        }
    }

    #[test]
    fn mirrored_layout_matches_the_kiosk() {
        assert_eq!(CLASSIFIED_RGB, airlock_kiosk::layout::CLASSIFIED_RGB);
        assert_eq!(GENERAL_RGB, airlock_kiosk::layout::GENERAL_RGB);
        assert_eq!(NO_GUEST_RGB, airlock_kiosk::layout::NO_GUEST_RGB);
        assert_eq!(MESSAGE_RGB, airlock_kiosk::layout::MESSAGE_RGB);
        for h in [0, 200, 384, 600, 720, 768, 800, 1080, 1200, 2160] {
            assert_eq!(
                strip_height(h),
                airlock_kiosk::layout::strip_height(h),
                "height {h}"
            );
        }
    }

    #[test]
    fn strips_are_told_apart() {
        let red = screen(
            1024,
            768,
            CLASSIFIED_RGB,
            (1024, 768),
            Some(CLASSIFIED_COLOUR),
        );
        let green = screen(1280, 800, GENERAL_RGB, (1024, 768), Some(GENERAL_COLOUR));
        assert_eq!(strip_side(&read_strip(&red)).unwrap(), "classified");
        assert_eq!(strip_side(&read_strip(&green)).unwrap(), "general");
        let reading = read_strip(&red);
        assert_eq!(reading.height, 48);
        assert!(
            reading.classified > 0.9
                && reading.general == 0.0
                && reading.white > 0.0
                && reading.below == 0.0,
            "{reading:?}"
        );
    }

    #[test]
    fn no_strip_on_a_console_or_a_blank_screen() {
        // A text console: black with white text, or all black.
        let console = screen(1024, 768, [0, 0, 0], (1024, 768), None);
        let err = strip_side(&read_strip(&console)).unwrap_err().to_string();
        assert!(err.contains("no label strip"), "{err}");
        let blank = Image {
            width: 640,
            height: 480,
            rgba: vec![0; 640 * 480 * 4],
        };
        assert!(strip_side(&read_strip(&blank)).is_err());
        // The strip colour without any label text is not the kiosk's strip.
        let mut unlabelled = screen(800, 600, GENERAL_RGB, (800, 600), Some(GENERAL_COLOUR));
        for y in 0..strip_height(600) {
            for x in 0..800u32 {
                let i = ((y * 800 + x) * 4) as usize;
                unlabelled.rgba[i..i + 3].copy_from_slice(&GENERAL_RGB);
            }
        }
        assert!(strip_side(&read_strip(&unlabelled))
            .unwrap_err()
            .to_string()
            .contains("no white label"));
    }

    #[test]
    fn a_strip_that_runs_into_the_guest_area_is_refused() {
        // Red down to row 100 on a 768-high screen, whose strip is 48 rows.
        let mut tall = screen(
            1024,
            768,
            CLASSIFIED_RGB,
            (1024, 768),
            Some(CLASSIFIED_COLOUR),
        );
        for y in 48..100u32 {
            for x in 0..1024u32 {
                let i = ((y * 1024 + x) * 4) as usize;
                tall.rgba[i..i + 3].copy_from_slice(&CLASSIFIED_RGB);
            }
        }
        assert!(strip_side(&read_strip(&tall))
            .unwrap_err()
            .to_string()
            .contains("taller"));
    }

    #[test]
    fn fit_keeps_the_aspect_and_centres() {
        // 1024x768 screen: strip 48, area 1024x720; a 4:3 guest is 960x720, 32 px bands.
        let area = guest_area(1024, 768);
        assert_eq!(
            area,
            Rect {
                x: 0,
                y: 48,
                width: 1024,
                height: 720
            }
        );
        assert_eq!(
            fit(area, 1024, 768),
            Rect {
                x: 32,
                y: 48,
                width: 960,
                height: 720
            }
        );
        // A wide guest in a tall area: bands above and below.
        assert_eq!(
            fit(
                Rect {
                    x: 0,
                    y: 50,
                    width: 800,
                    height: 750
                },
                1600,
                900
            ),
            Rect {
                x: 0,
                y: 200,
                width: 800,
                height: 450
            }
        );
        // Scaling up keeps the aspect too.
        assert_eq!(
            fit(
                Rect {
                    x: 0,
                    y: 0,
                    width: 1280,
                    height: 960
                },
                640,
                480
            ),
            Rect {
                x: 0,
                y: 0,
                width: 1280,
                height: 960
            }
        );
    }

    #[test]
    fn guest_area_checks_centre_corners_and_bands() {
        let good = screen(1280, 800, GENERAL_RGB, (1024, 768), Some(GENERAL_COLOUR));
        let said = judge(
            &good,
            &Want {
                side: "general",
                colour: Some(GENERAL_COLOUR),
                guest_size: Some((1024, 768)),
            },
        )
        .unwrap();
        assert!(
            said.contains("general strip") && said.contains("black beside it"),
            "{said}"
        );
        // The right side, the wrong colour, no guest yet.
        assert!(judge(
            &good,
            &Want {
                side: "classified",
                colour: None,
                guest_size: None
            }
        )
        .unwrap_err()
        .to_string()
        .contains("not the classified"));
        assert!(check_guest_area(&good, CLASSIFIED_COLOUR, None)
            .unwrap_err()
            .to_string()
            .contains("not the guest's 0000ff"));
        let grey = screen(1280, 800, GENERAL_RGB, (1024, 768), None);
        assert!(check_guest_area(&grey, GENERAL_COLOUR, None)
            .unwrap_err()
            .to_string()
            .contains("no guest"));
        // Stretched to the whole area (aspect lost): the bands are not black.
        let stretched = screen(1280, 800, GENERAL_RGB, (1280, 750), Some(GENERAL_COLOUR));
        assert!(
            check_guest_area(&stretched, GENERAL_COLOUR, Some((1024, 768)))
                .unwrap_err()
                .to_string()
                .contains("not black")
        );
        // Not scaled up (a 640x480 guest drawn 1:1 in the middle): a corner is black.
        let small = screen(1280, 800, GENERAL_RGB, (640, 480), Some(GENERAL_COLOUR));
        let mut unscaled = small.clone();
        let area = guest_area(1280, 800);
        let at = Rect {
            x: (1280 - 640) / 2,
            y: area.y + (area.height - 480) / 2,
            width: 640,
            height: 480,
        };
        for y in area.y..800 {
            for x in 0..1280u32 {
                let inside = x >= at.x && x < at.x + at.width && y >= at.y && y < at.y + at.height;
                let i = ((y * 1280 + x) * 4) as usize;
                unscaled.rgba[i..i + 3].copy_from_slice(if inside {
                    &GENERAL_COLOUR
                } else {
                    &[0, 0, 0]
                });
            }
        }
        assert!(check_guest_area(&small, GENERAL_COLOUR, Some((640, 480))).is_ok());
        assert!(
            check_guest_area(&unscaled, GENERAL_COLOUR, Some((640, 480)))
                .unwrap_err()
                .to_string()
                .contains("inside where")
        );
    }

    #[test]
    fn near_and_mean_colour() {
        assert!(near([200, 10, 20], CLASSIFIED_RGB, TOLERANCE));
        assert!(!near([255, 255, 255], CLASSIFIED_RGB, TOLERANCE));
        let img = screen(
            1024,
            768,
            CLASSIFIED_RGB,
            (1024, 768),
            Some(CLASSIFIED_COLOUR),
        );
        assert_eq!(mean_colour(&img, 512, 400, CENTRE_HALF), CLASSIFIED_COLOUR);
        // Clipped at the edge, still an average of real pixels.
        assert_eq!(mean_colour(&img, 0, 0, CENTRE_HALF), CLASSIFIED_RGB);
    }

    #[test]
    fn ppm_screendumps_are_kept_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let img = screen(64, 48, GENERAL_RGB, (64, 48), Some(GENERAL_COLOUR));
        let path = dir.path().join("x.png");
        write_png(&img, &path).unwrap();
        assert_eq!(load_image(&path).unwrap(), img);
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_keys("ok keys 30:1 30:0 48:1 48:0").unwrap(),
            vec![(30, 1), (30, 0), (48, 1), (48, 0)]
        );
        assert_eq!(parse_keys("ok keys").unwrap(), vec![]);
        assert!(parse_keys("ok keys-clear").is_err());
        assert!(parse_keys("error unknown command \"keys\"").is_err());
        assert!(parse_keys("ok keys 30").is_err());
        assert_eq!(format_keys(&[(46, 1), (46, 0)]), "46:1 46:0");
        assert_eq!(format_keys(&[]), "nothing");
        assert_eq!(
            parse_drew("ok drew solid 0000ff 1024x768").unwrap(),
            (1024, 768)
        );
        assert!(parse_drew("error no framebuffer: /dev/fb0: No such file").is_err());
        assert_eq!(showing_sides("airlock-kiosk: showing classified\nother\nairlock-kiosk: showing general (switch key)\n"), ["classified", "general"]);
    }

    #[test]
    fn proc_and_journal_lines_parse() {
        let holders = "/proc/812/fd /dev/dri/card0\n/proc/812/fd /dev/dri/card0\n/proc/90/fd /dev/fb0\ngarbage\n";
        assert_eq!(
            parse_holders(holders),
            vec![
                (812, "/dev/dri/card0".into()),
                (812, "/dev/dri/card0".into()),
                (90, "/dev/fb0".into())
            ]
        );
        let stat = "812 (airlock kiosk) (x) S 1 812 812 0 -1 4194560 1000 0 0 0 57 23 0 0 20 0 3 0 2500 100000 200";
        assert_eq!(cpu_ticks(stat), Some(80));
        assert_eq!(cpu_ticks("812 (k) S 1"), None);
        assert_eq!(
            monotonic_seconds(
                "[   23.456789] airlock airlock-kiosk[812]: airlock-kiosk: showing classified"
            ),
            Some(23.456789)
        );
        assert_eq!(monotonic_seconds(""), None);
    }

    #[test]
    fn console_combinations_leave_out_what_would_end_the_boot() {
        let combos = console_combinations();
        assert!(combos.iter().any(|c| c == &["ctrl", "alt", "f12"]));
        assert!(combos.iter().any(|c| c == &["ctrl", "alt", "backspace"]));
        for bad in ["b", "o", "c", "k", "u", "e", "i", "delete"] {
            assert!(
                !combos.iter().any(|c| c.last().is_some_and(|k| k == bad)),
                "{bad}"
            );
        }
    }
}
