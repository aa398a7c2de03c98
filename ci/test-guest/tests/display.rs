//! Integration test (QEMU, TCG, no root): with QEMU's `-device VGA` (as the
//! supervisor gives every guest), the test guest draws known patterns on
//! its display (kernel `bochs` DRM driver, fbdev `/dev/fb0`), and a QMP
//! `screendump` shows them: the colour bars and a solid colour, checked at
//! known positions. One boot.

mod common;

use std::time::{Duration, Instant};

use common::{Guest, Ppm, Qmp};

/// `draw bars`, left to right (literal here, not taken from the crate, so a
/// change of the pattern shows).
const BARS: [[u8; 3]; 8] = [
    [255, 255, 255],
    [255, 255, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 0, 255],
    [255, 0, 0],
    [0, 0, 255],
    [0, 0, 0],
];

/// Points to check for a screen of `w`×`h`: each bar's centre column on
/// three rows (top, middle, bottom), with the colour expected there.
fn bar_points(w: usize, h: usize) -> Vec<(usize, usize, [u8; 3])> {
    let mut points = Vec::new();
    for (i, colour) in BARS.iter().enumerate() {
        let x = (2 * i + 1) * w / 16;
        for y in [2, h / 2, h - 3] {
            points.push((x, y, *colour));
        }
    }
    points
}

/// Takes screendumps until every point has its colour or `timeout` passes
/// (fbdev reaches the card's memory through a deferred-I/O worker); returns
/// the last screendump and the points that differ in it.
fn wait_for_screen(
    qmp: &mut Qmp,
    path: &std::path::Path,
    timeout: Duration,
    points: impl Fn(usize, usize) -> Vec<(usize, usize, [u8; 3])>,
) -> (Ppm, Vec<String>) {
    let deadline = Instant::now() + timeout;
    loop {
        qmp.execute(&format!(
            r#"{{"execute": "screendump", "arguments": {{"filename": "{}"}}}}"#,
            path.display()
        ))
        .unwrap();
        let ppm = Ppm::parse(&std::fs::read(path).unwrap()).unwrap();
        let wrong: Vec<String> = points(ppm.width, ppm.height)
            .into_iter()
            .filter(|(x, y, c)| ppm.pixel(*x, *y) != *c)
            .map(|(x, y, c)| format!("({x},{y}) is {:?}, expected {c:?}", ppm.pixel(x, y)))
            .collect();
        if wrong.is_empty() || Instant::now() > deadline {
            return (ppm, wrong);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ok drew <pattern> <w>x<h>` → (w, h).
fn drawn_size(reply: &str, pattern: &str) -> (usize, usize) {
    let size = reply
        .strip_prefix(&format!("ok drew {pattern} "))
        .unwrap_or_else(|| panic!("unexpected draw reply {reply:?}"));
    let (w, h) = size.split_once('x').unwrap();
    (w.parse().unwrap(), h.parse().unwrap())
}

#[test]
fn guest_draws_bars_and_solid_colour_on_vga() {
    let guest = Guest::boot(|dir| {
        vec![
            "-device".into(),
            "VGA".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()).into(),
        ]
    });
    let mut client = guest.client();
    let mut qmp = Qmp::connect(&guest.dir.path().join("qmp.sock")).unwrap();
    let shot = guest.dir.path().join("screen.ppm");
    let t = Duration::from_secs(10);

    let reply = client.command("draw bars", t).unwrap();
    let (w, h) = drawn_size(&reply, "bars");
    assert!(w >= 640 && h >= 480, "{reply}");
    let (ppm, wrong) = wait_for_screen(&mut qmp, &shot, t, bar_points);
    assert_eq!(
        (ppm.width, ppm.height),
        (w, h),
        "the screendump has the size the guest drew"
    );
    assert!(wrong.is_empty(), "colour bars not on the screen: {wrong:?}");
    // The edges between bars are where the guest put them (± one pixel).
    for i in 1..BARS.len() {
        let edge = i * w / 8;
        assert_eq!(ppm.pixel(edge - 2, h / 2), BARS[i - 1], "left of edge {i}");
        assert_eq!(ppm.pixel(edge + 1, h / 2), BARS[i], "right of edge {i}");
    }

    let reply = client.command("draw solid 336699", t).unwrap();
    assert_eq!(drawn_size(&reply, "solid 336699"), (w, h));
    let solid = |w: usize, h: usize| -> Vec<(usize, usize, [u8; 3])> {
        [
            (0, 0),
            (w - 1, 0),
            (0, h - 1),
            (w - 1, h - 1),
            (w / 2, h / 2),
            (w / 3, 2 * h / 3),
        ]
        .into_iter()
        .map(|(x, y)| (x, y, [0x33, 0x66, 0x99]))
        .collect()
    };
    let (_, wrong) = wait_for_screen(&mut qmp, &shot, t, solid);
    assert!(
        wrong.is_empty(),
        "solid colour not on the screen: {wrong:?}"
    );

    let reply = client.command("draw dots", t).unwrap();
    assert!(reply.starts_with("error usage: draw bars"), "{reply}");
}
